// The pickle subset of torch.save / torch.load(weights_only=True), in both directions.
//
// Values are c10::IValue: None, bool, int, double, str, Tensor, tuple, list, dict (keys int or str,
// insertion order kept; a Python OrderedDict reads back as a dict). Nothing else can be written, and the
// reader accepts only the globals below, so a file can never make us run code:
//   collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
//   torch.<X>Storage for the dtypes we support.
// Globals::kDeepSpeed also accepts what DeepSpeed's checkpoint files and HF's rng_state.pth hold, each
// rebuilt as plain data (nothing is constructed or called):
//   torch.Size(t) -> the tuple t; deepspeed.runtime.zero.config.ZeroStageEnum(v) -> the int v;
//   deepspeed.runtime.fp16.loss_scaler.LossScaler -> its fields as a dict;
//   deepspeed.utils.tensor_fragment.fragment_address -> the tuple (numel, start);
//   numpy arrays and dtypes (numpy.ndarray, numpy.dtype, numpy[._]core.multiarray._reconstruct, with
//   _codecs.encode for their bytes) -> None (the NumPy RNG state, which we read and ignore).
// The writer also writes numpy arrays (numpy_array below), for the rng_state.pth files HF loads.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/torch.h>

namespace llava::io::pickle {

// A storage referenced from data.pkl: the record `data/<key>` holds numel elements of dtype.
struct StorageRef {
  std::string key;
  c10::ScalarType dtype;
  int64_t numel;
};

// Serializes `value` as protocol 2. Every tensor becomes its own storage (a contiguous CPU copy when
// needed), appended to `storages` in key order "0", "1", ...
std::string dumps(const c10::IValue& value, std::vector<torch::Tensor>& storages);

enum class Globals { kTorch, kDeepSpeed };

// Parses a protocol-2 pickle. `load_storage` returns a 1-D tensor of exactly ref.numel elements of
// ref.dtype (it is called once per key). `where` names the file in every error message.
c10::IValue loads(const std::string& bytes, const std::function<torch::Tensor(const StorageRef&)>& load_storage,
                  const std::string& where, Globals globals = Globals::kTorch);

// Convenience builders for the values we write.
c10::impl::GenericDict new_dict();
c10::impl::GenericList new_list();

// A numpy.ndarray, written as NumPy >= 2 pickles one (numpy._core.multiarray._reconstruct(numpy.ndarray,
// (0,), b'b') rebuilt by BUILD with (1, shape, numpy.dtype(dtype) with its state, False, the raw bytes through
// _codecs.encode)): the globals HF's safe_globals() lets torch.load(weights_only=True) rebuild, for the NumPy
// state in HF's rng_state.pth. Writer only (the reader reads any numpy array as None). `dtype`: NumPy's
// type code, e.g. "u4"; `data`: the elements' little-endian bytes, product(shape) x itemsize of them.
c10::IValue numpy_array(const std::string& dtype, const std::vector<int64_t>& shape, std::string data);

}  // namespace llava::io::pickle
