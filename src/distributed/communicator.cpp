#include "distributed/communicator.h"

#include <sstream>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "io/error.h"
#ifdef LLAVA_HAS_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace llava::dist {
namespace {

void check_float_dtype(const torch::Tensor& t, const char* collective) {
  auto dtype = t.scalar_type();
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat64)
    fail(std::string("dist::") + collective,
         std::string("expected a float32/bfloat16/float64 tensor, got ") + c10::toString(dtype));
}

std::string seconds_text(std::chrono::milliseconds ms) {
  std::ostringstream out;
  out << static_cast<double>(ms.count()) / 1000.0 << "s";
  return out.str();
}

// c10::Error::what() may carry a C++ backtrace; the message alone is what users need.
std::string exception_text(const std::exception& e) {
  if (auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return c10_error->what_without_backtrace();
  return e.what();
}

}  // namespace

struct Communicator::Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::string name;
  std::chrono::milliseconds timeout{0};
  std::string where;  // "rank R of N, gloo" for error messages

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* collective) const {
    try {
      work->wait(timeout);
    } catch (const std::exception& e) {
      fail(std::string("dist::") + collective + " (" + where + ")",
           "failed: " + exception_text(e) + " (collective timeout " + seconds_text(timeout) + ")");
    }
  }

  void allreduce_sum(torch::Tensor& t) const {
    std::vector<torch::Tensor> tensors{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = timeout;
    wait(backend->allreduce(tensors, opts), "allreduce");
  }
};

namespace {

std::string rendezvous_where(const DistEnv& env, const std::string& backend = "") {
  return "rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port) + " (rank " +
         std::to_string(env.rank) + " of " + std::to_string(env.world_size) + (backend.empty() ? "" : ", " + backend) +
         ")";
}

std::string join_timeout_text(std::chrono::milliseconds timeout, const std::exception& e) {
  return "not all ranks joined within " + seconds_text(timeout) + " (LLAVA_DIST_TIMEOUT): " + exception_text(e);
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Rank 0 hosts the TCPStore unless torchrun's agent already does.
c10::intrusive_ptr<c10d::Store> connect_store(const DistEnv& env, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(env.master_port);
  opts.isServer = env.is_store_host();
  opts.numWorkers = static_cast<size_t>(env.world_size);
  opts.waitWorkers = false;  // wait_for_all_ranks() does it, naming who is missing
  opts.timeout = timeout;
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, opts);
    // Keep our keys apart from whatever else (torchrun's agent) uses the same store, and each round of a
    // restarted group apart from the last: torchrun's agent store outlives the workers, so round N must not
    // see round N-1's "joined" or Gloo address keys (llava-run's store dies with rank 0 anyway).
    return c10::make_intrusive<c10d::PrefixStore>("llava/worker/attempt_" + std::to_string(env.restart_count), store);
  } catch (const std::exception& e) {
    fail(rendezvous_where(env), join_timeout_text(timeout, e));
  }
}

// Every rank checks in on the store and waits for the others, so that a missing rank is named
// ("rank 1 did not join") instead of surfacing later as a backend's socket timeout.
void wait_for_all_ranks(c10d::Store& store, const DistEnv& env, std::chrono::milliseconds timeout) {
  std::vector<std::string> keys;
  for (int r = 0; r < env.world_size; ++r) keys.push_back("joined/" + std::to_string(r));
  store.set(keys[env.rank], std::vector<uint8_t>{1});
  try {
    store.wait(keys, timeout);
  } catch (const std::exception& e) {
    std::string missing;
    for (int r = 0; r < env.world_size; ++r)
      if (!store.check({keys[r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    fail(rendezvous_where(env), "rank(s) " + missing + " did not join within " + seconds_text(timeout) +
                                    " (LLAVA_DIST_TIMEOUT)");
  }
}

std::shared_ptr<::gloo::transport::Device> gloo_device(const DistEnv& env) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"))
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  if (is_loopback(env.master_addr)) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, const DistEnv& env,
                                          std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(gloo_device(env));
  options->threads = 2;  // torch's default: two per device
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, env.rank, env.world_size, options);
}

#ifdef LLAVA_HAS_NCCL
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, const DistEnv& env,
                                          std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env.rank, env.world_size, options);
}
#endif

std::string pick_backend(const CommOptions& options) {
  std::string wanted = options.backend;
  if (wanted == "auto") wanted = options.device.is_cuda() ? "nccl" : "gloo";
#ifndef LLAVA_HAS_NCCL
  if (wanted == "nccl") fail("dist backend", "this build has no NCCL (built against a libtorch without CUDA)");
#endif
  if (wanted != "gloo" && wanted != "nccl")
    fail("dist backend", "expected auto, gloo or nccl, got '" + options.backend + "'");
  return wanted;
}

}  // namespace

Communicator Communicator::from_env(const CommOptions& options) {
  Communicator comm = join_group(options);
  comm.device_ = options.device;
  return comm;
}

Communicator Communicator::join_group(const CommOptions& options) {
  DistEnv env = read_dist_env();
  if (!env.from_launcher) return single_process();
  if (env.world_size == 1 && (env.master_addr.empty() || !options.group_for_single_rank))
    return Communicator(env, nullptr);  // one rank: every collective is the identity
  auto timeout = dist_timeout_from_env(options.timeout);
  auto group = std::make_unique<Group>();
  group->name = pick_backend(options);
  group->timeout = timeout;
  group->where = "rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) + ", " + group->name;
  group->store = connect_store(env, timeout);
  wait_for_all_ranks(*group->store, env, timeout);
  try {
    if (group->name == "gloo") group->backend = make_gloo(group->store, env, timeout);
#ifdef LLAVA_HAS_NCCL
    if (group->name == "nccl") group->backend = make_nccl(group->store, env, timeout);
#endif
  } catch (const std::exception& e) {
    // Gloo's own rendezvous over the store: here a rank that never came shows up as a timeout.
    fail(rendezvous_where(env, group->name), join_timeout_text(timeout, e));
  }
  return Communicator(env, std::move(group));
}

std::string Communicator::backend_name() const { return group_ ? group_->name : "none"; }

Communicator Communicator::single_process() { return Communicator(DistEnv{}, nullptr); }

Communicator::Communicator(DistEnv env, std::unique_ptr<Group> group) : env_(std::move(env)), group_(std::move(group)) {}
Communicator::Communicator(Communicator&&) noexcept = default;
Communicator& Communicator::operator=(Communicator&&) noexcept = default;
Communicator::~Communicator() = default;

void Communicator::allreduce(torch::Tensor& tensor, Reduce op) {
  check_float_dtype(tensor, "allreduce");
  if (!group_) return;  // one rank: the sum and the mean are the tensor itself
  torch::Tensor work = tensor.contiguous();
  group_->allreduce_sum(work);
  if (op == Reduce::Avg) work.div_(world_size());
  if (!work.is_same(tensor)) tensor.copy_(work);
}

void Communicator::broadcast(torch::Tensor& tensor, int root) {
  if (root < 0 || root >= world_size())
    fail("dist::broadcast", "root " + std::to_string(root) + " out of range for world size " + std::to_string(world_size()));
  if (!group_) return;
  torch::Tensor work = tensor.contiguous();
  std::vector<torch::Tensor> tensors{work};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  opts.timeout = group_->timeout;
  group_->wait(group_->backend->broadcast(tensors, opts), "broadcast");
  if (!work.is_same(tensor)) tensor.copy_(work);
}

torch::Tensor Communicator::all_gather(const torch::Tensor& shard) {
  auto flat = torch::empty({shard.numel() * world_size()}, shard.options());
  all_gather_into(flat, shard);
  return flat;
}

void Communicator::all_gather_into(torch::Tensor& flat, const torch::Tensor& shard) {
  int64_t n = shard.numel();
  if (flat.dim() != 1 || flat.numel() != n * world_size() || !flat.is_contiguous() ||
      flat.scalar_type() != shard.scalar_type())
    fail("dist::all_gather_into", "expected a contiguous flat " + std::string(c10::toString(shard.scalar_type())) +
                                      " buffer of world_size*shard = " + std::to_string(n * world_size()) +
                                      " elements, got " + c10::toString(flat.scalar_type()) + " " +
                                      c10::str(flat.sizes()));
  if (!group_) {
    flat.copy_(shard.reshape({-1}));
    return;
  }
  auto input = shard.reshape({-1}).contiguous();
  c10d::AllgatherOptions opts;
  opts.timeout = group_->timeout;
  group_->wait(group_->backend->_allgather_base(flat, input, opts), "all_gather");
}

torch::Tensor Communicator::reduce_scatter(const torch::Tensor& full, Reduce op) {
  check_float_dtype(full, "reduce_scatter");
  if (full.dim() != 1 || full.numel() % world_size() != 0)
    fail("dist::reduce_scatter", "expected a flat tensor whose size is a multiple of world size " +
                                     std::to_string(world_size()) + ", got " + c10::str(full.sizes()));
  if (!group_) return full.clone();
  auto shard = torch::empty({full.numel() / world_size()}, full.options());
  auto input = full.contiguous();
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = group_->timeout;
  group_->wait(group_->backend->_reduce_scatter_base(shard, input, opts), "reduce_scatter");
  if (op == Reduce::Avg) shard.div_(world_size());
  return shard;
}

void Communicator::barrier() {
  if (!group_) return;
  c10d::BarrierOptions opts;
  opts.timeout = group_->timeout;
  group_->wait(group_->backend->barrier(opts), "barrier");
}

}  // namespace llava::dist
