#include "distributed/launcher/node_link.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>

#include "io/error.h"

namespace llava::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

std::string where(const LaunchConfig& config) {
  return "llava-run (node " + std::to_string(config.node_rank) + " of " + std::to_string(config.nnodes) + ")";
}

std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  return text.substr(0, 2000);
}

// "verb rest..." -> (verb, rest)
std::pair<std::string, std::string> split_verb(const std::string& line) {
  size_t space = line.find(' ');
  if (space == std::string::npos) return {line, ""};
  return {line.substr(0, space), line.substr(space + 1)};
}

int connect_to(const std::string& host, int port) {
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd >= 0) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

int listen_on(int port, const std::string& context) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) fail(context, std::string("socket: ") + strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 64) != 0) {
    int saved = errno;
    close(fd);
    fail(context, "cannot listen on --master_port " + std::to_string(port) + " for the other nodes' launchers: " +
                      strerror(saved));
  }
  return fd;
}

}  // namespace

struct NodeLink::Peer {
  int fd = -1;
  int node = -1;  // known once its `join` line arrived (the leader's peer: 0)
  std::string buffer;
  std::deque<std::string> lines;
  bool alive = true;
  ~Peer() {
    if (fd >= 0) close(fd);
  }
};

NodeLink::NodeLink(const LaunchConfig& config, int signal_fd) : config_(config), signal_fd_(signal_fd) {
  if (config_.node_rank == 0) {
    listen_fd_ = listen_on(config_.master_port, where(config_));
    return;
  }
  const double deadline = now_s() + config_.join_timeout_s;
  int fd = -1;
  while ((fd = connect_to(config_.master_addr, config_.master_port)) < 0) {
    if (now_s() > deadline)
      fail(where(config_), "node 0's llava-run did not answer at " + config_.master_addr + ":" +
                               std::to_string(config_.master_port) + " within --join_timeout " +
                               std::to_string(static_cast<int>(config_.join_timeout_s)) + " s");
    std::vector<pollfd> none;
    wait_readable(none, std::min(deadline, now_s() + 0.2), "");
  }
  peers_.push_back(std::make_unique<Peer>());
  peers_.back()->fd = fd;
  peers_.back()->node = 0;
  send(*peers_.back(), "join " + std::to_string(config_.node_rank));
}

NodeLink::~NodeLink() {
  if (listen_fd_ >= 0) close(listen_fd_);
}

// Polls `fds` plus the signal pipe until something is readable or the deadline passes. SIGINT/SIGTERM
// -> Interrupted. An empty `waiting_for` means a plain sleep that may end early.
void NodeLink::wait_readable(std::vector<pollfd>& fds, double deadline_s, const std::string& waiting_for) {
  fds.push_back({signal_fd_, POLLIN, 0});
  int timeout_ms = static_cast<int>(std::max(0.0, deadline_s - now_s()) * 1000);
  int ready = poll(fds.data(), fds.size(), timeout_ms);
  pollfd signals = fds.back();
  fds.pop_back();
  if (ready < 0 && errno != EINTR) fail(where(config_), std::string("poll: ") + strerror(errno));
  if (signals.revents & POLLIN) {
    unsigned char byte;
    while (read(signal_fd_, &byte, 1) == 1)
      if (byte == SIGINT || byte == SIGTERM) throw Interrupted{byte};
  }
  if (ready == 0 && !waiting_for.empty() && now_s() >= deadline_s)
    fail(where(config_), waiting_for + ": not within --join_timeout " +
                             std::to_string(static_cast<int>(config_.join_timeout_s)) + " s");
}

void NodeLink::send(Peer& peer, const std::string& line) {
  if (!peer.alive) return;
  std::string text = one_line(line) + "\n";
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::send(peer.fd, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      peer.alive = false;
      return;
    }
    done += static_cast<size_t>(n);
  }
}

void NodeLink::broadcast(const std::string& line) {
  for (auto& peer : peers_)
    if (peer->node > 0) send(*peer, line);
}

NodeLink::Peer* NodeLink::peer_of_node(int node) {
  for (auto& peer : peers_)
    if (peer->node == node && peer->alive) return peer.get();
  return nullptr;
}

// Reads what the peer sent into complete lines; a closed connection marks it dead. A new follower's
// first line names its node; it replaces a lost connection of the same node (a relaunched llava-run).
void NodeLink::read_lines(Peer& peer) {
  char chunk[4096];
  ssize_t n = recv(peer.fd, chunk, sizeof chunk, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    peer.alive = false;
    return;
  }
  peer.buffer.append(chunk, static_cast<size_t>(n));
  if (peer.buffer.size() > (1 << 20)) peer.alive = false;  // no line is that long: not one of us
  size_t newline;
  while ((newline = peer.buffer.find('\n')) != std::string::npos) {
    std::string line = peer.buffer.substr(0, newline);
    peer.buffer.erase(0, newline + 1);
    auto [verb, rest] = split_verb(line);
    if (verb == "join" && peer.node < 0) {
      int node = std::atoi(rest.c_str());
      if (node <= 0 || node >= config_.nnodes) {
        peer.alive = false;  // a stranger or a misconfigured launcher: ignore it
        return;
      }
      if (Peer* old = peer_of_node(node)) old->alive = false;
      peer.node = node;
    } else {
      peer.lines.push_back(line);
    }
  }
}

void NodeLink::accept_joins() {
  int fd;
  while ((fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC)) >= 0) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    peers_.push_back(std::make_unique<Peer>());
    peers_.back()->fd = fd;
  }
  peers_.erase(std::remove_if(peers_.begin(), peers_.end(), [](const auto& p) { return !p->alive && p->lines.empty(); }),
               peers_.end());
}

// The next line from `peer` starting with `verb` (other verbs before it are dropped: e.g. a `stop` that
// crossed this node's own end of round). std::nullopt when the peer is lost.
std::optional<std::string> NodeLink::next_line(Peer& peer, const std::string& verb, double timeout_s,
                                               const std::string& waiting_for) {
  const double deadline = now_s() + timeout_s;
  while (true) {
    while (!peer.lines.empty()) {
      auto [v, rest] = split_verb(peer.lines.front());
      peer.lines.pop_front();
      if (v == verb) return rest;
    }
    if (!peer.alive) return std::nullopt;
    std::vector<pollfd> fds{{peer.fd, POLLIN, 0}};
    wait_readable(fds, deadline, waiting_for);
    if (fds[0].revents) read_lines(peer);
  }
}

std::optional<int> NodeLink::start_round(int round) {
  if (config_.node_rank != 0) {
    Peer& leader = *peers_.front();
    send(leader, "ready " + std::to_string(round));
    const std::string waiting = "waiting for node 0's llava-run to start round " + std::to_string(round);
    const double deadline = now_s() + config_.join_timeout_s;
    while (true) {
      while (!leader.lines.empty()) {  // `start`, or the end of the run (a `stop` of the last round: dropped)
        auto [verb, rest] = split_verb(leader.lines.front());
        leader.lines.pop_front();
        if (verb == "start") return std::atoi(rest.substr(rest.find(' ') + 1).c_str());
        if (verb == "decide") {
          decision_ = {false, 1, "node 0's llava-run ended the run: " + rest};
          return std::nullopt;
        }
      }
      if (!leader.alive) fail(where(config_), "lost the connection to node 0's llava-run before round " + std::to_string(round));
      std::vector<pollfd> fds{{leader.fd, POLLIN, 0}};
      wait_readable(fds, deadline, waiting);
      if (fds[0].revents) read_lines(leader);
    }
  }
  // The leader: every follower connected and ready.
  const double deadline = now_s() + config_.join_timeout_s;
  while (true) {
    std::vector<int> missing;
    for (int node = 1; node < config_.nnodes; ++node) {
      Peer* peer = peer_of_node(node);
      bool ready = peer && std::any_of(peer->lines.begin(), peer->lines.end(),
                                       [](const std::string& l) { return split_verb(l).first == "ready"; });
      if (!ready) missing.push_back(node);
    }
    if (missing.empty()) break;
    std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
    for (auto& peer : peers_)
      if (peer->alive) fds.push_back({peer->fd, POLLIN, 0});
    std::string names;
    for (int node : missing) names += (names.empty() ? "" : ", ") + std::to_string(node);
    wait_readable(fds, deadline, "node(s) " + names + " did not join round " + std::to_string(round));
    accept_joins();
    for (auto& peer : peers_)
      if (peer->alive) read_lines(*peer);
  }
  for (int node = 1; node < config_.nnodes; ++node) {  // consume each `ready`, drop what came before it
    Peer* peer = peer_of_node(node);
    while (split_verb(peer->lines.front()).first != "ready") peer->lines.pop_front();
    peer->lines.pop_front();
  }
  int port = pick_free_port();
  broadcast("start " + std::to_string(round) + " " + std::to_string(port));
  return port;
}

void NodeLink::add_poll_fds(std::vector<pollfd>& fds) const {
  if (listen_fd_ >= 0) fds.push_back({listen_fd_, POLLIN, 0});
  for (const auto& peer : peers_)
    if (peer->alive) fds.push_back({peer->fd, POLLIN, 0});
}

std::optional<std::string> NodeLink::handle_poll(const std::vector<pollfd>& fds) {
  auto readable = [&](int fd) {
    return std::any_of(fds.begin(), fds.end(), [fd](const pollfd& p) { return p.fd == fd && p.revents != 0; });
  };
  if (listen_fd_ >= 0 && readable(listen_fd_)) accept_joins();
  std::optional<std::string> stop;
  for (auto& peer : peers_) {
    if (!peer->alive || !readable(peer->fd)) continue;
    read_lines(*peer);
    if (config_.node_rank != 0) {  // the leader asks this node to stop
      for (auto it = peer->lines.begin(); it != peer->lines.end();) {
        auto [verb, rest] = split_verb(*it);
        if (verb == "stop") {
          stop = rest;
          it = peer->lines.erase(it);
        } else {
          ++it;
        }
      }
      if (!peer->alive && !stop) stop = "lost the connection to node 0's llava-run";
      continue;
    }
    for (auto it = peer->lines.begin(); it != peer->lines.end();) {  // a follower's worker failed
      auto [verb, rest] = split_verb(*it);
      if (verb == "failed") {
        if (!stop) stop = rest;
        it = peer->lines.erase(it);
      } else {
        ++it;
      }
    }
    if (!peer->alive && peer->node > 0 && !stop) stop = "lost node " + std::to_string(peer->node) + "'s llava-run";
  }
  if (stop && config_.node_rank == 0) broadcast("stop " + *stop);
  return stop;
}

void NodeLink::report_failure(const std::string& text) {
  if (config_.node_rank == 0)
    broadcast("stop " + text);
  else
    send(*peers_.front(), "failed " + text);
}

namespace {

std::string encode(const RoundOutcome& o) {
  return std::to_string(static_cast<int>(o.kind)) + " " + std::to_string(o.exit_code) + " " + o.text;
}

RoundOutcome decode(const std::string& text) {  // "<kind> <code> <text>"
  RoundOutcome o;
  size_t first = text.find(' '), second = first == std::string::npos ? first : text.find(' ', first + 1);
  int kind = std::atoi(text.c_str());
  o.kind = kind >= RoundOutcome::kOk && kind <= RoundOutcome::kPreempted ? static_cast<RoundOutcome::Kind>(kind)
                                                                        : RoundOutcome::kFailed;
  o.exit_code = first == std::string::npos ? 1 : std::atoi(text.c_str() + first + 1);
  o.text = second == std::string::npos ? "" : text.substr(second + 1);
  return o;
}

}  // namespace

Decision NodeLink::finish_round(int round, const RoundOutcome& local) {
  const double wait_s = config_.join_timeout_s + config_.shutdown_timeout_s;
  if (config_.node_rank != 0) {
    Peer& leader = *peers_.front();
    send(leader, "ended " + std::to_string(round) + " " + encode(local));
    auto line = next_line(leader, "decide", wait_s, "waiting for node 0's llava-run to end round " + std::to_string(round));
    if (!line) return decision_ = {false, local.kind == RoundOutcome::kOk ? 1 : local.exit_code,
                                   "lost the connection to node 0's llava-run at the end of round " + std::to_string(round),
                                   /*leader_lost=*/true};
    if (line->rfind("restart", 0) == 0) return decision_ = {true, 0, line->substr(std::min(line->size(), size_t{8}))};
    RoundOutcome end = decode(line->substr(line->find(' ') + 1));  // "end <kind> <code> <text>"
    return decision_ = {false, end.exit_code, end.text};
  }
  // The leader: every node's outcome, its own first.
  std::vector<RoundOutcome> outcomes{local};
  for (int node = 1; node < config_.nnodes; ++node) {
    Peer* peer = peer_of_node(node);
    std::optional<std::string> line;
    if (peer) line = next_line(*peer, "ended", wait_s, "node " + std::to_string(node) + " did not end round " + std::to_string(round));
    if (!line)
      outcomes.push_back({RoundOutcome::kFailed, 1, "lost node " + std::to_string(node) + "'s llava-run"});
    else
      outcomes.push_back(decode(line->substr(line->find(' ') + 1)));  // "<round> <outcome>"
  }
  auto first_of = [&](RoundOutcome::Kind kind) {
    return std::find_if(outcomes.begin(), outcomes.end(), [kind](const RoundOutcome& o) { return o.kind == kind; });
  };
  RoundOutcome end{RoundOutcome::kOk, 0, ""};
  if (first_of(RoundOutcome::kPreempted) != outcomes.end()) {
    end = *first_of(RoundOutcome::kPreempted);
  } else if (first_of(RoundOutcome::kFailed) != outcomes.end()) {
    end = *first_of(RoundOutcome::kFailed);
  } else if (first_of(RoundOutcome::kStopped) != outcomes.end()) {
    end = *first_of(RoundOutcome::kStopped);
    end.kind = RoundOutcome::kFailed;
  }
  if (end.kind == RoundOutcome::kFailed && round < config_.max_restarts) {
    broadcast("decide restart " + end.text);
    return decision_ = {true, 0, end.text};
  }
  broadcast("decide end " + encode(end));
  return decision_ = {false, end.exit_code, end.text};
}

}  // namespace llava::launcher
