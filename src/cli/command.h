// Subcommand registry of the `llava` binary.
#pragma once
#include <string>
#include <vector>

namespace llava::cli {

using CommandFn = int (*)(int argc, char** argv);  // argv[0] is "llava <name>"

struct Command {
  std::string name;
  std::string summary;
  CommandFn run;
};

std::vector<Command>& registry();

struct CommandRegistrar {
  CommandRegistrar(std::string name, std::string summary, CommandFn run) {
    registry().push_back({std::move(name), std::move(summary), run});
  }
};

#define LLAVA_COMMAND(name, summary, fn) \
  static ::llava::cli::CommandRegistrar llava_command_registrar_##fn(name, summary, fn)

}  // namespace llava::cli
