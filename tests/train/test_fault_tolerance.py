"""Unattended runs: `llava-run --max_restarts` restarts a 2-rank LoRA run after SIGKILLs at random moments and
after a hang (caught by step_timeout), each time from the newest complete checkpoint, in ONE launcher
invocation that ends bitwise equal to an uninterrupted run; a SIGTERM to the launcher saves and stops."""
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest
import torch

from test_train_features import LORA, command, finished, wait_for, worker_pids, world  # noqa: F401 (fixture)

STEPS = 120  # 12 kills cost at most ~48 steps of progress (see Chaos), whatever the machine's speed
RUN = {**LORA, "max_steps": STEPS, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 2,
       "resume_from_checkpoint": "auto"}


def supervised(world, name, settings, *launcher_options, port=None):
    """`llava train` on 2 ranks under llava-run with extra launcher options (before the command); with `port`
    a fixed --master_port (bound again by every round's rank 0) instead of --standalone (a fresh one each)."""
    cmd = command(world, name, settings, 2)
    if port is not None:
        cmd[cmd.index("--standalone")] = f"--master_port={port}"
    return cmd[:1] + list(launcher_options) + cmd[1:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(world):
    if "reference" not in world:
        subprocess.run(command(world, "ft_whole", RUN, 2), check=True, capture_output=True, timeout=600)
        world["reference"] = finished(world, "ft_whole", 2)[1]
    return world["reference"]


def assert_bitwise(world, name):
    got, want = finished(world, name, 2)[1], reference(world)
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    final = world["root"] / name / f"checkpoint-{STEPS}" / "trainer_state.json"
    assert final.exists()


def partial_folders(out_dir):
    return {(p.name, p.stat().st_ino) for p in out_dir.glob(".checkpoint-*.partial") if p.exists()}


def newest_checkpoint(out_dir):
    steps = [int(p.name.split("-")[1]) for p in out_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def wait_until(condition, seconds):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.001)


class Chaos(threading.Thread):
    """SIGKILLs one random worker per round, cycling through three moments: early (within 1.5 s of the round's
    workers appearing: loading, rendezvous; cut short by the round's first save), during a save (a new .partial
    folder exists) and at random (after 1-3 new checkpoints, a few ms into the next step). Every moment is bounded
    in training PROGRESS, not in seconds, so a fast machine cannot finish the run before the kills are done
    (120 steps, at most ~4 per round: 12 kills need at most ~48)."""

    def __init__(self, launcher, out_dir, kills, seed):
        super().__init__(daemon=True)
        self.launcher, self.out_dir, self.wanted, self.rng = launcher, out_dir, kills, random.Random(seed)
        self.kills = []  # (moment, a save was in progress)
        self.error = None

    def new_round(self, seen):
        while self.launcher.poll() is None:
            try:
                pids = worker_pids(self.launcher)
            except (FileNotFoundError, ProcessLookupError):
                return None
            if len(pids) == 2 and not seen & set(pids):
                return pids
            time.sleep(0.005)
        return None

    def wait_for_moment(self, moment, old_partials, round_start):
        ended = lambda: self.launcher.poll() is not None  # noqa: E731
        saving = lambda: ended() or bool(partial_folders(self.out_dir) - old_partials)  # noqa: E731
        if moment == "early":
            wait_until(lambda: saving() or newest_checkpoint(self.out_dir) > round_start, self.rng.uniform(0.0, 1.5))
        elif moment == "random":
            target = round_start + self.rng.randint(1, 3)
            wait_until(lambda: ended() or newest_checkpoint(self.out_dir) >= target, 120)
            time.sleep(self.rng.uniform(0.0, 0.05))
        else:
            wait_until(saving, 120)

    def run(self):
        try:
            seen = set()
            while len(self.kills) < self.wanted:
                pids = self.new_round(seen)
                if pids is None:
                    return
                seen |= set(pids)
                moment = ["early", "save", "random"][len(self.kills) % 3]
                old_partials = partial_folders(self.out_dir)
                self.wait_for_moment(moment, old_partials, newest_checkpoint(self.out_dir))
                in_save = bool(partial_folders(self.out_dir) - old_partials)
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills.append((moment, in_save))
        except Exception as e:  # reported by the test
            self.error = e


@pytest.mark.parametrize("async_save", [False, True], ids=["sync_saves", "async_saves"])
def test_sigkills_at_random_moments_one_launcher_invocation_ends_bitwise(world, async_save):
    """12 SIGKILLs at the Chaos moments, one llava-run invocation, bitwise equal to the uninterrupted run. With
    async_save: true every save is written by a background thread while the next steps run; some kills land
    while it writes (its .partial folder, made in the step, exists until the thread commits it) and each restart
    resumes from the newest COMPLETE checkpoint (async saves write what synchronous ones do)."""
    reference(world)
    name = "ft_chaos_async" if async_save else "ft_chaos"
    log = world["root"] / f"{name}.log"
    start = time.time()
    with open(log, "w") as out:
        settings = {**RUN, "async_save": async_save}
        proc = subprocess.Popen(supervised(world, name, settings, "--max_restarts=30", "--shutdown_timeout=2"),
                                stdout=out, stderr=subprocess.STDOUT)
        chaos = Chaos(proc, world["root"] / name, kills=12, seed=23 if async_save else 19)
        chaos.start()
        code = proc.wait(timeout=600)
        chaos.join(timeout=5)
    text = log.read_text()
    assert chaos.error is None, chaos.error
    assert code == 0, text[-3000:]
    kills = chaos.kills
    print(f"\n{len(kills)} SIGKILLs ({kills}) in {time.time() - start:.1f}s, {'async' if async_save else 'sync'} saves, "
          f"{text.count('restarting every worker')} restarts, one llava-run invocation, exit 0")
    assert len(kills) >= 10
    assert text.count("restarting every worker") == len(kills)  # every kill was one restart, nothing else failed
    assert sum(m == "early" for m, _ in kills) >= 3
    assert sum(in_save for _, in_save in kills) >= 3
    for bad in ("address already in use", "did not join", "not a checkpoint", "failed on another rank"):
        assert bad not in text.lower(), bad  # no stale store, port or folder
    assert not list((world["root"] / name).glob("checkpoint-*/*.partial"))
    assert_bitwise(world, name)


def test_a_hang_is_caught_by_step_timeout_and_the_restarted_group_ends_bitwise(world):
    reference(world)
    name = "ft_hang"
    timeout = 4
    env = {**os.environ, "LLAVA_TEST_HANG_AT_STEP": "5", "LLAVA_TEST_HANG_RANK": "1"}
    start = time.time()
    proc = subprocess.run(supervised(world, name, {**RUN, "step_timeout": timeout}, "--max_restarts=1",
                                     "--shutdown_timeout=2", port=free_port()), env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    text = proc.stdout + proc.stderr
    reports = [line for line in text.splitlines() if line.startswith("[rank") and "error: step_timeout:" in line]
    print(f"\nhang at step 5 on rank 1 (step_timeout {timeout}s): exit {proc.returncode} after {elapsed:.1f}s; "
          f"reports: {reports}")
    assert proc.returncode == 0, text[-3000:]
    assert reports
    for line in reports:  # the hung rank waits for data, the other in the next collective
        assert (f"[rank1]:error: step_timeout: no step finished within {timeout}s on rank 1: stuck in step 5, "
                "micro-batch 0, phase data;" in line or
                f"[rank0]:error: step_timeout: no step finished within {timeout}s on rank 0: stuck in step 5, "
                "micro-batch 0, phase collective;" in line), line
    assert "exited with status 3" in text and "restarting every worker (restart 1 of 1)" in text
    assert elapsed < timeout + 120
    assert_bitwise(world, name)


def test_sigterm_to_the_launcher_saves_and_does_not_restart(world):
    name = "ft_preempt"
    s = {**RUN, "save_steps": 100, "save_on_interrupt": True}
    log = world["root"] / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(supervised(world, name, s, "--max_restarts=5"), stdout=out, stderr=subprocess.STDOUT)
        wait_for(proc, log, "'loss'")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "interrupted by a signal: saved checkpoint-" in text and "(no restart)" in text
    assert "restarting" not in text and text.count("training:") == 1  # one round only
    saved = int(text.split("saved checkpoint-")[1].split(",")[0])
    assert (world["root"] / name / f"checkpoint-{saved}" / "trainer_state.json").exists()


def test_sigterm_to_one_worker_saves_and_the_launcher_restarts_the_unfinished_run(world):
    """A preempted worker (SIGTERM to it, not to llava-run): every rank saves and stops, the workers exit
    128 + SIGTERM (the run is not done), so the launcher restarts the group, which resumes from that save
    and ends bitwise equal to the uninterrupted run."""
    reference(world)
    name = "ft_worker_term"
    s = {**RUN, "save_on_interrupt": True}
    log = world["root"] / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(supervised(world, name, s, "--max_restarts=2"), stdout=out, stderr=subprocess.STDOUT)
        wait_for(proc, log, "'loss'")
        os.kill(worker_pids(proc)[1], signal.SIGTERM)
        code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 0, text
    assert "interrupted by a signal: saved checkpoint-" in text
    assert f"failed: it exited with status {128 + signal.SIGTERM};" in text and "restarting every worker" in text, text
    assert text.count("restarting") == 1, text
    assert_bitwise(world, name)


def test_two_nodes_on_loopback_restart_in_the_same_round_and_end_bitwise(world):
    """Two "nodes" (one llava-run each, 1 worker per node) linked at a fixed --master_port: a SIGKILL on
    node 1 and later one on node 0 restart the workers of BOTH nodes, in the same round, from the newest
    checkpoint; both launchers exit 0 and the weights equal the uninterrupted 2-rank run's."""
    reference(world)
    name = "ft_nodes"
    out_dir = world["root"] / name
    port = free_port()
    base = command(world, name, RUN, 2)
    train = base[base.index("--nproc_per_node=2") + 1:]
    procs, logs = [], []
    for node in range(2):
        logs.append(world["root"] / f"{name}.node{node}.log")
        launcher = [base[0], "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "--max_restarts=3", "--shutdown_timeout=2", "--join_timeout=60", *train]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as llava-run sets for the 2 workers of the reference run
        procs.append(subprocess.Popen(launcher, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, env=env))
    killed = []
    for node in (1, 0):  # a follower's worker, then the leader's: each after one more checkpoint
        seen = newest_checkpoint(out_dir)
        wait_until(lambda: newest_checkpoint(out_dir) >= seen + 2 or any(p.poll() is not None for p in procs), 120)
        pid = worker_pids(procs[node])[0]
        os.kill(pid, signal.SIGKILL)
        killed.append((node, pid))
        wait_until(lambda: worker_pids(procs[node]) not in ([], [pid]), 60)  # the next round began
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    print(f"\ntwo nodes, SIGKILLs {killed}: exits {codes}; restarts per node "
          f"{[t.count('restarting every worker') for t in texts]}")
    for node, text in enumerate(texts):
        assert codes[node] == 0, text[-3000:]
        assert "restarting every worker (restart 1 of 3)" in text and "restarting every worker (restart 2 of 3)" in text
        assert "restart 3 of 3" not in text
        assert "worker rank 1 (node 1, local rank 0" in text and "worker rank 0 (node 0, local rank 0" in text
        assert "address already in use" not in text.lower()
    assert_bitwise(world, name)
