#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian bookworm machine. Idempotent.
#   scripts/setup.sh            system packages + .venv (torch 2.13 CPU wheel: the libtorch we build against,
#                               and the test oracle: transformers, peft, ...)
#   scripts/setup.sh --cuda     the same + .venv-cuda (torch 2.14.1 CUDA 13.0 wheel: libtorch + NCCL for build-cuda/)
set -euo pipefail
cd "$(dirname "$0")/.."

# libgloo-dev: the gloo headers ProcessGroupGloo.hpp includes (the wheel has gloo compiled in, not its headers).
SYSTEM_PACKAGES=(cmake ninja-build g++ ccache pkg-config libgloo-dev catch2 libcxxopts-dev libre2-dev
                 nlohmann-json3-dev libyaml-cpp-dev libsentencepiece-dev libstb-dev
                 clang libclang-rt-14-dev)  # clang + libFuzzer: the fuzz build
# Pinned so reference outputs do not move under us. torch 2.13.0 is the local CPU wheel.
ORACLE_PACKAGES=(torch==2.13.0 transformers==5.24.0 peft==0.21.2 safetensors accelerate sentencepiece pillow numpy pytest
                 deepspeed==0.19.8)  # DeepSpeed: the interop tests run it on CPU (DS_ACCELERATOR=cpu)
CUDA_PACKAGES=(torch==2.14.1)  # the local CUDA 13.0 wheel (~5.5 GB with its nvidia-* packages)

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=$(command -v python3.11 || command -v python3)
make_venv() {  # dir, check-import, packages...
  local dir=$1 check=$2; shift 2
  local stamp="$dir/.llava-$(echo "$*" | md5sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  echo "setup: making $dir with $($PYTHON --version): $*"
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/python" -c "$check" || { echo "setup: $dir is incomplete" >&2; exit 1; }
  touch "$stamp"
}
make_venv .venv "import torch, transformers, peft, safetensors, sentencepiece, PIL, numpy, pytest" "${ORACLE_PACKAGES[@]}"
if [ "${1:-}" = "--cuda" ]; then
  make_venv .venv-cuda "import warnings; warnings.simplefilter('ignore'); import torch; assert torch.version.cuda, 'not a CUDA wheel'" \
    "${CUDA_PACKAGES[@]}"  # (ignore: torch warns that this venv has no numpy, which nothing here needs)
fi
