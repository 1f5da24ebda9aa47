"""Resuming from a checkpoint whose numbers or files are wrong (review s8, defects 6, 10, 17, 20, 27), by class:
- optimizer state of any format (optimizer.pt, DeepSpeed's optim files, our zero_shards/ and master weights):
  a step that is no whole number in [1, global_step], non-finite moments, a negative exp_avg_sq, non-finite
  fp32 masters; non-finite trained weights (adapter, projector, full model);
- trainer_state.json's global_step against the folder name and llava_resume.json's sampler position;
  llava_resume.json's sampler / format out of range;
- generator states libtorch refuses (ours and HF's);
each one error line naming the file and the tensor / key, exit 1, and nothing written to output_dir. And
`resume_from_checkpoint: auto` past an incomplete newest checkpoint (an interrupted copy) or a stray entry it
cannot stat: one warning naming the folder and the missing file, then the newest complete one."""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llava_oracle import assert_clear_error, binary, run
from train_fixtures import make_train_world

TIMEOUT = 120
ZERO2 = Path(__file__).resolve().parents[2] / "configs" / "zero2.json"
LORA = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8}
# Names this tiny model's optimizer / files give the first trained tensor of each run (state id 0).
LORA_FIRST = "model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
STATE_0 = "model.multi_modal_projector.linear_1.weight"  # optimizer.pt's state[0]: the first group's first


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("poisoned")
    _, base = make_train_world(root, samples=8)
    base.update({"per_device_train_batch_size": 2, "max_steps": 3, "save_steps": 1, "learning_rate": 1e-3,
                 "seed": 0})
    runs = {}
    for kind, settings in {"lora": LORA, "projector": {"tune_mm_mlp_adapter": True}, "full": {},
                           "lora_bf16": {**LORA, "bf16": True}, "lora_ds": {**LORA, "deepspeed": str(ZERO2)}}.items():
        out = root / ("src_" + kind)
        cfg = {**base, **settings, "output_dir": str(out)}
        (root / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        run([binary(), "train", root / f"{kind}.yaml"], timeout=TIMEOUT)
        runs[kind] = (cfg, out)
    # bf16 on 2 ranks under ZeRO-2: zero_shards/ with the fp32 masters (no optimizer.pt, as past
    # consolidate_optimizer_max_size 0); resumed here by one rank taking 2 samples per step (the same global batch).
    out = root / "src_zero"
    cfg = {**base, **LORA, "bf16": True, "zero_stage": 2, "consolidate_optimizer_max_size": 0,
           "per_device_train_batch_size": 1, "output_dir": str(out)}
    (root / "zero.yaml").write_text(yaml.safe_dump(cfg))
    run([binary("LLAVA_RUN"), "--standalone", "--nproc_per_node=2", binary(), "train", root / "zero.yaml"],
        timeout=TIMEOUT)
    runs["zero"] = ({**cfg, "per_device_train_batch_size": 2}, out)
    # HF Trainer + DeepSpeed's own layout: no optimizer.pt beside global_step3/.
    (runs["lora_ds"][1] / "checkpoint-3" / "optimizer.pt").unlink()
    return {"root": root, "runs": runs, "n": [0]}


def tree(d):
    """Every file under d with its size and hash: what 'nothing was written' compares."""
    out = {}
    for dirpath, dirnames, files in os.walk(d):
        for name in dirnames + files:
            p = Path(dirpath) / name
            if p.is_symlink() or p.is_dir():
                out[str(p.relative_to(d))] = "dir-or-link"
            else:
                out[str(p.relative_to(d))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def case(world, kind):
    """A copy of run `kind`'s output dir and a config resuming from it (auto) up to step 5."""
    world["n"][0] += 1
    d = world["root"] / f"case{world['n'][0]}_{kind}"
    cfg, src = world["runs"][kind]
    shutil.copytree(src, d / "out", symlinks=True)
    path = d / "train.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(d / "out"), "max_steps": 5,
                                    "resume_from_checkpoint": "auto"}))
    return d / "out", d / "out" / "checkpoint-3", path


def refused(out, cfg, expected_line):
    """The resume ends with exit 1, exactly `expected_line` on stderr, and output_dir as it was."""
    before = tree(out)
    proc = run([binary(), "train", cfg], check=False, timeout=TIMEOUT)
    assert_clear_error(proc)
    assert proc.stderr.strip() == expected_line
    assert tree(out) == before, "the refused resume wrote into output_dir"


def edit_pt(path, fn):
    obj = torch.load(path, weights_only=False)
    fn(obj)
    torch.save(obj, path)


def edit_safetensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata=_metadata(path))


def _metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def edit_json(path, fn):
    j = json.loads(Path(path).read_text())
    fn(j)
    Path(path).write_text(json.dumps(j))


NOTHING = "; nothing was changed"


# ------------------------------------------------------------------ 6: optimizer state, any file format

def step_text(v):
    return {-5.0: "-5", math.nan: "nan", 1e30: "1e+30", 2.5: "2.5", 0.0: "0"}.get(v, repr(v))


@pytest.mark.parametrize("value", [-5.0, float("nan"), 1e30, 2.5, 0.0])
def test_optimizer_pt_step_not_a_whole_number_from_1(world, value):
    out, ck, cfg = case(world, "lora")
    f = ck / "optimizer.pt"
    edit_pt(f, lambda o: o["state"][0].__setitem__("step", torch.tensor(value)))
    text = "nan" if math.isnan(value) else step_text(value)
    refused(out, cfg, f"error: {f}: \"step\" of state[0] of '{STATE_0}' is {text}: expected a whole number "
                      f"of updates from 1 to 9007199254740992{NOTHING}")


def test_optimizer_pt_step_beyond_global_step(world):
    out, ck, cfg = case(world, "lora")
    f = ck / "optimizer.pt"
    edit_pt(f, lambda o: o["state"][0].__setitem__("step", torch.tensor(7.0)))
    refused(out, cfg, f"error: {f}: the Adam step of '{STATE_0}' is 7 updates, more than global_step 3 in "
                      f"{ck / 'trainer_state.json'}{NOTHING}")


@pytest.mark.parametrize("moment,value,fault", [
    ("exp_avg_sq", -1.0, "holds negative values (it is a mean of squares)"),
    ("exp_avg_sq", float("nan"), "holds non-finite values (NaN or Inf)"),
    ("exp_avg", float("inf"), "holds non-finite values (NaN or Inf)"),
])
def test_optimizer_pt_bad_moments(world, moment, value, fault):
    out, ck, cfg = case(world, "lora")
    f = ck / "optimizer.pt"

    def poison(o):
        o["state"][0][moment].view(-1)[1] = value
    edit_pt(f, poison)
    refused(out, cfg, f"error: {f}: {moment} of state[0] of '{STATE_0}' {fault}{NOTHING}")


def ds_optim_file(ck):
    return ck / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def ds_edit(ck, fn):
    f = ds_optim_file(ck)
    edit_pt(f, lambda o: fn(o["optimizer_state_dict"]))
    return f


def test_deepspeed_step_nan(world):
    out, ck, cfg = case(world, "lora_ds")
    f = ds_edit(ck, lambda s: s["base_optimizer_state"]["state"][0].__setitem__("step", torch.tensor(float("nan"))))
    refused(out, cfg, f"error: {f}: base_optimizer_state.state[0].step is nan: expected a whole number of updates "
                      f"from 1 to 9007199254740992{NOTHING}")


def test_deepspeed_step_beyond_global_step(world):
    out, ck, cfg = case(world, "lora_ds")
    f = ds_edit(ck, lambda s: s["base_optimizer_state"]["state"][0].__setitem__("step", torch.tensor(4.0)))
    refused(out, cfg, f"error: {f}: the Adam step of '{STATE_0}' is 4 updates, more than global_step 3 in "
                      f"{ck / 'trainer_state.json'}{NOTHING}")


def test_deepspeed_negative_exp_avg_sq(world):
    out, ck, cfg = case(world, "lora_ds")
    f = ds_edit(ck, lambda s: s["base_optimizer_state"]["state"][0]["exp_avg_sq"].__setitem__(0, -3.0))
    refused(out, cfg, f"error: {f}: exp_avg_sq of base_optimizer_state.state[0] holds negative values "
                      f"(it is a mean of squares){NOTHING}")


def test_deepspeed_fp32_partition_nan(world):
    out, ck, cfg = case(world, "lora_ds")
    f = ds_edit(ck, lambda s: s["single_partition_of_fp32_groups"][0].__setitem__(2, float("nan")))
    refused(out, cfg, f"error: {f}: single_partition_of_fp32_groups[0] holds non-finite values (NaN or Inf)"
                      f"{NOTHING}")


def zero_shard(ck):
    return ck / "zero_shards" / "rank_0_of_2.safetensors"


def zero_key(f, prefix):
    return next(k for k in sorted(load_file(str(f))) if k.startswith(prefix))


def test_zero_shard_negative_exp_avg_sq(world):
    out, ck, cfg = case(world, "zero")
    f = zero_shard(ck)
    key = zero_key(f, "exp_avg_sq/")
    edit_safetensors(f, lambda t: t[key].view(-1).__setitem__(0, -1.0))
    refused(out, cfg, f"error: {f}: exp_avg_sq of '{key.split('/', 1)[1]}' holds negative values (it is a mean of "
                      f"squares){NOTHING}")


def test_zero_shard_master_nan(world):
    out, ck, cfg = case(world, "zero")
    f = zero_shard(ck)
    key = zero_key(f, "master/")
    edit_safetensors(f, lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    refused(out, cfg, f"error: {f}: '{key}' holds non-finite values (NaN or Inf){NOTHING}")


def test_zero_shard_step_beyond_global_step(world):
    out, ck, cfg = case(world, "zero")
    f = zero_shard(ck)
    meta = _metadata(f)
    ranges = json.loads(meta["ranges"])
    ranges[0]["step"] = 9
    tensors = load_file(str(f))
    save_file(tensors, str(f), metadata={**meta, "ranges": json.dumps(ranges)})
    refused(out, cfg, f"error: {ck / 'zero_shards'}: the Adam step of '{ranges[0]['name']}' is 9 updates, more than "
                      f"global_step 3 in {ck / 'trainer_state.json'}{NOTHING}")


def test_master_weights_inf(world):
    out, ck, cfg = case(world, "lora_bf16")
    f = ck / "llava_master_weights.safetensors"
    key = sorted(load_file(str(f)))[-1]
    edit_safetensors(f, lambda t: t[key].view(-1).__setitem__(0, float("-inf")))
    refused(out, cfg, f"error: {f}: '{key}' holds non-finite values (NaN or Inf){NOTHING}")


# ------------------------------------------------------------------ 6: trained weights must be finite

def nan_first(tensors, key=None):
    key = key or sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    return key


def test_adapter_weight_nan(world):
    out, ck, cfg = case(world, "lora")
    f = ck / "adapter_model.safetensors"
    edit_safetensors(f, lambda t: nan_first(t, next(k for k in sorted(t) if "layers.0.self_attn.q_proj.lora_A" in k)))
    refused(out, cfg, f"error: {f}: '{LORA_FIRST}' holds non-finite values (NaN or Inf){NOTHING}")


def test_lora_run_projector_nan(world):
    out, ck, cfg = case(world, "lora")
    f = ck / "non_lora_trainables.bin"
    edit_pt(f, lambda t: nan_first(t, next(k for k in t if k.endswith("linear_1.weight"))))
    refused(out, cfg, f"error: {f}: 'model.multi_modal_projector.linear_1.weight' holds non-finite values "
                      f"(NaN or Inf){NOTHING}")


def test_stage1_projector_inf(world):
    out, ck, cfg = case(world, "projector")
    f = ck / "mm_projector.bin"

    def poison(t):
        k = next(k for k in t if k.endswith("linear_2.bias"))
        t[k] = t[k].clone()
        t[k][0] = float("inf")
    edit_pt(f, poison)
    refused(out, cfg, f"error: {f}: 'model.multi_modal_projector.linear_2.bias' holds non-finite values "
                      f"(NaN or Inf){NOTHING}")


def test_full_model_weight_nan(world):
    out, ck, cfg = case(world, "full")
    f = ck / "model.safetensors"
    key = []
    edit_safetensors(f, lambda t: key.append(nan_first(t, next(k for k in sorted(t) if "embed_tokens" in k))))
    refused(out, cfg, f"error: {f}: '{key[0]}' holds non-finite values (NaN or Inf){NOTHING}")


# ------------------------------------------------------------------ 17, 20: the step, the sampler

@pytest.mark.parametrize("step", [1000, 2 ** 53, 2])
def test_global_step_contradicts_folder_name(world, step):
    out, ck, cfg = case(world, "lora")
    f = ck / "trainer_state.json"
    edit_json(f, lambda j: j.__setitem__("global_step", step))
    refused(out, cfg, f"error: {f}: global_step {step} contradicts the folder name checkpoint-3 (a checkpoint-N "
                      f"folder holds step N){NOTHING}")


def test_global_step_contradicts_sampler(world):
    """The folder renamed with it: llava_resume.json (2 steps of 2 samples into epoch 0... = step 3) disagrees."""
    out, ck, cfg = case(world, "lora")
    edit_json(ck / "trainer_state.json", lambda j: j.__setitem__("global_step", 1000))
    moved = out / "checkpoint-1000"
    ck.rename(moved)
    sampler = json.loads((moved / "llava_resume.json").read_text())["sampler"]
    spe_pos = sampler["position"]
    refused(out, cfg, f"error: {moved / 'trainer_state.json'}: global_step 1000 contradicts "
                      f"{moved / 'llava_resume.json'} (sampler epoch {sampler['epoch']}, position {spe_pos} = "
                      f"{spe_pos // 2} steps into the epoch){NOTHING}")


@pytest.mark.parametrize("key,value,fault", [
    ("position", -4, "expected an integer from 0 to 9007199254740992, got -4"),
    ("position", 2 ** 62, "expected an integer from 0 to 9007199254740992, got 4611686018427387904"),
    ("epoch", -1, "expected an integer from 0 to 9007199254740992, got -1"),
])
def test_sampler_out_of_range(world, key, value, fault):
    out, ck, cfg = case(world, "lora")
    f = ck / "llava_resume.json"
    edit_json(f, lambda j: j["sampler"].__setitem__(key, value))
    proc = run([binary(), "train", cfg], check=False, timeout=TIMEOUT)
    assert_clear_error(proc, str(f), f"sampler.{key}")
    if fault:
        assert fault in proc.stderr
    assert not (out / "checkpoint-4").exists()


def test_sampler_epoch_contradicts_global_step(world):
    """In range, but epoch 10^15 of any epoch length cannot be step 3."""
    out, ck, cfg = case(world, "lora")
    f = ck / "llava_resume.json"
    edit_json(f, lambda j: j["sampler"].__setitem__("epoch", 10 ** 15))
    refused(out, cfg, f"error: {ck / 'trainer_state.json'}: global_step 3 contradicts {f} (sampler epoch "
                      f"1000000000000000, position 6 = 3 steps into the epoch){NOTHING}")


def test_sampler_position_not_a_batch_multiple(world):
    out, ck, cfg = case(world, "lora")
    f = ck / "llava_resume.json"
    edit_json(f, lambda j: j["sampler"].__setitem__("position", 5))
    refused(out, cfg, f"error: {f}: \"sampler.position\" 5 is not a multiple of samples_per_step 2 (the trainer "
                      "saves between optimizer steps)")


@pytest.mark.parametrize("value,shown", [(2, "2"), ("1", '"1"')])
def test_unknown_resume_format(world, value, shown):
    out, ck, cfg = case(world, "lora")
    f = ck / "llava_resume.json"
    edit_json(f, lambda j: j.__setitem__("format", value))
    refused(out, cfg, f"error: {f}: \"format\": expected 1 (the only format this version reads), got {shown}")


# ------------------------------------------------------------------ 10: generator states libtorch refuses

def test_our_cpu_generator_state_garbage(world):
    out, ck, cfg = case(world, "lora")
    f = ck / "llava_rng_state.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({"rank_0": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g)}, str(f))
    refused(out, cfg, f"error: {f}: 'rank_0' is not a valid CPU generator state (torch.get_rng_state()): "
                      f"Invalid mt19937 state{NOTHING}")


def test_hf_cpu_generator_state_garbage(world):
    out, ck, cfg = case(world, "lora")
    (ck / "llava_rng_state.safetensors").unlink()
    f = ck / "rng_state.pth"
    g = torch.Generator().manual_seed(2)
    edit_pt(f, lambda o: o.__setitem__("cpu", torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g)))
    refused(out, cfg, f"error: {f}: 'cpu' is not a valid CPU generator state (torch.get_rng_state()): "
                      f"Invalid mt19937 state{NOTHING}")


# ------------------------------------------------------------------ 27: auto past incomplete checkpoints

def make_incomplete(out, how):
    five = out / "checkpoint-5"
    if how == "empty":
        five.mkdir()
    elif how == "loop":
        os.symlink("checkpoint-5", five)
    else:
        shutil.copytree(out / "checkpoint-3", five)
        (five / how).unlink()
    return five


@pytest.mark.parametrize("kind,how,missing", [
    ("lora", "empty", "trainer_state.json"),
    ("lora", "trainer_state.json", "trainer_state.json"),
    ("lora", "adapter_model.safetensors", "adapter_model.safetensors"),
    ("lora", "non_lora_trainables.bin", "non_lora_trainables.bin"),
    ("lora", "optimizer.pt", "optimizer.pt"),
    ("projector", "mm_projector.bin", "mm_projector.bin"),
    ("full", "model.safetensors", "model.safetensors"),
])
def test_auto_skips_incomplete_newest(world, kind, how, missing):
    out, _, cfg = case(world, kind)
    five = make_incomplete(out, how)
    c = yaml.safe_load(cfg.read_text())
    c["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(c))
    proc = run([binary(), "train", cfg], timeout=TIMEOUT)
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("warning: ")]
    assert warnings == [f"warning: {five}: incomplete checkpoint (no {missing}), skipped; resuming from the next "
                        "newest"]
    assert f"resuming from {out / 'checkpoint-3'} at step 3" in proc.stdout
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_auto_skips_unstatable_entry(world):
    out, _, cfg = case(world, "lora")
    make_incomplete(out, "loop")
    c = yaml.safe_load(cfg.read_text())
    c["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(c))
    proc = run([binary(), "train", cfg], timeout=TIMEOUT)
    assert f"resuming from {out / 'checkpoint-3'} at step 3" in proc.stdout
    assert (out / "checkpoint-4" / "trainer_state.json").exists()


@pytest.mark.parametrize("how", ["adapter_model.safetensors", "optimizer.pt", "non_lora_trainables.bin"])
def test_named_incomplete_checkpoint_is_an_error(world, how):
    out, ck, cfg = case(world, "lora")
    (ck / how).unlink()
    c = yaml.safe_load(cfg.read_text())
    c["resume_from_checkpoint"] = str(ck)
    cfg.write_text(yaml.safe_dump(c))
    refused(out, cfg, f"error: {ck / how}: no such file: the checkpoint is incomplete (this run needs it to resume)"
                      f"{NOTHING}")


def test_deepspeed_tag_folder_symlink_loop(world):
    """`latest` names global_step3, a symlink to itself: one error naming `latest`, no filesystem_error text."""
    out, ck, cfg = case(world, "lora_ds")
    shutil.rmtree(ck / "global_step3")
    os.symlink("global_step3", ck / "global_step3")
    refused(out, cfg, f"error: {ck / 'latest'}: names 'global_step3', which is not a folder of {ck}")
