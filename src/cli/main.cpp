// `llava <command> [args]`: dispatch to the registered subcommands; every failure is one clear line.
#include <malloc.h>

#include <algorithm>
#include <exception>
#include <iostream>

#include "cli/command.h"
#include "io/error.h"
#include "io/yaml_config.h"

namespace llava::cli {
std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}
}  // namespace llava::cli

static void print_usage(std::ostream& out) {
  auto commands = llava::cli::registry();
  std::sort(commands.begin(), commands.end(), [](auto& a, auto& b) { return a.name < b.name; });
  out << "usage: llava <command> [options]\n\ncommands:\n";
  for (auto& c : commands) out << "  " << c.name << std::string(14 - std::min<size_t>(13, c.name.size()), ' ') << c.summary << "\n";
  out << "\nRun `llava <command> --help` for the options of one command.\n";
}

// A training step allocates and frees the same tensors every step. By default glibc hands big blocks back
// to the kernel when they are freed (mmap'd chunks, heap trimming), so every step faults the same memory
// in again as fresh zeroed pages: 4-7% of a step's CPU time on the bench model. Keeping freed memory in
// the heap lets the next step reuse it; the process's peak is what it was, it just stays mapped.
static void keep_freed_memory_for_reuse() {
  constexpr int kOneGiB = 1 << 30;
  mallopt(M_MMAP_THRESHOLD, kOneGiB);  // only blocks above 1 GiB get their own mapping
  mallopt(M_TRIM_THRESHOLD, kOneGiB);  // keep up to 1 GiB free at the heap's top
}

// An error as one line: trailing newlines dropped, inner ones and control bytes escaped (a path or a file's
// content may hold them; a terminal escape sequence must not reach the terminal).
static std::string one_line(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
  return llava::io::printable(text);
}

int main(int argc, char** argv) {
  keep_freed_memory_for_reuse();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    print_usage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  for (auto& command : llava::cli::registry()) {
    if (command.name != name) continue;
    std::string program = "llava " + name;
    argv[1] = program.data();
    try {
      return command.run(argc - 1, argv + 1);
    } catch (const llava::Error& e) {  // one line: a path or file content may hold newlines or escapes
      std::cerr << "error: " << one_line(e.what()) << "\n";
    } catch (const c10::Error& e) {
      std::cerr << "error: " << one_line(e.what_without_backtrace()) << "\n";
    } catch (const std::exception& e) {
      std::cerr << "error: " << one_line(e.what()) << "\n";
    }
    return 1;
  }
  std::cerr << "error: unknown command '" << name << "'\n";
  print_usage(std::cerr);
  return 2;
}
