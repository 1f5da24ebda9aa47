// `llava inspect PATH`: list the tensors (and other entries) of any weights or checkpoint file/dir.
#include <cxxopts.hpp>
#include <iostream>

#include "cli/command.h"
#include "io/command_line.h"
#include "io/inspect.h"

namespace {

int run_inspect(int argc, char** argv) {
  cxxopts::Options options(argv[0], "List name, dtype, shape and bytes of every tensor in PATH "
                                    "(safetensors, sharded model dir, .pt/.bin/.pth, checkpoint dir)");
  options.add_options()("path", "file or directory", cxxopts::value<std::string>())("h,help", "show help");
  options.parse_positional({"path"});
  options.positional_help("PATH");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help") || !args.count("path")) {
    std::cout << options.help();
    return args.count("help") ? 0 : 2;
  }
  llava::io::inspect_path(args["path"].as<std::string>(), std::cout);
  return 0;
}

}  // namespace

LLAVA_COMMAND("inspect", "list the tensors of a weights file, model dir or checkpoint", run_inspect);
