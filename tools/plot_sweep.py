#!/usr/bin/env python3
"""The sparsity-sweep figure of docs/EXPERIMENTS.md: dev PER against sparsity per language for
S3-Router (sparsity 0 = the head alone on the frozen backbone), with weight finetuning (its best
learning rate) as a dashed line, like the paper's finetuning-mode plot.

    pip install matplotlib && python3 tools/plot_sweep.py docs/figures/sparsity-sweep.tsv docs/figures/sparsity-sweep

Input: a TSV with columns language, method (s3router | finetune), setting (the sparsity, or the
learning rate for finetune), per (dev PER, %), as tools/sparsity_sweep.sh measures them. Writes
STEM.svg and STEM.png.
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Sparsity 0 (head only) drawn at this x on the log axis.
HEAD_ONLY_X = 0.01


def main(tsv, stem):
    sweep, finetune = defaultdict(list), defaultdict(list)
    with open(tsv) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            target = sweep if row["method"] == "s3router" else finetune
            target[row["language"]].append((float(row["setting"]), float(row["per"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, lang in enumerate(sorted(sweep)):
        color = f"C{i}"
        points = sorted(sweep[lang])
        xs = [HEAD_ONLY_X if s == 0 else s for s, _ in points]
        ax.plot(xs, [p for _, p in points], "o-", color=color, label=f"{lang}: S3-Router (0 = head only)")
        if finetune[lang]:
            best = min(p for _, p in finetune[lang])
            ax.axhline(best, color=color, linestyle="--", linewidth=1, label=f"{lang}: weight finetuning")
    ax.set_xscale("log")
    ticks = [HEAD_ONLY_X, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0" if t == HEAD_ONLY_X else f"{t:g}" for t in ticks])
    ax.set_xlabel("sparsity (fraction of FFN weights dropped per matrix)")
    ax.set_ylabel("dev phoneme error rate (%)")
    ax.set_title("Demo backbone (English) adapted to three languages")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(stem + ".svg")
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
