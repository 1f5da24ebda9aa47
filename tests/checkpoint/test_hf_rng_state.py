"""HF Trainer's rng_state.pth / rng_state_R.pth, both ways.

Ours: every checkpoint carries them (1 rank: rng_state.pth; R ranks: rng_state_R.pth), synchronous and async
saves alike. HF Trainer's own _load_rng_state loads each with nothing logged or warned, and leaves
- torch's CPU generator bit for bit in our rank's state (llava_rng_state.safetensors "rank_R"),
- Python's `random` and NumPy's global generator exactly as HF's set_seed(seed) leaves them (our trainer
  draws from neither: that is the state a run that drew nothing would save).
Our reader reads the CPU state back; our resume still prefers llava_rng_state.safetensors (an rng_state.pth
holding another state changes nothing) and, without it, restores the same state from rng_state.pth.
The CUDA entry: from a file torch.save wrote (HF's distributed list, one state per device, and its
single-process tensor) our reader picks the state of the device asked for; the files we write for a CUDA
run hold HF's layout (checked here with states made up by the test tool, as this machine has no GPU)."""
import json
import logging
import os
import random
import shutil
import subprocess
import types
import warnings

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_pt_utils import safe_globals
from transformers.training_args import ParallelMode

from llava_oracle import binary, run
from train_fixtures import make_train_world

SEED = 11
SETTINGS = {"seed": SEED, "logging_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 5e-3,
            "lora_enable": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "max_steps": 3, "save_steps": 2}


def tool(*args, check=True):
    return subprocess.run([os.environ["LLAVA_CHECKPOINT_TOOL"], *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_rng")
    _, base = make_train_world(root, 8)
    return {"root": root, "base": {**base, **SETTINGS}}


def train(world, name, ranks=1, **settings):
    cfg = world["root"] / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**world["base"], "output_dir": str(world["root"] / name), **settings}))
    metrics = world["root"] / f"{name}.metrics.json"
    cmd = [binary(), "train", cfg, "--metrics-out", metrics]
    if ranks > 1:
        cmd = [binary("LLAVA_RUN"), "--standalone", f"--nproc_per_node={ranks}", *cmd]
    run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return world["root"] / name, json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def runs(world):
    """(checkpoint-2 dir, metrics) of a 1-rank synchronous and a 2-rank async run, both to step 3."""
    one, one_metrics = train(world, "sync_1r", async_save=False)
    two, _ = train(world, "async_2r", ranks=2, per_device_train_batch_size=1, async_save=True)
    return {1: (one / "checkpoint-2", one_metrics), 2: (two / "checkpoint-2", None)}


def hf_load_rng_state(ckpt, world_size, rank):
    """HF Trainer's own _load_rng_state for process `rank` of `world_size`, from fresh generators; returns the
    three generator states after it and everything it logged or warned."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    mode = ParallelMode.DISTRIBUTED if world_size > 1 else ParallelMode.NOT_DISTRIBUTED
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(world_size=world_size, process_index=rank,
                                                               parallel_mode=mode))
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer._load_rng_state(trainer, str(ckpt))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), \
        [r.getMessage() for r in records] + [str(w.message) for w in caught]


@pytest.mark.parametrize("ranks", [1, 2], ids=["1rank-sync", "2ranks-async"])
def test_hf_trainer_loads_our_rng_states(runs, ranks):
    ckpt, _ = runs[ranks]
    names = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    assert sorted(p.name for p in ckpt.glob("rng_state*.pth")) == names
    ours = load_file(str(ckpt / "llava_rng_state.safetensors"))
    seeded_python = random.Random(SEED).getstate()
    seeded_numpy = np.random.RandomState(SEED).get_state()
    for rank in range(ranks):
        python, numpy, cpu, messages = hf_load_rng_state(ckpt, ranks, rank)
        print(f"\n{names[rank]}: HF's _load_rng_state said {messages}")
        assert messages == []
        assert torch.equal(cpu, ours[f"rank_{rank}"])          # bit for bit, the generator our rank used
        assert not torch.equal(cpu, torch.manual_seed(SEED).get_state())  # it had moved on (LoRA init, dropout)
        assert python == seeded_python
        assert numpy[0] == seeded_numpy[0] and np.array_equal(numpy[1], seeded_numpy[1]) and numpy[1].dtype == np.uint32
        assert numpy[2:] == seeded_numpy[2:]
        read = json.loads(tool("hf-rng-read", ckpt, rank, -1).stdout)  # our reader round-trips it
        assert read["cpu"] == ours[f"rank_{rank}"].numpy().tobytes().hex() and read["cuda"] is None


def test_our_resume_prefers_our_rng_file_and_falls_back_to_hf(world, runs):
    """LoRA dropout 0.1: step 3's loss depends on the generator restored. With another state in rng_state.pth
    our resume still takes llava_rng_state.safetensors; without it, rng_state.pth gives the same state."""
    ckpt, uninterrupted = runs[1]
    want = uninterrupted["steps"][-1]
    assert want["step"] == 3
    for case in ("other_hf_state", "hf_state_only"):
        out = world["root"] / f"resume_{case}"
        shutil.copytree(ckpt, out / "checkpoint-2")
        if case == "other_hf_state":
            with safe_globals():
                state = torch.load(out / "checkpoint-2" / "rng_state.pth", weights_only=True)
            state["cpu"] = torch.manual_seed(999).get_state()
            torch.save(state, out / "checkpoint-2" / "rng_state.pth")
        else:
            (out / "checkpoint-2" / "llava_rng_state.safetensors").unlink()
        _, metrics = train(world, f"resume_{case}", resume_from_checkpoint="auto", async_save=False)
        got = metrics["steps"][-1]
        print(f"\n{case}: step 3 loss {got['loss']!r}, uninterrupted {want['loss']!r}")
        assert got["step"] == 3 and got["loss"] == want["loss"]
    # The check can fail: a wrong generator draws other dropout masks.
    out = world["root"] / "resume_wrong_state"
    shutil.copytree(ckpt, out / "checkpoint-2")
    (out / "checkpoint-2" / "llava_rng_state.safetensors").unlink()
    shutil.copy(world["root"] / "resume_other_hf_state" / "checkpoint-2" / "rng_state.pth", out / "checkpoint-2")
    _, metrics = train(world, "resume_wrong_state", resume_from_checkpoint="auto", async_save=False)
    assert metrics["steps"][-1]["loss"] != want["loss"]


def fake_cuda(n):
    """Distinct states libtorch's CUDA set_state accepts: (seed, Philox offset) with the offset a multiple of 4."""
    return [torch.full((16,), 12 * (d + 1), dtype=torch.uint8) for d in range(n)]


@pytest.mark.parametrize("form", ["list", "tensor"])
def test_we_read_the_cuda_state_of_our_device(tmp_path, form):
    """HF's distributed save: "cuda" = get_rng_state_all(), entry d restored to device d; its single-process
    save: one tensor, the current device's."""
    cpu = torch.manual_seed(5).get_state()
    cuda = fake_cuda(3) if form == "list" else fake_cuda(1)[0]
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": cpu, "cuda": cuda},
               tmp_path / "rng_state_1.pth")
    for device in range(4):
        read = json.loads(tool("hf-rng-read", tmp_path, 1, device).stdout)
        assert read["file"].endswith("rng_state_1.pth") and read["cpu"] == cpu.numpy().tobytes().hex()
        want = cuda if form == "tensor" else (cuda[device] if device < 3 else None)
        assert read["cuda"] == (want.numpy().tobytes().hex() if want is not None else None), device
    assert json.loads(tool("hf-rng-read", tmp_path, 1, -1).stdout)["cuda"] is None  # a CPU run asks for none


def test_a_bad_cuda_state_is_a_clear_error(tmp_path):
    states = fake_cuda(2)
    states[1] = states[1][:8].clone()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
                "cuda": states}, tmp_path / "rng_state.pth")
    proc = tool("hf-rng-read", tmp_path, 0, 1, check=False)
    print(f"\n  {proc.stderr.strip()}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert str(tmp_path / "rng_state.pth") in proc.stderr and "'cuda[1]'" in proc.stderr and "16 bytes" in proc.stderr
    assert tool("hf-rng-read", tmp_path, 0, 0).returncode == 0  # device 0's entry is fine


@pytest.mark.parametrize("offset", [6, -4])
def test_a_cuda_state_libtorch_would_refuse_is_named(tmp_path, offset):
    """16 bytes, but a Philox offset libtorch's CUDA set_state refuses (not a non-negative multiple of 4): named
    with the file and the entry as read, not left to fail bare on the device."""
    states = fake_cuda(2)
    states[1][8:] = torch.frombuffer(bytearray(offset.to_bytes(8, "little", signed=True)), dtype=torch.uint8)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
                "cuda": states}, tmp_path / "rng_state.pth")
    proc = tool("hf-rng-read", tmp_path, 0, 1, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: {tmp_path / 'rng_state.pth'}: 'cuda[1]' is not a valid CUDA generator "
                                   f"state: its Philox offset {offset} is not a non-negative multiple of 4; "
                                   "nothing was changed")
    assert tool("hf-rng-read", tmp_path, 0, 0).returncode == 0  # device 0's entry is fine


@pytest.mark.parametrize("world_size", [1, 3])
def test_the_cuda_entry_we_write_is_hfs_layout(tmp_path, world_size):
    """1 process: "cuda" is the state tensor (HF's set_rng_state); R ranks on devices 0..R-1: rank R's "cuda" is
    a list of R + 1 states (HF's set_rng_state_all), its own at index R, the devices before it as
    torch.cuda.manual_seed_all(seed) leaves them (seed, offset 0)."""
    seed = 2**40 + 7  # two 32-bit words for Python's seeding; NumPy's takes the low word
    tool("hf-rng-write", tmp_path, seed, world_size, "cuda")
    seeded = torch.tensor(list(seed.to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)
    for r in range(world_size):
        name = "rng_state.pth" if world_size == 1 else f"rng_state_{r}.pth"
        with safe_globals(), warnings.catch_warnings():
            warnings.simplefilter("error")
            state = torch.load(tmp_path / name, weights_only=True)
        assert sorted(state) == ["cpu", "cuda", "numpy", "python"]
        assert state["python"] == random.Random(seed).getstate()
        assert np.array_equal(state["numpy"][1], np.random.RandomState(seed % 2**32).get_state()[1])
        torch.manual_seed(seed + r)
        torch.rand(r + 1)
        assert torch.equal(state["cpu"], torch.get_rng_state())
        own = torch.full((16,), 4 * (r + 1), dtype=torch.uint8)  # the tool fakes offsets libtorch accepts
        if world_size == 1:
            assert torch.equal(state["cuda"], own)
        else:
            assert isinstance(state["cuda"], list) and len(state["cuda"]) == r + 1
            assert torch.equal(state["cuda"][r], own) and all(torch.equal(s, seeded) for s in state["cuda"][:r])
        read = json.loads(tool("hf-rng-read", tmp_path, r, r).stdout)
        assert read["cuda"] == own.numpy().tobytes().hex()
