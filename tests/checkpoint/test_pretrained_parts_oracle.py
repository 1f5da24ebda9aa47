"""Inference loading of trained parts made by other tools: a PEFT LoRA adapter over the base model (both
key layouts of the base checkpoint), and LLaVA's projector files (mm_projector.bin, non_lora_trainables.bin)."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import tiny_llava
from llava_oracle import assert_clear_error, binary, run


def eval_logits(model_dir, batch, tmp_path, *extra):
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "batch.safetensors"))
    run([binary(), "eval-logits", "--model", model_dir, "--batch", tmp_path / "batch.safetensors",
         "--out", tmp_path / "out.safetensors", *extra])
    return load_file(str(tmp_path / "out.safetensors"))["logits"]


def hf_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.float()


def peft_with_random_adapters(config, targets, alpha, seed, out_dir):
    """A PEFT model over tiny_llava.build(config, seed=1) whose LoRA weights are all random (PEFT starts B
    at zero, which would hide the adapter), saved to out_dir with save_pretrained."""
    peft = get_peft_model(tiny_llava.build(config, seed=1),
                          LoraConfig(r=4, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft.eval()
    peft.save_pretrained(str(out_dir))
    return peft


@pytest.mark.parametrize("layout", ["modern", "classic"])
def test_peft_adapter_gives_peft_logits(tmp_path, layout):
    config = tiny_llava.make_config()
    base = tiny_llava.build(config, seed=1)
    model_dir = tiny_llava.save(base, str(tmp_path / "base"), layout=layout)
    peft = peft_with_random_adapters(config, ["q_proj", "v_proj", "down_proj", "linear_1", "fc2"], 8, 2,
                                     tmp_path / "adapter")
    batch = tiny_llava.make_batch(config, [1, 2], [5, 7], seed=3)
    want = hf_logits(peft, batch)
    got = eval_logits(model_dir, batch, tmp_path, "--adapter", tmp_path / "adapter")
    diff = (got - want).abs().max().item()
    without = (hf_logits(base, batch) - want).abs().max().item()
    print(f"\n[{layout}] adapter logits vs PEFT: max abs diff {diff:.3g} (the adapter moves logits by {without:.3g})")
    assert without > 0.1
    assert diff <= 1e-4


@pytest.mark.parametrize("naming", ["mm_projector", "non_lora_trainables"])
def test_llava_projector_files_replace_the_projector(tmp_path, naming):
    config = tiny_llava.make_config()
    base = tiny_llava.build(config, seed=1)
    model_dir = tiny_llava.save(base, str(tmp_path / "base"))
    trained = tiny_llava.build(config, seed=1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in trained.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    proj = trained.model.multi_modal_projector
    prefix = "model.mm_projector" if naming == "mm_projector" else "base_model.model.model.mm_projector"
    state = {f"{prefix}.0.weight": proj.linear_1.weight, f"{prefix}.0.bias": proj.linear_1.bias,
             f"{prefix}.2.weight": proj.linear_2.weight, f"{prefix}.2.bias": proj.linear_2.bias}
    if naming == "non_lora_trainables":  # LoRA runs save LoRA weights elsewhere; other keys are ignored
        state["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    torch.save({k: v.detach().clone() for k, v in state.items()}, tmp_path / f"{naming}.bin")
    batch = tiny_llava.make_batch(config, [1, 1], [6, 4], seed=5)
    want = hf_logits(trained, batch)
    got = eval_logits(model_dir, batch, tmp_path, "--projector", tmp_path / f"{naming}.bin")
    diff = (got - want).abs().max().item()
    print(f"\n[{naming}.bin] logits vs transformers with that projector: max abs diff {diff:.3g}")
    assert diff <= 1e-4


def test_bad_adapter_and_projector_files(tmp_path):
    config = tiny_llava.make_config()
    model_dir = tiny_llava.save(tiny_llava.build(config), str(tmp_path / "base"))
    batch = tiny_llava.make_batch(config, [1], [4])
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "b.safetensors"))
    base_args = [binary(), "eval-logits", "--model", model_dir, "--batch", tmp_path / "b.safetensors", "--out", tmp_path / "o"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.model.language_model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.language_model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(32, 4)},
              str(adapter / "adapter_model.safetensors"))
    assert_clear_error(run([*base_args, "--adapter", adapter], check=False), "self_attn.nope", "no Linear")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    assert_clear_error(run([*base_args, "--adapter", adapter], check=False), "use_dora", "not supported")

    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 32)}, tmp_path / "partial.bin")
    assert_clear_error(run([*base_args, "--projector", tmp_path / "partial.bin"], check=False),
                       "partial.bin", "no projector weight")


@pytest.mark.parametrize("layout", ["modern", "classic"])
def test_merged_model_loads_in_transformers_with_peft_logits(tmp_path, layout):
    from transformers import LlavaForConditionalGeneration
    config = tiny_llava.make_config()
    base_dir = tiny_llava.save(tiny_llava.build(config, seed=1), str(tmp_path / "base"), layout=layout)
    peft = peft_with_random_adapters(config, ["q_proj", "o_proj", "up_proj"], 8, 6, tmp_path / "adapter")
    out = tmp_path / "merged"
    run([binary(), "merge", "--model", base_dir, "--adapter", tmp_path / "adapter", "--out", out,
         "--max-shard-size", "20KB"])
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    merged = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    batch = tiny_llava.make_batch(config, [1, 1], [5, 3], seed=7)
    want = hf_logits(peft, batch)
    diff = (hf_logits(merged, batch) - want).abs().max().item()
    ours = (eval_logits(str(out), batch, tmp_path) - want).abs().max().item()
    print(f"\n[{layout}] merged model in transformers vs PEFT: {diff:.3g}; ours on the merged dir: {ours:.3g}")
    assert diff <= 1e-4 and ours <= 1e-4

    again = run([binary(), "merge", "--model", base_dir, "--adapter", tmp_path / "adapter", "--out", out], check=False)
    assert_clear_error(again, str(out), "not empty")


@pytest.mark.parametrize("layout", ["modern", "classic"])
def test_our_adapter_files_load_in_peft_in_the_base_layout(tmp_path, layout):
    import os
    from peft import PeftModel
    from safetensors import safe_open
    config = tiny_llava.make_config()
    base_dir = tiny_llava.save(tiny_llava.build(config, seed=1), str(tmp_path / "base"), layout=layout)
    peft = peft_with_random_adapters(config, ["k_proj", "gate_proj", "fc1"], 16, 8, tmp_path / "adapter")
    run([os.environ["LLAVA_TRAIN_TOOL"], "adapter-copy", base_dir, tmp_path / "adapter", tmp_path / "ours"])
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    text_prefix = {"modern": "base_model.model.model.language_model.", "classic": "base_model.model.language_model.model."}
    assert any(k.startswith(text_prefix[layout]) for k in keys), keys[:3]
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["fc1", "gate_proj", "k_proj"]
    reloaded = PeftModel.from_pretrained(tiny_llava.build(config, seed=1), str(tmp_path / "ours")).eval()
    batch = tiny_llava.make_batch(config, [1], [6], seed=9)
    diff = (hf_logits(reloaded, batch) - hf_logits(peft, batch)).abs().max().item()
    print(f"\n[{layout}] PeftModel.from_pretrained(our adapter) vs the original: {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("layout,peft", [("original", False), ("original", True), ("modern", False)])
def test_our_projector_files_use_llava_names_and_load_weights_only(tmp_path, layout, peft):
    import os
    config = tiny_llava.make_config()
    model = tiny_llava.build(config, seed=1)
    base_dir = tiny_llava.save(model, str(tmp_path / "base"), layout=layout)
    proj = model.model.multi_modal_projector
    names = {"original": ["model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                          "model.mm_projector.2.bias"],
             "modern": ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
                        "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]}[layout]
    values = [proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight, proj.linear_2.bias]
    g = torch.Generator().manual_seed(10)
    src = {n: torch.randn(v.shape, generator=g) for n, v in zip(names, values)}
    torch.save(src, tmp_path / "in.bin")
    args = [os.environ["LLAVA_TRAIN_TOOL"], "projector-copy", base_dir, tmp_path / "in.bin", tmp_path / "out.bin"]
    run(args + (["--peft"] if peft else []))
    out = torch.load(tmp_path / "out.bin", weights_only=True)
    prefix = "base_model.model." if peft else ""
    assert sorted(out) == sorted(prefix + n for n in names)
    for n in names:
        assert torch.equal(out[prefix + n], src[n])
