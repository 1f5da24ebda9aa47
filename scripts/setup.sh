#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian bookworm machine. Idempotent.
#   scripts/setup.sh            system packages + the test-oracle venv (.venv)
#   scripts/setup.sh --system   system packages only (enough to build and run the trainer)
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(cmake ninja-build g++ ccache pkg-config libtorch-dev libgloo-dev catch2 libcxxopts-dev
                 nlohmann-json3-dev libyaml-cpp-dev libsentencepiece-dev libstb-dev
                 clang libclang-rt-14-dev)  # clang + libFuzzer: the fuzz build
# The oracle: pinned so reference outputs do not move under us. torch 2.13.0 is the local CPU wheel.
ORACLE_PACKAGES=(torch==2.13.0 transformers==5.24.0 peft==0.21.2 safetensors accelerate sentencepiece pillow numpy pytest)

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

[ "${1:-}" = "--system" ] && exit 0

stamp=".venv/.llava-oracle-$(echo "${ORACLE_PACKAGES[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  PYTHON=$(command -v python3.11 || command -v python3)
  echo "setup: making .venv with $($PYTHON --version)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check "${ORACLE_PACKAGES[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, peft, safetensors, sentencepiece, PIL, numpy, pytest" \
    || { echo "setup: the oracle venv is incomplete" >&2; exit 1; }
  touch "$stamp"
fi
