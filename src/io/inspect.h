// What `llava inspect PATH` prints: every tensor (name, dtype, shape, bytes) of a safetensors file, an HF
// sharded dir, a torch.save file or a checkpoint dir, plus the non-tensor entries of .pt files.
#pragma once
#include <ostream>
#include <string>

namespace llava::io {

void inspect_path(const std::string& path, std::ostream& out);

}  // namespace llava::io
