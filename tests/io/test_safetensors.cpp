// safetensors: round trips of every dtype, zero-copy views, sharding, and every malformed header we refuse.
#include <catch2/catch.hpp>
#include <filesystem>

#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "test_helpers.h"

using namespace llava;
namespace fs = std::filesystem;

static io::NamedTensors every_dtype() {
  auto base = torch::arange(-6, 6, torch::kFloat64).reshape({3, 4}) / 3.0;
  return {{"f32", base.to(torch::kFloat32)},
          {"f16", base.to(torch::kFloat16)},
          {"bf16", base.to(torch::kBFloat16)},
          {"f64", base},
          {"i64", (base * 1e6).to(torch::kInt64)},
          {"i32", (base * 1e5).to(torch::kInt32)},
          {"i16", (base * 100).to(torch::kInt16)},
          {"i8", (base * 10).to(torch::kInt8)},
          {"u8", (base * 10 + 30).to(torch::kUInt8)},
          {"bool", base > 0},
          {"scalar", torch::tensor(2.5f)},
          {"empty", torch::empty({0, 7}, torch::kFloat32)},
          {"ünïcode/名前.weight", torch::ones({2})}};
}

static bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
}

TEST_CASE("safetensors round trip keeps every dtype shape name and metadata bit for bit") {
  auto dir = test::temp_dir("st-roundtrip");
  auto path = dir + "/all.safetensors";
  auto tensors = every_dtype();
  io::save_safetensors(path, tensors, {{"format", "pt"}, {"note", "ok"}});
  auto file = io::SafetensorsFile::open(path);
  REQUIRE(file.tensors().size() == tensors.size());
  for (auto& [name, t] : tensors) {
    INFO(name);
    CHECK(bit_equal(file.get(name), t));
  }
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.metadata().at("note") == "ok");
  // The header is padded with spaces so the data section starts 8-byte aligned.
  auto bytes = io::read_file(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  CHECK(n % 8 == 0);
  CHECK(bytes[8 + n - 1] == ' ');
}

TEST_CASE("safetensors get() views the mapped bytes without copying") {
  auto dir = test::temp_dir("st-view");
  io::save_safetensors(dir + "/v.safetensors", {{"w", torch::randn({64, 64})}});
  auto file = io::SafetensorsFile::open(dir + "/v.safetensors");
  auto a = file.get("w"), b = file.get("w");
  CHECK(a.data_ptr() == b.data_ptr());  // both views of the one mapping
  a.mul_(2);                            // private mapping: writable, never reaches the file
  CHECK(bit_equal(io::SafetensorsFile::open(dir + "/v.safetensors").get("w") * 2, a));
}

TEST_CASE("sharded save splits by size in order, writes an index, and reads back") {
  auto dir = test::temp_dir("st-sharded");
  io::NamedTensors tensors;
  for (int i = 0; i < 5; ++i) tensors.emplace_back("layer." + std::to_string(i), torch::full({10}, float(i)));  // 40 B each
  auto written = io::save_sharded(dir, tensors, 100);  // 2 tensors per shard -> 3 shards
  REQUIRE(written.size() == 4);
  CHECK(fs::exists(dir + "/model-00001-of-00003.safetensors"));
  CHECK(fs::exists(dir + "/model-00003-of-00003.safetensors"));
  auto index = nlohmann::json::parse(io::read_file(dir + "/model.safetensors.index.json"));
  CHECK(index["metadata"]["total_size"] == 200);
  CHECK(index["weight_map"]["layer.4"] == "model-00003-of-00003.safetensors");
  auto model = io::ShardedSafetensors::open(dir);
  REQUIRE(model.names().size() == 5);
  for (auto& [name, t] : tensors) CHECK(bit_equal(model.get(name), t));

  auto single = test::temp_dir("st-single");
  io::save_sharded(single, tensors, io::parse_size("5GB"));
  CHECK(fs::exists(single + "/model.safetensors"));
  CHECK_FALSE(fs::exists(single + "/model.safetensors.index.json"));
  CHECK(io::ShardedSafetensors::open(single).names().size() == 5);
}

TEST_CASE("parse_size uses decimal units like huggingface_hub") {
  CHECK(io::parse_size("5GB") == 5'000'000'000ULL);
  CHECK(io::parse_size("200MB") == 200'000'000ULL);
  CHECK(io::parse_size("10KB") == 10'000ULL);
  CHECK(io::parse_size("2GiB") == 2ULL * 1024 * 1024 * 1024);
  CHECK(io::parse_size("123") == 123);
  CHECK_THROWS_AS(io::parse_size("5 parsecs"), Error);
}

TEST_CASE("parse_size refuses sizes with no uint64 value instead of wrapping them") {
  for (const char* text : {"1e30GB", "99999999999999999999", "10000000000000000000GB", "nanGB", "infGB", "-1", "-0.5KB"}) {
    INFO(text);
    CHECK_THROWS_WITH(io::parse_size(text), Catch::Contains(std::string("size '") + text + "'"));
  }
  CHECK(io::parse_size("0") == 0);
  CHECK(io::parse_size("1e-300GB") == 0);  // rounds down to nothing: a valid (empty) size
  CHECK(io::parse_size("9e18") == 9'000'000'000'000'000'000ULL);
}

// A file = 8-byte little-endian header length + header + data.
static std::string st_bytes(const std::string& header, const std::string& data, int64_t claimed_len = -1) {
  uint64_t n = claimed_len < 0 ? header.size() : static_cast<uint64_t>(claimed_len);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

TEST_CASE("malformed safetensors files give one error naming the file and the fault") {
  auto dir = test::temp_dir("st-bad");
  struct Case {
    const char* name;
    std::string bytes;
    const char* fault;
  };
  const std::string ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::vector<Case> cases = {
      {"empty", "", "truncated"},
      {"short", "abc", "truncated"},
      {"len-past-end", st_bytes(ok_header, std::string(8, '\0'), 4096), "runs past the end"},
      {"absurd-header", st_bytes("{}", "", 1ULL << 40), "exceeds the limit"},
      {"bad-json", st_bytes("{\"a\": [1, 2", ""), "not valid JSON"},
      {"not-object", st_bytes("[1,2]", ""), "must be a JSON object"},
      {"bad-dtype", st_bytes(R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')), "unsupported dtype 'Q7'"},
      {"byte-mismatch", st_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')), "byte-count mismatch"},
      {"overlap", st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')), "overlap"},
      {"hole", st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')), "hole"},
      {"out-of-range", st_bytes(ok_header, std::string(4, '\0')), "run past the end"},
      {"trailing", st_bytes(ok_header, std::string(12, '\0')), "trailing bytes"},
      {"duplicate", st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')), "duplicate tensor name 'a'"},
      {"huge-shape", st_bytes(R"({"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}})", std::string(8, '\0')), "overflows"},
      {"negative-offset", st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", ""), "non-negative"},
      {"metadata-not-string", st_bytes(R"({"__metadata__":{"format":1}})", ""), "must be a string"},
  };
  for (auto& c : cases) {
    INFO(c.name);
    auto path = dir + "/" + c.name + ".safetensors";
    test::write_bytes(path, c.bytes);
    try {
      io::SafetensorsFile::open(path);
      FAIL("no error for " << c.name);
    } catch (const Error& e) {
      std::string msg = e.what();
      CHECK(msg.find(path) != std::string::npos);
      CHECK(msg.find(c.fault) != std::string::npos);
    }
  }
}

TEST_CASE("a sharded index pointing at missing tensors, bad files or paths outside the directory is refused") {
  auto dir = test::temp_dir("st-bad-index");
  io::save_safetensors(dir + "/model-00001-of-00001.safetensors", {{"a", torch::ones({2})}});
  auto index_path = dir + "/model.safetensors.index.json";
  auto expect_error = [&](const std::string& index, const std::string& fault) {
    test::write_bytes(index_path, index);
    try {
      io::ShardedSafetensors::open(dir);
      FAIL("no error for " << index);
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find(fault) != std::string::npos);
    }
  };
  expect_error("{not json", "not valid JSON");
  expect_error(R"({"metadata":{}})", "weight_map");
  expect_error(R"({"weight_map":{"b":"model-00001-of-00001.safetensors"}})", "has no such tensor");
  expect_error(R"({"weight_map":{"a":"../../etc/passwd"}})", "not a plain file name");
  expect_error(R"({"weight_map":{"a":"missing.safetensors"}})", "missing.safetensors");
}
