"""ZeRO memory: per-rank optimizer-state bytes with 1, 2 and 4 ranks against the ZeRO paper's partitioned
term (Ψ trainable parameters, N ranks: fp32 master + Adam moments = 12Ψ/N in mixed precision, the two
moments = 8Ψ/N in fp32 training), for stages 1 and 2. The whole per-rank formulas (stage 1: 4Ψ + 12Ψ/N,
stage 2: 2Ψ + 14Ψ/N) also need the gradient bytes, which --metrics-out does not report yet. Not a test.

Multi-rank runs need Gloo, which only the Debian libtorch 1.13 build (build/) has; the torch2 build runs
one process. Runs when that build's `llava train` accepts `zero_stage` and writes `zero` into
--metrics-out ({stage, world_size, optimizer_state_bytes: [per rank], trainable_numel, padding_numel});
otherwise prints why it did not run. Uses a small LLaVA (common.SMALL_MODEL): 4 ranks share 2 cores.

    .venv/bin/python bench/bench_zero.py [--build build] [--ranks 1,2,4] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import tempfile

import common

PARTITIONED_BYTES_PER_PARAM = {True: 12, False: 8}  # bf16 (mixed precision) / fp32 training


def not_available(why, out):
    print(f"ZeRO memory: not available ({why})")
    if out:
        json.dump({"available": False, "why": why}, open(out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(common.ROOT, "build"))
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--json")
    args = ap.parse_args()
    llava, launcher = os.path.join(args.build, "src", "cli", "llava"), os.path.join(args.build, "src", "dist", "llava-run")
    if not (os.path.exists(llava) and os.path.exists(launcher)):
        return not_available(f"no {llava} or {launcher}", args.json)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=8, batch=1, model_spec=common.SMALL_MODEL)
        base.update(max_steps=1, learning_rate=1e-5)
        probe_metrics = os.path.join(root, "probe.json")
        probe = subprocess.run([llava, "train", common.write_config(os.path.join(root, "probe.yaml"), {**base, "zero_stage": 1}),
                                "--metrics-out", probe_metrics], capture_output=True, text=True)
        if probe.returncode != 0:
            return not_available(f"`llava train` with zero_stage 1: {probe.stderr.strip()[-300:]}", args.json)
        if "zero" not in json.load(open(probe_metrics)):
            return not_available("--metrics-out has no `zero` section", args.json)
        rows, result = [], {"available": True, "build": args.build, "model_parameters": counts, "runs": []}
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
                    psi = z["trainable_numel"]
                    want = PARTITIONED_BYTES_PER_PARAM[bf16] * psi / n
                    for rank, got in enumerate(z["optimizer_state_bytes"]):
                        result["runs"].append({"stage": stage, "bf16": bf16, "ranks": n, "rank": rank, "trainable": psi,
                                               "optimizer_state_bytes": got, "formula_bytes": want, "ratio": got / want,
                                               "padding_numel": z.get("padding_numel")})
                        rows.append((stage, bf16, n, rank, psi, f"{got / 2**20:.2f}", f"{want / 2**20:.2f}", f"{got / want:.4f}"))
        common.print_table(rows, ("stage", "bf16", "ranks", "rank", "Ψ", "optimizer MiB", "formula MiB", "ratio"))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
