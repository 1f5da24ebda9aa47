// device: which device a run trains on, and whether its saves are asynchronous by default.
#include <catch2/catch.hpp>

#include "io/error.h"
#include "train/config.h"
#include "train/device.h"

using namespace llava;

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
