#!/usr/bin/env bash
# The demo on an existing build, from nothing: `llava make-demo` draws a synthetic shapes data set, trains
# a tokenizer and writes a tiny random LLaVA; `llava train` runs stage 1 (projector on captions) and stage 2
# (LoRA on questions), interrupted on purpose and resumed from its checkpoint; `llava infer` then answers
# questions about held-out images. Ends with the summary lines tests/demo checks.
# usage: scripts/demo-run.sh [BUILD_DIR [OUT_DIR]]   (defaults: build, demo-out; DEMO_SEED=0)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
out=${2:-$root/demo-out}
seed=${DEMO_SEED:-0}
llava=$build/src/cli/llava
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "${out:?}"/{model,data,stage1,stage2} "$out"/{stage1,stage2-interrupted,stage2-resumed}.log "$out/answers.tsv"  # from nothing
start=$(date +%s)

# The first and the last logged loss of HF log lines ({'loss': 2.5, ...}).
losses() { sed -n "s/^{'loss': \([^,]*\),.*/\1/p" "$@" | sed -n '1p;$p' | paste -sd' '; }
latest_checkpoint() { ls -d "$1"/checkpoint-* | sort -t- -k2 -n | tail -1; }

echo "== 1/4 make-demo: a random tiny LLaVA, a sentencepiece tokenizer and a synthetic shapes data set"
"$llava" make-demo --out "$out" --seed "$seed"

common=(--set "model_name_or_path=$out/model" --set "image_folder=$out/data" --set "seed=$seed")
echo "== 2/4 stage 1: only the projector trains, on captions (configs/demo-stage1.yaml)"
"$llava" train "$root/configs/demo-stage1.yaml" "${common[@]}" --set "data_path=$out/data/captions.json" \
  --set "output_dir=$out/stage1" | tee "$out/stage1.log"
projector=$(latest_checkpoint "$out/stage1")/mm_projector.bin

stage2=("$root/configs/demo-stage2.yaml" "${common[@]}" --set "data_path=$out/data/questions.json"
        --set "output_dir=$out/stage2" --set "pretrain_mm_mlp_adapter=$projector")
stop=${DEMO_STOP_AFTER:-120}
echo "== 3/4 stage 2: LoRA + projector on questions (configs/demo-stage2.yaml), stopped after step $stop as if killed ..."
"$llava" train "${stage2[@]}" --stop-after-steps "$stop" | tee "$out/stage2-interrupted.log"
echo "== ... and resumed from its last checkpoint ($(basename "$(latest_checkpoint "$out/stage2")"))"
"$llava" train "${stage2[@]}" --set resume_from_checkpoint=auto | tee "$out/stage2-resumed.log"
adapter=$(latest_checkpoint "$out/stage2")

echo "== 4/4 questions about held-out images (greedy; model: $out/model + $(basename "$adapter"))"
printf '%-22s %-9s %-36s %-13s %s\n' image kind question expected answer
declare -A right total
while IFS=$'\t' read -r image kind question expected; do
  answer=$("$llava" infer --model "$out/model" --adapter "$adapter" --projector "$adapter/non_lora_trainables.bin" \
             --template vicuna_v1 --image "$out/data/$image" --prompt "$question" --max-new-tokens 8)
  answer=$(echo "$answer" | sed 's/^ *//; s/ *$//')
  mark=wrong
  [ "$answer" = "$expected" ] && mark=right && right[$kind]=$((${right[$kind]:-0} + 1))
  total[$kind]=$((${total[$kind]:-0} + 1))
  printf '%-22s %-9s %-36s %-13s %s (%s)\n' "$(basename "$image")" "$kind" "$question" "$expected" "$answer" "$mark"
  printf '%s\t%s\t%s\t%s\t%s\n' "$image" "$kind" "$expected" "$answer" "$mark" >>"$out/answers.tsv"
done <"$out/data/test.tsv"

all_right=0 all_total=0 per_kind=""
for kind in color shape position; do
  all_right=$((all_right + ${right[$kind]:-0})) all_total=$((all_total + ${total[$kind]:-0}))
  per_kind+=" $kind ${right[$kind]:-0}/${total[$kind]:-0}"
done
echo "stage 1 loss (first, last logged): $(losses "$out/stage1.log")"
echo "stage 2 loss (first, last logged): $(losses "$out/stage2-interrupted.log" "$out/stage2-resumed.log")"
echo "accuracy:$per_kind; all $all_right/$all_total (chance: color 1/5, shape 1/3, position 1/4)"
echo "demo took $(($(date +%s) - start)) s"
