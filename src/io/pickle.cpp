#include "io/pickle.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>
#include <set>
#include <unordered_set>

#include "io/error.h"

namespace llava::io::pickle {

namespace op {
enum : uint8_t {
  MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', DUP = '2', BINFLOAT = 'G', BININT = 'J', BININT1 = 'K',
  BININT2 = 'M', NONE = 'N', BINPERSID = 'Q', REDUCE = 'R', BINSTRING = 'T', SHORT_BINSTRING = 'U',
  BINUNICODE = 'X', APPEND = 'a', BUILD = 'b', GLOBAL = 'c', APPENDS = 'e', BINGET = 'h', LONG_BINGET = 'j',
  EMPTY_LIST = ']', BINPUT = 'q', LONG_BINPUT = 'r', SETITEM = 's', TUPLE = 't', EMPTY_TUPLE = ')',
  SETITEMS = 'u', EMPTY_DICT = '}', PROTO = 0x80, NEWOBJ = 0x81, TUPLE1 = 0x85, TUPLE2 = 0x86, TUPLE3 = 0x87,
  NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b, SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d,
  MEMOIZE = 0x94, FRAME = 0x95,
};
}  // namespace op

// The storage classes torch.save names, one per dtype we read and write.
static const std::vector<std::pair<std::string, c10::ScalarType>>& storage_types() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> table = {
      {"FloatStorage", torch::kFloat32}, {"DoubleStorage", torch::kFloat64}, {"HalfStorage", torch::kFloat16},
      {"BFloat16Storage", torch::kBFloat16}, {"LongStorage", torch::kInt64}, {"IntStorage", torch::kInt32},
      {"ShortStorage", torch::kInt16}, {"CharStorage", torch::kInt8}, {"ByteStorage", torch::kUInt8},
      {"BoolStorage", torch::kBool}};
  return table;
}

c10::impl::GenericDict new_dict() { return c10::impl::GenericDict(c10::AnyType::get(), c10::AnyType::get()); }
c10::impl::GenericList new_list() { return c10::impl::GenericList(c10::AnyType::get()); }

namespace {
// What numpy_array() makes: carried through IValues as a capsule, which only the writer knows.
struct NumpyArray : torch::CustomClassHolder {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string data;
};
}  // namespace

c10::IValue numpy_array(const std::string& dtype, const std::vector<int64_t>& shape, std::string data) {
  static const std::set<std::string> codes = {"u1", "i1", "b1", "u2", "i2", "u4", "i4", "f4", "u8", "i8", "f8"};
  if (!codes.count(dtype)) throw Error("numpy_array: unsupported dtype '" + dtype + "'");
  int64_t numel = 1;
  for (auto n : shape) numel *= n;
  if (static_cast<int64_t>(data.size()) != numel * (dtype == "b1" ? 1 : std::stoi(dtype.substr(1))))
    throw Error("numpy_array: " + std::to_string(data.size()) + " bytes do not hold " + std::to_string(numel) +
                " elements of " + dtype);
  auto array = c10::make_intrusive<NumpyArray>();
  array->dtype = dtype;
  array->shape = shape;
  array->data = std::move(data);
  return c10::IValue::make_capsule(std::move(array));
}

// ============================================================================================ writer

namespace {

class Writer {
 public:
  explicit Writer(std::vector<torch::Tensor>& storages) : storages_(storages) {}

  std::string finish(const c10::IValue& value) {
    put(op::PROTO);
    put(2);
    write(value);
    put(op::STOP);
    return std::move(out_);
  }

 private:
  void put(uint8_t byte) { out_.push_back(static_cast<char>(byte)); }
  void put_bytes(const void* data, size_t n) { out_.append(static_cast<const char*>(data), n); }
  void put_u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) put(static_cast<uint8_t>(v >> (8 * i)));
  }
  void global(const std::string& module, const std::string& name) {
    put(op::GLOBAL);
    out_ += module + "\n" + name + "\n";
  }

  void write_int(int64_t v) {
    if (v >= 0 && v < 256) {
      put(op::BININT1);
      put(static_cast<uint8_t>(v));
    } else if (v >= 0 && v < 65536) {
      put(op::BININT2);
      put(static_cast<uint8_t>(v));
      put(static_cast<uint8_t>(v >> 8));
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      put(op::BININT);
      put_u32(static_cast<uint32_t>(static_cast<int32_t>(v)));
    } else {  // LONG1: minimal little-endian two's complement
      uint8_t bytes[8];
      for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
      int n = 8;
      while (n > 1 && ((bytes[n - 1] == 0x00 && !(bytes[n - 2] & 0x80)) || (bytes[n - 1] == 0xff && (bytes[n - 2] & 0x80)))) --n;
      put(op::LONG1);
      put(static_cast<uint8_t>(n));
      put_bytes(bytes, n);
    }
  }

  void write_float(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    put(op::BINFLOAT);
    for (int i = 7; i >= 0; --i) put(static_cast<uint8_t>(bits >> (8 * i)));  // big-endian
  }

  void write_string(const std::string& s) {
    put(op::BINUNICODE);
    put_u32(static_cast<uint32_t>(s.size()));
    out_ += s;
  }

  void write_tuple(const std::vector<c10::IValue>& items) {
    if (items.empty()) return put(op::EMPTY_TUPLE);
    if (items.size() > 3) put(op::MARK);
    for (auto& item : items) write(item);
    if (items.size() <= 3) put(static_cast<uint8_t>(op::TUPLE1 + items.size() - 1));
    else put(op::TUPLE);
  }

  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())
  void write_tensor(const torch::Tensor& tensor) {
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    std::string storage_name;
    for (auto& [name, dtype] : storage_types())
      if (dtype == t.scalar_type()) storage_name = name;
    if (storage_name.empty()) throw Error(std::string("cannot pickle a tensor of dtype ") + c10::toString(t.scalar_type()));
    const std::string key = std::to_string(storages_.size());
    storages_.push_back(t);

    global("torch._utils", "_rebuild_tensor_v2");
    put(op::MARK);
    put(op::MARK);  // persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
    write_string("storage");
    global("torch", storage_name);
    write_string(key);
    write_string("cpu");
    write_int(t.numel());
    put(op::TUPLE);
    put(op::BINPERSID);
    write_int(0);
    std::vector<c10::IValue> sizes, strides;
    for (auto s : t.sizes()) sizes.emplace_back(s);
    for (auto s : t.strides()) strides.emplace_back(s);
    write_tuple(sizes);
    write_tuple(strides);
    put(op::NEWFALSE);
    global("collections", "OrderedDict");
    put(op::EMPTY_TUPLE);
    put(op::REDUCE);
    put(op::TUPLE);
    put(op::REDUCE);
  }

  // Python bytes in protocol 2: _codecs.encode(<the bytes as latin-1 text>, 'latin1'), as pickle writes them.
  void write_bytes(const std::string& bytes) {
    std::string latin1_as_utf8;
    for (unsigned char c : bytes) {
      if (c < 0x80) {
        latin1_as_utf8.push_back(static_cast<char>(c));
      } else {
        latin1_as_utf8.push_back(static_cast<char>(0xc0 | (c >> 6)));
        latin1_as_utf8.push_back(static_cast<char>(0x80 | (c & 0x3f)));
      }
    }
    global("_codecs", "encode");
    write_string(latin1_as_utf8);
    write_string("latin1");
    put(op::TUPLE2);
    put(op::REDUCE);
  }

  // numpy.ndarray.__reduce__ (NumPy >= 2), opcode for opcode as pickle.dumps(array, protocol=2) writes it.
  void write_numpy_array(const NumpyArray& a) {
    global("numpy._core.multiarray", "_reconstruct");
    global("numpy", "ndarray");
    write_int(0);
    put(op::TUPLE1);
    write_bytes("b");
    put(op::TUPLE3);
    put(op::REDUCE);
    put(op::MARK);  // __setstate__((1, shape, dtype, is_fortran, data))
    write_int(1);
    write_tuple(std::vector<c10::IValue>(a.shape.begin(), a.shape.end()));
    global("numpy", "dtype");
    write_string(a.dtype);
    put(op::NEWFALSE);
    put(op::NEWTRUE);
    put(op::TUPLE3);
    put(op::REDUCE);
    put(op::MARK);  // the dtype's state: (3, byte order, subarray, names, fields, elsize, alignment, flags)
    write_int(3);
    write_string(a.dtype.back() == '1' ? "|" : "<");
    put(op::NONE);
    put(op::NONE);
    put(op::NONE);
    write_int(-1);
    write_int(-1);
    write_int(0);
    put(op::TUPLE);
    put(op::BUILD);
    put(op::NEWFALSE);
    write_bytes(a.data);
    put(op::TUPLE);
    put(op::BUILD);
  }

  void write(const c10::IValue& v) {
    if (v.isNone()) return put(op::NONE);
    if (v.isCapsule())
      if (auto* array = dynamic_cast<const NumpyArray*>(v.toCapsule().get())) return write_numpy_array(*array);
    if (v.isBool()) return put(v.toBool() ? op::NEWTRUE : op::NEWFALSE);
    if (v.isInt()) return write_int(v.toInt());
    if (v.isDouble()) return write_float(v.toDouble());
    if (v.isString()) return write_string(v.toStringRef());
    if (v.isTensor()) return write_tensor(v.toTensor());
    if (v.isTuple()) return write_tuple(v.toTupleRef().elements().vec());
    if (v.isList()) {
      auto list = v.toList();
      put(op::EMPTY_LIST);
      if (list.empty()) return;
      put(op::MARK);
      for (size_t i = 0; i < list.size(); ++i) write(list.get(i));
      return put(op::APPENDS);
    }
    if (v.isGenericDict()) {
      auto dict = v.toGenericDict();
      put(op::EMPTY_DICT);
      size_t in_batch = 0;
      for (auto& entry : dict) {
        if (in_batch == 0) put(op::MARK);
        write(entry.key());
        write(entry.value());
        if (++in_batch == 1000) {  // Python's batch size
          put(op::SETITEMS);
          in_batch = 0;
        }
      }
      if (in_batch) put(op::SETITEMS);
      return;
    }
    throw Error("cannot pickle a value of type " + v.tagKind());
  }

  std::vector<torch::Tensor>& storages_;
  std::string out_;
};

}  // namespace

std::string dumps(const c10::IValue& value, std::vector<torch::Tensor>& storages) {
  return Writer(storages).finish(value);
}

// ============================================================================================ reader

namespace {

// State dicts nest a few levels (optimizer.pt: dict > dict > dict > tensor). Anything much deeper is
// hostile: consumers walk values recursively and the IValue destructors recurse too.
constexpr int kMaxNesting = 64;

// A stack slot. Globals and the marks live only on the stack; a tuple that holds a global (only the
// persistent id of a storage does) stays a raw list of items, shared so that memo copies stay cheap.
struct Item {
  // Object: an instance of an allowed class (Globals::kDeepSpeed) waiting for its BUILD state.
  enum Kind { Value, Global, Mark, RawTuple, Object } kind = Value;
  c10::IValue value;
  std::string global;                                // "module.name" for Global and Object
  std::shared_ptr<const std::vector<Item>> items;    // for RawTuple
  int depth = 0;                                     // for RawTuple: its nesting
};

class Reader {
 public:
  Reader(const std::string& bytes, const std::function<torch::Tensor(const StorageRef&)>& load_storage,
         const std::string& where, Globals globals)
      : data_(reinterpret_cast<const uint8_t*>(bytes.data())), size_(bytes.size()), load_storage_(load_storage),
        where_(where), globals_(globals) {}

  c10::IValue run() {
    while (true) {
      const size_t at = pos_;
      const uint8_t code = u8();
      if (code == op::STOP) break;
      step(code, at);
    }
    if (stack_.size() != 1 || stack_[0].kind != Item::Value) bad("pickle ended with a malformed stack");
    return stack_[0].value;
  }

 private:
  [[noreturn]] void bad(const std::string& what) const {
    fail(where_, "data.pkl: " + what + " (at byte " + std::to_string(pos_) + ")");
  }

  const uint8_t* take(size_t n) {
    if (n > size_ - pos_) bad("truncated pickle: needs " + std::to_string(n) + " more bytes");
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  uint8_t u8() { return *take(1); }
  uint64_t uint_le(size_t n) {
    const uint8_t* p = take(n);
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
  std::string line() {
    const void* nl = std::memchr(data_ + pos_, '\n', size_ - pos_);
    if (!nl) bad("truncated GLOBAL");
    size_t n = static_cast<const uint8_t*>(nl) - (data_ + pos_);
    std::string s(reinterpret_cast<const char*>(take(n)), n);
    take(1);
    return s;
  }
  std::string string_of(uint64_t n) { return std::string(reinterpret_cast<const char*>(take(n)), n); }

  void push_value(c10::IValue v) {
    Item item;
    item.value = std::move(v);
    stack_.push_back(std::move(item));
  }
  Item pop() {
    if (stack_.empty()) bad("stack underflow");
    Item item = std::move(stack_.back());
    stack_.pop_back();
    return item;
  }
  c10::IValue pop_value(const char* what) {
    Item item = pop();
    if (item.kind != Item::Value) bad(std::string("expected a value for ") + what);
    return item.value;
  }
  Item& top() {
    if (stack_.empty()) bad("stack underflow");
    return stack_.back();
  }
  // Items above the topmost mark, removing them and the mark.
  std::vector<Item> pop_to_mark() {
    size_t k = stack_.size();
    while (k > 0 && stack_[k - 1].kind != Item::Mark) --k;
    if (k == 0) bad("MARK missing");
    std::vector<Item> items(std::make_move_iterator(stack_.begin() + k), std::make_move_iterator(stack_.end()));
    stack_.resize(k - 1);
    return items;
  }

  // Containers are identified by their heap object; tensors and scalars have depth 0.
  static bool is_container(const c10::IValue& v) { return v.isGenericDict() || v.isList() || v.isTuple(); }
  int depth_of(const Item& item) const {
    if (item.kind == Item::RawTuple) return item.depth;
    if (item.kind != Item::Value || !is_container(item.value)) return 0;
    auto it = depth_.find(item.value.internalToPointer());
    return it == depth_.end() ? 1 : it->second;
  }
  // `child` goes into a container that then has depth at least depth(child) + 1. A container that went into
  // another one is sealed: changing it later is how a pickle builds cycles (or hides nesting).
  int adopt(const Item& child) {
    const int depth = depth_of(child) + 1;
    if (depth > kMaxNesting) bad("values nest deeper than " + std::to_string(kMaxNesting) + " levels");
    if (child.kind == Item::Value && is_container(child.value) && sealed_.insert(child.value.internalToPointer()).second)
      keep_alive_.push_back(child.value);
    return depth;
  }
  void check_not_sealed(const c10::IValue& container) {
    if (sealed_.count(container.internalToPointer()))
      bad("a list or dict is changed after it was put into another container (cyclic values are not allowed)");
  }
  void grow(const c10::IValue& container, int child_depth) {
    auto [it, inserted] = depth_.emplace(container.internalToPointer(), 1);
    if (inserted) keep_alive_.push_back(container);
    it->second = std::max(it->second, child_depth);
  }

  void make_tuple(std::vector<Item> items) {
    bool plain = true;
    int depth = 1;
    for (auto& i : items) {
      plain = plain && i.kind == Item::Value;
      depth = std::max(depth, adopt(i));
    }
    if (!plain) {
      Item raw;
      raw.kind = Item::RawTuple;
      raw.items = std::make_shared<const std::vector<Item>>(std::move(items));
      raw.depth = depth;
      return stack_.push_back(std::move(raw));
    }
    std::vector<c10::IValue> values;
    for (auto& i : items) values.push_back(std::move(i.value));
    auto tuple = c10::IValue(c10::ivalue::Tuple::create(std::move(values)));
    grow(tuple, depth);
    push_value(std::move(tuple));
  }

  void check_global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    if (full == "collections.OrderedDict" || full == "torch._utils._rebuild_tensor_v2" ||
        full == "torch._utils._rebuild_parameter")
      return;
    if (module == "torch")
      for (auto& [storage, _] : storage_types())
        if (storage == name) return;
    if (globals_ == Globals::kDeepSpeed && deepspeed_globals().count(full)) return;
    bad("forbidden global '" + full + "' (only tensors, dicts, lists, tuples, numbers and strings are allowed)");
  }

  // ('storage', torch.XStorage, key, location, numel) -> a 1-D tensor over the record data/<key>.
  void persistent_load() {
    Item pid = pop();
    std::vector<Item> parts;
    if (pid.kind == Item::RawTuple) parts = *pid.items;
    if (parts.size() != 5 || parts[0].kind != Item::Value || !parts[0].value.isString() ||
        parts[0].value.toStringRef() != "storage" || parts[1].kind != Item::Global || !parts[2].value.isString() ||
        !parts[4].value.isInt())
      bad("persistent id is not ('storage', <type>, key, location, numel)");
    StorageRef ref;
    ref.key = parts[2].value.toStringRef();
    ref.numel = parts[4].value.toInt();
    if (ref.numel < 0) bad("negative storage size");
    bool known = false;
    for (auto& [name, dtype] : storage_types())
      if ("torch." + name == parts[1].global) ref.dtype = dtype, known = true;
    if (!known) bad("unsupported storage type '" + parts[1].global + "'");
    auto it = storages_.find(ref.key);
    if (it == storages_.end()) {
      torch::Tensor storage = load_storage_(ref);
      it = storages_.emplace(ref.key, storage).first;
    } else if (it->second.scalar_type() != ref.dtype || it->second.numel() != ref.numel) {
      bad("storage '" + ref.key + "' is referenced with two different types or sizes");
    }
    push_value(it->second);
  }

  std::vector<int64_t> int_tuple(const c10::IValue& v, const char* what) {
    if (!v.isTuple()) bad(std::string(what) + " must be a tuple of ints");
    std::vector<int64_t> out;
    for (auto& e : v.toTupleRef().elements()) {
      if (!e.isInt()) bad(std::string(what) + " must be a tuple of ints");
      out.push_back(e.toInt());
    }
    return out;
  }

  torch::Tensor rebuild_tensor(const std::vector<c10::IValue>& args) {
    if (args.size() < 4 || !args[0].isTensor() || !args[1].isInt()) bad("bad arguments to _rebuild_tensor_v2");
    torch::Tensor storage = args[0].toTensor();
    int64_t offset = args[1].toInt();
    auto size = int_tuple(args[2], "tensor size");
    auto stride = int_tuple(args[3], "tensor stride");
    if (size.size() != stride.size()) bad("tensor size and stride differ in length");
    // Every element the view can reach must lie inside its storage.
    if (offset < 0) bad("negative storage offset");
    int64_t last = offset;
    bool empty = false;
    for (size_t i = 0; i < size.size(); ++i) {
      if (size[i] < 0 || stride[i] < 0) bad("negative tensor size or stride");
      if (size[i] == 0) empty = true;
      else if (stride[i] > 0 && (size[i] - 1) > (INT64_MAX - last) / stride[i]) bad("tensor extent overflows");
      else last += (size[i] - 1) * stride[i];
    }
    if (!empty && last >= storage.numel())
      bad("tensor view (offset " + std::to_string(offset) + ", last element " + std::to_string(last) +
          ") reaches past its storage of " + std::to_string(storage.numel()) + " elements");
    return storage.as_strided(size, stride, empty ? 0 : offset);
  }

  // What DeepSpeed's files and HF's rng_state.pth add (Globals::kDeepSpeed): each becomes plain data.
  static const std::set<std::string>& deepspeed_globals() {
    static const std::set<std::string> names = {
        "torch.Size", "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address", "numpy.ndarray", "numpy.dtype",
        "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "_codecs.encode"};
    return names;
  }
  static bool is_numpy(const std::string& global) { return global.rfind("numpy.", 0) == 0; }
  void push_object(const std::string& global) {
    Item object;
    object.kind = Item::Object;
    object.global = global;
    stack_.push_back(std::move(object));
  }

  // cls.__new__(cls, *args) for the classes DeepSpeed pickles by NEWOBJ (no arguments; BUILD sets fields).
  void new_object() {
    Item args = pop();
    Item cls = pop();
    if (cls.kind != Item::Global || (cls.global != "deepspeed.runtime.fp16.loss_scaler.LossScaler" &&
                                     cls.global != "deepspeed.utils.tensor_fragment.fragment_address"))
      bad("NEWOBJ of something that is not an allowed class");
    if (args.kind != Item::Value || !args.value.isTuple() || !args.value.toTupleRef().elements().empty())
      bad("NEWOBJ of '" + cls.global + "' with arguments");
    push_object(cls.global);
  }

  // BUILD of an allowed object: its state becomes its value (LossScaler: its fields; fragment_address:
  // (numel, start); numpy: None, ignored).
  void build_object(Item state) {
    Item& target = top();
    const std::string cls = target.global;
    Item built;
    if (is_numpy(cls)) {
      built.value = c10::IValue();
    } else if (state.kind != Item::Value || !state.value.isGenericDict()) {
      bad("the state of '" + cls + "' must be a dict");
    } else if (cls == "deepspeed.utils.tensor_fragment.fragment_address") {
      auto fields = state.value.toGenericDict();
      auto numel = fields.find("numel"), start = fields.find("start");
      if (fields.size() != 2 || numel == fields.end() || start == fields.end() || !numel->value().isInt() ||
          !start->value().isInt())
        bad("fragment_address state must be {numel: int, start: int}");
      built.value = c10::ivalue::Tuple::create({numel->value(), start->value()});
    } else {
      built = std::move(state);  // LossScaler: its fields
    }
    target = std::move(built);
  }

  // Globals::kDeepSpeed callables: torch.Size(t) -> t, ZeroStageEnum(v) -> v, _codecs.encode(s, enc) -> s,
  // numpy.dtype(...) / _reconstruct(ndarray, ...) -> an object whose BUILD makes it None.
  bool reduce_deepspeed(const Item& callable, const Item& args) {
    if (globals_ != Globals::kDeepSpeed) return false;
    const std::string& g = callable.global;
    if (g == "numpy.dtype" || g == "numpy._core.multiarray._reconstruct" || g == "numpy.core.multiarray._reconstruct") {
      push_object(g);
      return true;
    }
    if (args.kind != Item::Value || !args.value.isTuple()) return false;
    const auto& argv = args.value.toTupleRef().elements();
    if (g == "torch.Size") {
      if (argv.size() != 1) bad("torch.Size takes one tuple");
      int_tuple(argv[0], "torch.Size");
      push_value(argv[0]);
      return true;
    }
    if (g == "deepspeed.runtime.zero.config.ZeroStageEnum") {
      if (argv.size() != 1 || !argv[0].isInt()) bad("ZeroStageEnum takes one int");
      push_value(argv[0]);
      return true;
    }
    if (g == "_codecs.encode") {
      if (argv.size() != 2 || !argv[0].isString() || !argv[1].isString()) bad("_codecs.encode takes two strings");
      push_value(argv[0]);
      return true;
    }
    return false;
  }

  void reduce() {
    Item args = pop();
    Item callable = pop();
    if (callable.kind != Item::Global) bad("REDUCE of something that is not an allowed global");
    if (reduce_deepspeed(callable, args)) return;
    if (args.kind != Item::Value || !args.value.isTuple()) bad("REDUCE arguments must be a tuple");
    auto argv = args.value.toTupleRef().elements().vec();
    if (callable.global == "collections.OrderedDict") {
      if (!argv.empty()) bad("OrderedDict with arguments is not supported");
      return push_value(new_dict());
    }
    if (callable.global == "torch._utils._rebuild_tensor_v2") return push_value(rebuild_tensor(argv));
    if (callable.global == "torch._utils._rebuild_parameter") {
      if (argv.empty() || !argv[0].isTensor()) bad("bad arguments to _rebuild_parameter");
      return push_value(argv[0]);
    }
    bad("'" + callable.global + "' cannot be called");
  }

  void set_items(std::vector<Item> items) {
    if (items.size() % 2) bad("SETITEMS with an odd number of items");
    Item& target = top();
    if (target.kind != Item::Value || !target.value.isGenericDict()) bad("SETITEMS on something that is not a dict");
    check_not_sealed(target.value);
    const c10::IValue container = target.value;
    auto dict = target.value.toGenericDict();
    for (size_t i = 0; i < items.size(); i += 2) {
      if (items[i].kind != Item::Value || items[i + 1].kind != Item::Value) bad("dict entry is not a value");
      const auto& key = items[i].value;
      // What c10's Dict can hash (its DictKeyHash throws for anything else, e.g. None, inside the insert,
      // which ends the process): anything else is refused here.
      if (!key.isInt() && !key.isString() && !key.isBool() && !key.isDouble())
        bad("unsupported dict key type " + key.tagKind());
      grow(container, adopt(items[i + 1]));
      check_not_sealed(container);  // the dict went into itself
      dict.insert_or_assign(key, items[i + 1].value);
    }
  }

  void append_items(std::vector<Item> items) {
    Item& target = top();
    if (target.kind != Item::Value || !target.value.isList()) bad("APPEND on something that is not a list");
    check_not_sealed(target.value);
    const c10::IValue container = target.value;
    auto list = target.value.toList();
    for (auto& i : items) {
      if (i.kind != Item::Value) bad("list item is not a value");
      grow(container, adopt(i));
      check_not_sealed(container);  // the list went into itself
      list.push_back(i.value);
    }
  }

  void step(uint8_t code, size_t at) {
    switch (code) {
      case op::PROTO:
        if (u8() > 5) bad("unsupported pickle protocol");
        return;
      case op::FRAME: take(8); return;
      case op::MARK: { Item m; m.kind = Item::Mark; stack_.push_back(std::move(m)); return; }
      case op::POP: pop(); return;
      case op::POP_MARK: pop_to_mark(); return;
      case op::DUP: stack_.push_back(top()); return;
      case op::NONE: return push_value(c10::IValue());
      case op::NEWTRUE: return push_value(true);
      case op::NEWFALSE: return push_value(false);
      case op::BININT1: return push_value(static_cast<int64_t>(u8()));
      case op::BININT2: return push_value(static_cast<int64_t>(uint_le(2)));
      case op::BININT: return push_value(static_cast<int64_t>(static_cast<int32_t>(uint_le(4))));
      case op::LONG1:
      case op::LONG4: {
        uint64_t n = code == op::LONG1 ? u8() : uint_le(4);
        if (n > 8) bad("integer wider than 64 bits");
        uint64_t v = n ? uint_le(n) : 0;
        if (n && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t(0) << (8 * n);  // sign-extend
        return push_value(static_cast<int64_t>(v));
      }
      case op::BINFLOAT: {
        const uint8_t* p = take(8);
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
        double d;
        std::memcpy(&d, &bits, 8);
        return push_value(d);
      }
      case op::SHORT_BINUNICODE:
      case op::SHORT_BINSTRING: return push_value(string_of(u8()));
      case op::BINUNICODE:
      case op::BINSTRING: return push_value(string_of(uint_le(4)));
      case op::BINUNICODE8: return push_value(string_of(uint_le(8)));
      case op::EMPTY_TUPLE: return push_value(c10::ivalue::Tuple::create(std::vector<c10::IValue>{}));
      case op::TUPLE1:
      case op::TUPLE2:
      case op::TUPLE3: {
        size_t n = code - op::TUPLE1 + 1;
        if (stack_.size() < n) bad("stack underflow");
        std::vector<Item> items(std::make_move_iterator(stack_.end() - n), std::make_move_iterator(stack_.end()));
        stack_.resize(stack_.size() - n);
        for (auto& i : items)
          if (i.kind == Item::Mark) bad("MARK inside a tuple");
        return make_tuple(std::move(items));
      }
      case op::TUPLE: return make_tuple(pop_to_mark());
      case op::EMPTY_LIST: return push_value(new_list());
      case op::EMPTY_DICT: return push_value(new_dict());
      case op::APPEND: { auto v = pop(); std::vector<Item> one; one.push_back(std::move(v)); return append_items(std::move(one)); }
      case op::APPENDS: return append_items(pop_to_mark());
      case op::SETITEM: {
        auto value = pop();
        auto key = pop();
        std::vector<Item> pair;
        pair.push_back(std::move(key));
        pair.push_back(std::move(value));
        return set_items(std::move(pair));
      }
      case op::SETITEMS: return set_items(pop_to_mark());
      case op::GLOBAL: {
        std::string module = line();
        std::string name = line();
        check_global(module, name);
        Item g;
        g.kind = Item::Global;
        g.global = module + "." + name;
        return stack_.push_back(std::move(g));
      }
      case op::BINPERSID: return persistent_load();
      case op::REDUCE: return reduce();
      case op::NEWOBJ: return new_object();
      case op::BUILD: {
        // Only an OrderedDict's instance attributes (state_dict()._metadata) come this way; drop them.
        Item state = pop();
        if (top().kind == Item::Object) return build_object(std::move(state));
        Item& target = top();
        if (target.kind != Item::Value || !target.value.isGenericDict()) bad("BUILD is only allowed on a dict");
        return;
      }
      case op::BINPUT: memo_[u8()] = top(); return;
      case op::LONG_BINPUT: memo_[uint_le(4)] = top(); return;
      case op::MEMOIZE: { uint64_t k = memo_.size(); memo_[k] = top(); return; }
      case op::BINGET:
      case op::LONG_BINGET: {
        uint64_t k = code == op::BINGET ? u8() : uint_le(4);
        auto it = memo_.find(k);
        if (it == memo_.end()) bad("memo key " + std::to_string(k) + " not found");
        stack_.push_back(it->second);
        return;
      }
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", code);
        pos_ = at;
        bad(std::string("unsupported pickle opcode ") + hex);
      }
    }
  }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::function<torch::Tensor(const StorageRef&)>& load_storage_;
  std::string where_;
  Globals globals_;
  std::vector<Item> stack_;
  std::map<uint64_t, Item> memo_;
  std::map<std::string, torch::Tensor> storages_;
  std::unordered_map<const void*, int> depth_;  // nesting of every list / dict / tuple built so far
  std::unordered_set<const void*> sealed_;       // containers already inside another container
  std::vector<c10::IValue> keep_alive_;          // the containers above, so that no address is reused
};

}  // namespace

c10::IValue loads(const std::string& bytes, const std::function<torch::Tensor(const StorageRef&)>& load_storage,
                  const std::string& where, Globals globals) {
  return Reader(bytes, load_storage, where, globals).run();
}

}  // namespace llava::io::pickle
