#include "checkpoint/hf_rng_state.h"

#include <cstring>
#include <filesystem>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>

#include "checkpoint/state_checks.h"
#include "io/error.h"
#include "io/pickle.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

namespace {

namespace fs = std::filesystem;
constexpr size_t kWords = 624;  // MT19937's state
constexpr int64_t kCudaStateBytes = 16;  // CUDAGeneratorImpl::get_state: Philox seed (u64) + offset (i64)

std::string rng_file(const std::string& dir, int rank) {
  for (const std::string& name : {"rng_state_" + std::to_string(rank) + ".pth", std::string("rng_state.pth"),
                                  std::string("rng_state_0.pth")})
    if (fs::is_regular_file(fs::path(dir) / name)) return (fs::path(dir) / name).string();
  return "";
}

int64_t cpu_state_bytes() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state().numel();
}

torch::Tensor checked_state(const std::string& path, const std::string& key, const c10::IValue& v, int64_t bytes,
                            const std::string& what) {
  if (!v.isTensor() || v.toTensor().scalar_type() != torch::kUInt8 || v.toTensor().dim() != 1 ||
      v.toTensor().numel() != bytes)
    fail(path, "'" + key + "' must be a 1-D uint8 tensor of " + std::to_string(bytes) + " bytes (" + what + ")");
  return v.toTensor().contiguous().clone();
}

// "cuda": one state (HF's non-distributed save) or one per device (get_rng_state_all); the one for `device`.
std::optional<torch::Tensor> cuda_state_for(const std::string& path, const c10::IValue& v, int device) {
  const std::string what = "torch.cuda.get_rng_state(), or a list of them";
  if (v.isTensor()) {
    auto state = checked_state(path, "cuda", v, kCudaStateBytes, what);
    check_cuda_generator_state(state, path, "cuda");
    return state;
  }
  std::vector<c10::IValue> states;
  if (v.isList()) states = v.toListRef().vec();
  else if (v.isTuple()) states = v.toTupleRef().elements().vec();
  else fail(path, "'cuda' must be a 1-D uint8 tensor of 16 bytes (" + what + ")");
  if (device >= static_cast<int>(states.size())) return std::nullopt;
  const std::string key = "cuda[" + std::to_string(device) + "]";
  auto state = checked_state(path, key, states[device], kCudaStateBytes, what);
  check_cuda_generator_state(state, path, key);
  return state;
}

// random.getstate() of `words` right after seeding: (3, (words..., 624), None).
c10::IValue python_state(const std::vector<uint32_t>& words) {
  std::vector<c10::IValue> state;
  for (uint32_t w : words) state.emplace_back(static_cast<int64_t>(w));
  state.emplace_back(static_cast<int64_t>(kWords));
  return c10::ivalue::Tuple::create({int64_t{3}, c10::ivalue::Tuple::create(std::move(state)), c10::IValue()});
}

// np.random.get_state() of `words` right after seeding: ('MT19937', keys, pos 624, has_gauss 0, 0.0).
c10::IValue numpy_state(const std::vector<uint32_t>& words) {
  std::string bytes;
  for (uint32_t w : words)
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<char>((w >> (8 * i)) & 0xff));  // little-endian
  return c10::ivalue::Tuple::create({std::string("MT19937"),
                                     io::pickle::numpy_array("u4", {static_cast<int64_t>(kWords)}, std::move(bytes)),
                                     static_cast<int64_t>(kWords), int64_t{0}, 0.0});
}

}  // namespace

std::optional<HfRngState> read_hf_rng_state(const std::string& dir, int rank, int cuda_device) {
  const std::string path = rng_file(dir, rank);
  if (path.empty()) return std::nullopt;
  const auto value = io::load_pt(path, io::pickle::Globals::kDeepSpeed);  // NumPy's state needs its globals
  if (!value.isGenericDict()) fail(path, "expected a dict {python, numpy, cpu, ...}");
  auto dict = value.toGenericDict();
  auto cpu = dict.find("cpu");
  if (cpu == dict.end()) fail(path, "no 'cpu' (torch.get_rng_state()) entry");
  HfRngState state;
  state.file = path;
  state.cpu = checked_state(path, "cpu", cpu->value(), cpu_state_bytes(), "torch.get_rng_state()");
  check_cpu_generator_state(state.cpu, path, "cpu");
  if (cuda_device >= 0)
    if (auto cuda = dict.find("cuda"); cuda != dict.end()) state.cuda = cuda_state_for(path, cuda->value(), cuda_device);
  return state;
}

std::vector<uint32_t> mt19937_init_genrand(uint32_t seed) {
  std::vector<uint32_t> mt(kWords);
  mt[0] = seed;
  for (uint32_t i = 1; i < kWords; ++i) mt[i] = 1812433253u * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i;
  return mt;
}

// Matsumoto & Nishimura's init_by_array (mt19937ar.c), which CPython's random.seed uses.
std::vector<uint32_t> mt19937_init_by_array(const std::vector<uint32_t>& key) {
  std::vector<uint32_t> mt = mt19937_init_genrand(19650218u);
  size_t i = 1, j = 0;
  for (size_t k = std::max(kWords, key.size()); k > 0; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + key[j] + static_cast<uint32_t>(j);
    if (++i >= kWords) {
      mt[0] = mt[kWords - 1];
      i = 1;
    }
    if (++j >= key.size()) j = 0;
  }
  for (size_t k = kWords - 1; k > 0; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - static_cast<uint32_t>(i);
    if (++i >= kWords) {
      mt[0] = mt[kWords - 1];
      i = 1;
    }
  }
  mt[0] = 0x80000000u;
  return mt;
}

torch::Tensor cuda_seeded_rng_state(uint64_t seed) {
  auto state = torch::zeros({kCudaStateBytes}, torch::kUInt8);
  std::memcpy(state.data_ptr<uint8_t>(), &seed, sizeof seed);  // then offset 0
  return state;
}

void write_hf_rng_states(const std::string& dir, uint64_t seed, const std::vector<torch::Tensor>& cpu_by_rank,
                         const std::vector<torch::Tensor>& cuda_by_rank,
                         const std::vector<int64_t>& cuda_device_by_rank) {
  std::vector<uint32_t> key;  // CPython: the seed's 32-bit words, low first
  for (uint64_t n = seed; n > 0; n >>= 32) key.push_back(static_cast<uint32_t>(n));
  if (key.empty()) key.push_back(0);
  const c10::IValue python = python_state(mt19937_init_by_array(key));
  const c10::IValue numpy = numpy_state(mt19937_init_genrand(static_cast<uint32_t>(seed)));
  const size_t world = cpu_by_rank.size();
  for (size_t r = 0; r < world; ++r) {
    auto d = io::pickle::new_dict();
    d.insert("python", python);
    d.insert("numpy", numpy);
    d.insert("cpu", cpu_by_rank[r]);
    if (r < cuda_by_rank.size()) {
      if (world == 1) {
        d.insert("cuda", cuda_by_rank[r]);
      } else {
        auto states = io::pickle::new_list();
        for (int64_t device = 0; device < cuda_device_by_rank.at(r); ++device) states.push_back(cuda_seeded_rng_state(seed));
        states.push_back(cuda_by_rank[r]);
        d.insert("cuda", states);
      }
    }
    const std::string name = world == 1 ? "rng_state.pth" : "rng_state_" + std::to_string(r) + ".pth";
    io::save_pt((fs::path(dir) / name).string(), d);
  }
}

}  // namespace llava::checkpoint
