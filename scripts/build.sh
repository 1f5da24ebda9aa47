#!/usr/bin/env bash
# Configures and builds one or more of the project's builds, all against a libtorch >= 2.11:
#   cpu   build/       the torch 2.13 CPU wheel's libtorch (.venv) with Gloo (the default: demo, every test)
#   cuda  build-cuda/  the torch 2.14.1 CUDA 13.0 wheel's libtorch (.venv-cuda) with Gloo and NCCL; C++20
#   asan  build-asan/  every Catch2 test binary under AddressSanitizer + UBSan (gcc, the CPU wheel)
#   fuzz  build-fuzz/  the libFuzzer targets of tests/fuzz (clang, ASan + UBSan, the CPU wheel); scripts/fuzz.sh
# usage: scripts/build.sh [cpu|cuda|asan|fuzz|all]...   (default: cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

configure_and_build() {  # dir, cmake args...   ($TARGETS: what to build, default everything)
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
  ninja -C "$dir" -j "$JOBS" ${TARGETS:-}
}

torch_prefix() {  # venv -> its torch/ folder (TorchConfig is found there, and torch/lib before any system libtorch)
  "$1/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null \
    || { echo "no torch in $1: run scripts/setup.sh${2:+ $2}" >&2; exit 1; }
}

cuda_args() {  # FindCUDA derives the toolkit from nvcc's path, which here is a wrapper in /usr/local/bin
  local torch; torch=$(torch_prefix .venv-cuda --cuda)
  local cuda_home=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda_home/bin/nvcc" ] || { echo "no CUDA toolkit at $cuda_home (set CUDA_HOME)" >&2; exit 1; }
  echo "-DCMAKE_PREFIX_PATH=$torch -DCUDA_TOOLKIT_ROOT_DIR=$cuda_home"
  # The wheel's nvrtc lives beside torch/, not in the toolkit.
  local nvrtc; nvrtc=$(ls "$torch"/../nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -1)
  [ -n "$nvrtc" ] && echo "-DCUDA_nvrtc_LIBRARY=$nvrtc"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(cpu)
[ "${targets[0]}" = "all" ] && targets=(cpu cuda asan fuzz)
for t in "${targets[@]}"; do
  echo "== build $t"
  case $t in
    cpu)  configure_and_build build -DCMAKE_PREFIX_PATH="$(torch_prefix .venv)" ;;
    cuda) args=$(cuda_args)
          # shellcheck disable=SC2086
          configure_and_build build-cuda $args ;;
    # Only the test binaries: the oracle tests need the whole CLI and run in the other builds.
    asan) TARGETS=llava_catch_tests configure_and_build build-asan -DCMAKE_PREFIX_PATH="$(torch_prefix .venv)" \
            -DLLAVA_SANITIZE=ON -DLLAVA_IO_ONLY=OFF ;;
    # A cached CMAKE_CXX_COMPILER cannot change; an old build-fuzz made with another compiler is redone.
    fuzz) grep -qs "CMAKE_CXX_COMPILER:.*clang++" build-fuzz/CMakeCache.txt || rm -rf build-fuzz
          CC=clang CXX=clang++ TARGETS=llava_fuzz_targets configure_and_build build-fuzz \
            -DCMAKE_PREFIX_PATH="$(torch_prefix .venv)" -DLLAVA_FUZZ=ON ;;
    *) echo "unknown build '$t' (cpu, cuda, asan, fuzz, all)" >&2; exit 2 ;;
  esac
done
