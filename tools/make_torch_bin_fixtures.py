#!/usr/bin/env python3
"""PyTorch weight-file fixtures (tests/fixtures/base-like-bin, tests/fixtures/base-like-bf16-bin-sharded).

transformers 4 wrote `pytorch_model.bin` (`torch.save` of the state dict) by default, and many
checkpoints on the hub still have only that. These are the base-like and base-like-bf16 models
(tools/make_fixtures.py) saved that way, so the engine must reproduce those folders' reference
outputs from them:

- `base-like-bin/`: `torch.save(model.state_dict())` (an OrderedDict with `_metadata`, f32);
- `base-like-bf16-bin-sharded/`: bf16 tensors in two shards listed by
  `pytorch_model.bin.index.json`, as transformers 4 shards; each layer's q/k/v weights are views
  at three offsets into one storage (what `torch.save` of tensor views writes).

    pip install torch transformers safetensors
    python3 tools/make_torch_bin_fixtures.py
"""
import json
import os
import shutil
import sys

import safetensors.torch
import torch
from transformers import Wav2Vec2ForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, record_versions  # noqa: E402

SIDECARS = ("config.json", "vocab.json", "preprocessor_config.json")


def folder(name, source):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for f in SIDECARS:
        shutil.copy(os.path.join(ROOT, source, f), out)
    return out


def main():
    out = folder("base-like-bin", "base-like")
    model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, "base-like")).eval()
    torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))

    out = folder("base-like-bf16-bin-sharded", "base-like-bf16")
    tensors = safetensors.torch.load_file(os.path.join(ROOT, "base-like-bf16", "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for prefix in sorted({k.rsplit(".attention.", 1)[0] for k in tensors if ".attention.q_proj.weight" in k}):
        names = [f"{prefix}.attention.{p}_proj.weight" for p in "qkv"]
        stacked = torch.cat([tensors[n] for n in names])
        rows = tensors[names[0]].shape[0]
        for i, n in enumerate(names):
            tensors[n] = stacked[i * rows:(i + 1) * rows]
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({n: tensors[n] for n in shard}, os.path.join(out, file))
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    record_versions("make_torch_bin_fixtures.py")


if __name__ == "__main__":
    main()
