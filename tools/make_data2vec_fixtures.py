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
import os
import shutil
import sys

from transformers import Data2VecAudioConfig, Data2VecAudioForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, ROOT, build, record_versions  # noqa: E402
from make_hubert_fixtures import committed_audio  # noqa: E402
from make_train_fixtures import family_gradients  # noqa: E402

NAME = "data2vec-like"
SPEC = dict(
    conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True,
    hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
    conv_pos_kernel_size=6, num_conv_pos_embeddings=3, num_conv_pos_embedding_groups=4,
    vocab_size=12, pad_token_id=0, layer_norm_eps=1e-5, do_normalize=True,
    vocab=MODELS["base-like"]["vocab"],
)
def main():
    for name in (NAME, "data2vec-bare"):
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)
    model, folder = build(NAME, SPEC, committed_audio(), 50, classes=(Data2VecAudioConfig, Data2VecAudioForCTC))
    bare = os.path.join(ROOT, "data2vec-bare")
    model.data2vec_audio.save_pretrained(bare)
    shutil.copy(os.path.join(folder, "preprocessor_config.json"), bare)
    family_gradients(NAME, Data2VecAudioConfig, Data2VecAudioForCTC, "base-like")
    record_versions("make_data2vec_fixtures.py")


if __name__ == "__main__":
    main()
