// The restricted unpickler on its own (data.pkl of a torch.save archive): storages come from a stand-in
// that, like load_pt, refuses sizes larger than the input. The result is walked recursively, as
// `llava inspect` and the state-dict loaders do.
#include <torch/torch.h>

#include "fuzz/fuzz_input.h"
#include "io/pickle.h"

namespace {

size_t walk(const c10::IValue& v) {
  size_t n = 1;
  if (v.isGenericDict())
    for (auto& e : v.toGenericDict()) n += walk(e.key()) + walk(e.value());
  else if (v.isList())
    for (const c10::IValue& e : v.toList()) n += walk(e);
  else if (v.isTuple())
    for (auto& e : v.toTupleRef().elements()) n += walk(e);
  else if (v.isTensor())
    n += v.toTensor().sum().item<double>() == 0;  // reads every element of the view
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto storage = [&](const llava::io::pickle::StorageRef& ref) {
    if (static_cast<uint64_t>(ref.numel) > size) throw llava::Error("storage larger than the input");
    return torch::zeros({ref.numel}, torch::TensorOptions().dtype(ref.dtype));
  };
  // Both allowlists: the weights-only one, and the one for DeepSpeed's files and HF's rng_state.pth.
  int result = llava::fuzz::expect_ok_or_error([&] { walk(llava::io::pickle::loads(bytes, storage, "fuzz.pkl")); });
  result |= llava::fuzz::expect_ok_or_error([&] {
    walk(llava::io::pickle::loads(bytes, storage, "fuzz.pkl", llava::io::pickle::Globals::kDeepSpeed));
  });
  return result;
}
