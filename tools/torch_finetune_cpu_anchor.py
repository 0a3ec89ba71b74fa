#!/usr/bin/env python3
"""PyTorch CPU anchor for one weight-finetuning update on wav2vec2-base (random init), batch
2 x 5 s, 60 labels per utterance: every parameter but the conv feature encoder's trains, Adam
(0.9, 0.98, 1e-8), regularisers off; the same work as the "finetune update" of
`cargo bench --bench train_step`. Median of 3 after a warm-up.

    pip install torch transformers && python3 tools/torch_finetune_cpu_anchor.py [THREADS]
"""
import json
import sys
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = Wav2Vec2Config(vocab_size=32, layerdrop=0.0, mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, ctc_loss_reduction="sum")
m = Wav2Vec2ForCTC(cfg).train()
m.freeze_feature_encoder()
params = [p for p in m.parameters() if p.requires_grad]
opt = torch.optim.Adam(params, lr=5e-5, betas=(0.9, 0.98), eps=1e-8)
x, labels = torch.randn(2, 80000), torch.randint(1, 32, (2, 60))


def update():
    opt.zero_grad()
    m(x, labels=labels).loss.backward()
    opt.step()


update()
times = []
for _ in range(3):
    start = time.perf_counter()
    update()
    times.append(time.perf_counter() - start)
print(json.dumps({"torch": torch.__version__, "threads": threads, "trained_parameters": sum(p.numel() for p in params),
                  "cpu_finetune_update_b2x5s_s": round(sorted(times)[1], 3)}))
