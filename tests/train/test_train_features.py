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

from llava_oracle import assert_clear_error, binary, run
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


LORA_DROPOUT = {**LORA, "lora_dropout": 0.3}


@pytest.mark.parametrize("settings", [LORA_DROPOUT, {"unfreeze_mm_vision_tower": True}], ids=["lora", "full+vision"])
def test_gradient_checkpointing_changes_nothing_but_memory(world, settings):
    """The recomputation in backward draws LoRA dropout's masks from the generator state the forward saw
    (torch.utils.checkpoint's preserve_rng_state), so the run is bitwise the run without checkpointing."""
    name = "lora" if "lora_enable" in settings else "full"
    _, plain, plain_w = train(world, f"ckpt_off_{name}", settings)
    _, ckpt, ckpt_w = train(world, f"ckpt_on_{name}", {**settings, "gradient_checkpointing": True})
    assert ckpt == plain  # losses, grad norms, learning rates: bitwise
    for n in plain_w:
        assert torch.equal(ckpt_w[n], plain_w[n]), n
    if name == "lora":  # dropout really drew masks: without it the run differs (from step 2: lora_B starts at 0)
        _, no_dropout, _ = train(world, "ckpt_off_lora_no_dropout", {**settings, "lora_dropout": 0.0})
        assert no_dropout[0]["loss"] == plain[0]["loss"]
        assert all(a["loss"] != b["loss"] for a, b in zip(no_dropout[1:], plain[1:]))
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


def test_device_cpu_is_the_default_and_cuda_without_a_gpu_is_one_clear_error(world):
    """device: cpu, use_cpu: true and device: auto (no GPU here) train exactly what the default does, checkpoint
    files byte for byte (the RNG file holds no CUDA state); device: cuda on a machine or build without CUDA is
    one error line naming the key, exit 1, and output_dir is never created."""
    assert not torch.cuda.is_available()  # CI's machine: this test is about the CPU
    s = {**LORA, "save_strategy": "steps", "save_steps": 3}
    _, default, default_w = train(world, "device_default", s)
    ckpt = world["root"] / "device_default" / "checkpoint-6"
    for name, extra in [("device_cpu", {"device": "cpu"}), ("device_use_cpu", {"use_cpu": True}),
                        ("device_auto", {"device": "auto"}), ("device_cpu_async", {"device": "cpu", "async_save": False})]:
        _, steps, weights = train(world, name, {**s, **extra})
        assert steps == default, name  # losses, grad norms, learning rates: bitwise
        for n in default_w:
            assert torch.equal(weights[n], default_w[n]), (name, n)
        for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "llava_rng_state.safetensors",
                  "non_lora_trainables.bin", "trainer_state.json"):
            assert (world["root"] / name / "checkpoint-6" / f).read_bytes() == (ckpt / f).read_bytes(), (name, f)
    assert list(load_file(str(ckpt / "llava_rng_state.safetensors"))) == ["rank_0"]
    # A GPU run's checkpoint (its RNG file also holds the CUDA generator, "cuda_rank_R") resumes on the CPU:
    # the CUDA state is ignored and the continuation is bitwise the uninterrupted run's.
    import shutil
    gpu_like = world["root"] / "device_gpu_like"
    shutil.copytree(world["root"] / "device_default" / "checkpoint-3", gpu_like / "checkpoint-3")
    rng = load_file(str(gpu_like / "checkpoint-3" / "llava_rng_state.safetensors"))
    save_file({**rng, "cuda_rank_0": torch.arange(16, dtype=torch.uint8)},
              str(gpu_like / "checkpoint-3" / "llava_rng_state.safetensors"))
    _, resumed, resumed_w = train(world, "device_gpu_like", {**s, "resume_from_checkpoint": "auto"})
    assert resumed == default[3:]
    for n in default_w:
        assert torch.equal(resumed_w[n], default_w[n]), n
    proc, _, _ = train(world, "device_cuda", {**s, "device": "cuda"}, check=False)
    assert_clear_error(proc, "device_cuda.yaml", "key 'device'", "cuda", "use device: cpu")
    assert not (world["root"] / "device_cuda").exists() and not (world["root"] / "device_cuda.json").exists()
    print(f"device cpu / use_cpu / auto: {len(default)} steps, weights and checkpoint files bitwise the default's; "
          f"device: cuda -> {proc.stderr.strip()}")


ASYNC_CASES = [("lora", 1, {}), ("full+vision", 1, {"unfreeze_mm_vision_tower": True}),
               ("lora_zero2", 2, {"zero_stage": 2}), ("bf16_zero1", 2, {"bf16": True, "zero_stage": 1})]


@pytest.mark.parametrize("name,ranks,settings", ASYNC_CASES, ids=[c[0] for c in ASYNC_CASES])
def test_async_save_writes_what_the_synchronous_save_writes(world, name, ranks, settings):
    """async_save: true (a background thread writes each checkpoint while the next steps run; under ZeRO every
    rank writes its shard in its own thread and rank 0 commits once all are there) trains exactly as the
    synchronous save does and writes every checkpoint byte for byte the same, rotation included; every save's
    background write is reported done (bench/bench_async_save.py measures how long the step is held)."""
    s = {**(LORA if "lora" in name or "zero1" in name else {}), **settings, "save_strategy": "steps", "save_steps": 1,
         "save_total_limit": 3}
    runs = {}
    for mode in (False, True):
        run_name = f"async_{name}_{mode}"
        run(command(world, run_name, {**s, "async_save": mode}, ranks))
        runs[mode] = finished(world, run_name, ranks)
    assert runs[True][0] == runs[False][0]
    for n in runs[False][1]:
        assert torch.equal(runs[True][1][n], runs[False][1][n]), n
    sync_out, async_out = world["root"] / f"async_{name}_False", world["root"] / f"async_{name}_True"
    names = sorted(p.name for p in sync_out.iterdir())
    assert names == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]  # rotation ran in the background too
    assert sorted(p.name for p in async_out.iterdir()) == names
    files = 0
    for ckpt in names:
        for f in sorted((sync_out / ckpt).rglob("*")):
            if f.is_file():
                assert (async_out / ckpt / f.relative_to(sync_out / ckpt)).read_bytes() == f.read_bytes(), f
                files += 1
    saves = json.loads((world["root"] / f"async_{name}_True.json").read_text())["saves"]
    assert [t["step"] for t in saves] == list(range(1, 7)) and all(t["write_seconds"] > 0 for t in saves)
    print(f"{name}, {ranks} rank(s): 6 async saves, {files} checkpoint files byte-equal to the synchronous run's; "
          f"blocked {[round(t['blocked_seconds'], 4) for t in saves]} s, written in "
          f"{[round(t['write_seconds'], 4) for t in saves]} s")


def test_a_failed_background_save_ends_every_rank_and_keeps_the_previous_checkpoint(world):
    """2 ranks, async_save: rank 0 runs out of space (the disk-full injection) in the background write of the
    second save. Both ranks end at the next step with an error: rank 0 names the file and ENOSPC, rank 1 says
    the save failed on another rank; checkpoint-1 stays, byte for byte the undisturbed run's, and the failed
    save leaves no partial folder."""
    s = {**LORA, "max_steps": 4, "save_strategy": "steps", "save_steps": 1, "async_save": True}
    run(command(world, "async_fault_ref", s, 2))
    ref = world["root"] / "async_fault_ref" / "checkpoint-1"
    first = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file())
    env = {**os.environ, "LLAVA_FAULT_WRITE_AFTER_BYTES": str(first + first // 2)}  # inside the second save
    proc = subprocess.run(command(world, "async_fault", s, 2), env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    errors = [l for l in text.splitlines() if ":error:" in l]
    assert any(l.startswith("[rank0]:error:") and ".checkpoint-2.partial/" in l and "No space left on device" in l
               for l in errors), errors
    assert "[rank1]:error: saving checkpoint-2 failed on another rank (see its error)" in errors, errors
    assert "'loss'" in text and text.count("{'loss'") <= 3  # ended in step 3 at the latest
    out = world["root"] / "async_fault"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    for f in ref.rglob("*"):
        if f.is_file():
            assert (out / "checkpoint-1" / f.relative_to(ref)).read_bytes() == f.read_bytes(), f
    print(f"2 ranks, async save of step 2 out of space: {errors}")


def host_reads(world, name):
    return {r["step"]: r["reads"] for r in json.loads((world["root"] / f"{name}.json").read_text())["host_reads"]}


def test_device_values_are_read_back_only_where_logging_needs_them(world):
    """The step's loss and grad_norm stay on the device: with logging_steps 5 over 10 steps the host reads
    device values in steps 5 and 10 only, once each, and every step's values still come out exact."""
    settings = {**LORA, "max_steps": 10, "logging_steps": 5, "max_grad_norm": 0.01}  # clipping on every step
    proc, steps, weights = train(world, "reads_5", settings)
    assert host_reads(world, "reads_5") == {5: 1, 10: 1}
    assert proc.stdout.count("{'loss'") == 2
    _, every, every_w = train(world, "reads_1", {**settings, "logging_steps": 1})
    assert host_reads(world, "reads_1") == {s: 1 for s in range(1, 11)}
    assert steps == every and len(steps) == 10  # per-step loss and grad_norm, bitwise
    assert all(s["grad_norm"] > 0.01 for s in steps)  # the device-side coefficient clipped every step
    for n in weights:
        assert torch.equal(weights[n], every_w[n]), n
    # A save reads the line in progress back (it goes into llava_resume.json); skip_nonfinite_steps needs
    # each step's two values before its update: one read per step.
    train(world, "reads_save", {**settings, "save_strategy": "steps", "save_steps": 3})
    assert host_reads(world, "reads_save") == {3: 1, 5: 1, 6: 1, 9: 1, 10: 1}
    train(world, "reads_skip", {**settings, "skip_nonfinite_steps": True})
    assert host_reads(world, "reads_skip") == {s: 1 for s in range(1, 11)}


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
    # logging_steps 1: the values of step 1 are read back in step 1, so the run stops there, before its save
    assert "error: step 1: loss nan, grad_norm nan: not finite; stopping at step 1" in stop.stderr
    assert not (world["root"] / "nan_stop" / "checkpoint-1").exists()

    proc, steps, trained = train(world, "nan_skip", {**stage1, "skip_nonfinite_steps": True})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("update skipped") == 6 and "6 skipped so far" in proc.stdout
    assert torch.equal(trained[name].isnan(), weights[name].isnan())  # nothing was updated
    # HF's logging_nan_inf_filter: a NaN step adds the line's mean so far, here 0 (no finite loss before it),
    # so the log lines say 0.0 and not nan.
    checkpoints = sorted((world["root"] / "nan_skip").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    logged = [h["loss"] for h in history if "loss" in h]
    assert logged and all(loss == 0.0 for loss in logged), logged
    print(f"NaN projector weight: stop -> {stop.stderr.strip()}; skip -> 6 of 6 steps skipped")


def wait_for(proc, path, needle, timeout=120, count=1):
    """Until `path` holds `needle` (and count - 1 HF log lines after it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text and text.split(needle, 1)[1].count("'loss'") >= count - 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {needle!r}: {path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} within {timeout}s")


RANKS = [1, 2]


def command(world, name, s, ranks, metrics=True):
    """`llava train` for `ranks` processes (2: under llava-run, one sample per rank: the same global batch)."""
    if ranks > 1:
        s = {**s, "per_device_train_batch_size": world["base"]["per_device_train_batch_size"] // ranks}
    cmd = [binary(), "train", config(world, name, s)]
    if metrics:
        cmd += ["--metrics-out", world["root"] / f"{name}.json", "--save-trainables", world["root"] / f"{name}.safetensors"]
    if ranks > 1:
        cmd = [binary("LLAVA_RUN"), "--standalone", f"--nproc_per_node={ranks}", *cmd]
    return [str(c) for c in cmd]


def finished(world, name, ranks):
    return (json.loads((world["root"] / f"{name}.json").read_text())["steps"],
            load_file(str(world["root"] / f"{name}.safetensors")))


def worker_pids(launcher):
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("ranks", RANKS)
def test_sigterm_with_save_on_interrupt_saves_then_resumes_exactly(world, ranks):
    s = {**LORA, "max_steps": 10, "save_strategy": "steps", "save_steps": 100, "save_on_interrupt": True}
    run(command(world, f"term_whole_{ranks}", s, ranks))
    whole, whole_w = finished(world, f"term_whole_{ranks}", ranks)
    name = f"term_run_{ranks}"
    log = world["root"] / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command(world, name, s, ranks, metrics=False), stdout=out, stderr=subprocess.STDOUT)
        wait_for(proc, log, "'loss'")
        proc.send_signal(signal.SIGTERM)  # llava-run forwards it to every worker
        # Saved, then stopped before the end: the process (or llava-run, like torchrun) exits 128 + SIGTERM,
        # so nothing takes the unfinished run for done.
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()
    text = log.read_text()
    assert "interrupted by a signal: saved checkpoint-" in text
    saved = int(text.split("saved checkpoint-")[1].split(",")[0])
    assert 1 <= saved < 10 and (world["root"] / name / f"checkpoint-{saved}" / "trainer_state.json").exists()
    run(command(world, name, {**s, "resume_from_checkpoint": "auto"}, ranks))
    rest, rest_w = finished(world, name, ranks)
    assert [m["step"] for m in rest] == list(range(saved + 1, 11))
    assert rest == whole[saved:]
    for n in whole_w:
        assert torch.equal(rest_w[n], whole_w[n]), n
    print(f"{ranks} rank(s): SIGTERM after step {saved}: checkpoint saved, resumed, steps {saved + 1}-10 and "
          "weights bitwise equal")


@pytest.mark.parametrize("stage", ["stage1", "lora", "full"])
def test_bf16_resume_without_sharding_is_bitwise(world, stage):
    """bf16 with fp32 masters, ZeRO 0: stopped after step 3, resumed from checkpoint-3 (optimizer.pt holds fp32
    moments for bf16 parameters, llava_master_weights the fp32 masters): bitwise equal to the whole run. Every
    trained tensor is bf16 in stage 1 and the full fine-tune (LoRA: the projector)."""
    s = {**({"tune_mm_mlp_adapter": True} if stage == "stage1" else LORA if stage == "lora" else {}), "bf16": True,
         "save_strategy": "steps", "save_steps": 3}
    _, whole, whole_w = train(world, f"bf16_whole_{stage}", s)
    name = f"bf16_stop_{stage}"
    run(command(world, name, s, 1) + ["--stop-after-steps", "3"])
    run(command(world, name, {**s, "resume_from_checkpoint": "auto"}, 1))
    rest, rest_w = finished(world, name, 1)
    assert rest == whole[3:]
    for n in whole_w:
        assert torch.equal(rest_w[n], whole_w[n]), n


@pytest.mark.parametrize("stage", ["stage1", "lora"])
@pytest.mark.parametrize("ranks", RANKS)
def test_stop_in_the_middle_of_accumulation_then_resume_is_bitwise(world, stage, ranks):
    """Killed after 5 backward passes (accumulation 2: inside step 3's window, one step after the save at
    step 2), resumed from checkpoint-2: the half-done window is redone and the run ends bitwise equal, its
    log lines too (logging_steps 3: the checkpoint lies inside the first line's steps)."""
    s = {**({"tune_mm_mlp_adapter": True} if stage == "stage1" else LORA), "save_strategy": "steps", "save_steps": 2,
         "logging_steps": 3}
    run(command(world, f"mid_whole_{stage}_{ranks}", s, ranks))
    whole, whole_w = finished(world, f"mid_whole_{stage}_{ranks}", ranks)
    name = f"mid_run_{stage}_{ranks}"
    proc = run(command(world, name, s, ranks) + ["--stop-after-micro-batches", "5"])
    assert "'loss'" not in proc.stdout and sorted(p.name for p in (world["root"] / name).iterdir()) == ["checkpoint-2"]
    second = run(command(world, name, {**s, "resume_from_checkpoint": "auto"}, ranks))
    rest, rest_w = finished(world, name, ranks)
    assert rest == whole[2:]
    for n in whole_w:
        assert torch.equal(rest_w[n], whole_w[n]), n
    log_history = [json.loads((world["root"] / run_name / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
                   for run_name in (f"mid_whole_{stage}_{ranks}", name)]
    losses = [m["loss"] for m in whole]
    assert [e["step"] for e in log_history[0]] == [3, 6]
    assert log_history[0][0]["loss"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-12)
    assert log_history[1] == log_history[0]
    lines = [l.split("]:", 1)[1] if l.startswith("[rank") else l for l in second.stdout.splitlines()]  # llava-run's prefix
    assert [l for l in lines if l.startswith("{'loss'")][0].startswith(
        f"{{'loss': {log_history[0][0]['loss']!r},")  # the resumed run's first line: the mean of steps 1-3
    print(f"{stage}, {ranks} rank(s): stopped inside step 3's window, resumed at checkpoint-2: bitwise equal, "
          f"log_history too ({[round(e['loss'], 6) for e in log_history[0]]})")


KILL_CASES = [("stage1", 1), ("lora", 1), ("lora", 2)]


@pytest.mark.parametrize("stage,ranks", KILL_CASES)
def test_kills_at_random_moments_then_resume_is_bitwise(world, stage, ranks):
    """At least 10 SIGKILLs or SIGTERMs at random moments (some land inside a save: save_steps 1; some in
    the middle of an accumulation window), each followed by a resume from the newest complete checkpoint;
    the finished run equals an uninterrupted one bit for bit. With 2 ranks the signal goes to one random
    worker (a rank failure: llava-run stops the other and exits non-zero) or to llava-run itself."""
    steps = 200  # enough that 10 kills land before the run ends, on a fast machine too
    s = {**({"tune_mm_mlp_adapter": True} if stage == "stage1" else LORA), "max_steps": steps,
         "save_strategy": "steps", "save_steps": 1, "save_total_limit": 2, "resume_from_checkpoint": "auto"}
    run(command(world, f"kill_whole_{stage}_{ranks}", s, ranks))
    _, whole_w = finished(world, f"kill_whole_{stage}_{ranks}", ranks)
    name = f"kill_run_{stage}_{ranks}"
    out_dir = world["root"] / name
    rng = random.Random(1234 + ranks)
    kills = 0
    for attempt in range(60):
        log = world["root"] / f"{name}.{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command(world, name, s, ranks), stdout=out, stderr=subprocess.STDOUT)
            killed = False
            if kills < 10:
                # Kill during the first steps and saves of this attempt, whatever the machine's speed.
                wait_for(proc, log, "training:", count=rng.randint(1, 3))
                time.sleep(rng.uniform(0.0, 0.1))
                if proc.poll() is None:
                    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                    target = rng.choice([proc.pid, *worker_pids(proc)]) if ranks > 1 else proc.pid
                    try:
                        os.kill(target, sig)
                        kills += 1
                        killed = True
                    except ProcessLookupError:
                        pass
            if killed:
                started = time.time()
                code = proc.wait(timeout=120)
                assert time.time() - started < 60, "the surviving rank did not stop in time"
            else:  # the attempt that runs to the end: up to `steps` steps, each with a save (a hang still fails)
                code = proc.wait(timeout=900)
        text = log.read_text()
        if ranks == 1:
            assert code in (0, -signal.SIGKILL, -signal.SIGTERM) and "error:" not in text, text  # killed, not failed
        else:  # a dead rank ends the run non-zero, with the launcher naming it (a peer may report it too)
            assert (code in (0, -signal.SIGKILL) or "llava-run: worker rank" in text
                    or "llava-run: interrupted by" in text), text  # -9: llava-run itself was killed
        assert not list(out_dir.glob("checkpoint-*/*.partial"))
        if code == 0:
            break
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    _, got = finished(world, name, ranks)
    for n in whole_w:
        assert torch.equal(got[n], whole_w[n]), n
    final = json.loads((out_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert final["global_step"] == steps
    print(f"{stage}, {ranks} rank(s): {kills} SIGKILL/SIGTERMs over {attempt + 1} runs; finished at step {steps} "
          "with weights bitwise equal to an uninterrupted run")
