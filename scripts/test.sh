#!/usr/bin/env bash
# The project's test command: set-up if needed, the four builds, ctest in each, every fuzz target for
# FUZZ_SECONDS, one summary line.
#   build/       every test
#   build-cuda/  the CUDA libtorch on this GPU-less machine: every Catch2 test and the multi-rank tests
#                (CTEST_CUDA_LABELS), which shows the CUDA build runs the CPU paths; the rest are the same code
#   build-asan/  the Catch2 tests under ASan + UBSan
set -uo pipefail
cd "$(dirname "$0")/.."

# Disk: a cold run needs ~19 GB (the two venvs 7 GB, the four builds 12 GB). Say so up front rather than
# fail in the middle of an install with "No space left on device".
need_mb=1000
for part in .venv:1500 .venv-cuda:5600 build:3500 build-cuda:3600 build-asan:4500 build-fuzz:400; do
  [ -e "${part%%:*}" ] || need_mb=$((need_mb + ${part##*:}))
done
free_mb=$(df -Pm . | awk 'NR == 2 { print $4 }')
echo "test.sh: ${free_mb} MB free here, about ${need_mb} MB needed"
if [ "${free_mb:-0}" -lt "$need_mb" ]; then
  echo "error: test.sh: not enough disk space in $(pwd): ${free_mb} MB free, about ${need_mb} MB needed for the venvs and builds not yet made" >&2
  exit 1
fi
scripts/setup.sh --cuda || exit 1
scripts/build.sh cpu cuda asan fuzz || exit 1

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0  # libtorch's static registries "leak" by design
export UBSAN_OPTIONS=print_stacktrace=1
total_pass=0 total_fail=0 status=0
for dir in build build-cuda build-asan; do
  echo "== ctest $dir"
  log="$dir/ctest.log"
  only=()
  [ "$dir" = build-cuda ] && only=(-L "${CTEST_CUDA_LABELS:-catch|multirank}")
  [ "$dir" = build-asan ] && only=(-L catch)
  (cd "$dir" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1200 "${only[@]}") 2>&1 | tee "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  summary=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$log" | tail -1)
  total=$(echo "$summary" | sed -E 's/.* out of ([0-9]+).*/\1/')
  failed=$(echo "$summary" | sed -E 's/.*, ([0-9]+) tests failed.*/\1/')
  [ -n "$total" ] || { echo "no ctest summary for $dir"; status=1; continue; }
  total_pass=$((total_pass + total - failed)); total_fail=$((total_fail + failed))
done
echo "== fuzz"
FUZZ_SECONDS=${FUZZ_SECONDS:-60} scripts/fuzz.sh 2>&1 | tee build-fuzz/fuzz.log
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
summary=$(grep -E "^fuzz: [0-9]+ passed, [0-9]+ failed" build-fuzz/fuzz.log | tail -1)
if [ -n "$summary" ]; then
  total_pass=$((total_pass + $(echo "$summary" | sed -E 's/fuzz: ([0-9]+) passed.*/\1/')))
  total_fail=$((total_fail + $(echo "$summary" | sed -E 's/.*, ([0-9]+) failed/\1/')))
else
  echo "no fuzz summary"; status=1
fi

echo
echo "total: ${total_pass} passed, ${total_fail} failed"
exit $status
