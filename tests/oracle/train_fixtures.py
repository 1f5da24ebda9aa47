"""A tiny chat model dir plus a small LLaVA-format data set (some samples without an image), for tests that
run `llava train` end to end."""
import json

import tiny_llava
from data_fixtures import write_png

QUESTIONS = ["What is shown?", "Describe the picture.", "What color is it?"]
WORDS = ["red", "blue", "a cat", "two dogs", "the sky", "green grass"]


def make_train_world(root, samples, seed=3, layout="modern"):
    """Writes model/ (in tiny_llava.save's `layout`), images/ and data.json under root; returns the base
    config (keys every run shares)."""
    model_dir, _, model, _ = tiny_llava.make_chat_model_dir(root, seed=seed, layout=layout)
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(samples):
        question = QUESTIONS[i % 3]
        answer = " ".join(WORDS[j % 6] for j in range(i % 5 + 1))
        rec = {"id": str(i), "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        if i % 4 != 3:  # some text-only samples
            write_png(str(images / f"{i}.png"), 16 + 2 * i, 20, seed=i)
            rec["image"] = f"{i}.png"
            rec["conversations"][0]["value"] = "<image>\n" + question
        records.append(rec)
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return model, {"model_name_or_path": str(model_dir), "data_path": str(data), "image_folder": str(images),
                   "version": "v1", "model_max_length": 128, "lora_dropout": 0.0}


# LLaVA's find_all_linear_names: every Linear of the language model (lm_head and the towers excluded), as
# PEFT's target_modules regex. Shared by the HF Trainer interop tests and their DeepSpeed runs.
LLM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def collate(rows):
    """HF Trainer's data_collator for rows of our micro-batches (already padded to the same length)."""
    import torch
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "attention_mask")}
    pixels = torch.cat([r["pixel_values"] for r in rows])
    if pixels.shape[0]:
        batch["pixel_values"] = pixels
    return batch
