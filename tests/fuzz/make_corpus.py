"""Writes the seed corpus of every fuzz target into corpus/<target>/ (small valid and near-valid files made
by the reference writers: safetensors, torch.save, transformers' configs), and the regression inputs of
the crashes fuzzing found (regress-*). Run with the oracle venv: .venv/bin/python tests/fuzz/make_corpus.py.
The files are committed; rerunning rewrites them identically."""
import collections
import io
import json
import os
import shutil
import struct
import sys
import zipfile

import torch
from safetensors.torch import save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))


def target(name):
    d = os.path.join(HERE, "corpus", name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def put(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def torch_save_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zip_pt(pkl):
    """A torch.save-style archive around a hand-written data.pkl (fixed timestamps: reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in [("archive/data.pkl", pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n")]:
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def data_pkl(pt_bytes):
    with zipfile.ZipFile(io.BytesIO(pt_bytes)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


# Hostile pickles that crashed or hung io::load_pt before the reader bounded nesting and sharing.
def regressions():
    storage_global = b"ctorch\nFloatStorage\n"
    doubling = storage_global + b"\x85q\x00" + b"h\x00h\x00\x86q\x00" * 40 + b"0N."  # 2^40 copies of a raw tuple
    return {
        "regress-cycle": b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.",            # a dict that holds itself
        "regress-list-cycle": b"\x80\x02]q\x00h\x00a.",                          # a list that holds itself
        "regress-deep-tuple": b"\x80\x02N" + b"\x85" * 100000 + b".",            # 100k nested 1-tuples
        "regress-deep-list": b"\x80\x02" + b"]" * 50000 + b"a" * 49999 + b".",  # 50k nested lists
        "regress-doubling-raw-tuple": b"\x80\x02" + doubling,
    }


# JSON nested 100k levels deep: a stack overflow in any recursive walk (copy, dump, compare) before
# io::parse_json capped nesting at 64 levels.
DEEP = 100_000


def deep_json(open_="[", close="]", inner="1"):
    return open_ * DEEP + inner + close * DEEP


def safetensors_seeds():
    d = target("safetensors")
    put(d, "f32_i64", st_save({"w": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor([7, 8])}))
    put(d, "bf16_meta", st_save({"x": torch.ones(2, 2, dtype=torch.bfloat16)}, metadata={"format": "pt"}))
    put(d, "mixed", st_save({"a": torch.zeros(3, dtype=torch.float16), "b": torch.tensor([True, False]),
                             "c": torch.zeros(0, 4), "d": torch.tensor(1.5, dtype=torch.float64),
                             "e": torch.tensor([1, 2], dtype=torch.int8)}))
    put(d, "empty", st_save({}))
    header = b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    put(d, "hand_written", struct.pack("<Q", len(header)) + header + b"\0" * 8)
    deep = ('{"__metadata__":{"format":' + deep_json() + '},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}').encode()
    deep += b" " * ((8 - len(deep) % 8) % 8)
    put(d, "regress-deep-metadata", struct.pack("<Q", len(deep)) + deep + b"\0" * 8)


def sharded_index_seeds():
    d = target("sharded_index")  # the fuzz target writes the shards: a, b in shard 1, c in shard 2
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    put(d, "full", json.dumps({"metadata": {"total_size": 62}, "weight_map": {"a": shard1, "b": shard1, "c": shard2}}))
    put(d, "one", json.dumps({"weight_map": {"c": shard2}}))
    put(d, "indented", json.dumps({"metadata": {}, "weight_map": {"a": shard1, "b": shard1}}, indent=2))
    put(d, "regress-deep-metadata", '{"metadata": ' + deep_json('{"a":', "}") + ', "weight_map": {"c": "' + shard2 + '"}}')


def torch_seeds():
    state = collections.OrderedDict(weight=torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                                    bias=torch.zeros(3, dtype=torch.float16), steps=torch.tensor(5))
    base = torch.arange(8.0)
    optimizer_like = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                        "amsgrad": False, "params": [0], "name": None}]}
    values = {"state_dict": state, "optimizer": optimizer_like,
              "views": {"whole": base, "slice": base[2:6], "strided": base[::2], "t": base.view(2, 4).t()},
              "scalars": [1, -2, 2**40, 1.5, "text", True, None, (1, 2, 3, 4)],
              "dtypes": [torch.zeros(2, dtype=t) for t in (torch.bfloat16, torch.int32, torch.int16, torch.uint8,
                                                           torch.bool, torch.float64, torch.int8)]}
    d_pt, d_pkl = target("torch_archive"), target("pickle")
    for name, obj in values.items():
        pt = torch_save_bytes(obj)
        put(d_pt, name + ".pt", pt)
        put(d_pkl, name + ".pkl", data_pkl(pt))
    put(d_pt, "parameter.pt", torch_save_bytes({"p": torch.nn.Parameter(torch.ones(2))}))
    for name, pkl in regressions().items():
        put(d_pkl, name + ".pkl", pkl)
        put(d_pt, name + ".pt", zip_pt(pkl))
    for name, obj in deepspeed_values().items():  # what io::pickle::Globals::kDeepSpeed reads
        pt = torch_save_bytes(obj)
        put(d_pt, name + ".pt", pt)
        put(d_pkl, name + ".pkl", data_pkl(pt))


def deepspeed_values():
    """Small files with every global of DeepSpeed's checkpoint files and HF's rng_state.pth, made by the
    real classes (DeepSpeed from the oracle venv)."""
    import random
    import numpy as np
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    optim = {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "group_paddings": [0], "partition_count": [2],
        "single_partition_of_fp32_groups": [torch.ones(4)],
        "param_slice_mappings": [collections.OrderedDict(w=fragment_address(numel=4, start=0))]}}
    model_states = {"param_shapes": [collections.OrderedDict(w=torch.Size([2, 2]))], "module": {"w": torch.ones(2, 2)}}
    rng = {"python": random.Random(0).getstate(), "numpy": np.random.RandomState(0).get_state(),
           "cpu": torch.Generator().manual_seed(0).get_state()}
    return {"deepspeed_optim_states": optim, "deepspeed_model_states": model_states, "hf_rng_state": rng}


def model_config_seeds():
    import tiny_llava
    d = target("model_config")
    config = tiny_llava.make_config()
    put(d, "hf_llava.json", config.to_json_string())
    put(d, "hf_full_strategy.json", tiny_llava.make_config(strategy="full", feature_layer=[-2, -1], rope_linear_factor=2.0,
                                                           kv_heads=2, tie=True).to_json_string())
    put(d, "hf_sparse.json", json.dumps({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 64},
                                         "vision_config": {"patch_size": 14, "image_size": 336}}))
    put(d, "original_llava.json", json.dumps(tiny_llava.original_config_dict(config, "clip"), indent=2))
    put(d, "regress-deep-text-config", '{"model_type": "llava", "text_config": {"model_type": "llama", "rope_scaling": ' +
        deep_json() + "}}")


def train_config_seeds():
    d = target("train_config")
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.startswith("llava-1.5") and name.endswith(".yaml"):
            shutil.copy(os.path.join(ROOT, "configs", name), os.path.join(d, name))
    put(d, "small.yaml", "model_name_or_path: model\ndata_path: [a.json, b.jsonl]\noutput_dir: out\n"
                         "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1.0e-5}\n"
                         "lora_enable: true\nlora_target_modules: [q_proj, v_proj]\nmax_steps: 10\nsave_steps: 5\n")
    # Nesting just past the loader's depth cap in each shape (flow lists, flow maps, block maps, block
    # lists), a second document and a key given twice: the fuzzer mutates them deeper.
    put(d, "deep_flow_list.yaml", "model_name_or_path: m\ndata_path: " + "[" * 40 + "]" * 40 + "\n")
    put(d, "deep_flow_map.yaml", "model_name_or_path: m\nlr_scheduler_kwargs: " + "{a: " * 40 + "1" + "}" * 40 + "\n")
    put(d, "deep_block_map.yaml", "".join(" " * i + "a:\n" for i in range(40)) + " " * 40 + "b: 1\n")
    put(d, "deep_block_list.yaml", "data_path:\n" + "".join(" " * (2 * i) + "-\n" for i in range(40)) + " " * 80 + "- x\n")
    put(d, "two_documents.yaml", "model_name_or_path: m\n---\noutput_dir: out\n")
    put(d, "duplicate_key.yaml", "model_name_or_path: m\nlr_scheduler_kwargs: {min_lr: 1.0e-5, min_lr: 2.0e-5}\n")


def data_record_seeds():
    d = target("data_record")
    recs = [{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                            {"from": "gpt", "value": "A cat."}]},
            {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."},
                                        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
            {"id": "2", "image": None, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}]
    put(d, "list.json", json.dumps(recs, indent=1))
    put(d, "lines.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    put(d, "regress-deep-record.json", json.dumps(recs[:1])[:-1] + ", " + deep_json('{"id":', "}") + "]")
    put(d, "regress-deep-line.jsonl", json.dumps(recs[1]) + "\n" + deep_json() + "\n")


def tokenizer_model_seeds():
    """tokenizer.model files sentencepiece trains (identity and nmt_nfkc normalization), the nmt_nfkc
    charsmap alone, and small hand-made Darts-clone tries (see tests/data/test_tokenizer_model_checks.py)."""
    import sentencepiece as spm
    import data_fixtures as fx
    d = target("tokenizer_model")
    for rule in ("identity", "nmt_nfkc"):
        model = io.BytesIO()  # in memory: no temporary path recorded in trainer_spec (reproducible bytes)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(fx.CORPUS * 50), model_writer=model, vocab_size=400, model_type="bpe",
            hard_vocab_limit=False, byte_fallback=True, normalization_rule_name=rule, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
        put(d, rule + ".model", model.getvalue())
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    import test_tokenizer_model_checks as checks
    put(d, "nmt_nfkc.charsmap", checks.charsmap_of(open(os.path.join(d, "nmt_nfkc.model"), "rb").read()))
    for depth in (1, 3, 32):
        put(d, "chain%d.charsmap" % depth, checks.blob_of(checks.chain_trie(depth)))


if __name__ == "__main__":
    safetensors_seeds()
    sharded_index_seeds()
    torch_seeds()
    model_config_seeds()
    train_config_seeds()
    data_record_seeds()
    tokenizer_model_seeds()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(HERE, "corpus")) for f in fs)
    print(f"corpus: {total} bytes")
