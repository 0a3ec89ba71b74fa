//! The GPU's training ops and training step against the CPU's (which tests/train.rs checks
//! against PyTorch): op by op on random inputs of awkward sizes with outputs poisoned, the
//! top-k masks bit for bit (ties included), and whole steps of mask learning and weight
//! finetuning (with and without the feature encoder) with every regulariser on, on a post-LN
//! (group-norm encoder) and a pre-LN (layer-norm encoder) model.
//!
//! Without a GPU each test prints a skip line and passes; with `S3R_REQUIRE_GPU=1` it fails.

mod common;

use common::{assert_close, assert_key_bias_negligible, f32_backends, fixtures, gpu, l2, random, utterances};
use s3router::backend::backward::{Backward, ScoredLinear, ScoredRows, TrainBackend};
use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{CudaBackend, Precision};
use s3router::backend::{Activation, Backend, ConvGeometry, NormParams, Seqs};
use s3router::ctc::{CtcTargets, Reduction};
use s3router::data::audio;
use s3router::dropout::{Dropout, SiteDropout};
use s3router::model::checkpoint::Checkpoint;
use s3router::model::preprocess::Preprocessor;
use s3router::model::wav2vec2::Linear;
use s3router::model::Wav2Vec2;
use s3router::rng::SplitMix;
use s3router::router::{init_scores, Init};
use s3router::tensor::{DType, Tensor};
use s3router::train::adam::TensorAdam;
use s3router::train::masked::{step, Features, MaskScope, MaskedWeight, Regularisers, StepGrads, TimeMask, Weights};

const TOL: f64 = 1e-5;
/// Reductions summed in a different order (f32 warp sums against the CPU's f64 rows).
const REDUCTION_TOL: f64 = 1e-4;
/// bf16 operands (8 significant bits) with fp32 accumulation, against the CPU's fp32.
const BF16_TOL: f64 = 2e-2;
/// A whole bf16 step: rounding compounds through the layers and the backward.
const BF16_STEP_TOL: f64 = 6e-2;

fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape)
}

fn back(be: &CudaBackend, x: &Tensor) -> Vec<f32> {
    be.to_host(x).unwrap().to_vec().unwrap()
}

fn up(be: &CudaBackend, x: &Tensor) -> Tensor {
    be.upload(x).unwrap()
}

#[test]
fn elementwise_ops_and_dropout_match_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    let (rows, c) = (37, 19);
    let x = t(random(rows * c, 1, 3.0), &[rows, c]);
    let dy = t(random(rows * c, 2, 1.0), &[rows, c]);
    let d = Dropout { p: 0.3, seed: 77 };
    // Dropout masks are a pure function of (seed, site, index): bit-identical on both devices.
    assert_eq!(back(&be, &be.dropout(up(&be, &x), d, 5).unwrap()), cpu.dropout(x.clone(), d, 5).unwrap().to_vec().unwrap());
    // GELU with dropout fused: the CPU's GELU then its dropout, on both devices.
    for dropout in [None, SiteDropout::at(Some(d), 6)] {
        let what = format!("gelu, dropout {}", dropout.is_some());
        let want = cpu.gelu(&x, dropout).unwrap();
        if dropout.is_some() {
            let composed = cpu.dropout(cpu.gelu(&x, None).unwrap(), d, 6).unwrap();
            assert_eq!(want.f32s().unwrap(), composed.f32s().unwrap(), "{what}: fused = GELU then dropout");
        }
        assert_close(&what, &back(&be, &be.gelu(&up(&be, &x), dropout).unwrap()), want.f32s().unwrap(), TOL);
        let want = cpu.gelu_grad(&dy, &x, dropout).unwrap();
        if dropout.is_some() {
            let composed = cpu.gelu_grad(&cpu.dropout(dy.clone(), d, 6).unwrap(), &x, None).unwrap();
            assert_eq!(want.f32s().unwrap(), composed.f32s().unwrap(), "{what}: fused grad = dropout then GELU'");
        }
        let got = be.gelu_grad(&up(&be, &dy), &up(&be, &x), dropout).unwrap();
        assert_close(&format!("{what}: grad"), &back(&be, &got), want.f32s().unwrap(), TOL);
    }
    // A block's residual join and layer norm in one pass, against the CPU's dropout, add and
    // norm in turn (rows of 19 and of 768 channels).
    for (rows, c) in [(rows, c), (300, 768)] {
        let (y, r) = (t(random(rows * c, 20, 2.0), &[rows, c]), t(random(rows * c, 21, 2.0), &[rows, c]));
        let (gamma, beta) = (t(random(c, 22, 1.0), &[c]), t(random(c, 23, 1.0), &[c]));
        let (gg, gb) = (up(&be, &gamma), up(&be, &beta));
        for dropout in [None, SiteDropout::at(Some(d), 7)] {
            let what = format!("dropout + add + layer norm {rows}x{c}, dropout {}", dropout.is_some());
            let (sum, normed) = cpu.dropout_add_norm(y.clone(), dropout, &r, NormParams { gamma: &gamma, beta: &beta, eps: 1e-5 }).unwrap();
            let (gsum, gnormed) =
                be.dropout_add_norm(up(&be, &y), dropout, &up(&be, &r), NormParams { gamma: &gg, beta: &gb, eps: 1e-5 }).unwrap();
            assert_eq!(back(&be, &gsum), sum.to_vec().unwrap(), "{what}: the sum (rounded as the separate passes round it)");
            assert_close(&what, &back(&be, &gnormed), normed.f32s().unwrap(), TOL);
        }
    }
    assert_close("column sum", &back(&be, &be.column_sum(&up(&be, &dy)).unwrap()), cpu.column_sum(&dy).unwrap().f32s().unwrap(), TOL);
    assert_eq!(back(&be, &be.scale(up(&be, &x), 0.25).unwrap()), cpu.scale(x.clone(), 0.25).unwrap().to_vec().unwrap());
    let (gx, gdy) = (up(&be, &x), up(&be, &dy));
    assert!(be.all_finite(&[&gx, &gdy]).unwrap());
    let mut bad = x.to_vec().unwrap();
    bad[rows * c - 1] = f32::INFINITY;
    assert!(!be.all_finite(&[&gdy, &up(&be, &t(bad, &[rows, c]))]).unwrap());
}

#[test]
fn the_optimiser_on_the_device_follows_the_host_adam() {
    let Some(be) = gpu(Precision::F32) else { return };
    let shapes = vec![vec![37, 19], vec![5]];
    let (mut gpu_adam, mut cpu_adam) = (TensorAdam::new(&be, &shapes).unwrap(), TensorAdam::new(&CpuBackend, &shapes).unwrap());
    let mut cpu_p: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| t(random(s.iter().product(), 70 + i as u64, 1.0), s)).collect();
    let mut gpu_p: Vec<Tensor> = cpu_p.iter().map(|p| up(&be, p)).collect();
    for k in 0..5u64 {
        // The second tensor skips every other update (LayerDrop): its step count must lag.
        let grads: Vec<Option<Tensor>> =
            shapes.iter().enumerate().map(|(i, s)| (i == 0 || k % 2 == 0).then(|| t(random(s.iter().product(), 80 + k, 0.1), s))).collect();
        let gpu_grads: Vec<Option<Tensor>> = grads.iter().map(|g| g.as_ref().map(|g| up(&be, g))).collect();
        cpu_adam.update(&CpuBackend, &mut cpu_p.iter_mut().collect::<Vec<_>>(), &grads, 1e-2).unwrap();
        gpu_adam.update(&be, &mut gpu_p.iter_mut().collect::<Vec<_>>(), &gpu_grads, 1e-2).unwrap();
    }
    for (g, c) in gpu_p.iter().zip(&cpu_p) {
        assert_close("Adam parameters", &back(&be, g), c.f32s().unwrap(), 1e-6);
    }
    let (g, c) = (gpu_adam.to_host(&be).unwrap(), cpu_adam.to_host(&CpuBackend).unwrap());
    assert_eq!(g.steps, vec![5, 3]);
    assert_eq!(g.steps, c.steps);
    for (gm, cm) in g.m.iter().chain(&g.v).zip(c.m.iter().chain(&c.v)) {
        assert_close("Adam moments", gm, cm, 1e-6);
    }
}

#[test]
fn linear_and_norm_gradients_match_cpu() {
    let f32s = f32_backends();
    let Some(be) = f32s.first() else { return };
    let cpu = CpuBackend;
    for (i, &(n, d_in, d_out)) in [(1, 1, 1), (37, 19, 23), (129, 65, 67), (300, 768, 3072)].iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, dy) = (t(random(n * d_in, seed, 1.0), &[n, d_in]), t(random(n * d_out, seed + 1, 1.0), &[n, d_out]));
        let w = t(random(d_out * d_in, seed + 2, 0.2), &[d_out, d_in]);
        let keep: Vec<bool> = random(d_out * d_in, seed + 3, 1.0).iter().map(|&v| v > -0.4).collect();
        let bits = s3router::mask::pack(&keep);
        let (cw, gw) = (cpu.prepare_linear_weight(&w).unwrap(), be.prepare_linear_weight(&w).unwrap());
        let (cm, gm) = (cpu.prepare_mask(&bits, d_out, d_in).unwrap(), be.prepare_mask(&bits, d_out, d_in).unwrap());
        for (v, be) in f32s.iter().enumerate() {
            for (what, cmask, gmask) in [("unmasked", None, None), ("masked", Some(&cm), Some(&gm))] {
                let want = cpu.linear_input_grad(&dy, &cw, cmask).unwrap();
                let got = be.linear_input_grad(&up(be, &dy), &gw, gmask).unwrap();
                assert_close(&format!("dx {what} {n}x{d_in}x{d_out} backend {v}"), &back(be, &got), want.f32s().unwrap(), TOL);
            }
            let want = cpu.linear_weight_grad(&dy, &x).unwrap();
            let got = be.linear_weight_grad(&up(be, &dy), &up(be, &x)).unwrap();
            assert_close(&format!("dW {n}x{d_in}x{d_out} backend {v}"), &back(be, &got), want.f32s().unwrap(), TOL);
        }
        // bf16: the tensor-core gradient GEMMs (transposed, padded operands), masked too.
        let b16 = gpu(Precision::Bf16).unwrap();
        let (bw, bm) = (b16.prepare_linear_weight(&w).unwrap(), b16.prepare_mask(&bits, d_out, d_in).unwrap());
        for (what, cmask, gmask) in [("unmasked", None, None), ("masked", Some(&cm), Some(&bm))] {
            let want = cpu.linear_input_grad(&dy, &cw, cmask).unwrap();
            let got = b16.linear_input_grad(&up(&b16, &dy), &bw, gmask).unwrap();
            assert_close(&format!("bf16 dx {what} {n}x{d_in}x{d_out}"), &back(&b16, &got), want.f32s().unwrap(), BF16_TOL);
        }
        let got = b16.linear_weight_grad(&up(&b16, &dy), &up(&b16, &x)).unwrap();
        assert_close(
            &format!("bf16 dW {n}x{d_in}x{d_out}"),
            &back(&b16, &got),
            cpu.linear_weight_grad(&dy, &x).unwrap().f32s().unwrap(),
            BF16_TOL,
        );
    }
    for (rows, c) in [(1, 7), (53, 36), (300, 768)] {
        let (x, dy) = (t(random(rows * c, 5, 2.0), &[rows, c]), t(random(rows * c, 6, 1.0), &[rows, c]));
        let (gamma, beta) = (t(random(c, 7, 1.0), &[c]), t(random(c, 8, 1.0), &[c]));
        let want = cpu.layer_norm_grads(&dy, &x, NormParams { gamma: &gamma, beta: &beta, eps: 1e-5 }, true).unwrap();
        let (gg, gb) = (up(be, &gamma), up(be, &beta));
        let got = be.layer_norm_grads(&up(be, &dy), &up(be, &x), NormParams { gamma: &gg, beta: &gb, eps: 1e-5 }, true).unwrap();
        assert_close(&format!("layer norm dx {rows}x{c}"), &back(be, &got.0), want.0.f32s().unwrap(), REDUCTION_TOL);
        let ((wg, wb), (gg, gb)) = (want.1.unwrap(), got.1.unwrap());
        assert_close(&format!("layer norm dgamma {rows}x{c}"), &back(be, &gg), wg.f32s().unwrap(), REDUCTION_TOL);
        assert_close(&format!("layer norm dbeta {rows}x{c}"), &back(be, &gb), wb.f32s().unwrap(), REDUCTION_TOL);
    }
}

/// Training attention with dropout and its gradient: flash-style on tensor cores (fp32 as
/// 3xTF32, bf16) and, with `tf32x3` off, fp32 through `[heads, T, T]` probabilities per utterance.
#[test]
fn attention_with_dropout_and_its_gradient_match_cpu() {
    let f32s = f32_backends();
    let Some(f32_be) = f32s.first() else { return };
    let bf16_be = gpu(Precision::Bf16).unwrap();
    let cpu = CpuBackend;
    // (heads, head size, lengths): the flash-style kernels at head-size classes 16 and 64
    // (several 64-row tiles, a 1-frame utterance) and with rows not 16-byte aligned (hd 10).
    for (heads, hd, lens) in [(3, 12, vec![1, 37, 70]), (2, 64, vec![130, 1, 64]), (3, 10, vec![5, 70])] {
        let c = heads * hd;
        let seqs = Seqs::new(lens);
        let qkv = t(random(seqs.total() * 3 * c, 11, 1.0), &[seqs.total(), 3 * c]);
        let d_out = t(random(seqs.total() * c, 12, 1.0), &[seqs.total(), c]);
        for (v, (be, tol, grad_tol)) in [(f32_be, TOL, TOL), (&f32s[1], TOL, TOL), (&bf16_be, BF16_TOL, BF16_TOL)].into_iter().enumerate() {
            for dropout in [None, Some(SiteDropout { dropout: Dropout { p: 0.2, seed: 9 }, site: 3 })] {
                let what = format!("{:?} attention (backend {v}) h{heads} d{hd}, dropout {}", be.precision(), dropout.is_some());
                let want = cpu.attention_dropout(&qkv, &seqs, heads, 0.3, dropout).unwrap();
                let got = be.attention_dropout(&up(be, &qkv), &seqs, heads, 0.3, dropout).unwrap();
                assert_close(&what, &back(be, &got), want.f32s().unwrap(), tol);
                let want = cpu.attention_grad(&d_out, &qkv, &seqs, heads, 0.3, dropout).unwrap();
                let got = be.attention_grad(&up(be, &d_out), &up(be, &qkv), &seqs, heads, 0.3, dropout).unwrap();
                assert_close(&format!("{what}: gradient"), &back(be, &got), want.f32s().unwrap(), grad_tol);
                // From what the forward kept (the flash kernels' log-sum-exp): the same bits.
                let gq = up(be, &qkv);
                let saved = be.attention_dropout_saved(&gq, &seqs, heads, 0.3, dropout).unwrap();
                let from_saved = be.attention_grad_saved(&up(be, &d_out), &gq, &saved, &seqs, heads, 0.3, dropout).unwrap();
                let bits = |t: &Tensor| back(be, t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(saved.lse.is_some(), v != 1, "{what}: the flash kernels keep their log-sum-exp, the FMA path none");
                assert!(bits(&saved.out) == bits(&be.attention_dropout(&gq, &seqs, heads, 0.3, dropout).unwrap()), "{what}: saved output");
                assert!(bits(&from_saved) == bits(&got), "{what}: gradient from the saved forward differs");
            }
        }
        // The backward one utterance at a time (dQ's operands in groups under a memory cap).
        for precision in [Precision::F32, Precision::Bf16] {
            let mut be = gpu(precision).unwrap();
            be.set_dq_slab_bytes(1);
            let want = cpu.attention_grad(&d_out, &qkv, &seqs, heads, 0.3, None).unwrap();
            let got = be.attention_grad(&up(&be, &d_out), &up(&be, &qkv), &seqs, heads, 0.3, None).unwrap();
            let tol = if precision == Precision::F32 { TOL } else { BF16_TOL };
            assert_close(&format!("{precision:?} attention gradient h{heads} d{hd}, grouped"), &back(&be, &got), want.f32s().unwrap(), tol);
        }
        // bf16 from a bf16 qkv (what its GEMM writes in training): against the CPU on the same values.
        let rounded = qkv.to_dtype(DType::BF16).unwrap().to_f32().unwrap();
        let qkv16 = bf16_be.to_bf16(&up(&bf16_be, &qkv)).unwrap();
        for dropout in [None, Some(SiteDropout { dropout: Dropout { p: 0.2, seed: 9 }, site: 3 })] {
            let what = format!("bf16 attention of a bf16 qkv h{heads} d{hd}, dropout {}", dropout.is_some());
            let want = cpu.attention_dropout(&rounded, &seqs, heads, 0.3, dropout).unwrap();
            let got = bf16_be.attention_dropout(&qkv16, &seqs, heads, 0.3, dropout).unwrap();
            assert_close(&what, &back(&bf16_be, &got), want.f32s().unwrap(), BF16_TOL);
            let want = cpu.attention_grad(&d_out, &rounded, &seqs, heads, 0.3, dropout).unwrap();
            let got = bf16_be.attention_grad(&up(&bf16_be, &d_out), &qkv16, &seqs, heads, 0.3, dropout).unwrap();
            assert_close(&format!("{what}: gradient"), &back(&bf16_be, &got), want.f32s().unwrap(), BF16_TOL);
        }
    }
}

#[test]
fn positional_conv_gradients_and_spec_augment_match_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    // The last: several tiles of the weight gradient's kernel in every direction (80 outputs
    // and 80 channels a group, taps not a multiple of its 4, frames past its 32-frame chunks).
    for (c, kernel, groups, lens) in [(24, 8, 4, vec![5, 17, 1]), (24, 7, 2, vec![5, 17, 1]), (160, 13, 2, vec![70, 33])] {
        let seqs = Seqs::new(lens);
        let geom = ConvGeometry { kernel, stride: 1, pad_left: kernel / 2, groups };
        let w = t(random(c * kernel * c / groups, 20, 0.3), &[c, kernel, c / groups]);
        let (x, dy) = (t(random(seqs.total() * c, 21, 1.0), &[seqs.total(), c]), t(random(seqs.total() * c, 22, 1.0), &[seqs.total(), c]));
        conv_grads_match(&be, &x, &dy, &w, &seqs, &seqs, geom);
    }
    let seqs = Seqs::new(vec![5, 17, 1]);
    let c = 24;
    // The feature encoder's strided, unpadded convs (layer 0 reads one channel).
    for (c_in, c_out, kernel, stride, lens) in [(1, 8, 10, 5, vec![400, 123]), (12, 12, 3, 2, vec![37, 10, 3])] {
        let seqs_in = Seqs::new(lens.clone());
        let seqs_out = Seqs::new(lens.iter().map(|&n| (n - kernel) / stride + 1).collect());
        let geom = ConvGeometry { kernel, stride, pad_left: 0, groups: 1 };
        let w = t(random(c_out * kernel * c_in, 25, 0.3), &[c_out, kernel, c_in]);
        let x = t(random(seqs_in.total() * c_in, 26, 1.0), &[seqs_in.total(), c_in]);
        let dy = t(random(seqs_out.total() * c_out, 27, 1.0), &[seqs_out.total(), c_out]);
        conv_grads_match(&be, &x, &dy, &w, &seqs_in, &seqs_out, geom);
        let (gamma, beta) = (t(random(c_out, 28, 1.0), &[c_out]), t(random(c_out, 29, 1.0), &[c_out]));
        let conv = t(random(seqs_out.total() * c_out, 30, 2.0), &[seqs_out.total(), c_out]);
        let want = cpu.group_norm_time_grads(&dy, &conv, &seqs_out, NormParams { gamma: &gamma, beta: &beta, eps: 1e-5 }).unwrap();
        let (gg, gb) = (up(&be, &gamma), up(&be, &beta));
        let got =
            be.group_norm_time_grads(&up(&be, &dy), &up(&be, &conv), &seqs_out, NormParams { gamma: &gg, beta: &gb, eps: 1e-5 }).unwrap();
        for (what, g, w) in [("dx", &got.0, &want.0), ("dgamma", &got.1, &want.1), ("dbeta", &got.2, &want.2)] {
            assert_close(&format!("group norm {what} {c_out}"), &back(&be, g), w.f32s().unwrap(), REDUCTION_TOL);
        }
    }
    let x = t(random(seqs.total() * c, 23, 1.0), &[seqs.total(), c]);
    let embedding = t(random(c, 24, 1.0), &[c]);
    let frames: Vec<bool> = (0..seqs.total()).map(|i| i % 3 == 1).collect();
    let channels: Vec<bool> = (0..seqs.count() * c).map(|i| i % 5 == 2).collect();
    for (time, chan) in [(true, false), (false, true), (true, true)] {
        let tm = time.then_some(frames.as_slice());
        let cm = chan.then_some(channels.as_slice());
        let want = cpu.mask_features(x.clone(), &seqs, tm.map(|f| (f, &embedding)), cm).unwrap();
        let ge = up(&be, &embedding);
        let got = be.mask_features(up(&be, &x), &seqs, tm.map(|f| (f, &ge)), cm).unwrap();
        assert_eq!(back(&be, &got), want.to_vec().unwrap(), "SpecAugment {time} {chan}");
        let (want, want_e) = cpu.mask_features_grad(x.clone(), &seqs, tm, cm).unwrap();
        let (got, got_e) = be.mask_features_grad(up(&be, &x), &seqs, tm, cm).unwrap();
        assert_eq!(back(&be, &got), want.to_vec().unwrap(), "SpecAugment backward {time} {chan}");
        assert_eq!(got_e.is_some(), want_e.is_some());
        if let (Some(g), Some(w)) = (got_e, want_e) {
            assert_close("embedding grad", &back(&be, &g), w.f32s().unwrap(), TOL);
        }
    }
}

/// Both conv gradients of one geometry against the CPU.
fn conv_grads_match(be: &CudaBackend, x: &Tensor, dy: &Tensor, w: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) {
    let cpu = CpuBackend;
    let want = cpu.conv1d_input_grad(dy, &cpu.prepare_conv_weight(w).unwrap(), seqs_in, seqs_out, geom).unwrap();
    let got = be.conv1d_input_grad(&up(be, dy), &be.prepare_conv_weight(w).unwrap(), seqs_in, seqs_out, geom).unwrap();
    assert_close(&format!("conv dx {geom:?}"), &back(be, &got), want.f32s().unwrap(), TOL);
    let want = cpu.conv1d_weight_grad(dy, x, seqs_in, seqs_out, geom).unwrap();
    let got = be.conv1d_weight_grad(&up(be, dy), &up(be, x), seqs_in, seqs_out, geom).unwrap();
    assert_close(&format!("conv dW {geom:?}"), &back(be, &got), want.f32s().unwrap(), TOL);
}

/// A masked linear of the top-k test: out, in, its scored row blocks (first row, scores).
type MaskCase = (usize, usize, Vec<(usize, Tensor)>);

/// The masks of `linears` (all-ones weights), made in one
/// `scored_masks` call, each read back as `(W ⊙ M)ᵀ` through a linear on the identity: the mask
/// itself, in `[in, out]` order, whatever layout the backend keeps its bits in.
fn masks_of(be: &dyn TrainBackend, linears: &[MaskCase], sparsity: f64) -> Vec<Vec<f32>> {
    let weights: Vec<Tensor> =
        linears.iter().map(|(d_out, d_in, _)| be.prepare_linear_weight(&t(vec![1.0; d_out * d_in], &[*d_out, *d_in])).unwrap()).collect();
    let scores: Vec<Vec<Tensor>> =
        linears.iter().map(|(_, _, blocks)| blocks.iter().map(|(_, s)| be.upload(s).unwrap()).collect()).collect();
    let rows: Vec<Vec<ScoredRows>> = linears
        .iter()
        .zip(&scores)
        .map(|((_, _, blocks), s)| blocks.iter().zip(s).map(|((row0, _), s)| ScoredRows { row0: *row0, scores: s }).collect())
        .collect();
    let request: Vec<ScoredLinear> = weights.iter().zip(&rows).map(|(w, r)| (w, r.as_slice())).collect();
    let masks = be.scored_masks(&request, sparsity).unwrap();
    assert_eq!(masks.len(), linears.len());
    linears
        .iter()
        .zip(weights.iter().zip(&masks))
        .map(|(&(_, d_in, _), (w, mask))| {
            let eye: Vec<f32> = (0..d_in * d_in).map(|i| (i / d_in == i % d_in) as u8 as f32).collect();
            let x = be.upload(&t(eye, &[d_in, d_in])).unwrap();
            let y = be.linear_segments(&x, w, None, Activation::Identity, &[(d_in, Some(mask))]).unwrap();
            be.to_host(&y).unwrap().to_vec().unwrap()
        })
        .collect()
}

#[test]
fn score_masks_are_the_cpu_top_k_bit_for_bit() {
    let Some(be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    // Scores from a handful of values (ties everywhere, both signs, zeros), sizes spanning
    // several top-k blocks, q/k/v stacked with a row offset that is no multiple of 8 or 32; all
    // matrices in one call (the GPU's batch of segments of different lengths), and each alone.
    let linears: Vec<MaskCase> = [(3, 5), (29, 37), (120, 91)]
        .iter()
        .enumerate()
        .map(|(i, &(h, d_in))| {
            let block = |k: u64| t(random(h * d_in, 30 + 3 * i as u64 + k, 4.0).iter().map(|v| v.round() / 2.0).collect(), &[h, d_in]);
            (3 * h, d_in, vec![(0, block(0)), (2 * h, block(2))])
        })
        .collect();
    for sparsity in [0.0, 0.1, 0.5, 0.9] {
        let want = masks_of(&cpu, &linears, sparsity);
        assert_eq!(masks_of(&be, &linears, sparsity), want, "all together at {sparsity}");
        for (l, w) in linears.iter().zip(&want) {
            assert_eq!(&masks_of(&be, std::slice::from_ref(l), sparsity)[0], w, "{} x {} at {sparsity}", l.0, l.1);
        }
    }
}

/// The fused straight-through score gradients (rows of `dyᵀ·x` times `W ⊙ sign(score)`) of two
/// blocks of a stacked weight, one at a row offset that is no multiple of 8, against the CPU,
/// in fp32 and on the bf16 tensor-core path; every fifth score exactly 0.
#[test]
fn score_gradients_match_cpu() {
    let cpu = CpuBackend;
    for (i, &(n, h, d_in)) in [(1, 3, 5), (37, 29, 37), (300, 768, 768)].iter().enumerate() {
        let seed = 40 + 10 * i as u64;
        let (dy, x) = (t(random(n * 3 * h, seed, 1.0), &[n, 3 * h]), t(random(n * d_in, seed + 1, 1.0), &[n, d_in]));
        let w = t(random(3 * h * d_in, seed + 2, 0.2), &[3 * h, d_in]);
        let score = |k: u64| {
            t(random(h * d_in, seed + k, 1.0).iter().enumerate().map(|(j, &v)| if j % 5 == 0 { 0.0 } else { v }).collect(), &[h, d_in])
        };
        let scores = [(0, score(3)), (2 * h, score(4))];
        let blocks: Vec<ScoredRows> = scores.iter().map(|(row0, s)| ScoredRows { row0: *row0, scores: s }).collect();
        let want = cpu.score_grads(&dy, &x, &cpu.prepare_linear_weight(&w).unwrap(), &blocks).unwrap();
        for (precision, tol) in [(Precision::F32, TOL), (Precision::Bf16, BF16_TOL)] {
            let Some(be) = gpu(precision) else { return };
            let on_gpu: Vec<Tensor> = scores.iter().map(|(_, s)| up(&be, s)).collect();
            let blocks: Vec<ScoredRows> = scores.iter().zip(&on_gpu).map(|((row0, _), s)| ScoredRows { row0: *row0, scores: s }).collect();
            let got = be.score_grads(&up(&be, &dy), &up(&be, &x), &be.prepare_linear_weight(&w).unwrap(), &blocks).unwrap();
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.shape(), w.shape());
                assert_close(&format!("{precision:?} score gradient {n}x{h}x{d_in} block {b}"), &back(&be, g), w.f32s().unwrap(), tol);
            }
        }
    }
}

/// The FFN's dropped activation handed to its linears (`gelu_as_operand`), and the gradient at
/// its pre-activation (`gelu_grad_as_operand`): bf16 from the bf16 backend where the width keeps
/// the GEMMs' 16-byte rows (f32 otherwise, and on fp32). Everything reading them (products,
/// input, weight and score gradients, a bias's column sum) agrees with the CPU's f32.
#[test]
fn activations_handed_to_linears_match_cpu() {
    let Some(f32_be) = gpu(Precision::F32) else { return };
    let bf16_be = gpu(Precision::Bf16).unwrap();
    let cpu = CpuBackend;
    let id = Activation::Identity;
    let dropout = SiteDropout::at(Some(Dropout { p: 0.1, seed: 5 }), 3);
    // Widths 96 (bf16, masked tensor-core path), 40 (bf16; masked GEMM widens it), 36 (f32).
    for (i, (n, mid, d_out)) in [(37, 96, 48), (70, 40, 24), (9, 36, 24)].into_iter().enumerate() {
        let seed = 70 + 10 * i as u64;
        let (u, dy) = (t(random(n * mid, seed, 2.0), &[n, mid]), t(random(n * d_out, seed + 1, 1.0), &[n, d_out]));
        let (w, b) = (t(random(d_out * mid, seed + 2, 0.2), &[d_out, mid]), t(random(d_out, seed + 3, 0.5), &[d_out]));
        let scores = t(random(d_out * mid, seed + 4, 1.0), &[d_out, mid]);
        let bits = s3router::mask::pack(&random(d_out * mid, seed + 5, 1.0).iter().map(|&v| v > -0.4).collect::<Vec<_>>());
        let (cw, cm) = (cpu.prepare_linear_weight(&w).unwrap(), cpu.prepare_mask(&bits, d_out, mid).unwrap());
        let g = cpu.gelu(&u, dropout).unwrap();
        let want_y = cpu.linear(&g, &cw, Some(&b), id).unwrap();
        let want_masked = cpu.linear_segments(&g, &cw, Some(&b), id, &[(n, Some(&cm))]).unwrap();
        let want_dw = cpu.linear_weight_grad(&dy, &g).unwrap();
        let want_ds = cpu.score_grads(&dy, &g, &cw, &[ScoredRows { row0: 0, scores: &scores }]).unwrap();
        for (be, tol) in [(&f32_be, TOL), (&bf16_be, BF16_TOL)] {
            let what = |op: &str| format!("{op} of a {:?} hand-over of width {mid}", be.precision());
            let handed = be.gelu_as_operand(&up(be, &u), dropout).unwrap();
            let bf16 = be.precision() == Precision::Bf16 && mid % 8 == 0;
            assert_eq!(handed.dtype(), if bf16 { DType::BF16 } else { DType::F32 }, "{}", what("dtype"));
            let (gw, gb, gdy) = (be.prepare_linear_weight(&w).unwrap(), up(be, &b), up(be, &dy));
            let gm = be.prepare_mask(&bits, d_out, mid).unwrap();
            assert_close(&what("linear"), &back(be, &be.linear(&handed, &gw, Some(&gb), id).unwrap()), want_y.f32s().unwrap(), tol);
            let got = be.linear_segments(&handed, &gw, Some(&gb), id, &[(n, Some(&gm))]).unwrap();
            assert_close(&what("masked linear"), &back(be, &got), want_masked.f32s().unwrap(), tol);
            let got = be.linear_weight_grad(&gdy, &handed).unwrap();
            assert_close(&what("weight gradient"), &back(be, &got), want_dw.f32s().unwrap(), tol);
            let gs = up(be, &scores);
            let got = be.score_grads(&gdy, &handed, &gw, &[ScoredRows { row0: 0, scores: &gs }]).unwrap();
            assert_close(&what("score gradient"), &back(be, &got[0]), want_ds[0].f32s().unwrap(), tol);
        }
        // The gradient at the pre-activation (`gelu_grad_as_operand`), as the output gradient of
        // the linear `x_in [n, 24] -> u`: its input, weight and score gradients, its bias's sum.
        let d_in = 24;
        let (x_in, dg) = (t(random(n * d_in, seed + 6, 1.0), &[n, d_in]), t(random(n * mid, seed + 7, 1.0), &[n, mid]));
        let w_in = t(random(mid * d_in, seed + 8, 0.2), &[mid, d_in]);
        let scores_in = t(random(mid * d_in, seed + 9, 1.0), &[mid, d_in]);
        let bits_in = s3router::mask::pack(&random(mid * d_in, seed + 10, 1.0).iter().map(|&v| v > -0.4).collect::<Vec<_>>());
        let (cw_in, cm_in) = (cpu.prepare_linear_weight(&w_in).unwrap(), cpu.prepare_mask(&bits_in, mid, d_in).unwrap());
        let du = cpu.gelu_grad(&dg, &u, dropout).unwrap();
        let want_dx = cpu.linear_input_grad(&du, &cw_in, Some(&cm_in)).unwrap();
        let want_dw = cpu.linear_weight_grad(&du, &x_in).unwrap();
        let want_ds = cpu.score_grads(&du, &x_in, &cw_in, &[ScoredRows { row0: 0, scores: &scores_in }]).unwrap();
        let want_db = cpu.column_sum(&du).unwrap();
        for (be, tol) in [(&f32_be, TOL), (&bf16_be, BF16_TOL)] {
            let what = |op: &str| format!("{op} from a {:?} gradient hand-over of width {mid}", be.precision());
            let handed = be.gelu_grad_as_operand(&up(be, &dg), &up(be, &u), dropout).unwrap();
            let bf16 = be.precision() == Precision::Bf16 && mid % 8 == 0;
            assert_eq!(handed.dtype(), if bf16 { DType::BF16 } else { DType::F32 }, "{}", what("dtype"));
            let (gw, gm, gx) = (be.prepare_linear_weight(&w_in).unwrap(), be.prepare_mask(&bits_in, mid, d_in).unwrap(), up(be, &x_in));
            assert_close(
                &what("input gradient"),
                &back(be, &be.linear_input_grad(&handed, &gw, Some(&gm)).unwrap()),
                want_dx.f32s().unwrap(),
                tol,
            );
            assert_close(&what("weight gradient"), &back(be, &be.linear_weight_grad(&handed, &gx).unwrap()), want_dw.f32s().unwrap(), tol);
            let gs = up(be, &scores_in);
            let got = be.score_grads(&handed, &gx, &gw, &[ScoredRows { row0: 0, scores: &gs }]).unwrap();
            assert_close(&what("score gradient"), &back(be, &got[0]), want_ds[0].f32s().unwrap(), tol);
            let sum_tol = if bf16 { BF16_TOL } else { REDUCTION_TOL };
            assert_close(&what("bias gradient"), &back(be, &be.column_sum(&handed).unwrap()), want_db.f32s().unwrap(), sum_tol);
        }
    }
}

/// One model on one device, with what a step needs.
struct StepCase {
    model: Wav2Vec2,
    head: Linear,
}

fn step_case(dir: &std::path::Path, be: &dyn TrainBackend) -> StepCase {
    let model = Wav2Vec2::load(dir, be).unwrap();
    let c = &model.config;
    let w = t(random(c.vocab_size * c.hidden_size, 50, 0.3), &[c.vocab_size, c.hidden_size]);
    let b = t(random(c.vocab_size, 51, 0.1), &[c.vocab_size]);
    let head = Linear::prepared(be.prepare_linear_weight(&w).unwrap(), be.upload(&b).unwrap());
    StepCase { model, head }
}

/// A GPU step's loss and gradients against the CPU's, each within relative L2 `tol` (the loss
/// within a tenth of it).
fn compare(what: &str, be: &CudaBackend, got: &StepGrads, want: &StepGrads, tol: f64) {
    let loss_err = ((got.loss - want.loss) / want.loss).abs() as f64;
    assert!(loss_err <= tol / 10.0, "{what}: loss {} vs {}", got.loss, want.loss);
    for (k, (g, w)) in got.scores.iter().zip(&want.scores).enumerate() {
        assert_eq!(g.is_some(), w.is_some(), "{what}: score gradient {k} present on one side only");
        if let (Some(g), Some(w)) = (g, w) {
            assert_close(&format!("{what}: scores {k}"), &back(be, g), w.f32s().unwrap(), tol);
        }
    }
    assert_close(&format!("{what}: head weight"), &got.head_weight, &want.head_weight, tol);
    assert_close(&format!("{what}: head bias"), &got.head_bias, &want.head_bias, tol);
    assert_close(&format!("{what}: embedding"), got.embedding.as_ref().unwrap(), want.embedding.as_ref().unwrap(), tol);
    assert_eq!(got.weights.keys().collect::<Vec<_>>(), want.weights.keys().collect::<Vec<_>>(), "{what}: weight gradients");
    for (name, w) in &want.weights {
        let (got_w, what) = (back(be, &got.weights[name]), format!("{what}: {name}"));
        match name.strip_suffix("k_proj.bias") {
            // Noise at a tenth of the comparison's tolerance: 1e-5 in fp32, bf16 rounding in bf16.
            Some(layer) => assert_key_bias_negligible(
                &what,
                &got_w,
                w.f32s().unwrap(),
                l2(want.weights[&format!("{layer}q_proj.bias")].f32s().unwrap()),
                tol / 10.0,
            ),
            None => assert_close(&what, &got_w, w.f32s().unwrap(), tol),
        }
    }
}

#[test]
fn training_steps_match_cpu_with_every_regulariser() {
    let Some(f32_be) = gpu(Precision::F32) else { return };
    let bf16_be = gpu(Precision::Bf16).unwrap();
    for (model, gpu_be, tol) in [
        ("base-like", &f32_be, REDUCTION_TOL),
        ("large-like", &f32_be, REDUCTION_TOL),
        ("data2vec-like", &f32_be, REDUCTION_TOL),
        ("mms-like", &f32_be, REDUCTION_TOL),
        ("base-like", &bf16_be, BF16_STEP_TOL),
    ] {
        let dir = fixtures().join(model);
        let (cpu, dev) = (step_case(&dir, &CpuBackend), step_case(&dir, gpu_be));
        let c = &cpu.model.config;
        let pre = Preprocessor::load(&dir).unwrap();
        let audio: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
        let inputs: Vec<&[f32]> = audio.iter().map(Vec::as_slice).collect();
        let frames = cpu.model.frame_counts(&audio.iter().map(Vec::len).collect::<Vec<_>>()).unwrap();
        let total: usize = frames.iter().sum();
        let targets = CtcTargets {
            labels: frames
                .iter()
                .enumerate()
                .map(|(u, &n)| (0..(n / 4).min(6)).map(|j| 1 + ((u + j) % (c.vocab_size - 1)) as u32).collect())
                .collect(),
            blank: 0,
            zero_infinity: true,
        };
        let ck = Checkpoint::open_dir(&dir).unwrap();
        let mut rng = SplitMix(3);
        let masks: Vec<MaskedWeight> = (0..c.num_hidden_layers)
            .flat_map(|i| MaskScope::All.parts().iter().map(move |&p| (i, p)))
            .map(|(i, p)| MaskedWeight::load(&ck, c, i, p, |w, fan_in| init_scores(w, fan_in, Init::WeightRank, 0.3, &mut rng)).unwrap())
            .collect();
        let time: Vec<bool> = (0..total).map(|i| i % 7 < 2).collect();
        let channels: Vec<bool> = (0..frames.len() * c.hidden_size).map(|i| i % 11 == 3).collect();
        let embedding = random(c.hidden_size, 60, 1.0);
        let skip: Vec<bool> = (0..c.num_hidden_layers).map(|i| i == 1).collect();
        let d = Some(Dropout { p: 0.1, seed: 61 });
        let reg = Regularisers {
            time_mask: Some(TimeMask { frames: &time, embedding: &embedding }),
            channel_mask: Some(&channels),
            dropout: d,
            attention_dropout: d,
            activation_dropout: d,
            skip_layers: &skip,
        };
        let runs = [
            ("masks", masks.as_slice(), Weights::Frozen),
            ("finetune", &[][..], Weights::AboveEncoder),
            ("finetune with the feature encoder", &[][..], Weights::All),
        ];
        for (what, masks, trained) in runs {
            let run = |be: &dyn TrainBackend, case: &StepCase| {
                step(be, &case.model, masks, 0.3, &case.head, Features::Audio(&inputs), &targets, Reduction::Sum, &reg, trained).unwrap()
            };
            compare(&format!("{model} {what} {:?}", gpu_be.precision()), gpu_be, &run(gpu_be, &dev), &run(&CpuBackend, &cpu), tol);
        }
    }
}

/// The layout and weight-norm ops weight finetuning rebuilds its model with every update, on
/// host and device inputs: pure copies bit for bit, weight norm (f64 sums) to fp32 accuracy.
#[test]
fn weight_layout_ops_match_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let bf16 = gpu(Precision::Bf16).unwrap();
    let cpu = CpuBackend;
    for (i, shape) in [[1, 1, 1], [3, 5, 7], [2, 33, 17], [4, 1, 9]].iter().enumerate() {
        let x = t(random(shape.iter().product(), 700 + i as u64, 1.0), shape);
        let want = cpu.swap_last_two(&x).unwrap();
        for input in [x.clone(), up(&be, &x)] {
            let got = be.swap_last_two(&input).unwrap();
            assert_eq!((got.shape(), back(&be, &got)), (want.shape(), want.to_vec().unwrap()), "swap_last_two {shape:?}");
        }
    }
    for (i, &(out, cin, kernel)) in [(1, 1, 1), (12, 8, 9), (33, 5, 128)].iter().enumerate() {
        let v = t(random(out * cin * kernel, 710 + i as u64, 1.0), &[out, cin, kernel]);
        let g = t(random(kernel, 720 + i as u64, 2.0), &[1, 1, kernel]);
        let dw = t(random(out * cin * kernel, 730 + i as u64, 1.0), &[out, cin, kernel]);
        let what = format!("weight norm {out}x{cin}x{kernel}");
        let want = cpu.weight_norm(&g, &v).unwrap();
        assert_close(&what, &back(&be, &be.weight_norm(&up(&be, &g), &up(&be, &v)).unwrap()), want.f32s().unwrap(), TOL);
        let (dg, dv) = cpu.weight_norm_grads(&dw, &g, &v).unwrap();
        let (gdg, gdv) = be.weight_norm_grads(&up(&be, &dw), &up(&be, &g), &up(&be, &v)).unwrap();
        assert_close(&format!("{what}: dg"), &back(&be, &gdg), dg.f32s().unwrap(), TOL);
        assert_close(&format!("{what}: dv"), &back(&be, &gdv), dv.f32s().unwrap(), TOL);
    }
    let parts = [t(random(6, 740, 1.0), &[2, 3]), t(random(15, 741, 1.0), &[5, 3]), t(random(3, 742, 1.0), &[1, 3])];
    let want = cpu.concat_rows(&parts.iter().collect::<Vec<_>>()).unwrap();
    let mixed = [parts[0].clone(), up(&be, &parts[1]), parts[2].clone()];
    let got = be.concat_rows(&mixed.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!((got.shape(), back(&be, &got)), (want.shape(), want.to_vec().unwrap()), "concat_rows");
    let x = t(random(36, 743, 1.0), &[9, 4]);
    let got = be.rows(&up(&be, &x), 2, 5).unwrap();
    assert_eq!((got.shape(), back(&be, &got)), (&[5, 4][..], x.to_vec().unwrap()[8..28].to_vec()), "rows");
    let (a, b) = (t(random(37, 744, 1.0), &[37]), t(random(37, 745, 1.0), &[37]));
    let got = be.mul(up(&be, &a), &up(&be, &b)).unwrap();
    assert_eq!(back(&be, &got), cpu.mul(a.clone(), &b).unwrap().to_vec().unwrap(), "mul");
    // A weight already on the device prepares to what the host path makes of it.
    let w = t(random(35, 746, 1.0), &[5, 7]);
    for b in [&be, &bf16] {
        let (host, device) = (b.prepare_linear_weight(&w).unwrap(), b.prepare_linear_weight(&up(b, &w)).unwrap());
        assert_eq!(host.dtype(), device.dtype());
        assert_eq!(back(b, &device), back(b, &host), "prepare_linear_weight of a device tensor ({:?})", b.precision());
    }
}

/// The model finetuning rebuilds every update, from trained tensors that live on the GPU (the
/// feature encoder's too), gives the logits of the model loaded from the checkpoint.
#[test]
fn a_model_rebuilt_from_device_tensors_matches_the_loaded_one() {
    let Some(f32_be) = gpu(Precision::F32) else { return };
    let bf16_be = gpu(Precision::Bf16).unwrap();
    for name in ["base-like", "large-like"] {
        let dir = fixtures().join(name);
        let ck = Checkpoint::open_dir(&dir).unwrap();
        let config = s3router::model::config::Config::load(&dir.join("config.json")).unwrap();
        let pre = Preprocessor::load(&dir).unwrap();
        let clips: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
        let inputs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
        for be in [&f32_be, &bf16_be] {
            let trained = s3router::train::finetune::trainable(&ck, true, be).unwrap();
            let overlay = s3router::train::finetune::Overlay::new(&ck, trained.iter().map(|w| (w.name.as_str(), w.data.clone())));
            let rebuilt = Wav2Vec2::from_weights(config.clone(), &overlay, be).unwrap();
            let loaded = Wav2Vec2::load(&dir, be).unwrap();
            let logits = |m: &Wav2Vec2| back(be, &m.logits(be, &inputs, None).unwrap().0);
            assert_close(&format!("{name} {:?}: rebuilt vs loaded logits", be.precision()), &logits(&rebuilt), &logits(&loaded), 1e-6);
        }
    }
}

/// The same short training run (3 updates on 4 English utterances, regularisers off, one
/// validation) on the CPU and on the GPU in fp32, into `tmp/cpu` and `tmp/cuda`.
fn run_on_both(tmp: &std::path::Path, extra: &[&str], learn: s3router::train::run::Learn) -> [std::path::PathBuf; 2] {
    use clap::{Args, FromArgMatches};
    use s3router::train::run::{train, Device, Recipe, RunOptions};
    let train_tsv = common::cli::small_manifest(tmp, 4);
    let (source, valid) = (fixtures().join("base-like"), fixtures().join("corpus/en/dev.tsv"));
    let paths = [source.to_str().unwrap(), train_tsv.to_str().unwrap(), valid.to_str().unwrap()];
    let words: Vec<&str> = ["--model", paths[0], "--train", paths[1], "--valid", paths[2], "--steps", "3", "--lr", "1e-3"]
        .into_iter()
        .chain(common::cli::PLAIN.iter().copied().filter(|&w| w != "--quiet")) // --quiet is the CLI's, not the recipe's
        .chain(["--skip-unknown"])
        .chain(extra.iter().copied())
        .collect();
    let m = Recipe::augment_args(clap::Command::new("t").no_binary_name(true)).try_get_matches_from(words).unwrap();
    let mut recipe = Recipe::from_arg_matches(&m).unwrap();
    recipe.learn = learn;
    [(Device::Cpu, "cpu"), (Device::Cuda(Precision::F32), "cuda")].map(|(device, dir)| {
        let out = tmp.join(dir);
        let opts = RunOptions {
            out: out.clone(),
            resume: false,
            overwrite: true,
            save_every: 0,
            progress: false,
            feature_cache_bytes: 1 << 30,
            device,
        };
        train(&recipe, &opts).unwrap();
        out
    })
}

/// The Adam first moments a run's final checkpoint holds, by name: decayed sums of every
/// gradient of the run, so two runs that compute the same gradients hold the same moments, even
/// where Adam's normalised steps (±lr at the first update, whatever the gradient's size) turn
/// rounding noise in a near-zero gradient into a visible difference in the trained tensor.
fn first_moments(out: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let ck = Checkpoint::open(&[out.join("checkpoint.safetensors")]).unwrap();
    let mut names: Vec<String> = ck.names().filter(|n| n.contains(".m.")).map(str::to_string).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), ck.tensor(&n).unwrap().to_vec().unwrap())).collect()
}

/// The losses a run logged (one per update, then the validation's).
fn logged_losses(out: &std::path::Path) -> Vec<f64> {
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter_map(|v| v["loss"].as_f64()).collect()
}

/// `engine train --device cuda` end to end (features cached in GPU memory, scores and their Adam
/// on the GPU, validation there): the losses of every update and of the validation are the CPU
/// run's, and so are the learned scores and the optimiser's first moments.
#[test]
fn a_mask_learning_run_on_the_gpu_follows_the_cpu_run() {
    if gpu(Precision::F32).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let [cpu, cuda] = run_on_both(tmp.path(), &["--sparsity", "0.1"], s3router::train::run::Learn::Masks);
    let (a, b) = (logged_losses(&cuda), logged_losses(&cpu));
    assert_eq!(a.len(), 4, "3 updates and a validation logged");
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(((x - y) / y).abs() <= 1e-4, "loss {k}: GPU {x} vs CPU {y}");
    }
    let scores = |dir: &std::path::Path| {
        let ck = Checkpoint::open(&[dir.join("scores.safetensors")]).unwrap();
        let mut names: Vec<String> = ck.names().map(str::to_string).collect();
        names.sort();
        names.iter().flat_map(|n| ck.tensor(n).unwrap().to_vec().unwrap()).collect::<Vec<f32>>()
    };
    assert_close("learned scores", &scores(&cuda), &scores(&cpu), 1e-4);
    for ((name, got), (_, want)) in first_moments(&cuda).iter().zip(&first_moments(&cpu)) {
        assert_close(&format!("Adam first moment {name}"), got, want, 1e-4);
    }
}

/// `engine finetune --device cuda` (weights and their Adam on the GPU, the model rebuilt there
/// every update) moves every trained tensor as the CPU run does, and logs the same losses.
/// Compared as the change from the source weights; the key biases, whose gradient is zero up
/// to rounding (the softmax ignores them), move by rounding noise that Adam normalises, and are
/// left out.
#[test]
fn a_finetuning_run_on_the_gpu_follows_the_cpu_run() {
    use s3router::train::run::Learn;
    if gpu(Precision::F32).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let learn = Learn::Weights { freeze_updates: 0, train_feature_encoder: false, prune: None };
    let [cpu_dir, cuda_dir] = run_on_both(tmp.path(), &[], learn);
    for (k, (x, y)) in logged_losses(&cuda_dir).iter().zip(&logged_losses(&cpu_dir)).enumerate() {
        assert!(((x - y) / y).abs() <= 1e-4, "loss {k}: GPU {x} vs CPU {y}");
    }
    let (cpu, cuda) = (Checkpoint::open_dir(&cpu_dir).unwrap(), Checkpoint::open_dir(&cuda_dir).unwrap());
    let src = Checkpoint::open_dir(&fixtures().join("base-like")).unwrap();
    let mut compared = 0;
    for name in src.names().filter(|n| n.starts_with("wav2vec2.encoder.") && !n.ends_with("k_proj.bias")) {
        let s = src.tensor(name).unwrap().to_vec().unwrap();
        let delta = |ck: &Checkpoint| ck.tensor(name).unwrap().to_vec().unwrap().iter().zip(&s).map(|(a, b)| a - b).collect::<Vec<f32>>();
        assert_close(&format!("finetuned {name}: change from the source"), &delta(&cuda), &delta(&cpu), 1e-3);
        compared += 1;
    }
    assert!(compared > 20, "only {compared} tensors compared");
}
