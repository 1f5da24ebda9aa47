"""Train step on CPU, fp32, one process: `llava train` against the HF loop it reproduces (transformers'
LlavaForConditionalGeneration + PEFT, torch.optim.AdamW, get_scheduler, clip_grad_norm_: what Trainer runs),
on the same model, batches, batch size, sequence length and thread count, for stage 1 (projector), stage 2
LoRA and the full fine-tune. Not a test; numbers depend on the machine.

Both sides print one line per optimizer step, stamped here as it arrives; a run's step time is the mean
interval over the steps after `--warmup` (load, first-touch allocation and warm-up excluded). The HF loop is
handed the batches `llava preprocess` wrote (no data loading in its timed steps); ours loads its own with
dataloader_num_workers 0, so its step time includes that. Peak RSS is each process's own VmHWM (common.PeakRss).
Ours and HF alternate, and each ratio is ours/HF of one back-to-back pair.

    .venv/bin/python bench/bench_train.py BUILD_DIR [--repeats 3] [--steps 7] [--warmup 2] [--model bench|llava7b-widths]
        [--stages stage1,lora,full] [--json OUT] [--device cuda --bf16 --lora-r 128 --lora-alpha 256]

On a GPU (--device cuda, bench/gpu_check.py): ours gets `device: cuda` (and `bf16: true`); the HF side loads the
model in bf16 as LLaVA's scripts do with --bf16, keeps PEFT's adapters in fp32 (its default) and runs under
torch.autocast(bf16), as Trainer does with bf16=True. Peak GPU memory per side comes from nvidia-smi.
"""
import argparse
import json
import os
import sys
import tempfile

import common

STAGES = {
    "stage1": {"tune_mm_mlp_adapter": True, "learning_rate": 1e-3},
    "lora": {"lora_enable": True, "lora_r": 64, "lora_alpha": 128, "learning_rate": 2e-4, "mm_projector_lr": 2e-5},
    "full": {"learning_rate": 2e-5},
}
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def hf_loop(args):
    """The HF side (run as its own process so its RSS is its own): Trainer's inner loop written out, as in
    tests/train/test_train_oracle.py; prints `step N` after each optimizer step."""
    import math
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration, Trainer, get_scheduler

    torch.set_num_threads(args.threads)
    s = json.load(open(args.settings))
    device = torch.device(s.get("device", "cpu"))
    bf16 = bool(s.get("bf16"))
    t = load_file(args.batches)
    batches = [{k: t[f"batch{i}.{k}"].to(device) for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
               for i in range(len({k.split(".")[0] for k in t}))]
    model = LlavaForConditionalGeneration.from_pretrained(
        s["model_name_or_path"], dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
    if s.get("lora_enable"):
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    for n, p in model.named_parameters():
        if s.get("lora_enable"):
            p.requires_grad_(p.requires_grad or "multi_modal_projector" in n)
        elif s.get("tune_mm_mlp_adapter"):
            p.requires_grad_("multi_modal_projector" in n)
        else:  # full fine-tune: the LLM, lm_head and projector; the tower stays frozen
            p.requires_grad_("vision_tower" not in n)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": s["weight_decay"]},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=s["learning_rate"])
    sched = get_scheduler(s["lr_scheduler_type"], opt, num_warmup_steps=math.ceil(args.steps * s["warmup_ratio"]),
                          num_training_steps=args.steps)
    params = [p for _, p in named]
    model.train()
    print(f"trainable {sum(p.numel() for p in params)}", flush=True)
    for step in range(args.steps):
        b = batches[step % len(batches)]
        items = int((b["labels"][:, 1:] != -100).sum())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=b["pixel_values"].to(torch.bfloat16 if bf16 else torch.float32),
                        labels=b["labels"], num_items_in_batch=torch.tensor(items, device=device))
        out.loss.backward()
        loss = out.loss.item()
        torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        print(f"step {step + 1} loss {loss:.6f}", flush=True)


def step_times(lines, marker):
    """Stamps of the per-step lines, in order."""
    return [t for t, text in lines if text.startswith(marker)]


def steady_step_seconds(stamps, warmup):
    return (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)


def run_pair(build_dir, root, stage, settings, batches, args):
    cfg = common.write_config(os.path.join(root, f"{stage}.yaml"), settings)
    env = common.thread_env(args.threads)
    llava = os.path.join(build_dir, "src", "cli", "llava")
    gpu = settings.get("device", "cpu").startswith("cuda")
    lines, ours_rss, _, _ = common.run_timed([llava, "train", cfg], env=env, gpu=gpu)
    ours_gpu = common.run_timed.last_gpu_mib
    ours = step_times(lines, "{'loss': ")
    losses_ours = [float(text.split(",")[0].split(":")[1]) for _, text in lines if text.startswith("{'loss': ")]
    trainable = next(int(text.split("trainable parameters: ")[1].split()[0]) for _, text in lines if "trainable parameters" in text)
    settings_path = os.path.join(root, f"{stage}.json")
    json.dump(settings, open(settings_path, "w"))
    lines, hf_rss, _, _ = common.run_timed([sys.executable, os.path.abspath(__file__), "hf", "--settings", settings_path,
                                            "--batches", batches, "--steps", args.steps, "--threads", args.threads], env=env,
                                           gpu=gpu)
    hf_gpu = common.run_timed.last_gpu_mib
    hf = step_times(lines, "step ")
    losses_hf = [float(text.split()[3]) for _, text in lines if text.startswith("step ")]
    hf_trainable = next(int(text.split()[1]) for _, text in lines if text.startswith("trainable"))
    assert len(ours) == len(hf) == args.steps, (len(ours), len(hf))
    assert trainable == hf_trainable, f"{stage}: ours trains {trainable} parameters, HF {hf_trainable}"
    loss_tolerance = 2e-2 if settings.get("bf16") else 1e-3  # bf16: different rounding points, same model
    assert abs(losses_ours[0] - losses_hf[0]) <= loss_tolerance * abs(losses_hf[0]), (losses_ours[0], losses_hf[0])
    return {"ours_step_s": steady_step_seconds(ours, args.warmup), "hf_step_s": steady_step_seconds(hf, args.warmup),
            "ours_rss_mib": ours_rss, "hf_rss_mib": hf_rss, "trainable": trainable,
            "ours_gpu_peak_mib": ours_gpu, "hf_gpu_peak_mib": hf_gpu, "loss_first_ours": losses_ours[0],
            "loss_first_hf": losses_hf[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--stages", default="stage1,lora,full")
    ap.add_argument("--model", default="bench", choices=sorted(common.MODELS),
                    help="bench: 136M parameters; llava7b-widths: LLaVA-7B layer widths, 2 decoder layers (~1B)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--bf16", action="store_true", help="bf16 training (ours: bf16: true; HF: bf16 weights + autocast)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    STAGES["lora"].update(lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=args.samples, batch=args.batch, model_spec=common.MODELS[args.model])
        base["max_steps"] = args.steps
        if args.device != "cpu":
            base["device"] = args.device
        if args.bf16:
            base["bf16"] = True
        batches = os.path.join(root, "batches.safetensors")
        common.run_timed([os.path.join(args.build_dir, "src", "cli", "llava"), "preprocess",
                          common.write_config(os.path.join(root, "data.yaml"), base), "--out", batches, "--limit", 1000])
        t = load_file(batches)
        seq = [tuple(t[k].shape) for k in sorted(t) if k.endswith(".input_ids")]
        tokens_per_step = sum(b * n for b, n in seq[:args.steps]) / args.steps  # positions processed, pads included
        print(f"model: {counts}; batch {args.batch}, sequence lengths {sorted({n for _, n in seq})}, "
              f"{args.threads} threads")
        results = {"model_parameters": counts, "batch": args.batch, "threads": args.threads, "device": args.device,
                   "bf16": args.bf16, "tokens_per_step": tokens_per_step, "stages": {}}
        for stage in args.stages.split(","):
            runs = [run_pair(args.build_dir, root, stage, {**base, **STAGES[stage]}, batches, args)
                    for _ in range(args.repeats)]
            r = {"trainable_parameters": runs[0]["trainable"], "runs": runs,
                 "speed_ratio": common.summary([x["hf_step_s"] / x["ours_step_s"] for x in runs]),
                 "rss_ratio": common.summary([x["ours_rss_mib"] / x["hf_rss_mib"] for x in runs]),
                 "ours_tokens_per_s": common.summary([tokens_per_step / x["ours_step_s"] for x in runs]),
                 "hf_tokens_per_s": common.summary([tokens_per_step / x["hf_step_s"] for x in runs]),
                 "ours_samples_per_s": common.summary([args.batch / x["ours_step_s"] for x in runs]),
                 "hf_samples_per_s": common.summary([args.batch / x["hf_step_s"] for x in runs]),
                 "ours_peak_rss_mib": common.summary([x["ours_rss_mib"] for x in runs]),
                 "hf_peak_rss_mib": common.summary([x["hf_rss_mib"] for x in runs])}
            results["stages"][stage] = r
            print(f"{stage}: trainable {r['trainable_parameters']}; tokens/s ours {common.fmt_range(r['ours_tokens_per_s'], 0)}"
                  f" HF {common.fmt_range(r['hf_tokens_per_s'], 0)}; speed ours/HF {common.fmt_range(r['speed_ratio'])};"
                  f" peak RSS ours {common.fmt_range(r['ours_peak_rss_mib'], 0)} MiB HF "
                  f"{common.fmt_range(r['hf_peak_rss_mib'], 0)} MiB, ratio {common.fmt_range(r['rss_ratio'])}", flush=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hf":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--settings")
        ap.add_argument("--batches")
        ap.add_argument("--steps", type=int)
        ap.add_argument("--threads", type=int)
        hf_loop(ap.parse_args())
    else:
        main()
