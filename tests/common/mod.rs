//! Helpers shared by the integration tests: fixture paths and error measures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use s3router::model::checkpoint::Checkpoint;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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
