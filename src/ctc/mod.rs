//! Connectionist temporal classification: greedy and prefix beam search decoding, and the loss
//! with its gradient.

pub mod align;
pub mod beam;
mod greedy;
pub mod loss;

pub use beam::Decoder;
pub use greedy::greedy_ids;
pub use loss::{ctc_loss, CtcOutput, CtcTargets, Reduction};
