"""`llava preprocess` batches vs a Python reimplementation of LLaVA's preprocessing (plain, vicuna_v1)
and the llava-hf chat format, written here from the documented behaviour. Also: determinism across
worker counts, resume from a position, ranks, mixed JSON/JSONL files and error reporting."""
import json
import os
import shutil

import pytest
import sentencepiece as spm
from safetensors.torch import load_file, safe_open

import data_fixtures as fx

IGNORE, IMAGE = -100, -200
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")

IMAGE_RECORDS = [
    {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown in the image?"},
        {"from": "gpt", "value": "A cat sitting on a red sofa."},
        {"from": "human", "value": "What color is the sofa?"},
        {"from": "gpt", "value": "The sofa is red."}]},
    {"id": "b", "image": "b.png", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "There are 12 apples and 3 oranges on the table."}]},
    {"id": "c", "image": "c.png", "conversations": [
        {"from": "gpt", "value": "dropped: a leading non-human turn"},
        {"from": "human", "value": "Describe the image in detail. <image>"},
        {"from": "gpt", "value": "The photo shows a street in München with café tables 😀."}]},
    {"id": "d", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nAnswer the question using a single word or phrase. Bus color?"},
        {"from": "gpt", "value": "Yellow"},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "2024"}]},
]
TEXT_RECORDS = [
    {"id": "t1", "conversations": [
        {"from": "human", "value": "Tell me about the   river bank."},
        {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog near the river bank."}]},
    {"id": "t2", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!\nHow can I help?"},
        {"from": "human", "value": "Count: 1 2 3"}, {"from": "gpt", "value": "4 5 6"}]},
]
PLAIN_RECORDS = [r for r in IMAGE_RECORDS if len(r["conversations"]) == 2 and r["conversations"][0]["from"] == "human"]
PLAIN_RECORDS += [{"id": "p", "image": "b.png", "conversations": [
    {"from": "human", "value": "<image>\nGive a short caption."}, {"from": "gpt", "value": "A yellow bus, 12 seats."}]}]


# ---------------------------------------------------------------- the reference (from the facts)

class SlowTokenizer:
    def __init__(self, model, added, legacy):
        self.sp = spm.SentencePieceProcessor(model_file=model)
        self.sp_np = fx.no_prefix_processor(model)
        self.added, self.legacy = added, legacy

    def __call__(self, text):
        return fx.slow_llama_encode(text, self.sp, self.sp_np, self.added, self.legacy)


def tokenizer_image_token(prompt, tok):
    chunks = [tok(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, c in enumerate(chunks):
        ids += ([IMAGE] if i else []) + c[1:]
    return ids


def preprocess_multimodal(conv):
    out = []
    for t in conv:
        v = t["value"]
        if "<image>" in v:
            v = ("<image>\n" + v.replace("<image>", "").strip()).strip()
        out.append({"from": t["from"], "value": v})
    return out


def preprocess_plain(conv, tok):
    ids = tokenizer_image_token("<image>" + conv[1]["value"] + "\n", tok)
    n = len(tokenizer_image_token("<image>", tok))
    return ids, [IGNORE] * n + ids[n:]


def preprocess_v1(conv, has_image, tok, max_len, pad_id, legacy):
    if conv[0]["from"] != "human":
        conv = conv[1:]
    prompt = SYSTEM + " "
    for j, t in enumerate(conv):
        prompt += ("USER: " + t["value"] + " ") if j % 2 == 0 else ("ASSISTANT: " + t["value"] + "</s>")
    enc = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok
    ids = enc(prompt)
    if not has_image:
        ids = ids[:max_len]
    target = list(ids)
    total_len = sum(1 for i in ids if i != pad_id)
    cur = 1
    target[0] = IGNORE
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len, instr_len = len(enc(rou)), len(enc(parts[0])) - 2
        if i != 0 and not legacy:
            round_len, instr_len = round_len - 1, instr_len - 1
        for k in range(cur, min(cur + instr_len, len(target))):
            target[k] = IGNORE
        cur += round_len
    target[cur:] = [IGNORE] * max(0, len(target) - cur)
    if cur < max_len and cur != total_len:
        target = [IGNORE] * len(target)
    return ids, target


def llava_hf_reference(conv, fast):
    """USER: q ASSISTANT: a ... ; labels on tokens overlapping assistant text (HF offsets)."""
    if conv[0]["from"] != "human":
        conv = conv[1:]
    prompt, answers = "", []
    for t in conv:
        prompt += "USER: " if t["from"] == "human" else "ASSISTANT: "
        if t["from"] == "gpt":
            answers.append((len(prompt), len(prompt) + len(t["value"])))
        prompt += t["value"] + " "
    enc = fast(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [1], [IGNORE]
    for tid, (b, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        labels.append(tid if any(b < ae and e > ab for ab, ae in answers) else IGNORE)
    return ids, labels


def expand(ids, labels, image_id, count):
    out_i, out_l = [], []
    for i, l in zip(ids, labels):
        if i in (IMAGE, image_id):
            out_i += [image_id] * count
            out_l += [IGNORE] * count
        else:
            out_i.append(i)
            out_l.append(l)
    return out_i, out_l


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpl")
    model = fx.train_spm(str(root / "spm"))
    n = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    fast = fx.make_hf_tokenizer_dir(str(root / "hf"), model, legacy=True)
    fx.make_hf_tokenizer_dir(str(root / "hf_nonlegacy"), model, legacy=False)
    for d in ("hf", "hf_nonlegacy"):  # tiny CLIP settings keep the pixels cheap
        json.dump({"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}},
                  open(root / d / "preprocessor_config.json", "w"))
    hf_model = root / "hf_model"  # llava-hf style: config.json says how many image tokens
    shutil.copytree(root / "hf", hf_model)
    json.dump({"model_type": "llava", "image_token_index": n, "image_seq_length": 5,
               "vision_config": {"image_size": 336, "patch_size": 14}}, open(hf_model / "config.json", "w"))
    imgs = root / "images"
    imgs.mkdir()
    for name, (w, h) in {"a.png": (40, 30), "b.png": (24, 50), "c.png": (32, 32)}.items():
        fx.write_png(imgs / name, w, h, seed=len(name) + w)
    json.dump(IMAGE_RECORDS, open(root / "images.json", "w"))
    with open(root / "text.jsonl", "w") as f:
        for r in TEXT_RECORDS:
            f.write(json.dumps(r) + "\n\n")
    json.dump(PLAIN_RECORDS, open(root / "plain.json", "w"))
    return {"root": root, "model": model, "n": n, "fast": fast}


def write_config(env, name, **keys):
    cfg = {"image_folder": str(env["root"] / "images"), "per_device_train_batch_size": 2,
           "dataloader_num_workers": 2, "seed": 3, **keys}
    path = env["root"] / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def preprocess(cfg, out, *extra):
    r = fx.run_llava("preprocess", cfg, "--out", str(out), "--limit", "100", *extra)
    assert r.returncode == 0, r.stderr
    return load_file(str(out))


def rows(batches):
    """(dataset index, ids, labels, n_images) per row, checking the padding and masks on the way."""
    out = []
    b = 0
    while f"batch{b}.input_ids" in batches:
        ids, labels = batches[f"batch{b}.input_ids"], batches[f"batch{b}.labels"]
        mask, idx = batches[f"batch{b}.attention_mask"], batches[f"batch{b}.indices"]
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            assert mask[r, :n].all() and not mask[r, n:].any()
            assert (labels[r, n:] == IGNORE).all()
            out.append((int(idx[r]), ids[r, :n].tolist(), labels[r, :n].tolist(), ids[r, n:].tolist()))
        b += 1
    return out


def check(batches, records, reference, pad_id):
    seen = set()
    for index, ids, labels, padding in rows(batches):
        want_ids, want_labels = reference(records[index])
        assert ids == want_ids, records[index]["id"]
        assert labels == want_labels, records[index]["id"]
        assert all(p == pad_id for p in padding)
        seen.add(index)
    assert seen == set(range(len(records)))
    return len(seen)


# ---------------------------------------------------------------- tests

def test_plain_template(env):
    tok = SlowTokenizer(env["model"], {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": env["n"], "<pad>": env["n"] + 1}, True)
    cfg = write_config(env, "plain", data_path=str(env["root"] / "plain.json"), version="plain",
                       model_name_or_path=str(env["root"] / "hf"))
    batches = preprocess(cfg, env["root"] / "plain.safetensors")
    n = check(batches, PLAIN_RECORDS, lambda r: preprocess_plain(preprocess_multimodal(r["conversations"]), tok),
              env["n"] + 1)
    assert tuple(batches["batch0.pixel_values"].shape) == (2, 3, 16, 16)  # one per image sample
    print(f"\n[templates] plain: {n} samples equal")


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("max_len", [2048, 120])
def test_vicuna_v1_template(env, legacy, max_len):
    d = "hf" if legacy else "hf_nonlegacy"
    added = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": env["n"], "<pad>": env["n"] + 1}
    tok = SlowTokenizer(env["model"], added, legacy)
    cfg = write_config(env, f"v1_{legacy}_{max_len}", data_path=[str(env["root"] / "images.json"), str(env["root"] / "text.jsonl")],
                       version="v1", model_max_length=max_len, model_name_or_path=str(env["root"] / d))
    records = IMAGE_RECORDS + TEXT_RECORDS

    def reference(r):
        has_image = "image" in r
        conv = preprocess_multimodal(r["conversations"]) if has_image else r["conversations"]
        ids, labels = preprocess_v1(conv, has_image, tok, max_len, env["n"] + 1, legacy)
        return ids[:max_len], labels[:max_len]

    batches = preprocess(cfg, env["root"] / f"v1_{legacy}_{max_len}.safetensors")
    n = check(batches, records, reference, env["n"] + 1)
    trained = sum(sum(1 for l in labels if l != IGNORE) for _, _, labels, _ in rows(batches))
    truncated = sum(len(ids) == max_len for _, ids, _, _ in rows(batches))
    assert trained > 0
    assert (truncated > 0) == (max_len == 120)
    print(f"\n[templates] vicuna_v1 legacy={legacy} max_len={max_len}: {n} samples equal, {trained} trained tokens, {truncated} truncated")


def test_vicuna_v1_expanded_image_tokens(env):
    """A llava-hf model (config.json: image_token_index, image_seq_length 5): -200 becomes 5 x <image>."""
    tok = SlowTokenizer(env["model"], {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": env["n"], "<pad>": env["n"] + 1}, True)
    cfg = write_config(env, "v1x", data_path=str(env["root"] / "images.json"), version="vicuna_v1",
                       model_name_or_path=str(env["root"] / "hf_model"))

    def reference(r):
        ids, labels = preprocess_v1(preprocess_multimodal(r["conversations"]), True, tok, 2048, env["n"] + 1, True)
        return expand(ids, labels, env["n"], 5)

    check(preprocess(cfg, env["root"] / "v1x.safetensors"), IMAGE_RECORDS, reference, env["n"] + 1)


def test_llava_hf_template(env):
    cfg = write_config(env, "hf", data_path=[str(env["root"] / "images.json"), str(env["root"] / "text.jsonl")],
                       version="llava_hf", model_name_or_path=str(env["root"] / "hf_model"))
    records = IMAGE_RECORDS + TEXT_RECORDS

    def reference(r):
        conv = preprocess_multimodal(r["conversations"]) if "image" in r else r["conversations"]
        ids, labels = llava_hf_reference(conv, env["fast"])
        return expand(ids, labels, env["n"], 5)

    n = check(preprocess(cfg, env["root"] / "hf.safetensors"), records, reference, env["n"] + 1)
    print(f"\n[templates] llava_hf: {n} samples equal")


def test_workers_resume_and_ranks_give_the_same_batches(env):
    base = dict(data_path=[str(env["root"] / "images.json"), str(env["root"] / "text.jsonl")], version="v1",
                model_name_or_path=str(env["root"] / "hf"), group_by_modality_length=True)
    full = preprocess(write_config(env, "w2", **base), env["root"] / "w2.safetensors")
    serial = preprocess(write_config(env, "w0", **base, dataloader_num_workers=0), env["root"] / "w0.safetensors")
    assert full.keys() == serial.keys()
    for k in full:
        assert full[k].equal(serial[k]), k
    # resumed 2 samples in: the next batch is the uninterrupted run's second batch
    resumed = preprocess(write_config(env, "w2", **base), env["root"] / "r.safetensors", "--position", "2")
    assert resumed["batch0.input_ids"].equal(full["batch1.input_ids"])
    assert resumed["batch0.indices"].equal(full["batch1.indices"])
    # two ranks: step j is the 1-rank run's batches 2j (rank 0) and 2j+1 (rank 1)
    for rank in (0, 1):
        part = preprocess(write_config(env, "w2", **base), env["root"] / f"rank{rank}.safetensors",
                          "--world", "2", "--rank", str(rank))
        assert part["batch0.indices"].equal(full[f"batch{rank}.indices"])
        # 6 samples, global batch 4: step 1 is positions 4..7, padded from the order's start
        assert part["batch1.indices"].equal(full["batch2.indices"] if rank == 0 else full["batch0.indices"])
    # group_by_modality_length: the 2 text-only samples share one batch
    mods = [{int(i) < len(IMAGE_RECORDS) for i in full[f"batch{b}.indices"]} for b in range(3)]
    assert all(len(m) == 1 for m in mods)


def test_bad_records_and_missing_images(env):
    root = env["root"]
    bad = list(IMAGE_RECORDS) + [{"id": "x", "conversations": "oops"}]
    json.dump(bad, open(root / "bad.json", "w"))
    r = fx.run_llava("preprocess", write_config(env, "bad", data_path=str(root / "bad.json"),
                                                 model_name_or_path=str(root / "hf")), "--out", str(root / "x.st"))
    assert r.returncode == 1 and "bad.json: record 4" in r.stderr and "conversations" in r.stderr, r.stderr
    (root / "bad.jsonl").write_text(json.dumps(TEXT_RECORDS[0]) + "\n{broken\n")
    r = fx.run_llava("preprocess", write_config(env, "bad", data_path=str(root / "bad.jsonl"),
                                                 model_name_or_path=str(root / "hf")), "--out", str(root / "x.st"))
    assert r.returncode == 1 and "bad.jsonl: line 2" in r.stderr, r.stderr
    missing = list(IMAGE_RECORDS) + [dict(IMAGE_RECORDS[1], id="m", image="nope.png"), dict(IMAGE_RECORDS[0], id="e")]
    json.dump(missing, open(root / "missing.json", "w"))
    keys = dict(data_path=str(root / "missing.json"), model_name_or_path=str(root / "hf"))
    r = fx.run_llava("preprocess", write_config(env, "miss", **keys), "--out", str(root / "x.st"), "--limit", "100")
    assert r.returncode == 1 and "missing.json: record 4" in r.stderr and "nope.png" in r.stderr, r.stderr
    out = root / "skip.safetensors"
    r = fx.run_llava("preprocess", write_config(env, "skip", **keys, skip_missing_images=True), "--out", str(out),
                     "--limit", "100")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 samples" in r.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["skipped_images"] == "1"
        total = sum(f.get_tensor(k).shape[0] for k in f.keys() if k.endswith(".indices"))
    assert total == len(missing) - 1  # 6 records fill 3 batches of 2 exactly; one dropped
