//! The CPU's bf16 backend (`--precision bf16`, AVX512-BF16) against the f32 CPU backend, op by
//! op on awkward sizes, and the whole model.
//!
//! Each product is checked twice: against the f32 backend on the same inputs (bf16 rounding,
//! rel L2 <= 1e-2), and against the f32 backend on inputs and weights rounded to bf16 first,
//! where only the order of the f32 additions differs (rel L2 <= 1e-6: a misplaced weight or a
//! lost k block shows). On a CPU without AVX512-BF16 each test checks that the backend refuses
//! to start, saying why, and prints a skip line.

mod common;

use common::{argmax_disagreements, assert_close, random};
use s3router::backend::cpu::bf16::CpuBf16Backend;
use s3router::backend::cpu::CpuBackend;
use s3router::backend::{Activation, Backend, ConvGeometry, LinearMask, Seqs};
use s3router::ctc::greedy_ids;
use s3router::model::Wav2Vec2;
use s3router::tensor::{DType, Tensor};

/// The bf16 backend, or `None` (after checking the refusal) where the CPU lacks AVX512-BF16.
fn bf16() -> Option<CpuBf16Backend> {
    match CpuBf16Backend::new() {
        Ok(be) => Some(be),
        Err(e) => {
            assert!(e.to_string().contains("AVX512-BF16"), "the refusal must say what is missing: {e}");
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

fn host(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape)
}

#[test]
fn linear_matches_f32_on_bf16_rounded_operands() {
    let Some(be) = bf16() else { return };
    // Rows: one, a prime, several row blocks; inputs: one pair, past one k block (385 pairs);
    // outputs: one panel, column groups for a short input, several panels.
    for (i, &(n, d_in, d_out)) in [(1, 2, 32), (13, 34, 64), (97, 770, 96), (600, 1000, 32), (5, 64, 320), (3, 20, 160)].iter().enumerate()
    {
        let (x, w, b) = (random(n * d_in, i as u64, 1.0), random(d_out * d_in, 100 + i as u64, 0.1), random(d_out, 200 + i as u64, 0.5));
        let packed = be.prepare_linear_weight(&host(w.clone(), &[d_out, d_in])).unwrap();
        assert_eq!((packed.dtype(), packed.shape()), (DType::BF16, &[d_out / 32, d_in / 2, 32, 2][..]), "packed layout");
        for act in [Activation::Identity, Activation::Gelu] {
            let what = format!("{n}x{d_in}->{d_out} {act:?}");
            let got = be.linear(&host(x.clone(), &[n, d_in]), &packed, Some(&host(b.clone(), &[d_out])), act).unwrap().to_vec().unwrap();
            let f32_linear = |x: &[f32], w: &[f32]| {
                let w = CpuBackend.prepare_linear_weight(&host(w.to_vec(), &[d_out, d_in])).unwrap();
                CpuBackend.linear(&host(x.to_vec(), &[n, d_in]), &w, Some(&host(b.clone(), &[d_out])), act).unwrap().to_vec().unwrap()
            };
            let exact = f32_linear(&rounded(&x), &rounded(&w));
            assert_close(&format!("{what} against rounded operands"), &got, &exact, 1e-6);
            assert_close(&format!("{what} against f32"), &got, &f32_linear(&x, &w), 1e-2);
        }
    }
}

#[test]
fn shapes_that_do_not_pack_run_in_f32() {
    let Some(be) = bf16() else { return };
    let (n, d_in, d_out) = (7, 30, 47);
    let (x, w) = (host(random(n * d_in, 1, 1.0), &[n, d_in]), host(random(d_out * d_in, 2, 0.1), &[d_out, d_in]));
    let prepared = be.prepare_linear_weight(&w).unwrap();
    assert_eq!(prepared.dtype(), DType::F32);
    let want = CpuBackend.linear(&x, &CpuBackend.prepare_linear_weight(&w).unwrap(), None, Activation::Gelu).unwrap();
    assert_eq!(be.linear(&x, &prepared, None, Activation::Gelu).unwrap().to_vec().unwrap(), want.to_vec().unwrap());
}

/// Segments with their own masks give exactly the product over the masked weights, packed.
#[test]
fn masked_segments_equal_the_masked_weights() {
    let Some(be) = bf16() else { return };
    let (d_in, d_out) = (34, 64);
    let w = random(d_out * d_in, 3, 0.1);
    let rows = [3, 0, 10, 1];
    let x = host(random(rows.iter().sum::<usize>() * d_in, 4, 1.0), &[rows.iter().sum(), d_in]);
    let keeps: Vec<Vec<bool>> =
        (0..rows.len()).map(|s| random(d_out * d_in, 10 + s as u64, 1.0).iter().map(|&v| v > -0.4).collect()).collect();
    let masks: Vec<LinearMask> = keeps.iter().map(|k| be.prepare_mask(&s3router::mask::pack(k), d_out, d_in).unwrap()).collect();
    let packed = be.prepare_linear_weight(&host(w.clone(), &[d_out, d_in])).unwrap();
    let segments: Vec<(usize, Option<&LinearMask>)> = rows.iter().zip(&masks).map(|(&r, m)| (r, Some(m))).collect();
    let got = be.linear_segments(&x, &packed, None, Activation::Identity, &segments).unwrap().to_vec().unwrap();
    let (mut row, xs) = (0, x.to_vec().unwrap());
    for (&r, keep) in rows.iter().zip(&keeps) {
        let masked: Vec<f32> = w.iter().zip(keep).map(|(&v, &k)| if k { v } else { 0.0 }).collect();
        let wm = be.prepare_linear_weight(&host(masked, &[d_out, d_in])).unwrap();
        let want = be.linear(&host(xs[row * d_in..(row + r) * d_in].to_vec(), &[r, d_in]), &wm, None, Activation::Identity).unwrap();
        assert_eq!(&got[row * d_out..(row + r) * d_out], want.to_vec().unwrap(), "segment at row {row}");
        row += r;
    }
}

/// The feature encoder's strided convolutions take the bf16 GEMM over a strided view of the
/// input, outputs that are not whole panels of 32 included; one input channel (the first
/// layer) and grouped, padded ones (the positional conv) stay f32 and match the f32 backend
/// exactly.
#[test]
fn convolutions_match_f32() {
    let Some(be) = bf16() else { return };
    let lens = [50, 7, 3, 2];
    let cases = [
        (64, 64, ConvGeometry { kernel: 3, stride: 2, pad_left: 0, groups: 1 }, true),
        (32, 48, ConvGeometry { kernel: 2, stride: 2, pad_left: 0, groups: 1 }, true),
        (1, 32, ConvGeometry { kernel: 10, stride: 5, pad_left: 0, groups: 1 }, false),
        (64, 48, ConvGeometry { kernel: 8, stride: 1, pad_left: 4, groups: 4 }, false),
    ];
    for (i, &(c_in, c_out, geom, packs)) in cases.iter().enumerate() {
        let lens_in: Vec<usize> = lens.iter().map(|l| l * geom.stride + geom.kernel).collect();
        let out_len = |l: usize| (l + geom.pad_left).saturating_sub(geom.kernel) / geom.stride + 1;
        let (seqs_in, seqs_out) = (Seqs::new(lens_in.clone()), Seqs::new(lens_in.iter().map(|&l| out_len(l)).collect()));
        let x = random(seqs_in.total() * c_in, 20 + i as u64, 1.0);
        let w = random(c_out * geom.kernel * c_in / geom.groups, 30 + i as u64, 0.2);
        let (b, w_shape) = (host(random(c_out, 40 + i as u64, 0.5), &[c_out]), [c_out, geom.kernel, c_in / geom.groups]);
        let conv = |be: &dyn Backend, x: &[f32], w: &[f32]| {
            let w = be.prepare_conv_weight(&host(w.to_vec(), &w_shape)).unwrap();
            let x = host(x.to_vec(), &[seqs_in.total(), c_in]);
            be.conv1d(&x, &seqs_in, &seqs_out, &w, Some(&b), geom, Activation::Gelu).unwrap().to_vec().unwrap()
        };
        let got = conv(&be, &x, &w);
        let what = format!("conv {c_in}->{c_out} {geom:?}");
        if packs {
            assert_close(&format!("{what} against rounded operands"), &got, &conv(&CpuBackend, &rounded(&x), &rounded(&w)), 1e-6);
            assert_close(&format!("{what} against f32"), &got, &conv(&CpuBackend, &x, &w), 1e-2);
        } else {
            assert_eq!(got, conv(&CpuBackend, &x, &w), "{what}: f32 path");
        }
    }
}

/// Attention's two products in bf16: utterances of one key, an odd count, past one block of
/// queries; head sizes that split into pairs; an odd one runs in f32, exactly as the f32 backend.
#[test]
fn attention_matches_f32() {
    let Some(be) = bf16() else { return };
    let seqs = Seqs::new(vec![1, 7, 300, 2, 33]);
    for (i, &(heads, hd)) in [(2, 64), (3, 6), (2, 5)].iter().enumerate() {
        let c = heads * hd;
        let qkv = random(seqs.total() * 3 * c, 50 + i as u64, 2.0);
        let run = |be: &dyn Backend, x: &[f32]| {
            be.attention(&host(x.to_vec(), &[seqs.total(), 3 * c]), &seqs, heads, 1.0 / (hd as f32).sqrt()).unwrap().to_vec().unwrap()
        };
        let got = run(&be, &qkv);
        if hd % 2 == 1 {
            assert_eq!(got, run(&CpuBackend, &qkv), "head size {hd}: f32 path");
            continue;
        }
        // The probabilities are rounded too, so against rounded q, k, v the error is bf16's.
        assert_close(&format!("{heads} heads of {hd} against rounded operands"), &got, &run(&CpuBackend, &rounded(&qkv)), 5e-3);
        assert_close(&format!("{heads} heads of {hd} against f32"), &got, &run(&CpuBackend, &qkv), 1e-2);
    }
}

/// The demo backbone (weights/s3r-demo-en: every linear and conv from the second on packs;
/// the test fixtures are too narrow to) against the f32 backend, which matches transformers to
/// 1e-4 (tests/parity.rs), on the committed utterances and the demo corpus's Spanish speech.
#[test]
fn whole_model_matches_f32() {
    let Some(be) = bf16() else { return };
    let dir = std::path::Path::new("weights/s3r-demo-en");
    let model = Wav2Vec2::load(dir, &be).unwrap();
    let reference = Wav2Vec2::load(dir, &CpuBackend).unwrap();
    let layers = &model.layers;
    assert!(layers
        .iter()
        .all(|l| [&l.qkv_proj, &l.out_proj, &l.intermediate_dense, &l.output_dense].iter().all(|lin| lin.weight.dtype() == DType::BF16)));
    let pre = s3router::model::preprocess::Preprocessor::load(dir).unwrap();
    let corpus = std::fs::read_dir("weights/demo-corpus/es/audio").unwrap().map(|e| e.unwrap().path());
    let mut paths: Vec<_> = common::utterances().into_iter().chain(corpus.filter(|p| p.to_string_lossy().contains("_dev_"))).collect();
    paths.truncate(8);
    let xs: Vec<Vec<f32>> = paths.iter().map(|p| pre.apply(s3router::data::audio::load(p).unwrap())).collect();
    let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    let (vocab, blank) = (model.config.vocab_size, model.config.pad_token_id);
    let (batched, seqs) = model.logits(&be, &refs, None).unwrap();
    let batched = batched.to_vec().unwrap();
    for (u, x) in xs.iter().enumerate() {
        let want = reference.logits(&CpuBackend, &[x], None).unwrap().0.to_vec().unwrap();
        let alone = model.logits(&be, &[x], None).unwrap().0.to_vec().unwrap();
        let what = paths[u].display().to_string();
        assert_close(&format!("{what} alone"), &alone, &want, 2e-2);
        // Each output row is summed in the same order whatever else is in the batch.
        let r = seqs.range(u);
        assert_eq!(&batched[r.start * vocab..r.end * vocab], &alone[..], "{what}: batched vs alone");
        // bf16 moves logits by ~1% of their scale: frames left near a tie may flip; clearly
        // decided ones may not, and flips stay rare.
        let (all, clear) = argmax_disagreements(&alone, &want, vocab);
        let frames = alone.len() / vocab;
        assert_eq!(clear, 0, "{what}: {clear} clearly decided frames changed token");
        assert!(all * 50 <= frames, "{what}: {all} of {frames} frames changed token");
        if all == 0 {
            assert_eq!(greedy_ids(&alone, vocab, blank), greedy_ids(&want, vocab, blank), "{what}: greedy transcript");
        }
        eprintln!("{what}: {:.2e}, {all} of {frames} frames flipped", common::rel_l2(&alone, &want));
    }
}
