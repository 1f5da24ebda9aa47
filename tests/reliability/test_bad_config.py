"""Bad configs and options through the real CLI, several inputs per class: nesting deep enough to overflow
a recursive parser (flow and block, lists and maps), a second document, keys given twice, values of the
wrong type (maps where a path is expected), values a library would refuse in its own words (regex,
dropout), sizes without bound or beyond the model or the data, keys that contradict the model, bad
`--set` forms, and bad options of `llava train/preprocess/infer` and `llava-run`.

Every case must: exit with a status in 1..127 (not a signal), print exactly one `error:` line naming the
key / option and what was expected, finish within seconds under a 3 GiB address-space limit, and leave
output_dir exactly as it was (it holds a checkpoint from an earlier run)."""
import hashlib
import resource
import time

import pytest
import yaml

from llava_oracle import binary, run
from test_bad_inputs import check_one_clear_error, config, fresh, world  # noqa: F401 (world: the fixture)

SECONDS = 30
MEMORY_LIMIT = 3 << 30


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def tree_digest(root):
    """Names, sizes and contents of everything under root."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def with_checkpoint(d):
    """output_dir of the case, holding an earlier run's checkpoint."""
    ckpt = d / "out" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 7, "log_history": []}')
    (ckpt / "mm_projector.bin").write_bytes(b"earlier weights")
    return d / "out"


def raw(world, d, text):
    """A train config: the working one's keys, then `text` (raw YAML lines appended)."""
    base = {**world["base"], "output_dir": str(d / "out")}
    return config(world, d, text=yaml.safe_dump(base) + text)


def train_raw(text, *extra):
    return lambda w, d: ["train", raw(w, d, text), *extra]


def train_set(**settings):
    return lambda w, d: ["train", config(w, d, **settings)]


def preprocess_raw(text):
    def build(w, d):
        base = {k: w["base"][k] for k in ("model_name_or_path", "data_path", "image_folder", "version")}
        path = d / "data.yaml"
        path.write_text(yaml.safe_dump(base) + text)
        return ["preprocess", path, "--out", d / "out" / "batches.safetensors"]
    return build


def infer(*options):
    return lambda w, d: ["infer", "--model", w["model"], "--input-ids", "1,5,6", *options]


def block_map(depth):
    return "".join(" " * i + "a:\n" for i in range(depth)) + " " * depth + "b: 1\n"


def block_list(depth):
    return "deep:\n" + "".join(" " * i + "-\n" for i in range(depth))


LORA = {"tune_mm_mlp_adapter": None, "lora_enable": True, "lora_r": 4}

# (id, build(world, dir) -> argv, words the error line must contain)
CASES = [
    # --- nesting that would overflow a recursive parser's stack: refused before parsing
    ("deep_flow_list", train_raw("deep: " + "[" * 100000 + "]" * 100000 + "\n"), ["train.yaml", "nested more than 32"]),
    ("deep_flow_map", train_raw("deep: " + "{a: " * 100000 + "1" + "}" * 100000 + "\n"), ["train.yaml", "nested more than 32"]),
    ("deep_unclosed_flow", train_raw("deep: " + "[{" * 100000), ["train.yaml", "nested more than 32"]),
    ("deep_block_map", train_raw(block_map(2000)), ["train.yaml", "nested more than 32"]),
    ("deep_block_list", train_raw(block_list(2000)), ["train.yaml", "nested more than 32"]),
    ("deep_dash_list", train_raw("deep: \n  " + "- " * 100000 + "x\n"), ["train.yaml", "nested more than 32"]),
    ("deep_preprocess_flow", preprocess_raw("deep: " + "[" * 100000), ["data.yaml", "nested more than 32"]),
    ("deep_preprocess_block", preprocess_raw(block_map(2000)), ["data.yaml", "nested more than 32"]),
    ("deep_set_value", lambda w, d: ["train", config(w, d), "--set", "data_path=" + "[" * 100000],
     ["--set data_path=", "nested more than 32"]),
    # --- one document, each key once
    ("second_document", train_raw("---\nmax_steps: 2\n"), ["train.yaml", "second YAML document", "line"]),
    ("second_document_after_end", train_raw("...\nmax_steps: 2\n"), ["train.yaml", "second YAML document"]),
    ("second_document_preprocess", preprocess_raw("---\nseed: 1\n"), ["data.yaml", "second YAML document"]),
    ("duplicate_top_level", train_raw("max_steps: 2\n"), ["train.yaml", "key 'max_steps' given twice", "first at line"]),
    ("duplicate_data_key", train_raw("per_device_train_batch_size: 1\n"),
     ["key 'per_device_train_batch_size' given twice", "first at line"]),
    ("duplicate_scheduler_kwarg", train_raw("lr_scheduler_kwargs:\n  min_lr: 1.0e-5\n  min_lr: 2.0e-5\n"),
     ["key 'min_lr' given twice", "first at line"]),
    ("duplicate_dotted_and_nested", train_raw("lr_scheduler_kwargs.min_lr: 1.0e-5\nlr_scheduler_kwargs: {min_lr: 2.0e-5}\n"),
     ["key 'lr_scheduler_kwargs.min_lr' given twice"]),
    ("duplicate_preprocess", preprocess_raw("version: plain\n"), ["data.yaml", "key 'version' given twice"]),
    # --- wrong types, maps and lists where a path is expected
    ("map_as_data_path", train_set(data_path={"a": 1}), ["key 'data_path'", "expected a string or a list of strings", "a map"]),
    ("map_as_output_dir", train_set(output_dir={"x": 1}), ["key 'output_dir'", "expected a string", "a map"]),
    ("list_as_model", train_set(model_name_or_path=["a", "b"]), ["key 'model_name_or_path'", "expected a string", "a list"]),
    ("map_as_processor_path_preprocess", preprocess_raw("image_processor_path: {a: 1}\n"), ["data.yaml", "key 'image_processor_path'", "a map"]),
    ("list_as_learning_rate", train_set(learning_rate=[1, 2]), ["key 'learning_rate'", "expected a number"]),
    ("yes_as_bool", train_raw("bf16: yes\n"), ["key 'bf16'", "expected true or false", "'yes'"]),
    ("scalar_scheduler_kwargs", train_set(lr_scheduler_kwargs=5), ["key 'lr_scheduler_kwargs'", "expected a map"]),
    # --- values a library would refuse in its own words
    ("regex_unbalanced", train_set(**LORA, lora_target_regex=".*(q_proj"), ["key 'lora_target_regex'", "regular expression", ".*(q_proj"]),
    ("regex_bad_range", train_set(**LORA, lora_target_regex="[z-a]"), ["key 'lora_target_regex'", "[z-a]"]),
    ("dropout_one", train_set(**LORA, lora_dropout=1.0), ["key 'lora_dropout'", "expected a number in [0, 1)", "'1.0'"]),
    ("dropout_negative", train_set(**LORA, lora_dropout=-0.5), ["key 'lora_dropout'", "'-0.5'"]),
    # --- sizes without bound, beyond the model, beyond the data
    ("batch_10e12", train_set(per_device_train_batch_size=10**12), ["key 'per_device_train_batch_size'", "expected an integer in"]),
    ("batch_10e12_preprocess", preprocess_raw("per_device_train_batch_size: 1000000000000\n"),
     ["data.yaml", "key 'per_device_train_batch_size'"]),
    ("batch_beyond_data", train_set(per_device_train_batch_size=5), ["key 'per_device_train_batch_size'", "data set has 2 samples"]),
    ("batch_beyond_data_drop_last", train_set(per_device_train_batch_size=3, dataloader_drop_last=True),
     ["key 'per_device_train_batch_size'", "dataloader_drop_last"]),
    ("batch_beyond_data_preprocess", lambda w, d: [*preprocess_raw("")(w, d), "--world", "5"],
     ["key 'per_device_train_batch_size'", "1 x 5 rank(s)", "2 samples"]),
    ("max_steps_10e15", train_set(max_steps=10**15), ["key 'max_steps'", "expected an integer in"]),
    ("accumulation_10e12", train_set(gradient_accumulation_steps=10**12), ["key 'gradient_accumulation_steps'"]),
    ("length_10e9", train_set(model_max_length=10**9), ["key 'model_max_length'", "expected an integer in"]),
    ("length_beyond_model", train_set(model_max_length=4096), ["key 'model_max_length'", "max_position_embeddings 256"]),
    ("lora_r_10e9", train_set(**{**LORA, "lora_r": 10**9}), ["key 'lora_r'", "expected an integer in"]),
    ("workers_10e6", train_set(dataloader_num_workers=10**6), ["key 'dataloader_num_workers'"]),
    ("epochs_forever", train_set(max_steps=-1, num_train_epochs=1e300), ["key 'num_train_epochs'"]),
    ("save_steps_negative", train_set(save_steps=-1), ["key 'save_steps'"]),
    # --- keys that contradict the model
    ("select_layer_out_of_range", train_set(mm_vision_select_layer=-30), ["key 'mm_vision_select_layer'", "-30", "in [-3, 2]"]),
    ("select_layer_contradicts", train_set(mm_vision_select_layer=-1), ["key 'mm_vision_select_layer'", "contradicts the model"]),
    ("projector_linear", train_set(mm_projector_type="linear"), ["key 'mm_projector_type'", "mlp2x_gelu"]),
    ("projector_unknown", train_set(mm_projector_type="qformer"), ["key 'mm_projector_type'", "qformer"]),
    ("select_feature_contradicts", train_set(mm_vision_select_feature="cls_patch"), ["key 'mm_vision_select_feature'"]),
    ("fp16_true", train_set(fp16=True), ["key 'fp16'"]),
    # --- the device: a value outside the list, a CUDA device this build/machine lacks (no GPU in CI; cuda:1023
    # is refused on any machine), use_cpu contradicting device, async_save not a boolean
    ("device_unknown", train_set(device="tpu"), ["train.yaml", "key 'device'", "expected auto, cpu, cuda or cuda:N", "'tpu'"]),
    ("device_index_text", train_set(device="cuda:x"), ["key 'device'", "cuda:N", "'cuda:x'"]),
    ("device_index_huge", train_set(device="cuda:99999"), ["key 'device'", "0 to 1023", "'cuda:99999'"]),
    ("device_cuda_missing", train_set(device="cuda:1023"), ["train.yaml", "key 'device'", "cuda:1023", "device: cpu"]),
    ("use_cpu_and_cuda", train_set(use_cpu=True, device="cuda"), ["key 'use_cpu'", "device: cuda"]),
    ("async_save_not_bool", train_raw("async_save: sometimes\n"), ["key 'async_save'", "expected true or false"]),
    ("tf32_not_bool", train_raw("tf32: fast\n"), ["key 'tf32'", "expected true or false"]),
    ("pin_memory_not_bool", train_raw("dataloader_pin_memory: 2\n"), ["key 'dataloader_pin_memory'", "expected true or false"]),
    # --- --set forms
    ("set_no_equals", lambda w, d: ["train", config(w, d), "--set", "lora_r"], ["--set lora_r", "expected key=value"]),
    ("set_no_key", lambda w, d: ["train", config(w, d), "--set", "=3"], ["--set =3", "expected key=value"]),
    ("set_empty_value", lambda w, d: ["train", config(w, d), "--set", "output_dir="], ["--set output_dir=", "expected a value"]),
    ("set_blank_value", lambda w, d: ["train", config(w, d), "--set", "model_name_or_path= "],
     ["--set model_name_or_path= ", "expected a value"]),
    ("set_into_scalar", lambda w, d: ["train", config(w, d), "--set", "max_steps.x=1"], ["unknown key 'max_steps.x'"]),
    ("set_into_path", lambda w, d: ["train", config(w, d), "--set", "data_path.x=1"], ["unknown key 'data_path.x'", "data_path"]),
    ("set_map_value", lambda w, d: ["train", config(w, d), "--set", "max_steps={a: 1}"], ["key 'max_steps'", "a map"]),
    ("set_bad_yaml", lambda w, d: ["train", config(w, d), "--set", "data_path=[a, b"], ["--set data_path=[a, b", "not valid YAML"]),
    # --- command-line options
    ("train_option_not_integer", lambda w, d: ["train", config(w, d), "--stop-after-steps", "abc"],
     ["--stop-after-steps", "expected an integer", "'abc'"]),
    ("train_unknown_option", lambda w, d: ["train", config(w, d), "--no-such-option"], ["no-such-option"]),
    ("infer_tokens_not_integer", infer("--max-new-tokens", "abc"), ["--max-new-tokens", "expected an integer", "'abc'"]),
    ("infer_tokens_huge", infer("--max-new-tokens", str(10**12)), ["--max-new-tokens", "expected an integer in [1, 1048576]"]),
    ("infer_temperature_text", infer("--temperature=hot"), ["--temperature", "expected a number", "'hot'"]),
    ("infer_top_p_out_of_range", infer("--top-p", "2"), ["--top-p", "in [0, 1]"]),
    ("infer_seed_negative", infer("--seed", "-1"), ["--seed", "'-1'"]),
    ("preprocess_limit_text", lambda w, d: [*preprocess_raw("")(w, d), "--limit", "lots"], ["--limit", "expected an integer", "'lots'"]),
    ("preprocess_world_zero", lambda w, d: [*preprocess_raw("")(w, d), "--world", "0"], ["--world", "in [1, 4096]"]),
    ("preprocess_rank_beyond_world", lambda w, d: [*preprocess_raw("")(w, d), "--rank", "3"], ["--rank", "in [0, 0]"]),
]


@pytest.mark.parametrize("case_id,build,needles", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_config_gives_one_clear_error_and_writes_nothing(world, case_id, build, needles):
    d = fresh(world, case_id)
    out = with_checkpoint(d)
    before = tree_digest(out)
    argv = [binary(), *build(world, d)]
    start = time.monotonic()
    proc = run(argv, check=False, timeout=120, preexec_fn=limit_memory)
    elapsed = time.monotonic() - start
    assert 0 < proc.returncode < 128, f"exit {proc.returncode}, stderr: {proc.stderr[-2000:]!r}"
    line = check_one_clear_error(proc, needles)
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    assert tree_digest(out) == before, "output_dir changed"
    print(f"\n{case_id}: {line}")


LAUNCHER_CASES = [
    (["--nproc_per_node", "abc"], ["--nproc_per_node", "expected an integer", "'abc'"]),
    (["--master-port=http"], ["--master-port", "expected an integer", "'http'"]),
    (["--shutdown_timeout", "soon"], ["--shutdown_timeout", "expected a number", "'soon'"]),
    (["--nproc_per_node", "99999999999"], ["--nproc_per_node", "'99999999999'"]),
]


@pytest.mark.parametrize("options,needles", LAUNCHER_CASES, ids=[c[0][0].lstrip("-") for c in LAUNCHER_CASES])
def test_llava_run_bad_option_names_it(options, needles):
    proc = run([binary("LLAVA_RUN"), *options, "true"], check=False, timeout=60, preexec_fn=limit_memory)
    check_one_clear_error(proc, needles)


def test_the_good_config_still_trains_under_the_limits(world, tmp_path):
    """The cases' base config passes every check: the refusals above are the bad keys', not the setup's.
    An accepted-and-ignored key gives one log line, and keys that repeat the model's values are fine."""
    cfg = config(world, tmp_path, tf32=True, report_to="none", mm_vision_select_layer=-2,
                 mm_projector_type="mlp2x_gelu", fp16=False)
    proc = run([binary(), "train", cfg], timeout=120, preexec_fn=limit_memory)
    notes = [l for l in proc.stdout.splitlines() if "ignored" in l]
    assert notes == ["config: accepted for HF/LLaVA compatibility and ignored: report_to"], proc.stdout
    assert (tmp_path / "out" / "checkpoint-1" / "mm_projector.bin").exists()
