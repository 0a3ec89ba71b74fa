//! Helpers shared by the integration tests: fixture paths and error measures.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

pub mod cli;

use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{unavailable_reason, CudaBackend, Precision, TF32X3_KERNELS};
use s3router::backend::{Backend, Seqs};
use s3router::ctc::CtcTargets;
use s3router::data::audio;
use s3router::fsio::write_f32_safetensors;
use s3router::model::checkpoint::Checkpoint;
use s3router::model::masks::MaskSet;
use s3router::model::preprocess::Preprocessor;
use s3router::model::wav2vec2::maskable_shape;
use s3router::model::Wav2Vec2;
use s3router::rng::SplitMix;
use s3router::router::top_k_mask;
use s3router::tensor::Tensor;
use s3router::train::masked::MaskScope;

/// The fixtures folder, relative to the working directory: cargo runs tests from the crate root,
/// and so does the GPU bundle, whose binaries travel to hosts where the build path does not exist.
pub fn fixtures() -> PathBuf {
    PathBuf::from("tests/fixtures")
}

/// The committed test utterances, in order.
pub fn utterances() -> Vec<PathBuf> {
    (0..3).map(|i| fixtures().join(format!("audio/utt{i}.wav"))).collect()
}

/// The committed utterances, preprocessed as the fixture model `model` says.
pub fn inputs(model: &str) -> Vec<Vec<f32>> {
    let pre = Preprocessor::load(&fixtures().join(model)).unwrap();
    utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect()
}

/// Frames where two greedy decodings pick different tokens, and how many of them the reference
/// called clearly: a top-2 margin of at least 5% of its logit range.
pub fn argmax_disagreements(got: &[f32], want: &[f32], vocab: usize) -> (usize, usize) {
    let range = want.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) - want.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let argmax = |f: &[f32]| f.iter().enumerate().fold(0, |b, (i, &v)| if v > f[b] { i } else { b });
    let (mut all, mut clear) = (0, 0);
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        if argmax(g) != argmax(w) {
            all += 1;
            let mut sorted = w.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] >= 0.05 * range {
                clear += 1;
            }
        }
    }
    (all, clear)
}

/// ‖x‖₂ (in f64).
pub fn l2(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

/// ‖a − b‖₂ / ‖b‖₂, NaN-aware (any NaN gives infinity).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// A reference tensor recorded by tools/make_fixtures.py.
pub fn reference(model: &str, name: &str) -> (Vec<f32>, Vec<usize>) {
    let ck = Checkpoint::open(&[fixtures().join(model).join("reference.safetensors")]).unwrap();
    let t = ck.tensor(name).unwrap();
    (t.to_vec().unwrap(), t.shape().to_vec())
}

/// Deterministic uniform values in [-scale, scale), for random test inputs.
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = s3router::rng::SplitMix(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678);
    (0..n).map(|_| rng.symmetric() * scale).collect()
}

/// One CTC fixture: packed logits, targets, and PyTorch's per-utterance losses and gradient.
pub struct CtcCase {
    pub name: String,
    pub logits: Tensor,
    pub seqs: Seqs,
    pub targets: CtcTargets,
    pub losses: Vec<f32>,
    pub grad: Vec<f32>,
}

/// The CTC cases recorded from PyTorch by tools/make_ctc_fixtures.py.
pub fn ctc_cases() -> Vec<CtcCase> {
    let dir = fixtures().join("ctc");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&[dir.join("ctc.safetensors")]).unwrap();
    meta["ctc"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, m)| {
            let frames: Vec<usize> = m["frames"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let labels: Vec<Vec<u32>> = m["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
                .collect();
            let get = |k: &str| ck.tensor(&format!("{name}.{k}")).unwrap();
            CtcCase {
                name: name.clone(),
                logits: get("logits").to_f32().unwrap(),
                seqs: Seqs::new(frames),
                targets: CtcTargets {
                    labels,
                    blank: m["blank"].as_u64().unwrap() as usize,
                    zero_infinity: m["zero_infinity"].as_bool().unwrap(),
                },
                losses: get("losses").to_vec().unwrap(),
                grad: get("grad").to_vec().unwrap(),
            }
        })
        .collect()
}

/// A mask set in `dir`: random masks on `scope` at `sparsity`, a random head, the model's vocabulary.
pub fn mask_set(dir: &std::path::Path, scope: MaskScope, sparsity: f64, seed: u64) {
    let model_dir = fixtures().join("base-like");
    let model = Wav2Vec2::load(&model_dir, &CpuBackend).unwrap();
    let c = &model.config;
    let mut rng = SplitMix(seed);
    let masks: Vec<(String, Vec<usize>, Vec<bool>)> = (0..c.num_hidden_layers)
        .flat_map(|i| scope.parts().iter().map(move |p| p.weight_name(i)))
        .map(|name| {
            let shape = maskable_shape(c, &name).unwrap();
            let scores: Vec<f32> = (0..shape.iter().product()).map(|_| rng.symmetric()).collect();
            (name, shape, top_k_mask(&scores, sparsity))
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    MaskSet::save(dir, &masks, sparsity, &Default::default()).unwrap();
    let (v, h) = (c.vocab_size, c.hidden_size);
    let (w, b): (Vec<f32>, Vec<f32>) = ((0..v * h).map(|_| rng.symmetric() * 0.3).collect(), (0..v).map(|_| rng.symmetric()).collect());
    write_f32_safetensors(
        &dir.join("head.safetensors"),
        [("lm_head.weight", &[v, h][..], &w[..]), ("lm_head.bias", &[v][..], &b[..])],
        &Default::default(),
    )
    .unwrap();
    std::fs::copy(model_dir.join("vocab.json"), dir.join("vocab.json")).unwrap();
}

/// Two tasks over the base-like fixture in `tmp`: `a` with FFN masks at 30%, `b` with all six
/// linears masked at 50%, each with its own random head.
pub fn two_tasks(tmp: &std::path::Path) -> (PathBuf, PathBuf) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    mask_set(&a, MaskScope::Ffn, 0.3, 1);
    mask_set(&b, MaskScope::All, 0.5, 2);
    (a, b)
}

/// The GPU backend with outputs poisoned (NaN before every write), or `None` with a printed
/// skip line when this machine has none; with `S3R_REQUIRE_GPU=1` a missing GPU fails instead.
pub fn gpu(precision: Precision) -> Option<CudaBackend> {
    if let Some(why) = unavailable_reason() {
        if std::env::var("S3R_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("S3R_REQUIRE_GPU=1 but no GPU: {why}");
        }
        // Straight to stderr, past the test harness's capture, so the skip is visible.
        let _ = writeln!(std::io::stderr(), "skipping GPU test: {why}");
        return None;
    }
    let mut be = CudaBackend::new(0, precision).unwrap();
    be.set_poison(true);
    Some(be)
}

/// The fp32 backend with the 3xTF32 tensor-core GEMMs (the default), with the FMA GEMMs only,
/// and where the GPU has it with the wgmma 3xTF32 GEMM forced; empty without a GPU.
pub fn f32_backends() -> Vec<CudaBackend> {
    let Some(tc) = gpu(Precision::F32) else { return vec![] };
    let mut fma = gpu(Precision::F32).unwrap();
    fma.set_tf32x3(false);
    // The first times the 3xTF32 kernels per shape (small GEMMs run mma.sync's); on Hopper (as
    // under tools/cuemu) the wgmma one runs every GEMM of the third.
    let mut wgmma = gpu(Precision::F32).unwrap();
    let hopper = wgmma.set_tf32x3_kernel(TF32X3_KERNELS.iter().position(|k| k.is_wgmma())).is_ok();
    let mut all = vec![tc, fma];
    all.extend(hopper.then_some(wgmma));
    all
}

/// The gradient of a key-projection bias is zero in exact arithmetic (a key bias adds the same
/// q·b to a whole row of scores, which the softmax ignores), so both sides hold only rounding
/// noise: fails unless each is below `noise` times `scale` (the norm of the layer's query-bias
/// gradient) instead of comparing noise with noise.
pub fn assert_key_bias_negligible(what: &str, got: &[f32], want: &[f32], scale: f64, noise: f64) {
    let bound = noise * scale;
    assert!(l2(got) <= bound && l2(want) <= bound, "{what}: not ~0 ({}, reference {}, bound {bound})", l2(got), l2(want));
}

/// Fails unless `got` is within relative L2 `tol` of `want`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: rel L2 {err:.3e} > {tol:.0e}");
}

/// The base-like fixture with random 90% masks on all six linears of every layer, loaded twice
/// on `be` (dense, and with sparse copies of its linears), run on the committed utterances:
/// returns (dense logits, sparse logits, linears whose sparse copy this batch runs, linears in
/// the model). Which path runs is asked of the backend, not read off the logits: a sparse
/// product that adds the kept terms in the dense GEMM's order gives the same bits.
pub fn sparse_and_dense_logits(be: &dyn Backend) -> (Vec<f32>, Vec<f32>, usize, usize) {
    let dir = fixtures().join("base-like");
    let tmp = tempfile::tempdir().unwrap();
    mask_set(tmp.path(), MaskScope::All, 0.9, 4);
    let set = MaskSet::load(tmp.path()).unwrap();
    let dense = Wav2Vec2::load_masked(&dir, Some(&set), be).unwrap();
    let mut sparse = Wav2Vec2::load_masked(&dir, Some(&set), be).unwrap();
    sparse.prepare_sparse(be).unwrap();
    let pre = Preprocessor::load(&dir).unwrap();
    let clips: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
    let inputs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let frames: usize = sparse.frame_counts(&clips.iter().map(Vec::len).collect::<Vec<_>>()).unwrap().iter().sum();
    let used = sparse
        .layers
        .iter()
        .flat_map(|l| [&l.qkv_proj, &l.out_proj, &l.intermediate_dense, &l.output_dense])
        .filter(|lin| lin.sparse.as_ref().is_some_and(|sp| be.sparse_pays(sp, frames)))
        .count();
    let logits = |m: &Wav2Vec2| be.to_host(&m.logits(be, &inputs, None).unwrap().0).unwrap().to_vec().unwrap();
    (logits(&dense), logits(&sparse), used, 4 * dense.layers.len())
}

/// A writable copy of a fixture model folder (its files of those a model folder holds).
pub fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    // A bare encoder has no vocab.json.
    for f in ["config.json", "model.safetensors", "vocab.json", "preprocessor_config.json"].map(|f| fixtures().join(name).join(f)) {
        if f.exists() {
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    (dir, dst)
}

/// Rewrites `m`/model.safetensors (as f32) after `edit` changes its (name, shape, values) list.
pub fn rewrite_tensors(m: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = m.join("model.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        ck.names().map(|n| (n.to_owned(), ck.tensor(n).unwrap().shape().to_vec(), ck.tensor(n).unwrap().to_vec().unwrap())).collect();
    drop(ck);
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}
