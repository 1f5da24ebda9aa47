#!/usr/bin/env bash
# Runs the libFuzzer targets of build-fuzz/ (scripts/build.sh fuzz), each for FUZZ_SECONDS (default 60)
# from its seed corpus tests/fuzz/corpus/<target>/, FUZZ_JOBS targets at a time (default 2). A target
# fails when it finds an input that crashes, trips ASan/UBSan, throws anything but llava::Error, runs
# longer than 10 s or needs more than 2 GB; the input is kept under build-fuzz/fuzz-work/<target>/.
# Once fixed, copy it into tests/fuzz/corpus/<target>/ so that every later run replays it.
# usage: scripts/fuzz.sh [target...]   (names without the fuzz_ prefix; default: all)
# Last line: "fuzz: P passed, F failed".
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
JOBS=${FUZZ_JOBS:-2}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for dir in tests/fuzz/corpus/*/; do targets+=("$(basename "$dir")"); done
fi

run_one() {  # target -> prints one result line
  local t=$1 bin=build-fuzz/tests/fuzz/fuzz_$1 work=build-fuzz/fuzz-work/$1
  if [ ! -x "$bin" ]; then echo "fuzz $t: FAILED (no $bin; run scripts/build.sh fuzz)"; return; fi
  rm -rf "$work" && mkdir -p "$work/corpus" "$work/tmp"
  # New inputs go to the work corpus; the committed seeds (and regression inputs) are read only.
  FUZZ_TMP="$PWD/$work/tmp" ASAN_OPTIONS=abort_on_error=0:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    LSAN_OPTIONS=suppressions="$PWD/tests/fuzz/lsan.supp":print_suppressions=0 \
    "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$work/" "$work/corpus" "tests/fuzz/corpus/$t" >"$work/log" 2>&1
  local rc=$?
  local runs; runs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$work/log" | grep -oE "[0-9]+$")
  if [ $rc -eq 0 ]; then
    echo "fuzz $t: passed (${runs:-?} inputs in ${SECONDS_EACH}s)"
  else
    local input; input=$(ls "$work"/crash-* "$work"/timeout-* "$work"/oom-* "$work"/leak-* 2>/dev/null | head -1)
    echo "fuzz $t: FAILED (exit $rc; input ${input:-none}; log $work/log)"
    grep -E "ERROR|runtime error|terminate called|what\(\)|SUMMARY" "$work/log" | head -5 | sed 's/^/    /'
  fi
}
export -f run_one
export SECONDS_EACH

results=$(printf '%s\n' "${targets[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}')
echo "$results"
passed=$(grep -c ": passed" <<<"$results")
failed=$(grep -c ": FAILED" <<<"$results")
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
