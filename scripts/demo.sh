#!/usr/bin/env bash
# The main job on an embedded default, from a fresh machine: installs, builds, then (scripts/demo-run.sh)
# makes a tiny random LLaVA, a tokenizer and a synthetic shapes data set, trains stage 1 and stage 2 (LoRA,
# interrupted and resumed), and answers questions about held-out images. Output in ${DEMO_OUT:-demo-out}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh cpu
scripts/demo-run.sh build "${DEMO_OUT:-demo-out}"
