#!/usr/bin/env python3
"""MMS-style fixture (tests/fixtures/mms-like): a random `Wav2Vec2ForCTC` with large-like's
architecture plus `adapter_attn_dim` (the attention adapter after every pre-LN layer, as
facebook/mms-1b-all has), built and checked as tools/make_fixtures.py builds large-like. Its
weights hold the default ("eng") adapters and head; like the hub's MMS folders it also holds
`adapter.eng.safetensors` (the same) and `adapter.xyz.safetensors` (another language's adapters
and a head over a 7-token vocabulary)
and a `vocab.json` with one vocabulary per language. `reference.safetensors` has transformers'
outputs with the default adapters, `reference-xyz.safetensors` the logits after
`model.load_adapter("xyz")`. `grads.safetensors` / `grads.json`: the float64 training references
of tools/make_train_fixtures.py's `family_gradients` (S3-Router and weight finetuning through the
default adapters).

    pip install torch transformers safetensors numpy soundfile jiwer
    python3 tools/make_mms_fixtures.py
"""
import json
import os
import shutil
import sys

import safetensors.torch
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, ROOT, build, record_versions, reference_outputs  # noqa: E402
from make_hubert_fixtures import committed_audio  # noqa: E402
from make_train_fixtures import family_gradients  # noqa: E402

NAME = "mms-like"
XYZ = ["<pad>", "<s>", "</s>", "<unk>", "|", "x", "y"]


def main():
    shutil.rmtree(os.path.join(ROOT, NAME), ignore_errors=True)
    spec = dict(MODELS["large-like"], adapter_attn_dim=8)
    model, folder = build(NAME, spec, committed_audio(), 80, classes=(Wav2Vec2Config, Wav2Vec2ForCTC))
    # The default language's file, as MMS folders have one for every language.
    safetensors.torch.save_file({n: p.detach().contiguous() for n, p in model._get_adapters().items()},
                                os.path.join(folder, "adapter.eng.safetensors"))
    # Another language: its own adapters and head (transformers' adapter file layout).
    g = torch.Generator().manual_seed(81)
    adapters = {}
    for name, p in model._get_adapters().items():
        shape = (len(XYZ), p.shape[1]) if name == "lm_head.weight" else (len(XYZ),) if name == "lm_head.bias" else p.shape
        adapters[name] = (torch.randn(shape, generator=g) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0)).contiguous()
    safetensors.torch.save_file(adapters, os.path.join(folder, "adapter.xyz.safetensors"))
    vocab_path = os.path.join(folder, "vocab.json")
    with open(vocab_path) as f:
        eng = json.load(f)
    with open(vocab_path, "w") as f:
        json.dump({"eng": eng, "xyz": {tok: i for i, tok in enumerate(XYZ)}}, f, indent=1)
    model = Wav2Vec2ForCTC.from_pretrained(folder).eval()
    model.load_adapter("xyz")
    ref = reference_outputs(model, {"do_normalize": MODELS["large-like"]["do_normalize"]}, committed_audio())
    safetensors.torch.save_file({k: v for k, v in ref.items() if k.endswith("logits")}, os.path.join(folder, "reference-xyz.safetensors"))
    family_gradients(NAME, Wav2Vec2Config, Wav2Vec2ForCTC, "large-like")
    record_versions("make_mms_fixtures.py")


if __name__ == "__main__":
    main()
