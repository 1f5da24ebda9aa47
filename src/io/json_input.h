// The one way JSON from a file is parsed: nesting depth bounded, the library's message wrapped into an
// Error that names the file (and the record), numbers read as checked integers.
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "io/file_util.h"

namespace llava::io {

// Deeper than any real file (HF configs and tokenizer.json nest under 10 levels; a LLaVA record 3) and
// shallow enough that every recursive walk of the value (copy, dump, compare) stays far from the stack
// limit. A value nested 100k levels deep is refused while parsing, before it is built.
constexpr int kMaxJsonDepth = 64;

struct JsonParseOptions {
  // When set and the top level is an array, errors name the element: "<where>: <item_name> <i>: ...".
  std::string item_name;
  // Sees every parse event after the depth check, with nlohmann's parser_callback_t depths: `parsed` is the
  // key (key events) or the value (value events), null for a container's start and end. May throw Error.
  std::function<void(int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed)> on_event;
};

// Parses `text`. Error "<where>: not valid JSON: <what the parser says>", "<where>: JSON nested deeper
// than 64 levels", or "<where>: key 'k' appears twice in one object" (nlohmann would keep the last silently,
// Python's json too: never what a hand-edited file meant).
nlohmann::json parse_json(std::string_view text, const std::string& where, const JsonParseOptions& options = {});

// read_input_file(path, kind) + parse_json(text, path, options).
nlohmann::json read_json_file(const std::string& path, InputKind kind = InputKind::kConfig,
                              const JsonParseOptions& options = {});

// A whole number within [min, max] from a file: an integer, or a float with no fractional part (Python
// writes 5e8 or 3.0); anything else (a string, 1.5, 1e30, NaN) is an Error naming `where`, the value and
// the range. nlohmann's own get<int64_t>() casts a float with a plain static_cast, which is undefined
// behaviour out of range.
int64_t json_integer(const nlohmann::json& value, const std::string& where, int64_t min = std::numeric_limits<int64_t>::min(),
                     int64_t max = std::numeric_limits<int64_t>::max());

// json_integer of object[key], or `fallback` when the key is absent or null. `where` names the file; the
// error adds the key.
int64_t json_integer_field(const nlohmann::json& object, const std::string& key, int64_t fallback, const std::string& where,
                           int64_t min = std::numeric_limits<int64_t>::min(), int64_t max = std::numeric_limits<int64_t>::max());

// "[json.exception.parse_error.101] parse error at ...: ..." -> "parse error at ...: ...".
std::string json_error_text(const nlohmann::json::exception& e);

}  // namespace llava::io
