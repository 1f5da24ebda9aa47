"""Hostile tokenizer files refused with one error line, never a signal.

1. sentencepiece's Normalizer walks normalizer_spec.precompiled_charsmap (a Darts-clone double-array trie
   + NUL-terminated strings) without checking it: garbage made every command that loads the tokenizer die
   with SIGSEGV. Each class of bad blob must be one line naming tokenizer.model; charsmaps sentencepiece
   builds itself (nmt_nfkc, nfkc_cf) and well-formed hand-made tries must load and tokenize as
   sentencepiece does.
2. A token id (added token, sentencepiece piece) past the model's vocab_size failed only when a batch
   held it (libtorch: "index out of range in self"); infer, train and preprocess must refuse it up front.
"""
import json
import os
import random
import shutil
import struct
import subprocess

import pytest
import sentencepiece as spm

import data_fixtures as fx

TEXTS = ["Hello world", "ＡＢＣ full-width ＡＢＣ １２３", "ﬁne ligature ﬀ and ½", "café  naïve ① Ⅳ",
         "a ab aaa", "tab\there"]
LEAF = 0x80000000  # a value unit: bit 31 set, so its label never equals an input byte


# ---- protobuf wire editing (the oracle venv has no protobuf package) ----

def read_varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def varint(n):
    out = b""
    while True:
        c, n = n & 0x7F, n >> 7
        if n:
            out += bytes([c | 0x80])
        else:
            return out + bytes([c])


def fields(b):
    """[(number, wire_type, raw bytes of the whole field, payload or None)]"""
    i, out = 0, []
    while i < len(b):
        start = i
        key, i = read_varint(b, i)
        t, payload = key & 7, None
        if t == 0:
            _, i = read_varint(b, i)
        elif t == 1:
            i += 8
        elif t == 5:
            i += 4
        else:
            n, i = read_varint(b, i)
            payload = b[i:i + n]
            i += n
        out.append((key >> 3, t, b[start:i], payload))
    return out


def charsmap_of(model_bytes, spec=3):
    blob = b""
    for num, t, _, payload in fields(model_bytes):
        if num == spec and t == 2:
            for inner, it, _, p in fields(payload):
                if inner == 2 and it == 2:
                    blob = p
    return blob


def with_charsmap(model_bytes, blob, spec=3):
    """The model with `spec` (3: normalizer_spec, 5: denormalizer_spec) replaced by one holding `blob`."""
    kept = b"".join(raw for num, _, raw, _ in fields(model_bytes) if num != spec)
    body = b"\x0a\x08nmt_nfkc" + b"\x12" + varint(len(blob)) + blob + b"\x20\x00"
    return kept + bytes([spec << 3 | 2]) + varint(len(body)) + body


# ---- hand-made Darts-clone tries ----

def unit(offset, label, has_leaf=False):
    assert offset < 1 << 21
    return offset << 10 | (1 << 8 if has_leaf else 0) | label


def chain_trie(depth, normalized=b"b\0", value=0, byte=0x61):
    """`byte` repeated 1..depth times each map to normalized[value:]: node d sits at 256d ^ byte in block d,
    its children's block is d+1 and its leaf the first unit there. Unused units are value units."""
    units = [LEAF] * (256 * (depth + 2))
    units[0] = unit(256, 0)  # root: children in block 1
    for d in range(1, depth + 1):
        node, base = (256 * d) ^ byte, 256 * (d + 1)
        units[node] = unit(node ^ base, byte, has_leaf=True)
        units[base] = LEAF | value
    return units


def blob_of(units, normalized=b"b\0", trie_bytes=None):
    trie = b"".join(struct.pack("<I", u) for u in units)
    size = len(trie) if trie_bytes is None else trie_bytes
    return struct.pack("<I", size) + trie + normalized


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokchk")
    base = fx.train_spm(str(root / "spm"))
    models = {"identity": base}
    for rule in ("nmt_nfkc", "nfkc_cf"):
        prefix = str(root / rule)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(fx.CORPUS * 50), model_prefix=prefix, vocab_size=400, model_type="bpe", hard_vocab_limit=False,
            byte_fallback=True, normalization_rule_name=rule, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, num_threads=1, minloglevel=2)
        models[rule] = prefix + ".model"
    return {"root": root, "models": models, "n": 0}


def tok_dir(env, model_bytes, name):
    d = env["root"] / name
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model_bytes)
    return str(d)


def tokenize(d, texts=TEXTS):
    return fx.run_tool("tokenize", d, stdin=json.dumps(texts))


def assert_one_error(r, d, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)  # an error, not a signal (rc < 0 / 139)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: " + os.path.join(d, "tokenizer.model") + ": "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def sentencepiece_ids(model_bytes, texts=TEXTS):
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    return [[1] + sp.encode(t) for t in texts]  # bare dir: legacy, BOS, no added tokens in TEXTS


@pytest.mark.parametrize("rule", ["nmt_nfkc", "nfkc_cf"])
def test_charsmaps_sentencepiece_builds_load_and_tokenize_identically(env, rule):
    model = open(env["models"][rule], "rb").read()
    assert len(charsmap_of(model)) > 1000  # a real trie, not an empty rule
    d = tok_dir(env, model, "real_" + rule)
    r = tokenize(d)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["ids"]
    assert got == sentencepiece_ids(model)
    sp = spm.SentencePieceProcessor(model_file=env["models"][rule])
    assert sp.encode("ＡＢＣ", out_type=str) == sp.encode("ABC" if rule == "nmt_nfkc" else "abc", out_type=str)


@pytest.mark.parametrize("depth", [1, 32])
def test_hand_made_tries_within_bounds_are_accepted(env, depth):
    model = with_charsmap(open(env["models"]["identity"], "rb").read(), blob_of(chain_trie(depth)))
    d = tok_dir(env, model, "chain%d" % depth)
    texts = ["a", "a" * 40, "xa ya", "b"]
    r = tokenize(d, texts)
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)["ids"]
    assert ids == sentencepiece_ids(model, texts)
    assert ids[0] == ids[3]  # "a" is normalized to "b"


def hostile_variants(base_model):
    ok_units = chain_trie(1)
    far = list(ok_units)
    far[256 ^ 0x61] = unit((256 ^ 0x61) ^ (1 << 20), 0x61, has_leaf=True)  # children 1M units away
    cycle = list(ok_units)
    cycle[256 ^ 0x61] = unit((256 ^ 0x61) ^ 256, 0x61, has_leaf=True)  # "a" leads back to itself
    cycle[256] = LEAF
    rng = random.Random(0)
    random_units = [rng.getrandbits(32) for _ in range(64)]
    real = charsmap_of(open(base_model, "rb").read())
    return {
        # the review's reproduction: 4 units whose offsets point 2^30 units away
        "review": (struct.pack("<I", 16) + struct.pack("<I", (0x3FFFFF << 10) | 0x200) * 4 + b"abcd",
                   ["points at units", "past the 4 units"]),
        "random_units": (blob_of(random_units, b"x\0"), ["past the 64 units"]),
        "offset_past_end": (blob_of(far), ["points at units", "past the 768 units"]),
        "value_past_strings": (blob_of(chain_trie(1, value=100)), ["byte 100", "which have 2 bytes"]),
        "string_without_nul": (blob_of(ok_units, normalized=b"b"), ["has no terminating NUL"]),
        "truncated": (blob_of(ok_units, trie_bytes=len(ok_units) * 4 + 100), ["more than the"]),
        "truncated_real": (real[:len(real) // 2], ["more than the"]),
        "size_not_units": (blob_of(ok_units, trie_bytes=len(ok_units) * 4 - 2), ["not a positive multiple of 4"]),
        "too_short": (b"\x04\x00\x00", ["too short"]),
        "cycle": (blob_of(cycle), ["cycle"]),
        "33_prefix_matches": (blob_of(chain_trie(33)), ["more than 32 prefixes"]),
    }


@pytest.mark.parametrize("name", ["review", "random_units", "offset_past_end", "value_past_strings",
                                  "string_without_nul", "truncated", "truncated_real", "size_not_units",
                                  "too_short", "cycle", "33_prefix_matches"])
@pytest.mark.parametrize("spec", [3, 5])
def test_hostile_charsmap_is_one_error_line(env, name, spec):
    blob, words = hostile_variants(env["models"]["nmt_nfkc"])[name]
    model = with_charsmap(open(env["models"]["identity"], "rb").read(), blob, spec)
    d = tok_dir(env, model, "bad_%s_%d" % (name, spec))
    r = tokenize(d)
    field = "normalizer_spec" if spec == 3 else "denormalizer_spec"
    assert_one_error(r, d, field + ".precompiled_charsmap: ", *words)


def test_last_charsmap_wins_as_in_protobuf(env):
    """A good normalizer_spec followed by a bad one: protobuf merges them and the last charsmap is used."""
    base = open(env["models"]["nmt_nfkc"], "rb").read()
    bad = b"\x12" + varint(8) + struct.pack("<I", 4) + struct.pack("<I", 0xFFFFFFFF)
    d = tok_dir(env, base + b"\x1a" + varint(len(bad)) + bad, "merged")
    assert_one_error(tokenize(d), d, "normalizer_spec.precompiled_charsmap: ")


def test_mutated_real_charsmaps_never_crash(env):
    """Random unit flips in sentencepiece's own nmt_nfkc trie: each is refused or tokenizes; no signal."""
    base = open(env["models"]["nmt_nfkc"], "rb").read()
    real = charsmap_of(base)
    trie_bytes = struct.unpack("<I", real[:4])[0]
    rng = random.Random(1)
    outcomes = set()
    for i in range(24):
        blob = bytearray(real)
        for _ in range(rng.choice([1, 4, 64])):
            pos = 4 + 4 * rng.randrange(trie_bytes // 4)
            blob[pos:pos + 4] = struct.pack("<I", rng.getrandbits(32))
        d = tok_dir(env, with_charsmap(base, bytes(blob)), "mut%d" % i)
        r = tokenize(d)
        assert r.returncode in (0, 1), (i, r.returncode, r.stderr)
        if r.returncode == 1:
            assert_one_error(r, d, "normalizer_spec.precompiled_charsmap: ")
        outcomes.add(r.returncode)
    assert 1 in outcomes  # the check is not vacuous


# ---- 2. token ids past the model's vocabulary ----

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    r = fx.run_llava("make-demo", "--out", str(root / "demo"), "--train-images", "8", "--test-images", "1")
    assert r.returncode == 0, r.stderr
    model = root / "demo" / "model"
    vocab = json.load(open(model / "config.json"))["text_config"]["vocab_size"]
    return {"root": root, "model": model, "vocab": vocab, "data": root / "demo" / "data"}


def model_copy(demo, name):
    d = demo["root"] / name
    shutil.copytree(demo["model"], d)
    return d


def config_yaml(demo, model_dir, out_dir):
    path = demo["root"] / (os.path.basename(str(model_dir)) + ".yaml")
    path.write_text("\n".join([
        "model_name_or_path: %s" % model_dir, "version: plain", "data_path: %s/captions.json" % demo["data"],
        "image_folder: %s" % demo["data"], "tune_mm_mlp_adapter: true", "bf16: false",
        "output_dir: %s" % out_dir, "max_steps: 1", "per_device_train_batch_size: 2", "save_steps: 1",
        "model_max_length: 128", "dataloader_num_workers: 0", "seed: 0", ""]))
    return str(path)


def assert_vocab_error(r, file, token, id_, vocab):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error")]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: " + str(file) + ": "), line
    assert "'%s'" % token in line and "id %d" % id_ in line and "vocabulary of %d ids" % vocab in line, line


def run_all_commands(demo, d):
    """infer, train and preprocess on the model dir `d`; train and preprocess must write nothing."""
    out = demo["root"] / (d.name + "_out")
    cfg = config_yaml(demo, d, out)
    image = str(next((demo["data"] / "images").glob("*.png")))
    results = {
        "infer": fx.run_llava("infer", "--model", str(d), "--image", image, "--prompt", "q <foo> e"),
        "train": fx.run_llava("train", cfg),
        "preprocess": fx.run_llava("preprocess", cfg, "--out", str(out) + ".safetensors"),
    }
    assert not out.exists() and not os.path.exists(str(out) + ".safetensors")
    return results


def test_added_tokens_json_id_past_vocab(demo):
    d = model_copy(demo, "added_json")
    json.dump({"<foo>": 5000}, open(d / "added_tokens.json", "w"))
    for cmd, r in run_all_commands(demo, d).items():
        assert_vocab_error(r, d / "added_tokens.json", "<foo>", 5000, demo["vocab"])


def test_added_tokens_decoder_id_past_vocab(demo):
    d = model_copy(demo, "decoder")
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["added_tokens_decoder"][str(demo["vocab"] + 8)] = {"content": "e", "special": False}
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    for cmd, r in run_all_commands(demo, d).items():
        assert_vocab_error(r, d / "tokenizer_config.json", "e", demo["vocab"] + 8, demo["vocab"])


def test_sentencepiece_vocab_larger_than_model(demo):
    """config.json says 300 ids; the sentencepiece model alone has more (train and preprocess read
    config.json before any weights; infer's weights loader refuses the mismatch first)."""
    d = model_copy(demo, "small_vocab")
    for f in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        if (d / f).exists():
            os.remove(d / f)
    cfg = json.load(open(d / "config.json"))
    cfg["text_config"]["vocab_size"] = 300
    json.dump(cfg, open(d / "config.json", "w"))
    results = run_all_commands(demo, d)
    for cmd in ("train", "preprocess"):
        r = results[cmd]
        assert r.returncode == 1, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: %s: sentencepiece piece '" % (d / "tokenizer.model")), line
        assert "has id 300" in line and "vocabulary of 300 ids" in line, line
    assert results["infer"].returncode == 1, results["infer"].stderr  # the weights' shape, before the tokenizer


def test_ids_within_vocab_still_run(demo):
    d = model_copy(demo, "fine")
    image = str(next((demo["data"] / "images").glob("*.png")))
    r = fx.run_llava("infer", "--model", str(d), "--image", image, "--prompt", "q", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
