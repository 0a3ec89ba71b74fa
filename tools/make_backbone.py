#!/usr/bin/env python3
"""The demo backbone in weights/s3r-demo-en: a small wav2vec2 (post-LN, group norm, the
wav2vec2-base layout at a few M parameters) trained with CTC on English espeak-ng phonemes. It
stands in for a self-supervised pretrained model, which cannot be fetched here: S3-Router then
learns masks over its frozen FFN weights for another language (`engine train` with no arguments).

    apt-get install espeak-ng sox && pip install torch transformers safetensors soundfile wordfreq
    python3 tools/make_corpus.py --out /tmp/corpus --languages en --train 2500 --dev 200 --test 200
    python3 tools/make_backbone.py --corpus /tmp/corpus/en --out weights/s3r-demo-en --minutes 30

Everything is seeded; the time budget (--minutes) fixes how many updates run, so a faster machine
trains the same model in less time only when given --updates instead.
"""
import argparse
import collections
import json
import math
import os
import random
import time

import numpy as np
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def read_split(corpus, split):
    lines = open(os.path.join(corpus, f"{split}.tsv")).read().splitlines()
    root = lines[0]
    rows = [l.split("\t") for l in lines[1:]]
    labels = open(os.path.join(corpus, f"{split}.phn")).read().splitlines()
    return [(os.path.join(root, r[0]), int(r[1]), lab) for r, lab in zip(rows, labels)]


def build_vocab(utts):
    """As `engine vocab` (src/model/vocab.rs Vocab::build): specials, `|`, then symbols by falling
    frequency, ties in code-point order."""
    counts = collections.Counter(s for _, _, lab in utts for s in lab.split() if s != "|")
    rest = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return SPECIALS + ["|"] + [s for s, _ in rest]


def load_audio(path):
    x, sr = sf.read(path, dtype="float32")
    assert sr == 16000, path
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def batches(utts, max_samples, rng):
    order = sorted(range(len(utts)), key=lambda i: utts[i][1])
    out, cur, total = [], [], 0
    for i in order:
        if cur and total + utts[i][1] > max_samples:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += utts[i][1]
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(utts, idx, audio, ids):
    xs = [audio[i] for i in idx]
    n = max(len(x) for x in xs)
    x = torch.zeros(len(xs), n)
    for j, a in enumerate(xs):
        x[j, : len(a)] = torch.from_numpy(a)
    labels = [ids[i] for i in idx]
    m = max(len(l) for l in labels)
    y = torch.full((len(xs), m), -100, dtype=torch.long)
    for j, l in enumerate(labels):
        y[j, : len(l)] = torch.tensor(l)
    return x, y


def per(model, utts, audio, ids, vocab):
    """Greedy-decoding phoneme error rate (edit distance over phones, `|` excluded)."""
    model.eval()
    errs = total = 0
    with torch.no_grad():
        for i in range(len(utts)):
            logits = model(torch.from_numpy(audio[i])[None]).logits[0]
            path = logits.argmax(-1).tolist()
            hyp = [p for k, p in enumerate(path) if p != 0 and (k == 0 or p != path[k - 1])]
            hyp = [p for p in hyp if vocab[p] not in SPECIALS and vocab[p] != "|"]
            ref = [p for p in ids[i] if vocab[p] != "|"]
            d = list(range(len(hyp) + 1))
            for r in ref:
                prev, d[0] = d[0], d[0] + 1
                for j, h in enumerate(hyp):
                    prev, d[j + 1] = d[j + 1], min(d[j + 1] + 1, d[j] + 1, prev + (r != h))
            errs += d[-1]
            total += len(ref)
    model.train()
    return errs / max(total, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--updates", type=int, default=0, help="fixed update count instead of a time budget")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-samples", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    train, dev = read_split(args.corpus, "train"), read_split(args.corpus, "dev")
    vocab = build_vocab(train)
    index = {t: i for i, t in enumerate(vocab)}
    ids_train = [[index[s] for s in lab.split()] for _, _, lab in train]
    ids_dev = [[index.get(s, 3) for s in lab.split()] for _, _, lab in dev]
    audio_train = [load_audio(p) for p, _, _ in train]
    audio_dev = [load_audio(p) for p, _, _ in dev]
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=768,
        conv_dim=(128,) * 7,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        hidden_dropout=0.05,
        attention_dropout=0.05,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.05,
        mask_time_length=5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )
    model = Wav2Vec2ForCTC(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters, {len(vocab)} tokens, {len(train)} training utterances")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    # Measure the speed on the first epoch's batches, then fix the update count from the budget.
    epoch_batches = batches(train, args.max_samples, rng)
    planned = args.updates
    start = time.time()
    step = 0
    warmup = 300
    model.train()
    while True:
        for idx in epoch_batches:
            if planned and step >= planned:
                break
            total = planned or 10**9
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / total))) if planned else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = collate(train, idx, audio_train, ids_train)
            loss = model(x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            if step == 50 and not planned:
                per_step = (time.time() - start) / 50
                planned = max(100, int(args.minutes * 60 / per_step))
                print(f"{per_step:.2f} s per update: planning {planned} updates")
            if step % 100 == 0:
                print(f"update {step}/{planned} loss {loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f} s", flush=True)
            if step % 1000 == 0:
                print(f"  dev PER {per(model, dev[:100], audio_dev, ids_dev, vocab):.3f}", flush=True)
        if planned and step >= planned:
            break
        epoch_batches = batches(train, args.max_samples, rng)
    dev_per = per(model, dev, audio_dev, ids_dev, vocab)
    print(f"final dev PER {dev_per:.3f} after {step} updates, {time.time() - start:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                   "padding_value": 0.0, "do_normalize": True, "return_attention_mask": False}, f, indent=1)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"updates": step, "dev_per": dev_per, "parameters": params, "torch": torch.__version__,
                   "args": vars(args), "train_utterances": len(train)}, f, indent=1)


if __name__ == "__main__":
    main()
