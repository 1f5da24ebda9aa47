// llava-run: a torchrun-style launcher for the workers of one node. It parses torchrun's options,
// gives every worker torchrun's environment, prefixes each output line with the worker's rank,
// forwards SIGINT/SIGTERM and, when one worker fails, stops the others and reports which one failed;
// with --max_restarts N it then starts every worker again (TORCHELASTIC_RESTART_COUNT + 1), up to N
// times; on several nodes the launchers restart together through node 0's (node_link.h). Workers are started directly (like `torchrun --no-python`); there is no
// elastic agent and no agent-hosted store: rank 0 hosts the TCPStore (TORCHELASTIC_USE_AGENT_STORE=False),
// a new one in every round (the workers key it by round, see dist_env.h).
#pragma once
#include <map>
#include <string>
#include <vector>

namespace llava::launcher {

struct LaunchConfig {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";  // torchrun's default
  int master_port = 29500;                // torchrun's default
  bool standalone = false;                // localhost and a free port, like torchrun --standalone
  double shutdown_timeout_s = 30;         // SIGTERM -> SIGKILL grace (torchrun: --shutdown-timeout)
  std::string run_id = "none";            // TORCHELASTIC_RUN_ID (torchrun's --rdzv-id default)
  int max_restarts = 0;                   // restarts of the whole group after a worker failed
  double join_timeout_s = 600;            // several nodes: how long a launcher waits for the others (torchrun's default)
  bool help = false;
  std::vector<std::string> command;       // the worker's argv
};

// args: argv without the program name. Options stop at the first argument that is not one (or after
// "--"); everything from there on is the command. --standalone resolves the port and run id here.
// Bad options -> llava::Error.
LaunchConfig parse_launch_args(const std::vector<std::string>& args);
std::string launch_usage();

// The variables worker `local_rank` gets on top of the launcher's environment in round `restart_count`
// (0 = the first start). `parent_env` is the launcher's environment (a few torchrun variables inherit
// from it).
std::map<std::string, std::string> worker_env(const LaunchConfig& config, int local_rank,
                                              const std::map<std::string, std::string>& parent_env,
                                              int restart_count = 0);

// Starts the workers and supervises them to the end, restarting the group up to max_restarts times
// when a worker fails. Returns the launcher's exit status: 0 when all succeeded, else the status of the
// worker whose failure used up the restarts (128+signal when it was killed), or 128+signal when the
// launcher itself was interrupted (never restarted: a SIGTERM is a preemption).
int run_workers(const LaunchConfig& config);

// A TCP port that was free on every interface a moment ago (bound to port 0, then released).
int pick_free_port();

}  // namespace llava::launcher
