"""Every check of issue #17 that needs an NVIDIA GPU, in one run (scripts/gpu-check.sh calls it there, and with
--device cpu here as its dry run). Prints one table and writes gpu-check.json.

  1. parity     a random tiny LLaVA: `llava eval-logits --device D` against transformers on the same device,
                fp32 and bf16 (bf16: ours within 2x transformers' own bf16-vs-fp32 distance, as the CPU test)
  2. training   stage 1, LoRA and full fine-tune steps on D in bf16: losses against the CPU fp32 run (bf16
                tolerance); a run stopped at step 3 and resumed on D ends bitwise equal to the whole run; the
                device's checkpoint-3 resumes on the CPU too (a checkpoint is independent of the device)
  3. nccl       the collectives test (tests/distributed/test_collectives.py, world 1: one GPU allows no more)
                on CUDA tensors: an NCCL process group through llava-run
  4. speed      bench_train.py at LLaVA-7B shapes with 8 decoder layers, bf16, LoRA r 128 / alpha 256 and the
                full fine-tune: tokens/s and MFU (6 x N x tokens/s over the bf16 peak) against HF transformers
                + PEFT on the same device in the same run, and both peak GPU memories

    python3 bench/gpu_check.py --build BUILD_DIR --device cuda --out gpu-check.json [--skip speed,...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

import tiny_llava as tl  # tests/oracle (common puts it on the path)

H200_BF16_PEAK_FLOPS = 989e12  # dense bf16, the vendor's datasheet for H100/H200 SXM (KINDS.md measured ~790e12)


def llava(build, *args, env=None, check=True):
    proc = subprocess.run([os.path.join(build, "src", "cli", "llava"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise RuntimeError(f"llava {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def check_parity(build, device, root):
    import torch
    from safetensors.torch import load_file, save_file

    config = tl.make_config()
    model_dir = os.path.join(root, "parity_model")
    tl.save(tl.build(config, seed=11), model_dir)
    batch = tl.make_batch(config, [1, 2], [9, 14], seed=5)
    batch_path = os.path.join(root, "parity_batch.safetensors")
    save_file({k: v.contiguous() for k, v in batch.items() if k != "labels"}, batch_path)
    result = {}
    hf = {}
    for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        model = tl.build(config, seed=11, dtype=dtype).to(device).eval()
        with torch.no_grad():
            hf[dtype_name] = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                   pixel_values=batch["pixel_values"].to(device, dtype)).logits.float().cpu()
        out = os.path.join(root, f"parity_{dtype_name}.safetensors")
        llava(build, "eval-logits", "--model", model_dir, "--batch", batch_path, "--out", out, "--dtype", dtype_name,
              "--device", device)
        ours = load_file(out)["logits"]
        result[dtype_name] = {"max_abs_vs_hf_same_dtype": (ours - hf[dtype_name]).abs().max().item(),
                              "max_abs_vs_hf_fp32": (ours - hf["fp32"]).abs().max().item()}
    hf_bf16_vs_fp32 = (hf["bf16"] - hf["fp32"]).abs().max().item()
    result["hf_bf16_vs_fp32"] = hf_bf16_vs_fp32
    result["ok"] = (result["fp32"]["max_abs_vs_hf_same_dtype"] <= 1e-4 and
                    result["bf16"]["max_abs_vs_hf_fp32"] <= 2 * hf_bf16_vs_fp32 + 1e-3)
    return result


STAGES = {"stage1": {"tune_mm_mlp_adapter": True, "learning_rate": 1e-3},
          "lora": {"lora_enable": True, "lora_r": 8, "lora_alpha": 16, "learning_rate": 2e-4, "mm_projector_lr": 2e-5},
          "full": {"learning_rate": 2e-5}}


def train(build, root, name, settings, *extra, output=None):
    out = {**settings, "output_dir": os.path.join(root, name)}
    cfg = common.write_config(os.path.join(root, f"{name}.yaml"), out)
    metrics = os.path.join(root, f"{name}.json")
    trained = os.path.join(root, f"{name}.safetensors")
    proc = llava(build, "train", cfg, "--metrics-out", metrics, "--save-trainables", trained, *extra)
    if output is not None:
        output.append(proc.stdout + proc.stderr)
    return json.load(open(metrics))["steps"], trained


SYNC_WARNING = "called a synchronizing CUDA operation"


def device_waits(build, root, stage, settings):
    """Host-device waits inside the forward and backward passes of 3 steps (2 micro-batches each): c10's sync
    debug mode warns at each (`--warn-device-syncs`); no saves, so no other thread copies meanwhile."""
    output = []
    train(build, root, f"{stage}_waits", {**settings, "max_steps": 3, "gradient_accumulation_steps": 2,
                                          "save_strategy": "no"}, "--warn-device-syncs", output=output)
    return output[0].count(SYNC_WARNING)


def losses(steps):
    return [s["loss"] for s in steps if "loss" in s]


def check_training(build, device, root):
    import torch
    from safetensors.torch import load_file

    base, _ = common.make_world(os.path.join(root, "world"), samples=12, batch=2, model_spec=common.SMALL_MODEL)
    base = {**base, "max_steps": 6, "logging_steps": 1}
    result = {}
    for stage, extra in STAGES.items():
        s = {**base, **extra}
        cpu, _ = train(build, root, f"{stage}_cpu", {**s, "device": "cpu"})
        dev_settings = {**s, "device": device, "bf16": True, "save_strategy": "steps", "save_steps": 3}
        whole, whole_w = train(build, root, f"{stage}_dev", dev_settings)
        worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses(whole), losses(cpu)))
        # Stopped after step 3 (as if killed), resumed on the device: bitwise equal to the whole run.
        resumed_settings = {**dev_settings, "resume_from_checkpoint": "auto"}
        train(build, root, f"{stage}_stop", resumed_settings, "--stop-after-steps", 3)
        _, resumed_w = train(build, root, f"{stage}_stop", resumed_settings)
        a, b = load_file(whole_w), load_file(resumed_w)
        bitwise = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        # The device's checkpoint-3 continued on the CPU: runs, and its losses stay within bf16 tolerance.
        cross, _ = train(build, root, f"{stage}_cross", {**dev_settings, "device": "cpu",
                                                          "resume_from_checkpoint": os.path.join(root, f"{stage}_dev", "checkpoint-3")})
        cross_worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses(cross), losses(whole)[3:]))
        waits = device_waits(build, root, stage, dev_settings)
        result[stage] = {"losses_device_bf16": losses(whole), "losses_cpu_fp32": losses(cpu),
                         "device_waits_in_forward_backward": waits,
                         "worst_relative_loss_diff": worst, "resume_bitwise": bitwise,
                         "device_checkpoint_on_cpu_worst_relative_loss_diff": cross_worst,
                         "ok": worst <= 2e-2 and bitwise and cross_worst <= 2e-2 and waits == 0}
    result["ok"] = all(r["ok"] for r in result.values())
    return result


def check_nccl(build, device):
    if not device.startswith("cuda"):
        return {"ok": None, "skipped": "needs CUDA (the same test runs over Gloo in CI)"}
    env = {**os.environ, "LLAVA_DIST_DEVICE": "cuda", "LLAVA_BUILD_DIR": build,
           "LLAVA_RUN": os.path.join(build, "src", "distributed", "llava-run"),
           "LLAVA_DIST_WORKER": os.path.join(build, "tests", "distributed", "dist_worker"),
           "PYTHONPATH": os.path.join(common.ROOT, "tests", "oracle")}
    test = os.path.join(common.ROOT, "tests", "distributed", "test_collectives.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", test, "-k",
                           "test_collectives_match_an_independent_computation and 1"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=os.path.join(common.ROOT, "tests", "distributed"))
    return {"ok": proc.returncode == 0, "output": proc.stdout[-1500:] + proc.stderr[-1500:]}


def check_speed(build, device, json_path, quick):
    model = "bench" if quick else "llava7b-8layers"
    args = [sys.executable, os.path.join(common.HERE, "bench_train.py"), build, "--model", model, "--stages", "lora,full",
            "--repeats", "1", "--steps", "4" if quick else "8", "--warmup", "2", "--batch", "2" if quick else "8",
            "--lora-r", "128", "--lora-alpha", "256", "--device", device, "--json", json_path]
    if device.startswith("cuda"):
        args.append("--bf16")
    subprocess.run(args, check=True, timeout=900)
    r = json.load(open(json_path))
    n = r["model_parameters"]["total"]
    out = {"model": model, "parameters": n, "tokens_per_step": r["tokens_per_step"], "peak_flops_assumed": H200_BF16_PEAK_FLOPS}
    for stage, x in r["stages"].items():
        ours, hf = x["ours_tokens_per_s"]["median"], x["hf_tokens_per_s"]["median"]
        run = x["runs"][0]
        out[stage] = {"ours_tokens_per_s": ours, "hf_tokens_per_s": hf, "speed_ratio": ours / hf,
                      "ours_mfu": 6 * n * ours / H200_BF16_PEAK_FLOPS, "hf_mfu": 6 * n * hf / H200_BF16_PEAK_FLOPS,
                      "ours_gpu_peak_mib": run["ours_gpu_peak_mib"], "hf_gpu_peak_mib": run["hf_gpu_peak_mib"]}
    out["ok"] = True
    return out


def table(results):
    rows = []
    p = results.get("parity", {})
    if "fp32" in p:
        rows.append(["1 parity fp32", f"max |ours-HF| {p['fp32']['max_abs_vs_hf_same_dtype']:.2e}", p["ok"]])
        rows.append(["1 parity bf16", f"vs HF fp32 {p['bf16']['max_abs_vs_hf_fp32']:.2e} (HF bf16 {p['hf_bf16_vs_fp32']:.2e})", p["ok"]])
    for stage in STAGES:
        t = results.get("training", {}).get(stage)
        if t:
            rows.append([f"2 train {stage}", f"loss vs CPU fp32 {t['worst_relative_loss_diff']:.1e} rel; resume bitwise "
                         f"{t['resume_bitwise']}; on CPU {t['device_checkpoint_on_cpu_worst_relative_loss_diff']:.1e}; "
                         f"host waits in fwd/bwd {t['device_waits_in_forward_backward']}", t["ok"]])
    n = results.get("nccl")
    if n:
        rows.append(["3 nccl world 1", n.get("skipped", "collectives on CUDA tensors"), n["ok"]])
    s = results.get("speed", {})
    for stage in ("lora", "full"):
        if stage in s:
            x = s[stage]
            rows.append([f"4 speed {stage}", f"tok/s ours {x['ours_tokens_per_s']:.0f} HF {x['hf_tokens_per_s']:.0f} "
                         f"({x['speed_ratio']:.2f}x); MFU {100 * x['ours_mfu']:.1f}% vs {100 * x['hf_mfu']:.1f}%; "
                         f"GPU MiB {x['ours_gpu_peak_mib']} vs {x['hf_gpu_peak_mib']}", s["ok"]])
    width = max(len(r[0]) for r in rows) if rows else 0
    for name, text, ok in rows:
        print(f"{name:<{width}}  {'ok ' if ok else ('-- ' if ok is None else 'BAD')}  {text}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--skip", default="", help="comma-separated: parity,training,nccl,speed")
    ap.add_argument("--quick", action="store_true", help="the dry run: the bench model instead of 7B shapes")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results = {"device": args.device, "build": args.build}
    try:
        import torch
        results["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            results["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 (reported, the checks below fail on their own)
        results["torch_error"] = str(e)
    with tempfile.TemporaryDirectory() as root:
        for name, fn in [("parity", lambda: check_parity(args.build, args.device, root)),
                         ("training", lambda: check_training(args.build, args.device, root)),
                         ("nccl", lambda: check_nccl(args.build, args.device)),
                         ("speed", lambda: check_speed(args.build, args.device, os.path.join(root, "speed.json"), args.quick))]:
            if name in skip:
                continue
            start = time.time()
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001 (one failed check must not hide the others)
                results[name] = {"ok": False, "error": str(e)[-3000:]}
            results[name]["seconds"] = round(time.time() - start, 1)
            print(f"== {name}: {'ok' if results[name]['ok'] else results[name]['ok']} in {results[name]['seconds']} s",
                  flush=True)
            json.dump(results, open(args.out, "w"), indent=1)
    table(results)
    failed = [k for k in ("parity", "training", "nccl", "speed") if k in results and results[k]["ok"] is False]
    print(f"gpu-check: {'all ok' if not failed else 'FAILED: ' + ', '.join(failed)}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
