#!/usr/bin/env bash
# The pruning comparison of docs/EXPERIMENTS.md (the paper's S3-Router-P vs OMP vs PARP, at demo
# scale): the demo backbone finetuned on a demo corpus (`engine finetune`), then pruned to each
# sparsity with each method, every run with the demo's recipe (300 updates); prints dev PER.
#
#   tools/pruning_experiment.sh [WORK_DIR [CORPUS_DIR [SPARSITIES [FINETUNE_LR]]]]
#       defaults /tmp/s3r-prune, weights/demo-corpus/es, "0.5 0.7 0.9", 2e-3; ~20 min on 2 cores
set -euo pipefail
work=${1:-/tmp/s3r-prune}
corpus=${2:-weights/demo-corpus/es}
sparsities=${3:-0.5 0.7 0.9}
lr=${4:-2e-3}
engine=target/release/engine
backbone=weights/s3r-demo-en
common=(--train "$corpus/train.tsv" --valid "$corpus/dev.tsv" --labels phn --skip-unknown --steps 300
  --max-tokens 400000 --valid-every 100 --mask-time-prob 0.3 --mask-channel-prob 0 --layerdrop 0
  --best-metric uer --overwrite --quiet)
per() {
  python3 -c "import json; print(round(100 * json.load(open('$work/$1/best/valid.json'))['uer'], 2))"
}
run() {
  local name=$1; shift
  "$engine" "$@" "${common[@]}" --out "$work/$name" > /dev/null
  printf '%s\t%s\n' "$name" "$(per "$name")"
}
{
  run finetuned finetune --model "$backbone" --lr "$lr"
  for s in $sparsities; do
    # S3-Router-P learns masks (lr as mask learning); OMP and PARP finetune weights (lr as finetuning).
    run "s3router-p-$s" prune --method s3router-p --model "$work/finetuned/best" --sparsity "$s" --lr 5e-3
    run "omp-$s" prune --method omp --model "$work/finetuned/best" --pretrained "$backbone" --sparsity "$s" --lr "$lr"
    run "parp-$s" prune --method parp --model "$backbone" --sparsity "$s" --reprune-every 50 --lr "$lr"
  done
} | tee "$work.tsv"
