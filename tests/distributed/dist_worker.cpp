// A worker for the multi-process tests, started by llava-run (or directly with torchrun variables).
//   dist_worker collectives OUT_DIR  every collective once; writes OUT_DIR/rank<R>.json, which the
//                                    pytest side checks against its own computation of the results
//   dist_worker hang R               rank R never joins the rendezvous; the others must time out
//   dist_worker stall                rank 1 joins but never enters the allreduce; rank 0 must time out
//   dist_worker die                  rank 1 dies after joining; rank 0's allreduce must fail
// Any llava::Error is printed as "error: <message>" with exit status 1, like the llava binary.
// LLAVA_DIST_DEVICE=cuda puts every tensor on cuda:LOCAL_RANK, so the backend is NCCL (scripts/gpu-check.sh).
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "distributed/buckets.h"
#include "distributed/communicator.h"
#include "distributed/zero_layout.h"
#include "io/error.h"

namespace dist = llava::dist;
namespace fs = std::filesystem;

namespace {

// Rank r's input for test `seed`: exact float32 values k/7 (k an integer), which the Python side
// rebuilds bit for bit. Sums of them round, so the order of summation shows in the last bits.
torch::Device g_device = torch::kCPU;  // where the collectives' tensors live

torch::Tensor input(int seed, int rank, int64_t n) {
  auto i = torch::arange(n, torch::kInt64);
  auto k = (i * 7919 + rank * 104729 + seed * 31337).remainder(2001) - 1000;
  return k.to(torch::kFloat32).div(7.0).to(g_device);
}

std::vector<double> values(const torch::Tensor& t) {
  auto flat = t.to(torch::kCPU).to(torch::kFloat64).contiguous().reshape({-1});
  return std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
}

void sleep_seconds(double s) { std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int>(s * 1000))); }

nlohmann::json run_collectives(dist::Communicator& comm, const fs::path& out_dir) {
  const int rank = comm.rank(), world = comm.world_size();
  nlohmann::json results;

  int seed = 1;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (auto op : {dist::Reduce::Sum, dist::Reduce::Avg}) {
      auto x = input(seed++, rank, 37).to(dtype);
      comm.allreduce(x, op);
      std::string name = std::string("allreduce_") + (op == dist::Reduce::Sum ? "sum_" : "avg_") +
                         (dtype == torch::kFloat32 ? "f32" : "bf16");
      results[name] = values(x);
    }

  auto b32 = input(5, rank, 11);
  comm.broadcast(b32, world - 1);
  results["broadcast_f32_root_last"] = values(b32);
  auto b16 = input(6, rank, 11).to(torch::kBFloat16);
  comm.broadcast(b16, 0);
  results["broadcast_bf16_root_0"] = values(b16);

  results["all_gather_f32"] = values(comm.all_gather(input(7, rank, 5)));
  results["all_gather_bf16"] = values(comm.all_gather(input(8, rank, 5).to(torch::kBFloat16)));
  results["reduce_scatter_sum_f32"] = values(comm.reduce_scatter(input(9, rank, world * 6), dist::Reduce::Sum));
  results["reduce_scatter_avg_bf16"] =
      values(comm.reduce_scatter(input(10, rank, world * 6).to(torch::kBFloat16), dist::Reduce::Avg));

  // Barrier: rank 0 leaves a mark late; nobody may pass the barrier before the mark exists.
  fs::path mark = out_dir / "barrier_mark";
  if (rank == 0) {
    sleep_seconds(0.3);
    std::ofstream(mark) << "0";
  }
  comm.barrier();
  results["barrier_saw_mark"] = {fs::exists(mark) ? 1.0 : 0.0};

  // Gradient buckets: five tensors, cap 16 elements -> several buckets.
  std::vector<std::vector<int64_t>> shapes = {{3, 4}, {5}, {2, 2, 2}, {7}, {1}};
  std::vector<torch::Tensor> grads;
  for (size_t j = 0; j < shapes.size(); ++j) {
    int64_t numel = 1;
    for (auto s : shapes[j]) numel *= s;
    grads.push_back(input(20 + static_cast<int>(j), rank, numel).reshape(shapes[j]));
  }
  dist::allreduce_gradients(comm, grads, dist::Reduce::Avg, 16);
  std::vector<double> flat_grads;
  for (auto& g : grads)
    for (double v : values(g)) flat_grads.push_back(v);
  results["bucket_average"] = flat_grads;

  // ZeRO: each rank writes only its own ranges of the layout; the all-gather must rebuild every
  // parameter (param p, element j = 100*p + j) with -1 in the padding.
  std::vector<dist::ParamSpec> params = {{"a", 10}, {"b", 7}, {"c", 1}, {"d", 13}};
  auto layout = dist::make_zero_layout(params, world);
  auto shard = torch::full({layout.shard_numel}, -1.0f, torch::TensorOptions(g_device));
  for (const auto& range : layout.rank_ranges[rank]) {
    int64_t p = std::find_if(params.begin(), params.end(), [&](auto& s) { return s.name == range.name; }) - params.begin();
    auto ids = torch::arange(range.param_offset, range.param_offset + range.length, torch::kFloat32).to(g_device);
    shard.narrow(0, range.shard_offset, range.length).copy_(ids + 100.0 * p);
  }
  auto flat = torch::empty({layout.padded_numel()}, torch::TensorOptions(g_device));
  comm.all_gather_into(flat, shard);
  results["zero_all_gather"] = values(flat);
  return results;
}

int run(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  auto env = dist::read_dist_env();
  if (mode == "hang" && argc > 2 && env.rank == std::stoi(argv[2])) {
    sleep_seconds(60);  // never joins; llava-run stops it once the others failed
    return 0;
  }
  dist::CommOptions options;
  options.group_for_single_rank = true;  // test the backend with one rank too
  if (const char* device = std::getenv("LLAVA_DIST_DEVICE"); device && std::string(device) == "cuda") {
    if (!torch::cuda::is_available()) throw llava::Error("LLAVA_DIST_DEVICE=cuda: no CUDA device in this build or machine");
    g_device = options.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  }
  auto comm = dist::Communicator::from_env(options);
  std::cout << "joined rank " << comm.rank() << " of " << comm.world_size() << " backend " << comm.backend_name()
            << std::endl;

  if (mode == "collectives" && argc > 2) {
    nlohmann::json report = {{"rank", comm.rank()}, {"world_size", comm.world_size()},
                             {"backend", comm.backend_name()}, {"results", run_collectives(comm, argv[2])}};
    std::ofstream(fs::path(argv[2]) / ("rank" + std::to_string(comm.rank()) + ".json")) << report.dump();
    return 0;
  }
  if (mode == "stall" || mode == "die") {
    comm.barrier();
    if (comm.rank() == 1) {
      if (mode == "die") std::raise(SIGKILL);
      sleep_seconds(60);
      return 0;
    }
    if (mode == "die") sleep_seconds(1);  // rank 1 is surely gone (and reaped by llava-run) by then
    auto x = input(1, comm.rank(), 8);
    comm.allreduce(x, dist::Reduce::Sum);
    std::cout << "allreduce returned without rank 1" << std::endl;
    return 0;
  }
  if (mode == "hang") return 0;  // joined: fine for the ranks that were not told to hang
  std::cerr << "usage: dist_worker collectives OUT_DIR | hang RANK | stall | die\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const llava::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
