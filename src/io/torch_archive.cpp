#include "io/torch_archive.h"

#include <caffe2/serialize/inline_container.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/error.h"
#include "io/file_util.h"
#include "io/pickle.h"

namespace llava::io {

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
  if (!std::filesystem::is_regular_file(path)) fail(path, "no such file");
  if (!is_zip_file(path)) fail(path, "not a torch.save zip archive (expected it to start with PK\\x03\\x04)");
  const uint64_t file_size = std::filesystem::file_size(path);
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
