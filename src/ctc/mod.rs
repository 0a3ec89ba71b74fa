//! Connectionist temporal classification: greedy and prefix beam search decoding, and the loss
//! with its gradient.

pub mod align;
pub mod beam;
mod greedy;
pub mod loss;

pub use beam::Decoder;
pub use greedy::greedy_ids;
pub use loss::{ctc_loss, CtcOutput, CtcTargets, Reduction};

/// ln Σ_k exp(x_k) over one frame's scores, in f64: log-softmax is x_k minus this.
pub fn log_partition(frame: &[f32]) -> f64 {
    let max = frame.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    max + frame.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}
