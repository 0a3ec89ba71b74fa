//! Connectionist temporal classification: greedy decoding, and the loss with its gradient.

mod greedy;
pub mod loss;

pub use greedy::greedy_ids;
pub use loss::{ctc_loss, CtcOutput, CtcTargets, Reduction};
