"""Gloo collectives across 1, 2 and 3 processes under llava-run, each result checked against torch in the
venv computing it from every rank's inputs; plus the failure modes: a rank that never joins, a rank that
stalls, a rank that dies. Timeouts are a few seconds (LLAVA_DIST_TIMEOUT)."""
import json
import math
import os
import subprocess
import time

import pytest
import torch

from llava_oracle import binary
from test_launcher import clean_env, free_port

# LLAVA_DIST_DEVICE=cuda (scripts/gpu-check.sh, one GPU: world 1 only): the same checks on CUDA tensors over NCCL.
BACKEND = "nccl" if os.environ.get("LLAVA_DIST_DEVICE") == "cuda" else "gloo"
RESULTS_PER_RANK = {"reduce_scatter_sum_f32", "reduce_scatter_avg_bf16"}  # a different shard on every rank


def inputs(seed, rank, n):
    """dist_worker.cpp's input(): exact float32 k/7."""
    i = torch.arange(n, dtype=torch.int64)
    k = (i * 7919 + rank * 104729 + seed * 31337) % 2001 - 1000
    return k.to(torch.float32) / 7.0


def expected_results(rank, world):
    per_rank = lambda seed, n, dtype=torch.float32: [inputs(seed, r, n).to(dtype).double() for r in range(world)]
    total = lambda xs: torch.stack(xs).sum(0)
    exp = {
        "allreduce_sum_f32": total(per_rank(1, 37)),
        "allreduce_avg_f32": total(per_rank(2, 37)) / world,
        "allreduce_sum_bf16": total(per_rank(3, 37, torch.bfloat16)),
        "allreduce_avg_bf16": total(per_rank(4, 37, torch.bfloat16)) / world,
        "broadcast_f32_root_last": inputs(5, world - 1, 11).double(),
        "broadcast_bf16_root_0": inputs(6, 0, 11).bfloat16().double(),
        "all_gather_f32": torch.cat(per_rank(7, 5)),
        "all_gather_bf16": torch.cat(per_rank(8, 5, torch.bfloat16)),
        "reduce_scatter_sum_f32": total(per_rank(9, world * 6))[rank * 6:(rank + 1) * 6],
        "reduce_scatter_avg_bf16": (total(per_rank(10, world * 6, torch.bfloat16)) / world)[rank * 6:(rank + 1) * 6],
        "barrier_saw_mark": torch.tensor([1.0], dtype=torch.float64),
    }
    numels = [12, 5, 8, 7, 1]
    exp["bucket_average"] = torch.cat([total(per_rank(20 + j, n)) / world for j, n in enumerate(numels)])
    # ZeRO: params a,b,c,d of 10,7,1,13 elements, flat and padded to ceil(31/world) per rank, pad = -1.
    params = [torch.arange(n, dtype=torch.float64) + 100 * p for p, n in enumerate([10, 7, 1, 13])]
    shard = math.ceil(31 / world)
    exp["zero_all_gather"] = torch.cat(params + [torch.full((shard * world - 31,), -1.0, dtype=torch.float64)])
    return exp


BF16_SUMS = {"allreduce_sum_bf16": 3, "allreduce_avg_bf16": 4, "reduce_scatter_avg_bf16": 10}  # name: input seed


def tolerance(name):
    if name.startswith(("broadcast", "all_gather", "zero", "barrier")):
        return dict(rtol=0, atol=0)  # moved, not computed: exact
    if name.endswith("bf16"):  # bf16 sums are checked against their rounding bound (bf16_sum_bound)
        return None
    return dict(rtol=1e-6, atol=1e-6)


def bf16_sum_bound(name, rank, world, exp):
    """Gloo (like NCCL) sums bf16 in bf16 along its ring: a value is rounded after each of the world-1
    additions, each time by at most half an ulp of the partial sum (2^-9 relative), and a partial sum is
    at most the sum of the magnitudes. Plus the final rounding (and the division of an average)."""
    seed = BF16_SUMS[name]
    n = exp.numel() * (world if name.startswith("reduce_scatter") else 1)
    magnitudes = torch.stack([inputs(seed, r, n).bfloat16().double().abs() for r in range(world)]).sum(0)
    if name.startswith("reduce_scatter"):
        magnitudes = magnitudes[rank * exp.numel():(rank + 1) * exp.numel()]
    if name.endswith("avg_bf16"):
        magnitudes = magnitudes / world
    return max(world - 1, 0) * 2 ** -9 * magnitudes + 2 ** -8 * exp.abs() + 1e-12


def run_launcher(args, timeout_s, env_extra=None):
    start = time.time()
    proc = subprocess.run([binary("LLAVA_RUN"), "--standalone", "--shutdown_timeout=2", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=clean_env(LLAVA_DIST_TIMEOUT=str(timeout_s),
                                                                                     **(env_extra or {})))
    return proc, time.time() - start


@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_match_an_independent_computation(tmp_path, world):
    proc, elapsed = run_launcher([f"--nproc_per_node={world}", binary("LLAVA_DIST_WORKER"), "collectives", tmp_path], 20)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    worst = {}
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"], report["backend"]) == (rank, world, BACKEND)
        expected = expected_results(rank, world)
        assert set(report["results"]) == set(expected)
        for name, exp in expected.items():
            got = torch.tensor(report["results"][name], dtype=torch.float64)
            if tolerance(name) is None:
                bound = bf16_sum_bound(name, rank, world, exp)
                assert ((got - exp).abs() <= bound).all(), (rank, name, (got - exp).abs().max().item())
            else:
                torch.testing.assert_close(got, exp, **tolerance(name), msg=lambda m: f"rank {rank} {name}: {m}")
            err = ((got - exp).abs() / exp.abs().clamp_min(1)).max().item() if got.numel() else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
    # Every rank ends with the same bits (JSON holds the doubles exactly).
    for name in set(expected) - RESULTS_PER_RANK:
        assert all(r["results"][name] == reports[0]["results"][name] for r in reports), name
    print(f"\nworld {world}: {elapsed:.2f}s; worst relative error per collective: "
          + ", ".join(f"{k}={v:.1e}" for k, v in sorted(worst.items())))


@pytest.mark.parametrize("absent", [0, 1])
def test_a_rank_that_never_joins_gives_a_clear_timeout(tmp_path, absent):
    proc, elapsed = run_launcher(["--nproc_per_node=2", binary("LLAVA_DIST_WORKER"), "hang", absent], 3)
    present = 1 - absent
    print(f"\nrank {absent} absent: exit {proc.returncode} after {elapsed:.2f}s\n{proc.stderr.strip()}")
    assert proc.returncode == 1
    assert f"[rank{present}]:error: rendezvous at localhost:" in proc.stderr
    if absent == 0:  # rank 0 hosts the store: the others cannot even connect
        assert "not all ranks joined within 3s" in proc.stderr
    else:
        assert "rank(s) 1 did not join within 3s" in proc.stderr
    assert f"worker rank {present} (local rank {present}" in proc.stderr and "exited with status 1" in proc.stderr
    assert elapsed < 20


def test_a_stalled_peer_ends_the_collective_with_a_clear_error():
    proc, elapsed = run_launcher(["--nproc_per_node=2", binary("LLAVA_DIST_WORKER"), "stall"], 3)
    print(f"\nstalled peer: exit {proc.returncode} after {elapsed:.2f}s\n{proc.stderr.strip()}")
    assert proc.returncode == 1
    assert "[rank0]:error: dist::allreduce (rank 0 of 2, gloo): failed:" in proc.stderr
    assert "collective timeout 3s" in proc.stderr
    assert "allreduce returned" not in proc.stdout
    assert elapsed < 20


def test_a_rank_dying_under_llava_run_stops_the_run():
    proc, elapsed = run_launcher(["--nproc_per_node=3", binary("LLAVA_DIST_WORKER"), "die"], 10)
    print(f"\nrank 1 dies under llava-run: exit {proc.returncode} after {elapsed:.2f}s\n{proc.stderr.strip()}")
    assert proc.returncode == 128 + 9
    assert "worker rank 1 (local rank 1" in proc.stderr and "killed by signal 9" in proc.stderr
    assert elapsed < 10  # ranks 0 and 2 were stopped, not left waiting for the 10 s collective timeout


def test_a_dead_peer_ends_the_collective_with_a_clear_error():
    """Without llava-run (which would stop rank 0 first): rank 1 dies, rank 0 must not hang."""
    port = free_port()
    start = time.time()
    procs = [subprocess.Popen([binary("LLAVA_DIST_WORKER"), "die"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                       MASTER_PORT=str(port), LLAVA_DIST_TIMEOUT="10"))
             for r in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    elapsed = time.time() - start
    print(f"\ndead peer: rank 0 exit {procs[0].returncode} after {elapsed:.2f}s: {outs[0][1].strip()}")
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1
    assert outs[0][1].startswith("error: dist::allreduce (rank 0 of 2, gloo): failed:")
    assert elapsed < 30
