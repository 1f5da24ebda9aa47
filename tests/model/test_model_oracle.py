"""Our LLaVA (eval-logits, infer, weight loading) against transformers' LlavaForConditionalGeneration with
random weights: logits, loss, every checkpoint layout, bf16, greedy generation, and bad checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_llava as tl
from llava_oracle import assert_clear_error, binary, run

FP32_TOL = 1e-4
LOSS_TOL = 1e-5

# Four configs that differ in what matters: attention layout, tying, feature layers, strategy, biases,
# rope, activation, head_dim, padding side. Each batch holds several images (0..2 per sequence).
CONFIGS = {
    "mha_untied_l-2_default_right": dict(
        cfg=dict(feature_layer=-2, strategy="default", rope_theta=1e4), images=[2, 1], text=[9, 6], padding="right"),
    "gqa_tied_l-1_full_bias_theta1e6_left": dict(
        cfg=dict(kv_heads=2, tie=True, feature_layer=-1, strategy="full", attention_bias=True, rope_theta=1e6),
        images=[1, 2, 0], text=[5, 8, 7], padding="left"),
    "gqa1_list_default_mlpbias_gelu_left": dict(
        cfg=dict(kv_heads=1, feature_layer=[-1, -3], strategy="default", mlp_bias=True, hidden_act="gelu",
                 projector_bias=False), images=[1, 1], text=[4, 10], padding="left"),
    "mha_tied_list_full_headdim_linear_rope_right": dict(
        cfg=dict(tie=True, feature_layer=[-2, -1], strategy="full", head_dim=16, rope_theta=1e6,
                 rope_linear_factor=2.0), images=[2, 1], text=[6, 3], padding="right"),
}


def eval_logits(model_dir, batch, tmp_path, *extra, check=True):
    batch_path, out_path = tmp_path / "batch.safetensors", tmp_path / "out.safetensors"
    save_file(batch, str(batch_path))
    proc = run([binary(), "eval-logits", "--model", model_dir, "--batch", batch_path, "--out", out_path, *extra],
               check=check)
    return proc if not check else load_file(str(out_path))


def hf_forward(model, batch):
    with torch.no_grad():
        return model(**batch)


def compared(logits, ref, mask, padding):
    """Positions to compare: all for right padding; the real tokens for left padding, whose pad rows see
    no key at all (their values are implementation-defined)."""
    if padding == "right":
        return logits, ref
    keep = mask.bool()
    return logits[keep], ref[keep]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, (name, spec) in enumerate(CONFIGS.items()):
        config = tl.make_config(**spec["cfg"])
        model = tl.build(config, seed=i)
        model_dir = str(tmp_path_factory.mktemp(name))
        tl.save(model, model_dir, layout="modern")
        out[name] = (model, model_dir, spec)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_loss_match_transformers(models, name, tmp_path):
    model, model_dir, spec = models[name]
    batch = tl.make_batch(model.config, spec["images"], spec["text"], padding=spec["padding"], seed=7)
    ref = hf_forward(model, batch)
    ours = eval_logits(model_dir, batch, tmp_path)
    assert ours["logits"].dtype == torch.float32 and ours["logits"].shape == ref.logits.shape
    a, b = compared(ours["logits"], ref.logits, batch["attention_mask"], spec["padding"])
    diff = (a - b).abs().max().item()
    loss_diff = abs(ours["loss"].item() - ref.loss.item())
    print(f"\n[{name}] fp32 logits max|diff| = {diff:.3e} (|logits| max {b.abs().max().item():.2f}); "
          f"loss {ours['loss'].item():.6f} vs {ref.loss.item():.6f} (diff {loss_diff:.2e})")
    assert ours["loss"].shape == () and ours["loss"].dtype == torch.float32
    assert diff <= FP32_TOL
    assert loss_diff <= LOSS_TOL
    assert torch.isfinite(ours["logits"]).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_names_and_order_are_hfs(models, name):
    model, model_dir, _ = models[name]
    tool = os.path.join(os.environ["LLAVA_BUILD_DIR"], "tests", "model", "llava_model_tool")
    lines = run([tool, "params", model_dir]).stdout.splitlines()
    assert lines[-1] == "layout transformers>=4.52"
    ours = [(l.split()[0], tuple(int(x) for x in l.split()[2].strip("[]").split(","))) for l in lines[:-1]]
    assert ours == tl.canonical_parameters(model)


@pytest.fixture(scope="module")
def layout_model():
    config = tl.make_config(kv_heads=2, feature_layer=-2)
    return tl.build(config, seed=11)


LAYOUTS = [  # (layout, format, shards, tower inside the checkpoint)
    ("modern", "safetensors", 1, True),
    ("classic", "safetensors", 3, True),
    ("v5", None, 1, True),
    ("original", "bin", 2, True),
    ("original", "safetensors", 1, False),
    ("classic", "bin", 1, True),
]


def test_every_key_layout_gives_the_same_logits(layout_model, tmp_path):
    batch = tl.make_batch(layout_model.config, [1, 2], [7, 5], padding="right", seed=3)
    ref = hf_forward(layout_model, batch).logits
    results = {}
    for layout, fmt, shards, inside in LAYOUTS:
        tag = f"{layout}-{fmt}-{shards}-{'inside' if inside else 'clipdir'}"
        model_dir = str(tmp_path / tag)
        tl.save(layout_model, model_dir, layout=layout, fmt=fmt or "safetensors", shards=shards,
                vision_inside=inside)
        ids = batch["input_ids"]
        if layout == "original":  # LLaVA's IMAGE_TOKEN_INDEX marks the image slots
            ids = ids.masked_fill(ids == tl.IMAGE_TOKEN, -200)
        results[tag] = eval_logits(model_dir, dict(batch, input_ids=ids), tmp_path)["logits"]
        print(f"\n[{tag}] max|diff| vs transformers = {(results[tag] - ref).abs().max().item():.3e}")
    first = next(iter(results.values()))
    for tag, logits in results.items():
        assert torch.equal(logits, first), tag  # the same weights: bit-identical logits
    assert (first - ref).abs().max().item() <= FP32_TOL


def test_layout_name_mapping_points_at_the_stored_keys(layout_model, tmp_path):
    tool = os.path.join(os.environ["LLAVA_BUILD_DIR"], "tests", "model", "llava_model_tool")
    for layout, expected in [("classic", "llava-hf classic"), ("original", "original LLaVA"),
                             ("modern", "transformers>=4.52")]:
        model_dir = str(tmp_path / layout)
        tl.save(layout_model, model_dir, layout=layout)
        lines = run([tool, "params", model_dir]).stdout.splitlines()
        assert lines[-1] == f"layout {expected}"
        stored = set(load_file(os.path.join(model_dir, "model.safetensors")))
        mapped = {l.split()[1] for l in lines[:-1]}
        assert mapped == stored


def test_bf16_logits_within_bf16_precision(layout_model, tmp_path):
    """bf16 keeps 8 significant bits (relative step 2^-8 = 0.39%). Two bf16 implementations that round
    at different points differ by a few such steps per layer; over 2+2 layers the tolerance below allows
    the error of transformers' own bf16 run (vs fp32) plus that much again, both against fp32 and against
    transformers' bf16 logits (two runs each off by e from fp32 can be 2e apart; on an AVX2-only AMD EPYC
    transformers' own bf16 run is off by 0.082 on logits of magnitude ~4, ours by 0.093, and they differ by
    0.109)."""
    model_dir = str(tmp_path / "m")
    tl.save(layout_model, model_dir)
    batch = tl.make_batch(layout_model.config, [1, 1], [6, 6], padding="right", seed=5)
    ref32 = hf_forward(layout_model, batch).logits
    hf16 = tl.build(layout_model.config, seed=11, dtype=torch.bfloat16)
    ref16 = hf_forward(hf16, batch).logits.float()
    ours = eval_logits(model_dir, batch, tmp_path, "--dtype", "bf16")
    ours_vs_32 = (ours["logits"] - ref32).abs().max().item()
    hf_vs_32 = (ref16 - ref32).abs().max().item()
    ours_vs_hf16 = (ours["logits"] - ref16).abs().max().item()
    print(f"\n[bf16] max|ours-fp32| = {ours_vs_32:.3e}, max|hf_bf16-fp32| = {hf_vs_32:.3e}, "
          f"max|ours-hf_bf16| = {ours_vs_hf16:.3e} (|logits| max {ref32.abs().max().item():.2f}); loss {ours['loss'].item():.4f} vs fp32 "
          f"{hf_forward(layout_model, batch).loss.item():.4f}")
    assert ours_vs_32 <= 2 * hf_vs_32 + 1e-3
    assert ours_vs_hf16 <= 2 * hf_vs_32 + 1e-3
    assert abs(ours["loss"].item() - hf_forward(layout_model, batch).loss.item()) < 0.02


def infer(model_dir, ids, pixels_path, *extra):
    proc = run([binary(), "infer", "--model", model_dir, "--input-ids", ",".join(map(str, ids)),
                "--pixels", pixels_path, *extra])
    return [int(t) for t in proc.stdout.split()]


# (config, seed): seeds picked so that the greedy continuations are varied (random tiny models often
# repeat one token) and the first one ends with EOS at step 19.
GENERATION_MODELS = [
    (dict(), 3),
    (dict(kv_heads=2, attention_bias=True, rope_theta=1e6, strategy="full", feature_layer=-1), 6),
]


@pytest.mark.parametrize("kw,seed", GENERATION_MODELS)
def test_greedy_generation_matches_transformers_generate(kw, seed, tmp_path):
    model = tl.build(tl.make_config(**kw), seed=seed)
    model_dir = tl.save(model, str(tmp_path / "m"))
    batch = tl.make_batch(model.config, [1], [6], seed=9)
    pixels = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": batch["pixel_values"]}, str(pixels))
    with torch.no_grad():  # generation_config: eos 2, like our binary (it stops at the config's EOS)
        ref = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], max_new_tokens=20, do_sample=False)
    expected = ref[0, batch["input_ids"].shape[1]:].tolist()
    ours = infer(model_dir, batch["input_ids"][0].tolist(), pixels, "--max-new-tokens", "20")
    print(f"\n[generate {seed}] transformers {expected}\n[generate {seed}] ours         {ours}")
    assert len(set(expected)) > 3
    assert ours == expected


def test_batched_left_padded_greedy_generation_matches_transformers(tmp_path):
    """Exercises generate's cumsum positions and padding masks over the KV cache (batch of 3, left padded)."""
    model = tl.build(tl.make_config(kv_heads=2), seed=6)
    model_dir = tl.save(model, str(tmp_path / "m"))
    batch = tl.make_batch(model.config, [1, 0, 2], [6, 3, 5], padding="left", seed=4)
    del batch["labels"]
    batch_path = tmp_path / "gen.safetensors"
    save_file(batch, str(batch_path))
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].shape[1]:]
    tool = os.path.join(os.environ["LLAVA_BUILD_DIR"], "tests", "model", "llava_model_tool")
    ours = [[int(t) for t in line.split()] for line in run([tool, "generate", model_dir, batch_path, 12]).stdout.splitlines()]
    print(f"\n[batched generate] transformers {ref.tolist()}\n[batched generate] ours         {ours}")
    assert ours == ref.tolist()


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tmp_path):
    model = tl.build(tl.make_config(), seed=3)
    model_dir = tl.save(model, str(tmp_path / "m"))
    batch = tl.make_batch(model.config, [1], [6], seed=9)
    pixels = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": batch["pixel_values"]}, str(pixels))
    ids = batch["input_ids"][0].tolist()
    greedy = infer(model_dir, ids, pixels, "--max-new-tokens", "12")
    sample = lambda seed, top_p: infer(model_dir, ids, pixels, "--max-new-tokens", "12", "--temperature", "1.5",
                                       "--top-p", str(top_p), "--seed", str(seed))
    assert sample(1, 1.0) == sample(1, 1.0)
    assert sample(1, 1e-9) == greedy
    assert any(sample(s, 1.0) != greedy for s in range(1, 4))  # at T=1.5 sampling really samples


# ---- bad checkpoints: one clear error line, exit status 1 ----

def good_dir(layout_model, tmp_path, **kw):
    model_dir = str(tmp_path / "bad")
    tl.save(layout_model, model_dir, **kw)
    return model_dir


def run_bad(model_dir, layout_model, tmp_path, *extra):
    batch = tl.make_batch(layout_model.config, [1], [4], seed=1)
    return eval_logits(model_dir, batch, tmp_path, *extra, check=False)


def test_missing_tensor(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path)
    path = os.path.join(d, "model.safetensors")
    state = load_file(path)
    del state["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)
    assert_clear_error(run_bad(d, layout_model, tmp_path), "1 missing", "layers.1.mlp.up_proj.weight")


def test_wrong_shape(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path)
    path = os.path.join(d, "model.safetensors")
    state = load_file(path)
    state["model.multi_modal_projector.linear_1.weight"] = torch.zeros(32, 31)
    save_file(state, path)
    assert_clear_error(run_bad(d, layout_model, tmp_path), "wrong shape", "linear_1.weight", "[32, 31]")


def test_corrupted_shard(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path, layout="classic", shards=2)
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    assert_clear_error(run_bad(d, layout_model, tmp_path), "model-00002-of-00002.safetensors")


def edit_config(d, fn):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("edit,needles", [
    (lambda c: c["text_config"].update(num_hidden_layers=3), ["missing", "layers.2."]),
    (lambda c: c["text_config"].update(num_hidden_layers=1), ["unexpected", "layers.1."]),
    (lambda c: c["text_config"].update(intermediate_size=50), ["wrong shape", "mlp"]),
    (lambda c: c["vision_config"].update(patch_size=4), ["wrong shape", "patch_embedding"]),
    (lambda c: c.update(model_type="mllama"), ["model_type 'mllama'"]),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), ["yarn"]),
    (lambda c: c["text_config"].update(model_type="mistral"), ["mistral"]),
    (lambda c: c.update(vision_feature_layer=5), ["vision feature layer 5"]),
])
def test_config_that_contradicts_the_weights_or_is_unsupported(layout_model, tmp_path, edit, needles):
    d = good_dir(layout_model, tmp_path)
    edit_config(d, edit)
    assert_clear_error(run_bad(d, layout_model, tmp_path), *needles)


def test_untied_config_for_tied_weights(models, tmp_path):
    model, _, _ = models["gqa_tied_l-1_full_bias_theta1e6_left"]
    d = str(tmp_path / "m")
    tl.save(model, d)
    edit_config(d, lambda c: (c.update(tie_word_embeddings=False), c["text_config"].update(tie_word_embeddings=False)))
    batch = tl.make_batch(model.config, [1], [4], seed=1)
    assert_clear_error(eval_logits(d, batch, tmp_path, check=False), "1 missing", "lm_head.weight")


def test_original_llava_unsupported_projector_and_missing_tower(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path, layout="original", vision_inside=False)
    edit_config(d, lambda c: c.update(mm_projector_type="linear"))
    assert_clear_error(run_bad(d, layout_model, tmp_path), "mm_projector_type 'linear'")
    edit_config(d, lambda c: c.update(mm_projector_type="mlp2x_gelu", mm_vision_tower="openai/clip-nowhere"))
    assert_clear_error(run_bad(d, layout_model, tmp_path), "openai/clip-nowhere")


def test_adapter_dir_that_is_no_adapter_is_refused(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path)
    assert_clear_error(run_bad(d, layout_model, tmp_path, "--adapter", str(tmp_path)), str(tmp_path),
                       "no adapter_config.json")


def test_image_token_count_must_match_images(layout_model, tmp_path):
    d = good_dir(layout_model, tmp_path)
    batch = tl.make_batch(layout_model.config, [2], [6], seed=1)
    batch["pixel_values"] = batch["pixel_values"][:1]
    assert_clear_error(eval_logits(d, batch, tmp_path, check=False), "image tokens")
