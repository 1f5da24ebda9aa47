"""PEFT adapters in every naming PEFT reads, over a base model written by transformers' own save_pretrained.

transformers 5 saves a llava-hf model with the classic keys (language_model.model.layers.N...), while PEFT
0.21 names adapter keys after the model as loaded (base_model.model.model.language_model.layers.N...).
PEFT reads either naming; so must every one of our adapter readers: `llava train --init-lora-from`,
resume_from_checkpoint on an HF Trainer + PEFT checkpoint-N, and eval-logits --adapter. Each gives PEFT's
numbers (losses of HF Trainer's own run, logits of PeftModel). The same adapter renamed to the classic
naming, to the raw state_dict() naming (".default.") and to original LLaVA's (model.layers.N) gives the
same numbers; a key that names no module is one error line naming the key and the file."""
import copy
import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from llava_oracle import assert_clear_error, binary, run
from test_hf_trainer_interop import (BATCH, LLM_LINEARS, LORA, RECIPE, collate, load_non_lora_trainables, our_rows,
                                     rel, trainable_names, training_args)
from train_fixtures import make_train_world

SAMPLES = 10  # 5 micro-batches per epoch
K, M = 3, 6   # HF Trainer saves checkpoint-K and runs to M; we resume at K (logging_steps 2: K is no log step)
MODERN = "base_model.model.model.language_model.layers."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("namings")
    model, base = make_train_world(root, SAMPLES, layout="v5")
    with safe_open(f"{base['model_name_or_path']}/model.safetensors", "pt") as f:
        keys = list(f.keys())
    # transformers' save_pretrained wrote the classic llava-hf names.
    assert any(k.startswith("language_model.model.layers.0.") for k in keys), keys[:5]
    assert not any(k.startswith("model.language_model.") for k in keys), keys[:5]
    return {"root": root, "model": model, "base": {**base, **RECIPE, **LORA}}


def write_config(world, name, settings):
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**world["base"], "output_dir": str(world["root"] / name), **settings}))
    return path


def train(world, name, settings, extra=(), check=True):
    metrics = world["root"] / f"{name}.metrics.json"
    proc = run([binary(), "train", write_config(world, name, settings), "--metrics-out", metrics, *extra], check=check)
    return proc, (json.loads(metrics.read_text()) if proc.returncode == 0 else None)


def with_projector_trainable(model):
    """LLaVA's stage 2: the projector trains next to LoRA, outside PEFT."""
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    return model


@pytest.fixture(scope="module")
def adapter(world):
    """A PEFT adapter with random (non-zero) LoRA weights, written by PEFT's save_pretrained."""
    peft = get_peft_model(copy.deepcopy(world["model"]),
                          LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                     target_modules=LLM_LINEARS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = world["root"] / "adapter_modern"
    peft.save_pretrained(str(out))
    keys = sorted(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(k.startswith(MODERN) for k in keys), keys[:3]  # PEFT's naming, not the base file's
    return out


def renamed(adapter_dir, out_dir, rename):
    """The same adapter with every key renamed (PEFT's adapter_config.json kept)."""
    out_dir.mkdir(exist_ok=True)
    (out_dir / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    return out_dir


NAMINGS = {
    "classic": lambda k: k.replace(MODERN, "base_model.model.language_model.model.layers."),
    "default": lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
    "original": lambda k: k.replace(MODERN, "base_model.model.model.layers."),
}


@pytest.fixture(scope="module")
def hf_run(world, adapter):
    """HF Trainer + PEFT from the adapter (PeftModel.from_pretrained, as PEFT reads it) on our batches:
    M steps, checkpoint-K with LLaVA's non_lora_trainables.bin beside it."""
    model = with_projector_trainable(PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(adapter),
                                                               is_trainable=True))

    class NonLoraTrainables(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n},
                       f"{args.output_dir}/checkpoint-{state.global_step}/non_lora_trainables.bin")

    out = world["root"] / "hf"
    trainer = Trainer(model=model, args=training_args(out, M, K), train_dataset=our_rows(world, 2),
                      data_collator=collate, callbacks=[NonLoraTrainables()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == M
    ckpt = out / f"checkpoint-{K}"
    keys = sorted(load_file(str(ckpt / "adapter_model.safetensors")))
    assert keys and all(k.startswith(MODERN) for k in keys), keys[:3]
    return {"losses": losses, "checkpoint": ckpt, "trainable": trainable_names(model)}


def assert_losses(name, ours, hf_losses):
    worst = max(rel(o["loss"], h) for o, h in zip(ours, hf_losses))
    print(f"\n{name}: steps {[o['step'] for o in ours]}, losses ours {[round(o['loss'], 6) for o in ours]} "
          f"HF {[round(h, 6) for h in hf_losses]}; worst relative difference {worst:.2e}")
    assert len(ours) == len(hf_losses)
    assert worst <= 1e-5


@pytest.mark.parametrize("naming", ["modern", "classic"])
def test_init_lora_from_a_peft_adapter_gives_hf_trainers_losses(world, adapter, hf_run, naming):
    src = adapter if naming == "modern" else renamed(adapter, world["root"] / "adapter_classic", NAMINGS["classic"])
    _, metrics = train(world, f"init_{naming}", {"max_steps": M, "save_strategy": "no"}, extra=["--init-lora-from", src])
    assert metrics["trainable"] == hf_run["trainable"]
    assert_losses(f"--init-lora-from ({naming} naming)", metrics["steps"], hf_run["losses"])
    assert rel(metrics["steps"][0]["loss"], hf_run["losses"][0]) <= 1e-5  # step 1 already uses the adapter


def test_resume_from_an_hf_trainer_peft_checkpoint_in_peft_naming(world, hf_run):
    """logging_steps 2 and K = 3: HF Trainer's rule for a checkpoint without our log state: the first line
    (step 4) is the mean of the steps this run made since the resume, i.e. step 4's loss alone."""
    proc, metrics = train(world, "resume_hf", {"max_steps": M, "save_steps": 100, "logging_steps": 2,
                                              "resume_from_checkpoint": str(hf_run["checkpoint"])})
    assert f"at step {K}" in proc.stdout
    assert_losses(f"resumed from HF Trainer's checkpoint-{K}", metrics["steps"], hf_run["losses"][K:])
    log = json.loads((world["root"] / "resume_hf" / f"checkpoint-{M}" / "trainer_state.json").read_text())["log_history"]
    ours = {m["step"]: m["loss"] for m in metrics["steps"]}
    new = [e for e in log if e["step"] > K and "loss" in e]
    assert [e["step"] for e in new] == [4, 6]
    assert new[0]["loss"] == pytest.approx(ours[4], rel=1e-12)
    assert new[1]["loss"] == pytest.approx((ours[5] + ours[6]) / 2, rel=1e-12)


def peft_logits(world, adapter_dir, projector, batch):
    model = PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(adapter_dir)).eval()
    if projector:  # as LLaVA's builder.py loads non_lora_trainables.bin (either naming)
        load_non_lora_trainables(model, projector)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.float()


def our_logits(world, adapter_dir, projector, batch, name, check=True):
    save_file({k: v.contiguous() for k, v in batch.items() if k != "labels"}, str(world["root"] / f"{name}.in.safetensors"))
    out = world["root"] / f"{name}.out.safetensors"
    proc = run([binary(), "eval-logits", "--model", world["base"]["model_name_or_path"], "--adapter", adapter_dir,
                *(["--projector", projector] if projector else []), "--batch", world["root"] / f"{name}.in.safetensors",
                "--out", out], check=check)
    return proc if not check else load_file(str(out))["logits"]


@pytest.fixture(scope="module")
def batch(world):
    rows = our_rows(world, 1)[:BATCH]
    b = collate(rows)
    assert b["pixel_values"].shape[0] > 0
    return b


def test_eval_logits_with_the_hf_checkpoints_adapter_gives_peft_logits(world, hf_run, batch):
    ckpt = hf_run["checkpoint"]
    want = peft_logits(world, ckpt, ckpt / "non_lora_trainables.bin", batch)
    got = our_logits(world, ckpt, ckpt / "non_lora_trainables.bin", batch, "ckpt")
    diff = (got - want).abs().max().item()
    print(f"\neval-logits --adapter HF's checkpoint-{K} vs PeftModel.from_pretrained: max abs diff {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parametrize("naming", ["modern", "classic", "default", "original"])
def test_eval_logits_reads_every_naming(world, adapter, batch, naming):
    src = adapter if naming == "modern" else renamed(adapter, world["root"] / f"adapter_{naming}", NAMINGS[naming])
    want = peft_logits(world, adapter, None, batch)
    with torch.no_grad():
        base = world["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"]).logits.float()
    got = our_logits(world, src, None, batch, f"naming_{naming}")
    diff, moved = (got - want).abs().max().item(), (base - want).abs().max().item()
    if naming == "classic":  # PEFT itself reads this naming too, to the same model
        assert (peft_logits(world, src, None, batch) - want).abs().max().item() == 0
    print(f"\n[{naming}] eval-logits vs PEFT: max abs diff {diff:.3g} (the adapter moves logits by {moved:.3g})")
    assert moved > 0.1
    assert diff <= 1e-4


def test_an_adapter_key_for_no_module_is_one_error_naming_key_and_file(world, adapter, batch):
    bad_key = "base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_A.weight"  # 2 layers only
    src = renamed(adapter, world["root"] / "adapter_bad", lambda k: bad_key if k == MODERN + "0.self_attn.q_proj.lora_A.weight" else k)
    file = str(src / "adapter_model.safetensors")
    proc = our_logits(world, src, None, batch, "bad", check=False)
    assert_clear_error(proc, file, bad_key)
    proc, _ = train(world, "init_bad", {"max_steps": 1}, extra=["--init-lora-from", src], check=False)
    assert_clear_error(proc, file, bad_key)
    assert not (world["root"] / "init_bad").exists()


def test_our_checkpoints_over_this_base_use_its_classic_naming_and_resume(world, adapter, batch):
    """What we write over this base keeps the base file's naming (PEFT reads it, see above), and we resume
    from it: checkpoint-1 -> step 2 equals the uninterrupted run's step 2."""
    s = {"max_steps": 2, "save_steps": 1}
    _, whole = train(world, "ours_classic", s, extra=["--init-lora-from", adapter])
    ckpt = world["root"] / "ours_classic" / "checkpoint-2"
    keys = sorted(load_file(str(ckpt / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.language_model.model.layers.") for k in keys), keys[:3]
    want = peft_logits(world, ckpt, ckpt / "non_lora_trainables.bin", batch)
    got = our_logits(world, ckpt, ckpt / "non_lora_trainables.bin", batch, "ours_classic")
    assert (got - want).abs().max().item() <= 1e-4
    _, resumed = train(world, "ours_classic_resumed", {**s, "resume_from_checkpoint": str(world["root"] / "ours_classic" / "checkpoint-1")})
    assert [m["step"] for m in resumed["steps"]] == [2]
    assert resumed["steps"][0] == whole["steps"][1]
