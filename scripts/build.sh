#!/usr/bin/env bash
# Configures and builds one or more of the project's builds:
#   debian  build/        Debian's libtorch 1.13 + Gloo (the default)
#   torch2  build-torch2/ the libtorch inside the venv's torch 2.13 wheel (no Gloo; benchmarks, CUDA path)
#   asan    build-asan/   every Catch2 test binary under AddressSanitizer + UBSan (gcc, Debian's libtorch)
#   fuzz    build-fuzz/   the libFuzzer targets of tests/fuzz (clang, ASan + UBSan); run by scripts/fuzz.sh
# usage: scripts/build.sh [debian|torch2|asan|fuzz|all]...   (default: debian)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

configure_and_build() {  # dir, cmake args...   ($TARGETS: what to build, default everything)
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
  ninja -C "$dir" -j "$JOBS" ${TARGETS:-}
}

torch2_prefix() {
  .venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))'
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(debian)
[ "${targets[0]}" = "all" ] && targets=(debian torch2 asan fuzz)
for t in "${targets[@]}"; do
  echo "== build $t"
  case $t in
    debian) configure_and_build build ;;
    # torch/ as prefix so TorchConfig finds torch/lib before the system's libtorch.
    torch2) configure_and_build build-torch2 -DCMAKE_PREFIX_PATH="$(torch2_prefix)" ;;
    # Only the test binaries: the oracle tests need the whole CLI and run in the other builds.
    asan)   TARGETS=llava_catch_tests configure_and_build build-asan -DLLAVA_SANITIZE=ON -DLLAVA_IO_ONLY=OFF ;;
    # A cached CMAKE_CXX_COMPILER cannot change; an old build-fuzz made with another compiler is redone.
    fuzz)   grep -qs "CMAKE_CXX_COMPILER:.*clang++" build-fuzz/CMakeCache.txt || rm -rf build-fuzz
            CC=clang CXX=clang++ TARGETS=llava_fuzz_targets configure_and_build build-fuzz -DLLAVA_FUZZ=ON ;;
    *) echo "unknown build '$t' (debian, torch2, asan, fuzz, all)" >&2; exit 2 ;;
  esac
done
