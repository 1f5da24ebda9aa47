"""Fixtures for the data-pipeline oracle tests: a tiny Llama-style sentencepiece model trained here,
HF tokenizer directories around it, small images and LLaVA-format datasets."""
import io
import json
import os
import random

import sentencepiece as spm

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a red sofa.",
    "Render a clear and concise summary of the photo.",
    "There are 12 apples and 3 oranges on the table in 2024.",
    "Answer the question using a single word or phrase.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ünïcödé text: café, naïve, Zürich, 東京, München, emoji 😀 and more.",
    "Describe the image in detail. The photo shows a street with cars and people walking.",
    "What color is the bus? The bus is yellow and parked next to a building.",
]


def train_spm(out_dir, vocab_size=400):
    """Trains a BPE model with Llama's settings (byte fallback, identity normalization, digits split,
    no whitespace collapsing) and ids <unk>=0 <s>=1 </s>=2."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(0)
    lines = [rng.choice(CORPUS) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.9995, num_threads=1, minloglevel=2)
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    return os.path.join(out_dir, "tokenizer.model")


def make_hf_tokenizer_dir(out_dir, model_file, legacy=True, llava_hf=True):
    """An HF tokenizer dir built by transformers itself: the spm model, optionally `<image>` and `<pad>`
    added (llava-hf style), saved with save_pretrained (tokenizer.json, tokenizer_config.json, ...)."""
    from transformers import AddedToken, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    import shutil
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(model_file, os.path.join(out_dir, "tokenizer.model"))
    # vocab + score-ordered merges from the spm model, as transformers' SentencePieceExtractor does
    # (done here because the extractor wants protobuf, which the oracle venv lacks).
    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=legacy)
    if llava_hf:
        tok.add_tokens(AddedToken("<image>", special=True, normalized=False))
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(out_dir)
    # transformers 5 does not write these; LLaVA-era tokenizer_config.json files carry them.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.update({"legacy": legacy, "add_bos_token": True, "add_eos_token": False})
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return LlamaTokenizer.from_pretrained(out_dir)


def data_tool():
    """Path of tests/data's llava_data_tool in the build under test."""
    return os.path.join(os.environ["LLAVA_BUILD_DIR"], "tests", "data", "llava_data_tool")


def run_tool(*args, stdin=None):
    import subprocess
    r = subprocess.run([data_tool(), *args], input=stdin, capture_output=True, text=True)
    return r


def split_added(text, added):
    """HF's added-token split: leftmost match, longest first. -> [(segment, is_added)]."""
    out, pos, seg = [], 0, 0
    by_len = sorted(added, key=len, reverse=True)
    while pos < len(text):
        m = next((a for a in by_len if text.startswith(a, pos)), None)
        if m is None:
            pos += 1
            continue
        if pos > seg:
            out.append((text[seg:pos], False))
        out.append((m, True))
        pos += len(m)
        seg = pos
    if seg < len(text):
        out.append((text[seg:], False))
    return out


def slow_llama_encode(text, sp, sp_no_prefix, added_ids, legacy, bos=1):
    """The slow LlamaTokenizer of transformers 4.3x as LLaVA used it, from its documented behaviour:
    added tokens split first; legacy: every other segment encoded with sentencepiece's dummy prefix;
    non-legacy: only a segment at the start of the text gets it."""
    ids = [bos]
    for seg, is_added in split_added(text, list(added_ids)):
        if is_added:
            ids.append(added_ids[seg])
        else:
            first = text.startswith(seg) and not ids[1:]
            ids += (sp if (legacy or first) else sp_no_prefix).encode(seg)
    return ids


def no_prefix_processor(model_file):
    """The model with add_dummy_prefix switched off, without protobuf: append a second normalizer_spec
    (field 3) holding add_dummy_prefix (field 3) = false; protobuf merges it over the first."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    patched = spm.SentencePieceProcessor()
    patched.LoadFromSerializedProto(sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
    return patched


def write_png(path, w, h, seed):
    """A deterministic RGB test image with gradients and noise (so resampling is exercised)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def run_llava(*args):
    import subprocess
    return subprocess.run([os.environ["LLAVA_BIN"], *args], capture_output=True, text=True)
