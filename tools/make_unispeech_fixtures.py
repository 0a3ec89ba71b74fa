#!/usr/bin/env python3
"""UniSpeech and UniSpeech-SAT parity fixtures (tests/fixtures/unispeech-like, unispeech-sat-like).

Both families are wav2vec2's modules under their own names (`unispeech.`, `unispeech_sat.`):
random `UniSpeechForCTC` with base-like's architecture (post-LN, group norm) and
`UniSpeechSatForCTC` with large-like's (pre-LN, layer norm in every conv, conv bias, blank not
at 0), built and checked exactly as tools/make_fixtures.py builds those, with transformers'
outputs for the committed test utterances and greedy transcripts.

    pip install torch transformers safetensors numpy soundfile jiwer
    python3 tools/make_unispeech_fixtures.py
"""
import os
import shutil
import sys

from transformers import UniSpeechConfig, UniSpeechForCTC, UniSpeechSatConfig, UniSpeechSatForCTC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, ROOT, build, record_versions  # noqa: E402
from make_hubert_fixtures import committed_audio  # noqa: E402


def main():
    cases = [("unispeech-like", "base-like", 60, (UniSpeechConfig, UniSpeechForCTC)),
             ("unispeech-sat-like", "large-like", 70, (UniSpeechSatConfig, UniSpeechSatForCTC))]
    for name, spec, seed, classes in cases:
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)
        build(name, MODELS[spec], committed_audio(), seed, classes=classes)
    record_versions("make_unispeech_fixtures.py")


if __name__ == "__main__":
    main()
