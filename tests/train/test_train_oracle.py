"""`llava train` against a plain PyTorch (+ PEFT) training loop written the way transformers' Trainer and
LLaVATrainer train: same initial weights, the batches our `llava preprocess` writes for the same config,
HF's decay/no-decay groups (+ LLaVA's projector-lr groups), torch.optim.AdamW, get_scheduler,
clip_grad_norm_, and the loss of an accumulation window = sum of token losses / tokens in the window
(Trainer's num_items_in_batch). Dropout 0, fp32. The first 10 optimizer steps' loss, grad_norm and
learning rate agree within 1e-5 relative, and so do the trained weights."""
import ast
import copy
import json
import math
import os
import re

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, get_scheduler

import tiny_llava
from data_fixtures import write_png
from llava_oracle import assert_clear_error, binary, run

STEPS = 10
BATCH = 2
SAMPLES = 8  # 4 micro-batches per epoch: accumulation 3 leaves a partial last window, as HF does
ANSWERS = ["A cat sitting on a red sofa.", "The bus is yellow.", "There are 12 apples.", "A street with cars.",
           "The quick brown fox.", "A dog near the river bank.", "Two oranges on the table.", "People walking."]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir, _, model, _ = tiny_llava.make_chat_model_dir(root)

    images = root / "images"
    images.mkdir()
    records = []
    for i, answer in enumerate(ANSWERS):
        rec = {"id": str(i), "conversations": [{"from": "human", "value": "What is shown in the image?"},
                                               {"from": "gpt", "value": answer}]}
        if i % 4 != 3:  # a text-only sample in every four
            write_png(str(images / f"{i}.png"), 16 + 3 * i, 16 + 2 * (i % 3), seed=i)
            rec["image"] = f"{i}.png"
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        records.append(rec)
    data = root / "data.json"
    data.write_text(json.dumps(records))
    base = {"model_name_or_path": str(model_dir), "data_path": str(data), "image_folder": str(images),
            "version": "v1", "model_max_length": 128, "per_device_train_batch_size": BATCH,
            "output_dir": str(root / "out"), "seed": 7, "logging_steps": 1, "max_steps": STEPS,
            "weight_decay": 0.1, "lora_dropout": 0.0}
    return {"root": root, "model": model, "base": base}


def write_config(world, name, settings):
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**world["base"], **settings}))
    return path


def our_batches(world, config_path, epochs):
    """Every micro-batch of `epochs` epochs, as `llava preprocess` writes them (what `llava train` sees)."""
    out = []
    for epoch in range(epochs):
        f = world["root"] / f"batches{epoch}.safetensors"
        run([binary(), "preprocess", config_path, "--out", f, "--limit", 1000, "--epoch", epoch])
        t = load_file(str(f))
        n = len({k.split(".")[0] for k in t})
        out.append([{k: t[f"batch{i}.{k}"] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
                    for i in range(n)])
    return out


def hf_param_groups(model, named_trainables, lr, wd, projector_lr):
    """HF Trainer's decay / no-decay split (its own get_decay_parameter_names), and LLaVATrainer's
    projector groups with mm_projector_lr."""
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = {key: None for key in [(False, True), (False, False), (True, True), (True, False)]}  # LLaVA's order
    for name, p in named_trainables:
        projector = projector_lr > 0 and "multi_modal_projector" in name
        key = (projector, name in decay)
        if groups[key] is None:
            groups[key] = {"params": [], "weight_decay": wd if name in decay else 0.0,
                           "lr": projector_lr if projector else lr}
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g is not None]


def reference_loop(model, named_trainables, epochs_of_batches, s):
    """Trainer's inner loop, written out: windows of `accum` micro-batches (fewer at an epoch's end)."""
    accum = s.get("gradient_accumulation_steps", 1)
    opt = torch.optim.AdamW(hf_param_groups(model, named_trainables, s["learning_rate"], s["weight_decay"],
                                            s.get("mm_projector_lr", 0.0)), lr=s["learning_rate"])
    warmup = s.get("warmup_steps", 0) or math.ceil(STEPS * s.get("warmup_ratio", 0.0))
    sched = get_scheduler(s["lr_scheduler_type"], opt, num_warmup_steps=warmup, num_training_steps=STEPS)
    params = [p for _, p in named_trainables]
    model.train()
    history = []
    for epoch, epoch_batches in enumerate(epochs_of_batches):
        windows = [epoch_batches[i:i + accum] for i in range(0, len(epoch_batches), accum)]
        for w, window in enumerate(windows):
            if len(history) == STEPS:
                return history
            items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            loss_sum = 0.0
            for b in window:
                pixels = b["pixel_values"] if b["pixel_values"].shape[0] > 0 else None
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pixels,
                            labels=b["labels"], num_items_in_batch=torch.tensor(items))
                if out.loss.requires_grad:  # a text-only micro-batch gives the projector nothing
                    out.loss.backward()
                loss_sum += out.loss.item()
            norm = torch.nn.utils.clip_grad_norm_(params, s.get("max_grad_norm", 1.0)).item()
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad()
            seen = sum(len(x) for x in windows[:w + 1])
            history.append({"loss": loss_sum, "grad_norm": norm, "learning_rate": lr,
                            "epoch": epoch + seen / len(epoch_batches)})
    return history


def ours(world, name, settings, extra=(), via_set=()):
    """Runs `llava train`; keys in `via_set` go through --set instead of the YAML file."""
    cfg = write_config(world, name, {k: v for k, v in settings.items() if k not in via_set})
    extra = [*extra, *[a for k in via_set for a in ("--set", f"{k}={settings[k]}")]]
    metrics, weights = world["root"] / f"{name}.json", world["root"] / f"{name}.safetensors"
    proc = run([binary(), "train", cfg, "--metrics-out", metrics, "--save-trainables", weights, *extra])
    return cfg, proc.stdout, json.loads(metrics.read_text()), load_file(str(weights))


def compare(name, stdout, got, want, got_weights, want_weights):
    steps = got["steps"]
    assert len(steps) == STEPS and len(want) == STEPS
    worst = {"loss": 0.0, "grad_norm": 0.0, "learning_rate": 0.0, "epoch": 0.0}
    for g, w in zip(steps, want):
        for k in worst:
            rel = abs(g[k] - w[k]) / max(abs(w[k]), 1e-30)
            worst[k] = max(worst[k], rel)
            assert rel <= 1e-5, f"{name} step {g['step']} {k}: ours {g[k]!r}, reference {w[k]!r}"
    assert sorted(got_weights) == sorted(want_weights), (sorted(got_weights), sorted(want_weights))
    w_err = 0.0
    for n, ref in want_weights.items():
        diff = (got_weights[n] - ref).abs().max().item()
        w_err = max(w_err, diff / max(ref.abs().max().item(), 1e-30))
        assert torch.allclose(got_weights[n], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (n, diff)
    lines = [l for l in stdout.splitlines() if l.startswith("{'loss': ")]
    assert len(lines) == STEPS  # logging_steps 1: each line is that step's figures, printed like Python's dict repr
    for line, g in zip(lines, steps):
        assert ast.literal_eval(line) == {k: g[k] for k in ("loss", "grad_norm", "learning_rate", "epoch")}, line
    print(f"\n{name}: {len(want_weights)} trainable tensors; worst relative difference over {STEPS} steps: "
          f"loss {worst['loss']:.2e}, grad_norm {worst['grad_norm']:.2e}, lr {worst['learning_rate']:.2e}; "
          f"trained weights {w_err:.2e}")
    print(f"  losses {[round(w['loss'], 5) for w in want]}")
    print(f"  grad norms {[round(w['grad_norm'], 5) for w in want]}")
    print(f"  last log line: {lines[-1]}")


def canonical(peft_or_hf_name):
    n = peft_or_hf_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default.", ".")
    return tiny_llava.canonical_name(n)


def test_stage1_projector_only(world):
    s = {"tune_mm_mlp_adapter": True, "learning_rate": 1e-2, "lr_scheduler_type": "cosine", "warmup_ratio": 0.2,
         "max_grad_norm": 1.0, "weight_decay": 0.1}
    cfg, stdout, got, got_w = ours(world, "stage1", s)
    model = copy.deepcopy(world["model"])
    for n, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in n)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = reference_loop(model, named, our_batches(world, cfg, 3), s)
    compare("stage 1", stdout, got, want, got_w, {canonical(n): p.detach() for n, p in named})
    assert got["trainable"] == [canonical(n) for n, _ in named]


def test_stage2_lora_with_accumulation_and_clipping(world):
    s = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 2e-2, "mm_projector_lr": 5e-3,
         "lr_scheduler_type": "linear", "warmup_steps": 2, "gradient_accumulation_steps": 3,
         "max_grad_norm": 0.05, "weight_decay": 0.1}
    model = copy.deepcopy(world["model"])
    for p in model.parameters():
        p.requires_grad_(False)
    targets = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # B non-zero so every adapter weight gets a gradient from the first step
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter_dir = world["root"] / "peft_init"
    peft.save_pretrained(str(adapter_dir))
    for n, p in peft.named_parameters():
        if "multi_modal_projector" in n:
            p.requires_grad_(True)
    named = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]

    cfg, stdout, got, got_w = ours(world, "lora", s, ["--init-lora-from", adapter_dir])
    want = reference_loop(peft, named, our_batches(world, cfg, 5), s)
    assert all(w["grad_norm"] > s["max_grad_norm"] for w in want), "clipping must be active"
    compare("stage 2 LoRA (accumulation 3, clipping)", stdout, got, want, got_w,
            {canonical(n): p.detach() for n, p in named})
    assert got["trainable"] == [canonical(n) for n, _ in named]  # PEFT's named_parameters() order
    assert sum(".lora_A." in n for n in got["trainable"]) == 2 * 7  # 2 layers x 7 projections


def test_full_finetune(world):
    s = {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1, "gradient_accumulation_steps": 2,
         "max_grad_norm": 1.0, "weight_decay": 0.1}
    cfg, stdout, got, got_w = ours(world, "full", s, via_set=["gradient_accumulation_steps", "learning_rate"])
    model = copy.deepcopy(world["model"])
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.vision_tower."))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = reference_loop(model, named, our_batches(world, cfg, 5), s)
    compare("full fine-tune", stdout, got, want, got_w, {canonical(n): p.detach() for n, p in named})
    assert got["trainable"] == [canonical(n) for n, _ in named]


@pytest.mark.parametrize("settings, extra, needles", [
    ({"colour_jitter": 1}, [], ["unknown key 'colour_jitter'"]),
    ({"learning_rat": 1e-3}, [], ["learning_rat", "did you mean 'learning_rate'"]),
    ({"data_path": "/nonexistent/data.json"}, [], ["/nonexistent/data.json"]),
    ({"model_name_or_path": "/nonexistent/model"}, [], ["/nonexistent/model"]),
    ({"lora_enable": True}, ["--set", "lora_target_modules=[no_such_proj]"], ["lora_target_modules", "matched no Linear"]),
])
def test_bad_configs_exit_1_with_one_line(world, settings, extra, needles):
    cfg = write_config(world, "bad", settings)
    proc = run([binary(), "train", cfg, *extra], check=False)
    print(f"\n  {proc.stderr.strip()}")
    assert_clear_error(proc, *needles)


def test_original_llava_checkpoint_trains_like_the_hf_one(world):
    """The same weights saved in the original LLaVA layout (image slots are LLaVA's -200) train identically."""
    import shutil
    original = world["root"] / "original"
    tiny_llava.save(world["model"], str(original), layout="original")
    for f in world["root"].joinpath("model").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "preprocessor")):
            shutil.copy(f, original / f.name)
    s = {"tune_mm_mlp_adapter": True, "learning_rate": 1e-2, "max_grad_norm": 1.0, "max_steps": 4}
    _, _, got_hf, w_hf = ours(world, "stage1_hf_layout", s)
    _, _, got_orig, w_orig = ours(world, "stage1_original_layout", {**s, "model_name_or_path": str(original)})
    assert len(got_orig["steps"]) == 4
    for a, b in zip(got_orig["steps"], got_hf["steps"]):
        for k in ("loss", "grad_norm", "learning_rate"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(abs(b[k]), 1e-30), (k, a, b)
    for n in w_hf:
        assert torch.allclose(w_orig[n], w_hf[n], rtol=1e-6, atol=1e-7), n
    print(f"\noriginal-LLaVA layout: losses {[round(x['loss'], 6) for x in got_orig['steps']]} equal the HF layout's")


def test_pretrain_mm_mlp_adapter_starts_from_the_stage1_projector(world):
    """Stage 2 with LLaVA's pretrain_mm_mlp_adapter trains exactly like a base whose projector is that file's."""
    import shutil
    model = copy.deepcopy(world["model"])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    proj = model.model.multi_modal_projector
    torch.save({"model.mm_projector.0.weight": proj.linear_1.weight.detach().clone(),
                "model.mm_projector.0.bias": proj.linear_1.bias.detach().clone(),
                "model.mm_projector.2.weight": proj.linear_2.weight.detach().clone(),
                "model.mm_projector.2.bias": proj.linear_2.bias.detach().clone()}, world["root"] / "mm_projector.bin")
    with_projector = world["root"] / "with_projector"
    shutil.copytree(world["root"] / "model", with_projector)
    tiny_llava.save(model, str(with_projector))
    s = {"learning_rate": 1e-3, "max_steps": 3, "lora_enable": True, "lora_r": 4}
    _, _, from_file, _ = ours(world, "stage2_from_file", {**s, "pretrain_mm_mlp_adapter": str(world["root"] / "mm_projector.bin")})
    _, _, from_base, _ = ours(world, "stage2_from_base", {**s, "model_name_or_path": str(with_projector)})
    _, _, plain, _ = ours(world, "stage2_plain", s)
    for a, b in zip(from_file["steps"], from_base["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
    assert abs(plain["steps"][0]["loss"] - from_file["steps"][0]["loss"]) > 1e-3  # the file really changed the start
    print(f"\npretrain_mm_mlp_adapter: losses {[round(x['loss'], 6) for x in from_file['steps']]}")


def test_checkpoints_in_the_hf_trainer_layout(world):
    """Every save_steps and at the end: checkpoint-N with what PEFT / LLaVA / transformers write; the oldest
    beyond save_total_limit are removed; every file loads in the reference tools."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration, TrainerState
    out = world["root"] / "ckpt_lora"
    s = {"learning_rate": 1e-3, "max_steps": 5, "lora_enable": True, "lora_r": 4, "lora_alpha": 8,
         "save_steps": 2, "save_total_limit": 2, "output_dir": str(out), "mm_projector_lr": 1e-4}
    _, _, got, weights = ours(world, "lora_ckpt", s)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-5"]  # 2 rotated out, 5 = the end
    ckpt = out / "checkpoint-5"
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json",
            "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    steps_taken = [st["step"].item() for st in opt["state"].values()]
    assert max(steps_taken) == 5 and min(steps_taken) >= 1  # a window with no image gives the projector no grad
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(got["trainable"])
    # As torch's LambdaLR leaves it after 5 scheduler steps: the lr of the NEXT step (HF resumes with it).
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("linear", probe, num_warmup_steps=0, num_training_steps=5)
    for _ in range(5):
        probe.step()
        schedule.step()
    next_factor = schedule.get_last_lr()[0] / 1e-3
    assert sorted(g["lr"] / g["initial_lr"] for g in opt["param_groups"]) == pytest.approx([next_factor] * 3)
    assert sorted({g["initial_lr"] for g in opt["param_groups"]}) == [1e-4, 1e-3]
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 5 and sched["_step_count"] == 6
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert state.global_step == 5 and [e["step"] for e in state.log_history] == [1, 2, 3, 4, 5]
    assert abs(state.log_history[-1]["loss"] - got["steps"][-1]["loss"]) < 1e-12
    non_lora = torch.load(ckpt / "non_lora_trainables.bin", weights_only=True)
    assert sorted(non_lora) == sorted("base_model.model." + n for n in got["trainable"] if "multi_modal_projector" in n)

    # PEFT over the base, with the trained projector: the logits our eval-logits gives for the checkpoint.
    base = copy.deepcopy(world["model"])
    with torch.no_grad():
        for n, p in base.named_parameters():
            key = "model.multi_modal_projector." + n.split("multi_modal_projector.")[-1]
            if "multi_modal_projector" in n:
                p.copy_(weights[key])
    peft = PeftModel.from_pretrained(base, str(ckpt)).eval()
    batch = {k: v[:1] for k, v in our_batches(world, write_config(world, "lora_ckpt_data", s), 1)[0][0].items()}
    with torch.no_grad():
        want = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"][:1] if batch["pixel_values"].numel() else None).logits
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in batch.items() if k != "labels"}, str(world["root"] / "ckpt_batch.safetensors"))
    run([binary(), "eval-logits", "--model", world["base"]["model_name_or_path"], "--adapter", ckpt,
         "--projector", ckpt / "non_lora_trainables.bin", "--batch", world["root"] / "ckpt_batch.safetensors",
         "--out", world["root"] / "ckpt_logits.safetensors"])
    diff = (load_file(str(world["root"] / "ckpt_logits.safetensors"))["logits"] - want).abs().max().item()
    print(f"\ncheckpoint-5 (LoRA): PeftModel.from_pretrained + its projector vs our eval-logits: {diff:.3g}")
    assert diff <= 1e-4

    # Full fine-tune: model.safetensors that transformers loads.
    full_out = world["root"] / "ckpt_full"
    _, _, _, full_weights = ours(world, "full_ckpt", {"learning_rate": 1e-3, "max_steps": 2, "output_dir": str(full_out)})
    loaded = LlavaForConditionalGeneration.from_pretrained(str(full_out / "checkpoint-2"))
    sd = dict(loaded.named_parameters())
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(sd[name], full_weights[name], atol=0, rtol=0)


@pytest.mark.parametrize("stage", ["lora", "stage1", "full"])
def test_resume_continues_exactly_without_replaying_batches(world, stage):
    """Stopped after a save at step 3 (the middle of epoch 1) and resumed with resume_from_checkpoint: auto,
    the losses of steps 4..6 and the final trainable weights are bitwise those of an uninterrupted run, and
    so is trainer_state.json's log_history: logging_steps 2, so the checkpoint lies between two log lines
    and the line at step 4 averages steps 3 and 4, as the uninterrupted run's does."""
    s = {"learning_rate": 1e-2, "max_steps": 6, "save_steps": 3, "gradient_accumulation_steps": 2,
         "lr_scheduler_type": "cosine", "warmup_steps": 2, "max_grad_norm": 0.5, "logging_steps": 2}
    s.update({"lora": {"lora_enable": True, "lora_r": 4}, "stage1": {"tune_mm_mlp_adapter": True}, "full": {}}[stage])
    _, _, whole, whole_w = ours(world, f"{stage}_whole", {**s, "output_dir": str(world["root"] / f"{stage}_whole")})
    out = str(world["root"] / f"{stage}_resumed")
    _, _, first, _ = ours(world, f"{stage}_first", {**s, "output_dir": out}, extra=["--stop-after-steps", 3])
    assert len(first["steps"]) == 3
    _, stdout, second, second_w = ours(world, f"{stage}_second", {**s, "output_dir": out, "resume_from_checkpoint": "auto"})
    assert "resuming from" in stdout and "checkpoint-3" in stdout
    assert [m["step"] for m in second["steps"]] == [4, 5, 6]
    for a, b in zip(second["steps"], whole["steps"][3:]):
        assert (a["loss"], a["grad_norm"], a["learning_rate"], a["epoch"]) == (b["loss"], b["grad_norm"], b["learning_rate"], b["epoch"])
    for n in whole_w:
        assert torch.equal(second_w[n], whole_w[n]), n
    whole_log = json.loads((world["root"] / f"{stage}_whole" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    resumed_log = json.loads((world["root"] / f"{stage}_resumed" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    losses = [m["loss"] for m in whole["steps"]]
    assert [e["step"] for e in whole_log] == [2, 4, 6]
    for e in whole_log:  # each line: the mean of the two steps since the last one (HF Trainer's rule)
        assert e["loss"] == pytest.approx((losses[e["step"] - 2] + losses[e["step"] - 1]) / 2, rel=1e-12), e
    assert resumed_log == whole_log
    print(f"\n{stage}: resumed at step 3; steps 4-6, {len(whole_w)} trained tensors and the log_history "
          f"(logging_steps 2: {[round(e['loss'], 6) for e in whole_log]}) bitwise equal")
