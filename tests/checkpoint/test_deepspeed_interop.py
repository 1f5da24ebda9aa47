"""HF Trainer + PEFT + DeepSpeed checkpoints continued by `llava train` at any world size.

A LLaVA stage-2 LoRA run (projector trained beside the adapters, fp32, dropout 0) under HF Trainer + DeepSpeed
ZeRO-2 (and ZeRO-1) on 2 CPU ranks over Gloo, saving checkpoint-K (DeepSpeed's global_stepK/ layout: no
optimizer.pt, no projector file), is continued by our trainer with 2, 1 and 3 ranks:
- its losses for steps K+1..M are DeepSpeed's own (the same 2-rank run, uninterrupted: DeepSpeed's resume at
  the same world size is bit-identical) within 1e-5 relative;
- the optimizer state it carries over (our optimizer.pt written right at step K) is DeepSpeed's fp32
  partitions and Adam moments mapped back to parameters here in Python (1e-6).
With LoRA dropout 0.1 our 2-rank continuation draws DeepSpeed's masks (each rank's generator from HF's
rng_state_R.pth; losses within 1e-5). bf16 (bf16_zero_pp_rank_R files): fp32 masters and moments carry over
bit for bit, losses follow within 1e-3 (bf16 forwards round differently).
The other way: with `deepspeed:` in our YAML our 2-rank checkpoint-K carries DeepSpeed's layout, and HF Trainer
+ DeepSpeed on 2 ranks continues it with our uninterrupted run's losses (1e-5), reporting no missing state: LoRA
(fp32 and bf16), stage 1 and a full fine-tune (DeepSpeed loads their `module` strictly).
Broken DeepSpeed files (a pickle naming another global, a truncated partition, a missing rank file, partitions
that contradict param_shapes, a truncated file) end with one error line naming the file, nothing written.

HF sees our batches: `llava preprocess` writes every global batch of our order (one rank, per-device batch =
the global batch); HF's sequential sampler deals consecutive per-device batches to the ranks in turn, so each
step takes the same rows as ours, at any world size here."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_llava
from llava_oracle import assert_clear_error, binary, run
from train_fixtures import make_train_world

HERE = Path(__file__).parent
SAMPLES = 12
GLOBAL_BATCH = 6           # 2 ranks x 3; 1 rank: 3 x accumulation 2; 3 ranks: 2
EPOCHS = 3                 # rows HF gets: enough that its sampler never wraps
K, M = 2, 5                # DeepSpeed saves checkpoint-K; both continue to M (crossing our epoch boundary)
LORA = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8}
RECIPE = {"seed": 11, "logging_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "cosine",
          "warmup_steps": 1, "weight_decay": 0.1, "max_grad_norm": 1.0}
PER_RANK = {1: {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2},
            2: {"per_device_train_batch_size": 3}, 3: {"per_device_train_batch_size": 2}}


def torchrun():
    return str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    model, base = make_train_world(root, SAMPLES)
    w = {"root": root, "model": model, "base": {**base, **RECIPE, **LORA}}
    w["rows"] = global_rows(w)
    return w


def write_config(world, name, settings):
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**world["base"], "output_dir": str(world["root"] / name), **settings}))
    return path


def batch_rows(world, cfg, epoch, ranks, rank):
    """The micro-batches `llava preprocess` writes for `rank` of `ranks` in `epoch`, each as a list of rows."""
    f = world["root"] / f"batches{epoch}_{rank}of{ranks}.safetensors"
    run([binary(), "preprocess", cfg, "--out", f, "--limit", 1000, "--epoch", epoch, "--world", ranks, "--rank", rank])
    t = load_file(str(f))
    image_token = world["model"].config.image_token_index
    batches = []
    for i in range(len({k.split(".")[0] for k in t})):
        b = {k: t[f"batch{i}.{k}"] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
        rows, image = [], 0
        for r in range(b["input_ids"].shape[0]):
            n = int(bool((b["input_ids"][r] == image_token).any()))
            rows.append({"input_ids": b["input_ids"][r], "labels": b["labels"][r],
                         "attention_mask": b["attention_mask"][r], "pixel_values": b["pixel_values"][image:image + n]})
            image += n
        batches.append(rows)
    return batches


def global_rows(world, ranks=1):
    """Our global batches of EPOCHS epochs as rows, torch.saved for HF. ranks=1: each global batch padded to
    one length; ranks=2: each rank's part padded as our 2-rank run pads it (LoRA dropout masks then have our
    shapes), rank 0's rows before rank 1's."""
    cfg = write_config(world, "data", {"per_device_train_batch_size": GLOBAL_BATCH // ranks})
    rows = []
    for epoch in range(EPOCHS):
        by_rank = [batch_rows(world, cfg, epoch, ranks, r) for r in range(ranks)]
        for step in zip(*by_rank):
            for part in step:
                rows += part
    assert len(rows) == EPOCHS * SAMPLES
    path = world["root"] / f"rows_{ranks}r.pt"
    torch.save(rows, path)
    return path


def deepspeed_run(world, name, zero_stage, max_steps, save_steps, bf16=False, ranks=2, dropout=0.0, rows=None,
                  stage1=False, resume=None, full=False):
    """HF Trainer + PEFT + DeepSpeed on `ranks` CPU ranks; returns (output dir, rank 0's log)."""
    out = world["root"] / name
    spec = {"model_dir": world["base"]["model_name_or_path"], "rows": str(rows or world["rows"]), "output_dir": str(out),
            "batch": GLOBAL_BATCH // ranks, "max_steps": max_steps, "save_steps": save_steps, "zero_stage": zero_stage,
            "bf16": bf16, "full": full, "lora": None if stage1 or full else {"r": LORA["lora_r"], "alpha": LORA["lora_alpha"], "dropout": dropout},
            "recipe": RECIPE, "resume": str(resume) if resume else None, "no_save": resume is not None, "log": str(world["root"] / f"{name}.log.json")}
    spec_file = world["root"] / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = run([torchrun(), "--standalone", "--nproc_per_node", ranks, HERE / "deepspeed_run.py", spec_file], env=env)
    log = json.loads(Path(spec["log"]).read_text())
    log["output"] = proc.stdout + proc.stderr
    return out, log


@pytest.fixture(scope="module")
def zero2(world):
    return deepspeed_run(world, "ds_zero2", 2, M, K)


def train(world, name, ranks, settings, check=True):
    """`llava train` on `ranks` processes (llava-run for more than one); returns (process, metrics or None)."""
    metrics = world["root"] / f"{name}.metrics.json"
    cmd = [binary(), "train", write_config(world, name, {**PER_RANK[ranks], **settings}), "--metrics-out", metrics]
    if ranks > 1:
        cmd = [binary("LLAVA_RUN"), "--standalone", f"--nproc_per_node={ranks}", *cmd]
    proc = run(cmd, check=check, env={**os.environ, "OMP_NUM_THREADS": "1", "LLAVA_DIST_TIMEOUT": "120"})
    return proc, (json.loads(metrics.read_text()) if proc.returncode == 0 else None)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def deepspeed_state(ckpt):
    """DeepSpeed's fp32 partitions and Adam moments put back per parameter here (the test's own mapping):
    {PEFT name: (master, exp_avg, exp_avg_sq, step, group)}."""
    tag = ckpt / (ckpt / "latest").read_text().strip()
    shapes = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
    files = sorted(tag.glob("*zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("rank_")[1].split("_")[0]))
    ranks = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    out = {}
    for g, group in enumerate(shapes):
        flat = {k: torch.cat([r["base_optimizer_state"]["state"][g][k] for r in ranks]) for k in ("exp_avg", "exp_avg_sq")}
        flat["master"] = torch.cat([r["single_partition_of_fp32_groups"][g] for r in ranks])
        step = int(ranks[0]["base_optimizer_state"]["state"][g]["step"])
        offset = 0
        for name, shape in group.items():  # torch.Size in DeepSpeed's files, a tuple in ours
            shape = torch.Size(shape)
            n = shape.numel()
            out[name] = tuple(flat[k][offset:offset + n].view(shape) for k in ("master", "exp_avg", "exp_avg_sq")) + (step, g)
            offset += n
    return out


def canonical(peft_name):
    n = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default.", ".")
    return tiny_llava.canonical_name(n)


@pytest.fixture(scope="module")
def zero_stage(request):  # parametrized by each test (indirect)
    return request.param


@pytest.fixture(scope="module")
def deepspeed(world, zero_stage):
    """DeepSpeed's 2-rank run to M, saving checkpoint-K (and on): the checkpoint and DeepSpeed's own losses."""
    out, log = deepspeed_run(world, f"ds_zero{zero_stage}", zero_stage, M, K)
    assert [s["step"] for s in log["steps"]] == list(range(1, M + 1))
    return out / f"checkpoint-{K}", log


# ZeRO-1's files differ from ZeRO-2's only in zero_stage: one world size for it.
@pytest.mark.parametrize("zero_stage, ranks", [(2, 2), (2, 1), (2, 3), (1, 3)], indirect=["zero_stage"])
def test_we_continue_a_deepspeed_checkpoint_at_any_world_size(world, zero_stage, deepspeed, ranks):
    ckpt, log = deepspeed
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "non_lora_trainables.bin").exists()
    name = f"from_ds{zero_stage}_{ranks}r"
    proc, metrics = train(world, name, ranks, {"max_steps": M, "save_steps": 100, "resume_from_checkpoint": str(ckpt)})
    assert f"resuming from {ckpt} at step {K}" in proc.stdout
    ours = metrics["steps"]
    assert [s["step"] for s in ours] == list(range(K + 1, M + 1))
    print(f"\nZeRO-{zero_stage} checkpoint-{K} of 2 DeepSpeed ranks continued by us on {ranks}: step, loss ours/DeepSpeed")
    worst = 0.0
    for o, d in zip(ours, log["steps"][K:]):
        print(f"  {o['step']}: {o['loss']:.9g}/{d['loss']:.9g}  lr {o['learning_rate']:.6g}/{d['learning_rate']:.6g}")
        worst = max(worst, rel(o["loss"], d["loss"]))
        assert rel(o["learning_rate"], d["learning_rate"]) <= 1e-9
    print(f"  worst relative loss difference {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("zero_stage", [2, 1], indirect=True)
def test_moments_and_weights_carry_over(world, zero_stage, deepspeed):
    """Resumed and saved at once (max_steps = K): our optimizer.pt and trained tensors are DeepSpeed's."""
    ckpt, _ = deepspeed
    name = f"carry_ds{zero_stage}"
    train(world, name, 3, {"max_steps": K, "save_steps": 100, "resume_from_checkpoint": str(ckpt), "zero_stage": 2})
    ours = world["root"] / name / f"checkpoint-{K}"
    ds = deepspeed_state(ckpt)
    trainable = [canonical(n) for n in ds]
    state = torch.load(ours / "optimizer.pt", weights_only=True)
    ids = [i for g in state["param_groups"] for i in g["params"]]
    assert len(ids) == len(ds)
    weights = {canonical(n): t for n, t in load_file(str(ours / "adapter_model.safetensors")).items()}
    weights.update({canonical(n): t for n, t in torch.load(ours / "non_lora_trainables.bin", weights_only=True).items()})
    # Our optimizer.pt lists the parameters group by group in named_parameters() order, as HF's do.
    order = [n for g in range(2) for n, v in ds.items() if v[4] == g]
    worst = 0.0
    for i, name in zip(ids, order):
        master, exp_avg, exp_avg_sq, step, _ = ds[name]
        s = state["state"][i]
        assert int(s["step"]) == step == K
        for got, want in ((s["exp_avg"], exp_avg), (s["exp_avg_sq"], exp_avg_sq), (weights[canonical(name)], master)):
            assert got.shape == want.shape, name
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item())
    print(f"\nZeRO-{zero_stage}: {len(ds)} tensors, moments and weights vs DeepSpeed's partitions: worst {worst:.2e}")
    assert sorted(weights) == sorted(trainable)
    assert worst <= 1e-6


def test_lora_dropout_masks_continue_from_hf_rng_state(world):
    """LoRA dropout 0.1: each rank's torch generator comes back from HF's rng_state_R.pth, so our 2-rank
    continuation draws DeepSpeed's dropout masks (losses within 1e-5 of its own continuation)."""
    out, log = deepspeed_run(world, "ds_dropout", 2, M, K, dropout=0.1, rows=global_rows(world, ranks=2))
    ckpt = out / f"checkpoint-{K}"
    assert {f"rng_state_{r}.pth" for r in range(2)} <= {p.name for p in ckpt.iterdir()}
    _, metrics = train(world, "from_ds_dropout", 2, {"max_steps": M, "save_steps": 100, "lora_dropout": 0.1,
                                                     "resume_from_checkpoint": str(ckpt)})
    print("\nLoRA dropout 0.1, continued by us on 2 ranks: step, loss ours/DeepSpeed")
    for o, d in zip(metrics["steps"], log["steps"][K:]):
        print(f"  {o['step']}: {o['loss']:.9g}/{d['loss']:.9g}")
    assert [o["step"] for o in metrics["steps"]] == list(range(K + 1, M + 1))
    assert max(rel(o["loss"], d["loss"]) for o, d in zip(metrics["steps"], log["steps"][K:])) <= 1e-5


def test_bf16_deepspeed_checkpoint(world):
    """bf16 (DeepSpeed's bf16_zero_pp_rank_R files, fp32 masters): our 2-rank bf16 continuation follows
    DeepSpeed's within bf16 rounding, and the fp32 masters and moments carry over exactly."""
    out, log = deepspeed_run(world, "ds_bf16", 2, M, K, bf16=True)
    ckpt = out / f"checkpoint-{K}"
    assert sorted(p.name for p in (ckpt / f"global_step{K}").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    _, metrics = train(world, "from_ds_bf16", 2, {"max_steps": M, "save_steps": 100, "bf16": True,
                                                  "resume_from_checkpoint": str(ckpt)})
    print("\nbf16 ZeRO-2 checkpoint continued by us on 2 ranks: step, loss ours/DeepSpeed")
    for o, d in zip(metrics["steps"], log["steps"][K:]):
        print(f"  {o['step']}: {o['loss']:.9g}/{d['loss']:.9g}")
    worst = max(rel(o["loss"], d["loss"]) for o, d in zip(metrics["steps"], log["steps"][K:]))
    print(f"  worst relative loss difference {worst:.2e} (bf16 forward passes round differently)")
    assert [o["step"] for o in metrics["steps"]] == list(range(K + 1, M + 1))
    assert worst <= 1e-3

    # Resumed and saved at once: our fp32 masters (llava_master_weights) and moments are DeepSpeed's.
    train(world, "carry_bf16", 3, {"max_steps": K, "save_steps": 100, "bf16": True, "resume_from_checkpoint": str(ckpt)})
    ours = world["root"] / "carry_bf16" / f"checkpoint-{K}"
    ds = deepspeed_state(ckpt)
    masters = load_file(str(ours / "llava_master_weights.safetensors"))
    state = torch.load(ours / "optimizer.pt", weights_only=True)
    ids = [i for g in state["param_groups"] for i in g["params"]]
    order = [n for g in range(2) for n, v in ds.items() if v[4] == g]
    assert len(ids) == len(order) == len(masters)
    for i, name in zip(ids, order):
        master, exp_avg, exp_avg_sq, step, _ = ds[name]
        assert torch.equal(masters[canonical(name)].view(master.shape), master), name
        assert torch.equal(state["state"][i]["exp_avg"], exp_avg) and torch.equal(state["state"][i]["exp_avg_sq"], exp_avg_sq)
        assert int(state["state"][i]["step"]) == step


def test_stage1_projector_only_deepspeed_checkpoint(world):
    """Stage 1 (the projector alone, no PEFT: plain parameter names), ZeRO-2 on 2 ranks, continued by us on 1."""
    out, log = deepspeed_run(world, "ds_stage1", 2, M, K, stage1=True)
    assert len(log["trainable"]) == 4 and all("multi_modal_projector" in n for n in log["trainable"])
    ckpt = out / f"checkpoint-{K}"
    _, metrics = train(world, "from_ds_stage1", 1, {"max_steps": M, "save_steps": 100, "lora_enable": False,
                                                    "tune_mm_mlp_adapter": True, "resume_from_checkpoint": str(ckpt)})
    print("\nstage 1 ZeRO-2 checkpoint continued by us on 1 rank: step, loss ours/DeepSpeed")
    for o, d in zip(metrics["steps"], log["steps"][K:]):
        print(f"  {o['step']}: {o['loss']:.9g}/{d['loss']:.9g}")
    assert [o["step"] for o in metrics["steps"]] == list(range(K + 1, M + 1))
    assert max(rel(o["loss"], d["loss"]) for o, d in zip(metrics["steps"], log["steps"][K:])) <= 1e-5


OUR_RUNS = {  # what our checkpoint trains: (our YAML settings, deepspeed_run's flags, our own weights file)
    "lora": ({}, {}, "non_lora_trainables.bin"),
    "stage1": ({"lora_enable": False, "tune_mm_mlp_adapter": True}, {"stage1": True}, "mm_projector.bin"),
    "full": ({"lora_enable": False}, {"full": True}, "model.safetensors"),
}


@pytest.mark.parametrize("kind, bf16", [("lora", False), ("lora", True), ("stage1", False), ("full", False)],
                         ids=["lora-fp32", "lora-bf16", "stage1", "full"])
def test_hf_trainer_deepspeed_continues_our_checkpoint(world, kind, bf16):
    """`deepspeed: ds.json` in our YAML: our 2-rank ZeRO-2 checkpoint-K also carries DeepSpeed's layout, and
    HF Trainer + DeepSpeed on 2 ranks continues it: its losses for K+1..M are our uninterrupted run's (fp32:
    1e-5; bf16: 1e-3, bf16 forwards round differently), and neither it nor DeepSpeed reports missing state.
    LoRA (PEFT: `module` holds the trained tensors), stage 1 (the projector alone) and a full fine-tune (no
    PEFT: DeepSpeed loads `module` strictly, so it holds every parameter, frozen ones too, by the HF model's
    names)."""
    settings, ds_flags, weights_file = OUR_RUNS[kind]
    name = f"ours_ds_{kind}" + ("_bf16" if bf16 else "")
    ds_config = world["root"] / f"{name}.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                     "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                     **({"bf16": {"enabled": "auto"}} if bf16 else {})}))
    _, metrics = train(world, name, 2, {"max_steps": M, "save_steps": K, "deepspeed": str(ds_config), "bf16": bf16,
                                        **settings})
    ckpt = world["root"] / name / f"checkpoint-{K}"
    assert (ckpt / "latest").read_text() == f"global_step{K}"
    assert sorted(p.name for p in (ckpt / f"global_step{K}").glob("*optim_states.pt")) == [
        f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert {"optimizer.pt", weights_file} <= {p.name for p in ckpt.iterdir()}  # ours as before
    module = torch.load(ckpt / f"global_step{K}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    if kind != "lora":  # every tensor of the HF model's state_dict(), as named there, with its shape
        hf_state = world["model"].state_dict()
        assert sorted(module) == sorted(hf_state)
        assert all(module[n].shape == hf_state[n].shape for n in module)
    # What DeepSpeed reads is what we trained: the Python mapping of the layout equals our optimizer.pt.
    ds = deepspeed_state(ckpt)
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    order = [n for g in range(2) for n, v in ds.items() if v[4] == g]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    for i, n in zip(ids, order):
        assert torch.equal(state["state"][i]["exp_avg"], ds[n][1]) and int(state["state"][i]["step"]) == ds[n][3], n

    resume_dir = world["root"] / f"hf_from_{name}"
    resume_dir.mkdir()
    shutil.copytree(ckpt, resume_dir / f"checkpoint-{K}")
    _, log = deepspeed_run(world, f"hf_from_{name}", 2, M, 100, bf16=bf16, resume=resume_dir / f"checkpoint-{K}",
                           **ds_flags)
    hf = [s for s in log["steps"] if s["step"] > K]
    print(f"\nHF Trainer + DeepSpeed (2 ranks, {kind}, {'bf16' if bf16 else 'fp32'}) continued our checkpoint-{K}: "
          "step, loss HF/ours")
    for h, o in zip(hf, metrics["steps"][K:]):
        print(f"  {h['step']}: {h['loss']:.9g}/{o['loss']:.9g}")
    suspicious = [l for l in log["output"].splitlines()
                  if re.search(r"missing|didn't find|not found|could not|mismatch|unexpected key", l, re.I)]
    print(f"  lines about missing state: {suspicious}")
    assert [h["step"] for h in hf] == list(range(K + 1, M + 1))
    assert max(rel(h["loss"], o["loss"]) for h, o in zip(hf, metrics["steps"][K:])) <= (1e-3 if bf16 else 1e-5)
    assert not suspicious


# --- Broken DeepSpeed files ------------------------------------------------------------------------------------

RANK1 = "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL_STATES = "global_step2/mp_rank_00_model_states.pt"


def rename_global(ckpt):
    """LossScaler -> LossScalex in rank 1's pickle (same length, so the archive stays readable)."""
    path = ckpt / RANK1
    data = path.read_bytes()
    assert data.count(b"loss_scaler\nLossScaler\n") == 1
    path.write_bytes(data.replace(b"loss_scaler\nLossScaler\n", b"loss_scaler\nLossScalex\n"))


def truncate_partition(ckpt):
    """Rank 1's fp32 partition and moments of group 0 lose their last element."""
    state = torch.load(ckpt / RANK1, weights_only=False)
    osd = state["optimizer_state_dict"]
    osd["single_partition_of_fp32_groups"][0] = osd["single_partition_of_fp32_groups"][0][:-1].clone()
    for k in ("exp_avg", "exp_avg_sq"):
        osd["base_optimizer_state"]["state"][0][k] = osd["base_optimizer_state"]["state"][0][k][:-1].clone()
    torch.save(state, ckpt / RANK1)


def contradict_param_shapes(ckpt):
    """param_shapes says the first tensor of group 0 is one column narrower than the partitions hold."""
    state = torch.load(ckpt / MODEL_STATES, weights_only=False)
    first = next(iter(state["param_shapes"][0]))
    rows, cols = state["param_shapes"][0][first]
    state["param_shapes"][0][first] = torch.Size([rows, cols - 1])
    torch.save(state, ckpt / MODEL_STATES)


def move_slice_mapping(ckpt):
    """Rank 1's param_slice_mappings place its first tensor one element later than param_shapes do."""
    state = torch.load(ckpt / RANK1, weights_only=False)
    mappings = state["optimizer_state_dict"]["param_slice_mappings"][0]
    first = next(iter(mappings))
    mappings[first] = type(mappings[first])(numel=mappings[first].numel, start=mappings[first].start + 1)
    torch.save(state, ckpt / RANK1)


def zero_stage_3(ckpt):
    """Rank 1's file claims ZeRO-3 (whose files partition every parameter on its own: another layout)."""
    state = torch.load(ckpt / RANK1, weights_only=False)
    osd = state["optimizer_state_dict"]
    osd["zero_stage"] = type(osd["zero_stage"])(3)
    torch.save(state, ckpt / RANK1)


def truncate_file(name):
    def corrupt(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:len(data) // 2])
    return corrupt


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("zero_stage", [2], indirect=True)
@pytest.mark.parametrize("corrupt, needles", [
    (rename_global, [RANK1, "forbidden global 'deepspeed.runtime.fp16.loss_scaler.LossScalex'"]),
    (truncate_partition, [RANK1, "group 0: the fp32 partition has"]),
    (lambda ckpt: (ckpt / RANK1).unlink(), [RANK1, "missing", "2 ranks"]),
    (contradict_param_shapes, ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "do not hold", MODEL_STATES]),
    (truncate_file(RANK1), [RANK1, "not a readable torch.save archive"]),
    (move_slice_mapping, [RANK1, "param_slice_mappings[0]", "param_shapes and the partition size put it at"]),
    (zero_stage_3, [RANK1, "zero_stage: expected 1 or 2", "got 3"]),
], ids=["other-global", "truncated-partition", "missing-rank-file", "contradicts-param-shapes", "truncated-file",
        "moved-slice-mapping", "zero-stage-3"])
def test_broken_deepspeed_checkpoint_is_a_clear_error_and_changes_nothing(world, zero_stage, deepspeed, corrupt,
                                                                          needles, request):
    name = "bad_" + re.sub(r"\W", "_", request.node.callspec.id)
    out = world["root"] / name
    ckpt = out / f"checkpoint-{K}"
    shutil.copytree(deepspeed[0], ckpt)
    corrupt(ckpt)
    before = snapshot(out)
    proc, _ = train(world, name, 1, {"max_steps": M, "save_steps": 1, "resume_from_checkpoint": str(ckpt)}, check=False)
    print(f"\n  {request.node.callspec.id}: {proc.stderr.strip()}")
    assert_clear_error(proc, *needles)
    assert snapshot(out) == before
