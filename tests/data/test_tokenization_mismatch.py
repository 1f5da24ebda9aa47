"""Samples LLaVA's "tokenization mismatch" rule (preprocess_v1) masks whole are reported, never silent.

The trigger: a tokenizer whose tokenizer_config.json says add_bos_token: false. LLaVA's round arithmetic
counts each round's BOS in place of the "</s>" that ends the round before it, so without a BOS every
round after the first comes up one token short: a two-round conversation does not add up to its
tokenization and is masked whole (it trains nothing), a one-round conversation is fine. LLaVA keeps the
rule and prints a warning; so do we, naming the record, with a count in the summary of `llava preprocess`
and `llava train`, and refuse a data set whose records are mostly masked, before anything is written."""
import hashlib
import json

import pytest
import yaml
from safetensors.torch import load_file

import tiny_llava
from llava_oracle import assert_clear_error, binary, run

QUESTIONS = ["What is shown?", "Describe the picture.", "What color is it?"]
ANSWERS = ["red", "a cat", "two dogs on the grass", "the sky is blue"]


def record(i, rounds):
    turns = []
    for r in range(rounds):
        turns += [{"from": "human", "value": QUESTIONS[(i + r) % 3]}, {"from": "gpt", "value": ANSWERS[(i + r) % 4]}]
    return {"id": f"rec-{i}", "conversations": turns}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A chat model dir (its tokenizer with add_bos_token false) and data sets of one- and two-round
    conversations."""
    root = tmp_path_factory.mktemp("mismatch")
    model_dir, _, _, _ = tiny_llava.make_chat_model_dir(root)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = False
    config_path.write_text(json.dumps(config, indent=2))

    def data(name, n, two_round):  # n records; those in two_round have two rounds, the others one
        path = root / f"{name}.json"
        path.write_text(json.dumps([record(i, 2 if i in two_round else 1) for i in range(n)]))
        return path

    sets = {"few": data("few", 8, {1, 4}),                    # 2 of 8 masked
            "many": data("many", 26, set(range(0, 24, 2))),   # 12 of 26: under half, past the warning limit
            "most": data("most", 8, {0, 1, 2, 3, 5, 6})}      # 6 of 8: refused
    return {"root": root, "model": model_dir, "data": sets}


def write_config(world, name, data, **keys):
    cfg = {"model_name_or_path": str(world["model"]), "data_path": str(world["data"][data]), "version": "v1",
           "model_max_length": 256, "per_device_train_batch_size": 2, "dataloader_num_workers": 1, "seed": 3,
           "lora_enable": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 1e-3,
           "logging_steps": 1, "output_dir": str(world["root"] / name), **keys}
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def two_round_ids(world, data):
    return [i for i, r in enumerate(json.loads(world["data"][data].read_text())) if len(r["conversations"]) == 4]


def warnings_of(stdout):
    return [l for l in stdout.splitlines() if l.startswith("warning: ")]


def test_preprocess_names_each_masked_record_and_counts_them(world):
    data = world["data"]["few"]
    out = world["root"] / "few.safetensors"
    proc = run([binary(), "preprocess", write_config(world, "pre_few", "few"), "--out", out, "--limit", 100])
    masked = two_round_ids(world, "few")
    assert masked == [1, 4]
    lines = warnings_of(proc.stdout)
    print("\n" + "\n".join(lines))
    assert len(lines) == 2  # once per record, though each record is named by the scan and drawn in a batch
    for line, i in zip(lines, masked):
        assert f"{data}: record {i} (id \"rec-{i}\", sample {i}): tokenization mismatch" in line, line
        assert "trains nothing" in line
    assert "tokenization mismatch: 2 of 8 samples drawn were masked whole" in proc.stdout
    # The masked rows are those records, and every label of theirs is -100; the one-round ones train.
    t = load_file(str(out))
    b = 0
    while f"batch{b}.indices" in t:
        for row, index in enumerate(t[f"batch{b}.indices"].tolist()):
            trained = int((t[f"batch{b}.labels"][row] != -100).sum())
            assert (trained == 0) == (index in masked), (index, trained)
        b += 1


def test_many_masked_records_are_rate_limited_then_counted(world):
    proc = run([binary(), "preprocess", write_config(world, "pre_many", "many"), "--out",
                world["root"] / "many.safetensors", "--limit", 100])
    lines = warnings_of(proc.stdout)
    masked = two_round_ids(world, "many")
    assert len(masked) == 12 and len(lines) == 11  # 10 named, then one line saying the rest are counted
    assert all(f"record {i} (id \"rec-{i}\"" in l for l, i in zip(lines, masked[:10]))
    assert "counted, not named" in lines[10]
    assert "tokenization mismatch: 12 of 26 samples drawn were masked whole" in proc.stdout


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def test_mostly_masked_data_is_an_error_before_anything_is_written(world):
    data = world["data"]["most"]
    out = world["root"] / "most.safetensors"
    proc = run([binary(), "preprocess", write_config(world, "pre_most", "most"), "--out", out], check=False)
    print(f"\n{proc.stderr.strip()}")
    assert_clear_error(proc, str(data), "6 of the 8 records checked", "tokenization-mismatch",
                       f"{data}: record 0 (id \"rec-0\"")
    assert not out.exists()
    # `llava train`: the same error, before the run writes anything; an existing checkpoint survives it.
    good = world["root"] / "train_most"
    run([binary(), "train", write_config(world, "train_most", "few", max_steps=2, save_steps=2)])
    before = snapshot(good)
    assert "checkpoint-2" in before
    proc = run([binary(), "train", write_config(world, "train_most", "most", max_steps=4, save_steps=1,
                                                 resume_from_checkpoint="auto")], check=False)
    assert_clear_error(proc, str(data), "6 of the 8 records checked")
    assert snapshot(good) == before


def test_train_warns_and_counts_in_its_summary(world):
    data = world["data"]["few"]
    proc = run([binary(), "train", write_config(world, "train_few", "few", max_steps=8, save_strategy="no")])
    lines = warnings_of(proc.stdout)
    assert [l.split(" (id ")[0] for l in lines] == [f"warning: {data}: record {i}" for i in (1, 4)]
    # 8 steps of 2 samples = 2 epochs of 8 records: each masked record drawn twice, warned about once.
    assert "tokenization mismatch: 4 of 16 samples drawn were masked whole and trained nothing (2 distinct records of 8" in proc.stdout
