#!/usr/bin/env python3
"""Reference values for CTC and error rates, from PyTorch and jiwer (tests/fixtures/ctc/).

CTC: torch.nn.functional.ctc_loss (fp32, CPU native implementation) with log_softmax inside the
graph, so the gradient is with respect to the raw logits. Cases cover random shapes, repeated
labels, label length equal to the frames (tight), infeasible alignments with zero_infinity, a long
input (T = 2000, logits peaked along an alignment as a trained model's are), a blank that is not
0, and an empty transcript. Logits are stored packed
([sum of frames, vocab], utterance after utterance), as the engine holds them.

Error rates: jiwer's word and character alignments (hits, substitutions, deletions, insertions).

    pip install torch jiwer safetensors numpy
    python3 tools/make_ctc_fixtures.py
"""
import json
import os

import jiwer
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ctc")


def peaked(logits, labels, blank, boost=8.0):
    """Raises the logits along a plausible alignment (each label, then blanks), like a trained
    model. Random logits over thousands of frames put log p near -T log V, where fp32 log-space
    alphas of magnitude ~1e4 carry ~1e-3 absolute error in PyTorch itself."""
    T, S = logits.shape[0], len(labels)
    for t in range(T):
        i = min(S - 1, t * S // T)
        first_half = (t - i * T // S) < max(1, (T // S) // 2)
        logits[t, labels[i] if first_half else blank] += boost
    return logits


def case(name, frames, labels, vocab, blank=0, zero_infinity=False, seed=0, scale=3.0, peak=False):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(t, vocab, generator=g) * scale for t in frames]
    if peak:
        logits = [peaked(x, l, blank) for x, l in zip(logits, labels)]
    T = max(frames)
    padded = torch.zeros(T, len(frames), vocab)
    for b, x in enumerate(logits):
        padded[: frames[b], b] = x
    padded.requires_grad_(True)
    lp = F.log_softmax(padded, dim=-1)
    flat = torch.tensor([l for seq in labels for l in seq], dtype=torch.long)
    losses = F.ctc_loss(lp, flat, torch.tensor(frames), torch.tensor([len(s) for s in labels]), blank=blank,
                        reduction="none", zero_infinity=zero_infinity)
    losses.sum().backward()  # reduction "sum": the gradient of the summed loss
    grad = torch.cat([padded.grad[: frames[b], b] for b in range(len(frames))])
    tensors = {f"{name}.logits": torch.cat(logits).contiguous(), f"{name}.grad": grad.contiguous(),
               f"{name}.losses": losses.detach().float().contiguous()}
    meta = {"frames": frames, "labels": labels, "vocab": vocab, "blank": blank, "zero_infinity": zero_infinity}
    return tensors, meta


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)
    cases = {}
    tensors = {}

    def add(name, *args, **kw):
        t, m = case(name, *args, **kw)
        tensors.update(t)
        cases[name] = m

    add("random", [20, 13, 30], [[1, 4, 2, 6, 3], [5], list(map(int, rng.integers(1, 7, 12)))], 7, seed=1)
    add("repeats", [12, 9], [[2, 2, 2, 3, 3], [1, 1, 1, 1]], 5, seed=2)
    # Tight: frames = labels (no repeats), and frames = labels + repeats (one blank per repeat).
    add("tight", [6, 7], [[1, 2, 3, 4, 5, 1], [2, 2, 3, 3, 4]], 6, seed=3)
    add("infeasible_zero_inf", [4, 10], [[1, 2, 3, 4, 5], [1, 2]], 6, zero_infinity=True, seed=4)
    add("long", [2000, 1500], [list(map(int, rng.integers(1, 32, 300))), list(map(int, rng.integers(1, 32, 220)))], 32, seed=5,
        scale=1.0, peak=True)
    add("blank_last", [15, 11], [[0, 1, 2, 0], [3, 3, 1]], 5, blank=4, seed=6)
    add("empty", [8, 5], [[], [2, 1]], 4, seed=7)
    safetensors.torch.save_file(tensors, os.path.join(OUT, "ctc.safetensors"))

    pairs = [
        ("the cat sat on the mat", "the cat sit on mat"),
        ("hello world", "hello there world"),
        ("a b c d", "x y"),
        ("", "extra words"),
        ("same text here", "same text here"),
        ("kitten", "sitting"),
    ]
    metrics = []
    for ref, hyp in pairs:
        entry = {"ref": ref, "hyp": hyp}
        if ref:
            w = jiwer.process_words(ref, hyp)
            c = jiwer.process_characters(ref, hyp)
            entry["words"] = {"hits": w.hits, "sub": w.substitutions, "del": w.deletions, "ins": w.insertions}
            entry["chars"] = {"hits": c.hits, "sub": c.substitutions, "del": c.deletions, "ins": c.insertions}
        metrics.append(entry)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"ctc": cases, "error_rates": metrics, "torch": torch.__version__, "jiwer": jiwer.__version__ if hasattr(jiwer, "__version__") else "unknown"}, f, indent=1)
    print("written", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
