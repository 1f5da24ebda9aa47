#include "distributed/dist_env.h"

#include <cstdlib>
#include <optional>

#include "io/error.h"

namespace llava::dist {
namespace {

std::optional<std::string> env_value(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

int parse_int(const char* name, const std::string& text, int min_value, int max_value) {
  size_t used = 0;
  long value = 0;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < min_value || value > max_value)
    fail(std::string("environment variable ") + name,
         "expected an integer in [" + std::to_string(min_value) + ", " + std::to_string(max_value) +
             "], got '" + text + "'");
  return static_cast<int>(value);
}

int required_int(const char* name, int min_value, int max_value) {
  auto text = env_value(name);
  if (!text)
    fail(std::string("environment variable ") + name,
         "not set, but RANK/WORLD_SIZE are (set all torchrun variables, or none for a single process)");
  return parse_int(name, *text, min_value, max_value);
}

int optional_int(const char* name, int fallback, int min_value, int max_value) {
  auto text = env_value(name);
  return text ? parse_int(name, *text, min_value, max_value) : fallback;
}

}  // namespace

DistEnv read_dist_env() {
  DistEnv env;
  if (!env_value("RANK") && !env_value("WORLD_SIZE")) return env;

  env.from_launcher = true;
  env.world_size = required_int("WORLD_SIZE", 1, 1 << 20);
  env.rank = required_int("RANK", 0, env.world_size - 1);
  env.local_world_size = optional_int("LOCAL_WORLD_SIZE", 1, 1, env.world_size);
  env.local_rank = optional_int("LOCAL_RANK", 0, 0, env.local_world_size - 1);
  env.agent_store = env_value("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  env.restart_count = optional_int("TORCHELASTIC_RESTART_COUNT", 0, 0, 1 << 30);
  // One rank needs no rendezvous, so the address is optional then (torchrun sets it anyway).
  auto addr = env_value("MASTER_ADDR");
  if (env.world_size > 1 && (!addr || addr->empty()))
    fail("environment variable MASTER_ADDR", "not set but WORLD_SIZE=" + std::to_string(env.world_size));
  if (addr && !addr->empty()) {
    env.master_addr = *addr;
    env.master_port = required_int("MASTER_PORT", 1, 65535);
  }
  return env;
}

std::chrono::milliseconds dist_timeout_from_env(std::chrono::milliseconds fallback) {
  auto text = env_value("LLAVA_DIST_TIMEOUT");
  if (!text) return fallback;
  double seconds = 0;
  size_t used = 0;
  try {
    seconds = std::stod(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text->size() || !(seconds > 0))
    fail("environment variable LLAVA_DIST_TIMEOUT", "expected a positive number of seconds, got '" + *text + "'");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

}  // namespace llava::dist
