// The RNG file of a checkpoint is independent of the device: CUDA generator states ("cuda_rank_<R>") are
// written beside the CPU ones only when the run used CUDA, a checkpoint without them reads as "none" (a GPU
// run resuming a CPU run's checkpoint keeps its seeded generator), and a CPU resume never needs them.
#include <catch2/catch.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <cstring>

#include "io/error.h"
#include "io/safetensors.h"
#include "io/test_helpers.h"
#include "checkpoint/resume_state.h"

using namespace llava;

TEST_CASE("CUDA generator states are written only when given and read back per rank, rank 0's for new ranks") {
  const std::string cpu_only = test::temp_dir("rng-cpu-only"), with_cuda = test::temp_dir("rng-with-cuda");
  const auto cpu = checkpoint::cpu_rng_state();
  checkpoint::write_rng_states(cpu_only, {cpu, cpu});
  CHECK(io::SafetensorsFile::open(cpu_only + "/llava_rng_state.safetensors").tensors().size() == 2);
  CHECK_FALSE(checkpoint::read_cuda_rng_state(cpu_only, 0).has_value());  // a CPU run's checkpoint: none
  CHECK(checkpoint::read_rng_state(cpu_only, 1)->equal(cpu));

  // A CUDA generator's state is 16 bytes (seed, offset); any uint8 vector is stored as given.
  auto r0 = torch::arange(16, torch::kUInt8), r1 = torch::arange(16, 32, torch::kUInt8);
  checkpoint::write_rng_states(with_cuda, {cpu, cpu}, {r0, r1});
  CHECK(checkpoint::read_cuda_rng_state(with_cuda, 1)->equal(r1));
  CHECK(checkpoint::read_cuda_rng_state(with_cuda, 5)->equal(r0));  // more ranks now: rank 0's, as for the CPU state
  CHECK(checkpoint::read_rng_state(with_cuda, 0)->equal(cpu));      // the CPU state is untouched by the CUDA ones

  checkpoint::write_rng_states(with_cuda, {cpu}, {torch::zeros({2, 8}, torch::kUInt8)});
  CHECK_THROWS_WITH(checkpoint::read_cuda_rng_state(with_cuda, 0), Catch::Contains("not a CUDA generator state"));
}

TEST_CASE("generator states libtorch would refuse are named with their file and tensor when read") {
  const std::string dir = test::temp_dir("rng-garbage");
  const std::string file = dir + "/llava_rng_state.safetensors";
  const auto cpu = checkpoint::cpu_rng_state();
  // CPU: the right size, but no mt19937 state (libtorch: "Invalid mt19937 state").
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  for (auto garbage : {torch::zeros_like(cpu), torch::randint(0, 255, cpu.sizes(), generator, torch::kUInt8)}) {
    checkpoint::write_rng_states(dir, {garbage});
    CHECK_THROWS_WITH(checkpoint::read_rng_state(dir, 0),
                      file + ": 'rank_0' is not a valid CPU generator state (torch.get_rng_state()): Invalid mt19937 "
                             "state; nothing was changed");
  }
  // CUDA: a Philox offset libtorch's set_state refuses (not a multiple of 4, negative), or another size.
  auto with_offset = [](int64_t offset) {
    auto s = torch::zeros({16}, torch::kUInt8);
    std::memcpy(s.data_ptr<uint8_t>() + 8, &offset, 8);
    return s;
  };
  for (int64_t offset : {int64_t{6}, int64_t{-4}}) {
    checkpoint::write_rng_states(dir, {cpu}, {with_offset(offset)});
    CHECK_THROWS_WITH(checkpoint::read_cuda_rng_state(dir, 0),
                      file + ": 'cuda_rank_0' is not a valid CUDA generator state: its Philox offset " +
                          std::to_string(offset) + " is not a non-negative multiple of 4; nothing was changed");
  }
  checkpoint::write_rng_states(dir, {cpu}, {with_offset(8)});
  CHECK(checkpoint::read_cuda_rng_state(dir, 0)->equal(with_offset(8)));
  checkpoint::write_rng_states(dir, {cpu}, {torch::zeros({5056}, torch::kUInt8)});
  CHECK_THROWS_WITH(checkpoint::read_cuda_rng_state(dir, 0),
                    Catch::Contains("'cuda_rank_0' is not a CUDA generator state (torch.cuda.get_rng_state()): "
                                    "expected uint8 [16]"));
}
