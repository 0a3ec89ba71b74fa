#!/usr/bin/env python3
"""HuBERT parity fixtures (tests/fixtures/hubert-like, tests/fixtures/hubert-bare).

`hubert-like`: a random `HubertForCTC` with base-like's architecture (post-LN, group norm) and
vocabulary, built and checked exactly as tools/make_fixtures.py builds base-like, with
transformers' outputs for the committed test utterances (logits, feature-encoder output, every
encoder layer, encoder output) and greedy transcripts. `hubert-bare`: the same encoder saved as
a bare `HubertModel` (no `hubert.` prefix, no head), the layout of facebook/hubert-base-ls960;
hubert-like's encoder outputs are its reference.

    pip install torch transformers safetensors numpy soundfile jiwer
    python3 tools/make_hubert_fixtures.py
"""
import os
import shutil
import sys
import wave

import numpy as np
from transformers import HubertConfig, HubertForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, ROOT, build, record_versions  # noqa: E402


def committed_audio():
    """The test utterances as make_fixtures.py wrote them (int16)."""
    out = []
    for u in range(3):
        with wave.open(os.path.join(ROOT, "audio", f"utt{u}.wav")) as w:
            out.append(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy())
    return out


def main():
    for name in ("hubert-like", "hubert-bare"):
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)
    model, folder = build("hubert-like", MODELS["base-like"], committed_audio(), 40, classes=(HubertConfig, HubertForCTC))
    bare = os.path.join(ROOT, "hubert-bare")
    model.hubert.save_pretrained(bare)
    shutil.copy(os.path.join(folder, "preprocessor_config.json"), bare)
    record_versions("make_hubert_fixtures.py")


if __name__ == "__main__":
    main()
