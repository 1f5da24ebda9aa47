// The RNG file of a checkpoint is independent of the device: CUDA generator states ("cuda_rank_<R>") are
// written beside the CPU ones only when the run used CUDA, a checkpoint without them reads as "none" (a GPU
// run resuming a CPU run's checkpoint keeps its seeded generator), and a CPU resume never needs them.
#include <catch2/catch.hpp>

#include "io/error.h"
#include "io/safetensors.h"
#include "io/test_helpers.h"
#include "train/device.h"
#include "train/resume_state.h"

using namespace llava;

TEST_CASE("CUDA generator states are written only when given and read back per rank, rank 0's for new ranks") {
  const std::string cpu_only = test::temp_dir("rng-cpu-only"), with_cuda = test::temp_dir("rng-with-cuda");
  const auto cpu = train::cpu_rng_state();
  train::write_rng_states(cpu_only, {cpu, cpu});
  CHECK(io::SafetensorsFile::open(cpu_only + "/llava_rng_state.safetensors").tensors().size() == 2);
  CHECK_FALSE(train::read_cuda_rng_state(cpu_only, 0).has_value());  // a CPU run's checkpoint: none
  CHECK(train::read_rng_state(cpu_only, 1)->equal(cpu));

  // A CUDA generator's state is 16 bytes (seed, offset); any uint8 vector is stored as given.
  auto r0 = torch::arange(16, torch::kUInt8), r1 = torch::arange(16, 32, torch::kUInt8);
  train::write_rng_states(with_cuda, {cpu, cpu}, {r0, r1});
  CHECK(train::read_cuda_rng_state(with_cuda, 1)->equal(r1));
  CHECK(train::read_cuda_rng_state(with_cuda, 5)->equal(r0));  // more ranks now: rank 0's, as for the CPU state
  CHECK(train::read_rng_state(with_cuda, 0)->equal(cpu));      // the CPU state is untouched by the CUDA ones

  train::write_rng_states(with_cuda, {cpu}, {torch::zeros({2, 8}, torch::kUInt8)});
  CHECK_THROWS_WITH(train::read_cuda_rng_state(with_cuda, 0), Catch::Contains("not a CUDA generator state"));
}

TEST_CASE("device: auto is the CPU without CUDA, cpu and use_cpu are the CPU, cuda is one error naming the key") {
  train::TrainConfig c;
  c.source = "train.yaml";
  CHECK(train::training_device(c, 3).is_cpu());  // auto, and no CUDA in this process (CI, or a CPU build)
  c.use_cpu = true;
  CHECK(train::training_device(c, 0).is_cpu());
  c.use_cpu = false;
  c.device = "cpu";
  CHECK(train::training_device(c, 0).is_cpu());
  CHECK_FALSE(train::async_save_enabled(c, torch::kCPU));  // async_save: off on the CPU unless set
  c.async_save = true;
  CHECK(train::async_save_enabled(c, torch::kCPU));
  if (!torch::cuda::is_available()) {
    for (const char* d : {"cuda", "cuda:0"}) {
      c.device = d;
      CHECK_THROWS_WITH(train::training_device(c, 0),
                        Catch::StartsWith("train.yaml: key 'device': ") && Catch::Contains(d) && Catch::Contains("device: cpu"));
    }
  }
}
