"""Loader throughput at 336 px (CLIP-336 preprocessing, image_aspect_ratio: pad, vicuna_v1 template):
samples/s with 0, 1 and 2 worker threads, against what a train step consumes (samples/s of `llava train`
from bench_train.py's JSON, when given). Not a test; numbers depend on the machine.

    .venv/bin/python bench/bench_loader.py BUILD_DIR [--images 96] [--batch 8] [--repeats 3]
        [--train-json bench_train.json] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "oracle"))
import data_fixtures as fx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def samples_per_s(tool, cfg, workers, batches):
    """The tool prints `workers=W samples=N seconds=S samples/s=R`."""
    r = subprocess.run([tool, "bench", cfg, str(workers), str(batches)], capture_output=True, text=True, check=True)
    fields = dict(kv.split("=") for kv in r.stdout.split())
    return float(fields["samples/s"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-json", help="bench_train.py's JSON: compare with its samples/s")
    ap.add_argument("--json")
    args = ap.parse_args()
    tool = os.path.join(args.build_dir, "tests", "data", "llava_data_tool")
    with tempfile.TemporaryDirectory() as root:
        fx.make_hf_tokenizer_dir(os.path.join(root, "tok"), fx.train_spm(os.path.join(root, "spm")))
        rng = np.random.default_rng(0)
        os.makedirs(os.path.join(root, "images"))
        records = []
        for i in range(args.images):  # COCO-like 640x480 JPEGs
            w, h = (640, 480) if i % 2 else (480, 640)
            img = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).resize((w, h), Image.BILINEAR).save(os.path.join(root, "images", f"{i}.jpg"), quality=90)
            records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": " ".join(fx.CORPUS[i % len(fx.CORPUS):][:3])}]})
        json.dump(records, open(os.path.join(root, "data.json"), "w"))
        cfg = os.path.join(root, "cfg.yaml")
        json.dump({"data_path": "data.json", "image_folder": "images", "model_name_or_path": "tok",
                   "version": "v1", "image_aspect_ratio": "pad", "per_device_train_batch_size": args.batch}, open(cfg, "w"))
        batches = args.images // args.batch
        result = {"image_size": 336, "batch": args.batch, "workers": {}}
        for workers in (0, 1, 2):
            s = common.summary([samples_per_s(tool, cfg, workers, batches) for _ in range(args.repeats)])
            result["workers"][str(workers)] = {"samples_per_s": s}
            print(f"workers={workers}: {common.fmt_range(s, 1)} samples/s", flush=True)
    if args.train_json:  # headroom: loader samples/s over what the trainer consumes, per stage
        train = json.load(open(args.train_json))
        for workers, w in result["workers"].items():
            w["over_train_step"] = {stage: w["samples_per_s"]["median"] / r["ours_samples_per_s"]["median"]
                                    for stage, r in train["stages"].items()}
            print(f"workers={workers}: loader / train-step samples/s " +
                  ", ".join(f"{k} {v:.1f}x" for k, v in w["over_train_step"].items()))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
