// A thin communicator over a c10d process group: the collectives a data-parallel / ZeRO trainer needs,
// on flat tensors, each the backend's native one (Gloo and NCCL alike: fp32/bf16 allreduce,
// _reduce_scatter_base, _allgather_base; AVG is SUM / N). A single-process run (no torchrun variables) has world size 1 and no process group at all:
// every collective is then the identity.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>

#include "distributed/dist_env.h"

namespace llava::dist {

enum class Reduce { Sum, Avg };

struct CommOptions {
  // How long rendezvous and each collective may take before a missing/dead peer becomes a
  // llava::Error. Overridden by LLAVA_DIST_TIMEOUT (seconds).
  std::chrono::milliseconds timeout = std::chrono::minutes(30);
  // "auto" (nccl for CUDA devices when built with it, else gloo), "gloo" or "nccl".
  std::string backend = "auto";
  torch::Device device = torch::kCPU;  // where collective buffers live (cuda:LOCAL_RANK for NCCL)
  // World size 1 needs no process group (every collective is the identity), so none is formed unless
  // asked for (tests of the backend itself). This also keeps a 1-rank run independent of the store.
  bool group_for_single_rank = false;
};

class Communicator {
 public:
  // Rendezvous from the torchrun environment (see DistEnv). Blocks until every rank joined or
  // options.timeout passed (-> llava::Error naming MASTER_ADDR:MASTER_PORT and the ranks missing).
  static Communicator from_env(const CommOptions& options = {});
  // The world-size-1 communicator without a process group.
  static Communicator single_process();

  Communicator(Communicator&&) noexcept;
  Communicator& operator=(Communicator&&) noexcept;
  ~Communicator();

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  int local_rank() const { return env_.local_rank; }
  const DistEnv& env() const { return env_; }
  std::string backend_name() const;  // "gloo", "nccl" or "none"
  // Where collective buffers must live (CommOptions::device: the CUDA device for NCCL, else the CPU).
  const torch::Device& device() const { return device_; }

  // In place. fp32 or bf16 (summed by the backend in that dtype). Every rank ends with bitwise-identical values.
  void allreduce(torch::Tensor& tensor, Reduce op);
  // In place: every rank gets root's values.
  void broadcast(torch::Tensor& tensor, int root);
  // shard: [N] on every rank (same N) -> [world*N], rank r's shard at [r*N, (r+1)*N).
  torch::Tensor all_gather(const torch::Tensor& shard);
  // Same, into a preallocated flat buffer (e.g. the padded ZeRO parameter buffer). flat: [world*N].
  void all_gather_into(torch::Tensor& flat, const torch::Tensor& shard);
  // full: [world*N] on every rank -> this rank's reduced shard [N] = op over ranks of full[r*N:(r+1)*N].
  torch::Tensor reduce_scatter(const torch::Tensor& full, Reduce op);
  void barrier();

 private:
  struct Group;  // the c10d store + backend; absent for world size 1
  static Communicator join_group(const CommOptions& options);  // from_env, without setting the device
  Communicator(DistEnv env, std::unique_ptr<Group> group);

  DistEnv env_;
  std::unique_ptr<Group> group_;
  torch::Device device_ = torch::kCPU;
};

}  // namespace llava::dist
