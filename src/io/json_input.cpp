#include "io/json_input.h"

#include <cmath>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "io/error.h"

namespace llava::io {

using nlohmann::json;

std::string json_error_text(const json::exception& e) {
  std::string text = e.what();
  if (text.rfind("[json.exception.", 0) == 0) {
    const size_t end = text.find("] ");
    if (end != std::string::npos) text.erase(0, end + 2);
  }
  return text;
}

namespace {

// Which element of a top-level array the parser is in: the elements completed so far.
struct ItemTracker {
  bool root_is_array = false;
  size_t done = 0;

  void see(int depth, json::parse_event_t event) {
    if (depth == 0 && event == json::parse_event_t::array_start) root_is_array = true;
    const bool ends_item = depth == 1 && (event == json::parse_event_t::value || event == json::parse_event_t::object_end ||
                                          event == json::parse_event_t::array_end);
    if (root_is_array && ends_item) ++done;
  }
};

std::string shorten(std::string text, size_t max = 80) {
  if (text.size() > max) text = text.substr(0, max) + "...";
  return text;
}

// nlohmann's DOM parser behind our own SAX layer, which sees every event first: the depth limit, the
// caller's hook, duplicate keys. (nlohmann's callback parser would do the same, but after each inner object
// it scans its parent for a discarded value: quadratic in an object's size, 55 s for a 100k-tensor
// safetensors header.) Depths as nlohmann's parser_callback_t counts them.
class BoundedSax final : public json::json_sax_t {
 public:
  using Event = std::function<void(int depth, json::parse_event_t event, json& parsed)>;
  BoundedSax(json& result, Event on_event) : dom_(result), on_event_(std::move(on_event)) {}

  bool null() override { return scalar(nullptr) && dom_.null(); }
  bool boolean(bool v) override { return scalar(v) && dom_.boolean(v); }
  bool number_integer(number_integer_t v) override { return scalar(v) && dom_.number_integer(v); }
  bool number_unsigned(number_unsigned_t v) override { return scalar(v) && dom_.number_unsigned(v); }
  bool number_float(number_float_t v, const string_t& text) override { return scalar(v) && dom_.number_float(v, text); }
  bool string(string_t& v) override { return scalar(v) && dom_.string(v); }
  bool binary(binary_t& v) override { return scalar(json::binary(v)) && dom_.binary(v); }
  bool start_object(std::size_t n) override { return open(json::parse_event_t::object_start) && dom_.start_object(n); }
  bool start_array(std::size_t n) override { return open(json::parse_event_t::array_start) && dom_.start_array(n); }
  bool end_object() override { return close(json::parse_event_t::object_end) && dom_.end_object(); }
  bool end_array() override { return close(json::parse_event_t::array_end) && dom_.end_array(); }
  bool key(string_t& k) override {
    json parsed = k;
    on_event_(depth_, json::parse_event_t::key, parsed);
    if (!keys_.back().insert(k).second) throw DuplicateKey{k};
    return dom_.key(k);
  }
  bool parse_error(std::size_t position, const std::string& token, const nlohmann::detail::exception& e) override {
    return dom_.parse_error(position, token, e);  // throws the parser's exception
  }

  struct DuplicateKey {
    std::string key;
  };

 private:
  bool scalar(json value) {
    on_event_(depth_, json::parse_event_t::value, value);
    return true;
  }
  bool open(json::parse_event_t event) {
    json none;
    on_event_(depth_, event, none);
    ++depth_;
    keys_.emplace_back();
    return true;
  }
  bool close(json::parse_event_t event) {
    --depth_;
    keys_.pop_back();
    json none;
    on_event_(depth_, event, none);
    return true;
  }

  nlohmann::detail::json_sax_dom_parser<json> dom_;
  Event on_event_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;  // of each open container (empty for arrays)
};

}  // namespace

json parse_json(std::string_view text, const std::string& where, const JsonParseOptions& options) {
  ItemTracker items;
  auto here = [&] {
    return !options.item_name.empty() && items.root_is_array ? where + ": " + options.item_name + " " + std::to_string(items.done)
                                                             : where;
  };
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    const bool opens = event == json::parse_event_t::object_start || event == json::parse_event_t::array_start;
    if (opens && depth + 1 > kMaxJsonDepth)  // `depth` counts the containers around the one that opens
      fail(here(), "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels (the limit for input files)");
    if (options.on_event) options.on_event(depth, event, parsed);
    items.see(depth, event);
  };
  json result;
  BoundedSax sax(result, on_event);
  try {
    json::sax_parse(text.data(), text.data() + text.size(), &sax);
  } catch (const json::exception& e) {
    fail(here(), "not valid JSON: " + json_error_text(e));
  } catch (const BoundedSax::DuplicateKey& d) {
    fail(here(), "key '" + shorten(d.key) + "' appears twice in one object (only one of the values could be used)");
  }
  return result;
}

json read_json_file(const std::string& path, InputKind kind, const JsonParseOptions& options) {
  return parse_json(read_input_file(path, kind), path, options);
}

int64_t json_integer(const json& value, const std::string& where, int64_t min, int64_t max) {
  auto refuse = [&]() -> int64_t {
    const bool full_range = min == std::numeric_limits<int64_t>::min() && max == std::numeric_limits<int64_t>::max();
    fail(where, "expected " + (full_range ? std::string("a 64-bit integer") : "an integer from " + std::to_string(min) + " to " + std::to_string(max)) +
                    ", got " + shorten(value.dump()));
  };
  int64_t v = 0;
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return refuse();
    v = static_cast<int64_t>(u);
  } else if (value.is_number_integer()) {
    v = value.get<int64_t>();
  } else if (value.is_number_float()) {
    const double d = value.get<double>();
    // 2^63 is exact in a double; only below it (and at or above -2^63) does the cast have a result.
    if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || d != std::floor(d)) return refuse();
    v = static_cast<int64_t>(d);
  } else {
    return refuse();
  }
  if (v < min || v > max) return refuse();
  return v;
}

int64_t json_integer_field(const json& object, const std::string& key, int64_t fallback, const std::string& where,
                           int64_t min, int64_t max) {
  if (!object.is_object()) fail(where, "expected a JSON object, got " + std::string(object.type_name()));
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  return json_integer(*it, where + ": '" + key + "'", min, max);
}

}  // namespace llava::io
