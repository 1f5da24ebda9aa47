"""Disk full mid-save: `llava train` (a tiny stage-1 run, checkpoints at steps 2 and 4) with the disk-full
injection LLAVA_FAULT_WRITE_AFTER_BYTES set so that the second save runs out of space inside one of its
files. The run must end with exit 1 and one error line naming that file and 'No space left on device';
checkpoint-2 must be untouched (bitwise what an undisturbed run saved) and loadable; no partial
checkpoint may be left where resume looks; and `resume_from_checkpoint: auto` must then finish the run with
the same weights as the undisturbed run. (No root in CI for a size-limited tmpfs, hence the injection in
io::write_file_atomic, which every file we write goes through.)"""
import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_llava
from data_fixtures import write_png
from llava_oracle import assert_clear_error, binary, bits_equal, run



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk_full")
    model_dir, _, _, _ = tiny_llava.make_chat_model_dir(root)
    images = root / "images"
    images.mkdir()
    records = []
    for i, answer in enumerate(["A red square.", "Blue sky.", "Two dots.", "A green line."]):
        write_png(str(images / f"{i}.png"), 16 + 4 * i, 16, seed=i)
        records.append({"id": str(i), "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                          {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(records))
    settings = {"model_name_or_path": str(model_dir), "data_path": str(root / "data.json"),
                "image_folder": str(images), "version": "v1", "model_max_length": 128,
                "per_device_train_batch_size": 2, "tune_mm_mlp_adapter": True, "learning_rate": 1e-2,
                "max_steps": 4, "save_steps": 2, "seed": 5, "logging_steps": 1}
    world = {"root": root, "settings": settings}
    # The undisturbed run: what every other run is compared with; it logs the files it writes, in order.
    world["write_log"] = root / "reference_writes.log"
    world["reference"] = train(world, "reference", write_log=world["write_log"])
    return world


def train(world, name, env_budget=None, write_log=None, **extra):
    out = world["root"] / name
    cfg = world["root"] / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**world["settings"], "output_dir": str(out), **extra}))
    env = dict(os.environ)
    env.pop("LLAVA_FAULT_WRITE_AFTER_BYTES", None)
    env.pop("LLAVA_WRITE_LOG", None)
    if write_log is not None:
        env["LLAVA_WRITE_LOG"] = str(write_log)
    if env_budget is not None:
        env["LLAVA_FAULT_WRITE_AFTER_BYTES"] = str(env_budget)
    proc = run([binary(), "train", cfg], check=env_budget is None, env=env, timeout=300)
    return {"out": out, "proc": proc}


def written_in_order(world, ckpt, write_log=None):
    """The checkpoint's files in the order the reference run wrote them: every one goes through our atomic
    writer (config.json too), which logs each file it commits (LLAVA_WRITE_LOG) into the checkpoint's
    partial folder, renamed to `ckpt` once complete. (Not mtimes: files written within one clock tick
    share one.)"""
    names = [line.rsplit("/", 1) for line in (write_log or world["write_log"]).read_text().splitlines()]
    order = [name for folder, name in names if folder.endswith(f".{ckpt.name}.partial")]
    assert sorted(order) == sorted(p.name for p in ckpt.iterdir()), order
    return order


def sizes(ckpt, names):
    return [os.path.getsize(ckpt / n) for n in names]


def assert_loads(path):
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        load_file(str(path))
    else:
        state = load_bin(path)
        assert state, path


def load_bin(path):
    if path.name.startswith("rng_state"):  # NumPy's RNG state inside: HF loads these under its safe globals
        from transformers.trainer_pt_utils import safe_globals
        with safe_globals():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("which", ["mm_projector.bin", "optimizer.pt", "trainer_state.json", "the last file"])
def test_disk_full_during_the_second_save(world, which):
    """The disk fills up halfway through one file of the second save (torch.save archives, JSON, and
    whatever the trainer writes last)."""
    ref = world["reference"]["out"]
    assert sorted(p.name for p in ref.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    order = written_in_order(world, ref / "checkpoint-4")
    k = len(order) - 1 if which == "the last file" else order.index(which)
    fails_in = order[k]
    first, second = sizes(ref / "checkpoint-2", written_in_order(world, ref / "checkpoint-2")), sizes(ref / "checkpoint-4", order)
    budget = sum(first) + sum(second[:k]) + second[k] // 2
    got = train(world, f"full_{k}", env_budget=budget)
    out = got["out"]

    assert_clear_error(got["proc"], f".checkpoint-4.partial/{fails_in}", "No space left on device")
    # Only the complete first checkpoint: the partial one was removed, no temp file is left.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    files = sorted(p.name for p in (ref / "checkpoint-2").iterdir())
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == files
    # Training is deterministic, and the global generator is seeded from `seed` in every stage (HF's
    # set_seed), so the saved RNG state is the same too.
    for f in ["mm_projector.bin", "optimizer.pt", "scheduler.pt", "config.json", "llava_rng_state.safetensors"]:
        assert (out / "checkpoint-2" / f).read_bytes() == (ref / "checkpoint-2" / f).read_bytes(), f
    for f in files:  # and every file loads
        assert_loads(out / "checkpoint-2" / f)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    print(f"\n{fails_in}: budget {budget} B -> {got['proc'].stderr.strip()}")


def test_resume_after_disk_full_skips_partial_checkpoints_and_finishes_like_an_undisturbed_run(world):
    ref = world["reference"]["out"]
    first = sizes(ref / "checkpoint-2", written_in_order(world, ref / "checkpoint-2"))
    got = train(world, "full_then_resume", env_budget=sum(first) + 100)
    assert got["proc"].returncode == 1
    out = got["out"]
    # What a kill in the middle of a save leaves behind (the destructor that cleans up never ran): a
    # partial folder and a temp file. Resume must not take either for a checkpoint.
    partial = out / ".checkpoint-4.partial"
    partial.mkdir()
    (partial / "mm_projector.bin").write_bytes(b"PK\x03\x04 truncated")
    (out / "checkpoint-2" / "mm_projector.bin.tmp.12345").write_bytes(b"half")

    resumed = train(world, "full_then_resume", resume_from_checkpoint="auto")
    assert "resuming from" in resumed["proc"].stdout and "checkpoint-2" in resumed["proc"].stdout
    assert (out / "checkpoint-4").is_dir()
    want, have = load_bin(ref / "checkpoint-4" / "mm_projector.bin"), load_bin(out / "checkpoint-4" / "mm_projector.bin")
    assert sorted(want) == sorted(have)
    for n in want:
        assert bits_equal(want[n], have[n]), n
    print(f"\nresumed from checkpoint-2 after a disk-full save; {len(want)} projector tensors of step 4 bitwise equal")


def test_disk_full_in_a_background_save_ends_the_run_at_the_next_step(world):
    """async_save: true, 6 steps: the save of step 4 runs out of space inside optimizer.pt in its background
    thread while step 5 trains. The run ends with exit 1 and one error line naming the file in step 5 (its
    update waits for the write, which reads the live state), with no checkpoint-4 or checkpoint-6 and
    checkpoint-2 byte for byte what an undisturbed async run saved."""
    settings = {"async_save": True, "max_steps": 6}
    write_log = world["root"] / "async_reference_writes.log"
    ref = train(world, "async_reference", write_log=write_log, **settings)["out"]
    assert sorted(p.name for p in ref.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    first = written_in_order(world, ref / "checkpoint-2", write_log)
    second = written_in_order(world, ref / "checkpoint-4", write_log)
    k = second.index("optimizer.pt")
    budget = sum(sizes(ref / "checkpoint-2", first)) + sum(sizes(ref / "checkpoint-4", second[:k])) + \
        os.path.getsize(ref / "checkpoint-4" / "optimizer.pt") // 2
    got = train(world, "async_full", env_budget=budget, **settings)
    assert_clear_error(got["proc"], ".checkpoint-4.partial/optimizer.pt", "No space left on device")
    steps = [line for line in got["proc"].stdout.splitlines() if line.startswith("{'loss'")]
    # On the CPU the write reads the parameters and moments in place, so step 5's update waits for it and
    # fails there: step 5 never completes (no 5th log line).
    assert len(steps) == 4, got["proc"].stdout
    out = got["out"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no partial folder, no temp file
    for f in first:
        assert (out / "checkpoint-2" / f).read_bytes() == (ref / "checkpoint-2" / f).read_bytes(), f
    print(f"\nasync save of step 4 out of space (budget {budget} B): stopped in step {len(steps) + 1}: "
          f"{got['proc'].stderr.strip()}")
