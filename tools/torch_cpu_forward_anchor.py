#!/usr/bin/env python3
"""PyTorch CPU anchor for the forward pass of wav2vec2-base (random init), one 10 s clip, in
fp32 and under bf16 autocast (oneDNN's AVX512-BF16 / AMX kernels where the CPU has them): the
work `engine bench --preset base --batch 1 --seconds 10 [--precision bf16]` times. Median of 5
after a warm-up.

    pip install torch transformers && python3 tools/torch_cpu_forward_anchor.py [THREADS]
"""
import json
import sys
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
m = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32)).eval()
x = torch.randn(1, 160000)


def median(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


res = {"torch": torch.__version__, "threads": threads}
with torch.no_grad():
    res["cpu_forward_b1x10s_fp32_s"] = round(median(lambda: m(x).logits), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res["cpu_forward_b1x10s_bf16_autocast_s"] = round(median(lambda: m(x).logits), 3)
print(json.dumps(res))
