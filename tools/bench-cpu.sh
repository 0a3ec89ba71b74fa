#!/usr/bin/env bash
# Side-by-side CPU benchmark: `engine bench` (wav2vec2-base, random weights, 1 x 10 s) against
# PyTorch + transformers on the same shapes, alternating ROUNDS times so drift hits both equally.
# Needs: cargo build --release; pip install torch transformers.
#   tools/bench-cpu.sh [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
threads=${2:-$(nproc)}
torch_py=$(mktemp --suffix .py)
trap 'rm -f "$torch_py"' EXIT
cat > "$torch_py" <<PY
import time, torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
torch.set_num_threads($threads); torch.manual_seed(0)
m = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, layerdrop=0.0, mask_time_prob=0.0)).eval()
x = torch.randn(1, 160000)
with torch.no_grad():
    m(x); ts = []
    for _ in range(5):
        s = time.perf_counter(); m(x); ts.append(time.perf_counter() - s)
print("%.4f" % sorted(ts)[2])
PY
for i in $(seq "$rounds"); do
    t=$(python3 "$torch_py" 2>/dev/null)
    e=$(./target/release/engine --threads "$threads" bench --preset base --batch 1 --seconds 10 --reps 5 | sed -E 's/.*median ([0-9.]+) s.*/\1/')
    echo "round $i: torch $t s, engine $e s"
done
