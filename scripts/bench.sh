#!/usr/bin/env bash
# Runs every benchmark against the default build (build/, or BUILD=dir) and writes a table to
# stdout and bench/results/latest.json. Each figure is a ratio against its peer measured in the same run
# (HF transformers + PEFT in the oracle venv, the disk's dd bandwidth, the ZeRO formulas), with
# min/median/max over REPEATS.
# Not a test: nothing is asserted; the machine's load shows in the spread. About 15 minutes on 2 cores.
#   scripts/bench.sh [train] [checkpoint] [loader] [zero]     (default: all)
#   env: BUILD, REPEATS (3), STEPS (6), THREADS (nproc), BENCH_TMP (temp dir parent)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-6}
THREADS=${THREADS:-$(nproc)}
PY=.venv/bin/python
OUT=bench/results
mkdir -p "$OUT/parts"
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error

for tool in "$BUILD/src/cli/llava" "$BUILD/tests/data/llava_data_tool"; do
  [ -x "$tool" ] || { echo "missing $tool: scripts/build.sh cpu (or BUILD=...)" >&2; exit 1; }
done

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train checkpoint loader zero)
run_part() {
  case $1 in
    train) $PY bench/bench_train.py "$BUILD" --repeats "$REPEATS" --steps "$STEPS" --threads "$THREADS" \
             --json "$OUT/parts/train.json" ;;
    checkpoint) $PY bench/bench_checkpoint.py "$BUILD" --repeats "$REPEATS" --threads "$THREADS" \
                  --json "$OUT/parts/checkpoint.json" ;;
    loader) train_json=()
            [ -f "$OUT/parts/train.json" ] && train_json=(--train-json "$OUT/parts/train.json")
            $PY bench/bench_loader.py "$BUILD" --repeats "$REPEATS" "${train_json[@]}" --json "$OUT/parts/loader.json" ;;
    zero) $PY bench/bench_zero.py --build "$BUILD" --json "$OUT/parts/zero.json" ;;
    *) echo "unknown part '$1' (train, checkpoint, loader, zero)" >&2; exit 2 ;;
  esac
}

for part in "${parts[@]}"; do
  echo "== $part"
  rm -f "$OUT/parts/$part.json"
  run_part "$part" || echo "== $part FAILED (see above); the table leaves it out"
done

echo "== summary"
$PY bench/report.py "$OUT/parts" "$OUT/latest.json"
