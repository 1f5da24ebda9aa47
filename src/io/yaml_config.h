// YAML config files, read one way for every config of the project (the training config, the data config
// of `llava preprocess`), and the declared schema their keys are read through.
//
// Loading is bounded before yaml-cpp sees a byte: a regular file of at most kMaxYamlConfigFileBytes (read
// through io::read_input_file, as every input file is), nesting at
// most kMaxYamlDepth levels deep (deep nesting overflows a recursive parser's stack), one document, no
// key given twice (yaml-cpp would keep both and a lookup would silently take one).
//
// A schema declares every key once: its reader (type, range or allowed values) and whether it acts or is
// accepted and ignored. Every bad value gives the same wording:
//   <file>:<line>: key '<key>': expected <what>, got <value>
// and a library's exception (yaml-cpp's "bad conversion", std::regex's) never reaches the user as is.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "io/error.h"

namespace llava::io {

constexpr int kMaxYamlDepth = 32;           // configs are at most 3 levels deep

// The one document of a YAML config file (Null when empty). Errors name the file (and the line).
YAML::Node load_yaml_config(const std::string& path);
// The same checks for YAML text from elsewhere (`--set key=VALUE`): `where` names it in errors.
YAML::Node parse_yaml_text(const std::string& text, const std::string& where);

// Text for an error line: newlines as \n, other control characters as '?'.
std::string printable(const std::string& text);
// A value as errors show it: 'text' (cut short when long), a list or a map.
std::string describe_value(const YAML::Node& node);

// ------------------------------------------------------------------------------------------ value readers
// Each throws BadValue{what was expected}; the schema turns it into the one error wording.
struct BadValue {
  std::string expected;
};

bool read_bool(const YAML::Node& node);  // true/false (True/False): not YAML 1.1's yes/on
int64_t read_integer(const YAML::Node& node, int64_t min, int64_t max);  // 1e3 is fine, 2.5 is not
double read_number(const YAML::Node& node, double min, double max, bool max_excluded = false);
std::string read_string(const YAML::Node& node);
std::string read_choice(const YAML::Node& node, const std::vector<std::string>& choices);
std::vector<std::string> read_strings(const YAML::Node& node);  // a string or a list of strings
std::string read_byte_size(const YAML::Node& node);              // 5GB, 200MB, 1000
std::string read_regex(const YAML::Node& node);                  // compiles as std::regex (ECMAScript)

// ------------------------------------------------------------------------------------------------ schema

// One setting as found: its key (nested maps joined with '.'), its value, and where it was given
// ("train.yaml:12" or "--set lora_r=8").
struct Setting {
  std::string key;
  YAML::Node value;
  std::string where;
};

// The settings of a config file's top-level map. Keys in `map_keys` (e.g. lr_scheduler_kwargs) hold a
// map whose entries become "map_key.entry"; "a.b: 1" and "a: {b: 1}" are the same key, given twice.
std::vector<Setting> settings_of(const YAML::Node& root, const std::string& file, const std::set<std::string>& map_keys);
// `--set key=value`: the value is YAML.
Setting setting_from_override(const std::string& text);

// The valid key closest to `key` by edit distance, or "" when none is close.
std::string nearest_name(const std::string& key, const std::vector<std::string>& names);

enum class KeyUse {
  kActs,     // sets a field the code uses
  kIgnored,  // accepted for HF/LLaVA compatibility, does nothing here (a log line says so when set)
};

template <class Config>
struct ConfigKey {
  std::string name;
  std::function<void(Config&, const YAML::Node&)> read;  // throws BadValue
  KeyUse use = KeyUse::kActs;
};

template <class Config>
class Schema {
 public:
  Schema& add(ConfigKey<Config> key) {
    keys_[key.name] = std::move(key);
    return *this;
  }
  // Every key of `other`, read into the `part` member (the data keys of the training config).
  template <class Part>
  Schema& include(const Schema<Part>& other, Part Config::*part) {
    for (const auto& [name, key] : other.keys())
      add({name, [read = key.read, part](Config& c, const YAML::Node& n) { read(c.*part, n); }, key.use});
    return *this;
  }
  const std::map<std::string, ConfigKey<Config>>& keys() const { return keys_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, _] : keys_) out.push_back(name);
    return out;
  }

  // Reads the settings in order (a later one wins: --set after the file). A null value keeps the
  // default. Unknown keys are errors unless `other_keys_allowed` (a data config may be a training config).
  // Returns the keys set that are accepted and ignored.
  std::vector<std::string> read(Config& c, const std::vector<Setting>& settings, bool other_keys_allowed = false) const {
    std::vector<std::string> ignored;
    for (const auto& s : settings) {
      auto key = keys_.find(s.key);
      if (key == keys_.end()) {
        if (other_keys_allowed) continue;
        const std::string hint = nearest_name(s.key, names());
        fail(s.where, "unknown key '" + s.key + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
      }
      if (s.value.IsNull()) continue;
      try {
        key->second.read(c, s.value);
      } catch (const BadValue& bad) {
        fail(s.where, "key '" + s.key + "': expected " + bad.expected + ", got " + describe_value(s.value));
      }
      if (key->second.use == KeyUse::kIgnored) ignored.push_back(s.key);
    }
    return ignored;
  }

 private:
  std::map<std::string, ConfigKey<Config>> keys_;
};

// Declaring keys: one line per key, the member it sets and its range or allowed values.
template <class Config>
ConfigKey<Config> boolean(std::string name, bool Config::*m) {
  return {std::move(name), [m](Config& c, const YAML::Node& n) { c.*m = read_bool(n); }};
}
template <class Config, class Int>
ConfigKey<Config> integer(std::string name, Int Config::*m, int64_t min, int64_t max) {
  return {std::move(name), [=](Config& c, const YAML::Node& n) { c.*m = static_cast<Int>(read_integer(n, min, max)); }};
}
template <class Config>
ConfigKey<Config> number(std::string name, double Config::*m, double min, double max, bool max_excluded = false) {
  return {std::move(name), [=](Config& c, const YAML::Node& n) { c.*m = read_number(n, min, max, max_excluded); }};
}
template <class Config>
ConfigKey<Config> text(std::string name, std::string Config::*m) {
  return {std::move(name), [m](Config& c, const YAML::Node& n) { c.*m = read_string(n); }};
}
template <class Config>
ConfigKey<Config> choice(std::string name, std::string Config::*m, std::vector<std::string> choices) {
  return {std::move(name), [m, choices](Config& c, const YAML::Node& n) { c.*m = read_choice(n, choices); }};
}
template <class Config>
ConfigKey<Config> texts(std::string name, std::vector<std::string> Config::*m) {
  return {std::move(name), [m](Config& c, const YAML::Node& n) { c.*m = read_strings(n); }};
}
template <class Config>
ConfigKey<Config> byte_size(std::string name, std::string Config::*m) {
  return {std::move(name), [m](Config& c, const YAML::Node& n) { c.*m = read_byte_size(n); }};
}
template <class Config>
ConfigKey<Config> regex(std::string name, std::string Config::*m) {
  return {std::move(name), [m](Config& c, const YAML::Node& n) { c.*m = read_regex(n); }};
}
// A key with one meaning here: only `allowed` values are accepted (fp16: false, optim: adamw_torch).
template <class Config>
ConfigKey<Config> only(std::string name, std::vector<std::string> allowed) {
  return {std::move(name), [allowed](Config&, const YAML::Node& n) { read_choice(n, allowed); }};
}
// Accepted for compatibility and ignored; `check` refuses the values that would contradict it being
// ignored (e.g. fp16: true), by throwing BadValue.
template <class Config>
ConfigKey<Config> ignored(std::string name, std::function<void(const YAML::Node&)> check = {}) {
  return {std::move(name), [check](Config&, const YAML::Node& n) { if (check) check(n); }, KeyUse::kIgnored};
}

}  // namespace llava::io
