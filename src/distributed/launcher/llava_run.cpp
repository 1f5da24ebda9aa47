// llava-run: start this node's workers with torchrun's environment (see launcher.h).
#include <iostream>

#include "distributed/launcher/launcher.h"
#include "io/error.h"

int main(int argc, char** argv) {
  try {
    auto config = llava::launcher::parse_launch_args(std::vector<std::string>(argv + 1, argv + argc));
    if (config.help) {
      std::cout << llava::launcher::launch_usage();
      return 0;
    }
    return llava::launcher::run_workers(config);
  } catch (const llava::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
