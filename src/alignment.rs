//! `engine align`: when each word and token of a dataset's transcripts is said, by forced
//! alignment. Of all CTC paths that spell the transcript exactly, the most probable one under
//! the model (Viterbi, [`crate::ctc::align::forced_path`]) gives each token the run of frames
//! it spends on it; long recordings go through the model in windows like `engine infer`.

use anyhow::Result;

use crate::ctc::align::{forced_path, path_spans};
use crate::ctc::log_partition;
use crate::ctc::loss::min_frames;
use crate::data::dataset::Dataset;
use crate::data::labels::Labels;
use crate::infer::{token_stamps, BatchLimits, Recognizer, Stamp};

/// One utterance's transcript, placed in time.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// Position in the dataset.
    pub index: usize,
    /// The transcript's tokens with their times (the word delimiter as a space).
    pub tokens: Vec<Stamp>,
    /// Mean log-probability per frame of the path: near 0 where the model agrees with the
    /// transcript, far below where it does not (a wrong or mismatched transcript).
    pub score: f64,
}

/// An utterance whose transcript cannot be aligned: it needs more frames than the audio gives.
#[derive(Debug, Clone, Copy)]
pub struct TooShort {
    pub index: usize,
    pub needed: usize,
    pub frames: usize,
}

/// Aligns every utterance of `data` to its tokens in `labels`, in dataset order.
pub fn align_dataset(
    rec: &Recognizer,
    data: &Dataset,
    labels: &Labels,
    limits: BatchLimits,
    mut each: impl FnMut(Result<Alignment, TooShort>) -> Result<()>,
) -> Result<()> {
    let paths: Vec<_> = data.utterances.iter().map(|u| u.audio.clone()).collect();
    let (vocab, blank) = (rec.vocab.len(), rec.vocab.blank() as u32);
    let stride = rec.model.config.frame_stride();
    rec.run(&paths, limits, |u| {
        let tokens = &labels.tokens[u.index];
        match forced_path(&u.logits, vocab, tokens, blank) {
            None => each(Err(TooShort { index: u.index, needed: min_frames(tokens), frames: u.frames })),
            Some(path) => {
                let score = path_log_prob(&u.logits, vocab, &path) / u.frames.max(1) as f64;
                let tokens = token_stamps(&path_spans(&path, blank), &rec.vocab, stride);
                each(Ok(Alignment { index: u.index, tokens, score }))
            }
        }
    })
}

/// Σ_t log softmax(logits_t)[path_t].
fn path_log_prob(logits: &[f32], vocab: usize, path: &[u32]) -> f64 {
    logits.chunks_exact(vocab).zip(path).map(|(frame, &k)| frame[k as usize] as f64 - log_partition(frame)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_log_prob_sums_log_softmax() {
        // Two frames over 2 tokens: p = softmax([0, ln 3]) = [1/4, 3/4], then [1/2, 1/2].
        let logits = [0.0, 3f32.ln(), 5.0, 5.0];
        let want = (0.75f64).ln() + (0.5f64).ln();
        assert!((path_log_prob(&logits, 2, &[1, 0]) - want).abs() < 1e-7);
    }
}
