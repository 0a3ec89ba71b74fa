#!/usr/bin/env bash
# The mask-similarity experiment of docs/EXPERIMENTS.md: S3-Router masks at 10% sparsity for
# seven languages over the frozen demo backbone (weights/s3r-demo-en), then `engine masks
# compare` (mask cosine per layer vs phoneme-inventory cosine, Pearson / Spearman / Mantel p).
#
#   tools/mask_similarity_experiment.sh [WORK_DIR]     # default /tmp/s3r-langs; ~15 min on 2 cores
#
# Needs espeak-ng, sox and `pip install wordfreq` for the corpus, and a release build.
set -euo pipefail
work=${1:-/tmp/s3r-langs}
langs=(es nl it ru sv tr fr)
engine=target/release/engine
python3 tools/make_corpus.py --out "$work/corpus" --languages "$(IFS=,; echo "${langs[*]}")" --train 300 --dev 60 --test 0
sets=()
for lang in "${langs[@]}"; do
  "$engine" train --model weights/s3r-demo-en --train "$work/corpus/$lang/train.tsv" --valid "$work/corpus/$lang/dev.tsv" \
    --labels phn --skip-unknown --lr 5e-3 --steps 300 --max-tokens 400000 --valid-every 100 --mask-time-prob 0.3 \
    --mask-channel-prob 0 --layerdrop 0 --sparsity 0.1 --best-metric uer --out "$work/masks/$lang" --overwrite --quiet
  sets+=("$lang=$work/masks/$lang")
done
"$engine" masks compare --csv "$work/compare.csv" "${sets[@]}" | tee "$work/compare.txt"
"$engine" masks compare --json "${sets[@]}" > "$work/compare.json"
for lang in "${langs[@]}"; do
  printf '%s UER %s\n' "$lang" "$(python3 -c "import json; print(round(json.load(open('$work/masks/$lang/best/valid.json'))['uer'], 4))")"
done | tee "$work/uer.txt"
