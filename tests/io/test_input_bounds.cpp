// The bounded input layer: read_input_file refuses what is not a regular file and files over their
// kind's limit before reading; parse_json refuses nesting deeper than kMaxJsonDepth while parsing (a
// 100k-deep value would otherwise overflow the stack in any recursive walk) and names the file, the
// record and the fault; json_integer refuses numbers that do not fit.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"
#include "io/test_helpers.h"

using namespace llava;
using Catch::Matchers::Contains;
using test::error_of;

namespace {

std::string nested(const std::string& open, const std::string& close, int depth, const std::string& inner = "1") {
  std::string s;
  for (int i = 0; i < depth; ++i) s += open;
  s += inner;
  for (int i = 0; i < depth; ++i) s += close;
  return s;
}

}  // namespace

TEST_CASE("read_input_file reads a regular file whole") {
  const std::string dir = test::temp_dir("input-bounds-read");
  const std::string path = dir + "/config.json";
  test::write_bytes(path, std::string("{\"a\": 1}\n") + std::string(1000, ' '));
  CHECK(io::read_input_file(path, io::InputKind::kConfig).size() == 1009);
  test::write_bytes(path, "");
  CHECK(io::read_input_file(path, io::InputKind::kConfig).empty());
}

TEST_CASE("read_input_file refuses directories, FIFOs and devices without reading or blocking") {
  const std::string dir = test::temp_dir("input-bounds-kinds");
  std::string msg = error_of([&] { io::read_input_file(dir, io::InputKind::kImage); });
  CHECK_THAT(msg, Contains(dir) && Contains("a directory") && Contains("regular image file"));
  const std::string fifo = dir + "/pipe.png";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  msg = error_of([&] { io::read_input_file(fifo, io::InputKind::kImage); });  // no writer: would block without O_NONBLOCK
  CHECK_THAT(msg, Contains("pipe.png") && Contains("a FIFO"));
  msg = error_of([&] { io::read_input_file("/dev/zero", io::InputKind::kDataset); });
  CHECK_THAT(msg, Contains("/dev/zero") && Contains("a character device") && Contains("regular data file"));
  msg = error_of([&] { io::read_input_file(dir + "/missing.json", io::InputKind::kConfig); });
  CHECK_THAT(msg, Contains("missing.json") && Contains("No such file"));
}

TEST_CASE("read_input_file refuses a file over its kind's limit from its size alone") {
  const std::string dir = test::temp_dir("input-bounds-size");
  struct Case {
    io::InputKind kind;
    uint64_t limit;
    const char* name;
  };
  for (const Case& c : {Case{io::InputKind::kConfig, io::kMaxConfigFileBytes, "config file"},
                        Case{io::InputKind::kDataset, io::kMaxDatasetFileBytes, "data file"},
                        Case{io::InputKind::kTokenizerModel, io::kMaxTokenizerModelFileBytes, "tokenizer model"},
                        Case{io::InputKind::kImage, io::kMaxImageFileBytes, "image file"}}) {
    CHECK(io::max_input_bytes(c.kind) == c.limit);
    const std::string path = dir + "/sparse";
    test::write_bytes(path, "");
    REQUIRE(::truncate(path.c_str(), static_cast<off_t>(c.limit + 1)) == 0);  // sparse: no disk used
    const std::string msg = error_of([&] { io::read_input_file(path, c.kind); });
    CHECK_THAT(msg, Contains(path) && Contains(std::to_string(c.limit + 1) + " bytes") &&
                        Contains("limit of " + std::to_string(c.limit)) && Contains(c.name));
  }
  // Exactly at the limit is allowed (the smallest limit, so that the test stays cheap).
  const std::string at_limit = dir + "/at_limit";
  test::write_bytes(at_limit, "");
  REQUIRE(::truncate(at_limit.c_str(), static_cast<off_t>(io::kMaxTokenizerModelFileBytes)) == 0);
  CHECK(io::read_input_file(at_limit, io::InputKind::kTokenizerModel).size() == io::kMaxTokenizerModelFileBytes);
}

TEST_CASE("parse_json accepts nesting up to the limit and refuses one level more, objects or arrays") {
  CHECK(io::parse_json(nested("[", "]", io::kMaxJsonDepth), "f.json").is_array());
  CHECK(io::parse_json(nested("{\"a\":", "}", io::kMaxJsonDepth), "f.json").is_object());
  for (int depth : {io::kMaxJsonDepth + 1, 1000, 100000}) {
    for (auto [open, close] : {std::pair<std::string, std::string>{"[", "]"}, {"{\"k\":", "}"}, {"[{\"x\":", "}]"}}) {
      const std::string msg = error_of([&] { io::parse_json(nested(open, close, depth), "deep.json"); });
      CHECK_THAT(msg, Contains("deep.json") && Contains("nested deeper than 64 levels"));
    }
  }
  // Unclosed: refused at the depth limit, not at the end of the text.
  const std::string msg = error_of([&] { io::parse_json(std::string(200000, '['), "open.json"); });
  CHECK_THAT(msg, Contains("open.json") && Contains("nested deeper"));
}

TEST_CASE("parse_json names the record of a top-level list and wraps the parser's message") {
  io::JsonParseOptions options;
  options.item_name = "record";
  const std::string list = "[{\"id\": 1}, 2, [3], " + nested("{\"a\":", "}", 500) + "]";
  std::string msg = error_of([&] { io::parse_json(list, "data.json", options); });
  CHECK_THAT(msg, Contains("data.json: record 3: JSON nested deeper than 64 levels"));
  msg = error_of([&] { io::parse_json("[1, 2, {\"a\": tru}]", "data.json", options); });
  CHECK_THAT(msg, Contains("data.json: record 2: not valid JSON: parse error at line 1"));
  CHECK_THAT(msg, !Contains("[json.exception"));
  msg = error_of([&] { io::parse_json("{\"a\": ", "config.json"); });
  CHECK_THAT(msg, Contains("config.json: not valid JSON: parse error"));
  msg = error_of([&] { io::parse_json("", "empty.json"); });
  CHECK_THAT(msg, Contains("empty.json: not valid JSON"));
}

TEST_CASE("parse_json passes events to the caller's hook, whose Error stops the parse") {
  io::JsonParseOptions options;
  int keys = 0;
  options.on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 && ++keys == 2) fail("hook.json", "second key");
  };
  CHECK(io::parse_json("{\"a\": {\"b\": 1}}", "hook.json", options)["a"]["b"] == 1);
  keys = 0;
  CHECK_THAT(error_of([&] { io::parse_json("{\"a\": 1, \"b\": 2}", "hook.json", options); }), Contains("second key"));
}

TEST_CASE("read_json_file bounds the file and the nesting") {
  const std::string dir = test::temp_dir("input-bounds-json");
  const std::string path = dir + "/trainer_state.json";
  test::write_bytes(path, "{\"global_step\": 7, \"log_history\": [" + nested("[", "]", 100000) + "]}");
  CHECK_THAT(error_of([&] { io::read_json_file(path); }), Contains(path) && Contains("nested deeper"));
  test::write_bytes(path, "{\"global_step\": 7}");
  CHECK(io::read_json_file(path)["global_step"] == 7);
}

TEST_CASE("json_integer takes whole numbers in range and refuses the rest with the value") {
  using nlohmann::json;
  CHECK(io::json_integer(json(5), "f") == 5);
  CHECK(io::json_integer(json::parse("5e8"), "f") == 500000000);
  CHECK(io::json_integer(json::parse("-3.0"), "f", -5, 5) == -3);
  CHECK(io::json_integer(json::parse("9223372036854775807"), "f") == INT64_MAX);
  for (const char* bad : {"1e30", "-1e30", "1.5", "\"7\"", "null", "[1]", "18446744073709551615", "9223372036854775808.0"})
    CHECK_THAT(error_of([&] { io::json_integer(json::parse(bad), "state.json: global_step"); }),
               Contains("state.json: global_step: expected a 64-bit integer, got"));
  CHECK_THAT(error_of([&] { io::json_integer(json(-5), "state.json: global_step", 0, 100); }),
             Contains("expected an integer from 0 to 100, got -5"));
  const json object = {{"n", 3}, {"z", nullptr}};
  CHECK(io::json_integer_field(object, "n", 9, "f", 0, 10) == 3);
  CHECK(io::json_integer_field(object, "z", 9, "f", 0, 10) == 9);
  CHECK(io::json_integer_field(object, "missing", 9, "f", 0, 10) == 9);
  CHECK_THAT(error_of([&] { io::json_integer_field(object, "n", 9, "cfg.json", 5, 10); }), Contains("cfg.json: 'n': expected an integer from 5 to 10, got 3"));
}

TEST_CASE("parse_json refuses a key given twice in any object, naming the key and the record") {
  io::JsonParseOptions options;
  options.item_name = "record";
  const std::string list = R"([{"id": "a", "image": "x.png"}, {"id": "dup", "image": "1.png", "image": "2.png"}])";
  CHECK_THAT(error_of([&] { io::parse_json(list, "data.json", options); }),
             Contains("data.json: record 1: key 'image' appears twice in one object"));
  CHECK_THAT(error_of([&] { io::parse_json(R"({"a": {"b": 1, "c": {"d": 1, "d": 2}}})", "config.json"); }),
             Contains("config.json: key 'd' appears twice"));
  // The same key in different objects, and in sibling objects of a list, is fine.
  CHECK(io::parse_json(R"([{"a": 1}, {"a": 2}, {"b": {"a": 3}, "a": 4}])", "ok.json")[2]["a"] == 4);
}

TEST_CASE("parse_json takes time linear in an object's size (100k keys)") {
  std::string text = "{";
  for (int i = 0; i < 100000; ++i)
    text += (i ? ",\"t" : "\"t") + std::to_string(i) + R"(": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})";
  text += "}";
  // nlohmann's callback parser took ~55 s here (a parent scan after every inner object); this is one pass.
  const auto parsed = io::parse_json(text, "many.json");
  CHECK(parsed.size() == 100000);
  CHECK(parsed["t99999"]["dtype"] == "F32");
}
