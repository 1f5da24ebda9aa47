"""llava-run against the real torchrun (same environment for the same options) and its supervision:
rank-prefixed output, a failing or killed worker stops the others, SIGTERM/SIGINT reach every worker."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llava_oracle import binary

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
LAUNCHER_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
# What llava-run does differently from torchrun, on purpose (see src/distributed/README.md):
ONLY_TORCHRUN = {"TORCHELASTIC_ERROR_FILE",          # no elastic agent collects error files
                 "TORCHELASTIC_SIGNALS_TO_HANDLE"}   # the agent's own signal list
AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"          # torchrun: True (its agent hosts the store); ours: False

DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), open(os.path.join(sys.argv[1], os.environ['RANK'] + '.json'), 'w'))"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env


def launched_env(out_dir, base):
    """{rank: {var: value}} of what the launcher added to the base environment."""
    result = {}
    for name in os.listdir(out_dir):
        env = json.load(open(os.path.join(out_dir, name)))
        result[int(name.split(".")[0])] = {k: v for k, v in env.items() if k not in base or base[k] != v}
    return result


def run_nodes(commands, env, timeout=120):
    """Runs one launcher per node at once (a multi-node run on one machine); all must succeed."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    for p, c in zip(procs, commands):
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{c} exited {p.returncode}\n{out}\n{err}"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["standalone", "static_one_node", "two_nodes"])
def test_environment_matches_torchrun(tmp_path, case):
    port = free_port()
    nodes = {"standalone": [["--standalone", "--nproc_per_node=2"]],
             "static_one_node": [["--nnodes=1", "--nproc-per-node=3", "--master_addr=127.0.0.1", f"--master_port={port}"]],
             "two_nodes": [["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                            f"--master_port={port}"] for n in (0, 1)]}[case]
    base = clean_env()
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "torchrun"
    ours_dir.mkdir(), theirs_dir.mkdir()
    script = tmp_path / "dump_env.py"
    script.write_text(DUMP_ENV)
    run_nodes([[TORCHRUN, *opts, str(script), str(theirs_dir)] for opts in nodes], base)
    run_nodes([[binary("LLAVA_RUN"), *opts, sys.executable, str(script), str(ours_dir)] for opts in nodes], base)

    theirs, ours = launched_env(theirs_dir, base), launched_env(ours_dir, base)
    assert sorted(theirs) == sorted(ours) == list(range(len(theirs)))
    print(f"\n{case}: torchrun set {sorted(theirs[0])}")
    for rank in theirs:
        assert set(ours[rank]) == set(theirs[rank]) - ONLY_TORCHRUN, rank
        assert theirs[rank][AGENT_STORE] == "True" and ours[rank][AGENT_STORE] == "False"
        random_per_run = {"MASTER_PORT", "TORCHELASTIC_RUN_ID"} if case == "standalone" else set()
        for key in set(ours[rank]) - {AGENT_STORE} - random_per_run:
            assert ours[rank][key] == theirs[rank][key], (rank, key)
    if case == "standalone":  # a free port, and one run id for all workers
        assert len({e["MASTER_PORT"] for e in ours.values()}) == 1 and int(ours[0]["MASTER_PORT"]) > 0
        assert len({e["TORCHELASTIC_RUN_ID"] for e in ours.values()}) == 1


def launch(args, env=None, **kw):
    return subprocess.Popen([binary("LLAVA_RUN"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or clean_env(), **kw)


def test_output_lines_carry_the_rank():
    proc = launch(["--nproc_per_node=2", "sh", "-c", 'echo "out $RANK"; echo "err $RANK" >&2; printf "tail $RANK"'])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == ["[rank0]:out 0", "[rank0]:tail 0", "[rank1]:out 1", "[rank1]:tail 1"]
    assert sorted(err.splitlines()) == ["[rank0]:err 0", "[rank1]:err 1"]


# A worker that records its pid, waits, and notes a SIGTERM in a file before exiting.
PATIENT_WORKER = 'trap "echo term > {d}/term$RANK; exit 0" TERM; echo $$ > {d}/pid$RANK; sleep 60 & wait $!'


def wait_for_files(paths, timeout=20):
    deadline = time.time() + timeout
    while not all(os.path.exists(p) and open(p).read().strip() for p in paths):
        assert time.time() < deadline, f"workers did not start: {paths}"
        time.sleep(0.05)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_failing_worker_stops_the_others(tmp_path):
    script = f'if [ $RANK = 1 ]; then while [ ! -e {tmp_path}/pid0 ] || [ ! -e {tmp_path}/pid2 ]; do sleep 0.05; done; exit 7; fi; ' + \
        PATIENT_WORKER.format(d=tmp_path)
    start = time.time()
    proc = launch(["--nproc_per_node=3", "--shutdown_timeout=5", "sh", "-c", script])
    out, err = proc.communicate(timeout=60)
    elapsed = time.time() - start
    print(f"\nfailing worker: llava-run exited {proc.returncode} after {elapsed:.2f}s; stderr: {err.strip()}")
    assert proc.returncode == 7
    assert "worker rank 1 (local rank 1" in err and "exited with status 7" in err
    assert (tmp_path / "term0").read_text().strip() == "term"
    assert (tmp_path / "term2").read_text().strip() == "term"
    assert elapsed < 5  # the others went at the SIGTERM, long before the SIGKILL grace ran out


def test_a_killed_worker_stops_the_others_even_if_they_ignore_sigterm(tmp_path):
    stubborn = f'trap "" TERM; echo $$ > {tmp_path}/pid$RANK; while true; do sleep 0.1; done'
    start = time.time()
    proc = launch(["--nproc_per_node=3", "--shutdown-timeout=1", "sh", "-c", stubborn])
    pid_files = [tmp_path / f"pid{r}" for r in range(3)]
    wait_for_files(pid_files)
    pids = [int(p.read_text()) for p in pid_files]
    os.kill(pids[2], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    elapsed = time.time() - start
    print(f"\nkilled worker: llava-run exited {proc.returncode} after {elapsed:.2f}s; stderr: {err.strip()}")
    assert proc.returncode == 128 + signal.SIGKILL
    assert "worker rank 2 (local rank 2" in err and "killed by signal 9" in err
    assert not any(alive(p) for p in pids)  # the two that ignored SIGTERM got SIGKILL after 1 s
    assert elapsed < 15


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_every_worker(tmp_path, sig):
    proc = launch(["--nproc_per_node=2", "sh", "-c", PATIENT_WORKER.format(d=tmp_path).replace("TERM", sig.name[3:])])
    wait_for_files([tmp_path / "pid0", tmp_path / "pid1"])
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig
    assert "interrupted by" in err
    for r in range(2):
        assert (tmp_path / f"term{r}").read_text().strip() == "term"


def test_bad_options_are_clear_errors():
    for args, needle in [(["--nnodes=1:2", "x"], "elastic ranges"), (["--nproc_per_node=2"], "no command"),
                         (["--nproc_per_node=0", "x"], "--nproc_per_node")]:
        proc = subprocess.run([binary("LLAVA_RUN"), *args], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
    proc = subprocess.run([binary("LLAVA_RUN"), "no-such-command-xyz"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 127 and "[rank0]:llava-run: cannot execute 'no-such-command-xyz'" in proc.stderr


# Each round appends "<round> <MASTER_PORT> <TORCHELASTIC_MAX_RESTARTS>" to {d}/rounds$RANK; rank 1 fails
# (exit 7, after a line on stderr, once every rank has written its line) in every round below {fail_below}; the
# others wait for the SIGTERM.
FLAKY_WORKER = ('echo "$TORCHELASTIC_RESTART_COUNT $MASTER_PORT $TORCHELASTIC_MAX_RESTARTS" >> {d}/rounds$RANK; '
                'if [ $RANK = 1 ]; then if [ $TORCHELASTIC_RESTART_COUNT -lt {fail_below} ]; then '
                'for r in $(seq 0 $((WORLD_SIZE - 1))); do '  # every rank has started this round: none is killed
                'until grep -qs "^$TORCHELASTIC_RESTART_COUNT " {d}/rounds$r; do sleep 0.02; done; done; '
                'echo "boom in round $TORCHELASTIC_RESTART_COUNT" >&2; exit 7; fi; exit 0; fi; '
                'if [ $TORCHELASTIC_RESTART_COUNT -lt {fail_below} ]; then sleep 30 & wait $!; fi')


def rounds(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_max_restarts_restarts_every_worker_until_they_succeed(tmp_path):
    proc = launch(["--standalone", "--nproc_per_node=2", "--max_restarts=3", "--shutdown_timeout=5", "sh", "-c",
                   FLAKY_WORKER.format(d=tmp_path, fail_below=2)])
    out, err = proc.communicate(timeout=60)
    print(f"\nflaky worker, --max_restarts 3: exit {proc.returncode}; stderr:\n{err.strip()}")
    assert proc.returncode == 0, err
    for rank in range(2):
        got = rounds(tmp_path / f"rounds{rank}")
        assert [r[0] for r in got] == ["0", "1", "2"] and {r[2] for r in got} == {"3"}, got
    ports = [r[1] for r in rounds(tmp_path / "rounds0")]
    assert len(set(ports)) == 3  # --standalone: a fresh port for every round's store
    assert err.count("worker rank 1 (local rank 1") == 2 and "(its last error line: boom in round 1)" in err
    assert "restarting every worker (restart 1 of 3)" in err and "restarting every worker (restart 2 of 3)" in err
    assert "restart 3 of 3" not in err and "no restarts left" not in err


def test_restarts_exhausted_name_the_rank_and_its_last_failure(tmp_path):
    proc = launch(["--standalone", "--nproc_per_node=2", "--max-restarts", "2", "--shutdown_timeout=5", "sh", "-c",
                   FLAKY_WORKER.format(d=tmp_path, fail_below=99)])
    out, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    print(f"\nrestarts exhausted: exit {proc.returncode}; last line: {last}")
    assert proc.returncode == 7
    assert last.startswith("llava-run: worker rank 1 (local rank 1, pid ")
    assert last.endswith(") failed: it exited with status 7 (its last error line: boom in round 2); stopped the "
                         "other 1 running worker(s); no restarts left (2 of --max_restarts 2 used)")
    assert [r[0] for r in rounds(tmp_path / "rounds0")] == ["0", "1", "2"]


def test_sigterm_to_the_launcher_is_a_preemption_not_a_failure(tmp_path):
    proc = launch(["--standalone", "--nproc_per_node=2", "--max_restarts=5", "sh", "-c",
                   PATIENT_WORKER.format(d=tmp_path)])
    wait_for_files([tmp_path / "pid0", tmp_path / "pid1"])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by Terminated; forwarded it to the workers (no restart)" in err and "restarting" not in err
    for r in range(2):
        assert (tmp_path / f"term{r}").read_text().strip() == "term"


def two_nodes(tmp_path, script, *options, nodes=(0, 1), join_timeout=30):
    """Two "nodes" on loopback: one llava-run per node rank, 2 workers each, linked at a fixed --master_port."""
    port = free_port()
    return [launch(["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={port}", f"--join_timeout={join_timeout}", "--shutdown_timeout=5", *options,
                    "sh", "-c", script]) for n in nodes], port


def test_two_nodes_restart_together_in_the_same_round(tmp_path):
    # Rank 3 (node 1) fails in rounds 0 and 1: node 0's workers are stopped too, both nodes start round 1, then 2.
    script = FLAKY_WORKER.format(d=tmp_path, fail_below=2).replace("[ $RANK = 1 ]", "[ $RANK = 3 ]")
    procs, link_port = two_nodes(tmp_path, script, "--max_restarts=3")
    results = [p.communicate(timeout=90) for p in procs]
    for node, (p, (out, err)) in enumerate(zip(procs, results)):
        print(f"\nnode {node}: exit {p.returncode}; stderr:\n{err.strip()}")
        assert p.returncode == 0, err
        assert "restarting every worker (restart 1 of 3)" in err and "restarting every worker (restart 2 of 3)" in err
        assert err.count("worker rank 3 (node 1, local rank 1") == 2 and "(its last error line: boom in round 1)" in err
        assert "restart 3 of 3" not in err
    got = {rank: rounds(tmp_path / f"rounds{rank}") for rank in range(4)}
    for rank in range(4):
        assert [r[0] for r in got[rank]] == ["0", "1", "2"] and {r[2] for r in got[rank]} == {"3"}, got
    for k in range(3):  # one store per round, the same for all four ranks, never the link's port
        assert len({got[rank][k][1] for rank in range(4)}) == 1, got
    assert len({got[0][k][1] for k in range(3)} | {str(link_port)}) == 4


def test_two_nodes_out_of_restarts_end_alike_naming_the_rank(tmp_path):
    script = FLAKY_WORKER.format(d=tmp_path, fail_below=99).replace("[ $RANK = 1 ]", "[ $RANK = 3 ]")
    procs, _ = two_nodes(tmp_path, script, "--max_restarts=1")
    for node, p in enumerate(procs):
        out, err = p.communicate(timeout=90)
        last = err.strip().splitlines()[-1]
        print(f"\nnode {node}: exit {p.returncode}; last line: {last}")
        assert p.returncode == 7, err
        assert last.startswith("llava-run: worker rank 3 (node 1, local rank 1, pid "), last
        assert last.endswith("(its last error line: boom in round 1); stopped the other 1 running worker(s); "
                             "no restarts left (1 of --max_restarts 1 used)"), last


def test_a_node_that_never_comes_is_named_within_join_timeout(tmp_path):
    for node, needle in [(0, "node(s) 1 did not join round 0: not within --join_timeout 2 s"),
                         (1, "node 0's llava-run did not answer at 127.0.0.1:")]:
        (proc,), _ = two_nodes(tmp_path, "exit 0", "--max_restarts=1", nodes=(node,), join_timeout=2)
        start = time.time()
        out, err = proc.communicate(timeout=30)
        print(f"\nonly node {node}: exit {proc.returncode} after {time.time() - start:.1f}s: {err.strip()}")
        assert proc.returncode == 1 and err.startswith("error: llava-run (node ") and needle in err, err
        assert time.time() - start < 15


def test_sigterm_to_one_node_stops_every_node_without_restart(tmp_path):
    procs, _ = two_nodes(tmp_path, PATIENT_WORKER.format(d=tmp_path), "--max_restarts=5")
    wait_for_files([tmp_path / f"pid{r}" for r in range(4)])
    procs[1].send_signal(signal.SIGTERM)
    for node, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        print(f"\nSIGTERM to node 1's llava-run; node {node}: exit {p.returncode}: {err.strip()}")
        assert p.returncode == 128 + signal.SIGTERM, err
        assert "on node 1: llava-run was interrupted by Terminated (no restart)" in err and "restarting" not in err
    for r in range(4):
        assert (tmp_path / f"term{r}").read_text().strip() == "term"


def test_a_follower_that_loses_node_0s_launcher_stops_its_workers_and_ends(tmp_path):
    procs, _ = two_nodes(tmp_path, PATIENT_WORKER.format(d=tmp_path), "--max_restarts=5")
    wait_for_files([tmp_path / f"pid{r}" for r in range(4)])
    procs[0].kill()  # node 0's llava-run dies (its workers die with it: PR_SET_PDEATHSIG)
    start = time.time()
    out, err = procs[1].communicate(timeout=60)
    procs[0].communicate(timeout=10)
    print(f"\nnode 0's launcher killed; node 1: exit {procs[1].returncode} after {time.time() - start:.1f}s: {err.strip()}")
    assert procs[1].returncode == 1, err
    assert err.strip().endswith("llava-run: lost the connection to node 0's llava-run at the end of round 0 "
                                "(no restart without it)"), err
    assert "restarting" not in err and time.time() - start < 20
    for r in (2, 3):  # node 1's own workers were stopped
        assert (tmp_path / f"term{r}").read_text().strip() == "term"
