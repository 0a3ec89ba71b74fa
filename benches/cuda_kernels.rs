//! GPU kernel benchmarks at wav2vec2-base shapes, batch 8 x 15 s (5992 frames): each kernel's
//! median time and achieved TFLOP/s or GB/s, the dense and masked FFN GEMMs next to cuBLAS at the
//! same shape. Prints one table; exits quietly (with a line) without a GPU.
//!   cargo bench --bench cuda_kernels

use std::time::Instant;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use s3router::backend::backward::Backward;
use s3router::backend::cuda::{unavailable_reason, CudaBackend, Precision, BF16_MMA_KERNELS, TF32X3_KERNELS};
use s3router::backend::{Activation, Backend, ConvGeometry, NormParams, Seqs};
use s3router::dropout::{Dropout, SiteDropout};
use s3router::rng::SplitMix;
use s3router::tensor::Tensor;

const FRAMES: usize = 8 * 749;

/// Uniform values in [-0.5, 0.5).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    (0..n).map(|_| rng.symmetric() * 0.5).collect()
}

/// Median milliseconds of `f` over `reps` runs (after 3 warm-ups), each run waited for.
fn time_ms(be: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    be.synchronize().unwrap();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            be.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[reps / 2]
}

struct Row(String, f64, String);

fn main() {
    if let Some(why) = unavailable_reason() {
        println!("cuda_kernels: skipped ({why})");
        return;
    }
    // mma.sync alone for 3xTF32 too (its wgmma kernel is measured in wgmma_rows).
    let mut f32_be = CudaBackend::new(0, Precision::F32).unwrap();
    f32_be.set_tf32x3_kernel(Some(0)).unwrap();
    // mma.sync alone (the wgmma kernels, timed in by default on Hopper, have their own table).
    let mut bf16_be = CudaBackend::new(0, Precision::Bf16).unwrap();
    bf16_be.set_wgmma_tuning(false).unwrap();
    let mut fma_be = CudaBackend::new(0, Precision::F32).unwrap();
    fma_be.set_tf32x3(false);
    let mut wmma_be = CudaBackend::new(0, Precision::Bf16).unwrap();
    wmma_be.set_mma_sync(false);
    let mut rows = Vec::new();
    let (m, k, n) = (FRAMES, 768, 3072);
    let flops = 2.0 * (m * n * k) as f64;
    let tf = |ms: f64| format!("{:.1} TFLOP/s", flops / ms / 1e9);
    let x = Tensor::from_vec(random(m * k, 1), &[m, k]);
    let w = Tensor::from_vec(random(n * k, 2), &[n, k]);
    let keep: Vec<bool> = random(n * k, 3).iter().map(|&v| v > -0.4).collect(); // 10% dropped
    let bits = s3router::mask::pack(&keep);
    // The mma.sync GEMM in each tile shape, then as the backend runs it (the shape it timed
    // fastest for this GEMM shape). The wgmma shapes come last, in wgmma_rows.
    let tile_bes: Vec<(String, CudaBackend)> = BF16_MMA_KERNELS
        .iter()
        .enumerate()
        .filter(|(_, k)| !k.is_wgmma())
        .map(|(t, k)| {
            let mut be = CudaBackend::new(0, Precision::Bf16).unwrap();
            be.set_mma_tile(Some(t)).unwrap();
            (format!("bf16 {} ({}x{})", k.name, k.tile_m, k.tile_n), be)
        })
        .collect();
    let gemm_bes = [("f32 FMA (v1)".to_string(), &fma_be), ("f32 3xTF32".into(), &f32_be), ("bf16 wmma (v2)".into(), &wmma_be)]
        .into_iter()
        .chain(tile_bes.iter().map(|(p, be)| (p.clone(), be)))
        .chain([("bf16 mma.sync, timed tile".to_string(), &bf16_be)]);
    for (p, be) in gemm_bes {
        let (dense, masked) = ffn_gemm_ms(be, &x, &w, &bits);
        rows.push(Row(format!("ffn gemm dense {p} {m}x{k}x{n}"), dense, tf(dense)));
        rows.push(Row(format!("ffn gemm masked(10%) {p}"), masked, tf(masked)));
    }
    // The FFN's second GEMM (N = 768: a 128-wide tile leaves the last wave nearly empty) in
    // each mma.sync 3xTF32 tile shape.
    {
        let x2 = Tensor::from_vec(random(m * n, 14), &[m, n]);
        let w2 = Tensor::from_vec(random(k * n, 15), &[k, n]);
        let bits2 = s3router::mask::pack(&random(k * n, 16).iter().map(|&v| v > -0.4).collect::<Vec<bool>>());
        for (i, t) in TF32X3_KERNELS.iter().enumerate().filter(|(_, t)| !t.is_wgmma()) {
            let mut be = CudaBackend::new(0, Precision::F32).unwrap();
            be.set_tf32x3_kernel(Some(i)).unwrap();
            let (dense, masked) = ffn_gemm_ms(&be, &x2, &w2, &bits2);
            rows.push(Row(format!("ffn gemm 2 dense f32 {} ({}x{}) {m}x{n}x{k}", t.name, t.tile_m, t.tile_n), dense, tf(dense)));
            rows.push(Row(format!("ffn gemm 2 masked(10%) f32 {}", t.name), masked, tf(masked)));
        }
    }
    // A whole FFN (768 -> 3072 GELU -> 768), bf16: the intermediate in f32 then converted for
    // the second GEMM (as before), against it handed over in bf16 (`linear_as_operand`).
    {
        let be = &bf16_be;
        let (gx, gb1) = (be.upload(&x).unwrap(), be.upload(&Tensor::from_vec(random(n, 10), &[n])).unwrap());
        let gw1 = be.prepare_linear_weight(&w).unwrap();
        let gw2 = be.prepare_linear_weight(&Tensor::from_vec(random(k * n, 11), &[k, n])).unwrap();
        let ffn_flops = 2.0 * flops;
        for (how, handed) in [("f32 intermediate", false), ("bf16 hand-over", true)] {
            let ms = time_ms(be, 20, || {
                let mid = if handed {
                    be.linear_as_operand(&gx, &gw1, Some(&gb1), Activation::Gelu, &[(m, None)]).unwrap()
                } else {
                    be.linear(&gx, &gw1, Some(&gb1), Activation::Gelu).unwrap()
                };
                drop(be.linear(&mid, &gw2, None, Activation::Identity).unwrap())
            });
            rows.push(Row(format!("ffn block bf16 ({how})"), ms, format!("{:.1} TFLOP/s", ffn_flops / ms / 1e9)));
        }
    }
    // cuBLAS at the same shape: row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ.
    let stream = f32_be.stream().clone();
    let blas = CudaBlas::new(stream.clone()).unwrap();
    fn cfg<T>(m: usize, n: usize, k: usize, one: T, zero: T) -> GemmConfig<T> {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: one,
            lda: k as i32,
            ldb: k as i32,
            beta: zero,
            ldc: n as i32,
        }
    }
    let (a32, w32) = (stream.clone_htod(x.f32s().unwrap()).unwrap(), stream.clone_htod(w.f32s().unwrap()).unwrap());
    let mut c32 = stream.alloc_zeros::<f32>(m * n).unwrap();
    let ms = time_ms(&f32_be, 20, || unsafe { blas.gemm(cfg(m, n, k, 1.0f32, 0.0), &w32, &a32, &mut c32).unwrap() });
    rows.push(Row("cuBLAS sgemm fp32 (no TF32)".into(), ms, tf(ms)));
    let to_bf = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
    let (ab, wb) = (stream.clone_htod(&to_bf(x.f32s().unwrap())).unwrap(), stream.clone_htod(&to_bf(w.f32s().unwrap())).unwrap());
    let mut cb = stream.alloc_zeros::<half::bf16>(m * n).unwrap();
    let one = half::bf16::from_f32(1.0);
    let cublas_bf16_ms = time_ms(&f32_be, 20, || unsafe { blas.gemm(cfg(m, n, k, one, half::bf16::ZERO), &wb, &ab, &mut cb).unwrap() });
    rows.push(Row("cuBLAS gemm bf16".into(), cublas_bf16_ms, tf(cublas_bf16_ms)));

    // Attention, layer norm, feature-encoder conv 1, positional conv.
    let seqs = Seqs::new(vec![749; 8]);
    let qkv_host = Tensor::from_vec(random(FRAMES * 3 * 768, 4), &[FRAMES, 3 * 768]);
    let d_out_host = Tensor::from_vec(random(FRAMES * 768, 9), &[FRAMES, 768]);
    let dropout = Some(SiteDropout { dropout: Dropout { p: 0.1, seed: 1 }, site: 1 });
    for (p, be) in [("f32 FMA (v1)", &fma_be), ("f32 3xTF32", &f32_be), ("bf16 mma.sync (v2)", &bf16_be)] {
        let qkv = be.upload(&qkv_host).unwrap();
        let ms = time_ms(be, 10, || drop(be.attention(&qkv, &seqs, 12, 0.125).unwrap()));
        let att_flops = 4.0 * 8.0 * 12.0 * 749.0 * 749.0 * 64.0;
        rows.push(Row(format!("attention {p} b8 h12 t749 d64"), ms, format!("{:.1} TFLOP/s", att_flops / ms / 1e9)));
        // Training: the gradient with respect to q, k, v (attention dropout 0.1, the default);
        // flash-style on tensor cores (forward run again for its log-sum-exp, then dK dV and dQ
        // kernels), fp32 FMA through T x T probabilities per utterance. Rate: the backward's 5
        // products.
        let d_out = be.upload(&d_out_host).unwrap();
        let ms = time_ms(be, 5, || drop(be.attention_grad(&d_out, &qkv, &seqs, 12, 0.125, dropout).unwrap()));
        let kind = if be.precision() == Precision::F32 && !be.tf32x3() { "T x T" } else { "flash" };
        rows.push(Row(format!("attention gradient {p} ({kind}), dropout 0.1"), ms, format!("{:.1} TFLOP/s", 2.5 * att_flops / ms / 1e9)));
        if be.precision() == Precision::Bf16 {
            // From a bf16 qkv, as the bf16 training step runs them (the next tile in flight).
            let qkv16 = be.to_bf16(&qkv).unwrap();
            let ms = time_ms(be, 10, || drop(be.attention(&qkv16, &seqs, 12, 0.125).unwrap()));
            rows.push(Row(format!("attention {p}, bf16 qkv"), ms, format!("{:.1} TFLOP/s", att_flops / ms / 1e9)));
            let ms = time_ms(be, 5, || drop(be.attention_grad(&d_out, &qkv16, &seqs, 12, 0.125, dropout).unwrap()));
            rows.push(Row(
                format!("attention gradient {p}, bf16 qkv, dropout 0.1"),
                ms,
                format!("{:.1} TFLOP/s", 2.5 * att_flops / ms / 1e9),
            ));
        }
    }
    let be = &f32_be;
    let h = be.upload(&Tensor::from_vec(random(FRAMES * 768, 5), &[FRAMES, 768])).unwrap();
    let g = be.upload(&Tensor::from_vec(vec![1.0; 768], &[768])).unwrap();
    let bta = be.upload(&Tensor::from_vec(vec![0.0; 768], &[768])).unwrap();
    let ms = time_ms(be, 20, || {
        drop(be.layer_norm(h.clone(), Some(&h), NormParams { gamma: &g, beta: &bta, eps: 1e-5 }, Activation::Identity).unwrap())
    });
    rows.push(Row("layer_norm+residual 5992x768".into(), ms, format!("{:.0} GB/s", 3.0 * (FRAMES * 768 * 4) as f64 / ms / 1e6)));
    // The positional conv's weight gradient (finetuning trains it; fp32 FMA in every precision).
    let dy = be.upload(&Tensor::from_vec(random(FRAMES * 768, 12), &[FRAMES, 768])).unwrap();
    let geom = ConvGeometry { kernel: 128, stride: 1, pad_left: 64, groups: 16 };
    let ms = time_ms(be, 10, || drop(be.conv1d_weight_grad(&dy, &h, &seqs, &seqs, geom).unwrap()));
    let wf = 2.0 * (FRAMES * 768 * 128 * 48) as f64;
    rows.push(Row("pos conv (k128 g16) weight gradient, fp32 FMA tiles".into(), ms, format!("{:.1} TFLOP/s", wf / ms / 1e9)));
    // Column reductions (a bias's gradient, a layer norm's parameter gradients): a finetuning
    // step takes ~100 of them.
    let d_mid = be.upload(&Tensor::from_vec(random(FRAMES * 3072, 13), &[FRAMES, 3072])).unwrap();
    let ms = time_ms(be, 20, || drop(be.column_sum(&d_mid).unwrap()));
    rows.push(Row("column sum 5992x3072 (FFN bias gradient)".into(), ms, format!("{:.0} GB/s", (FRAMES * 3072 * 4) as f64 / ms / 1e6)));
    let ms = time_ms(be, 20, || drop(be.layer_norm_grads(&dy, &h, NormParams { gamma: &g, beta: &bta, eps: 1e-5 }, true).unwrap()));
    rows.push(Row(
        "layer norm backward with gamma, beta 5992x768".into(),
        ms,
        format!("{:.0} GB/s", 4.0 * (FRAMES * 768 * 4) as f64 / ms / 1e6),
    ));
    for (p, be) in [("f32 FMA", &fma_be), ("f32 3xTF32", &f32_be), ("bf16 wmma (v2)", &wmma_be), ("bf16 mma.sync, timed tile", &bf16_be)] {
        rows.extend(conv_rows(p, be));
    }
    // Feature-encoder layer 0 (conv k10 s5 1->512, group norm, GELU): stored conv output then
    // the norm, against the conv computed where the norm reads it; and the audio's upload.
    let audio: Vec<Vec<f32>> = (0..8).map(|u| random(240_000, 20 + u)).collect();
    let parts: Vec<&[f32]> = audio.iter().map(|a| a.as_slice()).collect();
    let seqs_in = Seqs::new(vec![240_000; 8]);
    let seqs_out = Seqs::new(vec![(240_000 - 10) / 5 + 1; 8]);
    let out_bytes = (seqs_out.total() * 512 * 4) as f64;
    for (p, be) in [("f32", &f32_be), ("bf16", &bf16_be)] {
        let x = be.upload_rows(&parts, 1).unwrap();
        let w = be.prepare_conv_weight(&Tensor::from_vec(random(512 * 10, 21), &[512, 10, 1])).unwrap();
        let (g, bta) =
            (be.upload(&Tensor::from_vec(vec![1.0; 512], &[512])).unwrap(), be.upload(&Tensor::from_vec(vec![0.0; 512], &[512])).unwrap());
        let norm = NormParams { gamma: &g, beta: &bta, eps: 1e-5 };
        let geom = ConvGeometry { kernel: 10, stride: 5, pad_left: 0, groups: 1 };
        let ms = time_ms(be, 10, || {
            let y = be.conv1d(&x, &seqs_in, &seqs_out, &w, None, geom, Activation::Identity).unwrap();
            drop(be.group_norm_time(y, &seqs_out, norm, Activation::Gelu).unwrap())
        });
        rows.push(Row(format!("conv0 then group norm + GELU {p} b8x15s"), ms, format!("{:.0} GB/s of output", out_bytes / ms / 1e6)));
        let ms = time_ms(be, 10, || drop(be.conv1d_group_norm(&x, &seqs_in, &seqs_out, &w, None, geom, norm, Activation::Gelu).unwrap()));
        rows.push(Row(format!("conv0 + group norm + GELU, fused {p} b8x15s"), ms, format!("{:.0} GB/s of output", out_bytes / ms / 1e6)));
    }
    let be = &f32_be;
    let audio_bytes = (8 * 240_000 * 4) as f64;
    let ms = time_ms(be, 10, || drop(be.upload(&Tensor::from_vec(parts.concat(), &[8 * 240_000, 1])).unwrap()));
    rows.push(Row("audio upload, joined + pageable copy, 8 x 15 s".into(), ms, format!("{:.1} GB/s", audio_bytes / ms / 1e6)));
    let ms = time_ms(be, 10, || drop(be.upload_rows(&parts, 1).unwrap()));
    rows.push(Row("audio upload through pinned staging, 8 x 15 s".into(), ms, format!("{:.1} GB/s", audio_bytes / ms / 1e6)));
    println!("\n| kernel (wav2vec2-base shapes, 8 x 15 s) | median ms | rate |\n|---|---|---|");
    for Row(name, ms, rate) in rows {
        println!("| {name} | {ms:.4} | {rate} |");
    }
    println!("\nmma.sync tile shapes timed fastest (M up to, N, K, kernel): {:?}", bf16_be.mma_tile_choices());
    wgmma_rows(&x, &w, &bits, cublas_bf16_ms);
}

/// Median milliseconds of the FFN GEMM `x · wᵀ` through `be`, dense and with the mask `bits`.
fn ffn_gemm_ms(be: &CudaBackend, x: &Tensor, w: &Tensor, bits: &[u8]) -> (f64, f64) {
    let (gx, gw, gm) = (be.upload(x).unwrap(), be.prepare_linear_weight(w).unwrap(), be.upload_mask(bits).unwrap());
    let dense = time_ms(be, 20, || drop(be.linear(&gx, &gw, None, Activation::Identity).unwrap()));
    let masked = time_ms(be, 20, || drop(be.linear_masked(&gx, &gw, &gm, None, Activation::Identity).unwrap()));
    (dense, masked)
}

/// The feature encoder's conv 1 (k3 s2 512 -> 512) and the positional conv (k128, 16 groups)
/// at 8 x 15 s through `be`.
fn conv_rows(p: &str, be: &CudaBackend) -> Vec<Row> {
    let mut rows = Vec::new();
    let t_in = 47_999;
    let seqs_in = Seqs::new(vec![t_in; 8]);
    let seqs_out = Seqs::new(vec![(t_in - 3) / 2 + 1; 8]);
    let xin = be.upload(&Tensor::from_vec(random(8 * t_in * 512, 6), &[8 * t_in, 512])).unwrap();
    let wc = be.prepare_conv_weight(&Tensor::from_vec(random(512 * 3 * 512, 7), &[512, 3, 512])).unwrap();
    let geom = ConvGeometry { kernel: 3, stride: 2, pad_left: 0, groups: 1 };
    let ms = time_ms(be, 10, || drop(be.conv1d(&xin, &seqs_in, &seqs_out, &wc, None, geom, Activation::Gelu).unwrap()));
    let cf = 2.0 * (seqs_out.total() * 512 * 1536) as f64;
    rows.push(Row(format!("conv1 (k3 s2 512->512) {p} b8x15s"), ms, format!("{:.1} TFLOP/s", cf / ms / 1e9)));
    let seqs = Seqs::new(vec![749; 8]);
    let h = be.upload(&Tensor::from_vec(random(FRAMES * 768, 5), &[FRAMES, 768])).unwrap();
    let wp = be.prepare_conv_weight(&Tensor::from_vec(random(768 * 128 * 48, 8), &[768, 128, 48])).unwrap();
    let geom = ConvGeometry { kernel: 128, stride: 1, pad_left: 64, groups: 16 };
    let ms = time_ms(be, 10, || drop(be.conv1d(&h, &seqs, &seqs, &wp, None, geom, Activation::Gelu).unwrap()));
    let pf = 2.0 * (FRAMES * 768 * 128 * 48) as f64;
    rows.push(Row(format!("pos conv (k128 g16) {p}"), ms, format!("{:.1} TFLOP/s", pf / ms / 1e9)));
    rows
}

/// Hopper's warpgroup-MMA GEMMs (kernels/gemm_sm90a.cu), measured last and printed row by row,
/// so a fault in a changed wgmma kernel costs only these rows. The FFN
/// GEMM in each wgmma tile shape (dense, then masked, against cuBLAS), then the timed choice
/// with the wgmma shapes among the candidates on the FFN GEMM and the two convolutions; then
/// the same for the fp32 3xTF32 GEMM (wgmma forced, then timed against mma.sync).
fn wgmma_rows(x: &Tensor, w: &Tensor, bits: &[u8], cublas_bf16_ms: f64) {
    let (m, k, n) = (FRAMES, 768, 3072);
    let rate = |ms: f64| format!("{:.1} TFLOP/s, {:.0}% of cuBLAS bf16", 2.0 * (m * n * k) as f64 / ms / 1e9, 100.0 * cublas_bf16_ms / ms);
    let mut timed = CudaBackend::new(0, Precision::Bf16).unwrap();
    if timed.set_wgmma_tuning(true).is_err() {
        println!("\nwgmma: skipped (needs a compute capability 9.0 GPU)");
        return;
    }
    println!("\n| Hopper wgmma (kernels/gemm_sm90a.cu) | median ms | rate |\n|---|---|---|");
    let forced = BF16_MMA_KERNELS.iter().enumerate().filter(|(_, t)| t.is_wgmma()).map(|(i, t)| {
        let mut be = CudaBackend::new(0, Precision::Bf16).unwrap();
        be.set_mma_tile(Some(i)).unwrap();
        (format!("{} ({}x{})", t.name, t.tile_m, t.tile_n), be)
    });
    let timed_name = "timed tile, wgmma included";
    for (p, be) in forced.chain([(timed_name.to_string(), timed)]) {
        let (dense, masked) = ffn_gemm_ms(&be, x, w, bits);
        println!("| ffn gemm dense bf16 {p} {m}x{k}x{n} | {dense:.4} | {} |", rate(dense));
        println!("| ffn gemm masked(10%) bf16 {p} | {masked:.4} | {} |", rate(masked));
        if p == timed_name {
            for Row(name, ms, rate) in conv_rows(&format!("bf16 {p}"), &be) {
                println!("| {name} | {ms:.4} | {rate} |");
            }
            println!("\ntile shapes timed fastest with wgmma (M up to, N, K, kernel): {:?}", be.mma_tile_choices());
        }
    }
    println!("\n| Hopper wgmma, fp32 3xTF32 | median ms | rate |\n|---|---|---|");
    let rate = |ms: f64| format!("{:.1} TFLOP/s", 2.0 * (m * n * k) as f64 / ms / 1e9);
    let wgmma = TF32X3_KERNELS.iter().position(|t| t.is_wgmma()).expect("the 3xTF32 table has a wgmma kernel");
    let mut forced = CudaBackend::new(0, Precision::F32).unwrap();
    forced.set_tf32x3_kernel(Some(wgmma)).unwrap();
    let timed_name = "timed (mma.sync or wgmma)";
    for (p, be) in
        [(TF32X3_KERNELS[wgmma].name.to_string(), forced), (timed_name.to_string(), CudaBackend::new(0, Precision::F32).unwrap())]
    {
        let (dense, masked) = ffn_gemm_ms(&be, x, w, bits);
        println!("| ffn gemm dense f32 {p} {m}x{k}x{n} | {dense:.4} | {} |", rate(dense));
        println!("| ffn gemm masked(10%) f32 {p} | {masked:.4} | {} |", rate(masked));
        for Row(name, ms, rate) in conv_rows(&format!("f32 {p}"), &be) {
            println!("| {name} | {ms:.4} | {rate} |");
        }
        if p == timed_name {
            println!("\n3xTF32 kernels timed fastest (M up to, N, K, kernel): {:?}", be.mma_tile_choices());
        }
    }
}
