"""Merges the benchmarks' JSON parts into one file and prints the table of ratios (median [min..max]).

    .venv/bin/python bench/report.py bench/results/parts bench/results/latest.json
"""
import datetime
import json
import os
import platform
import sys

import common


def load(parts, name):
    path = os.path.join(parts, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def machine():
    import torch
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg()}


def main():
    parts, out = sys.argv[1], sys.argv[2]
    merged = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    rows = []
    train = load(parts, "train")
    if train:
        merged["train"] = train
        for stage, r in train["stages"].items():
            rows.append((f"train {stage} tokens/s", "HF+PEFT loop", common.fmt_range(r["speed_ratio"]),
                         f"ours {r['ours_tokens_per_s']['median']:.0f}, HF {r['hf_tokens_per_s']['median']:.0f} tok/s"))
            rows.append((f"train {stage} samples/s", "HF+PEFT loop", common.fmt_range(r["speed_ratio"]),
                         f"ours {r['ours_samples_per_s']['median']:.2f}, HF {r['hf_samples_per_s']['median']:.2f} samples/s"))
            rows.append((f"train {stage} peak RSS", "HF+PEFT loop", common.fmt_range(r["rss_ratio"]),
                         f"ours {r['ours_peak_rss_mib']['median']:.0f}, HF {r['hf_peak_rss_mib']['median']:.0f} MiB"))
    ckpt = load(parts, "checkpoint")
    if ckpt:
        merged["checkpoint"] = ckpt
        size = f"{ckpt['checkpoint_bytes'] / 2**20:.0f} MiB"
        rows += [("checkpoint save", "dd write bandwidth", common.fmt_range(ckpt["save_fraction_of_dd_write"]),
                  f"{size}; HF {ckpt['hf_save_fraction_of_dd_write']['median']:.2f}"),
                 ("checkpoint load (evicted)", "dd read bandwidth", common.fmt_range(ckpt["load_fraction_of_dd_read"]),
                  f"HF {ckpt['hf_load_fraction_of_dd_read']['median']:.2f}"),
                 ("checkpoint save speed", "save_pretrained+torch.save", common.fmt_range(ckpt["save_speed_ratio"]), ""),
                 ("checkpoint load speed", "load_state_dict+torch.load", common.fmt_range(ckpt["load_speed_ratio"]), "")]
    loader = load(parts, "loader")
    if loader:
        merged["loader"] = loader
        for workers, w in loader["workers"].items():
            for stage, x in w.get("over_train_step", {}).items():
                rows.append((f"loader 336px, {workers} workers", f"train {stage} samples/s", f"{x:.1f}x",
                             f"{w['samples_per_s']['median']:.1f} samples/s"))
            if not w.get("over_train_step"):
                rows.append((f"loader 336px, {workers} workers", "-", "-", f"{w['samples_per_s']['median']:.1f} samples/s"))
    zero = load(parts, "zero")
    if zero:
        merged["zero"] = zero
        if not zero["available"]:
            rows.append(("ZeRO memory (Gloo)", "ZeRO formulas", "not available", zero["why"][:60]))
        for r in zero.get("runs", []):
            rows.append((f"ZeRO-{r['stage']} {'bf16' if r['bf16'] else 'fp32'} {r['ranks']} ranks, rank {r['rank']} "
                         "params+grads+optimizer", r["formula"], f"{r['ratio']:.4f}",
                         f"{r['total_bytes'] / 2**20:.2f} MiB (Gloo)"))
    common.print_table(rows, ("figure", "against", "ratio median [min..max]", "absolute"))
    print("ratios: speed = ours/HF throughput (>1: we are faster); RSS = ours/HF (<1: we use less); "
          "checkpoint = fraction of the disk's dd bandwidth")
    json.dump(merged, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
