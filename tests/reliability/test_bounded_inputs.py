"""Bounded inputs through the real CLI: for each class of oversized input (JSON nested 100k levels deep,
a path that is a device / FIFO / directory, an image whose header claims gigapixels, a file over its
kind's size limit, a step number that does not fit, a prompt longer than the model's context) several
inputs of that class go to `llava train` / `infer`. Each run is under an address-space limit, must end
with an exit status in 1..127, exactly one `error:` line naming the file / record at fault, within seconds,
and leave output_dir exactly as it was."""
import hashlib
import json
import os
import resource
import stat
import struct
import subprocess
import time
import zlib

import pytest
import yaml
from safetensors.torch import load_file, save_file

import test_bad_inputs as bad
from llava_oracle import binary

TIMEOUT = 60          # seconds; every case finishes in a few
MEMORY_LIMIT = 3 << 30  # bytes of address space for the binary
DEEP = 100_000        # nesting levels of the deep JSON values

world = bad.world  # the module-scoped tiny setup (model dir, images, data, base config)


# ------------------------------------------------------------------------------------------- inputs

def deep_json(levels=DEEP, open_="[", close="]"):
    return open_ * levels + "1" + close * levels


def deep_value(levels=DEEP):
    """A Python value that json.dumps would refuse to nest this deep: spliced in as text instead."""
    return "@@DEEP@@"


def dumps_with_deep(obj, levels=DEEP):
    return json.dumps(obj).replace('"@@DEEP@@"', deep_json(levels))


def good_record(**changes):
    return {"id": "ok", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}], **changes}


def sparse_file(path, size):
    """A file of `size` bytes that uses no disk."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def real_png(w, h):
    """A complete, valid w x h RGB PNG of black pixels, compressed row by row (tiny on disk)."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
            png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def jpeg_header(w, h):
    """SOI + a baseline SOF0 claiming w x h, 3 components: all a decoder reads before allocating."""
    sof = struct.pack(">BHHB", 8, h, w, 3) + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("big_png") / "18900.png"
    path.write_bytes(real_png(18900, 18900))
    return path


# ----------------------------------------------------------------------------------------- builders

def train_record_image(w, d, image):
    """A one-record data set whose image is `image` (an absolute path, or a name in d/images)."""
    rec = [{"id": "img7", "image": str(image), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                               {"from": "gpt", "value": "Something."}]}]
    images = d / "images"
    images.mkdir(exist_ok=True)
    return bad.train_with_data(w, d, rec, image_folder=str(images))


def with_image_file(w, d, name, make):
    images = d / "images"
    images.mkdir(exist_ok=True)
    make(images / name)
    return train_record_image(w, d, name)


def resume_auto(w, d, step_dir="checkpoint-1", **files):
    """output_dir holds a checkpoint folder with `files`; the config resumes from the newest (auto)."""
    c = d / "out" / step_dir
    c.mkdir(parents=True)
    # A stage-1 checkpoint's other files, present (auto-resume skips a folder without them) but never reached:
    # the file under test is read first.
    files = {"mm_projector.bin": b"", "optimizer.pt": b"", **files}
    for name, content in files.items():
        (c / name).write_bytes(content) if isinstance(content, bytes) else (c / name).write_text(content)
    return ["train", bad.config(w, d, resume_from_checkpoint="auto")]


def safetensors_with_deep_metadata(m):
    """The model's own weights with a __metadata__ value nested DEEP levels (the header stays valid JSON)."""
    path = m / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"format": "@@DEEP@@"}
    text = dumps_with_deep(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def deep_adapter(d):
    a = d / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(dumps_with_deep({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": "@@DEEP@@"}))
    save_file({"x": __import__("torch").zeros(1)}, str(a / "adapter_model.safetensors"))
    return a


def fifo(path):
    os.mkfifo(path)
    return path


def infer(w, *extra, model=None):
    return ["infer", "--model", model or w["model"], *extra]


# --------------------------------------------------------------------------------------------- cases
# (id, build(world, dir, fixtures) -> argv, words the error line must contain)
CASES = [
    # --- JSON nested 100k levels deep, in every kind of JSON input
    ("deep_data_record_list", lambda w, d, f: bad.train_with_data(
        w, d, raw=dumps_with_deep([good_record(), good_record(id="deep", extra="@@DEEP@@")])),
     ["data.json", "record 1", "nested deeper than 64"]),
    ("deep_data_record_jsonl", lambda w, d, f: bad.train_with_data(
        w, d, raw=json.dumps(good_record()) + "\n" + dumps_with_deep(good_record(conversations="@@DEEP@@")) + "\n",
        name="data.jsonl"), ["data.jsonl", "line 2", "nested deeper than 64"]),
    ("deep_data_unclosed", lambda w, d, f: bad.train_with_data(w, d, raw="[" * 300_000),
     ["data.json", "record 0", "nested deeper than 64"]),
    ("deep_safetensors_metadata", lambda w, d, f: bad.infer_with_model(w, d, safetensors_with_deep_metadata),
     ["model.safetensors", "header", "nested deeper than 64"]),
    ("deep_trainer_state_resume", lambda w, d, f: resume_auto(
        w, d, **{"trainer_state.json": dumps_with_deep({"global_step": 1, "log_history": "@@DEEP@@"})}),
     ["checkpoint-1/trainer_state.json", "nested deeper than 64"]),
    ("deep_config_json", lambda w, d, f: bad.infer_with_model(w, d, lambda m: (m / "config.json").write_text(
        dumps_with_deep({**json.loads((m / "config.json").read_text()), "extra": "@@DEEP@@"}))),
     ["config.json", "nested deeper than 64"]),
    ("deep_tokenizer_config", lambda w, d, f: bad.train_with_model(w, d, lambda m: (m / "tokenizer_config.json").write_text(
        deep_json(open_='{"a":', close="}"))), ["tokenizer_config.json", "nested deeper than 64"]),
    ("deep_adapter_config", lambda w, d, f: infer(w, "--input-ids", "1,5", "--max-new-tokens", 1, "--adapter", deep_adapter(d)),
     ["adapter_config.json", "nested deeper than 64"]),
    ("deep_deepspeed_json", lambda w, d, f: ["train", bad.config(w, d, deepspeed=str(bad.write(
        d / "ds.json", dumps_with_deep({"zero_optimization": {"stage": 1, "x": "@@DEEP@@"}}).encode())))],
     ["ds.json", "nested deeper than 64"]),
    # --- paths that are not regular files
    ("image_dev_zero", lambda w, d, f: train_record_image(w, d, "/dev/zero"),
     ["record 0", "/dev/zero", "character device"]),
    ("image_fifo", lambda w, d, f: with_image_file(w, d, "pipe.png", lambda p: os.mkfifo(p)),
     ["record 0", "pipe.png", "FIFO"]),
    ("image_directory", lambda w, d, f: with_image_file(w, d, "dir.png", lambda p: p.mkdir()),
     ["record 0", "dir.png", "directory"]),
    ("data_file_dev_zero", lambda w, d, f: ["train", bad.config(w, d, data_path="/dev/zero")],
     ["/dev/zero", "character device"]),
    # --- images whose header claims more pixels than PIL's MAX_IMAGE_PIXELS
    ("image_png_18900_square", lambda w, d, f: with_image_file(w, d, "big.png", lambda p: p.symlink_to(f["big_png"])),
     ["record 0", "big.png", "18900x18900", "89478485"]),
    ("image_jpeg_header_65000", lambda w, d, f: with_image_file(w, d, "big.jpg", lambda p: p.write_bytes(jpeg_header(65000, 65000))),
     ["record 0", "big.jpg", "65000x65000"]),
    ("image_png_header_wide", lambda w, d, f: with_image_file(w, d, "wide.png", lambda p: p.write_bytes(bad.png_with_size(16_000_000, 6))),
     ["record 0", "wide.png", "16000000x6"]),
    ("infer_image_18900_square", lambda w, d, f: infer(w, "--prompt", "What?", "--image", f["big_png"], "--max-new-tokens", 1),
     ["18900.png", "18900x18900"]),
    # --- files over their kind's size limit (sparse: no disk used)
    ("oversized_data_file", lambda w, d, f: ["train", bad.config(w, d, data_path=str(sparse_file(d / "data.json", 5 << 30)))],
     ["data.json", str(5 << 30), "limit"]),
    ("oversized_image", lambda w, d, f: with_image_file(w, d, "huge.png", lambda p: sparse_file(p, 300 << 20)),
     ["record 0", "huge.png", "limit"]),
    ("oversized_config_json", lambda w, d, f: bad.infer_with_model(w, d, lambda m: sparse_file(m / "config.json", 1 << 40)),
     ["config.json", "limit"]),
    ("oversized_tokenizer_model", lambda w, d, f: bad.train_with_model(w, d, lambda m: sparse_file(m / "tokenizer.model", 100 << 20)),
     ["tokenizer.model", "limit"]),
    ("oversized_trainer_state", lambda w, d, f: resume_auto(w, d) and sparse_file(d / "out/checkpoint-1/trainer_state.json", 1 << 30)
     and ["train", d / "train.yaml"], ["trainer_state.json", "limit"]),
    # --- numbers from files that do not fit
    ("trainer_state_negative_step", lambda w, d, f: resume_auto(
        w, d, **{"trainer_state.json": json.dumps({"global_step": -5, "log_history": []})}),
     ["trainer_state.json", "global_step", "-5"]),
    ("trainer_state_step_1e30", lambda w, d, f: resume_auto(
        w, d, **{"trainer_state.json": '{"global_step": 1e30, "log_history": []}'}),
     ["trainer_state.json", "global_step", "1e+30"]),
    ("trainer_state_step_string", lambda w, d, f: resume_auto(
        w, d, **{"trainer_state.json": json.dumps({"global_step": "7", "log_history": []})}),
     ["trainer_state.json", "global_step"]),
    ("checkpoint_folder_overflows_int64", lambda w, d, f: resume_auto(
        w, d, step_dir="checkpoint-99999999999999999999", **{"trainer_state.json": json.dumps({"global_step": 1})}),
     ["checkpoint-99999999999999999999", "out of range"]),
    ("checkpoint_folder_above_2_53", lambda w, d, f: resume_auto(
        w, d, step_dir="checkpoint-9007199254740993", **{"trainer_state.json": json.dumps({"global_step": 1})}),
     ["checkpoint-9007199254740993", "out of range"]),
    # --- records with more text than model_max_length could ever use: refused before tokenizing
    ("data_record_text_2mb", lambda w, d, f: bad.train_with_data(w, d, records=[
        good_record(), good_record(id="long", conversations=[{"from": "human", "value": "what color " * 200_000},
                                                             {"from": "gpt", "value": "a"}])]),
     ["data.json", "record 1", "2200001 bytes of text", "model_max_length"]),
    ("data_record_many_turns_jsonl", lambda w, d, f: bad.train_with_data(w, d, raw=json.dumps(good_record()) + "\n" + json.dumps(
        good_record(conversations=[{"from": "human" if i % 2 == 0 else "gpt", "value": "x" * 5000} for i in range(400)])) + "\n",
        name="data.jsonl"), ["data.jsonl", "line 2", "2000000 bytes of text"]),
    # --- truncation at model_max_length (96) would cut a record's image tokens off: refused before training
    ("data_record_image_after_long_turn", lambda w, d, f: bad.train_with_data(w, d, records=[
        w["good"][0], {"id": "late", "image": "ok.png", "conversations": [
            {"from": "human", "value": "what color is it " * 40}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "a circle"}]}]),
     ["data.json", "record 1", "image tokens end at position", "past model_max_length 96"]),
    ("model_max_length_below_the_image", lambda w, d, f: ["train", bad.config(w, d, model_max_length=3)],
     ["record 0", "model_max_length 3", "leaves no room"]),
    # --- a key given twice in a JSON object: refused (Python's json and nlohmann keep the last silently)
    ("data_record_duplicate_key", lambda w, d, f: bad.train_with_data(
        w, d, raw='[' + json.dumps(w["good"][0]) + ', {"id": "dup", "image": "ok.png", "image": "missing.png", '
                  '"conversations": ' + json.dumps(w["good"][0]["conversations"]) + '}]'),
     ["data.json", "record 1", "key 'image' appears twice"]),
    ("config_json_duplicate_key", lambda w, d, f: bad.infer_with_model(w, d, lambda m: (m / "config.json").write_text(
        (m / "config.json").read_text().replace("{", '{"model_type": "llava", ', 1))),
     ["config.json", "key 'model_type' appears twice"]),
    # --- output paths: never a device, FIFO or directory replaced; a bad output_dir found before training
    ("metrics_out_fifo", lambda w, d, f: ["train", bad.config(w, d), "--metrics-out", fifo(d / "metrics.fifo")],
     ["--metrics-out", "metrics.fifo", "not a regular file"]),
    ("save_trainables_directory", lambda w, d, f: ["train", bad.config(w, d), "--save-trainables", d],
     ["--save-trainables", "not a regular file", "a directory"]),
    ("output_dir_is_a_file", lambda w, d, f: ["train", bad.config(w, d, output_dir=str(bad.write(d / "afile", b"x")))],
     ["output_dir", "afile", "not a directory"]),
    ("output_dir_below_a_file", lambda w, d, f: ["train", bad.config(w, d, output_dir=str(bad.write(d / "afile", b"x") / "sub"))],
     ["output_dir", "afile", "is not a directory"]),
    ("preprocess_out_fifo", lambda w, d, f: ["preprocess", bad.config(w, d), "--out", fifo(d / "batches.fifo")],
     ["preprocess --out", "batches.fifo", "not a regular file"]),
    # --- sizes with no 64-bit value
    ("byte_size_1e30GB", lambda w, d, f: ["train", bad.config(w, d, consolidate_optimizer_max_size="1e30GB")],
     ["consolidate_optimizer_max_size", "1e30GB"]),
    ("byte_size_nan", lambda w, d, f: ["train", bad.config(w, d, max_shard_size="nanGB")], ["max_shard_size", "nanGB"]),
    # --- prompts longer than the model's context (max_position_embeddings 256 in the tiny model)
    ("infer_prompt_120k_tokens", lambda w, d, f: infer(w, "--prompt", "\u20ac" * 40_000, "--max-new-tokens", 1),
     ["--prompt", "max_position_embeddings", "256"]),
    ("infer_input_ids_60k", lambda w, d, f: infer(w, "--input-ids", ",".join(["5"] * 60_000), "--max-new-tokens", 1),
     ["--input-ids", "60000 tokens", "256"]),
    ("infer_input_ids_just_over", lambda w, d, f: infer(w, "--input-ids", ",".join(["5"] * 256), "--max-new-tokens", 1),
     ["--input-ids", "256 tokens", "256"]),
]


# ------------------------------------------------------------------------------------------ checking

def tree_digest(root):
    """{relative path: sha256 of the file, or 'dir'} of everything under root ({} when it does not exist)."""
    out = {}
    if not os.path.exists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_size > (64 << 20):  # the sparse oversized inputs: their size and mtime say enough
                out[os.path.relpath(p, root)] = f"size {st.st_size} mtime {st.st_mtime_ns}"
            else:
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_bounded(argv):
    start = time.monotonic()
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=limit_memory, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case_id,build,needles", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bounded_input_gives_one_clear_error(world, big_png, case_id, build, needles):
    d = bad.fresh(world, case_id)
    argv = [binary(), *build(world, d, {"big_png": big_png})]
    before = tree_digest(d / "out")
    proc, seconds = run_bounded(argv)
    assert 1 <= proc.returncode <= 127, f"exit {proc.returncode}, stderr: {proc.stderr[-2000:]!r}"
    line = bad.check_one_clear_error(proc, needles)
    assert tree_digest(d / "out") == before, "output_dir changed"
    for p in d.glob("*.fifo"):  # an output path that was a FIFO still is one
        assert stat.S_ISFIFO(os.lstat(p).st_mode), p
    print(f"\n{case_id} ({seconds:.1f} s): {line[:300]}")


def test_the_good_setup_runs_under_the_same_limit(world):
    """The limit itself is not what refuses: the working config trains and infers under it."""
    d = bad.fresh(world, "good_under_limit")
    proc, _ = run_bounded([binary(), "train", bad.config(world, d)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, _ = run_bounded([binary(), "infer", "--model", world["model"], "--input-ids", ",".join(["5"] * 200),
                           "--max-new-tokens", 100, "--ids"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.split()) == 56, "prompt 200 + new tokens must stop at the context of 256"
