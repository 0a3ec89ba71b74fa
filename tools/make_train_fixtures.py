#!/usr/bin/env python3
"""Reference values for training (tests/fixtures/train.json and train_grads.safetensors):

- torch.optim.Adam with S3-Router's settings (betas 0.9/0.98, eps 1e-8) over a few steps;
- S3-Router gradients ("masked"): the base-like and large-like fixture models with every FFN linear masked
  as the official code does it (per-matrix top-k of |scores|, W * M, straight-through to
  scores), CTC loss (sum over utterances, zero_infinity) on the three test utterances, and the
  gradients of the scores and of the head. Each utterance runs alone (no padding), so the sum
  equals the engine's packed batch.
- The same with every regulariser on ("regularised"): all six linears of each layer masked
  (q/k/v/out and the FFN), SpecAugment time spans replaced by masked_spec_embed, channel spans
  zeroed, one layer skipped (LayerDrop), and hidden / attention / activation dropout inside the
  transformers modules, with the engine's counter-based masks (src/dropout.rs: splitmix64 of
  (seed, site, index), recomputed here in numpy) so both sides drop the same elements.

    pip install torch transformers safetensors numpy && python3 tools/make_train_fixtures.py
"""
import json
import os
import wave

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "train.json")
SPARSITY = 0.3
TRANSCRIPTS = {"base-like": ["BAD CAFE", "DEAF", "FACE A BEE"], "large-like": ["bad cafe", "deaf", "face a bee"]}


class TopK(torch.autograd.Function):
    """GetSubnet: keep the top numel - floor(s * numel) of |scores|; gradient passes straight."""

    @staticmethod
    def forward(ctx, scores, sparsity):
        flat = scores.abs().flatten()
        drop = int(sparsity * flat.numel())
        mask = torch.ones_like(flat)
        mask[flat.argsort()[:drop]] = 0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, g):
        return g, None


class MaskedLinear(torch.nn.Module):
    def __init__(self, lin, scores, sparsity=SPARSITY):
        super().__init__()
        self.lin = lin
        self.scores = torch.nn.Parameter(scores)
        self.sparsity = sparsity

    def forward(self, x):
        return F.linear(x, self.lin.weight * TopK.apply(self.scores.abs(), self.sparsity) * 1.0, self.lin.bias)


def read_wav(path):
    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def utterances(name, dtype):
    """(index, transcript, waveform) of the three test utterances, preprocessed for model `name`,
    and its vocabulary."""
    vocab = json.load(open(os.path.join(ROOT, name, "vocab.json")))
    pre = json.load(open(os.path.join(ROOT, name, "preprocessor_config.json")))
    out = []
    for u, text in enumerate(TRANSCRIPTS[name]):
        x = torch.from_numpy(read_wav(os.path.join(ROOT, "audio", f"utt{u}.wav"))).to(dtype)
        if pre["do_normalize"]:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        out.append((u, text, x))
    return out, vocab


def ctc_sum(logits, text, vocab, blank):
    """CTC loss summed over frames (zero_infinity), letters with `|` for spaces; and the frames."""
    target = torch.tensor([vocab["|" if ch == " " else ch] for ch in text])
    lp = torch.log_softmax(logits, -1)[:, None]
    loss = F.ctc_loss(lp, target[None], torch.tensor([lp.shape[0]]), torch.tensor([len(target)]),
                      blank=blank, reduction="sum", zero_infinity=True)
    return loss, lp.shape[0]


# SpecAugment time masks for the "specaug" cases: frame spans per utterance.
TIME_MASKS = [[(3, 13)], [(20, 25)], [(50, 60), (100, 104)]]


def spec_augmented_loss(model, u, text, x, vocab, channel_masks):
    """CTC loss of utterance `u` (waveform `x`) through a `*ForCTC` model, its projected features'
    TIME_MASKS spans replaced by `masked_spec_embed` and its `channel_masks` spans zeroed; and
    its frame count."""
    base = model.base_model
    features = base.feature_extractor(x[None]).transpose(1, 2)
    hidden, _ = base.feature_projection(features)
    hidden = hidden.clone()
    for a, b in TIME_MASKS[u]:
        hidden[0, a:b] = base.masked_spec_embed
    for a, b in channel_masks[u]:
        hidden[0, :, a:b] = 0
    logits = model.lm_head(base.encoder(hidden).last_hidden_state)[0]
    return ctc_sum(logits, text, vocab, model.config.pad_token_id)


def masked_gradients(tensors, meta, dtype=torch.float64, specaug=False):
    """In float64: the fp32 engine is compared with the exact values. (An fp32 reference carries
    ~1.5e-4 relative error of its own in these gradients: the CTC gradient subtracts two nearly
    equal probabilities on the confident frames of the scaled heads.)"""
    for name in ("base-like", "large-like"):
        key = name + ("-specaug" if specaug else "")
        # A mask_time_prob > 0 makes transformers create masked_spec_embed (seeded here).
        torch.manual_seed(23)
        config = Wav2Vec2Config.from_pretrained(os.path.join(ROOT, name))
        config.mask_time_prob = 0.05 if specaug else 0.0
        model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, name), config=config).eval().to(dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(17)
        masked = []
        for i, layer in enumerate(model.wav2vec2.encoder.layers):
            for part in ("intermediate_dense", "output_dense"):
                lin = getattr(layer.feed_forward, part)
                bound = 1.0 / lin.weight.shape[1] ** 0.5
                scores = ((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound).to(dtype)
                m = MaskedLinear(lin, scores)
                setattr(layer.feed_forward, part, m)
                masked.append((f"wav2vec2.encoder.layers.{i}.feed_forward.{part}.weight", m))
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        if specaug:
            model.wav2vec2.masked_spec_embed.requires_grad_(True)
        inputs, vocab = utterances(name, dtype)
        total = 0.0
        for u, text, x in inputs:
            if specaug:
                frames = model.wav2vec2._get_feat_extract_output_lengths(len(x))
                mask = torch.zeros(1, frames, dtype=torch.bool)
                for a, b in TIME_MASKS[u]:
                    mask[0, a:b] = True
                hidden = model.wav2vec2(x[None], mask_time_indices=mask).last_hidden_state
                logits = model.lm_head(hidden)[0]
            else:
                logits = model(x[None]).logits[0]
            loss, _ = ctc_sum(logits, text, vocab, model.config.pad_token_id)
            loss.backward()
            total += loss.item()
        meta[key] = {"loss": total, "sparsity": SPARSITY, "transcripts": TRANSCRIPTS[name], "time_masks": TIME_MASKS if specaug else None}
        for wname, m in masked:
            tensors[f"{key}/{wname}.scores"] = m.scores.detach().float().contiguous()
            tensors[f"{key}/{wname}.scores_grad"] = m.scores.grad.detach().float().contiguous()
        tensors[f"{key}/lm_head.weight_grad"] = model.lm_head.weight.grad.detach().float().contiguous()
        tensors[f"{key}/lm_head.bias_grad"] = model.lm_head.bias.grad.detach().float().contiguous()
        if specaug:
            tensors[f"{key}/masked_spec_embed"] = model.wav2vec2.masked_spec_embed.detach().float().contiguous()
            tensors[f"{key}/masked_spec_embed_grad"] = model.wav2vec2.masked_spec_embed.grad.detach().float().contiguous()


# SpecAugment channel masks for family_gradients: channel spans per utterance.
CHANNEL_MASKS = [[(0, 4)], [(10, 14), (30, 34)], []]


def family_gradients(name, config_class, model_class, like):
    """Two float64 training references for fixture model `name` (a `model_class` with `like`'s
    vocabulary and transcripts) on the three test utterances, CTC loss summed (zero_infinity),
    SpecAugment time spans replaced by `masked_spec_embed` and CHANNEL_MASKS spans zeroed, into
    `name/grads.safetensors` and `name/grads.json` (each case described in this script's terms:
    no dropout, no layer skipped):
    - `masked/`: S3-Router, every FFN linear masked; the scores', head's and embedding's gradients;
    - `finetune/`: every parameter trains (the feature encoder too); each one's gradient.
    Tensors are named as the engine reads them (`wav2vec2.` for the family's prefix)."""
    tensors, meta = {}, {}
    TRANSCRIPTS[name] = TRANSCRIPTS[like]
    folder = os.path.join(ROOT, name)
    vocab = json.load(open(os.path.join(folder, "vocab.json")))
    vocab = vocab.get("eng", vocab)  # MMS: one vocabulary per language, the default's
    for case in ("masked", "finetune"):
        torch.manual_seed(23)
        config = config_class.from_pretrained(folder)
        config.mask_time_prob = 0.05  # makes transformers create masked_spec_embed (seeded above)
        model = model_class.from_pretrained(folder, config=config).eval().to(torch.float64)
        prefix = model.base_model_prefix + "."
        for p in model.parameters():
            p.requires_grad_(case == "finetune")
        names = {id(p): n for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(17)
        masked = []
        for i, layer in enumerate(model.base_model.encoder.layers if case == "masked" else []):
            for part in ("intermediate_dense", "output_dense"):
                lin = getattr(layer.feed_forward, part)
                bound = 1.0 / lin.weight.shape[1] ** 0.5
                m = MaskedLinear(lin, ((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound).double(), SPARSITY)
                setattr(layer.feed_forward, part, m)
                masked.append((f"wav2vec2.encoder.layers.{i}.feed_forward.{part}.weight", m))
        for p in list(model.lm_head.parameters()) + [model.base_model.masked_spec_embed]:
            p.requires_grad_(True)
        inputs, _ = utterances(name, torch.float64)
        total = 0.0
        for u, text, x in inputs:
            loss, _ = spec_augmented_loss(model, u, text, x, vocab, CHANNEL_MASKS)
            loss.backward()
            total += loss.item()
        meta[case] = {"loss": total, "transcripts": TRANSCRIPTS[name], "time_masks": TIME_MASKS, "channel_masks": CHANNEL_MASKS,
                      "sparsity": SPARSITY if case == "masked" else 0.0, "seed": 0, "dropout": 0.0, "attention_dropout": 0.0,
                      "activation_dropout": 0.0, "skip_layers": [False] * config.num_hidden_layers}
        grad = lambda t: t.grad.detach().float().contiguous()  # noqa: E731
        if case == "finetune":
            for p in model.parameters():
                if p.grad is not None:
                    tensors[f"finetune/grad/{names[id(p)].replace(prefix, 'wav2vec2.', 1)}"] = grad(p)
        for wname, m in masked:
            tensors[f"masked/{wname}.scores"] = m.scores.detach().float().contiguous()
            tensors[f"masked/{wname}.scores_grad"] = grad(m.scores)
        tensors[f"{case}/lm_head.weight_grad"] = grad(model.lm_head.weight)
        tensors[f"{case}/lm_head.bias_grad"] = grad(model.lm_head.bias)
        tensors[f"{case}/masked_spec_embed"] = model.base_model.masked_spec_embed.detach().float().contiguous()
        tensors[f"{case}/masked_spec_embed_grad"] = grad(model.base_model.masked_spec_embed)
    safetensors.torch.save_file(tensors, os.path.join(folder, "grads.safetensors"))
    with open(os.path.join(folder, "grads.json"), "w") as f:
        json.dump(meta, f, indent=1)


MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(z):
    """splitmix64's finaliser on a uint64 array (src/rng.rs `mix`)."""
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_factors(seed, site, index, p):
    """src/dropout.rs `Dropout::factor` for an array of element indices."""
    key = mix(np.array([seed ^ ((site * GOLDEN) & MASK64)], dtype=np.uint64))[0]
    u = (mix(np.bitwise_xor(index.astype(np.uint64), key)) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    keep = np.float32(1.0) / (np.float32(1.0) - np.float32(p))
    return np.where(u < np.float32(p), np.float32(0.0), keep)


REG = {"seed": 12345, "dropout": 0.1, "attention_dropout": 0.15, "activation_dropout": 0.2, "sparsity": 0.3,
       "channel_masks": [[(0, 4)], [(10, 14), (30, 34)], []], "skip": {"base-like": [False, True], "large-like": [False, True, False]}}


class HashDropout(torch.nn.Module):
    """Dropout on [1, T, C] with the engine's mask for `site`, rows offset to the packed batch."""

    def __init__(self, site, p, state):
        super().__init__()
        self.site, self.p, self.state = site, p, state

    def forward(self, x):
        t, c = x.shape[1], x.shape[2]
        rows = np.arange(t, dtype=np.uint64)[:, None] + np.uint64(self.state["offset"])
        idx = rows * np.uint64(c) + np.arange(c, dtype=np.uint64)[None, :]
        return x * torch.from_numpy(dropout_factors(REG["seed"], self.site, idx, self.p)).to(x.dtype)[None]


def regularised_gradients(tensors, meta, dtype=torch.float64, finetune=False, encoder=False):
    """Every regulariser on. S3-Router (`finetune=False`): all six linears of each layer masked;
    weight finetuning (`finetune=True`): no masks, every parameter but the conv feature encoder's
    (with `encoder`, every parameter) trains, and each one's gradient is recorded under
    `{key}/grad/{name}`."""
    from transformers.models.wav2vec2 import modeling_wav2vec2 as mw
    state = {"offset": 0}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        w = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling, dim=-1)
        heads, t = w.shape[1], w.shape[2]
        h = np.arange(heads, dtype=np.uint64)[:, None, None]
        row = np.arange(t, dtype=np.uint64)[None, :, None] + np.uint64(state["offset"])
        j = np.arange(t, dtype=np.uint64)[None, None, :]
        idx = ((row * np.uint64(heads) + h) << np.uint64(24)) | j
        site = 1 + 4 * module.s3r_layer + 0
        w = w * torch.from_numpy(dropout_factors(REG["seed"], site, idx, REG["attention_dropout"])).to(w.dtype)[None]
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    mw.eager_attention_forward = attention
    for name in ("base-like", "large-like"):
        key = name + ("-finetune-encoder" if encoder else "-finetune" if finetune else "-regularised")
        state["offset"] = 0
        torch.manual_seed(23)
        config = Wav2Vec2Config.from_pretrained(os.path.join(ROOT, name))
        config.mask_time_prob = 0.05
        config._attn_implementation = "eager"
        model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, name), config=config, attn_implementation="eager").eval().to(dtype)
        for n, p in model.named_parameters():
            p.requires_grad_(finetune and (encoder or not n.startswith("wav2vec2.feature_extractor.")))
        # Names before LayerDrop removes layers (the ModuleList renumbers the rest).
        names = {id(p): n for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(29)
        masked = []
        enc = model.wav2vec2.encoder
        for i, layer in enumerate(enc.layers):
            parts = [(layer.attention, f"attention.{n}", n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
            parts += [(layer.feed_forward, f"feed_forward.{n}", n) for n in ("intermediate_dense", "output_dense")]
            for owner, full, attr in parts if not finetune else []:
                lin = getattr(owner, attr)
                bound = 1.0 / lin.weight.shape[1] ** 0.5
                m = MaskedLinear(lin, ((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound).to(dtype), REG["sparsity"])
                setattr(owner, attr, m)
                masked.append((i, f"wav2vec2.encoder.layers.{i}.{full}.weight", m))
            layer.attention.s3r_layer = i
            layer.dropout = HashDropout(1 + 4 * i + 1, REG["dropout"], state)
            layer.feed_forward.intermediate_dropout = HashDropout(1 + 4 * i + 2, REG["activation_dropout"], state)
            layer.feed_forward.output_dropout = HashDropout(1 + 4 * i + 3, REG["dropout"], state)
        enc.dropout = HashDropout(0, REG["dropout"], state)
        skip = REG["skip"][name]
        enc.layers = torch.nn.ModuleList([l for l, s in zip(enc.layers, skip) if not s])
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        model.wav2vec2.masked_spec_embed.requires_grad_(True)
        inputs, vocab = utterances(name, dtype)
        total = 0.0
        for u, text, x in inputs:
            loss, frames = spec_augmented_loss(model, u, text, x, vocab, REG["channel_masks"])
            loss.backward()
            total += loss.item()
            state["offset"] += frames
        if finetune:
            for p in model.parameters():
                if p.grad is not None:
                    tensors[f"{key}/grad/{names[id(p)]}"] = p.grad.detach().float().contiguous()
        meta[key] = {"loss": total, "transcripts": TRANSCRIPTS[name], "time_masks": TIME_MASKS,
                     **{k: REG[k] for k in ("seed", "dropout", "attention_dropout", "activation_dropout", "sparsity", "channel_masks")},
                     "skip_layers": skip}
        for i, wname, m in masked:
            tensors[f"{key}/{wname}.scores"] = m.scores.detach().float().contiguous()
            if not skip[i]:
                tensors[f"{key}/{wname}.scores_grad"] = m.scores.grad.detach().float().contiguous()
        tensors[f"{key}/lm_head.weight_grad"] = model.lm_head.weight.grad.detach().float().contiguous()
        tensors[f"{key}/lm_head.bias_grad"] = model.lm_head.bias.grad.detach().float().contiguous()
        tensors[f"{key}/masked_spec_embed"] = model.wav2vec2.masked_spec_embed.detach().float().contiguous()
        tensors[f"{key}/masked_spec_embed_grad"] = model.wav2vec2.masked_spec_embed.grad.detach().float().contiguous()


def main():
    g = torch.Generator().manual_seed(5)
    p = torch.randn(7, generator=g).requires_grad_(True)
    start = p.detach().clone()
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    grads, lrs = [], []
    for step in range(6):
        lr = 1e-3 * (0.5 + step)
        for group in opt.param_groups:
            group["lr"] = lr
        grad = torch.randn(7, generator=g) * (10.0 ** (step - 3))
        p.grad = grad.clone()
        opt.step()
        grads.append(grad.tolist())
        lrs.append(lr)
    tensors, meta = {}, {}
    masked_gradients(tensors, meta)
    masked_gradients(tensors, meta, specaug=True)
    regularised_gradients(tensors, meta)
    regularised_gradients(tensors, meta, finetune=True)
    regularised_gradients(tensors, meta, finetune=True, encoder=True)
    safetensors.torch.save_file(tensors, os.path.join(ROOT, "train_grads.safetensors"))
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "adam": {"start": start.tolist(), "grads": grads, "lrs": lrs, "end": p.detach().tolist()},
                   "masked": meta}, f, indent=1)


if __name__ == "__main__":
    main()
