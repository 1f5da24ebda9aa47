"""ZeRO memory: measured per-rank bytes of parameters + gradients + optimizer state with 1, 2 and 4 ranks,
ZeRO-1/2, bf16 and fp32, against the ZeRO formulas (Ψ trainable parameters, N ranks):

    bf16 (mixed precision): stage 1  2Ψ params + 2Ψ grads   + 12Ψ/N (fp32 master, exp_avg, exp_avg_sq) = 4Ψ + 12Ψ/N
                            stage 2  2Ψ params + 2Ψ/N grads + 12Ψ/N                                    = 2Ψ + 14Ψ/N
    fp32:                   stage 1  4Ψ params + 4Ψ grads   + 8Ψ/N (the moments; the params are the masters)
                            stage 2  4Ψ params + 4Ψ/N grads + 8Ψ/N
    (1 rank: both stages are plain AdamW: 16Ψ.)

The figures come from `llava train --metrics-out` (`zero.peak_memory`): per rank, the high point of the run
with the largest params + grads + optimizer, read from the live tensors' storages (train/sharded_adamw.h:
every bucket reduction before its .grads are freed, every chunk of the norm and the update). They include
the transient buffers (buckets of `reduce_bucket_size` elements, fp32 gradient chunks, all-gather chunks),
shown apart, and
under ZeRO 2 whatever gradients autograd has produced whole and not reduced yet (at least the largest
parameter's: the formulas leave that out). Not a test.

The model is common.SMALL_MODEL with a 1024-entry vocabulary: with 4096 its embedding and lm_head are 20% of
Ψ each, far from a real LLaVA (Vicuna-7B's are 2%), and under ZeRO 2 the largest gradient would dominate
the difference. Full fine-tune (vision tower frozen), accumulation 2, 2 optimizer steps (the peak comes
once the moments exist). Multi-rank runs use Gloo (build/).

    .venv/bin/python bench/bench_zero.py [--build build] [--ranks 1,2,4] [--bucket 32768] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import tempfile

import common

ZERO_MODEL = dict(common.SMALL_MODEL, vocab=1024)


def formula_bytes(stage, bf16, psi, n):
    """Per-rank params + grads + optimizer bytes as the ZeRO paper counts them."""
    if n == 1:
        stage = 1  # nothing is partitioned
    if bf16:
        return (4 * psi + 12 * psi / n) if stage == 1 else (2 * psi + 14 * psi / n)
    return (8 * psi + 8 * psi / n) if stage == 1 else (4 * psi + 12 * psi / n)


def formula_text(stage, bf16, n):
    if n == 1:
        return "16Ψ"
    if bf16:
        return "4Ψ+12Ψ/N" if stage == 1 else "2Ψ+14Ψ/N"
    return "8Ψ+8Ψ/N" if stage == 1 else "4Ψ+12Ψ/N"


def not_available(why, out):
    print(f"ZeRO memory: not available ({why})")
    if out:
        json.dump({"available": False, "why": why}, open(out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(common.ROOT, "build"))
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--bucket", type=int, default=32768, help="reduce_bucket_size (elements)")
    ap.add_argument("--json")
    args = ap.parse_args()
    llava, launcher = os.path.join(args.build, "src", "cli", "llava"), os.path.join(args.build, "src", "distributed", "llava-run")
    if not (os.path.exists(llava) and os.path.exists(launcher)):
        return not_available(f"no {llava} or {launcher}", args.json)
    mib = lambda b: f"{b / 2**20:.2f}"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=8, batch=1, model_spec=ZERO_MODEL)
        base.update(max_steps=2, gradient_accumulation_steps=2, learning_rate=1e-5, reduce_bucket_size=args.bucket)
        probe_metrics = os.path.join(root, "probe.json")
        probe = subprocess.run([llava, "train", common.write_config(os.path.join(root, "probe.yaml"), {**base, "max_steps": 1}),
                                "--metrics-out", probe_metrics], capture_output=True, text=True)
        if probe.returncode != 0:
            return not_available(f"`llava train` with reduce_bucket_size: {probe.stderr.strip()[-300:]}", args.json)
        if "peak_memory" not in json.load(open(probe_metrics)).get("zero", {}):
            return not_available("--metrics-out has no `zero.peak_memory`", args.json)
        rows, result = [], {"available": True, "build": args.build, "model_parameters": counts,
                            "bucket_numel": args.bucket, "runs": []}
        for stage in (1, 2):
            for bf16 in (True, False):
                for n in map(int, args.ranks.split(",")):
                    metrics = os.path.join(root, f"zero{stage}{int(bf16)}{n}.json")
                    cfg = common.write_config(os.path.join(root, "zero.yaml"), {**base, "zero_stage": stage, "bf16": bf16})
                    r = subprocess.run([launcher, "--nproc_per_node", str(n), "--standalone", llava, "train", cfg,
                                        "--metrics-out", metrics], env=common.thread_env(1), capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"ZeRO-{stage} bf16={bf16} {n} ranks failed: {r.stderr.strip()[-300:]}")
                        continue
                    z = json.load(open(metrics))["zero"]
                    psi, peak = z["trainable_numel"], z["peak_memory"]
                    want = formula_bytes(stage, bf16, psi, n)
                    for rank in range(n):
                        got = peak["total_bytes"][rank]
                        run = {"stage": stage, "bf16": bf16, "ranks": n, "rank": rank, "trainable": psi,
                               "largest_param_numel": z["largest_param_numel"], "padding_numel": z["padding_numel"],
                               "formula": formula_text(stage, bf16, n), "formula_bytes": want, "ratio": got / want,
                               **{k: peak[k][rank] for k in peak}}
                        result["runs"].append(run)
                        rows.append((stage, "bf16" if bf16 else "fp32", n, rank, mib(peak["param_bytes"][rank]),
                                     mib(peak["grad_bytes"][rank]), mib(peak["optimizer_bytes"][rank]),
                                     mib(peak["transient_bytes"][rank]), mib(got), f"{mib(want)} ({formula_text(stage, bf16, n)})",
                                     f"{got / want:.4f}"))
        print(f"Ψ = {result['runs'][0]['trainable'] if result['runs'] else '?'} trainable parameters "
              f"(largest tensor {result['runs'][0]['largest_param_numel'] if result['runs'] else '?'}), "
              f"buckets of {args.bucket} elements")
        common.print_table(rows, ("stage", "dtype", "ranks", "rank", "params MiB", "grads MiB", "optimizer MiB",
                                  "transient MiB", "total MiB", "formula MiB", "ratio"))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
