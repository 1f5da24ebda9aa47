"""Tiny random LlavaForConditionalGeneration models (transformers) and ways to save them in every checkpoint
layout our loader reads. Shared by the model tests and, later, the training tests.

Canonical names are ours (= transformers 4.52-4.57): model.vision_tower.vision_model.*, ...; transformers 5
itself names the CLIP tower model.vision_tower.* (no vision_model level)."""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 3  # ids 0..2 are pad/bos/eos; text ids are drawn from [4, vocab)


def make_config(vocab=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=None, head_dim=None,
                tie=False, attention_bias=False, mlp_bias=False, rope_theta=1e4, rope_linear_factor=None,
                hidden_act="silu", vision_hidden=32, vision_intermediate=40, vision_layers=2, vision_heads=4,
                image_size=8, patch_size=2, feature_layer=-2, strategy="default", projector_bias=True):
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_linear_factor:
        rope = {"rope_type": "linear", "rope_theta": rope_theta, "factor": rope_linear_factor}
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                head_dim=head_dim, hidden_act=hidden_act, rms_norm_eps=1e-5, attention_bias=attention_bias,
                mlp_bias=mlp_bias, tie_word_embeddings=tie, rope_parameters=rope, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    vision = dict(model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
                  patch_size=patch_size, projection_dim=vision_hidden)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                       tie_word_embeddings=tie, multimodal_projector_bias=projector_bias,
                       image_seq_length=image_tokens_of(image_size, patch_size, strategy))


def image_tokens_of(image_size, patch_size, strategy):
    return (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)


def image_tokens(config):
    v = config.vision_config
    return image_tokens_of(v.image_size, v.patch_size, config.vision_feature_select_strategy)


def build(config, seed=0, dtype=torch.float32):
    """A model whose weights are O(1) (HF's 0.02 init makes every logit ~0, which would hide bugs)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:  # embeddings, class embedding, biases
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.1))
    return model.to(dtype)


def canonical_name(hf_name):
    """transformers-5 parameter name -> ours (the 4.52 name)."""
    if hf_name.startswith("model.vision_tower.") and not hf_name.startswith("model.vision_tower.vision_model."):
        return "model.vision_tower.vision_model." + hf_name[len("model.vision_tower."):]
    return hf_name


def canonical_parameters(model):
    """[(canonical name, shape)] in named_parameters() order (tied lm_head deduplicated, like HF)."""
    return [(canonical_name(n), tuple(p.shape)) for n, p in model.named_parameters()]


def canonical_state_dict(model):
    tied = model.config.tie_word_embeddings
    out = {}
    for n, p in model.named_parameters():
        out[canonical_name(n)] = p.detach().clone().contiguous()
    if tied:
        out.pop("lm_head.weight", None)
    return out


def to_layout(state, layout):
    """Canonical state dict -> names of `layout`: classic | modern | original (tower inside)."""
    out = {}
    for name, t in state.items():
        if layout == "modern":
            new = name
        elif layout == "classic":
            new = ("language_model." + name if name.startswith("lm_head.") else
                   name.replace("model.language_model.", "language_model.model.", 1)
                   .replace("model.vision_tower.", "vision_tower.", 1)
                   .replace("model.multi_modal_projector.", "multi_modal_projector.", 1))
        elif layout == "original":
            new = (name.replace("model.language_model.", "model.", 1)
                   .replace("model.vision_tower.", "model.vision_tower.vision_tower.", 1)
                   .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.", 1)
                   .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.", 1))
        else:
            raise ValueError(layout)
        out[new] = t
    return out


def _write_tensors(state, out_dir, fmt, shards):
    """fmt: safetensors | bin; shards > 1 splits the keys into that many files with an HF index."""
    names = list(state)
    base, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{base}.{ext}" if shards == 1 else f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n] for n in group}
        if fmt == "safetensors":
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(out_dir, fname))
        weight_map.update({n: fname for n in group})
    if shards > 1:
        with open(os.path.join(out_dir, f"{base}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def original_config_dict(config, vision_tower_path):
    """The original LLaVA repo's config.json for the same model (LlamaConfig + mm_* keys)."""
    t = config.text_config
    d = {k: getattr(t, k) for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                                    "rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings",
                                    "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings"]}
    d.update(rope_theta=t.rope_parameters["rope_theta"], rope_scaling=None, model_type="llava_llama",
             architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=vision_tower_path,
             mm_projector_type="mlp2x_gelu", mm_hidden_size=config.vision_config.hidden_size,
             mm_vision_select_layer=config.vision_feature_layer,
             mm_vision_select_feature="patch" if config.vision_feature_select_strategy == "default" else "cls_patch",
             image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
             mm_patch_merge_type="flat")
    return d


def save_clip_dir(model, out_dir, fmt="safetensors"):
    """The CLIP tower alone, as CLIPVisionModel checkpoints store it (vision_model.* keys)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config.vision_config.to_dict()
    cfg["model_type"] = "clip_vision_model"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = {n[len("model.vision_tower."):]: t for n, t in canonical_state_dict(model).items()
             if n.startswith("model.vision_tower.")}
    _write_tensors(state, out_dir, fmt, 1)


def save(model, out_dir, layout="modern", fmt="safetensors", shards=1, vision_inside=True):
    """Writes config.json + weights. layout: modern | classic | v5 (transformers' own save_pretrained) |
    original (LLaVA repo: tower inside the checkpoint, or in out_dir/clip when vision_inside=False)."""
    os.makedirs(out_dir, exist_ok=True)
    if layout == "v5":
        model.save_pretrained(out_dir)
        return out_dir
    state = canonical_state_dict(model)
    if layout == "original":
        clip_dir = os.path.join(out_dir, "clip")
        if not vision_inside:
            save_clip_dir(model, clip_dir)
            state = {n: t for n, t in state.items() if not n.startswith("model.vision_tower.")}
        else:  # the config still needs the CLIP config
            os.makedirs(clip_dir, exist_ok=True)
            cfg = model.config.vision_config.to_dict()
            cfg["model_type"] = "clip_vision_model"
            with open(os.path.join(clip_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(original_config_dict(model.config, "clip"), f, indent=2)
    else:
        model.config.save_pretrained(out_dir)
    _write_tensors(to_layout(state, layout), out_dir, fmt, shards)
    return out_dir


def make_batch(config, layout_of_images, text_lens, padding="right", seed=0):
    """A batch of B sequences. layout_of_images[b] = number of images in sequence b; each image is placed
    after a run of text tokens; text_lens[b] = text tokens of sequence b. Returns dict of tensors
    (input_ids, attention_mask, pixel_values, labels) like the eval-logits contract."""
    g = torch.Generator().manual_seed(seed)
    n_img_tok = image_tokens(config)
    vocab = config.text_config.vocab_size
    rows = []
    for n_images, n_text in zip(layout_of_images, text_lens):
        cuts = sorted(torch.randint(1, n_text, (n_images,), generator=g).tolist()) if n_images else []
        text = torch.randint(4, vocab, (n_text,), generator=g).tolist()
        text[0] = 1  # BOS
        row, prev = [], 0
        for c in cuts:
            row += text[prev:c] + [IMAGE_TOKEN] * n_img_tok
            prev = c
        rows.append(row + text[prev:])
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if padding == "right" else slice(T - len(r), T)
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    labels = ids.clone()
    labels[(mask == 0) | (ids == IMAGE_TOKEN)] = -100
    v = config.vision_config
    pixels = torch.randn(sum(layout_of_images), 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def make_chat_model_dir(root, seed=3, layout="modern"):
    """A complete model dir at root/model: a tiny sentencepiece tokenizer (llava-hf added tokens) trained
    here, a tiny LLaVA whose vocab and image token match it (16 px images, 16 image rows) saved in `layout`
    (see save(); "v5": transformers' own save_pretrained), and a preprocessor_config.json.
    Returns (model_dir, tokenizer, model, image_processor)."""
    from transformers import CLIPImageProcessor
    from data_fixtures import make_hf_tokenizer_dir, train_spm
    model_dir = root / "model"
    tok = make_hf_tokenizer_dir(str(model_dir), train_spm(str(root / "spm")), legacy=True, llava_hf=True)
    config = make_config(vocab=len(tok), image_size=16, patch_size=4)
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    model = build(config, seed=seed)
    save(model, str(model_dir), layout=layout)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(str(model_dir))
    return model_dir, tok, model, processor
