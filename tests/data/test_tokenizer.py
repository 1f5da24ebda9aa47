"""Our tokenizer (llava_data_tool tokenize) vs a sentencepiece model trained here, HF's slow
SentencePieceBackend and transformers 5's LlamaTokenizer (tokenizers backend)."""
import json
import os
import shutil

import pytest
import sentencepiece as spm

import data_fixtures as fx

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces", "trailing spaces   ", "multiple   inner    spaces",
    "line one\nline two\n\nthree", "\n starts with a newline", "tab\there",
    "Ünïcödé café naïve 東京 München Zürich", "emoji 😀🎉 and 👍🏽 done",
    "digits 12345 and 3.14159 in 2024",
    "<image>\nWhat is shown in the image?", "What is this?\n<image>",
    "USER: <image>\nWhat color is the bus? ASSISTANT: Yellow.</s>USER: And the car?",
    "word<image>word", "12<image>34", "<image><image> x", "<image> <image>", "pad<pad><pad>",
    "a </s> b <s> c <unk> d", "", " ", "ASSISTANT:", "end</s>",
]
ADDED_FREE = [t for t in TEXTS if not any(a in t for a in ("<image>", "<pad>", "<s>", "</s>", "<unk>"))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    model = fx.train_spm(str(root / "spm"))
    dirs = {}
    fast = {}
    for legacy in (True, False):
        name = "hf_legacy" if legacy else "hf_nonlegacy"
        fast[name] = fx.make_hf_tokenizer_dir(str(root / name), model, legacy=legacy)
        dirs[name] = (str(root / name), legacy)
    n = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    # original-LLaVA style: the spm model alone (legacy default, pad = unk)
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(model, bare / "tokenizer.model")
    dirs["bare"] = (str(bare), True)
    # added_tokens.json + special_tokens_map.json instead of tokenizer.json
    old = root / "added_json"
    old.mkdir()
    shutil.copy(model, old / "tokenizer.model")
    json.dump({"<image>": n, "<pad>": n + 1}, open(old / "added_tokens.json", "w"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
              open(old / "special_tokens_map.json", "w"))
    json.dump({"legacy": False, "add_bos_token": True}, open(old / "tokenizer_config.json", "w"))
    dirs["added_json"] = (str(old), False)
    return {"model": model, "dirs": dirs, "fast": fast, "n": n, "root": root}


def ours(tok_dir, texts):
    r = fx.run_tool("tokenize", tok_dir, stdin=json.dumps(texts))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def added_ids_of(name, n):
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return specials if name == "bare" else {**specials, "<image>": n, "<pad>": n + 1}


def test_ids_equal_slow_llama_reference(env):
    sp = spm.SentencePieceProcessor(model_file=env["model"])
    sp_np = fx.no_prefix_processor(env["model"])
    for name, (d, legacy) in env["dirs"].items():
        got = ours(d, TEXTS)
        assert got["legacy"] == legacy
        assert got["bos"] == 1 and got["eos"] == 2 and got["unk"] == 0
        assert got["pad"] == (0 if name == "bare" else env["n"] + 1)
        for text, ids in zip(TEXTS, got["ids"]):
            want = fx.slow_llama_encode(text, sp, sp_np, added_ids_of(name, env["n"]), legacy)
            assert ids == want, (name, text)


def test_legacy_ids_equal_hf_slow_sentencepiece_backend(env):
    from transformers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    slow = SentencePieceBackend(vocab_file=env["model"], legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
    slow.add_tokens(AddedToken("<image>", special=True, normalized=False))
    slow.add_special_tokens({"pad_token": "<pad>"})
    got = ours(env["dirs"]["hf_legacy"][0], TEXTS)
    for text, ids in zip(TEXTS, got["ids"]):
        assert ids == [1] + slow.encode(text, add_special_tokens=False), text


def segments_start_with_space(text):
    return any(not added and seg.startswith(" ")
               for seg, added in fx.split_added(text, ["<image>", "<pad>", "<s>", "</s>", "<unk>"]))


def test_ids_vs_transformers5_fast_tokenizer(env):
    """transformers 5's LlamaTokenizer (Metaspace pre-tokenizer, prepend 'always'/'first') agrees with
    the slow tokenizer except on a segment that already starts with a space: sentencepiece prefixes
    '▁' anyway ('▁▁lead'), Metaspace does not ('▁lead'). We follow sentencepiece (what LLaVA trained
    with); those texts are reported, the others must match exactly. v5 also adds no BOS here."""
    differing = []
    for name in ("hf_legacy", "hf_nonlegacy"):
        fast = env["fast"][name]
        got = ours(env["dirs"][name][0], TEXTS)
        for text, ids in zip(TEXTS, got["ids"]):
            theirs = fast.encode(text, add_special_tokens=False)
            if segments_start_with_space(text):
                if ids[1:] != theirs:
                    differing.append((name, text))
            else:
                assert ids[1:] == theirs, (name, text)
    print(f"\n[tokenizer] transformers-5 fast differs (leading-space segments only) on {len(differing)} "
          f"texts: {differing}")


def test_decode_round_trips(env):
    sp = spm.SentencePieceProcessor(model_file=env["model"])
    for name, (d, legacy) in env["dirs"].items():
        got = ours(d, TEXTS)
        for text, ids, dec, dec_skip in zip(TEXTS, got["ids"], got["decoded"], got["decoded_skip_special"]):
            assert dec == "<s>" + text, (name, text)
            if text in ADDED_FREE:
                assert dec_skip == text == sp.decode(ids[1:]), (name, text)


def test_missing_or_inconsistent_files_are_clear_errors(env, tmp_path):
    r = fx.run_tool("tokenize", str(tmp_path), stdin="[]")
    assert r.returncode == 1 and "tokenizer.model" in r.stderr and "missing" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(env["dirs"]["hf_legacy"][0], bad)
    json.dump({"<image>": env["n"] + 5}, open(bad / "added_tokens.json", "w"))
    r = fx.run_tool("tokenize", str(bad), stdin="[]")
    assert r.returncode == 1 and "<image>" in r.stderr and "added_tokens.json" in r.stderr \
        and "tokenizer.json" in r.stderr, r.stderr
    nopad = tmp_path / "nopad"
    nopad.mkdir()
    shutil.copy(env["model"], nopad / "tokenizer.model")
    json.dump({"pad_token": "<pad>"}, open(nopad / "special_tokens_map.json", "w"))
    r = fx.run_tool("tokenize", str(nopad), stdin="[]")
    assert r.returncode == 1 and "pad_token" in r.stderr and "<pad>" in r.stderr, r.stderr
    (nopad / "tokenizer_config.json").write_text("{not json")
    r = fx.run_tool("tokenize", str(nopad), stdin="[]")
    assert r.returncode == 1 and "tokenizer_config.json" in r.stderr, r.stderr
