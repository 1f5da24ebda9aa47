"""Where a train step's CPU time goes, ours against the HF loop: both run under `perf record` with
CLOCK_MONOTONIC sample stamps, and only the samples between the end of step `--warmup` and the last step
count (load and warm-up excluded). Symbols are grouped (GEMM, attention, optimizer and other element-wise
kernels, OpenMP spin/wait, kernel page faults, malloc, Python, ...) and shown as CPU ms per step.
Needs `perf`. Not a test.

    .venv/bin/python bench/profile_train.py BUILD_DIR [--stage full] [--threads 1] [--steps 5] [--top 25]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import bench_train
import common

# (category, pattern on "dso symbol"); first match wins.
CATEGORIES = [
    ("gemm (MKL sgemm)", r"mkl_blas|sgemm|gemm|mkl_"),
    ("attention (SDPA flash)", r"flash_attention"),
    ("softmax / cross-entropy", r"softmax|nll_loss|log_softmax"),
    ("optimizer: lerp/addcmul/addcdiv/sqrt/div", r"lerp|addcmul|addcdiv|sqrt|div_true"),
    ("norm reductions", r"norm_kernel|reduce|sum_kernel|mean_kernel"),
    ("elementwise mul/add/fill/copy", r"mul_kernel|add_kernel|fill_kernel|copy_kernel|direct_copy|where_kernel|masked"),
    ("other vectorized kernels", r"VectorizedLoop|vectorized_loop|basic_loop|cpu_kernel|Sleef"),
    ("OpenMP runtime (spin/barrier)", r"^libgomp|^libiomp|^libomp"),
    ("kernel (page faults, zeroing, scheduling)", r"^\[kernel"),
    ("malloc/free", r"^libc\.so.*(malloc|free|memset|memcpy|memmove)"),
    ("python interpreter", r"^libpython|^python"),
    ("autograd / dispatcher / other libtorch", r"^libtorch|^libc10"),
]


def profile(cmd, marker, warmup, env, out):
    """Runs cmd under perf; returns {(dso, symbol): samples} for steps warmup+1.., and the number of those steps."""
    data = os.path.join(out, "perf.data")
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    p = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", "997", "-o", data, "--", *map(str, cmd)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    stamps = []
    for raw in iter(p.stdout.readline, b""):
        if raw.decode(errors="replace").startswith(marker):
            stamps.append(time.clock_gettime(time.CLOCK_MONOTONIC))
    assert p.wait() == 0 and len(stamps) > warmup + 1, (cmd, len(stamps))
    window = f"{stamps[warmup - 1]:.6f},{stamps[-1]:.6f}"
    r = subprocess.run(["perf", "report", "-i", data, "--time", window, "--no-children", "--sort", "dso,sym",
                        "--stdio", "-F", "sample,dso,sym", "--percent-limit", "0"], capture_output=True, text=True)
    counts = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if m:
            counts[(m.group(2), m.group(3).strip())] = counts.get((m.group(2), m.group(3).strip()), 0) + int(m.group(1))
    return counts, len(stamps) - warmup, t0


def categorize(counts):
    out = {c: 0 for c, _ in CATEGORIES}
    out["other"] = 0
    for (dso, sym), n in counts.items():
        key = f"{dso} {sym}"
        cat = next((c for c, pat in CATEGORIES if re.search(pat, key)), "other")
        out[cat] += n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--stage", default="full", choices=list(bench_train.STAGES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json")
    args = ap.parse_args()
    hz = 997
    env = common.thread_env(args.threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=16, batch=2)
        settings = {**base, **bench_train.STAGES[args.stage], "max_steps": args.steps}
        cfg = common.write_config(os.path.join(root, "train.yaml"), settings)
        batches = os.path.join(root, "batches.safetensors")
        llava = os.path.join(args.build_dir, "src", "cli", "llava")
        subprocess.run([llava, "preprocess", cfg, "--out", batches, "--limit", "1000"], check=True, capture_output=True)
        json.dump(settings, open(os.path.join(root, "s.json"), "w"))
        ours, ours_steps, _ = profile([llava, "train", cfg], "{'loss'", args.warmup, env, root)
        hf, hf_steps, _ = profile([sys.executable, bench_train.__file__, "hf", "--settings", os.path.join(root, "s.json"),
                                   "--batches", batches, "--steps", args.steps, "--threads", args.threads],
                                  "step ", args.warmup, env, root)
    ms = lambda n, steps: 1000.0 * n / hz / steps  # samples -> CPU ms per step
    co, ch = categorize(ours), categorize(hf)
    rows = [(c, f"{ms(co[c], ours_steps):.0f}", f"{ms(ch[c], hf_steps):.0f}") for c in co if co[c] or ch[c]]
    rows.append(("total", f"{ms(sum(co.values()), ours_steps):.0f}", f"{ms(sum(ch.values()), hf_steps):.0f}"))
    print(f"{args.stage}, {args.threads} thread(s): CPU ms per step after {args.warmup} warm-up steps")
    common.print_table(rows, ("category", "ours", "HF"))
    print(f"\nours, top {args.top} symbols (CPU ms per step):")
    for (dso, sym), n in sorted(ours.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms(n, ours_steps):7.1f}  {dso}  {sym[:150]}")
    print(f"\nHF, top {args.top} symbols (CPU ms per step):")
    for (dso, sym), n in sorted(hf.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms(n, hf_steps):7.1f}  {dso}  {sym[:150]}")
    if args.json:
        json.dump({"stage": args.stage, "threads": args.threads,
                   "ours_ms_per_step": {c: ms(v, ours_steps) for c, v in co.items()},
                   "hf_ms_per_step": {c: ms(v, hf_steps) for c, v in ch.items()}}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
