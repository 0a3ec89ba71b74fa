#!/usr/bin/env bash
# The sparsity sweep of docs/EXPERIMENTS.md: on the demo backbone and the committed Spanish demo
# corpus, PER after S3-Router mask learning at several sparsities (0 = the head alone), with the
# demo's recipe, plus the random-initialisation ablation at 10%.
#
#   tools/sparsity_sweep.sh [WORK_DIR [CORPUS_DIR [SPARSITIES]]]
#       default /tmp/s3r-sweep, weights/demo-corpus/es, "0 0.02 0.05 0.1 0.2 0.4 0.6"; ~10 min on 2 cores
#   (other languages: a tools/make_corpus.py folder, e.g. /tmp/s3r-langs/corpus/nl)
set -euo pipefail
work=${1:-/tmp/s3r-sweep}
corpus=${2:-weights/demo-corpus/es}
sparsities=${3:-0 0.02 0.05 0.1 0.2 0.4 0.6}
engine=target/release/engine
run() {
  local name=$1; shift
  "$engine" train --model weights/s3r-demo-en --train "$corpus/train.tsv" --valid "$corpus/dev.tsv" \
    --labels phn --skip-unknown --lr 5e-3 --steps 300 --max-tokens 400000 --valid-every 100 --mask-time-prob 0.3 \
    --mask-channel-prob 0 --layerdrop 0 --best-metric uer --out "$work/$name" --overwrite --quiet "$@" > /dev/null
  printf '%s\t%s\n' "$name" "$(python3 -c "import json; print(round(100 * json.load(open('$work/$name/best/valid.json'))['uer'], 2))")"
}
{
  for s in $sparsities; do run "sparsity-$s" --sparsity "$s"; done
  if [ "$corpus" = weights/demo-corpus/es ]; then
    run "random-init-0.1" --sparsity 0.1 --init random
    run "magnitude-scaled-0.1" --sparsity 0.1 --init magnitude-scaled
  fi
} | tee "$work.tsv"
