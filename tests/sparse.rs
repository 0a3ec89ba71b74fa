//! Sparse inference: a model masked at 90% gives the same logits through the sparse CPU product
//! as through the dense one (fp32, rel L2 <= 1e-5), on the fixture model and utterances.

mod common;

use common::{fixtures, rel_l2, utterances};
use s3router::backend::cpu::CpuBackend;
use s3router::data::audio;
use s3router::model::masks::MaskSet;
use s3router::model::preprocess::Preprocessor;
use s3router::model::wav2vec2::maskable_shape;
use s3router::model::Wav2Vec2;
use s3router::rng::SplitMix;
use s3router::router::top_k_mask;
use s3router::train::masked::MaskScope;

#[test]
fn sparse_and_dense_paths_give_the_same_logits() {
    let be = CpuBackend;
    let dir = fixtures().join("base-like");
    let model = Wav2Vec2::load(&dir, &be).unwrap();
    // Random per-matrix masks at 90% over all six linears of every layer.
    let mut rng = SplitMix(4);
    let masks: Vec<(String, Vec<usize>, Vec<bool>)> = (0..model.layers.len())
        .flat_map(|i| MaskScope::All.parts().iter().map(move |p| p.weight_name(i)))
        .map(|name| {
            let shape = maskable_shape(&model.config, &name).unwrap();
            let scores: Vec<f32> = (0..shape.iter().product()).map(|_| rng.symmetric()).collect();
            (name, shape, top_k_mask(&scores, 0.9))
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    MaskSet::save(tmp.path(), &masks, 0.9).unwrap();
    let set = MaskSet::load(tmp.path()).unwrap();
    let dense = Wav2Vec2::load_masked(&dir, Some(&set), &be).unwrap();
    let mut sparse = Wav2Vec2::load_masked(&dir, Some(&set), &be).unwrap();
    assert_eq!(sparse.prepare_sparse(), 4 * model.layers.len(), "every masked linear gets a sparse copy");
    let pre = Preprocessor::load(&dir).unwrap();
    let clips: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
    let inputs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let (a, _) = dense.logits(&be, &inputs, None).unwrap();
    let (b, _) = sparse.logits(&be, &inputs, None).unwrap();
    let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    let err = rel_l2(&b, &a);
    assert!(err <= 1e-5, "sparse vs dense logits rel L2 {err:.2e}");
    assert!(a != b, "the sparse path did not run (bit-identical logits)");
    // An unmasked model has nothing to skip.
    assert_eq!(Wav2Vec2::load(&dir, &be).unwrap().prepare_sparse(), 0);
}
