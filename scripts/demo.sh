#!/usr/bin/env bash
# The main job on an embedded default, from a fresh machine: installs, builds, and runs the product on
# files it makes itself. (The training issue turns this into: make a tiny LLaVA + data, train stage 1 and
# stage 2, resume, answer questions.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --system
scripts/build.sh debian
out=${DEMO_OUT:-demo-out}
mkdir -p "$out"
echo "== writing a torch.save-compatible optimizer-like state and inspecting it"
build/tests/io/llava_io_tool pt-sample "$out/sample.pt"
build/src/cli/llava inspect "$out/sample.pt"
