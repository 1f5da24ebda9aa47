// The launchers of a multi-node run with --max_restarts, acting as one: node 0's llava-run leads, the
// others connect to it at --master_addr:--master_port (what torchrun's agents do through their c10d
// rendezvous). Every round starts on every node together, a worker failure on any node stops the
// workers of every node, and the leader decides for all whether the next round starts (restarts left)
// or the run ends, so all nodes restart in the same round with the same TORCHELASTIC_RESTART_COUNT.
//
// The link is a line protocol over one TCP connection per follower (no libtorch here):
//   follower -> leader: join <node_rank> | ready <round> | failed <text> | ended <round> <outcome>
//   leader -> follower: start <round> <store_port> | stop <text> | decide restart | decide end <code> <text>
// The workers' TCPStore (hosted by rank 0 on node 0) gets a fresh port each round, picked by the leader
// and sent in `start`, so the leader keeps --master_port for the link and no round sees a stale store.
// Every wait is bounded by --join_timeout (a node that never comes is named in the error); a lost
// connection is a failure of that node's round (leader) or the end of the run (follower).
#pragma once
#include <poll.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distributed/launcher/launcher.h"

namespace llava::launcher {

// How a round ended on one node.
struct RoundOutcome {
  enum Kind { kOk, kFailed, kStopped, kPreempted } kind = kOk;  // failed: a worker here failed first
  int exit_code = 0;                                            // of the failed worker, or 128+signal
  std::string text;                                             // what happened, for the final message
};

struct Decision {
  bool restart = false;
  int exit_code = 0;
  std::string text;  // why the run ended (empty on success)
  bool leader_lost = false;  // a follower lost node 0's launcher: no restart could have been made
};

// Thrown from a blocking wait when SIGINT/SIGTERM reaches the launcher.
struct Interrupted {
  int signal_number;
};

class NodeLink {
 public:
  // The leader listens; a follower connects (retrying until join_timeout). signal_fd: the launcher's
  // signal pipe, watched during every blocking wait.
  NodeLink(const LaunchConfig& config, int signal_fd);
  ~NodeLink();
  NodeLink(const NodeLink&) = delete;
  NodeLink& operator=(const NodeLink&) = delete;

  // Blocks until every node is ready for `round`; returns the port of this round's workers' store.
  // A follower gets std::nullopt when the leader ended the run instead (then `final_decision()`).
  std::optional<int> start_round(int round);

  // During a round: the sockets to poll beside the workers' pipes, and after poll, what arrived.
  // Returns the reason when the other nodes ask this one to stop its workers.
  void add_poll_fds(std::vector<pollfd>& fds) const;
  std::optional<std::string> handle_poll(const std::vector<pollfd>& fds);

  // A worker of this node failed (or this launcher was interrupted): tell the other nodes to stop theirs.
  void report_failure(const std::string& text);

  // After this node's workers all ended: every node's outcome -> the same decision on every node.
  Decision finish_round(int round, const RoundOutcome& local);
  const Decision& final_decision() const { return decision_; }

 private:
  struct Peer;
  void accept_joins();
  void read_lines(Peer& peer);
  std::optional<std::string> next_line(Peer& peer, const std::string& verb, double timeout_s, const std::string& waiting_for);
  void send(Peer& peer, const std::string& line);
  void broadcast(const std::string& line);
  Peer* peer_of_node(int node);
  void wait_readable(std::vector<pollfd>& fds, double deadline_s, const std::string& waiting_for);

  LaunchConfig config_;
  int signal_fd_;
  int listen_fd_ = -1;
  std::vector<std::unique_ptr<Peer>> peers_;  // leader: one per follower; follower: the leader
  Decision decision_;
};

}  // namespace llava::launcher
