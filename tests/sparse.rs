//! Sparse inference: a model masked at 90% gives the same logits through the sparse CPU product
//! as through the dense one (fp32, rel L2 <= 1e-5), on the fixture model and utterances. The GPU
//! runs the same check in tests/cuda.rs.

mod common;

use common::{fixtures, rel_l2, sparse_and_dense_logits};
use s3router::backend::cpu::CpuBackend;
use s3router::model::Wav2Vec2;

#[test]
fn sparse_and_dense_paths_give_the_same_logits() {
    let be = CpuBackend;
    let (dense, sparse, used, linears) = sparse_and_dense_logits(&be);
    assert_eq!(used, linears, "every masked linear runs its sparse copy");
    let err = rel_l2(&sparse, &dense);
    assert!(err <= 1e-5, "sparse vs dense logits rel L2 {err:.2e}");
    // An unmasked model has nothing to skip.
    assert_eq!(Wav2Vec2::load(&fixtures().join("base-like"), &be).unwrap().prepare_sparse(&be).unwrap(), 0);
}
