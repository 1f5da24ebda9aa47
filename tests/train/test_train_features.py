"""`llava train` end to end: activation checkpointing, bf16 mixed precision, non-finite steps, SIGTERM with
save_on_interrupt, and SIGKILL at random moments (each time resumed from the newest complete checkpoint)."""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llava_oracle import binary, run
from train_fixtures import make_train_world

LORA = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    _, base = make_train_world(root, 10)
    base.update({"seed": 11, "logging_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 5e-3,
                 "max_steps": 6, "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "save_strategy": "no"})
    return {"root": root, "base": base}


def config(world, name, settings):
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**world["base"], "output_dir": str(world["root"] / name), **settings}))
    return path


def train(world, name, settings, check=True, extra=()):
    metrics, weights = world["root"] / f"{name}.json", world["root"] / f"{name}.safetensors"
    proc = run([binary(), "train", config(world, name, settings), "--metrics-out", metrics, "--save-trainables",
                weights, *extra], check=check)
    if proc.returncode != 0:
        return proc, None, None
    return proc, json.loads(metrics.read_text())["steps"], load_file(str(weights))


@pytest.mark.parametrize("settings", [LORA, {"unfreeze_mm_vision_tower": True}], ids=["lora", "full+vision"])
def test_gradient_checkpointing_changes_nothing_but_memory(world, settings):
    name = "lora" if "lora_enable" in settings else "full"
    _, plain, plain_w = train(world, f"ckpt_off_{name}", settings)
    _, ckpt, ckpt_w = train(world, f"ckpt_on_{name}", {**settings, "gradient_checkpointing": True})
    assert ckpt == plain  # losses, grad norms, learning rates: bitwise
    for n in plain_w:
        assert torch.equal(ckpt_w[n], plain_w[n]), n
    print(f"{name}: {len(plain)} steps and {len(plain_w)} trained tensors bitwise equal with gradient_checkpointing "
          "(peak memory: see test_checkpointing in tests/model)")


def test_bf16_computes_in_bf16_and_keeps_fp32_masters(world):
    _, fp32, fp32_w = train(world, "fp32_lora", {**LORA, "save_strategy": "steps", "save_steps": 6})
    _, bf16, bf16_w = train(world, "bf16_lora", {**LORA, "bf16": True, "save_strategy": "steps", "save_steps": 6})
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(bf16, fp32))
    print(f"bf16 vs fp32 losses over {len(fp32)} steps: worst relative difference {worst:.2e}")
    assert worst < 2e-2
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32))  # it really ran in bf16

    ckpt = world["root"] / "bf16_lora" / "checkpoint-6"
    masters = load_file(str(ckpt / "llava_master_weights.safetensors"))
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in masters.values())
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}  # PEFT saves the model's dtype
    for name, t in adapter.items():  # the bf16 weights are the rounded fp32 masters
        canonical = name.replace("base_model.model.", "")
        matches = [m for m in masters if canonical.endswith(m.split("model.", 1)[1])]
        assert matches, name
        assert torch.equal(masters[matches[0]].to(torch.bfloat16), t), name
    state = torch.load(str(ckpt / "optimizer.pt"), weights_only=True)["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_nonfinite_loss_stops_or_skips(world, tmp_path):
    import shutil
    model_dir = tmp_path / "nan_model"
    shutil.copytree(world["base"]["model_name_or_path"], model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    name = next(n for n in weights if "multi_modal_projector" in n and n.endswith("weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    stage1 = {"tune_mm_mlp_adapter": True, "model_name_or_path": str(model_dir), "save_strategy": "steps",
              "save_steps": 1}
    stop, _, _ = train(world, "nan_stop", stage1, check=False)
    assert stop.returncode == 1
    assert "error: step 1: loss nan" in stop.stderr and "stopping before the update" in stop.stderr
    assert not (world["root"] / "nan_stop" / "checkpoint-1").exists()

    proc, steps, trained = train(world, "nan_skip", {**stage1, "skip_nonfinite_steps": True})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("update skipped") == 6 and "6 skipped so far" in proc.stdout
    assert torch.equal(trained[name].isnan(), weights[name].isnan())  # nothing was updated
    print(f"NaN projector weight: stop -> {stop.stderr.strip()}; skip -> 6 of 6 steps skipped")


def wait_for(proc, path, needle, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {needle!r}: {path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} within {timeout}s")


def test_sigterm_with_save_on_interrupt_saves_then_resumes_exactly(world):
    s = {**LORA, "max_steps": 10, "save_strategy": "steps", "save_steps": 100, "save_on_interrupt": True}
    _, whole, whole_w = train(world, "term_whole", s)
    name = "term_run"
    log = world["root"] / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary(), "train", config(world, name, s)], stdout=out, stderr=subprocess.STDOUT)
        wait_for(proc, log, "'loss'")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    text = log.read_text()
    assert "interrupted by a signal: saved checkpoint-" in text
    saved = int(text.split("saved checkpoint-")[1].split(",")[0])
    assert 1 <= saved < 10 and (world["root"] / name / f"checkpoint-{saved}" / "trainer_state.json").exists()
    _, rest, rest_w = train(world, name, {**s, "resume_from_checkpoint": "auto"})
    assert [m["step"] for m in rest] == list(range(saved + 1, 11))
    assert rest == whole[saved:]
    for n in whole_w:
        assert torch.equal(rest_w[n], whole_w[n]), n
    print(f"SIGTERM after step {saved}: checkpoint saved, resumed, steps {saved + 1}-10 and weights bitwise equal")


def test_sigkill_at_random_moments_then_resume_is_bitwise(world):
    """At least 10 SIGKILLs at random moments (some land inside a save: save_steps 1), each followed by a
    resume from the newest complete checkpoint; the finished run equals an uninterrupted one bit for bit."""
    steps = 60
    s = {**LORA, "max_steps": steps, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 2,
         "resume_from_checkpoint": "auto"}
    _, whole, whole_w = train(world, "kill_whole", s)
    name = "kill_run"
    out_dir = world["root"] / name
    rng = random.Random(1234)
    kills = 0
    for attempt in range(60):
        log = world["root"] / f"{name}.{attempt}.log"
        metrics = world["root"] / f"{name}.json"
        weights = world["root"] / f"{name}.safetensors"
        with open(log, "w") as out:
            proc = subprocess.Popen([binary(), "train", config(world, name, s), "--metrics-out", metrics,
                                     "--save-trainables", weights], stdout=out, stderr=subprocess.STDOUT)
            if kills < 10:
                wait_for(proc, log, "training:")  # the model is loaded: kill during steps and saves
                time.sleep(rng.uniform(0.0, 0.6))
                if proc.poll() is None:
                    proc.kill()
                    kills += 1
            code = proc.wait(timeout=300)
        assert code in (0, -signal.SIGKILL), log.read_text()
        assert not list(out_dir.glob("checkpoint-*/*.partial"))
        if code == 0:
            break
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    got = load_file(str(weights))
    for n in whole_w:
        assert torch.equal(got[n], whole_w[n]), n
    final = json.loads((out_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert final["global_step"] == steps
    print(f"{kills} SIGKILLs over {attempt + 1} runs; finished at step {steps} with weights bitwise equal")
