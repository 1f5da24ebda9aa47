// A small driver for the oracle tests: copies files through our readers and writers, and writes a
// fixed sample structure, so Python can compare bits both ways.
#include <iostream>

#include "io/error.h"
#include "io/inspect.h"
#include "io/pickle.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

using namespace llava;

// The structure `pt-sample` writes; tests/io/test_io_oracle.py rebuilds it in Python and compares.
static c10::IValue sample_structure() {
  auto state = io::pickle::new_dict();
  for (int64_t id = 0; id < 2; ++id) {
    auto entry = io::pickle::new_dict();
    entry.insert("step", torch::tensor(3.0f));
    entry.insert("exp_avg", torch::arange(6, torch::kFloat32).reshape({2, 3}) * (id + 1));
    entry.insert("exp_avg_sq", torch::full({4}, 0.25, torch::kFloat64));
    state.insert(id, entry);
  }
  auto group = io::pickle::new_dict();
  group.insert("lr", 0.001);
  group.insert("betas", c10::ivalue::Tuple::create({0.9, 0.999}));
  group.insert("eps", 1e-8);
  group.insert("amsgrad", false);
  group.insert("foreach", c10::IValue());
  group.insert("fused", true);
  group.insert("big", int64_t(1) << 40);
  group.insert("negative", int64_t(-70000));
  auto params = io::pickle::new_list();
  params.push_back(int64_t(0));
  params.push_back(int64_t(1));
  group.insert("params", params);
  auto groups = io::pickle::new_list();
  groups.push_back(group);
  auto root = io::pickle::new_dict();
  root.insert("state", state);
  root.insert("param_groups", groups);
  root.insert("bf16", torch::linspace(-2, 2, 5).to(torch::kBFloat16));
  root.insert("int8", torch::tensor({-128, 0, 127}, torch::kInt8));
  root.insert("mask", torch::tensor({true, false, true}));
  root.insert("ids", torch::tensor({int64_t(1) << 50, int64_t(-3)}));
  root.insert("unicode κλειδί ✓", "värde");
  root.insert("empty", torch::empty({0, 3}));
  return root;
}

int main(int argc, char** argv) {
  const std::string usage =
      "usage: llava_io_tool inspect PATH | st-copy IN OUT | sharded-copy IN OUT MAX_BYTES | pt-copy IN OUT | pt-sample OUT";
  if (argc < 3) {
    std::cerr << usage << "\n";
    return 2;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "inspect") {
      io::inspect_path(argv[2], std::cout);
    } else if (cmd == "st-copy" && argc == 4) {
      auto in = io::SafetensorsFile::open(argv[2]);
      io::NamedTensors tensors;
      for (auto& t : in.tensors()) tensors.emplace_back(t.name, in.get(t.name));
      io::save_safetensors(argv[3], tensors, in.metadata());
    } else if (cmd == "sharded-copy" && argc == 5) {
      auto in = io::ShardedSafetensors::open(argv[2]);
      io::NamedTensors tensors;
      for (auto& name : in.names()) tensors.emplace_back(name, in.get(name));
      io::save_sharded(argv[3], tensors, io::parse_size(argv[4]));
    } else if (cmd == "pt-copy" && argc == 4) {
      io::save_pt(argv[3], io::load_pt(argv[2]));
    } else if (cmd == "pt-sample") {
      io::save_pt(argv[2], sample_structure());
    } else {
      std::cerr << usage << "\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
