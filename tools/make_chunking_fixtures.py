#!/usr/bin/env python3
"""Reference transcripts of long audio cut into windows by transformers' ASR pipeline, and its
token and word timestamps (tests/fixtures/chunking/expected.json).

The input is the committed demo backbone (weights/s3r-demo-en) and eight English corpus
utterances played back to back (about 15 s); the test rebuilds the same samples from the same
FLAC files. For several window / context settings the pipeline's transcript is recorded
(`chunk_length_s`, `stride_length_s`, batch size 1, greedy CTC), with the whole-file transcript
of the same model for comparison. `return_timestamps="char"` and `"word"` are recorded for the
whole file and for the first setting.

    pip install torch transformers soundfile numpy
    python3 tools/make_chunking_fixtures.py
"""
import glob
import json
import os

import numpy as np
import soundfile as sf
import torch
import transformers
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, pipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "weights", "s3r-demo-en")
OUT = os.path.join(ROOT, "tests", "fixtures", "chunking")
# (chunk_length_s, stride_length_s as [left, right])
SETTINGS = [(4.0, [4.0 / 6, 4.0 / 6]), (3.0, [0.5, 1.0]), (2.5, [0.04, 0.04]), (6.0, [1.5, 0.25])]


def main():
    torch.manual_seed(0)
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "corpus", "en", "audio", "en_train_*.flac")))[:8]
    audio = np.concatenate([sf.read(f, dtype="float32")[0] for f in files])
    model = Wav2Vec2ForCTC.from_pretrained(MODEL).eval()
    asr = pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=Wav2Vec2CTCTokenizer(os.path.join(MODEL, "vocab.json")),
        feature_extractor=Wav2Vec2FeatureExtractor.from_pretrained(MODEL),
        device="cpu",
    )
    with torch.no_grad():
        whole = asr(audio.copy())["text"]
        cases = [
            {"chunk_seconds": c, "context": s, "text": asr(audio.copy(), chunk_length_s=c, stride_length_s=s)["text"]}
            for c, s in SETTINGS
        ]
        timestamps = []
        for chunking in [{}, {"chunk_length_s": SETTINGS[0][0], "stride_length_s": SETTINGS[0][1]}]:
            for level in ["char", "word"]:
                out = asr(audio.copy(), return_timestamps=level, **chunking)
                chunks = [{"text": c["text"], "timestamp": list(c["timestamp"])} for c in out["chunks"]]
                timestamps.append({"level": level, **chunking, "text": out["text"], "chunks": chunks})
    os.makedirs(OUT, exist_ok=True)
    expected = {
        "model": "weights/s3r-demo-en",
        "audio": [os.path.relpath(f, ROOT) for f in files],
        "samples": int(len(audio)),
        "whole": whole,
        "cases": cases,
        "timestamps": timestamps,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    for c in cases:
        print(c["chunk_seconds"], c["context"], c["text"] == whole)


if __name__ == "__main__":
    main()
