//! CTC loss and its gradient with respect to the logits (log-softmax fused in), over a packed
//! batch. The backends compute per-utterance losses and the gradient; this module checks the
//! targets first and applies the reduction.

use anyhow::{bail, ensure, Result};

use crate::backend::{Backend, Seqs};
use crate::tensor::Tensor;

/// Label sequences of a batch and how to treat them.
#[derive(Clone, Debug)]
pub struct CtcTargets {
    /// One label sequence per utterance (token ids, never the blank).
    pub labels: Vec<Vec<u32>>,
    /// The blank's token id (`pad_token_id` of the model).
    pub blank: usize,
    /// Infeasible alignments (too few frames) give loss 0 and gradient 0 instead of an error.
    pub zero_infinity: bool,
}

/// How per-utterance losses combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Sum over utterances (transformers' default).
    Sum,
    /// Sum divided by the number of utterances (fairseq's `sentence_avg`).
    MeanPerUtterance,
}

pub struct CtcOutput {
    /// Per-utterance loss, -log p(labels | audio) (0 where zero_infinity applied).
    pub losses: Vec<f32>,
    /// The reduced loss.
    pub loss: f32,
    /// Gradient of `loss` with respect to the logits, `[frames, vocab]` packed like them.
    pub grad: Tensor,
}

/// Frames the labels need at least: one per label plus one blank between equal neighbours.
pub fn min_frames(labels: &[u32]) -> usize {
    labels.len() + labels.windows(2).filter(|w| w[0] == w[1]).count()
}

/// Checks targets against the batch and vocabulary; names the first offending utterance.
pub fn validate(targets: &CtcTargets, seqs: &Seqs, vocab: usize) -> Result<()> {
    ensure!(targets.blank < vocab, "CTC blank id {} is outside the vocabulary of {vocab}", targets.blank);
    ensure!(targets.labels.len() == seqs.count(), "{} label sequences for {} utterances", targets.labels.len(), seqs.count());
    for (i, labels) in targets.labels.iter().enumerate() {
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= vocab) {
            bail!("utterance {i}: label id {bad} is outside the vocabulary of {vocab}");
        }
        if labels.iter().any(|&l| l as usize == targets.blank) {
            bail!("utterance {i}: its labels contain the blank (id {})", targets.blank);
        }
        let (need, have) = (min_frames(labels), seqs.lens()[i]);
        if need > have && !targets.zero_infinity {
            bail!(
                "utterance {i}: {} labels need at least {need} frames, it has {have} (use zero_infinity to skip such utterances)",
                labels.len()
            );
        }
    }
    Ok(())
}

/// The CTC loss of `logits [frames, vocab]` (packed per `seqs`) against `targets`, and its
/// gradient, on any backend.
pub fn ctc_loss(be: &dyn Backend, logits: &Tensor, seqs: &Seqs, targets: &CtcTargets, reduction: Reduction) -> Result<CtcOutput> {
    let vocab = *logits.shape().last().unwrap_or(&0);
    ensure!(logits.numel() == seqs.total() * vocab, "CTC: logits {:?} do not hold {} frames", logits.shape(), seqs.total());
    validate(targets, seqs, vocab)?;
    let scale = match reduction {
        Reduction::Sum => 1.0,
        Reduction::MeanPerUtterance => 1.0 / seqs.count().max(1) as f32,
    };
    let (losses, grad) = be.ctc_loss(logits, seqs, targets, scale)?;
    let loss = losses.iter().map(|&l| l as f64).sum::<f64>() as f32 * scale;
    Ok(CtcOutput { losses, loss, grad })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_frames_counts_a_blank_per_repeat() {
        assert_eq!(min_frames(&[]), 0);
        assert_eq!(min_frames(&[1, 2, 3]), 3);
        assert_eq!(min_frames(&[2, 2, 2, 3, 3]), 8);
    }

    #[test]
    fn bad_targets_are_named() {
        let seqs = Seqs::new(vec![10, 3]);
        let t = |labels: Vec<Vec<u32>>, zero_infinity| CtcTargets { labels, blank: 0, zero_infinity };
        assert!(validate(&t(vec![vec![1], vec![0]], false), &seqs, 5)
            .unwrap_err()
            .to_string()
            .contains("utterance 1: its labels contain the blank"));
        assert!(validate(&t(vec![vec![7], vec![1]], false), &seqs, 5).unwrap_err().to_string().contains("label id 7"));
        let e = validate(&t(vec![vec![1], vec![1, 1, 2]], false), &seqs, 5).unwrap_err().to_string();
        assert!(e.contains("need at least 4 frames, it has 3"), "{e}");
        assert!(validate(&t(vec![vec![1], vec![1, 1, 2]], true), &seqs, 5).is_ok());
        assert!(validate(&t(vec![vec![]], false), &seqs, 5).is_err());
    }
}
