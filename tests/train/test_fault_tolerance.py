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

import torch

from test_train_features import LORA, command, finished, wait_for, worker_pids, world  # noqa: F401 (fixture)

STEPS = 120  # enough that 12 kills land before the run ends, on a fast machine too
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


class Chaos(threading.Thread):
    """SIGKILLs one random worker per round, cycling through three moments: early (within 1.5 s of the round's
    workers appearing: loading, rendezvous), during a save (a new .partial folder exists) and at random."""

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
                if moment == "early":
                    time.sleep(self.rng.uniform(0.0, 1.5))
                elif moment == "random":
                    time.sleep(self.rng.uniform(0.0, 2.5))
                else:
                    deadline = time.time() + 60
                    while not partial_folders(self.out_dir) - old_partials and time.time() < deadline:
                        time.sleep(0.001)
                in_save = bool(partial_folders(self.out_dir) - old_partials)
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills.append((moment, in_save))
        except Exception as e:  # reported by the test
            self.error = e


def test_sigkills_at_random_moments_one_launcher_invocation_ends_bitwise(world):
    reference(world)
    name = "ft_chaos"
    log = world["root"] / f"{name}.log"
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(supervised(world, name, RUN, "--max_restarts=30", "--shutdown_timeout=2"),
                                stdout=out, stderr=subprocess.STDOUT)
        chaos = Chaos(proc, world["root"] / name, kills=12, seed=19)
        chaos.start()
        code = proc.wait(timeout=600)
        chaos.join(timeout=5)
    text = log.read_text()
    assert chaos.error is None, chaos.error
    assert code == 0, text[-3000:]
    kills = chaos.kills
    print(f"\n{len(kills)} SIGKILLs ({kills}) in {time.time() - start:.1f}s, "
          f"{text.count('restarting every worker')} restarts, one llava-run invocation, exit 0")
    assert len(kills) >= 10
    assert text.count("restarting every worker") == len(kills)  # every kill was one restart, nothing else failed
    assert sum(m == "early" for m, _ in kills) >= 3
    assert sum(in_save for _, in_save in kills) >= 3
    for bad in ("address already in use", "did not join", "not a checkpoint"):  # no stale store, port or folder
        assert bad not in text.lower(), bad
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


ASYNC_STEPS = 300  # async saves make steps shorter: more of them, so that 12 time-based kills land before the end
ASYNC_RUN = {**RUN, "max_steps": ASYNC_STEPS, "async_save": True}


def test_sigkills_with_async_saves_one_launcher_invocation_ends_bitwise(world):
    """async_save: true (every save written by a background thread while the next steps run): SIGKILLs at the
    same three kinds of moment, at least 3 of them while a background write is running (its .partial folder,
    made in the step, exists until the thread commits it). Each restart resumes from the newest COMPLETE
    checkpoint, and the run ends bitwise equal to an uninterrupted one (async saves write what synchronous
    ones do: test_train_features.py)."""
    subprocess.run(command(world, "ft_whole_async", ASYNC_RUN, 2), check=True, capture_output=True, timeout=600)
    want = finished(world, "ft_whole_async", 2)[1]
    name = "ft_chaos_async"
    log = world["root"] / f"{name}.log"
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(supervised(world, name, ASYNC_RUN, "--max_restarts=30", "--shutdown_timeout=2"),
                                stdout=out, stderr=subprocess.STDOUT)
        chaos = Chaos(proc, world["root"] / name, kills=12, seed=23)
        chaos.start()
        code = proc.wait(timeout=600)
        chaos.join(timeout=5)
    text = log.read_text()
    assert chaos.error is None, chaos.error
    assert code == 0, text[-3000:]
    kills = chaos.kills
    print(f"\n{len(kills)} SIGKILLs with async saves ({kills}) in {time.time() - start:.1f}s, "
          f"{text.count('restarting every worker')} restarts, exit 0")
    assert len(kills) >= 10
    assert text.count("restarting every worker") == len(kills)
    assert sum(in_save for _, in_save in kills) >= 3  # during a background write
    for bad in ("address already in use", "did not join", "not a checkpoint", "failed on another rank"):
        assert bad not in text.lower(), bad
    assert not list((world["root"] / name).glob("checkpoint-*/*.partial"))
    got = finished(world, name, 2)[1]
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert (world["root"] / name / f"checkpoint-{ASYNC_STEPS}" / "trainer_state.json").exists()
