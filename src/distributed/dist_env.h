// The torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) as one struct. A process started
// without any of these variables is a single-process run (world size 1).
#pragma once
#include <chrono>
#include <string>

namespace llava::dist {

struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  // empty for a single-process run (world size 1 may also leave it out)
  int master_port = 0;
  // torchrun's agent hosts the TCPStore itself (TORCHELASTIC_USE_AGENT_STORE=True): every rank is
  // then a client. Under llava-run (or any launcher without an agent store) rank 0 hosts it.
  bool agent_store = false;
  // TORCHELASTIC_RESTART_COUNT: the launcher's round (0, then +1 per restart of the group). Each round
  // keeps its rendezvous keys apart, as torch does (PrefixStore "/worker/attempt_<N>").
  int restart_count = 0;
  bool from_launcher = false;  // true when RANK/WORLD_SIZE were set

  bool is_store_host() const { return rank == 0 && !agent_store; }
};

// Reads the torchrun variables. None set -> {rank 0, world 1}. Some set but not the rest, or a value
// that is not a number in range -> llava::Error naming the variable.
DistEnv read_dist_env();

// Collective/rendezvous timeout: LLAVA_DIST_TIMEOUT (seconds, may be fractional) if set, else
// `fallback` (torch's default is 30 minutes).
std::chrono::milliseconds dist_timeout_from_env(std::chrono::milliseconds fallback);

}  // namespace llava::dist
