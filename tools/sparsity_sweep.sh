#!/usr/bin/env bash
# The sparsity sweep of docs/EXPERIMENTS.md: on the demo backbone and a demo corpus, PER after
# S3-Router mask learning at several sparsities (0 = the head alone) with the demo's recipe, and
# after weight finetuning (`engine finetune`, same recipe) at a few learning rates; on the Spanish
# demo corpus also the initialisation ablation at 10%.
#
#   tools/sparsity_sweep.sh [WORK_DIR [CORPUS_DIR [SPARSITIES [FINETUNE_LRS]]]]
#       defaults /tmp/s3r-sweep, weights/demo-corpus/es, "0 0.02 0.05 0.1 0.2 0.4 0.6", "5e-4 2e-3";
#       ~15 min on 2 cores. Other languages: a tools/make_corpus.py folder, e.g. /tmp/s3r-langs/corpus/nl.
#       Set ABLATIONS=0 to skip the initialisation runs.
set -euo pipefail
work=${1:-/tmp/s3r-sweep}
corpus=${2:-weights/demo-corpus/es}
sparsities=${3-0 0.02 0.05 0.1 0.2 0.4 0.6}
finetune_lrs=${4-5e-4 2e-3}
engine=target/release/engine
common=(--model weights/s3r-demo-en --train "$corpus/train.tsv" --valid "$corpus/dev.tsv" --labels phn --skip-unknown
  --steps 300 --max-tokens 400000 --valid-every 100 --mask-time-prob 0.3 --mask-channel-prob 0 --layerdrop 0
  --best-metric uer --overwrite --quiet)
per() {
  python3 -c "import json; print(round(100 * json.load(open('$work/$1/best/valid.json'))['uer'], 2))"
}
run() {
  local command=$1 name=$2; shift 2
  "$engine" "$command" "${common[@]}" --out "$work/$name" "$@" > /dev/null
  printf '%s\t%s\n' "$name" "$(per "$name")"
}
{
  for s in $sparsities; do run train "sparsity-$s" --lr 5e-3 --sparsity "$s"; done
  for lr in $finetune_lrs; do run finetune "finetune-lr-$lr" --lr "$lr"; done
  if [ "$corpus" = weights/demo-corpus/es ] && [ "${ABLATIONS:-1}" != 0 ]; then
    run train "random-init-0.1" --lr 5e-3 --sparsity 0.1 --init random
    run train "magnitude-scaled-0.1" --lr 5e-3 --sparsity 0.1 --init magnitude-scaled
  fi
} | tee "$work.tsv"
