"""safetensors and torch.save interop with the Python reference implementations, both directions."""
import json
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_oracle import assert_clear_error, binary, bits_equal, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        x = torch.randn(3, 5, generator=g) * 100
        out[f"t.{dt}".replace("torch.", "")] = x > 0 if dt == torch.bool else x.to(dt)
    out["scalar_0d"] = torch.tensor(3.25)
    out["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    out["ünï.名前 ✓"] = torch.arange(4, dtype=torch.int64)
    return out


def test_python_safetensors_to_ours_and_back_is_bit_exact(tmp_path):
    tensors = sample_tensors()
    src, dst = tmp_path / "py.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt", "κ": "v"})
    run([binary("LLAVA_IO_TOOL"), "st-copy", src, dst])
    back = load_file(str(dst))
    assert set(back) == set(tensors)
    for k in tensors:
        assert bits_equal(back[k], tensors[k]), k
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "κ": "v"}
    header_len = struct.unpack("<Q", dst.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    print(f"{len(tensors)} tensors, {len(DTYPES)} dtypes round-tripped bit-exact")


def test_sharded_index_both_ways(tmp_path):
    from huggingface_hub import save_torch_state_dict
    tensors = {f"layers.{i}.weight": torch.randn(16, 16) for i in range(6)}  # 1024 B each
    (tmp_path / "py").mkdir()
    save_torch_state_dict(tensors, str(tmp_path / "py"), max_shard_size=2500)
    py_index = json.loads((tmp_path / "py" / "model.safetensors.index.json").read_text())
    assert len(set(py_index["weight_map"].values())) == 3
    run([binary("LLAVA_IO_TOOL"), "sharded-copy", tmp_path / "py", tmp_path / "ours", "2500"])
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == py_index["weight_map"]  # same split rule, same shard names
    assert ours["metadata"]["total_size"] == py_index["metadata"]["total_size"]
    for name, shard in ours["weight_map"].items():
        assert bits_equal(load_file(str(tmp_path / "ours" / shard))[name], tensors[name])


def python_structure():
    sd = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict with a _metadata attribute
    return {
        "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(2, 3), "exp_avg_sq": torch.rand(2, 3)},
                  1: {"step": torch.tensor(7.0), "exp_avg": torch.randn(2), "exp_avg_sq": torch.rand(2)}},
        "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                          "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                          "fused": None, "params": [0, 1], "initial_lr": 2e-4}],
        "nested": [1, -2, 2**40, -(2**62), 3.5, True, None, "str", (1, (2, 3)), [], {}, ()],
        "bf16": torch.randn(4, 4).to(torch.bfloat16),
        "half": torch.randn(3).to(torch.float16),
        "int": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False]),
        "zero_d_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "view": torch.arange(20.0)[5:15:2],  # a strided view into a larger storage
        "state_dict": sd,
        "shared": [torch.ones(2)] * 2,
    }


def assert_same(a, b, path="root"):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and bits_equal(a, b.contiguous()), path
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a.keys()) == list(b.keys()), path
        for k in b:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def test_python_torch_save_loads_in_ours_and_our_save_loads_weights_only(tmp_path):
    obj = python_structure()
    torch.save(obj, tmp_path / "py.pt")
    run([binary("LLAVA_IO_TOOL"), "pt-copy", tmp_path / "py.pt", tmp_path / "ours.pt"])
    back = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert_same(back, obj)
    names = zipfile.ZipFile(tmp_path / "ours.pt").namelist()
    assert {"archive/data.pkl", "archive/byteorder", "archive/version"} <= set(names)
    assert len({n.split("/")[0] for n in names}) == 1  # one top-level folder
    with open(tmp_path / "ours.pt", "rb") as f:  # records are 64-byte aligned
        for info in zipfile.ZipFile(tmp_path / "ours.pt").infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED


def test_our_sample_structure_loads_weights_only(tmp_path):
    run([binary("LLAVA_IO_TOOL"), "pt-sample", tmp_path / "s.pt"])
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    want = {
        "state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).reshape(2, 3) * (i + 1),
                      "exp_avg_sq": torch.full((4,), 0.25, dtype=torch.float64)} for i in range(2)},
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "foreach": None,
                          "fused": True, "big": 2**40, "negative": -70000, "params": [0, 1]}],
        "bf16": torch.linspace(-2, 2, 5).to(torch.bfloat16),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.tensor([2**50, -3]),
        "unicode κλειδί ✓": "värde",
        "empty": torch.empty(0, 3),
    }
    assert_same(got, want)
    assert got["state"][0]["step"].dim() == 0


def write_st(path, header: bytes, data: bytes, claimed=None):
    path.write_bytes(struct.pack("<Q", len(header) if claimed is None else claimed) + header + data)
    return path


BAD_SAFETENSORS = {
    "truncated": (lambda p: p.write_bytes(b"\x10\x00\x00"), "truncated"),
    "header_past_end": (lambda p: write_st(p, b'{}', b"", claimed=4096), "runs past the end"),
    "absurd_header": (lambda p: write_st(p, b'{}', b"", claimed=2**62), "exceeds the limit"),
    "bad_json": (lambda p: write_st(p, b'{"a": {"dtype": ', b""), "not valid JSON"),
    "overlap": (lambda p: write_st(p, json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
                                   bytes(12)), "overlap"),
    "out_of_range": (lambda p: write_st(p, json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(),
                                        bytes(8)), "run past the end"),
    "shape_mismatch": (lambda p: write_st(p, json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
                                          bytes(8)), "byte-count mismatch"),
    "dtype_mismatch": (lambda p: write_st(p, json.dumps({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}).encode(),
                                          bytes(8)), "byte-count mismatch"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors_give_one_clear_error(tmp_path, case):
    make, fault = BAD_SAFETENSORS[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    assert_clear_error(run([binary(), "inspect", path], check=False), str(path), fault)


def test_truncated_real_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    assert_clear_error(run([binary(), "inspect", path], check=False), str(path), "run past the end")


def test_zip_with_missing_record_and_forbidden_globals(tmp_path):
    torch.save({"w": torch.randn(3)}, tmp_path / "ok.pt")
    src = zipfile.ZipFile(tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "missing.pt", "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("data/0"):
                dst.writestr(info.filename, src.read(info))
    assert_clear_error(run([binary(), "inspect", tmp_path / "missing.pt"], check=False),
                       "missing.pt", "missing record 'data/0'")

    # NumPy arrays (HF's rng_state.pth holds them) are rebuilt as plain tensors and listed; a global outside
    # the restricted set is still refused by name.
    import datetime
    import numpy as np
    torch.save({"rng": np.arange(3)}, tmp_path / "numpy.pt")
    listing = run([binary(), "inspect", tmp_path / "numpy.pt"]).stdout
    assert "rng" in listing, listing
    torch.save({"t": datetime.datetime(2020, 1, 1)}, tmp_path / "datetime.pt")
    assert_clear_error(run([binary(), "inspect", tmp_path / "datetime.pt"], check=False), "datetime.pt",
                       "forbidden global 'datetime.datetime'")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert_clear_error(run([binary(), "inspect", tmp_path / "evil.pt"], check=False), "evil.pt",
                       "forbidden global 'posix.system'")
    assert not (tmp_path / "pwned").exists()


def set_declared_size(path, record_suffix, size, zip64):
    """Rewrites the central directory so that one record declares `size` bytes: in its 32-bit fields, or
    (zip64) with those saturated and the size in a zip64 extra field, as writers of files > 4 GiB do."""
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    entries, at = [], cd_offset
    while at < cd_offset + cd_size:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        entry = bytearray(data[at:at + 46 + name_len + extra_len + comment_len])
        name = bytes(entry[46:46 + name_len]).decode()
        if name.endswith(record_suffix):
            if zip64:
                struct.pack_into("<II", entry, 20, 0xFFFFFFFF, 0xFFFFFFFF)
                extra = struct.pack("<HHQQ", 1, 16, size, size)
                entry[46 + name_len:46 + name_len] = extra
                struct.pack_into("<H", entry, 30, extra_len + len(extra))
            else:
                struct.pack_into("<II", entry, 20, size, size)
        entries.append(bytes(entry))
        at += 46 + name_len + extra_len + comment_len
    directory = b"".join(entries)
    end = bytearray(data[eocd:])
    struct.pack_into("<I", end, 12, len(directory))
    path.write_bytes(data[:cd_offset] + directory + bytes(end))


@pytest.mark.parametrize("zip64", [False, True])
@pytest.mark.parametrize("record", ["data.pkl", "version", "data/0"])
def test_records_declaring_more_bytes_than_the_file_are_refused_before_reading(tmp_path, record, zip64):
    # libtorch's reader allocated a record at its declared size before any check (fuzz_torch_archive:
    # malloc(4294967295)); every declared size is now checked against the file first.
    w = torch.randn(3)
    torch.save({"w": w}, tmp_path / "ok.pt")
    path = tmp_path / "liar.pt"
    path.write_bytes((tmp_path / "ok.pt").read_bytes())
    true_size = next(i.file_size for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(record))
    if zip64:  # the true size in a zip64 field: still read, and read right
        set_declared_size(path, record, true_size, zip64=True)
        run([binary("LLAVA_IO_TOOL"), "pt-copy", path, tmp_path / "copy.pt"])
        assert bits_equal(torch.load(tmp_path / "copy.pt", weights_only=True)["w"], w)
    size = (1 << 40) if zip64 else 0xFFFFFFF0
    set_declared_size(path, record, size, zip64)
    assert_clear_error(run([binary(), "inspect", path], check=False), "liar.pt",
                       f"declares {size} bytes, more than the whole file")


def test_inspect_lists_tensors_of_every_kind_of_path(tmp_path):
    save_file({"a.weight": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    out = run([binary(), "inspect", tmp_path / "m.safetensors"]).stdout
    assert "a.weight  F32  [2, 3]  24 bytes" in out and "b  BF16  [4]  8 bytes" in out
    assert out.strip().endswith("2 tensors, 32 bytes")

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    from huggingface_hub import save_torch_state_dict
    save_torch_state_dict({f"l{i}": torch.zeros(8, 8) for i in range(3)}, str(ckpt), max_shard_size=300)
    torch.save({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.5, "params": [0]}]},
               ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text("{}")
    out = run([binary(), "inspect", ckpt]).stdout
    assert "== model.safetensors.index.json" in out and "l2  F32  [8, 8]  256 bytes" in out
    assert "== optimizer.pt" in out and "state.0.step  float32  []  4 bytes" in out
    assert "param_groups.0.lr = 0.5" in out and "param_groups.0.params = [0]" in out
    assert out.strip().endswith("4 tensors, 772 bytes")
