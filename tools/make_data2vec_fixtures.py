#!/usr/bin/env python3
"""data2vec-audio fixtures (tests/fixtures/data2vec-like, tests/fixtures/data2vec-bare).

data2vec-audio is wav2vec2's post-LN encoder with two changes: layer norm after every conv of
the feature encoder, and a positional embedding made of `num_conv_pos_embeddings` stacked convs
(kernel `conv_pos_kernel_size`, no weight norm), each followed by a layer norm without
parameters and GELU, instead of one weight-normed conv.

`data2vec-like`: a random `Data2VecAudioForCTC` (an even positional kernel, so the extra frame
is dropped; three positional convs; conv bias) with base-like's vocabulary, built and checked
exactly as tools/make_fixtures.py builds base-like, with transformers' outputs and greedy
transcripts. `grads.safetensors` + `grads.json` hold two float64 training references on the
three test utterances (CTC loss summed, zero_infinity), with SpecAugment time spans replaced by
`masked_spec_embed` and channel spans zeroed, so every gradient crosses the positional stack:
- `masked/`: S3-Router, every FFN linear masked (per-matrix top-k of |scores|, straight-through);
  the scores', the head's and the embedding's gradients;
- `finetune/`: weight finetuning of every parameter (the feature encoder too); each one's gradient.
Gradients are stored under the names the engine reads tensors by (`wav2vec2.` for
`data2vec_audio.`, see src/model/checkpoint.rs); `grads.json` describes each case in
tools/make_train_fixtures.py's terms (no dropout, no layer skipped).
`data2vec-bare`: the same encoder saved as a bare `Data2VecAudioModel` (no prefix, no head), the
layout of facebook/data2vec-audio-base; data2vec-like's encoder outputs are its reference.

    pip install torch transformers safetensors numpy soundfile jiwer
    python3 tools/make_data2vec_fixtures.py
"""
import json
import os
import shutil
import sys

import safetensors.torch
import torch
from transformers import Data2VecAudioConfig, Data2VecAudioForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, ROOT, build, record_versions  # noqa: E402
from make_hubert_fixtures import committed_audio  # noqa: E402
from make_train_fixtures import TIME_MASKS, TRANSCRIPTS, MaskedLinear, spec_augmented_loss, utterances  # noqa: E402

NAME = "data2vec-like"
SPEC = dict(
    conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True,
    hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
    conv_pos_kernel_size=6, num_conv_pos_embeddings=3, num_conv_pos_embedding_groups=4,
    vocab_size=12, pad_token_id=0, layer_norm_eps=1e-5, do_normalize=True,
    vocab=MODELS["base-like"]["vocab"],
)
CHANNEL_MASKS = [[(0, 4)], [(10, 14), (30, 34)], []]
SPARSITY = 0.3


def gradients():
    """The two training references (see the module doc), in float64."""
    tensors, meta = {}, {}
    TRANSCRIPTS[NAME] = TRANSCRIPTS["base-like"]
    for case in ("masked", "finetune"):
        torch.manual_seed(23)
        config = Data2VecAudioConfig.from_pretrained(os.path.join(ROOT, NAME))
        config.mask_time_prob = 0.05  # makes transformers create masked_spec_embed (seeded above)
        model = Data2VecAudioForCTC.from_pretrained(os.path.join(ROOT, NAME), config=config).eval().to(torch.float64)
        for p in model.parameters():
            p.requires_grad_(case == "finetune")
        names = {id(p): n for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(17)
        masked = []
        for i, layer in enumerate(model.data2vec_audio.encoder.layers if case == "masked" else []):
            for part in ("intermediate_dense", "output_dense"):
                lin = getattr(layer.feed_forward, part)
                bound = 1.0 / lin.weight.shape[1] ** 0.5
                m = MaskedLinear(lin, ((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound).double(), SPARSITY)
                setattr(layer.feed_forward, part, m)
                masked.append((f"wav2vec2.encoder.layers.{i}.feed_forward.{part}.weight", m))
        for p in list(model.lm_head.parameters()) + [model.data2vec_audio.masked_spec_embed]:
            p.requires_grad_(True)
        inputs, vocab = utterances(NAME, torch.float64)
        total = 0.0
        for u, text, x in inputs:
            loss, _ = spec_augmented_loss(model, u, text, x, vocab, CHANNEL_MASKS)
            loss.backward()
            total += loss.item()
        meta[case] = {"loss": total, "transcripts": TRANSCRIPTS[NAME], "time_masks": TIME_MASKS, "channel_masks": CHANNEL_MASKS,
                      "sparsity": SPARSITY if case == "masked" else 0.0, "seed": 0, "dropout": 0.0, "attention_dropout": 0.0,
                      "activation_dropout": 0.0, "skip_layers": [False] * config.num_hidden_layers}
        grad = lambda t: t.grad.detach().float().contiguous()  # noqa: E731
        if case == "finetune":
            for p in model.parameters():
                if p.grad is not None:
                    tensors[f"finetune/grad/{names[id(p)].replace('data2vec_audio.', 'wav2vec2.', 1)}"] = grad(p)
        for wname, m in masked:
            tensors[f"masked/{wname}.scores"] = m.scores.detach().float().contiguous()
            tensors[f"masked/{wname}.scores_grad"] = grad(m.scores)
        tensors[f"{case}/lm_head.weight_grad"] = grad(model.lm_head.weight)
        tensors[f"{case}/lm_head.bias_grad"] = grad(model.lm_head.bias)
        tensors[f"{case}/masked_spec_embed"] = model.data2vec_audio.masked_spec_embed.detach().float().contiguous()
        tensors[f"{case}/masked_spec_embed_grad"] = grad(model.data2vec_audio.masked_spec_embed)
    folder = os.path.join(ROOT, NAME)
    safetensors.torch.save_file(tensors, os.path.join(folder, "grads.safetensors"))
    with open(os.path.join(folder, "grads.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main():
    for name in (NAME, "data2vec-bare"):
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)
    model, folder = build(NAME, SPEC, committed_audio(), 50, classes=(Data2VecAudioConfig, Data2VecAudioForCTC))
    bare = os.path.join(ROOT, "data2vec-bare")
    model.data2vec_audio.save_pretrained(bare)
    shutil.copy(os.path.join(folder, "preprocessor_config.json"), bare)
    gradients()
    record_versions("make_data2vec_fixtures.py")


if __name__ == "__main__":
    main()
