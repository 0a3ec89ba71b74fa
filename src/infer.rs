//! Running a model over audio files: batching, logits, greedy transcripts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::backend::Backend;
use crate::ctc::greedy_ids;
use crate::data::audio;
use crate::model::preprocess::Preprocessor;
use crate::model::vocab::Vocab;
use crate::model::Wav2Vec2;

/// How much audio goes into one forward pass; bounds memory for long file lists.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_samples: usize,
    pub max_utterances: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        // Two minutes of 16 kHz audio: a few hundred MB of activations for wav2vec2-base.
        BatchLimits { max_samples: 120 * audio::SAMPLE_RATE as usize, max_utterances: 16 }
    }
}

/// One utterance's result.
pub struct Utterance {
    /// Position in the input list.
    pub index: usize,
    pub path: PathBuf,
    /// `[frames, vocab]` row-major.
    pub logits: Vec<f32>,
    pub frames: usize,
    pub transcript: String,
}

/// A loaded model folder: weights on a backend, feature extractor, vocabulary.
pub struct Recognizer<'a> {
    pub model: Wav2Vec2,
    pub pre: Preprocessor,
    pub vocab: Vocab,
    pub backend: &'a dyn Backend,
}

impl<'a> Recognizer<'a> {
    pub fn load(dir: &Path, backend: &'a dyn Backend) -> Result<Recognizer<'a>> {
        let model = Wav2Vec2::load(dir, backend)?;
        let vocab = Vocab::load(&dir.join("vocab.json"), model.config.vocab_size, model.config.pad_token_id)?;
        let pre = Preprocessor::load(dir)?;
        Ok(Recognizer { model, pre, vocab, backend })
    }

    /// Decodes, batches and recognises `paths` in order, calling `each` per utterance as soon as
    /// its batch is done. Audio is decoded a batch at a time, so memory stays bounded.
    pub fn run(&self, paths: &[PathBuf], limits: BatchLimits, mut each: impl FnMut(Utterance) -> Result<()>) -> Result<()> {
        let mut pending: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut pending_samples = 0;
        for (i, path) in paths.iter().enumerate() {
            let samples = audio::load(path)?;
            self.model.frame_counts(&[samples.len()]).with_context(|| format!("{}", path.display()))?;
            if !pending.is_empty() && (pending_samples + samples.len() > limits.max_samples || pending.len() >= limits.max_utterances) {
                self.run_batch(paths, std::mem::take(&mut pending), &mut each)?;
                pending_samples = 0;
            }
            pending_samples += samples.len();
            pending.push((i, self.pre.apply(samples)));
        }
        if !pending.is_empty() {
            self.run_batch(paths, pending, &mut each)?;
        }
        Ok(())
    }

    fn run_batch(&self, paths: &[PathBuf], batch: Vec<(usize, Vec<f32>)>, each: &mut impl FnMut(Utterance) -> Result<()>) -> Result<()> {
        let inputs: Vec<&[f32]> = batch.iter().map(|(_, a)| a.as_slice()).collect();
        let (logits, seqs) = self.model.logits(self.backend, &inputs, None)?;
        let logits = self.backend.to_host(&logits)?.to_vec()?;
        let v = self.vocab.len();
        for (u, (index, _)) in batch.iter().enumerate() {
            let r = seqs.range(u);
            let rows = logits[r.start * v..r.end * v].to_vec();
            let transcript = self.vocab.text(&greedy_ids(&rows, v, self.vocab.blank()));
            each(Utterance { index: *index, path: paths[*index].clone(), logits: rows, frames: r.len(), transcript })?;
        }
        Ok(())
    }
}
