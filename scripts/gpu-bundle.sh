#!/usr/bin/env bash
# Builds the engine and the release test and bench executables (kernels compiled in) into the
# ignored folder gpu-bundle/, with run.sh, so a GPU host without Rust runs every GPU check with
#   bash gpu-bundle/run.sh          (from the repository root, where tests find their fixtures)
# The PyTorch anchor (../shared/bench/torch_w2v2_anchor.py) is copied alongside when present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cuda-toolchain.sh >/dev/null
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests" "$out/bin"
executables() { # cargo's JSON messages -> paths of the built executables of kind $1
    python3 -c '
import json, sys
kind = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind in m["target"]["kind"]:
        print(m["executable"])' "$1"
}
cargo build --release --bin engine
cp target/release/engine "$out/bin/"
# The GPU test suite (the CPU suites need cargo's build paths and run in CI anyway).
cargo test --release --test cuda --test cuda_train --no-run --message-format=json 2>/dev/null | executables test | xargs -r cp -t "$out/tests/"
cargo bench --no-run --bench cuda_kernels --bench train_step --message-format=json 2>/dev/null | executables bench | xargs -r cp -t "$out/bin/"
strip "$out"/bin/* "$out"/tests/* 2>/dev/null || true
anchor=../shared/bench/torch_w2v2_anchor.py
[ -f "$anchor" ] && cp "$anchor" "$out/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# All GPU checks and benches from prebuilt binaries; a short table last. Run from the repo root.
set -uo pipefail
b=gpu-bundle
out=${OUT:-/tmp/s3router-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fail=0
for t in "$b"/tests/*; do
    S3R_REQUIRE_GPU=1 "$t" >"$out/test-$(basename "$t").log" 2>&1 || { fail=1; echo "FAILED: $(basename "$t")"; tail -30 "$out/test-$(basename "$t").log"; }
    grep -h "^test result" "$out/test-$(basename "$t").log"
done
"$b/bin/engine" infer --device cuda --model weights/tiny-random-wav2vec2 tests/fixtures/audio/utt0.wav tests/fixtures/audio/utt1.wav
"$b"/bin/cuda_kernels* | tee "$out/kernels.md"
# Training on the GPU: the demo end to end, then the step benches (criterion, GPU ones only).
timeout "${DEMO_TIMEOUT:-240}" "$b/bin/engine" train --device cuda --out "$out/demo" 2>&1 | tail -15 | tee "$out/demo.txt"
timeout "${DEMO_TIMEOUT:-240}" "$b/bin/engine" train --device cuda --precision bf16 --out "$out/demo-bf16" 2>&1 | tail -4 | tee -a "$out/demo.txt"
"$b"/bin/train_step* --bench cuda 2>&1 | grep -E "cuda|time:" | tee "$out/train_step.txt"
for p in f32 bf16; do
    for shape in "8 15" "1 10"; do
        set -- $shape
        "$b/bin/engine" bench --device cuda --precision "$p" --batch "$1" --seconds "$2" --reps 10 --profile
    done
done | tee "$out/forward.txt"
if [ -f "$b/torch_w2v2_anchor.py" ]; then
    OUT="$out" timeout "${TORCH_TIMEOUT:-300}" python3 "$b/torch_w2v2_anchor.py" >"$out/torch.log" 2>&1 || echo "torch anchor stopped early (see torch.log)"
    grep -E "gemm_ffn|sdpa|infer_b|train_" "$out/torch.log"
fi
echo; echo "== summary"; cat "$out/gpu.txt"; grep -h "^test result" "$out"/test-*.log | sort | uniq -c
cat "$out/forward.txt" "$out/train_step.txt"
exit $fail
RUN
chmod +x "$out/run.sh"
du -sh "$out"
