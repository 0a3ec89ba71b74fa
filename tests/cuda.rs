//! The CUDA backend against the CPU backend, op by op on random inputs of awkward sizes (outputs
//! poisoned with NaN first), and the whole model against transformers' fixtures.
//!
//! Without a GPU each test prints a skip line and passes; with `S3R_REQUIRE_GPU=1` it fails.

mod common;

use common::{
    argmax_disagreements, assert_close, ctc_cases, f32_backends, fixtures, gpu, inputs, random, reference, rel_l2, sparse_and_dense_logits,
    two_tasks, utterances,
};
use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{CudaBackend, Precision, TF32X3_KERNELS};
use s3router::backend::{Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs};
use s3router::ctc::{ctc_loss, greedy_ids, CtcTargets, Reduction};
use s3router::infer::BatchLimits;
use s3router::model::Wav2Vec2;
use s3router::multitask::MultiRecognizer;
use s3router::tensor::{DType, Tensor};

const F32_TOL: f64 = 1e-5;

/// The bf16 backend twice: with the mma.sync GEMM (default) and with the WMMA GEMM only.
fn bf16_backends() -> Vec<CudaBackend> {
    let Some(fast) = gpu(Precision::Bf16) else { return vec![] };
    let mut wmma = gpu(Precision::Bf16).unwrap();
    wmma.set_mma_sync(false);
    vec![fast, wmma]
}

fn host(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape)
}

fn back(be: &CudaBackend, t: &Tensor) -> Vec<f32> {
    be.to_host(t).unwrap().to_vec().unwrap()
}

#[test]
fn linear_matches_cpu_for_awkward_shapes() {
    let backends = f32_backends();
    let cpu = CpuBackend;
    // K = 19, 65: the FMA kernel only; K = 16, 64, 768, 3072: 3xTF32 where it is on.
    let shapes = [(1, 1, 1), (37, 19, 23), (129, 65, 67), (1, 16, 8), (129, 64, 130), (300, 768, 3072), (5, 3072, 768)];
    for (v, be) in backends.iter().enumerate() {
        for (i, &(n, d_in, d_out)) in shapes.iter().enumerate() {
            let x = host(random(n * d_in, i as u64, 1.0), &[n, d_in]);
            let w = host(random(d_out * d_in, 100 + i as u64, 0.1), &[d_out, d_in]);
            let b = host(random(d_out, 200 + i as u64, 0.5), &[d_out]);
            for act in [Activation::Identity, Activation::Gelu] {
                let want = cpu.linear(&x, &cpu.prepare_linear_weight(&w).unwrap(), Some(&b), act).unwrap();
                let (gx, gw, gb) = (be.upload(&x).unwrap(), be.prepare_linear_weight(&w).unwrap(), be.upload(&b).unwrap());
                let got = be.linear(&gx, &gw, Some(&gb), act).unwrap();
                assert_close(&format!("linear {n}x{d_in}x{d_out} {act:?} backend {v}"), &back(be, &got), want.f32s().unwrap(), F32_TOL);
            }
        }
    }
}

#[test]
fn masked_linear_equals_linear_on_masked_weights() {
    let f32s = f32_backends();
    if f32s.is_empty() {
        return;
    }
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    // K = 131: general kernels only; K = 96: the mma.sync kernel's masked path.
    for (n, d_in, d_out) in [(77, 131, 61), (77, 96, 61), (300, 768, 3072)] {
        let x = host(random(n * d_in, 1, 1.0), &[n, d_in]);
        let w = random(d_out * d_in, 2, 0.2);
        let keep: Vec<bool> = random(d_out * d_in, 3, 1.0).iter().map(|&v| v > -0.4).collect();
        let masked: Vec<f32> = w.iter().zip(&keep).map(|(w, &k)| if k { *w } else { 0.0 }).collect();
        let want = cpu.linear(&x, &cpu.prepare_linear_weight(&host(masked, &[d_out, d_in])).unwrap(), None, Activation::Gelu).unwrap();
        let bits = s3router::mask::pack(&keep);
        for (i, be) in f32s.iter().chain(&bf16).enumerate() {
            let tol = if i < f32s.len() { F32_TOL } else { 1e-2 };
            let gw = be.prepare_linear_weight(&host(w.clone(), &[d_out, d_in])).unwrap();
            let got = be.linear_masked(&be.upload(&x).unwrap(), &gw, &be.upload_mask(&bits).unwrap(), None, Activation::Gelu).unwrap();
            assert_close(&format!("masked linear {n}x{d_in}x{d_out} backend {i}"), &back(be, &got), want.f32s().unwrap(), tol);
        }
    }
}

/// Row segments under different masks (and one unmasked) in one call, as many-mask serving runs
/// them, against the CPU backend's segments (which mask into scratch).
#[test]
fn segmented_masked_linear_matches_cpu() {
    let f32s = f32_backends();
    if f32s.is_empty() {
        return;
    }
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    for (d_in, d_out) in [(131, 61), (768, 3072)] {
        let rows = [5usize, 1, 64, 17];
        let n: usize = rows.iter().sum();
        let x = host(random(n * d_in, 4, 1.0), &[n, d_in]);
        let (w, b) = (host(random(d_out * d_in, 5, 0.2), &[d_out, d_in]), host(random(d_out, 6, 0.5), &[d_out]));
        let bits: Vec<Vec<u8>> =
            (0..2).map(|m| s3router::mask::pack(&random(d_out * d_in, 7 + m, 1.0).iter().map(|&v| v > -0.3).collect::<Vec<_>>())).collect();
        let cpu_masks: Vec<_> = bits.iter().map(|b| cpu.prepare_mask(b, d_out, d_in).unwrap()).collect();
        let want = cpu
            .linear_segments(&x, &cpu.prepare_linear_weight(&w).unwrap(), Some(&b), Activation::Gelu, &segments(&rows, &cpu_masks))
            .unwrap();
        for (i, be) in f32s.iter().chain(&bf16).enumerate() {
            let tol = if i < f32s.len() { F32_TOL } else { 1e-2 };
            let masks: Vec<_> = bits.iter().map(|bb| be.prepare_mask(bb, d_out, d_in).unwrap()).collect();
            let gw = be.prepare_linear_weight(&w).unwrap();
            let got = be
                .linear_segments(&be.upload(&x).unwrap(), &gw, Some(&be.upload(&b).unwrap()), Activation::Gelu, &segments(&rows, &masks))
                .unwrap();
            assert_close(&format!("segments {d_in}x{d_out} backend {i}"), &back(be, &got), want.f32s().unwrap(), tol);
        }
    }
}

/// Segments of `rows` under masks 0, none, 1 and 0 again.
fn segments<'a>(rows: &[usize], m: &'a [LinearMask]) -> Vec<(usize, Option<&'a LinearMask>)> {
    vec![(rows[0], Some(&m[0])), (rows[1], None), (rows[2], Some(&m[1])), (rows[3], Some(&m[0]))]
}

#[test]
fn mask_pack_and_unpack_match_the_cpu_format() {
    let Some(be) = gpu(Precision::F32) else { return };
    for n in [1usize, 8, 13, 1000] {
        let keep: Vec<bool> = random(n, n as u64, 1.0).iter().map(|&v| v > 0.0).collect();
        let dense = host(keep.iter().map(|&k| k as u8 as f32).collect(), &[n]);
        let bits = be.pack_mask(&be.upload(&dense).unwrap()).unwrap();
        let got = be.unpack_mask(&bits, &[n]).unwrap();
        assert_eq!(back(&be, &got), dense.to_vec().unwrap(), "unpack(pack) n={n}");
        let host_bits = s3router::mask::pack(&keep);
        let roundtrip = be.unpack_mask(&be.upload_mask(&host_bits).unwrap(), &[n]).unwrap();
        assert_eq!(back(&be, &roundtrip), dense.to_vec().unwrap(), "GPU unpack of CPU bits n={n}");
    }
}

#[test]
fn bf16_linear_is_close() {
    let cpu = CpuBackend;
    for (v, be) in bf16_backends().iter().enumerate() {
        for (i, &(n, d_in, d_out)) in [(1, 16, 8), (300, 768, 3072), (129, 67, 130), (129, 64, 130), (1500, 3072, 768)].iter().enumerate() {
            let x = host(random(n * d_in, 10 + i as u64, 1.0), &[n, d_in]);
            let w = host(random(d_out * d_in, 20 + i as u64, 0.1), &[d_out, d_in]);
            let b = host(random(d_out, 30 + i as u64, 0.5), &[d_out]);
            let want = cpu.linear(&x, &cpu.prepare_linear_weight(&w).unwrap(), Some(&b), Activation::Gelu).unwrap();
            let got = be
                .linear(&be.upload(&x).unwrap(), &be.prepare_linear_weight(&w).unwrap(), Some(&be.upload(&b).unwrap()), Activation::Gelu)
                .unwrap();
            assert_close(&format!("bf16 linear {n}x{d_in}x{d_out} variant {v}"), &back(be, &got), want.f32s().unwrap(), 1e-2);
        }
    }
}

/// Split-K (GEMMs whose output tiles leave SMs idle: batch-1 streaming, narrow weight
/// gradients) against the same GEMMs run whole and the CPU, on every fp32 and bf16 backend: a
/// masked linear of 49 rows (1 s of speech) over K = 1536 (tensor cores), one of 3 rows over
/// K = 1000 (the FMA and WMMA kernels, a ragged last chunk), both with bias and GELU; the bf16
/// operand a linear hands to the next (the epilogue's bf16 output); a strided convolution of one
/// short utterance (implicit GEMM, K = 3 taps x 256 channels).
#[test]
fn split_k_matches_whole_k() {
    let cpu = CpuBackend;
    let f32s = f32_backends();
    let n_f32 = f32s.len();
    let gelu = Activation::Gelu;
    for (v, mut be) in f32s.into_iter().chain(bf16_backends()).enumerate() {
        let tol = if v < n_f32 { F32_TOL } else { 1e-2 };
        for (i, &(n, d_in, d_out)) in [(49, 1536, 768), (3, 1000, 200)].iter().enumerate() {
            let x = host(random(n * d_in, 300 + i as u64, 1.0), &[n, d_in]);
            let w = random(d_out * d_in, 310 + i as u64, 0.1);
            let b = host(random(d_out, 320 + i as u64, 0.5), &[d_out]);
            let keep: Vec<bool> = random(d_out * d_in, 330 + i as u64, 1.0).iter().map(|&v| v > -0.4).collect();
            let kept: Vec<f32> = w.iter().zip(&keep).map(|(&w, &k)| if k { w } else { 0.0 }).collect();
            let cw = cpu.prepare_linear_weight(&host(kept, &[d_out, d_in])).unwrap();
            let want = cpu.linear(&x, &cw, Some(&b), gelu).unwrap();
            // The next linear, d_out -> d_out, reading the first one's output.
            let w2 = host(random(d_out * d_out, 325 + i as u64, 0.1), &[d_out, d_out]);
            let want_chain = cpu.linear(&want, &cpu.prepare_linear_weight(&w2).unwrap(), None, Activation::Identity).unwrap();
            let (gx, gb) = (be.upload(&x).unwrap(), be.upload(&b).unwrap());
            let gw = be.prepare_linear_weight(&host(w.clone(), &[d_out, d_in])).unwrap();
            let gw2 = be.prepare_linear_weight(&w2).unwrap();
            let bits = be.upload_mask(&s3router::mask::pack(&keep)).unwrap();
            let mask = be.prepare_mask(&s3router::mask::pack(&keep), d_out, d_in).unwrap();
            for split in [true, false] {
                be.set_split_k(split);
                let what = format!("{n}x{d_in}x{d_out} backend {v} split-K {split}");
                let got = be.linear_masked(&gx, &gw, &bits, Some(&gb), gelu).unwrap();
                assert_close(&format!("linear {what}"), &back(&be, &got), want.f32s().unwrap(), tol);
                let handed = be.linear_as_operand(&gx, &gw, Some(&gb), gelu, &[(n, Some(&mask))]).unwrap();
                let chained = be.linear(&handed, &gw2, None, Activation::Identity).unwrap();
                assert_close(
                    &format!("linear handed on {what} ({:?})", handed.dtype()),
                    &back(&be, &chained),
                    want_chain.f32s().unwrap(),
                    tol,
                );
            }
        }
        let geom = ConvGeometry { kernel: 3, stride: 2, pad_left: 0, groups: 1 };
        let (seqs_in, seqs_out) = (Seqs::new(vec![41]), Seqs::new(vec![20]));
        let x = host(random(41 * 256, 340, 1.0), &[41, 256]);
        let w = host(random(96 * 3 * 256, 341, 0.1), &[96, 3, 256]);
        let want = cpu.conv1d(&x, &seqs_in, &seqs_out, &w, None, geom, gelu).unwrap();
        let (gx, gw) = (be.upload(&x).unwrap(), be.prepare_conv_weight(&w).unwrap());
        for split in [true, false] {
            be.set_split_k(split);
            let got = be.conv1d(&gx, &seqs_in, &seqs_out, &gw, None, geom, gelu).unwrap();
            assert_close(&format!("conv backend {v} split-K {split}"), &back(&be, &got), want.f32s().unwrap(), tol);
        }
    }
}

/// Runs `run` with the bf16 tensor-core GEMM forced into each tile shape this GPU has, in turn:
/// each result within bf16 rounding of `want`, and within each family (mma.sync; wgmma on
/// Hopper) all of them the same bits (they add the same products in the same K order, so
/// anything else is a tile-edge or pipeline bug). Whether the two families agree bit for bit is
/// the card's to say; it is printed. Returns each family's bits (wgmma's when it ran).
fn same_bits_in_every_tile(
    be: &mut CudaBackend,
    what: &str,
    want: &[f32],
    run: impl Fn(&CudaBackend) -> Vec<f32>,
) -> [Option<Vec<u32>>; 2] {
    let tiles = s3router::backend::cuda::BF16_MMA_KERNELS;
    let mut first: [Option<(usize, Vec<u32>)>; 2] = [None, None];
    let available: Vec<usize> = (0..tiles.len()).filter(|&t| be.mma_tile_available(t)).collect();
    for (t, tile) in available.into_iter().map(|t| (t, &tiles[t])) {
        be.set_mma_tile(Some(t)).unwrap();
        let got = run(be);
        assert_close(&format!("{} {what}", tile.name), &got, want, 1e-2);
        let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        match &first[usize::from(tile.is_wgmma())] {
            None => first[usize::from(tile.is_wgmma())] = Some((t, bits)),
            Some((f, family)) => assert!(family == &bits, "{} {what}: bits differ from {}", tile.name, tiles[*f].name),
        }
    }
    be.set_mma_tile(None).unwrap();
    if let [Some((_, mma)), Some((_, wgmma))] = &first {
        let same = mma.iter().zip(wgmma).filter(|(a, b)| a == b).count();
        eprintln!("{what}: wgmma and mma.sync give the same bits on {same} of {} outputs", mma.len());
    }
    first.map(|f| f.map(|(_, bits)| bits))
}

/// An implicit-GEMM convolution of the tile tests, on the host.
struct TileConv {
    geom: ConvGeometry,
    seqs_in: Seqs,
    seqs_out: Seqs,
    x: Tensor,
    w: Tensor,
}

/// The tile tests' convolutions, as the conv test's tensor-core cases: strided (136 outputs:
/// a ragged N), then grouped and padded (an utterance of one frame); inputs drawn from `seed`.
fn tile_convs(seed: u64) -> Vec<TileConv> {
    // (c_in, c_out, kernel, stride, pad, groups, input lengths)
    [(64, 136, 3, 2, 0, 1, vec![9, 300]), (64, 64, 8, 1, 4, 4, vec![1, 270])]
        .into_iter()
        .enumerate()
        .map(|(i, (c_in, c_out, kernel, stride, pad, groups, lens))| {
            let geom = ConvGeometry { kernel, stride, pad_left: pad, groups };
            let seqs_in = Seqs::new(lens.clone());
            let seqs_out = Seqs::new(if pad == 0 { lens.iter().map(|&n| (n - kernel) / stride + 1).collect() } else { lens });
            let x = host(random(seqs_in.total() * c_in, seed + i as u64, 1.0), &[seqs_in.total(), c_in]);
            let w = host(random(c_out * kernel * (c_in / groups), seed + 10 + i as u64, 0.3), &[c_out, kernel, c_in / groups]);
            TileConv { geom, seqs_in, seqs_out, x, w }
        })
        .collect()
}

/// Every tile shape of the bf16 tensor-core GEMM (mma.sync; wgmma where the GPU has it, as under
/// tools/cuemu) against the CPU and each other: linears, masked and
/// not, with ragged edges in M, N and K (K a multiple of 8 but not of 64; masks need K % 32 ==
/// 0), and implicit-GEMM convolutions (strided; grouped and padded). Then the timed choice on a
/// GEMM big enough to be tuned: the same bits again, and a choice recorded for its shape only.
#[test]
fn mma_tile_shapes_agree_bit_for_bit() {
    let Some(mut be) = gpu(Precision::Bf16) else { return };
    let cpu = CpuBackend;
    for (i, &(n, d_in, d_out, masked)) in [(261, 200, 259, false), (77, 96, 300, true), (300, 768, 3072, true)].iter().enumerate() {
        let x = host(random(n * d_in, 40 + i as u64, 1.0), &[n, d_in]);
        let w = random(d_out * d_in, 50 + i as u64, 0.1);
        let b = host(random(d_out, 60 + i as u64, 0.5), &[d_out]);
        let keep: Vec<bool> = random(d_out * d_in, 70 + i as u64, 1.0).iter().map(|&v| !masked || v > -0.4).collect();
        let kept: Vec<f32> = w.iter().zip(&keep).map(|(&w, &k)| if k { w } else { 0.0 }).collect();
        let want = cpu.linear(&x, &cpu.prepare_linear_weight(&host(kept, &[d_out, d_in])).unwrap(), Some(&b), Activation::Gelu).unwrap();
        let (gx, gb) = (be.upload(&x).unwrap(), be.upload(&b).unwrap());
        let gw = be.prepare_linear_weight(&host(w, &[d_out, d_in])).unwrap();
        let bits = be.upload_mask(&s3router::mask::pack(&keep)).unwrap();
        let run = |be: &CudaBackend| {
            let y = if masked {
                be.linear_masked(&gx, &gw, &bits, Some(&gb), Activation::Gelu).unwrap()
            } else {
                be.linear(&gx, &gw, Some(&gb), Activation::Gelu).unwrap()
            };
            back(be, &y)
        };
        let what = format!("linear {n}x{d_in}x{d_out} masked {masked}");
        let forced = same_bits_in_every_tile(&mut be, &what, want.f32s().unwrap(), run);
        let tuned: Vec<u32> = run(&be).iter().map(|v| v.to_bits()).collect();
        assert!(forced.contains(&Some(tuned)), "{what}: the timed choice gives other bits than its family's");
        // The mma.sync shapes alone among the timed candidates (S3R_WGMMA=0; on Hopper the
        // wgmma ones are timed too by default): again the chosen kernel's bits, whichever
        // family was timed last.
        let mut without_wgmma = gpu(Precision::Bf16).unwrap();
        without_wgmma.set_wgmma_tuning(false).unwrap();
        let tuned: Vec<u32> = run(&without_wgmma).iter().map(|v| v.to_bits()).collect();
        assert!(forced.contains(&Some(tuned)), "{what}: the timed choice without wgmma gives other bits than its family's");
    }
    let choices = be.mma_tile_choices();
    assert!(
        choices.iter().any(|&(m, n, k, _)| m >= 300 && n == 3072 && k == 768),
        "the 300x768x3072 GEMM (1.4 GFLOP) should have been timed: {choices:?}"
    );
    assert!(!choices.iter().any(|&(_, n, _, _)| n == 259 || n == 300), "small GEMMs are not worth timing: {choices:?}");
    for TileConv { geom, seqs_in, seqs_out, x, w } in tile_convs(80) {
        let want = cpu.conv1d(&x, &seqs_in, &seqs_out, &w, None, geom, Activation::Gelu).unwrap();
        let (gx, gw) = (be.upload(&x).unwrap(), be.prepare_conv_weight(&w).unwrap());
        let run = |be: &CudaBackend| back(be, &be.conv1d(&gx, &seqs_in, &seqs_out, &gw, None, geom, Activation::Gelu).unwrap());
        same_bits_in_every_tile(&mut be, &format!("conv {geom:?}"), want.f32s().unwrap(), run);
    }
}

/// Every 3xTF32 GEMM kernel forced in turn (the mma.sync tiles, and wgmma where the GPU has it,
/// as under tools/cuemu) on linears with ragged edges in M, N and K, masked and not, and on
/// implicit-GEMM convolutions (strided; grouped and padded): each within fp32 accuracy of the
/// CPU, and the mma.sync tiles bit for bit the same (same products, same K order: anything
/// else is a tile-edge or pipeline bug).
#[test]
fn tf32x3_kernels_agree() {
    let Some(mut be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    fn check(be: &mut CudaBackend, what: &str, want: &[f32], run: &dyn Fn(&CudaBackend) -> Vec<f32>) {
        let mut mma_bits: Option<(usize, Vec<u32>)> = None;
        for (i, kernel) in TF32X3_KERNELS.iter().enumerate() {
            if be.set_tf32x3_kernel(Some(i)).is_err() {
                continue; // wgmma without Hopper
            }
            let got = run(be);
            assert_close(&format!("{} {what}", kernel.name), &got, want, F32_TOL);
            if kernel.is_wgmma() {
                continue;
            }
            let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            match &mma_bits {
                None => mma_bits = Some((i, bits)),
                Some((f, first)) => assert!(first == &bits, "{} {what}: bits differ from {}", kernel.name, TF32X3_KERNELS[*f].name),
            }
        }
        be.set_tf32x3_kernel(None).unwrap();
    }
    for (i, &(n, d_in, d_out, masked)) in [(261, 200, 259, false), (77, 96, 300, true), (300, 3072, 768, true)].iter().enumerate() {
        let x = host(random(n * d_in, 140 + i as u64, 1.0), &[n, d_in]);
        let w = random(d_out * d_in, 150 + i as u64, 0.1);
        let keep: Vec<bool> = random(d_out * d_in, 160 + i as u64, 1.0).iter().map(|&v| !masked || v > -0.4).collect();
        let kept: Vec<f32> = w.iter().zip(&keep).map(|(&w, &k)| if k { w } else { 0.0 }).collect();
        let want = cpu.linear(&x, &cpu.prepare_linear_weight(&host(kept, &[d_out, d_in])).unwrap(), None, Activation::Identity).unwrap();
        let gx = be.upload(&x).unwrap();
        let gw = be.prepare_linear_weight(&host(w, &[d_out, d_in])).unwrap();
        let bits = be.upload_mask(&s3router::mask::pack(&keep)).unwrap();
        let run = |be: &CudaBackend| {
            let y = if masked {
                be.linear_masked(&gx, &gw, &bits, None, Activation::Identity).unwrap()
            } else {
                be.linear(&gx, &gw, None, Activation::Identity).unwrap()
            };
            back(be, &y)
        };
        check(&mut be, &format!("linear {n}x{d_in}x{d_out} masked {masked}"), want.f32s().unwrap(), &run);
    }
    for TileConv { geom, seqs_in, seqs_out, x, w } in tile_convs(180) {
        let want = cpu.conv1d(&x, &seqs_in, &seqs_out, &w, None, geom, Activation::Identity).unwrap();
        let (gx, gw) = (be.upload(&x).unwrap(), be.prepare_conv_weight(&w).unwrap());
        let run = |be: &CudaBackend| back(be, &be.conv1d(&gx, &seqs_in, &seqs_out, &gw, None, geom, Activation::Identity).unwrap());
        check(&mut be, &format!("conv {geom:?}"), want.f32s().unwrap(), &run);
    }
}

#[test]
fn norms_add_and_log_softmax_match_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    let seqs = Seqs::new(vec![1, 7, 130]);
    for c in [1usize, 33, 768] {
        let rows = seqs.total();
        let x = host(random(rows * c, c as u64, 2.0), &[rows, c]);
        let r = host(random(rows * c, 1 + c as u64, 1.0), &[rows, c]);
        let (g, b) = (host(random(c, 2, 1.0), &[c]), host(random(c, 3, 1.0), &[c]));
        let (gx, gr, gg, gb) = (be.upload(&x).unwrap(), be.upload(&r).unwrap(), be.upload(&g).unwrap(), be.upload(&b).unwrap());
        let p = NormParams { gamma: &g, beta: &b, eps: 1e-5 };
        let gp = NormParams { gamma: &gg, beta: &gb, eps: 1e-5 };
        for act in [Activation::Identity, Activation::Gelu] {
            let want = cpu.layer_norm(x.clone(), Some(&r), p, act).unwrap();
            let got = be.layer_norm(gx.clone(), Some(&gr), gp, act).unwrap();
            assert_close(&format!("layer_norm c={c} {act:?}"), &back(&be, &got), want.f32s().unwrap(), F32_TOL);
            let want = cpu.group_norm_time(x.clone(), &seqs, p, act).unwrap();
            let got = be.group_norm_time(gx.clone(), &seqs, gp, act).unwrap();
            assert_close(&format!("group_norm_time c={c} {act:?}"), &back(&be, &got), want.f32s().unwrap(), F32_TOL);
        }
        let want = cpu.add(x.clone(), &r).unwrap();
        assert_close("add", &back(&be, &be.add(gx.clone(), &gr).unwrap()), want.f32s().unwrap(), F32_TOL);
        let want = cpu.log_softmax(&x).unwrap();
        assert_close("log_softmax", &back(&be, &be.log_softmax(&gx).unwrap()), want.f32s().unwrap(), F32_TOL);
    }
}

#[test]
fn conv1d_matches_cpu_for_encoder_and_positional_geometries() {
    let f32s = f32_backends();
    if f32s.is_empty() {
        return;
    }
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    // (c_in, c_out, kernel, stride, pad, groups, input lengths); the last two fit the mma.sync kernel.
    let cases = [
        (1, 16, 10, 5, 0, 1, vec![400, 37, 1601]),
        (37, 29, 3, 2, 0, 1, vec![3, 64, 101]),
        (36, 36, 16, 1, 8, 4, vec![1, 20, 79]),
        (40, 40, 7, 1, 3, 2, vec![5, 159]),
        (64, 64, 3, 2, 0, 1, vec![9, 300]),
        (64, 64, 8, 1, 4, 4, vec![1, 130]),
    ];
    for (i, (c_in, c_out, kernel, stride, pad, groups, lens)) in cases.into_iter().enumerate() {
        let geom = ConvGeometry { kernel, stride, pad_left: pad, groups };
        let seqs_in = Seqs::new(lens.clone());
        let out_lens = if pad == 0 { lens.iter().map(|&n| (n - kernel) / stride + 1).collect() } else { lens.clone() };
        let seqs_out = Seqs::new(out_lens);
        let x = host(random(seqs_in.total() * c_in, i as u64, 1.0), &[seqs_in.total(), c_in]);
        let w = host(random(c_out * kernel * (c_in / groups), 50 + i as u64, 0.3), &[c_out, kernel, c_in / groups]);
        let b = host(random(c_out, 60 + i as u64, 0.3), &[c_out]);
        for act in [Activation::Identity, Activation::Gelu] {
            let want = cpu.conv1d(&x, &seqs_in, &seqs_out, &w, Some(&b), geom, act).unwrap();
            for (v, be) in f32s.iter().chain(&bf16).enumerate() {
                let tol = if v < f32s.len() { F32_TOL } else { 1e-2 };
                let (gx, gw, gb) = (be.upload(&x).unwrap(), be.prepare_conv_weight(&w).unwrap(), be.upload(&b).unwrap());
                let got = be.conv1d(&gx, &seqs_in, &seqs_out, &gw, Some(&gb), geom, act).unwrap();
                assert_close(&format!("conv1d case {i} {act:?} backend {v}"), &back(be, &got), want.f32s().unwrap(), tol);
            }
        }
    }
}

/// Feature-encoder layers that feed a conv: bf16 out of the tensor-core path (the group-normed
/// layer 0 and a plain conv), read as they are by the next conv; the chain against the CPU's.
#[test]
fn conv_layers_feeding_convs_match_cpu() {
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    let seqs0 = Seqs::new(vec![400, 1601, 97]);
    let geom0 = ConvGeometry { kernel: 10, stride: 5, pad_left: 0, groups: 1 };
    let geom = ConvGeometry { kernel: 3, stride: 2, pad_left: 0, groups: 1 };
    let seqs1 = Seqs::new(seqs0.lens().iter().map(|&n| (n - 10) / 5 + 1).collect());
    let seqs2 = Seqs::new(seqs1.lens().iter().map(|&n| (n - 3) / 2 + 1).collect());
    let seqs3 = Seqs::new(seqs2.lens().iter().map(|&n| (n - 3) / 2 + 1).collect());
    let c = 32;
    let audio = host(random(seqs0.total(), 1, 1.0), &[seqs0.total(), 1]);
    let w0 = host(random(c * 10, 2, 0.3), &[c, 10, 1]);
    let (w1, w2) = (host(random(c * 3 * c, 3, 0.2), &[c, 3, c]), host(random(c * 3 * c, 4, 0.2), &[c, 3, c]));
    let (gamma, beta, b1) = (host(random(c, 5, 1.0), &[c]), host(random(c, 6, 0.5), &[c]), host(random(c, 7, 0.5), &[c]));
    let gelu = Activation::Gelu;
    let h0 = cpu
        .conv1d_group_norm(&audio, &seqs0, &seqs1, &w0, None, geom0, NormParams { gamma: &gamma, beta: &beta, eps: 1e-5 }, gelu)
        .unwrap();
    let h1 = cpu.conv1d(&h0, &seqs1, &seqs2, &w1, Some(&b1), geom, gelu).unwrap();
    let want = cpu.conv1d(&h1, &seqs2, &seqs3, &w2, None, geom, gelu).unwrap();
    for (v, be) in bf16.iter().enumerate() {
        let (ga, gb, gb1) = (be.upload(&gamma).unwrap(), be.upload(&beta).unwrap(), be.upload(&b1).unwrap());
        let (g0, g1, g2) =
            (be.prepare_conv_weight(&w0).unwrap(), be.prepare_conv_weight(&w1).unwrap(), be.prepare_conv_weight(&w2).unwrap());
        let x = be.upload_rows(&[audio.f32s().unwrap()], 1).unwrap();
        let norm = NormParams { gamma: &ga, beta: &gb, eps: 1e-5 };
        let h0 = be.conv_layer_into_conv(&x, &seqs0, &seqs1, &g0, None, geom0, Some(norm), gelu).unwrap();
        let h1 = be.conv_layer_into_conv(&h0, &seqs1, &seqs2, &g1, Some(&gb1), geom, None, gelu).unwrap();
        // The mma.sync backend (0) hands bf16 along; the WMMA one (1) stays in f32.
        let handed = if v == 0 { DType::BF16 } else { DType::F32 };
        assert_eq!((h0.dtype(), h1.dtype()), (handed, handed), "backend {v}");
        let got = be.conv1d(&h1, &seqs2, &seqs3, &g2, None, geom, gelu).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_close(&format!("conv chain backend {v}"), &back(be, &got), want.f32s().unwrap(), 2e-2);
    }
}

/// A linear's output handed to the next linear (`linear_as_operand`, the FFN's intermediate):
/// bf16 from the mma.sync GEMM where it runs and the next GEMM keeps its 16-byte rows, f32
/// elsewhere. Every linear reads it (dense, masked row segments, sparse; a masked GEMM whose
/// width breaks the masked tensor-core path widens it back) and agrees with the CPU's f32 chain,
/// as does a hand-over produced under masks.
#[test]
fn linear_outputs_handed_to_linears_match_cpu() {
    let f32s = f32_backends();
    if f32s.is_empty() {
        return;
    }
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    let (gelu, id) = (Activation::Gelu, Activation::Identity);
    // Intermediate widths: 96 (bf16, masked tensor-core path next), 40 (bf16, but the masked
    // GEMM next needs a multiple of 32: widened), 36 (not a multiple of 8: f32).
    for (i, (d_in, mid, d_out)) in [(64, 96, 48), (64, 40, 24), (64, 36, 24)].into_iter().enumerate() {
        let seed = 10 * i as u64;
        let rows = [5usize, 1, 64, 17];
        let n: usize = rows.iter().sum();
        let x = host(random(n * d_in, seed, 1.0), &[n, d_in]);
        let (w1, b1) = (random(mid * d_in, seed + 1, 0.2), host(random(mid, seed + 2, 0.5), &[mid]));
        let zeros = random(d_out * mid, seed + 3, 1.0);
        let w2: Vec<f32> = random(d_out * mid, seed + 4, 0.2).iter().zip(&zeros).map(|(&w, &z)| if z > 0.0 { w } else { 0.0 }).collect();
        let b2 = host(random(d_out, seed + 5, 0.5), &[d_out]);
        let keep = |len: usize, s: u64| s3router::mask::pack(&random(len, s, 1.0).iter().map(|&v| v > -0.3).collect::<Vec<_>>());
        let (bits1, bits2) =
            ([keep(mid * d_in, seed + 6), keep(mid * d_in, seed + 7)], [keep(d_out * mid, seed + 8), keep(d_out * mid, seed + 9)]);
        let (cw1, cw2) = (
            cpu.prepare_linear_weight(&host(w1.clone(), &[mid, d_in])).unwrap(),
            cpu.prepare_linear_weight(&host(w2.clone(), &[d_out, mid])).unwrap(),
        );
        let cpu_masks = |bits: &[Vec<u8>], o: usize, k: usize| bits.iter().map(|b| cpu.prepare_mask(b, o, k).unwrap()).collect::<Vec<_>>();
        let (cm1, cm2) = (cpu_masks(&bits1, mid, d_in), cpu_masks(&bits2, d_out, mid));
        let h = cpu.linear(&x, &cw1, Some(&b1), gelu).unwrap();
        let h_routed = cpu.linear_segments(&x, &cw1, Some(&b1), gelu, &segments(&rows, &cm1)).unwrap();
        let want_dense = cpu.linear(&h, &cw2, Some(&b2), id).unwrap();
        let want_masked = cpu.linear_segments(&h, &cw2, Some(&b2), id, &segments(&rows, &cm2)).unwrap();
        let want_routed = cpu.linear(&h_routed, &cw2, Some(&b2), id).unwrap();
        for (v, be) in f32s.iter().chain(&bf16).enumerate() {
            let tol = if v < f32s.len() { F32_TOL } else { 2e-2 };
            let (gx, gb1, gb2) = (be.upload(&x).unwrap(), be.upload(&b1).unwrap(), be.upload(&b2).unwrap());
            let gw1 = be.prepare_linear_weight(&host(w1.clone(), &[mid, d_in])).unwrap();
            let gw2 = be.prepare_linear_weight(&host(w2.clone(), &[d_out, mid])).unwrap();
            let dev_masks =
                |bits: &[Vec<u8>], o: usize, k: usize| bits.iter().map(|b| be.prepare_mask(b, o, k).unwrap()).collect::<Vec<_>>();
            let (gm1, gm2) = (dev_masks(&bits1, mid, d_in), dev_masks(&bits2, d_out, mid));
            let h = be.linear_as_operand(&gx, &gw1, Some(&gb1), gelu, &[(n, None)]).unwrap();
            let h_routed = be.linear_as_operand(&gx, &gw1, Some(&gb1), gelu, &segments(&rows, &gm1)).unwrap();
            // Only the bf16 backend with the mma.sync GEMM (the first bf16 one) hands bf16 over.
            let handed = if v == f32s.len() && mid % 8 == 0 { DType::BF16 } else { DType::F32 };
            assert_eq!((h.dtype(), h_routed.dtype()), (handed, handed), "mid {mid} backend {v}");
            let what = |op: &str| format!("{op} after a hand-over of width {mid}, backend {v}");
            let got = be.linear(&h, &gw2, Some(&gb2), id).unwrap();
            assert_close(&what("linear"), &back(be, &got), want_dense.f32s().unwrap(), tol);
            let got = be.linear_segments(&h, &gw2, Some(&gb2), id, &segments(&rows, &gm2)).unwrap();
            assert_close(&what("masked segments"), &back(be, &got), want_masked.f32s().unwrap(), tol);
            let got = be.linear_sparse(&h, &be.sparse_weight(&w2, d_out, mid).unwrap(), Some(&gb2), id).unwrap();
            assert_close(&what("sparse linear"), &back(be, &got), want_dense.f32s().unwrap(), tol);
            let got = be.linear(&h_routed, &gw2, Some(&gb2), id).unwrap();
            assert_close(&what("linear (routed hand-over)"), &back(be, &got), want_routed.f32s().unwrap(), tol);
        }
    }
}

/// Packed uploads through the pinned staging buffer: batches of several sizes in turn (the
/// buffer reused, then grown) arrive exactly as joined on the host; small ones take the plain
/// path; a part that is not whole rows is refused.
#[test]
fn upload_rows_packs_every_batch_exactly() {
    let Some(be) = gpu(Precision::F32) else { return };
    for (i, lens) in [vec![300_000, 1, 17_001], vec![5, 7], vec![200_000, 250_000], vec![1_000_000, 3, 600_000]].into_iter().enumerate() {
        let parts: Vec<Vec<f32>> = lens.iter().enumerate().map(|(j, &n)| random(n, 1000 + 10 * i as u64 + j as u64, 1.0)).collect();
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        let got = be.upload_rows(&views, 1).unwrap();
        assert_eq!(got.shape(), [lens.iter().sum::<usize>(), 1], "batch {i}");
        assert_eq!(back(&be, &got), views.concat(), "batch {i}");
    }
    let parts = [vec![0.5f32; 6], vec![1.5; 4]];
    let got = be.upload_rows(&[&parts[0], &parts[1]], 2).unwrap();
    assert_eq!(got.shape(), [5, 2]);
    let err = be.upload_rows(&[&parts[0], &parts[1][..3]], 2).unwrap_err().to_string();
    assert!(err.contains("not a whole number of 2-value rows"), "{err}");
}

/// The fused first layer (conv computed where the group norm reads it) against the CPU's conv
/// then group norm: wav2vec2's geometry, a padded one, one-frame utterances, with and without a
/// bias, f32 and bf16 weights; and a multi-channel input, which takes the unfused path.
#[test]
fn conv_group_norm_matches_cpu_conv_then_group_norm() {
    let Some(f32_be) = gpu(Precision::F32) else { return };
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    // (c_in, c_out, kernel, stride, pad, input lengths, bias)
    let cases = [
        (1, 512, 10, 5, 0, vec![400, 10, 1601, 3203], true),
        (1, 33, 10, 5, 0, vec![14, 9001], false),
        (1, 40, 7, 3, 2, vec![5, 300], true),
        (16, 24, 3, 2, 0, vec![3, 97], true),
    ];
    for (i, (c_in, c_out, kernel, stride, pad, lens, with_bias)) in cases.into_iter().enumerate() {
        let geom = ConvGeometry { kernel, stride, pad_left: pad, groups: 1 };
        let seqs_in = Seqs::new(lens.clone());
        let seqs_out = Seqs::new(lens.iter().map(|&n| (n + pad - kernel) / stride + 1).collect());
        let x = host(random(seqs_in.total() * c_in, 70 + i as u64, 1.0), &[seqs_in.total(), c_in]);
        let w = host(random(c_out * kernel * c_in, 80 + i as u64, 0.3), &[c_out, kernel, c_in]);
        let b = host(random(c_out, 90 + i as u64, 0.3), &[c_out]);
        let (g, beta) = (host(random(c_out, 100 + i as u64, 1.0), &[c_out]), host(random(c_out, 110 + i as u64, 1.0), &[c_out]));
        let bias = with_bias.then_some(&b);
        for act in [Activation::Identity, Activation::Gelu] {
            let conv = cpu.conv1d(&x, &seqs_in, &seqs_out, &w, bias, geom, Activation::Identity).unwrap();
            let want = cpu.group_norm_time(conv, &seqs_out, NormParams { gamma: &g, beta: &beta, eps: 1e-5 }, act).unwrap();
            for (v, be) in std::iter::once(&f32_be).chain(&bf16).enumerate() {
                let tol = if v == 0 { F32_TOL } else { 1e-2 };
                let (gx, gw) = (be.upload(&x).unwrap(), be.prepare_conv_weight(&w).unwrap());
                let gbias = bias.map(|b| be.upload(b).unwrap());
                let (gg, gbeta) = (be.upload(&g).unwrap(), be.upload(&beta).unwrap());
                let norm = NormParams { gamma: &gg, beta: &gbeta, eps: 1e-5 };
                let got = be.conv1d_group_norm(&gx, &seqs_in, &seqs_out, &gw, gbias.as_ref(), geom, norm, act).unwrap();
                assert_close(&format!("conv + group norm case {i} {act:?} backend {v}"), &back(be, &got), want.f32s().unwrap(), tol);
            }
        }
    }
}

#[test]
fn attention_matches_cpu_fp32_and_bf16() {
    // fp32: 3xTF32 tensor cores and FMA; bf16: mma.sync.
    let f32s = f32_backends();
    if f32s.is_empty() {
        return;
    }
    let bf16 = bf16_backends();
    let cpu = CpuBackend;
    for (heads, hd, lens) in
        [(3, 12, vec![1, 65, 200]), (2, 64, vec![130, 7]), (1, 100, vec![33]), (12, 64, vec![749]), (2, 32, vec![64, 128])]
    {
        let seqs = Seqs::new(lens);
        let c = heads * hd;
        let qkv = host(random(seqs.total() * 3 * c, (heads * hd) as u64, 2.0), &[seqs.total(), 3 * c]);
        let scale = 1.0 / (hd as f32).sqrt();
        let want = cpu.attention(&qkv, &seqs, heads, scale).unwrap();
        for (v, be) in f32s.iter().chain(&bf16).enumerate() {
            let tol = if v < f32s.len() { F32_TOL } else { 2e-2 };
            let got = be.attention(&be.upload(&qkv).unwrap(), &seqs, heads, scale).unwrap();
            assert_close(&format!("attention heads={heads} hd={hd} backend {v}"), &back(be, &got), want.f32s().unwrap(), tol);
        }
        // bf16 also reads a bf16 qkv (what its GEMM writes): against the CPU on the same values.
        let rounded = qkv.to_dtype(DType::BF16).unwrap().to_f32().unwrap();
        let want = cpu.attention(&rounded, &seqs, heads, scale).unwrap();
        for be in &bf16 {
            let qkv16 = be.to_bf16(&be.upload(&qkv).unwrap()).unwrap();
            let got = be.attention(&qkv16, &seqs, heads, scale).unwrap();
            assert_close(&format!("attention of a bf16 qkv, heads={heads} hd={hd}"), &back(be, &got), want.f32s().unwrap(), 2e-2);
        }
        // fp32 refuses one: it has no kernel reading bf16.
        let err = f32s[0].attention(&bf16[0].to_bf16(&bf16[0].upload(&qkv).unwrap()).unwrap(), &seqs, heads, scale).unwrap_err();
        assert!(err.to_string().contains("BF16 qkv"), "{err}");
    }
}

#[test]
fn whole_model_matches_transformers_fp32_and_bf16() {
    let Some(f32_be) = gpu(Precision::F32) else { return };
    let bf16 = bf16_backends();
    for name in ["base-like", "large-like", "data2vec-like", "mms-like"] {
        let xs = inputs(name);
        let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        for (v, be) in std::iter::once(&f32_be).chain(&bf16).enumerate() {
            let tol = if v == 0 { 1e-4 } else { 2e-2 };
            let model = Wav2Vec2::load(&fixtures().join(name), be).unwrap();
            let vocab = model.config.vocab_size;
            let blank = model.config.pad_token_id;
            let (batched, seqs) = model.logits(be, &refs, None).unwrap();
            let batched = back(be, &batched);
            for (u, x) in xs.iter().enumerate() {
                let (want, _) = reference(name, &format!("utt{u}.logits"));
                let (alone, _) = model.logits(be, &[x], None).unwrap();
                let alone = back(be, &alone);
                let what = format!("{name} utt{u} backend {v}");
                assert_close(&format!("{what} alone"), &alone, &want, tol);
                let r = seqs.range(u);
                assert_close(&format!("{what} batched vs alone"), &batched[r.start * vocab..r.end * vocab], &alone, 1e-5);
                if be.precision() == Precision::F32 {
                    assert_eq!(greedy_ids(&alone, vocab, blank), greedy_ids(&want, vocab, blank), "{what}: greedy transcript");
                } else {
                    // bf16 rounding moves logits by ~1% of their scale, so frames the random
                    // model leaves near a tie may flip; clear frames may not, and flips stay rare.
                    let (all, clear) = argmax_disagreements(&alone, &want, vocab);
                    let frames = alone.len() / vocab;
                    assert_eq!(clear, 0, "{what}: {clear} clearly decided frames changed token");
                    assert!(all * 50 <= frames, "{what}: {all} of {frames} frames changed token");
                }
            }
        }
    }
}

/// The sparse product reads only kept weights and equals the CPU's dense product over the same
/// zeros: fp32 weights, and bf16 ones (the sparse kernel keeps activations fp32, so it matches
/// the CPU on bf16-rounded weights to fp32 accuracy). Awkward sizes: one frame, primes, partial
/// panels, frame blocks and row blocks, an all-zero weight, and the FFN shape at batch 1 x 1 s.
#[test]
fn sparse_linear_matches_the_dense_product_on_the_same_zeros() {
    let Some(mut f32_be) = gpu(Precision::F32) else { return };
    let mut bf16_be = gpu(Precision::Bf16).unwrap();
    let cpu = CpuBackend;
    let cases = [(1, 7, 5, 0.5), (37, 300, 67, 0.1), (33, 257, 130, 0.3), (3, 5, 3, 0.0), (70, 600, 65, 0.2), (49, 768, 3072, 0.1)];
    // Split over panels where the blocks leave SMs idle (all but the one-panel cases), and whole.
    for ((i, &(n, d_in, d_out, density)), split) in cases.iter().enumerate().flat_map(|c| [(c, true), (c, false)]) {
        f32_be.set_split_k(split);
        bf16_be.set_split_k(split);
        let keep = random(d_out * d_in, 300 + i as u64, 1.0);
        let w: Vec<f32> = random(d_out * d_in, 400 + i as u64, 0.5)
            .iter()
            .zip(&keep)
            .map(|(&w, &k)| if k < 2.0 * density - 1.0 { w } else { 0.0 })
            .collect();
        let x = host(random(n * d_in, 500 + i as u64, 1.0), &[n, d_in]);
        let b = host(random(d_out, 600 + i as u64, 0.5), &[d_out]);
        for (be, rounded) in [(&f32_be, false), (&bf16_be, true)] {
            let w_ref: Vec<f32> = if rounded { w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect() } else { w.clone() };
            let sp = be.sparse_weight(&w, d_out, d_in).unwrap();
            let (gx, gb) = (be.upload(&x).unwrap(), be.upload(&b).unwrap());
            for act in [Activation::Identity, Activation::Gelu] {
                let want =
                    cpu.linear(&x, &cpu.prepare_linear_weight(&host(w_ref.clone(), &[d_out, d_in])).unwrap(), Some(&b), act).unwrap();
                let got = be.linear_sparse(&gx, &sp, Some(&gb), act).unwrap();
                let what = format!("sparse {n}x{d_in}x{d_out} density {density} {:?} {act:?} split {split}", be.precision());
                assert_close(&what, &back(be, &got), want.f32s().unwrap(), F32_TOL);
            }
        }
    }
}

/// A masked model on the GPU gives the same logits through the sparse kernel as through the
/// dense GEMM (fp32, rel L2 <= 1e-5), and every masked linear runs its sparse copy.
#[test]
fn sparse_and_dense_models_give_the_same_logits() {
    let Some(be) = gpu(Precision::F32) else { return };
    let (dense, sparse, used, linears) = sparse_and_dense_logits(&be);
    assert_eq!(used, linears, "every masked linear runs its sparse copy");
    assert_close("GPU sparse vs dense logits", &sparse, &dense, F32_TOL);
}

/// Many masks, one model on the GPU: two tasks in one batch give the CPU's logits.
#[test]
fn multitask_batches_match_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_tasks(tmp.path());
    let tasks = vec![("a".to_string(), a), ("b".to_string(), b)];
    let dir = fixtures().join("base-like");
    let (paths, task_of) = (utterances(), [1, 0, 1]);
    let mut results = Vec::new();
    for backend in [&be as &dyn Backend, &CpuBackend] {
        let rec = MultiRecognizer::load(&dir, &tasks, backend).unwrap();
        let mut logits = Vec::new();
        rec.run(&paths, &task_of, BatchLimits::default(), |u| {
            logits.extend(u.logits);
            Ok(())
        })
        .unwrap();
        results.push(logits);
    }
    let err = rel_l2(&results[0], &results[1]);
    assert!(err <= 1e-4, "GPU vs CPU multitask logits rel L2 {err:.2e}");
}

#[test]
fn ctc_kernel_matches_cpu() {
    let Some(be) = gpu(Precision::F32) else { return };
    let cpu = CpuBackend;
    // The kernel runs its log-space recursions in f32, the CPU reference in f64. Gradients are a
    // difference of two near-equal probabilities on confident frames; normalising each frame's
    // occupancies by their own total keeps f32 rounding at ~5e-6 over 2000 frames (the "long"
    // case; 6.7e-4 on an H100 before that normalisation). Losses agree to 1e-5.
    let mut failures = Vec::new();
    let mut check = |what: String, got: &[f32], want: &[f32], tol: f64| {
        let err = rel_l2(got, want);
        if err > tol {
            failures.push(format!("{what}: rel L2 {err:.3e} > {tol:.0e}"));
        }
    };
    for c in ctc_cases() {
        let want = ctc_loss(&cpu, &c.logits, &c.seqs, &c.targets, Reduction::MeanPerUtterance).unwrap();
        let got = ctc_loss(&be, &be.upload(&c.logits).unwrap(), &c.seqs, &c.targets, Reduction::MeanPerUtterance).unwrap();
        check(format!("{} losses", c.name), &got.losses, &want.losses, 1e-5);
        check(format!("{} gradient", c.name), &back(&be, &got.grad), &want.grad.to_vec().unwrap(), 1e-4);
    }
    // A random batch: repeated labels, an empty transcript, a one-frame utterance, blank last.
    let seqs = Seqs::new(vec![200, 90, 1]);
    let vocab = 32;
    let logits = host(random(seqs.total() * vocab, 5, 3.0), &[seqs.total(), vocab]);
    let labels = vec![random(60, 6, 1.0).iter().map(|v| (v.abs() * 30.0) as u32).collect(), vec![3, 3, 3, 7], vec![]];
    let targets = CtcTargets { labels, blank: 31, zero_infinity: false };
    let want = ctc_loss(&cpu, &logits, &seqs, &targets, Reduction::Sum).unwrap();
    let got = ctc_loss(&be, &be.upload(&logits).unwrap(), &seqs, &targets, Reduction::Sum).unwrap();
    check("random losses".into(), &got.losses, &want.losses, 1e-5);
    check("random gradient".into(), &back(&be, &got.grad), &want.grad.to_vec().unwrap(), 1e-4);
    // Transcripts long enough for two and four extended-label states per thread (1201 and 2201
    // states; a block has at most 1024 threads).
    for (i, (frames, labels)) in [(1300, 600), (1400, 1100)].into_iter().enumerate() {
        let seqs = Seqs::new(vec![frames]);
        let logits = host(random(frames * vocab, 7 + i as u64, 3.0), &[frames, vocab]);
        let labels = vec![random(labels, 9 + i as u64, 1.0).iter().map(|v| 1 + (v.abs() * 30.0) as u32).collect()];
        let targets = CtcTargets { labels, blank: 0, zero_infinity: false };
        let want = ctc_loss(&cpu, &logits, &seqs, &targets, Reduction::Sum).unwrap();
        let got = ctc_loss(&be, &be.upload(&logits).unwrap(), &seqs, &targets, Reduction::Sum).unwrap();
        check(format!("{frames} frames x {labels} labels: losses", labels = targets.labels[0].len()), &got.losses, &want.losses, 1e-5);
        check(format!("{frames} frames: gradient"), &back(&be, &got.grad), &want.grad.to_vec().unwrap(), 1e-4);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
