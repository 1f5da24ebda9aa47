#include "distributed/launcher/launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cxxopts.hpp>
#include <optional>
#include <random>
#include <set>

#include "distributed/launcher/node_link.h"
#include "io/command_line.h"
#include "io/error.h"

extern char** environ;

namespace llava::launcher {
namespace {

// ---------------------------------------------------------------------------------------------------
// Options

// torchrun spells every option with '_' and '-'; cxxopts takes both as names of one option.
std::string both_spellings(const std::string& name) {
  std::string dashed = name;
  std::replace(dashed.begin(), dashed.end(), '_', '-');
  return dashed == name ? name : name + "," + dashed;
}

cxxopts::Options make_options() {
  cxxopts::Options options("llava-run", "Start the workers of one node with torchrun's environment.");
  options.custom_help("[options] command [args...]");
  options.positional_help("command [args...]");
  auto add = options.add_options();
  add(both_spellings("nproc_per_node"), "workers on this node", cxxopts::value<int>()->default_value("1"));
  add("nnodes", "number of nodes (a fixed number; no elastic MIN:MAX)", cxxopts::value<std::string>()->default_value("1"));
  add(both_spellings("node_rank"), "rank of this node", cxxopts::value<int>()->default_value("0"));
  add(both_spellings("master_addr"), "address of the rank-0 node", cxxopts::value<std::string>()->default_value("127.0.0.1"));
  add(both_spellings("master_port"), "port of the rendezvous store", cxxopts::value<int>()->default_value("29500"));
  add("standalone", "single node: localhost and a free port");
  add(both_spellings("shutdown_timeout"),
      "seconds between SIGTERM and SIGKILL when stopping workers (default: $TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 30)",
      cxxopts::value<double>());
  add(both_spellings("rdzv_id"), "run id (TORCHELASTIC_RUN_ID)", cxxopts::value<std::string>());
  add(both_spellings("max_restarts"),
      "when a worker fails, stop the others and start every worker again, up to this many times (every node together)",
      cxxopts::value<int>()->default_value("0"));
  add(both_spellings("join_timeout"), "several nodes with --max_restarts: seconds to wait for the other nodes' launchers",
      cxxopts::value<double>()->default_value("600"));
  add(both_spellings("rdzv_conf"), "torchrun's rendezvous settings; only join_timeout=S is used", cxxopts::value<std::string>());
  add(both_spellings("no_python"), "accepted for torchrun compatibility: llava-run always runs the command as is");
  add("h,help", "print this help");
  return options;
}

bool takes_value(const std::string& arg) {
  static const std::set<std::string> value_options = {"nproc_per_node", "nnodes",          "node_rank", "master_addr",
                                                      "master_port",    "shutdown_timeout", "rdzv_id",
                                                      "max_restarts",   "join_timeout",     "rdzv_conf"};
  std::string name = arg.substr(arg.find_first_not_of('-'));
  if (name.find('=') != std::string::npos) return false;  // --name=value
  std::replace(name.begin(), name.end(), '-', '_');
  return value_options.count(name) > 0;
}

// cxxopts would also read options after the command (`llava train --config x`); cut them off first.
void split_options_and_command(const std::vector<std::string>& args, std::vector<std::string>& options,
                               std::vector<std::string>& command) {
  size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg.size() < 2 || arg[0] != '-') break;
    options.push_back(arg);
    if (takes_value(arg) && i + 1 < args.size()) options.push_back(args[++i]);
  }
  command.assign(args.begin() + static_cast<long>(i), args.end());
}

std::string random_run_id() {
  std::random_device device;
  char text[40];
  std::snprintf(text, sizeof text, "%08x-%04x-%04x", device(), device() & 0xffff, device() & 0xffff);
  return text;
}

void check_range(const char* option, long value, long lo, long hi) {
  if (value < lo || value > hi)
    fail(std::string("llava-run --") + option,
         "expected a value in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(value));
}

int parse_nnodes(const std::string& text) {
  if (text.find(':') != std::string::npos)
    fail("llava-run --nnodes", "elastic ranges ('" + text + "') are not supported; give a fixed number of nodes");
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) fail("llava-run --nnodes", "expected an integer, got '" + text + "'");
  return value;
}

// torchrun's --rdzv-conf "key=value,...": join_timeout is the one that means something here.
void apply_rdzv_conf(const std::string& text, LaunchConfig& config) {
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = std::min(text.find(',', start), text.size());
    std::string item = text.substr(start, comma - start);
    size_t eq = item.find('=');
    std::string key = item.substr(0, eq);
    if (eq == std::string::npos || key != "join_timeout")
      fail("llava-run --rdzv_conf", "expected join_timeout=<seconds>, got '" + item + "'");
    try {
      size_t used = 0;
      config.join_timeout_s = std::stod(item.substr(eq + 1), &used);
      if (used != item.size() - eq - 1) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      fail("llava-run --rdzv_conf", "join_timeout: expected seconds, got '" + item.substr(eq + 1) + "'");
    }
    start = comma + 1;
  }
}

double default_shutdown_timeout() {
  const char* text = std::getenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT");
  return text ? std::atof(text) : 30.0;
}

// ---------------------------------------------------------------------------------------------------
// Supervising the workers

int g_signal_pipe[2] = {-1, -1};  // the handler writes the signal number; the poll loop reads it

void on_signal(int signal_number) {
  int saved_errno = errno;
  unsigned char byte = static_cast<unsigned char>(signal_number);
  [[maybe_unused]] auto written = write(g_signal_pipe[1], &byte, 1);
  errno = saved_errno;
}

void install_signal_handlers() {
  if (pipe2(g_signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0) fail("llava-run", std::string("pipe: ") + strerror(errno));
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  for (int signal_number : {SIGINT, SIGTERM, SIGCHLD}) sigaction(signal_number, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a closed stdout must not kill the supervisor
}

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // nowhere to write to; keep supervising anyway
    done += static_cast<size_t>(n);
  }
}

// One output stream of a worker: complete lines get the rank prefix as they arrive.
struct Stream {
  int fd = -1;      // read end of the worker's pipe; -1 once closed
  int target = 1;   // our stdout or stderr
  std::string pending;
  std::string last_line;  // the last non-empty line, for the failure report

  void emit_lines(const std::string& prefix, bool flush_partial) {
    size_t start = 0, newline;
    std::string out;
    while ((newline = pending.find('\n', start)) != std::string::npos) {
      out += prefix + pending.substr(start, newline - start + 1);
      if (newline > start) last_line = pending.substr(start, newline - start);
      start = newline + 1;
    }
    pending.erase(0, start);
    if (flush_partial && !pending.empty()) {
      out += prefix + pending + "\n";
      last_line = pending;
      pending.clear();
    }
    write_all(target, out);
  }

  // Reads what is available; closes the stream at end of file.
  void read_available(const std::string& prefix) {
    char buffer[65536];
    ssize_t n = read(fd, buffer, sizeof buffer);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n > 0) {
      pending.append(buffer, static_cast<size_t>(n));
      emit_lines(prefix, false);
      return;
    }
    emit_lines(prefix, true);
    close(fd);
    fd = -1;
  }
};

struct Worker {
  int rank = 0;
  int local_rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // waitpid status once it ended
  Stream out, err;
  std::string prefix() const { return "[rank" + std::to_string(rank) + "]:"; }
};

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "ended with wait status " + std::to_string(status);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::map<std::string, std::string> current_environment() {
  std::map<std::string, std::string> env;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    std::string text = *entry;
    size_t eq = text.find('=');
    if (eq != std::string::npos) env[text.substr(0, eq)] = text.substr(eq + 1);
  }
  return env;
}

// In the child, after fork (signals blocked): the worker's environment, pipes and process group, then exec.
[[noreturn]] void exec_worker(const LaunchConfig& config, const std::map<std::string, std::string>& env,
                              int out_fd, int err_fd, pid_t launcher_pid, const sigset_t& launcher_mask) {
  setpgid(0, 0);                     // its own group: signals reach the worker's children too
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // no orphans if the launcher itself is killed
  if (getppid() != launcher_pid) _exit(127);
  // The launcher's handler would write into the launcher's signal pipe: a SIGTERM sent to this worker
  // before exec would read as one sent to the launcher. Default handlers first, then unblock.
  struct sigaction action {};
  action.sa_handler = SIG_DFL;
  for (int signal_number : {SIGINT, SIGTERM, SIGCHLD, SIGPIPE}) sigaction(signal_number, &action, nullptr);
  sigprocmask(SIG_SETMASK, &launcher_mask, nullptr);

  int devnull = open("/dev/null", O_RDONLY);  // a background process group must not read the terminal
  if (devnull >= 0) dup2(devnull, 0);
  dup2(out_fd, 1);
  dup2(err_fd, 2);
  for (const auto& [key, value] : env) setenv(key.c_str(), value.c_str(), 1);

  std::vector<char*> argv;
  for (const auto& arg : config.command) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  std::string message = "llava-run: cannot execute '" + config.command[0] + "': " + strerror(errno) + "\n";
  write_all(2, message);
  _exit(127);
}

void start_worker(Worker& worker, const LaunchConfig& config, const std::map<std::string, std::string>& parent_env,
                  int restart_count) {
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0)
    fail("llava-run", std::string("pipe: ") + strerror(errno));
  auto env = worker_env(config, worker.local_rank, parent_env, restart_count);
  pid_t launcher_pid = getpid();
  sigset_t all, launcher_mask;
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &launcher_mask);  // until the child has its own handlers (see exec_worker)
  pid_t pid = fork();
  if (pid == 0) exec_worker(config, env, out_pipe[1], err_pipe[1], launcher_pid, launcher_mask);
  sigprocmask(SIG_SETMASK, &launcher_mask, nullptr);
  if (pid < 0) fail("llava-run", std::string("fork: ") + strerror(errno));
  setpgid(pid, pid);  // also here, so kill(-pid) works whichever side runs first
  close(out_pipe[1]);
  close(err_pipe[1]);
  fcntl(out_pipe[0], F_SETFL, O_NONBLOCK);
  fcntl(err_pipe[0], F_SETFL, O_NONBLOCK);
  worker.pid = pid;
  worker.running = true;
  worker.out = Stream{out_pipe[0], 1, {}, {}};
  worker.err = Stream{err_pipe[0], 2, {}, {}};
}

using Clock = std::chrono::steady_clock;

// What ended a round: the first worker that failed on its own.
struct Failure {
  int rank = 0, local_rank = 0;
  pid_t pid = -1;
  int status = 0;           // its waitpid status
  std::string last_line;    // the last line it wrote to stderr
  int stopped_others = 0;   // workers still running when it failed
  int node = -1;            // its node, named when there are several

  std::string describe() const {
    std::string text = "worker rank " + std::to_string(rank) + " (" +
                       (node >= 0 ? "node " + std::to_string(node) + ", " : "") + "local rank " +
                       std::to_string(local_rank) + ", pid " + std::to_string(pid) + ") failed: it " + describe_status(status);
    if (!last_line.empty()) text += " (its last error line: " + last_line.substr(0, 300) + ")";
    if (stopped_others > 0) text += "; stopped the other " + std::to_string(stopped_others) + " running worker(s)";
    return text;
  }
};

class Supervisor {
 public:
  Supervisor(const LaunchConfig& config) : config_(config) {}

  // Rounds of the whole group: a failed round is followed by a new one while restarts are left,
  // unless the launcher itself was interrupted (a preemption is not a failure). Several nodes with
  // restarts: node 0's launcher decides for all (node_link.h).
  int run() {
    install_signal_handlers();
    const auto parent_env = current_environment();
    try {
      if (config_.nnodes > 1 && config_.max_restarts > 0)
        link_ = std::make_unique<NodeLink>(config_, g_signal_pipe[0]);
      return link_ ? run_linked_rounds(parent_env) : run_rounds(parent_env);
    } catch (const Interrupted& interrupted) {  // while waiting for the other nodes: no worker runs
      write_all(2, std::string("llava-run: interrupted by ") + strsignal(interrupted.signal_number) +
                       " while waiting for the other nodes (no restart)\n");
      return 128 + interrupted.signal_number;
    }
  }

 private:
  int run_rounds(const std::map<std::string, std::string>& parent_env) {
    for (int round = 0;; ++round) {
      run_round(round, parent_env);
      if (!failure_ || interrupted_by_ != 0 || round == config_.max_restarts) return report(round);
      announce_restart(failure_->describe(), round + 1);
      // --standalone owns its port: a fresh one per round, so no socket of the last round can be in the way.
      if (config_.standalone) config_.master_port = pick_free_port();
    }
  }

  int run_linked_rounds(const std::map<std::string, std::string>& parent_env) {
    for (int round = 0;; ++round) {
      std::optional<int> store_port = link_->start_round(round);
      if (!store_port) return end_linked(link_->final_decision(), round);
      config_.master_port = *store_port;  // this round's workers' store (the link keeps --master_port)
      run_round(round, parent_env);
      Decision decision = link_->finish_round(round, local_outcome());
      if (!decision.restart) return end_linked(decision, round);
      announce_restart(decision.text, round + 1);
    }
  }

  void announce_restart(const std::string& failure, int restart) const {
    write_all(2, "llava-run: " + failure + "; restarting every worker (restart " + std::to_string(restart) + " of " +
                     std::to_string(config_.max_restarts) + ")\n");
  }

  RoundOutcome local_outcome() const {
    std::string node = "on node " + std::to_string(config_.node_rank) + ": ";
    if (interrupted_by_ != 0)
      return {RoundOutcome::kPreempted, 128 + interrupted_by_,
              node + "llava-run was interrupted by " + strsignal(interrupted_by_)};
    if (failure_) return {RoundOutcome::kFailed, exit_code_of(failure_->status), failure_->describe()};
    if (remote_stop_) return {RoundOutcome::kStopped, 1, *remote_stop_};
    return {};
  }

  int end_linked(const Decision& decision, int round) const {
    if (decision.exit_code == 0) return 0;
    std::string message = "llava-run: " + decision.text;
    if (decision.leader_lost)
      message += " (no restart without it)";
    else if (decision.exit_code > 128 && decision.text.find("interrupted") != std::string::npos)
      message += " (no restart)";
    else
      message += "; no restarts left (" + std::to_string(round) + " of --max_restarts " +
                 std::to_string(config_.max_restarts) + " used)";
    write_all(2, message + "\n");
    return decision.exit_code;
  }

  void run_round(int round, const std::map<std::string, std::string>& parent_env) {
    workers_.clear();
    workers_.reserve(static_cast<size_t>(config_.nproc_per_node));  // Stream pointers stay valid
    failure_.reset();
    remote_stop_.reset();
    stopping_ = killed_ = false;
    for (int local_rank = 0; local_rank < config_.nproc_per_node; ++local_rank) {
      workers_.push_back({});
      workers_.back().local_rank = local_rank;
      workers_.back().rank = config_.node_rank * config_.nproc_per_node + local_rank;
      start_worker(workers_.back(), config_, parent_env, round);
    }
    while (any_running() || any_stream_open()) poll_once();
    if (failure_) failure_->last_line = workers_[static_cast<size_t>(failure_->local_rank)].err.last_line;
    // A stopped round leaves nothing behind: what the workers started in their groups goes too.
    if (stopping_)
      for (auto& w : workers_) kill(-w.pid, SIGKILL);
  }

  bool any_running() const {
    return std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) { return w.running; });
  }
  bool any_stream_open() const {
    return std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) { return w.out.fd >= 0 || w.err.fd >= 0; });
  }

  int poll_timeout_ms() const {
    if (!any_running()) {
      // Workers are gone but something they started still holds a pipe: drain briefly, then stop.
      return 200;
    }
    if (!stopping_ || killed_) return -1;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(kill_deadline_ - Clock::now()).count();
    return static_cast<int>(std::max<long>(left, 0));
  }

  void poll_once() {
    std::vector<pollfd> fds{{g_signal_pipe[0], POLLIN, 0}};
    std::vector<Stream*> streams{nullptr};
    for (auto& w : workers_)
      for (Stream* s : {&w.out, &w.err})
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          streams.push_back(s);
        }
    if (link_) link_->add_poll_fds(fds);
    int timeout = poll_timeout_ms();
    int ready = poll(fds.data(), fds.size(), timeout);
    if (ready < 0 && errno != EINTR) fail("llava-run", std::string("poll: ") + strerror(errno));
    if (link_ && ready > 0) stop_for_other_node(link_->handle_poll(fds));

    if (ready == 0 && !any_running()) close_leftover_streams();
    for (size_t i = 1; i < streams.size(); ++i)
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) streams[i]->read_available(owner_prefix(streams[i]));
    if (fds[0].revents & POLLIN) handle_signals();
    reap();
    if (stopping_ && !killed_ && any_running() && Clock::now() >= kill_deadline_) {
      signal_all(SIGKILL);
      killed_ = true;
    }
  }

  // Another node's worker failed (or its launcher was lost): stop ours; the leader decides what follows.
  void stop_for_other_node(const std::optional<std::string>& why) {
    if (!why || stopping_) return;
    remote_stop_ = *why;
    begin_stop(SIGTERM);
  }

  std::string owner_prefix(const Stream* stream) const {
    for (const auto& w : workers_)
      if (&w.out == stream || &w.err == stream) return w.prefix();
    return "";
  }

  void close_leftover_streams() {
    for (auto& w : workers_)
      for (Stream* s : {&w.out, &w.err})
        if (s->fd >= 0) {
          s->emit_lines(w.prefix(), true);
          close(s->fd);
          s->fd = -1;
        }
  }

  void handle_signals() {
    unsigned char byte;
    while (read(g_signal_pipe[0], &byte, 1) == 1) {
      if (byte != SIGINT && byte != SIGTERM) continue;  // SIGCHLD: reap() below
      if (interrupted_by_ != 0) {
        signal_all(SIGKILL);  // a second Ctrl-C: no more grace
        killed_ = true;
      } else {
        interrupted_by_ = byte;
        begin_stop(byte);
        if (link_) link_->report_failure(local_outcome().text);
      }
    }
  }

  void reap() {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      for (auto& w : workers_) {
        if (w.pid != pid) continue;
        w.running = false;
        w.status = status;
        bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        if (failed && !stopping_) {
          failure_ = Failure{w.rank, w.local_rank, w.pid, status, "",
                             static_cast<int>(std::count_if(workers_.begin(), workers_.end(),
                                                            [](const Worker& other) { return other.running; }))};
          if (config_.nnodes > 1) failure_->node = config_.node_rank;
          begin_stop(SIGTERM);
          if (link_) link_->report_failure(failure_->describe());
        }
      }
    }
  }

  void begin_stop(int signal_number) {
    stopping_ = true;
    kill_deadline_ = Clock::now() + std::chrono::milliseconds(static_cast<long>(config_.shutdown_timeout_s * 1000));
    signal_all(signal_number);
  }

  void signal_all(int signal_number) {
    for (auto& w : workers_)
      if (w.running) kill(-w.pid, signal_number);
  }

  int report(int round) const {
    if (interrupted_by_ != 0) {
      write_all(2, std::string("llava-run: interrupted by ") + strsignal(interrupted_by_) +
                       "; forwarded it to the workers" + (config_.max_restarts > 0 ? " (no restart)" : "") + "\n");
      return 128 + interrupted_by_;
    }
    if (failure_) {
      std::string message = "llava-run: " + failure_->describe();
      if (config_.max_restarts > 0)
        message += "; no restarts left (" + std::to_string(round) + " of --max_restarts " +
                   std::to_string(config_.max_restarts) + " used)";
      write_all(2, message + "\n");
      return exit_code_of(failure_->status);
    }
    return 0;
  }

  LaunchConfig config_;  // a copy: --standalone renews master_port every round
  std::vector<Worker> workers_;
  std::optional<Failure> failure_;  // this round's
  std::unique_ptr<NodeLink> link_;  // several nodes with restarts
  std::optional<std::string> remote_stop_;  // this round was stopped for another node's failure
  int interrupted_by_ = 0;
  bool stopping_ = false;
  bool killed_ = false;
  Clock::time_point kill_deadline_;
};

}  // namespace

std::string launch_usage() { return make_options().help(); }

LaunchConfig parse_launch_args(const std::vector<std::string>& args) {
  std::vector<std::string> option_args{"llava-run"}, command;
  split_options_and_command(args, option_args, command);
  std::vector<const char*> argv;
  for (const auto& arg : option_args) argv.push_back(arg.c_str());

  auto options = make_options();
  LaunchConfig config;
  try {
    auto parsed = io::parse_command_line(options, static_cast<int>(argv.size()), argv.data(), "llava-run");
    config.help = parsed.count("help") > 0;
    config.nproc_per_node = parsed["nproc_per_node"].as<int>();
    config.nnodes = parse_nnodes(parsed["nnodes"].as<std::string>());
    config.node_rank = parsed["node_rank"].as<int>();
    config.master_addr = parsed["master_addr"].as<std::string>();
    config.master_port = parsed["master_port"].as<int>();
    config.standalone = parsed.count("standalone") > 0;
    config.shutdown_timeout_s =
        parsed.count("shutdown_timeout") ? parsed["shutdown_timeout"].as<double>() : default_shutdown_timeout();
    if (parsed.count("rdzv_id")) config.run_id = parsed["rdzv_id"].as<std::string>();
    config.max_restarts = parsed["max_restarts"].as<int>();
    config.join_timeout_s = parsed["join_timeout"].as<double>();
    if (parsed.count("rdzv_conf")) apply_rdzv_conf(parsed["rdzv_conf"].as<std::string>(), config);
    if (!parsed.unmatched().empty()) fail("llava-run", "unexpected argument '" + parsed.unmatched()[0] + "'");
  } catch (const cxxopts::exceptions::exception& e) {
    fail("llava-run options", e.what());
  }
  config.command = command;
  if (config.help) return config;

  check_range("nproc_per_node", config.nproc_per_node, 1, 4096);
  check_range("nnodes", config.nnodes, 1, 1 << 20);
  check_range("node_rank", config.node_rank, 0, config.nnodes - 1);
  check_range("master_port", config.master_port, 0, 65535);
  check_range("max_restarts", config.max_restarts, 0, 1'000'000);
  if (!(config.join_timeout_s > 0 && config.join_timeout_s <= 86400))
    fail("llava-run --join_timeout", "expected seconds in (0, 86400], got " + std::to_string(config.join_timeout_s));
  if (config.shutdown_timeout_s < 0) fail("llava-run --shutdown_timeout", "expected seconds >= 0");
  if (config.command.empty()) fail("llava-run", "no command to run (usage: llava-run [options] command [args...])");
  if (config.standalone) {
    if (config.nnodes != 1) fail("llava-run --standalone", "is a single-node run, but --nnodes=" + std::to_string(config.nnodes));
    config.master_addr = "localhost";
    config.master_port = pick_free_port();
    if (config.run_id == "none") config.run_id = random_run_id();
  }
  return config;
}

std::map<std::string, std::string> worker_env(const LaunchConfig& config, int local_rank,
                                              const std::map<std::string, std::string>& parent_env,
                                              int restart_count) {
  int world_size = config.nnodes * config.nproc_per_node;
  std::string rank = std::to_string(config.node_rank * config.nproc_per_node + local_rank);
  std::map<std::string, std::string> env = {
      {"RANK", rank},
      {"LOCAL_RANK", std::to_string(local_rank)},
      {"WORLD_SIZE", std::to_string(world_size)},
      {"LOCAL_WORLD_SIZE", std::to_string(config.nproc_per_node)},
      {"GROUP_RANK", std::to_string(config.node_rank)},
      {"GROUP_WORLD_SIZE", std::to_string(config.nnodes)},
      {"ROLE_NAME", "default"},
      {"ROLE_RANK", rank},
      {"ROLE_WORLD_SIZE", std::to_string(world_size)},
      {"MASTER_ADDR", config.master_addr},
      {"MASTER_PORT", std::to_string(config.master_port)},
      {"TORCHELASTIC_RESTART_COUNT", std::to_string(restart_count)},
      {"TORCHELASTIC_MAX_RESTARTS", std::to_string(config.max_restarts)},
      {"TORCHELASTIC_RUN_ID", config.run_id},
      {"TORCHELASTIC_USE_AGENT_STORE", "False"},  // no agent: rank 0 hosts the store
      {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"},
  };
  auto inherited = parent_env.find("TORCH_NCCL_ASYNC_ERROR_HANDLING");
  if (inherited != parent_env.end()) env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = inherited->second;
  // Like torchrun: several workers on one node share the cores, so one OpenMP thread each by default.
  if (!parent_env.count("OMP_NUM_THREADS") && config.nproc_per_node > 1) env["OMP_NUM_THREADS"] = "1";
  return env;
}

int run_workers(const LaunchConfig& config) { return Supervisor(config).run(); }

int pick_free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) fail("llava-run --standalone", std::string("socket: ") + strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);  // free on every interface: other nodes connect to it too
  addr.sin_port = 0;
  socklen_t length = sizeof addr;
  bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
            getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) == 0;
  int saved_errno = errno;
  close(fd);
  if (!ok) fail("llava-run --standalone", std::string("cannot find a free port: ") + strerror(saved_errno));
  return ntohs(addr.sin_port);
}

}  // namespace llava::launcher
