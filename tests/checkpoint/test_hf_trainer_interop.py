"""Checkpoints both ways between `llava train` and Python HF Trainer + PEFT (stage 2 LoRA, tiny model, fp32,
dropout 0, one accumulation step), and clear errors for broken checkpoints.

1. HF Trainer resumes from our checkpoint-N. Our adapter_config.json's target_modules make PEFT wrap
   exactly the Linears we train. A PEFT model with its r / lora_alpha / dropout, the projector loaded
   LLaVA's way from non_lora_trainables.bin, then Trainer.train(resume_from_checkpoint): it loads our
   optimizer/scheduler state as written, warns about nothing missing, and its step N+1 (the batch our
   sampler gives at N+1) has our loss, grad norm, learning rate and trained weights.
2. Our trainer resumes from an HF Trainer + PEFT checkpoint-K trained on our batches in our order:
   its losses for steps K+1..M are HF's own continuation, and so are the weights at M.
3. Truncated, corrupted, missing or foreign checkpoint files, or other LoRA settings: exit 1, one
   `error:` line naming the file (or checkpoint) and the fault, output_dir untouched.

HF sees our batches: `llava preprocess --epoch E` writes every micro-batch of epoch E in our order; HF
gets their rows in that order (sequential sampler, per_device_train_batch_size = ours) and a collator that
stacks two consecutive rows back into our padded micro-batch."""
import copy
import hashlib
import json
import logging
import re
import shutil
import warnings

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlavaConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as transformers_logging

import tiny_llava
from llava_oracle import assert_clear_error, binary, run
from train_fixtures import LLM_LINEARS, collate, make_train_world

BATCH = 2
SAMPLES = 10  # 5 micro-batches per epoch
LORA = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8}
RECIPE = {"seed": 11, "logging_steps": 1, "per_device_train_batch_size": BATCH, "learning_rate": 5e-3,
          "lr_scheduler_type": "cosine", "warmup_steps": 1, "weight_decay": 0.1, "max_grad_norm": 1.0}
STATE_WARNING = re.compile(r"missing|unexpected|not found|didn't find|could not|couldn't|not match|mismatch|"
                           r"ignor|reproducib|skipp|not loaded|fail", re.I)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    model, base = make_train_world(root, SAMPLES)
    return {"root": root, "model": model, "base": {**base, **RECIPE, **LORA}}


def write_config(world, name, settings):
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**world["base"], "output_dir": str(world["root"] / name), **settings}))
    return path


def train(world, name, settings, check=True, extra=()):
    """`llava train`; returns (process, metrics JSON or None)."""
    metrics = world["root"] / f"{name}.metrics.json"
    proc = run([binary(), "train", write_config(world, name, settings), "--metrics-out", metrics, *extra], check=check)
    return proc, (json.loads(metrics.read_text()) if proc.returncode == 0 else None)


def our_rows(world, epochs):
    """Every sample of `epochs` epochs in our order, as rows of the micro-batches `llava train` sees."""
    cfg = write_config(world, "data", {})
    image_token = world["model"].config.image_token_index
    rows = []
    for epoch in range(epochs):
        f = world["root"] / f"batches{epoch}.safetensors"
        run([binary(), "preprocess", cfg, "--out", f, "--limit", 1000, "--epoch", epoch])
        t = load_file(str(f))
        for i in range(len({k.split(".")[0] for k in t})):
            b = {k: t[f"batch{i}.{k}"] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
            assert b["input_ids"].shape[0] == BATCH
            image = 0
            for r in range(BATCH):  # one image per sample that has an image token
                n = int(bool((b["input_ids"][r] == image_token).any()))
                rows.append({"input_ids": b["input_ids"][r], "labels": b["labels"][r],
                             "attention_mask": b["attention_mask"][r], "pixel_values": b["pixel_values"][image:image + n]})
                image += n
            assert image == b["pixel_values"].shape[0]
    return rows


def training_args(output_dir, max_steps, save_steps, save=True):
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=BATCH,
        learning_rate=RECIPE["learning_rate"], lr_scheduler_type=RECIPE["lr_scheduler_type"],
        warmup_steps=RECIPE["warmup_steps"], weight_decay=RECIPE["weight_decay"], max_grad_norm=RECIPE["max_grad_norm"],
        logging_steps=1, save_steps=save_steps, save_strategy="steps" if save else "no", optim="adamw_torch",
        train_sampling_strategy="sequential", remove_unused_columns=False, seed=RECIPE["seed"], report_to=[],
        disable_tqdm=True, use_cpu=True)


def peft_model(world, config):
    """LLaVA's stage-2 model: PEFT LoRA, plus the projector trainable (requires_grad) outside PEFT."""
    model = get_peft_model(copy.deepcopy(world["model"]), config)
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    return model


def canonical(peft_name):
    n = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default.", ".")
    return tiny_llava.canonical_name(n)


def trainable_names(model):
    return [canonical(n) for n, p in model.named_parameters() if p.requires_grad]


def load_non_lora_trainables(model, path):
    """LLaVA's train.py / builder.py: strip 'base_model.', then 'model.' when keys start 'model.model.'."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {(k[11:] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    result = model.base_model.model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return sorted(state)


def checkpoint_tensors(ckpt):
    """Our checkpoint's trained tensors by canonical name: the adapter and LLaVA's projector file."""
    out = {canonical(n): t for n, t in load_file(str(ckpt / "adapter_model.safetensors")).items()}
    for n, t in torch.load(ckpt / "non_lora_trainables.bin", weights_only=True).items():
        out[canonical(n)] = t
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


# --- 1. HF Trainer resumes from our checkpoint -------------------------------------------------------------

N = 3  # our checkpoint; HF takes step N + 1


@pytest.fixture(scope="module")
def ours_to_n_plus_1(world):
    """Our run to N + 1 with a save at N (and at the end, N + 1: the reference for HF's step)."""
    _, metrics = train(world, "ours", {"max_steps": N + 1, "save_steps": N})
    out = world["root"] / "ours"
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{N}", f"checkpoint-{N + 1}"]
    return out, metrics


def test_adapter_config_targets_exactly_the_modules_we_train(world, ours_to_n_plus_1):
    """get_peft_model with our adapter_config.json wraps the Linears we train with LoRA, and no others
    (LLaVA-HF's CLIP tower also has q_proj/k_proj/v_proj)."""
    out, metrics = ours_to_n_plus_1
    config = LoraConfig.from_pretrained(str(out / f"checkpoint-{N}"))
    config.inference_mode = False
    peft_lora = [n for n in trainable_names(peft_model(world, config)) if ".lora_" in n]
    ours_lora = [n for n in metrics["trainable"] if ".lora_" in n]
    extra = [n for n in peft_lora if n not in ours_lora]
    print(f"\nadapter_config.json target_modules {config.target_modules!r}: PEFT wraps {len(peft_lora) // 2} "
          f"Linears, we train {len(ours_lora) // 2}; extra: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    with warnings.catch_warnings(record=True) as caught:  # PEFT warns when the file lacks a wrapped module
        warnings.simplefilter("always")
        PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(out / f"checkpoint-{N}"))
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    print(f"PeftModel.from_pretrained: {missing[0][:160] + ' ...' if missing else 'no missing adapter keys'}")
    assert peft_lora == ours_lora
    assert not missing


def test_hf_trainer_resumes_from_our_lora_checkpoint(world, ours_to_n_plus_1):
    out, metrics = ours_to_n_plus_1
    ckpt = out / f"checkpoint-{N}"
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    # The LoRA hyper-parameters from our adapter_config.json; targets as LLaVA's training script chooses
    # them (the file's own target_modules is checked by the test above).
    config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=saved["lora_dropout"],
                        use_rslora=saved["use_rslora"], target_modules=LLM_LINEARS, task_type=saved["task_type"])
    model = peft_model(world, config)
    assert trainable_names(model) == metrics["trainable"]  # so optimizer.pt's integer ids mean the same tensors
    projector = load_non_lora_trainables(model, ckpt / "non_lora_trainables.bin")
    assert projector == sorted(n for n in metrics["trainable"] if "multi_modal_projector" in n)

    class AtTrainBegin(TrainerCallback):  # after HF loaded the checkpoint, before its first step
        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            self.step = state.global_step
            self.optimizer = copy.deepcopy(optimizer.state_dict())
            self.scheduler = copy.deepcopy(lr_scheduler.state_dict())
            self.weights = {canonical(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    begin = AtTrainBegin()
    logged = []

    class Collect(logging.Handler):
        def emit(self, record):
            logged.append(f"{record.name} {record.levelname}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "accelerate", "torch")]
    for lg in loggers:
        lg.addHandler(handler)
    transformers_logging.set_verbosity_warning()
    transformers_logging.get_logger("transformers.trainer").warning("probe")  # the capture itself works
    assert logged == ["transformers.trainer WARNING: probe"], logged
    logged.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # HF saves its own checkpoint-(N+1) (its last step) after resuming ours, elsewhere: ours is compared below.
            trainer = Trainer(model=model, args=training_args(world["root"] / "hf_continued", N + 1, N),
                              train_dataset=our_rows(world, 1), data_collator=collate, callbacks=[begin])
            trainer.train(resume_from_checkpoint=str(ckpt))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = logged + [f"{w.category.__name__}: {w.message}" for w in caught]
    print(f"\nHF Trainer resumed from our checkpoint-{N}; warnings/log records at WARNING or above: {len(messages)}")
    for m in messages:
        print(f"  {m}")

    # What HF loaded is what we wrote.
    assert begin.step == N
    written = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert begin.optimizer["param_groups"] == written["param_groups"]
    assert sorted(begin.optimizer["state"]) == sorted(written["state"]) == list(range(len(metrics["trainable"])))
    for i, s in written["state"].items():
        for key, value in s.items():
            assert torch.equal(begin.optimizer["state"][i][key], value), (i, key)
    assert begin.scheduler == torch.load(ckpt / "scheduler.pt", weights_only=True)
    at_n = checkpoint_tensors(ckpt)
    assert sorted(begin.weights) == sorted(at_n)
    for n, t in at_n.items():
        assert torch.equal(begin.weights[n], t), n

    # Its step N + 1 is ours, and it saved it (its next save reads the state's stateful_callbacks).
    assert trainer.state.global_step == N + 1
    saved_by_hf = world["root"] / "hf_continued" / f"checkpoint-{N + 1}"
    assert json.loads((saved_by_hf / "trainer_state.json").read_text())["global_step"] == N + 1
    hf = next(e for e in trainer.state.log_history if e.get("step") == N + 1 and "loss" in e)
    mine = metrics["steps"][N]
    at_n1 = checkpoint_tensors(out / f"checkpoint-{N + 1}")
    trained = {canonical(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}
    w_err = max((trained[n] - t).abs().max().item() / max(t.abs().max().item(), 1e-30) for n, t in at_n1.items())
    print(f"step {N + 1}: HF loss {hf['loss']!r} grad_norm {hf['grad_norm']!r} lr {hf['learning_rate']!r}; "
          f"ours loss {mine['loss']!r} grad_norm {mine['grad_norm']!r} lr {mine['learning_rate']!r}; "
          f"trained weights vs our checkpoint-{N + 1}: worst relative difference {w_err:.2e}")
    assert not [m for m in messages if STATE_WARNING.search(m)]
    for key in ("loss", "grad_norm", "learning_rate"):
        assert rel(hf[key], mine[key]) <= 1e-5, (key, hf[key], mine[key])
    assert w_err <= 1e-5


# --- 2. Our trainer resumes from an HF Trainer + PEFT checkpoint --------------------------------------------

def test_we_resume_from_an_hf_trainer_peft_checkpoint(world):
    K, M = 3, 8  # M crosses into our second epoch
    model = peft_model(world, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLM_LINEARS,
                                         task_type="CAUSAL_LM"))

    class NonLoraTrainables(TrainerCallback):  # LLaVA's projector file, next to what HF saves
        def on_save(self, args, state, control, model=None, **kw):
            ckpt = f"{args.output_dir}/checkpoint-{state.global_step}"
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()
                        if p.requires_grad and "lora_" not in n}, f"{ckpt}/non_lora_trainables.bin")

    hf_out = world["root"] / "hf"
    trainer = Trainer(model=model, args=training_args(hf_out, M, K), train_dataset=our_rows(world, 2),
                      data_collator=collate, callbacks=[NonLoraTrainables()])
    trainer.train()
    hf = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in hf] == list(range(1, M + 1))
    ckpt = hf_out / f"checkpoint-{K}"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert sorted(torch.load(ckpt / "non_lora_trainables.bin", weights_only=True)) == sorted(
        "base_model.model.model.multi_modal_projector." + n for n in
        ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"))

    weights = world["root"] / "from_hf.safetensors"
    proc, metrics = train(world, "from_hf", {"max_steps": M, "save_steps": 100, "resume_from_checkpoint": str(ckpt)},
                          extra=["--save-trainables", weights])
    assert f"resuming from {ckpt} at step {K}" in proc.stdout
    assert metrics["trainable"] == trainable_names(model)
    ours = metrics["steps"]
    assert [s["step"] for s in ours] == list(range(K + 1, M + 1))
    worst = {k: 0.0 for k in ("loss", "grad_norm", "learning_rate")}
    print(f"\nresumed from HF's checkpoint-{K}: step, loss ours/HF, grad_norm ours/HF, lr ours/HF")
    for o, h in zip(ours, hf[K:]):
        print(f"  {o['step']}: {o['loss']:.9g}/{h['loss']:.9g}  {o['grad_norm']:.9g}/{h['grad_norm']:.9g}  "
              f"{o['learning_rate']:.9g}/{h['learning_rate']:.9g}")
        for k in worst:
            worst[k] = max(worst[k], rel(o[k], h[k]))
    trained = load_file(str(weights))
    hf_weights = {canonical(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(hf_weights)
    w_err = max((trained[n] - t).abs().max().item() / max(t.abs().max().item(), 1e-30) for n, t in hf_weights.items())
    print(f"  worst relative differences: {', '.join(f'{k} {v:.2e}' for k, v in worst.items())}; "
          f"trained weights at step {M}: {w_err:.2e}")
    assert max(h["grad_norm"] for h in hf[K:]) > RECIPE["max_grad_norm"]  # clipping happens after the resume
    assert all(v <= 1e-5 for v in worst.values()), worst
    assert w_err <= 1e-5


# --- 3. Broken checkpoints ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(world):
    """checkpoint-2 of: our LoRA r=4 run, the same with r=8, and a run on another model (hidden 48)."""
    s = {"max_steps": 2, "save_steps": 2}
    train(world, "src_r4", s)
    train(world, "src_r8", {**s, "lora_r": 8})
    other = world["root"] / "other_model"
    shutil.copytree(world["base"]["model_name_or_path"], other)
    ours_config = LlavaConfig.from_pretrained(str(other))
    config = tiny_llava.make_config(vocab=ours_config.text_config.vocab_size, hidden=48, image_size=16, patch_size=4)
    config.image_token_index = ours_config.image_token_index
    tiny_llava.save(tiny_llava.build(config, seed=5), str(other))
    train(world, "src_other", {**s, "model_name_or_path": str(other)})
    return {k: world["root"] / f"src_{k}" / "checkpoint-2" for k in ("r4", "r8", "other")}


def truncate(name):
    def corrupt(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:len(data) // 2])
    return corrupt


def garble_safetensors_header(ckpt):
    data = bytearray((ckpt / "adapter_model.safetensors").read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts after its 8-byte length
    (ckpt / "adapter_model.safetensors").write_bytes(bytes(data))


def remove(name):
    return lambda ckpt: (ckpt / name).unlink()


def as_hf_checkpoint_with_lora_alpha(alpha):
    """What HF Trainer + PEFT would have written with another lora_alpha: no llava_* files of ours."""
    def corrupt(ckpt):
        for f in ckpt.glob("llava_*"):
            f.unlink()
        config = json.loads((ckpt / "adapter_config.json").read_text())
        config["lora_alpha"] = alpha
        (ckpt / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return corrupt


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("source, corrupt, needles", [
    ("r4", truncate("optimizer.pt"), ["checkpoint-2/optimizer.pt", "not a readable torch.save archive"]),
    ("r4", garble_safetensors_header, ["checkpoint-2/adapter_model.safetensors", "header: not valid JSON"]),
    ("r4", remove("trainer_state.json"), ["checkpoint-2", "no trainer_state.json"]),
    ("r4", remove("optimizer.pt"), ["checkpoint-2/optimizer.pt", "no such file"]),
    ("other", None, ["checkpoint-2/config.json", "another model"]),
    ("r8", None, ["checkpoint-2", "LoRA settings differ", '"r":8', '"r":4']),
    ("r4", as_hf_checkpoint_with_lora_alpha(16), ["checkpoint-2/adapter_config.json", "lora_alpha"]),
], ids=["truncated-optimizer", "garbled-adapter-header", "no-trainer-state", "no-optimizer", "other-model", "lora-r8",
        "hf-lora-alpha16"])
def test_broken_checkpoint_is_a_clear_error_and_changes_nothing(world, sources, source, corrupt, needles, request):
    name = "bad_" + request.node.callspec.id
    out = world["root"] / name
    ckpt = out / "checkpoint-2"
    shutil.copytree(sources[source], ckpt)
    if corrupt:
        corrupt(ckpt)
    before = snapshot(out)
    proc, _ = train(world, name, {"max_steps": 4, "save_steps": 2, "resume_from_checkpoint": str(ckpt)}, check=False)
    print(f"\n  {request.node.callspec.id}: {proc.stderr.strip()}")
    assert_clear_error(proc, *needles)
    assert snapshot(out) == before
