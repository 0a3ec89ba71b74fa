#!/usr/bin/env bash
# Builds the engine and the release test and bench executables (kernels compiled in) into the
# ignored folder gpu-bundle/ (and the archive gpu-bundle.tar.xz), with run.sh, so a GPU host
# without Rust runs every GPU check with
#   bash gpu-bundle/run.sh          (from the repository root, where tests find their fixtures)
# The PyTorch anchor (../shared/bench/torch_w2v2_anchor.py) is copied alongside when present.
# Rehearsal without a GPU: S3R_CUEMU=1 CARGO_TARGET_DIR=target/cuemu scripts/gpu-bundle.sh builds
# the bundle against tools/cuemu; run.sh then runs here with LD_LIBRARY_PATH=target/cuemu/lib and
# any nvidia-smi stand-in on PATH (its benches are only smoke tests there).
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
cp "${CARGO_TARGET_DIR:-target}/release/engine" "$out/bin/"
# The GPU test suite (the CPU suites need cargo's build paths and run in CI anyway).
cargo test --release --test cuda --test cuda_train --no-run --message-format=json 2>/dev/null | executables test | xargs -r cp -t "$out/tests/"
cargo bench --no-run --bench cuda_kernels --bench train_step --bench sparse --bench ctc --message-format=json 2>/dev/null | executables bench | xargs -r cp -t "$out/bin/"
strip "$out"/bin/* "$out"/tests/* 2>/dev/null || true
for anchor in ../shared/bench/torch_w2v2_anchor.py ../shared/bench/torch_w2v2_anchor_more.py; do
    [ -f "$anchor" ] && cp "$anchor" "$out/"
done
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# All GPU checks and benches from prebuilt binaries, most important first, inside a time budget
# (BUDGET seconds, default 540: a device call may run 600); a short table last. Run from the
# repository root. FULL=1 adds the fp32 forward at 1 x 10 s and the bf16 demo. What comes
# back goes to $OUT (default /tmp/s3router-gpu) as four files at most: summary.txt (the
# table), logs.txt (every step's log, one after the other) and the two anchors' JSON (the
# device tool returns only a few files a call).
set -uo pipefail
b=gpu-bundle
res=${OUT:-/tmp/s3router-gpu}
out=$(mktemp -d)
budget=${BUDGET:-540}
mkdir -p "$res"
left() { echo $((budget - SECONDS)); }
# A step's time limit: at most $1 seconds, and never past the budget (a kernel that hangs, say
# a barrier bug in one never run before, then costs one step, not the whole device call).
cap() { local t=$(( $(left) - 30 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 10 ] && t=10; echo "$t"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fail=0
# 1. Correctness: forward ops, training ops and whole training steps against the CPU. The
# tile-shape test runs on its own afterwards: it forces every tile shape in turn, the wgmma
# kernels (kernels/gemm_sm90a.cu) among them on an H100/H200, and a fault in one would take
# the process's CUDA context, and every test after it, down with it.
for t in "$b"/tests/*; do
    S3R_REQUIRE_GPU=1 timeout "$(cap 150)" "$t" --skip mma_tile_shapes >"$out/test-$(basename "$t").log" 2>&1 || { fail=1; echo "FAILED: $(basename "$t")"; grep -E "panicked|rel L2|left:|right:" "$out/test-$(basename "$t").log" | head -20; }
    grep -h "^test result" "$out/test-$(basename "$t").log"
done
S3R_REQUIRE_GPU=1 timeout "$(cap 120)" "$b"/tests/cuda-* mma_tile_shapes --nocapture >"$out/test-tiles.log" 2>&1 || { fail=1; echo "FAILED: tile shapes (mma.sync and wgmma)"; grep -E "panicked|rel L2" "$out/test-tiles.log" | head; }
grep -hE "^test result|same bits" "$out/test-tiles.log" | tee "$out/wgmma.txt"
# The command line on the GPU: engine infer must print the CPU's transcripts (plain and masked).
wavs="tests/fixtures/audio/utt0.wav tests/fixtures/audio/utt1.wav tests/fixtures/audio/utt2.wav"
for args in "--model tests/fixtures/base-like" "--model tests/fixtures/base-like --masks tests/fixtures/base-like-masks"; do
    cpu=$("$b/bin/engine" infer $args $wavs 2>&1); gpu=$("$b/bin/engine" infer $args --device cuda $wavs 2>&1)
    if [ -n "$cpu" ] && [ "$cpu" = "$gpu" ]; then echo "infer $args: GPU transcripts = CPU's"; else fail=1; echo "FAILED: infer $args: GPU gave: $gpu"; fi
done | tee "$out/cli.txt"
grep -q FAILED "$out/cli.txt" && fail=1
# 2. The PyTorch anchor first among the timings, so the ratios always have their other half
# (it takes ~2 minutes, most of it torch.compile's first step at the end).
if [ -f "$b/torch_w2v2_anchor.py" ]; then
    OUT="$out" timeout "$(cap 150)" python3 "$b/torch_w2v2_anchor.py" >"$out/torch.log" 2>&1 || echo "torch anchor stopped early (see torch.log)"
fi
# Its batch-1 short-chunk latencies (the first part of the second anchor; the XLS-R step after
# them is cut off by the time limit).
if [ -f "$b/torch_w2v2_anchor_more.py" ]; then
    OUT="$out" timeout "$(cap 45)" python3 "$b/torch_w2v2_anchor_more.py" 2>/dev/null | grep base_infer >"$out/torch_more.log"
fi
# 3. Training step benches (criterion, GPU only).
timeout "$(cap 150)" "$b"/bin/train_step* --bench cuda --warm-up-time 1 --measurement-time 4 2>&1 | grep -E "cuda|time:" | grep -v "^Benchmarking" | tee "$out/train_step.txt"
# CTC loss + gradient at 8 x 15 s (issue 4's goal: <= 0.1 ms), then dense against sparse FFN
# linears (the crossovers that pick engine infer's path), GPU groups only.
timeout "$(cap 60)" "$b"/bin/ctc* --bench cuda --warm-up-time 0.5 --measurement-time 1 2>&1 | grep -E "cuda|time:" | grep -v "^Benchmarking" | tee "$out/ctc.txt"
timeout "$(cap 120)" "$b"/bin/sparse* --bench cuda --warm-up-time 0.5 --measurement-time 1 2>&1 | grep -E "cuda|time:" | grep -v "^Benchmarking" | tee "$out/sparse.txt"
# Kernel benches: each changed kernel timed next to the version it replaced (fused layer 0,
# pinned upload, fp32 FMA against 3xTF32, the bf16 GEMMs and attention) and cuBLAS.
timeout "$(cap 120)" "$b"/bin/cuda_kernels* > "$out/kernels.md" 2>&1 || echo "kernel benches stopped early"
# Whole forward passes with their stage profiles (issue 3: bf16 at 8 x 15 s against PyTorch's
# best, the anchor's infer_b8_15s rows below).
for shape in "8 15 bf16" "8 15 f32" "1 10 bf16" "1 1 bf16" "1 1 f32"; do
    set -- $shape
    timeout "$(cap 45)" "$b/bin/engine" bench --device cuda --precision "$3" --batch "$1" --seconds "$2" --reps 10 --profile 2>&1
done | tee "$out/forward.txt"
# The bf16 forward again with the mma.sync GEMMs alone (S3R_WGMMA=0; wgmma is timed in by default).
S3R_WGMMA=0 timeout "$(cap 45)" "$b/bin/engine" bench --device cuda --precision bf16 --batch 8 --seconds 15 --reps 10 --profile 2>&1 | sed 's/^forward/forward (S3R_WGMMA=0)/' | tee -a "$out/forward.txt"
# 4. Where the bf16 S3-Router step's time goes, kernel by kernel (when the host has nsys), then
# the bf16 finetuning step's (issue 7's gap to PyTorch) as long as time is left.
# (criterion's filters are regular expressions.)
for name in s3router finetune; do
    command -v nsys >/dev/null && [ "$(left)" -gt 90 ] || break
    timeout "$(cap 100)" nsys profile -o "$out/$name" --force-overwrite true "$b"/bin/train_step* \
        --bench "$name step .*b8x15s cuda bf16" --profile-time 3 >/dev/null 2>&1
    timeout "$(cap 40)" nsys stats --report cuda_gpu_kern_sum --format csv "$out/$name.nsys-rep" 2>/dev/null | head -40 >"$out/${name}_kernels.csv"
    rm -f "$out/$name.nsys-rep" "$out/$name.sqlite"
done
# 5. The demo on the GPU (issue 9; it ran on the H200 on 2026-11-28), as long as time is left.
t=$(( $(left) - 20 )); [ "$t" -gt 240 ] && t=240
[ "$t" -gt 30 ] && timeout "$t" "$b/bin/engine" train --device cuda --out "$out/demo" 2>&1 | tail -12 | tee "$out/demo.txt"
if [ "${FULL:-0}" = 1 ]; then
    "$b/bin/engine" bench --device cuda --precision f32 --batch 1 --seconds 10 --reps 10 --profile 2>&1 | tee -a "$out/forward.txt"
    timeout 240 "$b/bin/engine" train --device cuda --precision bf16 --out "$out/demo-bf16" 2>&1 | tail -4 | tee -a "$out/demo.txt"
fi
{
    echo; echo "== summary ($SECONDS s)"; cat "$out/gpu.txt"; grep -h "^test result" "$out"/test-*.log | sort | uniq -c
    cat "$out/wgmma.txt" "$out/cli.txt"
    cat "$out/train_step.txt"
    cat "$out/ctc.txt" "$out/sparse.txt" "$out/kernels.md"
    grep -h "^forward" "$out/forward.txt"
    grep -hE "^[a-z0-9_]+: " "$out/torch.log" "$out/torch_more.log" 2>/dev/null
    for f in "$out"/*_kernels.csv; do [ -f "$f" ] && { echo "-- $(basename "$f")"; cut -c1-160 "$f" | head -25; }; done
    tail -3 "$out/demo.txt" 2>/dev/null
} | tee "$res/summary.txt"
for f in "$out"/*.*; do echo "==> $(basename "$f")"; cat "$f"; done >"$res/logs.txt"
cp "$out/torch_baseline.json" "$out/torch_more.json" "$res/" 2>/dev/null
exit $fail
RUN
chmod +x "$out/run.sh"
# One compressed archive as well: each executable embeds every kernel's fatbin, and the folder
# (~110 MB) is more than a device call carries (64 MiB, the working tree's ~43 MB included).
# xz's 64 MiB window sees the fatbins repeated across executables: ~8 MB (gzip: 44 MB). On the
# GPU host (no xz needed): python3 -c "import tarfile; tarfile.open('gpu-bundle.tar.xz').extractall()"
# and then bash gpu-bundle/run.sh.
XZ_OPT=-9 tar cJf "$out.tar.xz" "$out"
du -sh "$out" "$out.tar.xz"
