#include "io/torch_archive.h"

#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/error.h"
#include "io/file_util.h"
#include "io/pickle.h"

namespace llava::io {
namespace {

// A zip structure that does not hold together, in the words every unreadable archive gets.
[[noreturn]] void bad_archive(const std::string& path, const std::string& what) {
  fail(path, "not a readable torch.save archive: " + what);
}

// Little-endian fields of the zip structures (APPNOTE.TXT sections 4.3.12-4.3.16).
uint64_t le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string read_at(std::ifstream& in, const std::string& path, uint64_t offset, uint64_t size) {
  std::string bytes(size, '\0');
  in.seekg(static_cast<std::streamoff>(offset));
  if (!in.read(bytes.data(), static_cast<std::streamsize>(size))) bad_archive(path, "zip structure runs past the end of the file");
  return bytes;
}

struct CentralDirectory {
  uint64_t offset = 0, size = 0, entries = 0;
};

constexpr uint64_t kMaxCentralDirectory = 64ull << 20;  // ~600k records; a 7B checkpoint needs ~30 KB

// The end-of-central-directory record (zip64's when the classic one is saturated), found as the
// reader finds it: the last signature within the trailing 64 KiB comment window.
CentralDirectory locate_central_directory(std::ifstream& in, const std::string& path, uint64_t file_size) {
  const uint64_t window = std::min<uint64_t>(file_size, 22 + 65535);
  const std::string tail = read_at(in, path, file_size - window, window);
  const auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  for (int64_t i = static_cast<int64_t>(window) - 22; i >= 0; --i) {
    if (le(t + i, 4) != 0x06054b50) continue;
    CentralDirectory cd{le(t + i + 16, 4), le(t + i + 12, 4), le(t + i + 10, 2)};
    const bool zip64 = cd.offset == 0xffffffffu || cd.size == 0xffffffffu || cd.entries == 0xffff;
    if (!zip64) return cd;
    const uint64_t eocd = file_size - window + static_cast<uint64_t>(i);
    if (eocd < 20) bad_archive(path, "zip64 end record is missing its locator");
    const std::string locator = read_at(in, path, eocd - 20, 20);
    const auto* l = reinterpret_cast<const unsigned char*>(locator.data());
    if (le(l, 4) != 0x07064b50) bad_archive(path, "zip64 end record is missing its locator");
    const uint64_t record_at = le(l + 8, 8);
    if (record_at > file_size || file_size - record_at < 56) bad_archive(path, "zip64 end record lies outside the file");
    const std::string record = read_at(in, path, record_at, 56);
    const auto* r = reinterpret_cast<const unsigned char*>(record.data());
    if (le(r, 4) != 0x06064b50) bad_archive(path, "zip64 end record has a bad signature");
    return {le(r + 48, 8), le(r + 40, 8), le(r + 32, 8)};
  }
  bad_archive(path, "not a zip archive: no end-of-central-directory record");
}

// The size a zip64 extra field gives for a saturated 32-bit field (they appear in a fixed order, each
// only when its classic field is 0xffffffff).
void apply_zip64_extra(const unsigned char* extra, uint64_t extra_len, uint64_t& uncompressed, uint64_t& compressed) {
  for (uint64_t at = 0; at + 4 <= extra_len;) {
    const uint64_t id = le(extra + at, 2), len = le(extra + at + 2, 2);
    if (at + 4 + len > extra_len) return;
    if (id == 0x0001) {
      uint64_t field = at + 4;
      for (uint64_t* value : {&uncompressed, &compressed}) {
        if (*value != 0xffffffffu) continue;
        if (field + 8 > at + 4 + len) return;
        *value = le(extra + field, 8);
        field += 8;
      }
      return;
    }
    at += 4 + len;
  }
}

// libtorch's PyTorchStreamReader allocates a record at the size its zip header declares before anything
// is checked (a hostile header asking for 4 GiB ended the process), so every record's declared sizes are
// checked against the file first: no record of a real archive is larger than the file holding it.
void check_record_sizes(const std::string& path, uint64_t file_size) {
  std::ifstream in(path, std::ios::binary);
  const CentralDirectory cd = locate_central_directory(in, path, file_size);
  if (cd.offset > file_size || cd.size > file_size - cd.offset) bad_archive(path, "zip central directory lies outside the file");
  if (cd.size > kMaxCentralDirectory)
    bad_archive(path, "zip central directory of " + std::to_string(cd.size) + " bytes, expected at most " +
                   std::to_string(kMaxCentralDirectory));
  const std::string dir = read_at(in, path, cd.offset, cd.size);
  const auto* d = reinterpret_cast<const unsigned char*>(dir.data());
  uint64_t at = 0;
  for (uint64_t entry = 0; entry < cd.entries; ++entry) {
    if (cd.size - at < 46 || le(d + at, 4) != 0x02014b50) bad_archive(path, "zip central directory entry " + std::to_string(entry) + " is malformed");
    const uint64_t name_len = le(d + at + 28, 2), extra_len = le(d + at + 30, 2), comment_len = le(d + at + 32, 2);
    if (cd.size - at - 46 < name_len + extra_len + comment_len)
      bad_archive(path, "zip central directory entry " + std::to_string(entry) + " runs past the directory");
    uint64_t compressed = le(d + at + 20, 4), uncompressed = le(d + at + 24, 4);
    apply_zip64_extra(d + at + 46 + name_len, extra_len, uncompressed, compressed);
    const std::string name(dir, at + 46, name_len);
    if (uncompressed > file_size || compressed > file_size)
      bad_archive(path, "record '" + name + "' declares " + std::to_string(std::max(uncompressed, compressed)) +
                     " bytes, more than the whole file (" + std::to_string(file_size) + " bytes)");
    at += 46 + name_len + extra_len + comment_len;
  }
}

}  // namespace

bool is_zip_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "PK\x03\x04", 4) == 0;
}

void save_pt(const std::string& path, const c10::IValue& value) {
  std::vector<torch::Tensor> storages;
  const std::string pickled = pickle::dumps(value, storages);
  write_file_atomic(path, [&](std::FILE* file) {
    // A short count would make the writer throw, and a writer destroyed during that unwinding may throw
    // again (std::terminate). So a failed write is remembered and reported after the writer is done.
    int write_errno = 0;
    auto writer_fn = [&](const void* data, size_t n) -> size_t {
      if (n == 0 || write_errno) return n;
      if (std::fwrite(data, 1, n, file) != n) write_errno = errno ? errno : EIO;
      return n;
    };
    try {
      // Archive folder "archive/", as torch.save names it when writing to a stream. No CRC32 per record
      // (as torch.save after set_crc32_options(False)): it costs a pass over every byte, and neither
      // torch.load (weights_only or not) nor PyTorchStreamReader checks it.
      auto writer = std::make_unique<caffe2::serialize::PyTorchStreamWriter>(writer_fn, /*compute_crc32=*/false);
      writer->writeRecord("data.pkl", pickled.data(), pickled.size());
      writer->writeRecord("byteorder", "little", 6);
      for (size_t i = 0; i < storages.size(); ++i)
        writer->writeRecord("data/" + std::to_string(i), storages[i].data_ptr(),
                            storages[i].numel() * storages[i].element_size());
      writer->writeEndOfFile();
    } catch (const c10::Error& e) {
      fail(path, std::string("write failed: ") + e.what_without_backtrace());
    }
    if (write_errno) fail(path, std::string("write failed: ") + std::strerror(write_errno));
  });
}

c10::IValue load_pt(const std::string& path, pickle::Globals globals) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) fail(path, "no such file");
  if (!std::filesystem::is_regular_file(status))
    fail(path, std::filesystem::is_directory(status) ? "a directory, not a torch.save file"
                                                     : "not a regular file (a device, FIFO or socket), not a torch.save file");
  if (!is_zip_file(path)) fail(path, "not a torch.save zip archive (expected it to start with PK\\x03\\x04)");
  const uint64_t file_size = std::filesystem::file_size(path);
  check_record_sizes(path, file_size);
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("data.pkl")) fail(path, "archive has no data.pkl record");
    auto [pkl_ptr, pkl_size] = reader.getRecord("data.pkl");
    std::string pickled(static_cast<const char*>(pkl_ptr.get()), pkl_size);

    auto load_storage = [&](const pickle::StorageRef& ref) {
      const std::string record = "data/" + ref.key;
      if (!reader.hasRecord(record)) fail(path, "archive is missing record '" + record + "'");
      const uint64_t want = static_cast<uint64_t>(ref.numel) * c10::elementSize(ref.dtype);
      if (ref.numel > 0 && want / ref.numel != c10::elementSize(ref.dtype)) fail(path, "storage size overflows");
      if (want > file_size)
        fail(path, "storage '" + ref.key + "' claims " + std::to_string(want) + " bytes, more than the whole file");
      auto storage = torch::empty({ref.numel}, torch::TensorOptions().dtype(ref.dtype));
      const size_t size = reader.getRecordSize(record);  // read straight into the tensor when it fits
      if (size == want && want > 0) reader.getRecord(record, storage.data_ptr(), want);
      if (size != want)
        fail(path, "record '" + record + "' holds " + std::to_string(size) + " bytes, its storage needs " + std::to_string(want));
      return storage;
    };
    return pickle::loads(pickled, load_storage, path, globals);
  } catch (const c10::Error& e) {
    fail(path, std::string("not a readable torch.save archive: ") + e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    fail(path, "archive declares a record too large to load");
  }
}

}  // namespace llava::io
