#!/usr/bin/env bash
# The project's test command: set-up if needed, all three builds, ctest on each, one summary.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
scripts/build.sh debian torch2 asan || exit 1

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0  # libtorch's static registries "leak" by design
export UBSAN_OPTIONS=print_stacktrace=1
total_pass=0 total_fail=0 status=0
for dir in build build-torch2 build-asan; do
  echo "== ctest $dir"
  log="$dir/ctest.log"
  (cd "$dir" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1200) 2>&1 | tee "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  summary=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$log" | tail -1)
  total=$(echo "$summary" | sed -E 's/.* out of ([0-9]+).*/\1/')
  failed=$(echo "$summary" | sed -E 's/.*, ([0-9]+) tests failed.*/\1/')
  [ -n "$total" ] || { echo "no ctest summary for $dir"; status=1; continue; }
  total_pass=$((total_pass + total - failed)); total_fail=$((total_fail + failed))
done
echo
echo "total: ${total_pass} passed, ${total_fail} failed"
exit $status
