// torch.save-compatible archives (.pt / .bin / .pth): a stored zip with one top-level folder holding
// data.pkl (protocol-2 pickle), byteorder, data/<key> records aligned to 64 bytes, and version.
#pragma once
#include <string>

#include <ATen/core/ivalue.h>

#include "io/pickle.h"

namespace llava::io {

// Writes `value` so that Python's torch.load(path, weights_only=True) returns the same containers and
// tensors. Atomic: written to a temp file, fsynced, renamed.
void save_pt(const std::string& path, const c10::IValue& value);

// Reads a file written by Python's torch.save (or save_pt) with the restricted unpickler.
// `globals`: see pickle.h (kDeepSpeed for DeepSpeed's checkpoint files and HF's rng_state.pth).
c10::IValue load_pt(const std::string& path, pickle::Globals globals = pickle::Globals::kTorch);

// Does the file start like a zip archive (PK\x03\x04)?
bool is_zip_file(const std::string& path);

}  // namespace llava::io
