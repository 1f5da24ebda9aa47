#!/usr/bin/env bash
# ONE prepared command that proves the GPU side (issue #17) on a machine with one NVIDIA GPU, and its dry run here.
#
#   scripts/gpu-check.sh --pack       here (Debian, network): the -dev packages the build needs that the GPU image
#                                     lacks -> .gpu-deps/*.deb (~3 MB, git-ignored; carried with the tree)
#   scripts/gpu-check.sh [--out DIR]  there (no apt, no network; python3 = torch 2.11+cu130, transformers, peft,
#                                     cmake, ninja, nvcc): unpack .gpu-deps into /tmp, build llava, llava-run and
#                                     dist_worker against python3's libtorch with every core (budget 4 min), then
#                                     bench/gpu_check.py: parity, training + resume, NCCL, speed (budget 5 min)
#                                     -> DIR/gpu-check.json and one table
#   scripts/gpu-check.sh --dry-run    here, no GPU: the same checks with device cpu and the small bench model
#                                     against build/ (and build-cuda/ must have compiled every device path)
# Device tool: run(command="scripts/gpu-check.sh --out $OUT", carry=[".gpu-deps"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
DEBS=(libyaml-cpp-dev libyaml-cpp0.7 libsentencepiece-dev libsentencepiece0 libprotobuf-lite32 libcxxopts-dev
      nlohmann-json3-dev libstb-dev libstb0 catch2 libgloo-dev libre2-dev libre2-9)
mode=${1:-check}
OUT_DIR=.
[ "$mode" = "--out" ] && { OUT_DIR=$2; mode=check; }

unpack_deps() {  # .gpu-deps/*.deb -> $DEPS (dpkg-deb, or ar + tar where there is no dpkg)
  [ -d .gpu-deps ] || { echo "no .gpu-deps: run scripts/gpu-check.sh --pack here first and carry .gpu-deps" >&2; exit 1; }
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for deb in .gpu-deps/*.deb; do
    dpkg-deb -x "$deb" "$DEPS" 2>/dev/null || ar p "$deb" data.tar.xz | tar -xJ -C "$DEPS"
  done
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
}

configure() {  # build dir, torch prefix, extra cmake args...: only the unpacked packages and the given libtorch
  local dir=$1 torch=$2; shift 2
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$DEPS/usr;$DEPS/usr/lib/x86_64-linux-gnu/cmake;$torch" \
    -DCMAKE_INCLUDE_PATH="$DEPS/usr/include" -DCMAKE_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu" "$@" \
    >"$dir.configure.log" 2>&1 || { tail -40 "$dir.configure.log"; exit 1; }
}

DEPS=/tmp/gpu-deps
case $mode in
  --pack)
    rm -rf .gpu-deps && mkdir -p .gpu-deps
    (cd .gpu-deps && apt-get download "${DEBS[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
    [ "$(ls .gpu-deps/*.deb | wc -l)" -eq ${#DEBS[@]} ] || { echo "gpu-check --pack: some packages missing" >&2; exit 1; }
    echo "gpu-check --pack: $(du -sh .gpu-deps | cut -f1) in .gpu-deps ($(ls .gpu-deps | wc -l) packages)"
    exit 0 ;;
  --dry-run)
    echo "== dry run 1/2: the carried packages unpacked and configured against (no compile; the CUDA build itself is build-cuda/)"
    [ -d .gpu-deps ] || "$0" --pack
    unpack_deps
    configure build-gpu-dry "$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    for dep in yaml-cpp_DIR Catch2_DIR nlohmann_json_DIR cxxopts_DIR STB_INCLUDE_DIR LLAVA_GLOO_INCLUDE_DIR; do
      grep -q "^$dep.*=$DEPS" build-gpu-dry/CMakeCache.txt || { echo "$dep not from $DEPS:"; grep "^$dep" build-gpu-dry/CMakeCache.txt; exit 1; }
    done
    grep -q "sentencepiece.*$DEPS\|$DEPS.*sentencepiece" build-gpu-dry/CMakeCache.txt || echo "note: sentencepiece from pkg-config here"
    echo "carried: $(du -sh .gpu-deps | cut -f1); every dependency configured from $DEPS"
    rm -rf build-gpu-dry build-gpu-dry.configure.log
    echo "== dry run 2/2: the checks with device cpu and the small bench model (no GPU: NCCL and the 7B-shape speed run need one)"
    [ -x build/src/cli/llava ] || scripts/build.sh cpu
    PYTHONPATH=tests/oracle .venv/bin/python bench/gpu_check.py --build build --device cpu --quick \
      --out "$OUT_DIR/gpu-check-dry-run.json"
    exit $? ;;
  check) ;;
  *) echo "usage: scripts/gpu-check.sh [--pack | --dry-run | --out DIR]" >&2; exit 2 ;;
esac

start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU" >&2; exit 1; }
unpack_deps
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
BUILD=build-gpu
configure $BUILD "$TORCH" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DTORCH_CUDA_ARCH_LIST=9.0
grep "llava_distributed:" $BUILD.configure.log || true
ninja -C $BUILD -j "$(nproc)" llava llava-run dist_worker
echo "== built in $(($(date +%s) - start)) s"
status=0
PYTHONPATH=tests/oracle python3 bench/gpu_check.py --build $BUILD --device cuda --out "$OUT_DIR/gpu-check.json" || status=$?
echo "== gpu-check done in $(($(date +%s) - start)) s"
exit $status
