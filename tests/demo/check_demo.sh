#!/usr/bin/env bash
# Runs the demo with seed 0 on BUILD_DIR into OUT_DIR and checks its summary lines:
#   - each stage's last logged loss is below its first (stage 2 over the interruption and the resume);
#   - the resumed run really resumed (from the checkpoint saved before the interruption);
#   - held-out accuracy well above chance: color >= 14/20 (chance 4/20), position >= 12/20 (chance 5/20),
#     all three kinds >= 36/60 (chance ~16/60). Measured with seed 0: color 20/20, shape 12/20,
#     position 19/20, all 51/60; the margins absorb other libtorch versions' numerics.
# usage: tests/demo/check_demo.sh BUILD_DIR OUT_DIR
set -euo pipefail
build=$1 out=$2
mkdir -p "$out"
log=$out/demo.log
DEMO_SEED=0 "$(dirname "$0")/../../scripts/demo-run.sh" "$build" "$out" >"$log" 2>&1 || { cat "$log"; exit 1; }
tail -4 "$log"
status=0
check() {  # description, awk condition on $0's fields
  if ! awk "$2 { ok = 1 } END { exit !ok }" <<<"$3"; then echo "FAILED: $1: $3"; status=1; fi
}
for stage in 1 2; do
  line=$(grep "^stage $stage loss" "$log" | sed 's/.*: //')
  check "stage $stage loss falls" '$2 < $1' "$line"
done
grep -q "^resuming from .*/stage2/checkpoint-100 at step 100" "$log" || { echo "FAILED: stage 2 did not resume"; status=1; }
acc=$(grep '^accuracy:' "$log" | sed 's/ (chance.*//')
fraction() { sed -n "s|.*$1 \([0-9]*\)/\([0-9]*\).*|\1 \2|p" <<<"$acc"; }
check "color accuracy >= 14/20" '$1 >= 14 && $2 == 20' "$(fraction color)"
check "position accuracy >= 12/20" '$1 >= 12 && $2 == 20' "$(fraction position)"
check "overall accuracy >= 36/60" '$1 >= 36 && $2 == 60' "$(fraction all)"
exit $status
