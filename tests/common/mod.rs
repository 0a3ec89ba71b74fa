//! Helpers shared by the integration tests: fixture paths and error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use s3router::model::checkpoint::Checkpoint;

/// The fixtures folder, relative to the working directory: cargo runs tests from the crate root,
/// and so does the GPU bundle, whose binaries travel to hosts where the build path does not exist.
pub fn fixtures() -> PathBuf {
    PathBuf::from("tests/fixtures")
}

/// The committed test utterances, in order.
pub fn utterances() -> Vec<PathBuf> {
    (0..3).map(|i| fixtures().join(format!("audio/utt{i}.wav"))).collect()
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

/// Deterministic uniform values in [-scale, scale) (splitmix64), for random test inputs.
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}
