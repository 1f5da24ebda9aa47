"""Bad input through the real CLI: each case breaks one config, data file, image, tokenizer file, model dir
or checkpoint of a working tiny setup and runs `llava train`, `preprocess`, `infer`, `eval-logits` or
`inspect` on it. Every case must end with a non-zero exit status (not a signal), exactly one `error:` line
on stderr that names the file / key / record at fault, and within the timeout (no hang). Cases where the
product does something else today are listed with xfail(strict=True) and the reason says what it does."""
import json
import os
import shutil
import struct
import zlib

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tiny_llava
from data_fixtures import write_png
from llava_oracle import binary, run

TIMEOUT = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    model_dir, tok, _, _ = tiny_llava.make_chat_model_dir(root)
    images = root / "images"
    images.mkdir()
    write_png(str(images / "ok.png"), 20, 16, seed=1)
    good = [{"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                            {"from": "gpt", "value": "A pattern."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}]}]
    (root / "data.json").write_text(json.dumps(good))
    base = {"model_name_or_path": str(model_dir), "data_path": str(root / "data.json"), "image_folder": str(images),
            "version": "v1", "model_max_length": 96, "per_device_train_batch_size": 2, "max_steps": 1,
            "tune_mm_mlp_adapter": True, "output_dir": str(root / "out"), "save_steps": 100}
    (root / "good.yaml").write_text(yaml.safe_dump(base))
    ids = tok("Hello there", return_tensors="pt").input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    save_file(batch, str(root / "batch.safetensors"))
    return {"root": root, "model": model_dir, "base": base, "good": good, "images": images, "n": [0]}


# ------------------------------------------------------------------------------------------- builders

def fresh(world, name):
    world["n"][0] += 1
    d = world["root"] / f"case{world['n'][0]}_{name}"
    d.mkdir()
    return d


def config(world, d, text=None, **settings):
    """A train config in d: the working one with `settings` changed (None removes a key), or raw text."""
    path = d / "train.yaml"
    if text is not None:
        path.write_text(text)
    else:
        cfg = {**world["base"], "output_dir": str(d / "out"), **settings}
        path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def train_with_data(world, d, records=None, raw=None, name="data.json", **settings):
    path = d / name
    path.write_text(raw if raw is not None else json.dumps(records))
    return ["train", config(world, d, data_path=str(path), **settings)]


def train_with_image(world, d, image_bytes=None, make=None):
    images = d / "images"
    images.mkdir()
    if make:
        make(images / "bad.png")
    else:
        (images / "bad.png").write_bytes(image_bytes)
    rec = [{"id": "img7", "image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                {"from": "gpt", "value": "Something."}]}]
    return train_with_data(world, d, rec, image_folder=str(images))


def model_copy(world, d):
    m = d / "model"
    shutil.copytree(world["model"], m)
    return m


def train_with_model(world, d, change):
    m = model_copy(world, d)
    change(m)
    return ["train", config(world, d, model_name_or_path=str(m))]


def infer_with_model(world, d, change):
    m = model_copy(world, d)
    change(m)
    return ["infer", "--model", m, "--input-ids", "1,5,6", "--max-new-tokens", 1]


def edit_json(path, **changes):
    j = json.loads(path.read_text())
    for k, v in changes.items():
        section, _, key = k.rpartition("__")
        (j[section] if section else j)[key] = v
    path.write_text(json.dumps(j))


def edit_weights(m, fn):
    sd = load_file(str(m / "model.safetensors"))
    fn(sd)
    save_file(sd, str(m / "model.safetensors"))


def first_weight(sd, part):
    return next(k for k in sorted(sd) if part in k)


def truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def png_with_size(w, h):
    """A PNG whose header claims w x h pixels, followed by one tiny IDAT (no real pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def torch_save(obj, path):
    torch.save(obj, str(path))
    return path


def checkpoint_dir(world, d, files):
    """A stage-1 checkpoint folder for resume_from_checkpoint with the given files."""
    c = d / "checkpoint-1"
    c.mkdir()
    for name, content in files.items():
        (c / name).write_bytes(content) if isinstance(content, bytes) else (c / name).write_text(content)
    return ["train", config(world, d, resume_from_checkpoint=str(c))]


def pickle_with_global(module, name):
    """A torch.save archive whose data.pkl calls module.name (what a malicious checkpoint does)."""
    import io
    import zipfile
    pkl = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX\x04\x00\x00\x00echo\x85R."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


GOOD_TURNS = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]


# --------------------------------------------------------------------------------------------- cases
# (id, build(world, dir) -> argv, words the error line must contain, xfail reason or None)
CASES = [
    # --- training configs
    ("config_empty", lambda w, d: ["train", config(w, d, text="")], ["train.yaml"], None),
    ("config_not_a_map", lambda w, d: ["train", config(w, d, text="- a\n- b\n")], ["train.yaml", "map"], None),
    ("config_invalid_yaml", lambda w, d: ["train", config(w, d, text="max_steps: [1, 2\n")], ["train.yaml", "YAML"], None),
    ("config_missing_file", lambda w, d: ["train", d / "nope.yaml"], ["nope.yaml"], None),
    ("config_unknown_key", lambda w, d: ["train", config(w, d, learning_rat=1e-3)], ["learning_rat", "learning_rate"], None),
    ("config_wrong_type", lambda w, d: ["train", config(w, d, max_steps="many")], ["max_steps"], None),
    ("config_zero_batch_size", lambda w, d: ["train", config(w, d, per_device_train_batch_size=0)],
     ["per_device_train_batch_size"], None),
    ("config_nan_learning_rate", lambda w, d: ["train", config(w, d, learning_rate=float("nan"))], ["learning_rate"], None),
    ("config_missing_model", lambda w, d: ["train", config(w, d, model_name_or_path=str(d / "no_model"))], ["no_model"], None),
    ("config_bad_set_override", lambda w, d: ["train", config(w, d), "--set", "max_steps"], ["max_steps"], None),
    # --- data files
    ("data_empty_file", lambda w, d: train_with_data(w, d, raw=""), ["data.json"], None),
    ("data_truncated_json", lambda w, d: train_with_data(w, d, raw=json.dumps(w["good"])[:40]), ["data.json"], None),
    ("data_record_wrong_type", lambda w, d: train_with_data(w, d, ["just a string"]), ["data.json", "record 0"], None),
    ("data_no_conversations", lambda w, d: train_with_data(w, d, [{"id": "x", "conversations": []}]),
     ["data.json", "record 0", "conversations"], None),
    ("data_jsonl_bad_line", lambda w, d: train_with_data(
        w, d, raw=json.dumps({"id": "1", "conversations": GOOD_TURNS}) + "\n{oops\n", name="data.jsonl"),
     ["data.jsonl", "line 2"], None),
    ("data_unknown_role", lambda w, d: train_with_data(
        w, d, [{"id": "r", "conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]}]),
     ["data.json", "record 0"], None),
    ("data_image_without_image_token", lambda w, d: train_with_data(
        w, d, [{"id": "t", "image": "ok.png", "conversations": GOOD_TURNS}]), ["data.json", "record 0"], None),
    # (Two <image> in one turn are one image token, as in LLaVA's preprocess_multimodal; in two turns, two.)
    ("data_more_image_tokens_than_images", lambda w, d: train_with_data(
        w, d, [{"id": "t", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nOne?"},
                                                                 {"from": "gpt", "value": "Yes."},
                                                                 {"from": "human", "value": "<image>\nTwo?"},
                                                                 {"from": "gpt", "value": "No."}]}]),
     ["data.json", "record 0", "2 <image> tokens"], None),
    ("data_image_token_without_image", lambda w, d: train_with_data(
        w, d, [{"id": "t", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}]),
     ["data.json", "record 0"], None),
    ("data_labels_all_masked", lambda w, d: train_with_data(
        w, d, [{"id": "q", "conversations": [{"from": "human", "value": "Only a question, no answer"}]}]),
     ["data.json", "1 of the 1 records checked", "masked whole", "record 0"], None),  # before training starts
    ("data_answers_cut_off", lambda w, d: train_with_data(  # every answer past model_max_length
        w, d, [{"id": "c", "conversations": [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "x"}]}],
        model_max_length=20),
     ["data.json", "no record", "model_max_length 20"], None),
    ("data_missing_image_file", lambda w, d: train_with_data(
        w, d, [{"id": "m", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                      {"from": "gpt", "value": "x"}]}]),
     ["record 0", "missing.png"], None),
    # --- images
    ("image_empty_file", lambda w, d: train_with_image(w, d, b""), ["record 0", "bad.png"], None),
    ("image_truncated_png", lambda w, d: train_with_image(w, d, (w["images"] / "ok.png").read_bytes()[:60]),
     ["record 0", "bad.png"], None),
    ("image_not_an_image", lambda w, d: train_with_image(w, d, b"this is text, not pixels\n" * 4), ["record 0", "bad.png"], None),
    ("image_huge_dimensions", lambda w, d: train_with_image(w, d, png_with_size(100000, 100000)), ["record 0", "bad.png"], None),
    ("image_is_a_directory", lambda w, d: train_with_image(w, d, make=lambda p: p.mkdir()), ["record 0", "bad.png"], None),
    # --- tokenizer files
    ("tokenizer_model_empty", lambda w, d: train_with_model(w, d, lambda m: (m / "tokenizer.model").write_bytes(b"")),
     ["tokenizer.model"], None),
    ("tokenizer_model_garbage", lambda w, d: train_with_model(
        w, d, lambda m: (m / "tokenizer.model").write_bytes(os.urandom(0) + b"\x08\x96\x01garbage" * 50)), ["tokenizer.model"], None),
    ("tokenizer_model_missing", lambda w, d: train_with_model(w, d, lambda m: (m / "tokenizer.model").unlink()),
     ["tokenizer"], None),
    ("tokenizer_config_truncated", lambda w, d: train_with_model(w, d, lambda m: truncate(m / "tokenizer_config.json")),
     ["tokenizer_config.json"], None),
    # --- model dirs
    ("model_config_missing", lambda w, d: infer_with_model(w, d, lambda m: (m / "config.json").unlink()), ["config.json"], None),
    ("model_config_truncated", lambda w, d: infer_with_model(w, d, lambda m: truncate(m / "config.json")), ["config.json"], None),
    ("model_config_wrong_type", lambda w, d: infer_with_model(w, d, lambda m: edit_json(m / "config.json", text_config__hidden_size="big")),
     ["config.json", "hidden_size"], None),
    ("model_config_huge_dimensions", lambda w, d: infer_with_model(
        w, d, lambda m: edit_json(m / "config.json", text_config__hidden_size=10**12)), ["config.json", "hidden_size"], None),
    ("model_config_zero_patch_size", lambda w, d: infer_with_model(
        w, d, lambda m: edit_json(m / "config.json", vision_config__patch_size=0)), ["config.json", "patch_size"], None),
    ("model_weights_truncated", lambda w, d: infer_with_model(w, d, lambda m: truncate(m / "model.safetensors")),
     ["model.safetensors"], None),
    ("model_weights_empty", lambda w, d: infer_with_model(w, d, lambda m: (m / "model.safetensors").write_bytes(b"")),
     ["model.safetensors"], None),
    ("model_weights_wrong_shape", lambda w, d: infer_with_model(w, d, lambda m: edit_weights(
        m, lambda sd: sd.__setitem__(first_weight(sd, "q_proj.weight"), torch.zeros(3, 5)))), ["q_proj"], None),
    ("model_weights_wrong_dtype", lambda w, d: infer_with_model(w, d, lambda m: edit_weights(
        m, lambda sd: sd.__setitem__(first_weight(sd, "q_proj.weight"), sd[first_weight(sd, "q_proj.weight")].to(torch.int64)))),
     ["q_proj"], None),
    ("model_weights_missing_tensor", lambda w, d: infer_with_model(w, d, lambda m: edit_weights(
        m, lambda sd: sd.pop(first_weight(sd, "q_proj.weight")))), ["q_proj"], None),
    ("eval_logits_batch_wrong_dtype", lambda w, d: ["eval-logits", "--model", w["model"], "--batch", save_batch(
        d, input_ids=torch.ones(1, 4)), "--out", d / "o.safetensors"], ["input_ids"], None),
    ("eval_logits_batch_missing", lambda w, d: ["eval-logits", "--model", w["model"], "--batch", d / "none.safetensors",
                                                "--out", d / "o.safetensors"], ["none.safetensors"], None),
    ("infer_token_id_out_of_range", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,999999",
                                                   "--max-new-tokens", 1], ["999999"], None),
    ("eval_logits_labels_out_of_vocab", lambda w, d: ["eval-logits", "--model", w["model"], "--batch", save_batch(
        d, input_ids=torch.ones(1, 4, dtype=torch.int64), labels=torch.tensor([[-100, 5, 999999, -100]])),
        "--out", d / "o.safetensors"], ["batch.safetensors", "labels", "outside the vocabulary", "-100"], None),
    ("eval_logits_labels_negative", lambda w, d: ["eval-logits", "--model", w["model"], "--batch", save_batch(
        d, input_ids=torch.ones(1, 4, dtype=torch.int64), labels=torch.tensor([[-100, -5, 7, -100]])),
        "--out", d / "o.safetensors"], ["batch.safetensors", "labels", "outside the vocabulary"], None),
    ("infer_pixels_4_channels", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                              "--pixels", save_batch(d, pixel_values=torch.zeros(1, 4, 32, 32))],
     ["pixel_values", "expected [N,3,"], None),
    ("infer_temperature_tiny", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                             "--temperature", "1e-45"], ["--temperature", "1e-4"], None),
    ("infer_image_path_with_newline", lambda w, d: ["infer", "--model", w["model"], "--prompt", "q", "--image", "no\nsuch.png"],
     ["no\\nsuch.png"], None),
    ("train_set_without_value", lambda w, d: ["train", w["root"] / "good.yaml", "--set"], ["--set", "key=value"], None),
    ("train_stop_after_steps_negative", lambda w, d: ["train", w["root"] / "good.yaml", "--stop-after-steps", "-1"],
     ["stop-after-steps"], None),
    # --- adapter_config.json keys PEFT acts on: honoured as PEFT would load the adapter, or refused
    ("adapter_target_modules_names_nothing_held", lambda w, d: adapter_with(w, d, target_modules=["nonexistent"]),
     ["adapter_config.json", "'target_modules' [\"nonexistent\"] does not name module", "q_proj"], None),
    ("adapter_target_modules_regex_unclosed", lambda w, d: adapter_with(w, d, target_modules="(unclosed"),
     ["adapter_config.json", "'target_modules': not a regular expression"], None),
    ("adapter_target_modules_regex_misses_v_proj", lambda w, d: adapter_with(w, d, target_modules=r".*\.q_proj"),
     ["adapter_config.json", "does not name module", "v_proj"], None),
    ("adapter_layers_to_transform", lambda w, d: adapter_with(w, d, layers_to_transform=[0], layers_pattern="layers"),
     ["adapter_config.json", "'layers_to_transform' is not supported"], None),
    ("adapter_exclude_modules", lambda w, d: adapter_with(w, d, exclude_modules=["q_proj"]),
     ["adapter_config.json", "'exclude_modules' is not supported"], None),
    ("adapter_lora_alpha_1e308", lambda w, d: adapter_with(w, d, lora_alpha=1e308),
     ["adapter_config.json", "'lora_alpha'", "1e6"], None),
    # --- checkpoints
    ("inspect_empty_file", lambda w, d: ["inspect", (d / "x.safetensors").write_bytes(b"") or d / "x.safetensors"],
     ["x.safetensors"], None),
    ("inspect_truncated_pt", lambda w, d: ["inspect", truncated_copy(torch_save({"w": torch.ones(64)}, d / "opt.pt"))],
     ["opt.pt"], None),
    ("inspect_code_in_checkpoint", lambda w, d: ["inspect", write(d / "evil.pt", pickle_with_global("os", "system"))],
     ["evil.pt", "forbidden global 'os.system'"], None),
    ("resume_without_trainer_state", lambda w, d: checkpoint_dir(w, d, {"mm_projector.bin": b""}), ["checkpoint-1"], None),
    ("resume_truncated_projector", lambda w, d: checkpoint_dir(w, d, {
        "trainer_state.json": json.dumps({"global_step": 1, "log_history": []}),
        "mm_projector.bin": (lambda p: truncate(p) or p.read_bytes())(torch_save({"x": torch.ones(99)}, d / "p.bin")),
        "optimizer.pt": b""}), ["mm_projector.bin"], None),
    ("infer_projector_wrong_shape", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                                  "--projector", projector_file(w, d, wrong_shape=True)], ["mm_projector.bin"], None),
    ("infer_projector_dev_zero", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                               "--projector", "/dev/zero"], ["/dev/zero", "not a regular file"], None),
    ("infer_projector_directory", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                                "--projector", d], ["a directory, not a torch.save file"], None),
    ("infer_adapter_config_broken", lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1,
                                                  "--adapter", broken_adapter(d)], ["adapter_config.json"], None),
]


def peft_adapter(w):
    """A LoRA adapter on q_proj/v_proj written by PEFT's own save_pretrained (made once per module)."""
    if "adapter" not in w:
        from peft import LoraConfig, get_peft_model
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(str(w["model"]))
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
        w["adapter"] = w["root"] / "peft_adapter"
        peft.save_pretrained(str(w["adapter"]))
    return w["adapter"]


def adapter_with(w, d, **changes):
    """PEFT's adapter with adapter_config.json keys changed; `infer` loads it."""
    a = d / "adapter"
    shutil.copytree(peft_adapter(w), a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg.update(changes)
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return ["infer", "--model", w["model"], "--input-ids", "1,5", "--max-new-tokens", 1, "--adapter", a]


def save_batch(d, **tensors):
    path = d / "batch.safetensors"
    save_file(tensors, str(path))
    return path


def truncated_copy(path):
    truncate(path)
    return path


def write(path, data):
    path.write_bytes(data)
    return path


def projector_file(world, d, wrong_shape):
    sd = load_file(str(world["model"] / "model.safetensors"))
    proj = {k.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0")
             .replace("model.multi_modal_projector.linear_2", "model.mm_projector.2"): v
            for k, v in sd.items() if "multi_modal_projector" in k}
    if wrong_shape:
        k = sorted(proj)[0]
        proj[k] = torch.zeros(proj[k].shape[0] + 1, *proj[k].shape[1:])
    return torch_save(proj, d / "mm_projector.bin")


def broken_adapter(d):
    a = d / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    save_file({"x": torch.zeros(1)}, str(a / "adapter_model.safetensors"))
    return a


def check_one_clear_error(proc, needles):
    assert proc.returncode > 0, f"exit {proc.returncode} (negative: killed by a signal), stderr: {proc.stderr[-2000:]!r}"
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, stderr: {proc.stderr[-2000:]!r}"
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


@pytest.mark.parametrize("case_id,build,needles,known", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.xfail(strict=True, reason=c[3])] if c[3] else []) for c in CASES])
def test_bad_input_gives_one_clear_error(world, case_id, build, needles, known):
    d = fresh(world, case_id)
    argv = [binary(), *build(world, d)]
    proc = run(argv, check=False, timeout=TIMEOUT)
    line = check_one_clear_error(proc, needles)
    print(f"\n{case_id}: {line}")


def test_infer_prompt_that_places_the_image_keeps_it_there(world):
    """As LLaVA's run_llava: "<image>\nWhat?" is the same prompt as "What?" (the image leads either way), not two images."""
    outs = []
    for prompt in ["What is it?", "<image>\nWhat is it?"]:
        proc = run([binary(), "infer", "--model", world["model"], "--image", world["images"] / "ok.png", "--prompt", prompt,
                    "--max-new-tokens", 3, "--ids"], timeout=TIMEOUT)
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and outs[0].strip(), outs


def test_peft_adapter_with_its_own_target_modules_loads(world):
    """The adapter PEFT wrote (target_modules ["q_proj", "v_proj"], list form) and the regex form PEFT accepts."""
    run([binary(), *adapter_with(world, fresh(world, "adapter_list"))], timeout=TIMEOUT)
    run([binary(), *adapter_with(world, fresh(world, "adapter_regex"), target_modules=r".*\.(q_proj|v_proj)")],
        timeout=TIMEOUT)


def test_the_good_setup_works(world):
    """The table's base: the same config, data and model train, and infer/eval-logits/inspect run."""
    run([binary(), "train", world["root"] / "good.yaml"], timeout=TIMEOUT)
    # inspect lists every file of the checkpoint it wrote, HF's rng_state.pth (NumPy arrays) included
    listing = run([binary(), "inspect", world["root"] / "out" / "checkpoint-1"], timeout=TIMEOUT).stdout
    assert "rng_state.pth" in listing and "optimizer.pt" in listing, listing
    run([binary(), "infer", "--model", world["model"], "--input-ids", "1,5,6", "--max-new-tokens", 1], timeout=TIMEOUT)
    run([binary(), "eval-logits", "--model", world["model"], "--batch", world["root"] / "batch.safetensors",
         "--out", world["root"] / "logits.safetensors"], timeout=TIMEOUT)


def test_nan_in_weights_loads_and_inspects(world, tmp_path):
    """NaN in weights is data, not a malformed file: `llava inspect` lists the tensor and `eval-logits`
    loads the model (its logits are then NaN). Training stops on a NaN loss (the trainer's check)."""
    m = tmp_path / "model"
    shutil.copytree(world["model"], m)
    edit_weights(m, lambda sd: sd[first_weight(sd, "q_proj.weight")].view(-1).__setitem__(0, float("nan")))
    listing = run([binary(), "inspect", m / "model.safetensors"], timeout=TIMEOUT).stdout
    assert "q_proj.weight" in listing
    run([binary(), "eval-logits", "--model", m, "--batch", world["root"] / "batch.safetensors",
         "--out", tmp_path / "logits.safetensors"], timeout=TIMEOUT)
    assert torch.isnan(load_file(str(tmp_path / "logits.safetensors"))["logits"]).any()
