// torch.save-compatible archives and the restricted unpickler: round trips and refusals.
#include <caffe2/serialize/inline_container.h>

#include <catch2/catch.hpp>
#include <filesystem>

#include "io/error.h"
#include "io/file_util.h"
#include "io/pickle.h"
#include "io/torch_archive.h"
#include "test_helpers.h"

using namespace llava;

static std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_CASE("save_pt / load_pt round trip nested containers scalars and tensors of every dtype") {
  auto dir = test::temp_dir("pt-roundtrip");
  auto inner = io::pickle::new_dict();
  inner.insert(int64_t(0), torch::arange(12, torch::kFloat32).reshape({3, 4}));
  inner.insert(int64_t(7), torch::tensor(5.0f));
  auto list = io::pickle::new_list();
  list.push_back(1.5);
  list.push_back(true);
  list.push_back(c10::IValue());
  list.push_back(-(int64_t(1) << 40));
  list.push_back(std::string("text"));
  auto root = io::pickle::new_dict();
  root.insert("inner", inner);
  root.insert("list", list);
  root.insert("tuple", c10::ivalue::Tuple::create({int64_t(1), int64_t(70000), 0.5, int64_t(-5)}));
  for (auto dtype : {torch::kFloat16, torch::kBFloat16, torch::kFloat64, torch::kInt64, torch::kInt32, torch::kInt16,
                     torch::kInt8, torch::kUInt8, torch::kBool})
    root.insert(std::string("t_") + c10::toString(dtype), torch::arange(6).reshape({2, 3}).to(dtype));
  root.insert("noncontig", torch::arange(12, torch::kFloat32).reshape({3, 4}).t());

  io::save_pt(dir + "/x.pt", root);
  auto back = io::load_pt(dir + "/x.pt").toGenericDict();
  auto back_inner = back.at("inner").toGenericDict();
  CHECK(torch::equal(back_inner.at(int64_t(0)).toTensor(), inner.at(int64_t(0)).toTensor()));
  CHECK(back_inner.at(int64_t(7)).toTensor().dim() == 0);
  auto back_list = back.at("list").toList();
  REQUIRE(back_list.size() == 5);
  CHECK(back_list.get(0).toDouble() == 1.5);
  CHECK(back_list.get(1).toBool());
  CHECK(back_list.get(2).isNone());
  CHECK(back_list.get(3).toInt() == -(int64_t(1) << 40));
  CHECK(back_list.get(4).toStringRef() == "text");
  auto tuple = back.at("tuple").toTupleRef().elements();
  REQUIRE(tuple.size() == 4);
  CHECK(tuple[1].toInt() == 70000);
  CHECK(tuple[3].toInt() == -5);
  for (auto& entry : root) {
    if (!entry.value().isTensor()) continue;
    INFO(entry.key().toStringRef());
    auto got = back.at(entry.key()).toTensor();
    CHECK(got.scalar_type() == entry.value().toTensor().scalar_type());
    CHECK(torch::equal(got, entry.value().toTensor()));
  }
}

TEST_CASE("the unpickler refuses globals outside the weights-only allowlist") {
  // GLOBAL os system, SHORT_BINUNICODE "echo", TUPLE1, REDUCE, STOP
  std::string evil = std::string("\x80\x02") + "cos\nsystem\n" + "\x8c\x04" + "echo" + "\x85R.";
  auto msg = error_of([&] { io::pickle::loads(evil, nullptr, "evil.pt"); });
  CHECK(msg.find("evil.pt") != std::string::npos);
  CHECK(msg.find("forbidden global 'os.system'") != std::string::npos);

  std::string numpy = std::string("\x80\x02") + "cnumpy.core.multiarray\n_reconstruct\n" + ").";
  CHECK(error_of([&] { io::pickle::loads(numpy, nullptr, "n.pt"); }).find("numpy.core.multiarray._reconstruct") != std::string::npos);
}

TEST_CASE("Globals::kDeepSpeed rebuilds DeepSpeed's classes as plain data and still refuses every other global") {
  using io::pickle::Globals;
  const std::string proto = std::string("\x80\x02");
  // fragment_address.__new__() + BUILD {numel: 64, start: 3} -> (64, 3), as DeepSpeed's param_slice_mappings.
  const std::string fragment = proto + "cdeepspeed.utils.tensor_fragment\nfragment_address\n)\x81" +
                               "}(\x8c\x05numelK@\x8c\x05startK\x03ub.";
  auto f = io::pickle::loads(fragment, nullptr, "f.pt", Globals::kDeepSpeed);
  REQUIRE(f.isTuple());
  CHECK(f.toTupleRef().elements()[0].toInt() == 64);
  CHECK(f.toTupleRef().elements()[1].toInt() == 3);
  // LossScaler -> its fields; ZeroStageEnum(2) -> 2; torch.Size((3, 4)) -> (3, 4).
  const std::string scaler = proto + "cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n)\x81}(\x8c\x09" + "cur_scaleG" +
                             std::string("\x3f\xf0\0\0\0\0\0\0", 8) + "ub.";
  auto ls = io::pickle::loads(scaler, nullptr, "l.pt", Globals::kDeepSpeed);
  REQUIRE(ls.isGenericDict());
  CHECK(ls.toGenericDict().at("cur_scale").toDouble() == 1.0);
  const std::string stage = proto + "cdeepspeed.runtime.zero.config\nZeroStageEnum\nK\x02\x85R.";
  CHECK(io::pickle::loads(stage, nullptr, "z.pt", Globals::kDeepSpeed).toInt() == 2);
  const std::string size = proto + "ctorch\nSize\nK\x03K\x04\x86\x85R.";
  CHECK(io::pickle::loads(size, nullptr, "s.pt", Globals::kDeepSpeed).toTupleRef().elements()[1].toInt() == 4);
  // The same files are refused without kDeepSpeed; other globals and calls stay refused with it.
  CHECK(error_of([&] { io::pickle::loads(fragment, nullptr, "f.pt"); }).find("forbidden global 'deepspeed.utils.tensor_fragment.fragment_address'") != std::string::npos);
  std::string evil = proto + "cos\nsystem\n" + "\x8c\x04" + "echo" + "\x85R.";
  CHECK(error_of([&] { io::pickle::loads(evil, nullptr, "e.pt", Globals::kDeepSpeed); }).find("forbidden global 'os.system'") != std::string::npos);
  const std::string called = proto + "cdeepspeed.utils.tensor_fragment\nfragment_address\nK\x01\x85R.";  // REDUCE, not NEWOBJ
  CHECK(error_of([&] { io::pickle::loads(called, nullptr, "c.pt", Globals::kDeepSpeed); }).find("cannot be called") != std::string::npos);
  const std::string with_args = proto + "cdeepspeed.utils.tensor_fragment\nfragment_address\nK\x01\x85\x81.";
  CHECK(error_of([&] { io::pickle::loads(with_args, nullptr, "a.pt", Globals::kDeepSpeed); }).find("with arguments") != std::string::npos);
  const std::string unbuilt = proto + "]cdeepspeed.utils.tensor_fragment\nfragment_address\n)\x81" + "a.";  // never BUILD
  CHECK(error_of([&] { io::pickle::loads(unbuilt, nullptr, "u.pt", Globals::kDeepSpeed); }).find("not a value") != std::string::npos);
}

TEST_CASE("files made by DeepSpeed's real classes and a NumPy RNG state read as plain data (fuzz seeds)") {
  const std::string dir = std::string(LLAVA_SOURCE_DIR) + "/tests/fuzz/corpus/torch_archive/";
  using io::pickle::Globals;
  auto optim = io::load_pt(dir + "deepspeed_optim_states.pt", Globals::kDeepSpeed).toGenericDict();
  auto osd = optim.at("optimizer_state_dict").toGenericDict();
  CHECK(osd.at("zero_stage").toInt() == 2);
  CHECK(osd.at("loss_scaler").toGenericDict().at("cur_scale").toDouble() == 1.0);
  auto fragment = osd.at("param_slice_mappings").toList().get(0).toGenericDict().at("w").toTupleRef().elements();
  CHECK((fragment[0].toInt() == 4 && fragment[1].toInt() == 0));
  auto states = io::load_pt(dir + "deepspeed_model_states.pt", Globals::kDeepSpeed).toGenericDict();
  auto shape = states.at("param_shapes").toList().get(0).toGenericDict().at("w").toTupleRef().elements();
  CHECK((shape.size() == 2 && shape[0].toInt() == 2 && shape[1].toInt() == 2));
  auto rng = io::load_pt(dir + "hf_rng_state.pt", Globals::kDeepSpeed).toGenericDict();
  CHECK(rng.at("numpy").toTupleRef().elements()[1].isNone());  // ('MT19937', array -> None, pos, ...)
  CHECK(rng.at("cpu").toTensor().numel() == 5056);
  CHECK(error_of([&] { io::load_pt(dir + "hf_rng_state.pt"); }).find("forbidden global") != std::string::npos);
}

TEST_CASE("numpy arrays are written with NumPy's globals, read back as None, and must hold their elements") {
  // HF's rng_state.pth loads them in Python (tests/checkpoint/test_hf_rng_state.py); here: the writer's side.
  auto dir = test::temp_dir("pt-numpy");
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>(i * 37));  // bytes >= 0x80 too (latin-1)
  auto root = io::pickle::new_dict();
  root.insert("numpy", c10::ivalue::Tuple::create({std::string("MT19937"), io::pickle::numpy_array("u4", {2}, bytes),
                                                   int64_t(624)}));
  io::save_pt(dir + "/rng.pth", root);
  auto back = io::load_pt(dir + "/rng.pth", io::pickle::Globals::kDeepSpeed).toGenericDict();
  auto items = back.at("numpy").toTupleRef().elements();
  CHECK((items.size() == 3 && items[0].toStringRef() == "MT19937" && items[1].isNone() && items[2].toInt() == 624));
  CHECK(error_of([&] { io::load_pt(dir + "/rng.pth"); }).find("forbidden global 'numpy._core.multiarray._reconstruct'") !=
        std::string::npos);
  CHECK(error_of([&] { io::pickle::numpy_array("u4", {3}, bytes); }).find("do not hold 3 elements of u4") !=
        std::string::npos);
  CHECK(error_of([&] { io::pickle::numpy_array("O", {1}, "x"); }).find("unsupported dtype 'O'") != std::string::npos);
}

TEST_CASE("the unpickler refuses truncated data, bad opcodes and views outside their storage") {
  std::vector<torch::Tensor> storages;
  auto good = io::pickle::dumps(torch::arange(4, torch::kFloat32), storages);
  auto load_storage = [](const io::pickle::StorageRef& ref) { return torch::zeros({ref.numel}, ref.dtype); };
  CHECK(io::pickle::loads(good, load_storage, "ok.pt").toTensor().numel() == 4);
  CHECK(error_of([&] { io::pickle::loads(good.substr(0, good.size() / 2), load_storage, "t.pt"); }).find("truncated") != std::string::npos);
  CHECK(error_of([&] { io::pickle::loads(std::string("\x80\x02\xff."), load_storage, "op.pt"); }).find("unsupported pickle opcode 0xff") != std::string::npos);
  // A storage smaller than the view claims: the reader must not read past it.
  auto tiny_storage = [](const io::pickle::StorageRef& ref) { return torch::zeros({1}, ref.dtype); };
  CHECK(error_of([&] { io::pickle::loads(good, tiny_storage, "v.pt"); }).find("reaches past its storage") != std::string::npos);
}

TEST_CASE("archives with a missing record, no data.pkl, or that are no zip at all are refused") {
  auto dir = test::temp_dir("pt-bad");
  std::vector<torch::Tensor> storages;
  auto pickled = io::pickle::dumps(torch::ones({3}), storages);
  {
    caffe2::serialize::PyTorchStreamWriter writer(dir + "/missing.pt");
    writer.writeRecord("data.pkl", pickled.data(), pickled.size());
    writer.writeEndOfFile();
  }
  auto msg = error_of([&] { io::load_pt(dir + "/missing.pt"); });
  CHECK(msg.find("missing.pt") != std::string::npos);
  CHECK(msg.find("missing record 'data/0'") != std::string::npos);

  test::write_bytes(dir + "/plain.pt", "this is not a zip");
  CHECK(error_of([&] { io::load_pt(dir + "/plain.pt"); }).find("not a torch.save zip archive") != std::string::npos);

  io::save_pt(dir + "/good.pt", torch::ones({3}));
  auto bytes = io::read_file(dir + "/good.pt");
  test::write_bytes(dir + "/truncated.pt", bytes.substr(0, bytes.size() / 2));
  CHECK(error_of([&] { io::load_pt(dir + "/truncated.pt"); }).find("truncated.pt") != std::string::npos);
}
