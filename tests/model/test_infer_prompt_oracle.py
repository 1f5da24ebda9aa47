"""`llava infer --image --prompt` end to end: our tokenizer, template, image preprocessing, model and
generation against transformers (fast Llama tokenizer + CLIPImageProcessor + LlavaForConditionalGeneration)."""
import torch
from PIL import Image

import tiny_llava
from data_fixtures import write_png
from llava_oracle import binary, run

QUESTION = "What is shown in the image?"


def hf_ids(tok, text):
    """HF's ids for `text` with BOS: the fixture tokenizer that transformers 5 builds ignores add_bos_token
    (see data_fixtures.make_hf_tokenizer_dir), while Llama / llava-hf tokenizers add it."""
    ids = tok(text).input_ids
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


def test_prompt_and_image_generate_what_transformers_generates(tmp_path):
    model_dir, tok, model, processor = tiny_llava.make_chat_model_dir(tmp_path)
    image_path = tmp_path / "img.png"
    write_png(str(image_path), 16, 16, seed=5)

    # The llava-hf chat format with the generation prompt, <image> expanded to the image's rows.
    ids = hf_ids(tok, f"USER: <image>\n{QUESTION} ASSISTANT:")
    n_image = tiny_llava.image_tokens(model.config)
    image_id = model.config.image_token_index
    expanded = [t for i in ids for t in ([i] * n_image if i == image_id else [i])]
    pixels = processor(images=Image.open(image_path), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
                             pixel_values=pixels, max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = out[0, len(expanded):].tolist()

    args = ["infer", "--model", model_dir, "--image", image_path, "--prompt", QUESTION, "--max-new-tokens", 12]
    got_ids = [int(x) for x in run([binary(), *args, "--ids"]).stdout.split()]
    print(f"\nprompt of {len(expanded)} ids ({n_image} image rows); transformers: {want}; ours: {got_ids}")
    assert got_ids == want
    # Text: sentencepiece's own decode (what LLaVA's slow tokenizer does). HF's fast ByteFallback decoder
    # turns a whole invalid byte run into U+FFFD, which random weights produce often.
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    got_text = run([binary(), *args]).stdout.rstrip("\n")
    assert got_text == sp.decode([i for i in want if i < sp.get_piece_size()])


def test_prompt_without_image_and_bad_arguments(tmp_path):
    model_dir, tok, model, _ = tiny_llava.make_chat_model_dir(tmp_path)
    ids = hf_ids(tok, f"USER: {QUESTION} ASSISTANT:")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = run([binary(), "infer", "--model", model_dir, "--prompt", QUESTION, "--max-new-tokens", 8, "--ids"]).stdout
    assert [int(x) for x in got.split()] == out[0, len(ids):].tolist()

    proc = run([binary(), "infer", "--model", model_dir, "--image", tmp_path / "missing.png", "--prompt", "hi"], check=False)
    assert proc.returncode == 1 and "missing.png" in proc.stderr
    proc = run([binary(), "infer", "--model", model_dir, "--image", tmp_path / "missing.png"], check=False)
    assert proc.returncode == 1 and "--image" in proc.stderr and "--prompt" in proc.stderr
