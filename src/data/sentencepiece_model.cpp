#include "data/sentencepiece_model.h"

#include <dlfcn.h>

#include <cstdlib>

#include "data/sentencepiece_check.h"
#include "data/spm/spm_shim.h"
#include "io/error.h"

namespace llava::data {
namespace {

struct ShimApi {
  decltype(&llava_spm_load) load;
  decltype(&llava_spm_free) free;
  decltype(&llava_spm_piece_size) piece_size;
  decltype(&llava_spm_encode) encode;
  decltype(&llava_spm_decode) decode;
  decltype(&llava_spm_id_to_piece) id_to_piece;
  decltype(&llava_spm_piece_to_id) piece_to_id;
  decltype(&llava_spm_train) train;
  decltype(&llava_spm_free_bytes) free_bytes;
};

const ShimApi& shim() {
  static const ShimApi api = [] {
    const char* env = std::getenv("LLAVA_SPM_SHIM");
    const std::string path = env && *env ? env : LLAVA_SPM_SHIM_PATH;
    // DEEPBIND: sentencepiece resolves its bundled protobuf symbols inside its own library.
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (!lib) throw Error(path + ": cannot load the sentencepiece shim: " + dlerror());
    auto sym = [&](const char* name) {
      void* f = dlsym(lib, name);
      if (!f) throw Error(path + ": missing symbol " + name);
      return f;
    };
    ShimApi a;
    a.load = reinterpret_cast<decltype(a.load)>(sym("llava_spm_load"));
    a.free = reinterpret_cast<decltype(a.free)>(sym("llava_spm_free"));
    a.piece_size = reinterpret_cast<decltype(a.piece_size)>(sym("llava_spm_piece_size"));
    a.encode = reinterpret_cast<decltype(a.encode)>(sym("llava_spm_encode"));
    a.decode = reinterpret_cast<decltype(a.decode)>(sym("llava_spm_decode"));
    a.id_to_piece = reinterpret_cast<decltype(a.id_to_piece)>(sym("llava_spm_id_to_piece"));
    a.piece_to_id = reinterpret_cast<decltype(a.piece_to_id)>(sym("llava_spm_piece_to_id"));
    a.train = reinterpret_cast<decltype(a.train)>(sym("llava_spm_train"));
    a.free_bytes = reinterpret_cast<decltype(a.free_bytes)>(sym("llava_spm_free_bytes"));
    return a;
  }();
  return api;
}

}  // namespace

SentencePieceModel::SentencePieceModel(const std::string& proto, bool dummy_prefix, const std::string& where)
    : where_(where) {
  check_sentencepiece_proto(proto, where);  // what libsentencepiece would trust unchecked (a crash, not an error)
  char err[512] = {0};
  handle_ = shim().load(proto.data(), proto.size(), dummy_prefix ? 0 : 1, err, sizeof(err));
  if (!handle_) fail(where, std::string("not a sentencepiece model: ") + err);
}

SentencePieceModel::~SentencePieceModel() {
  if (handle_) shim().free(handle_);
}

std::vector<Piece> SentencePieceModel::encode(const std::string& text) const {
  std::vector<int64_t> triples(3 * (text.size() + 8));  // pieces never outnumber bytes (+ dummy prefix)
  long n = shim().encode(handle_, text.data(), text.size(), triples.data(), static_cast<long>(triples.size() / 3));
  if (n < 0) fail(where_, "sentencepiece could not encode the text");
  if (static_cast<size_t>(n) > triples.size() / 3) {
    triples.resize(3 * n);
    n = shim().encode(handle_, text.data(), text.size(), triples.data(), n);
  }
  std::vector<Piece> pieces(n);
  for (long i = 0; i < n; ++i)
    pieces[i] = {triples[3 * i], static_cast<size_t>(triples[3 * i + 1]), static_cast<size_t>(triples[3 * i + 2])};
  return pieces;
}

std::string SentencePieceModel::decode(const std::vector<int>& ids) const {
  std::string out(ids.size() * 8 + 16, '\0');
  long n = shim().decode(handle_, ids.data(), ids.size(), out.data(), out.size());
  if (n < 0) fail(where_, "sentencepiece could not decode the ids");
  if (static_cast<size_t>(n) > out.size()) {
    out.resize(n);
    shim().decode(handle_, ids.data(), ids.size(), out.data(), out.size());
  }
  out.resize(n);
  return out;
}

int SentencePieceModel::piece_size() const { return shim().piece_size(handle_); }

std::string SentencePieceModel::id_to_piece(int id) const {
  std::string out(64, '\0');
  long n = shim().id_to_piece(handle_, id, out.data(), out.size());
  if (static_cast<size_t>(n) > out.size()) {
    out.resize(n);
    shim().id_to_piece(handle_, id, out.data(), out.size());
  }
  out.resize(n);
  return out;
}

int SentencePieceModel::piece_to_id(const std::string& piece) const {
  return shim().piece_to_id(handle_, piece.data(), piece.size());
}

std::string train_sentencepiece(const std::vector<std::string>& sentences,
                                const std::vector<std::pair<std::string, std::string>>& options,
                                const std::string& where) {
  std::vector<const char*> lines;
  std::vector<size_t> sizes;
  for (auto& s : sentences) lines.push_back(s.data()), sizes.push_back(s.size());
  std::vector<const char*> flags;
  for (auto& [key, value] : options) flags.push_back(key.c_str()), flags.push_back(value.c_str());
  char* proto = nullptr;
  size_t proto_size = 0;
  char err[512] = {0};
  if (shim().train(lines.data(), sizes.data(), lines.size(), flags.data(), options.size(), &proto, &proto_size, err,
                   sizeof(err)) != 0)
    fail(where, std::string("sentencepiece training failed: ") + err);
  std::string bytes(proto, proto_size);
  shim().free_bytes(proto);
  return bytes;
}

}  // namespace llava::data
