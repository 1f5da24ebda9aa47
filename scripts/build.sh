#!/usr/bin/env bash
# Configures and builds one or more of the project's builds:
#   debian  build/        Debian's libtorch 1.13 + Gloo (the default)
#   torch2  build-torch2/ the libtorch inside the venv's torch 2.13 wheel (no Gloo; benchmarks, CUDA path)
#   asan    build-asan/   io library and its tests under AddressSanitizer + UBSan
# usage: scripts/build.sh [debian|torch2|asan|all]...   (default: debian)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

configure_and_build() {  # dir, cmake args...
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
  ninja -C "$dir" -j "$JOBS"
}

torch2_prefix() {
  .venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))'
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(debian)
[ "${targets[0]}" = "all" ] && targets=(debian torch2 asan)
for t in "${targets[@]}"; do
  echo "== build $t"
  case $t in
    debian) configure_and_build build ;;
    # torch/ as prefix so TorchConfig finds torch/lib before the system's libtorch.
    torch2) configure_and_build build-torch2 -DCMAKE_PREFIX_PATH="$(torch2_prefix)" ;;
    asan)   configure_and_build build-asan -DLLAVA_SANITIZE=ON -DLLAVA_IO_ONLY=ON ;;
    *) echo "unknown build '$t' (debian, torch2, asan, all)" >&2; exit 2 ;;
  esac
done
