"""`llava make-demo`: the files it writes are what the demo needs and what HF tooling reads. transformers
loads the random model and computes the same logits as `llava eval-logits`; sentencepiece loads the
tokenizer; the drawn images show what their answers say; the same seed gives the same bytes."""
import json
import os

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import save_file, load_file
from transformers import LlavaForConditionalGeneration

from llava_oracle import binary, run

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190)}


def make_demo(out, seed, train=6, test=3):
    run([binary(), "make-demo", "--out", out, "--seed", seed, "--train-images", train, "--test-images", test])
    return out


def all_files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = all_files(make_demo(tmp_path / "a", 7))
    b = all_files(make_demo(tmp_path / "b", 7))
    c = all_files(make_demo(tmp_path / "c", 8))
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert a["model/model.safetensors"] != c["model/model.safetensors"]
    assert a["data/questions.json"] != c["data/questions.json"]
    expected = {"model/config.json", "model/model.safetensors", "model/tokenizer.model", "model/tokenizer_config.json",
                "model/special_tokens_map.json", "model/preprocessor_config.json", "data/captions.json",
                "data/questions.json", "data/test.json", "data/test.tsv"}
    assert expected <= set(a)
    assert len([k for k in a if k.startswith("data/images/")]) == 6 + 3


def test_transformers_loads_the_model_and_agrees_on_logits(tmp_path):
    out = make_demo(tmp_path / "demo", 1)
    model_dir = out / "model"
    model, info = LlavaForConditionalGeneration.from_pretrained(str(model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()

    # The tokenizer: a sentencepiece model with whole-word pieces, <image> and <pad> right after it.
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    config = json.load(open(model_dir / "config.json"))
    assert config["image_token_index"] == sp.get_piece_size()
    assert config["text_config"]["vocab_size"] == sp.get_piece_size() + 2
    assert sp.encode("What color is the shape?", out_type=str) == ["▁What", "▁color", "▁is", "▁the", "▁shape", "?"]
    tok_cfg = json.load(open(model_dir / "tokenizer_config.json"))
    assert tok_cfg["added_tokens_decoder"][str(sp.get_piece_size())]["content"] == "<image>"

    # One prompt with an image: our logits against transformers' for the same ids and pixels.
    n_image = config["image_seq_length"]
    ids = [1] + sp.encode("USER:") + [config["image_token_index"]] * n_image + sp.encode("What shape is in the image?")
    px = np.asarray(Image.open(out / "data" / "images" / "test_0000.png"), dtype=np.float32) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.tensor(((px - mean) / std).transpose(2, 0, 1), dtype=torch.float32)[None].contiguous()
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": pixels}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    run([binary(), "eval-logits", "--model", model_dir, "--batch", tmp_path / "batch.safetensors",
         "--out", tmp_path / "logits.safetensors"])
    ours = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    with torch.no_grad():
        want = model(**batch).logits
    print(f"\nmax |logit difference| {(ours - want).abs().max().item():.2e} (logit scale {want.abs().max().item():.1f})")
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_images_show_what_the_answers_say(tmp_path):
    out = make_demo(tmp_path / "demo", 2, train=12, test=0)
    records = json.load(open(out / "data" / "questions.json"))
    answers = {}
    for r in records:
        answers.setdefault(r["image"], {})[r["id"].rsplit("_", 1)[1]] = r["conversations"][1]["value"]
        assert r["conversations"][0]["value"].startswith("<image>\n")
    assert len(answers) == 12
    for image, said in answers.items():
        rgb = np.asarray(Image.open(out / "data" / image).convert("RGB"), dtype=np.float64)
        background = rgb[0, 0] if said["position"] != "top left" else rgb[-1, -1]
        shape = np.abs(rgb - background).sum(-1) > 60  # [H,W] pixels of the shape
        ys, xs = np.nonzero(shape)
        half = rgb.shape[0] / 2
        where = ("top" if ys.mean() < half else "bottom") + " " + ("left" if xs.mean() < half else "right")
        assert where == said["position"], image
        color = rgb[shape].mean(0)
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - color).sum())
        assert nearest == said["color"], image
        # A square fills its bounding box, a circle ~pi/4 of it, a triangle ~1/2.
        fill = shape.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.88 else "circle" if fill > 0.65 else "triangle"
        assert kind == said["shape"], (image, fill)
