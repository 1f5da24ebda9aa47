"""Host memory while `llava` loads a bf16 model: the peak RSS of `llava eval-logits --dtype bf16` (load + one
1-token forward) on a sharded bf16 safetensors checkpoint, less the same command's peak on a tiny model (the
process's own baseline: libtorch, allocator, the forward; VmHWM polled, see peak_rss), against the weights' bytes and the largest shard.
Issue #17's bound: about the weights once plus one shard, never two copies of the model. Not a test.

Model: the bench model (common.BENCH_MODEL, 136M parameters, 272 MB in bf16), shards of ~1/5 of it; and the
same weights in fp32 files loaded as bf16 (a dtype conversion on the way). The parameters are made in bf16
and each weight is read from its file into them (pread when the dtypes match; a copy from the memory-mapped
file tensor otherwise).

    .venv/bin/python bench/bench_load_memory.py BUILD_DIR [--json OUT]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file

import common


def write_model(root, name, spec, dtype, shards):
    import tiny_llava
    out = os.path.join(root, name)
    model = tiny_llava.build(tiny_llava.make_config(**spec), dtype=dtype)
    tiny_llava.save(model, out, shards=shards)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    files = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
    return out, weights, max(os.path.getsize(f) for f in files), len(files)


def peak_rss(llava, model_dir, batch, root):
    """The process's VmHWM (peak RSS since its exec), polled every 2 ms until it exits. Not ru_maxrss: the
    kernel folds the forking Python process's own peak into the child's (exec keeps the old mm's high-water
    mark), which here is hundreds of MB of torch + the model the bench just built."""
    p = subprocess.Popen([llava, "eval-logits", "--model", model_dir, "--batch", batch, "--out",
                          os.path.join(root, "logits.safetensors"), "--dtype", "bf16"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.002)
    if p.wait() != 0:
        raise RuntimeError(p.stderr.read().decode())
    return peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    llava = os.path.join(args.build_dir, "src", "cli", "llava")
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        batch = os.path.join(root, "batch.safetensors")
        save_file({"input_ids": torch.tensor([[1]], dtype=torch.int64)}, batch)
        tiny, _, _, _ = write_model(root, "tiny", dict(common.SMALL_MODEL, layers=1, vocab=256), torch.bfloat16, 1)
        baseline = min(peak_rss(llava, tiny, batch, root) for _ in range(2))
        for name, dtype in (("bf16 files", torch.bfloat16), ("fp32 files", torch.float32)):
            model_dir, weights, shard, n = write_model(root, name.replace(" ", "_"), common.BENCH_MODEL, dtype, 5)
            bf16_weights = weights // (2 if dtype == torch.float32 else 1)
            peak = min(peak_rss(llava, model_dir, batch, root) for _ in range(2))
            extra = peak - baseline
            r = {"files": name, "shards": n, "largest_shard_bytes": shard, "bf16_weights_bytes": bf16_weights,
                 "baseline_peak_rss_bytes": baseline, "peak_rss_bytes": peak, "extra_bytes": extra,
                 "extra_over_weights_plus_shard": extra / (bf16_weights + shard)}
            results.append(r)
            print(f"{name} ({n} shards, largest {shard / 2**20:.0f} MiB): peak RSS {peak / 2**20:.0f} MiB, "
                  f"{extra / 2**20:.0f} MiB above the tiny model's {baseline / 2**20:.0f} MiB; bf16 weights "
                  f"{bf16_weights / 2**20:.0f} MiB; extra / (weights + one shard) = {r['extra_over_weights_plus_shard']:.2f}",
                  flush=True)
    if args.json:
        json.dump({"runs": results}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
