// The torchrun environment, the single-process communicator and the launcher's option parsing.
#include <catch2/catch.hpp>

#include <cstdlib>

#include "distributed/communicator.h"
#include "distributed/launcher/launcher.h"
#include "io/error.h"

using namespace llava;

namespace {

const char* kTorchrunVars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                               "TORCHELASTIC_USE_AGENT_STORE", "LLAVA_DIST_TIMEOUT", "TORCHELASTIC_RESTART_COUNT"};

// Sets the given variables for one test case and clears every torchrun variable around it.
struct ScopedEnv {
  explicit ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    clear();
    for (auto& [k, v] : vars) setenv(k, v, 1);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ~ScopedEnv() { clear(); }
  static void clear() {
    for (auto* name : kTorchrunVars) unsetenv(name);
  }
};

}  // namespace

TEST_CASE("no torchrun variables: one process, collectives are the identity", "[dist][env]") {
  ScopedEnv env({});
  auto parsed = dist::read_dist_env();
  CHECK(parsed.world_size == 1);
  CHECK_FALSE(parsed.from_launcher);

  auto comm = dist::Communicator::from_env();
  CHECK(comm.world_size() == 1);
  CHECK(comm.backend_name() == "none");
  auto x = torch::randn({6}).to(torch::kBFloat16);
  auto before = x.clone();
  comm.allreduce(x, dist::Reduce::Avg);
  CHECK(torch::equal(x, before));
  CHECK(torch::equal(comm.all_gather(x), before));
  CHECK(torch::equal(comm.reduce_scatter(before, dist::Reduce::Sum), before));
  comm.broadcast(x, 0);
  comm.barrier();
  CHECK_THROWS_WITH(comm.broadcast(x, 1), Catch::Contains("root 1 out of range"));
  auto ints = torch::arange(3);
  CHECK_THROWS_WITH(comm.allreduce(ints, dist::Reduce::Sum), Catch::Contains("expected a float32/bfloat16"));
}

TEST_CASE("one rank under a launcher forms no process group", "[dist][env]") {
  // Nothing listens on port 1: forming a group would fail (after LLAVA_DIST_TIMEOUT) instead.
  ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1"},
                 {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"LLAVA_DIST_TIMEOUT", "1"}});
  auto comm = dist::Communicator::from_env();
  CHECK(comm.world_size() == 1);
  CHECK(comm.backend_name() == "none");
  CHECK(comm.env().from_launcher);
}

TEST_CASE("torchrun variables are read and checked", "[dist][env]") {
  {
    ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "3"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "1"},
                   {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29501"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
    auto parsed = dist::read_dist_env();
    CHECK(parsed.rank == 2);
    CHECK(parsed.world_size == 3);
    CHECK(parsed.master_addr == "10.0.0.1");
    CHECK(parsed.master_port == 29501);
    CHECK(parsed.agent_store);
    CHECK_FALSE(parsed.is_store_host());
    CHECK(parsed.restart_count == 0);  // not set: the first round
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"TORCHELASTIC_RESTART_COUNT", "4"}});
    CHECK(dist::read_dist_env().restart_count == 4);
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"TORCHELASTIC_RESTART_COUNT", "-1"}});
    CHECK_THROWS_WITH(dist::read_dist_env(), Catch::Contains("TORCHELASTIC_RESTART_COUNT") && Catch::Contains("'-1'"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "localhost"}});
    CHECK_THROWS_WITH(dist::read_dist_env(), Catch::Contains("MASTER_PORT") && Catch::Contains("not set"));
  }
  {
    ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "2"}});
    CHECK_THROWS_WITH(dist::read_dist_env(), Catch::Contains("RANK") && Catch::Contains("[0, 1], got '2'"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "two"}});
    CHECK_THROWS_WITH(dist::read_dist_env(), Catch::Contains("WORLD_SIZE") && Catch::Contains("'two'"));
  }
  {
    ScopedEnv env({{"LLAVA_DIST_TIMEOUT", "2.5"}});
    CHECK(dist::dist_timeout_from_env(std::chrono::minutes(30)).count() == 2500);
  }
  {
    ScopedEnv env({{"LLAVA_DIST_TIMEOUT", "-1"}});
    CHECK_THROWS_WITH(dist::dist_timeout_from_env(std::chrono::minutes(30)), Catch::Contains("LLAVA_DIST_TIMEOUT"));
  }
}

TEST_CASE("process group setup refuses what this build cannot do, clearly", "[dist][env]") {
  ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "localhost"}, {"MASTER_PORT", "29500"}});
  dist::CommOptions options;
  options.backend = "mpi";
  CHECK_THROWS_WITH(dist::Communicator::from_env(options), Catch::Contains("expected auto, gloo or nccl, got 'mpi'"));
}

TEST_CASE("llava-run options: torchrun spellings, command after the options", "[dist][launcher]") {
  auto config = launcher::parse_launch_args({"--nproc-per-node", "3", "--nnodes=2", "--node_rank", "1",
                                             "--master_addr", "10.1.2.3", "--master-port=1234", "llava", "train",
                                             "--nproc_per_node", "9"});
  CHECK(config.nproc_per_node == 3);
  CHECK(config.nnodes == 2);
  CHECK(config.node_rank == 1);
  CHECK(config.master_addr == "10.1.2.3");
  CHECK(config.master_port == 1234);
  // Everything from the first non-option on belongs to the worker, options included.
  CHECK(config.command == std::vector<std::string>{"llava", "train", "--nproc_per_node", "9"});

  auto env = launcher::worker_env(config, 2, {});
  CHECK(env["RANK"] == "5");
  CHECK(env["LOCAL_RANK"] == "2");
  CHECK(env["WORLD_SIZE"] == "6");
  CHECK(env["LOCAL_WORLD_SIZE"] == "3");
  CHECK(env["GROUP_RANK"] == "1");
  CHECK(env["GROUP_WORLD_SIZE"] == "2");
  CHECK(env["ROLE_RANK"] == "5");
  CHECK(env["MASTER_ADDR"] == "10.1.2.3");
  CHECK(env["MASTER_PORT"] == "1234");
  CHECK(env["OMP_NUM_THREADS"] == "1");
  CHECK(launcher::worker_env(config, 0, {{"OMP_NUM_THREADS", "4"}}).count("OMP_NUM_THREADS") == 0);

  auto standalone = launcher::parse_launch_args({"--standalone", "--nproc_per_node=2", "--", "-weird-command"});
  CHECK(standalone.master_addr == "localhost");
  CHECK(standalone.master_port > 0);
  CHECK(standalone.run_id != "none");
  CHECK(standalone.command == std::vector<std::string>{"-weird-command"});
}

TEST_CASE("llava-run options: bad values are clear errors", "[dist][launcher]") {
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--nproc_per_node=0", "x"}), Catch::Contains("--nproc_per_node"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--nnodes=1:4", "x"}), Catch::Contains("elastic ranges"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--nnodes=2", "--node_rank=2", "x"}), Catch::Contains("--node_rank"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--nproc_per_node=2"}), Catch::Contains("no command"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--nproc_per_node=two", "x"}), Catch::Contains("two"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--bogus", "x"}), Catch::Contains("bogus"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--standalone", "--nnodes=2", "x"}), Catch::Contains("single-node"));
}

TEST_CASE("llava-run --max_restarts: both spellings, the round in the workers' environment", "[dist][launcher]") {
  auto config = launcher::parse_launch_args({"--nproc_per_node=2", "--max_restarts", "3", "llava", "train",
                                             "--max_restarts", "9"});
  CHECK(config.max_restarts == 3);
  CHECK(config.command == std::vector<std::string>{"llava", "train", "--max_restarts", "9"});
  CHECK(launcher::parse_launch_args({"--max-restarts=5", "x"}).max_restarts == 5);
  CHECK(launcher::parse_launch_args({"x"}).max_restarts == 0);  // torchrun's default: no restarts

  auto first = launcher::worker_env(config, 1, {});
  CHECK(first["TORCHELASTIC_RESTART_COUNT"] == "0");
  CHECK(first["TORCHELASTIC_MAX_RESTARTS"] == "3");
  auto third = launcher::worker_env(config, 1, {}, 2);
  CHECK(third["TORCHELASTIC_RESTART_COUNT"] == "2");
  CHECK(third["RANK"] == "1");
  CHECK(third["MASTER_PORT"] == first["MASTER_PORT"]);  // a fixed --master_port stays (other nodes know it)
}

TEST_CASE("llava-run --max_restarts, --join_timeout and --rdzv_conf: bad values are refused clearly", "[dist][launcher]") {
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--max_restarts=-1", "x"}),
                    Catch::Contains("--max_restarts") && Catch::Contains("got -1"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--max_restarts=many", "x"}), Catch::Contains("many"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--join_timeout=0", "x"}), Catch::Contains("--join_timeout"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--rdzv_conf=read_timeout=5", "x"}),
                    Catch::Contains("--rdzv_conf") && Catch::Contains("read_timeout=5"));
  CHECK_THROWS_WITH(launcher::parse_launch_args({"--rdzv-conf", "join_timeout=soon", "x"}),
                    Catch::Contains("--rdzv_conf") && Catch::Contains("soon"));
  CHECK(launcher::parse_launch_args({"--rdzv-conf", "join_timeout=42", "x"}).join_timeout_s == 42);
  CHECK(launcher::parse_launch_args({"x"}).join_timeout_s == 600);  // torchrun's default
  auto two_nodes = launcher::parse_launch_args({"--nnodes=2", "--node_rank=1", "--max_restarts=3", "x"});
  CHECK((two_nodes.nnodes == 2 && two_nodes.max_restarts == 3));  // several nodes restart together
}
