//! Running a model over audio files: batching, long files in windows, logits, transcripts.

mod chunking;
mod timestamps;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use anyhow::Result;
use rayon::prelude::*;

pub use chunking::{Chunking, Stitched, Stitcher, Window};
pub use timestamps::{token_stamps, word_stamps, Stamp};

use crate::backend::Backend;
use crate::ctc::Decoder;
use crate::data::audio;
use crate::model::config::Config;
use crate::model::masks::MaskSet;
use crate::model::preprocess::Preprocessor;
use crate::model::vocab::Vocab;
use crate::model::Wav2Vec2;

/// How much audio goes into one forward pass; bounds memory for long file lists.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_samples: usize,
    pub max_utterances: usize,
}

impl BatchLimits {
    /// At most `seconds` of 16 kHz audio per pass (at least one second), the default utterance cap.
    pub fn from_seconds(seconds: f64) -> BatchLimits {
        BatchLimits { max_samples: (seconds.max(1.0) * audio::SAMPLE_RATE as f64) as usize, ..BatchLimits::default() }
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        // Two minutes of 16 kHz audio: a few hundred MB of activations for wav2vec2-base.
        BatchLimits { max_samples: 120 * audio::SAMPLE_RATE as usize, max_utterances: 16 }
    }
}

/// A report on a file cut into windows: its path, the windows done, the windows in all.
pub type WindowProgress<'a> = dyn Fn(&Path, usize, usize) + Sync + 'a;

/// One window of an input file (the whole file unless it was cut), normalised.
pub struct Piece {
    /// Position of the file in the input list.
    pub index: usize,
    pub window: Window,
    /// How many windows the file has.
    pub windows: usize,
    pub samples: Vec<f32>,
}

/// Decodes `paths` in order on a background thread into batches of pieces within `limits`: each
/// file whole, or in windows where `chunking` cuts it, each piece normalised by `pre` on its
/// own (as transformers' pipeline normalises each chunk). Files must hold at least the
/// feature encoder's receptive field. The thread stays one batch ahead; it stops at the first
/// error, which it passes on, or when the receiver goes.
pub fn decoded_batches(
    paths: Vec<PathBuf>,
    pre: Preprocessor,
    config: &Config,
    chunking: Option<Chunking>,
    limits: BatchLimits,
) -> Receiver<Result<Vec<Piece>>> {
    let (tx, rx) = sync_channel(1);
    let config = config.clone();
    std::thread::spawn(move || {
        let min_samples = config.receptive_field();
        let mut pending: Vec<Piece> = Vec::new();
        let mut pending_samples = 0;
        for (index, path) in paths.iter().enumerate() {
            let samples = match audio::load(path) {
                Ok(s) if s.len() < min_samples => Err(anyhow::anyhow!(
                    "{}: {} samples, fewer than the feature encoder's receptive field of {min_samples} samples ({} ms at 16 kHz)",
                    path.display(),
                    s.len(),
                    min_samples / 16
                )),
                other => other,
            };
            let samples = match samples {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let windows = match chunking {
                Some(c) => c.windows(samples.len(), &config),
                None => vec![Window::whole(samples.len(), &config)],
            };
            let count = windows.len();
            for window in windows {
                let len = window.samples.len();
                if !pending.is_empty() && (pending_samples + len > limits.max_samples || pending.len() >= limits.max_utterances) {
                    if tx.send(Ok(std::mem::take(&mut pending))).is_err() {
                        return;
                    }
                    pending_samples = 0;
                }
                pending_samples += len;
                let piece = pre.apply(samples[window.samples.clone()].to_vec());
                pending.push(Piece { index, window, windows: count, samples: piece });
            }
        }
        if !pending.is_empty() {
            let _ = tx.send(Ok(pending));
        }
    });
    rx
}

/// One utterance's result.
pub struct Utterance {
    /// Position in the input list.
    pub index: usize,
    pub path: PathBuf,
    /// `[frames, vocab]` row-major.
    pub logits: Vec<f32>,
    pub frames: usize,
    /// Windows the file was recognised in (1: whole).
    pub windows: usize,
    pub transcript: String,
    /// The transcript's tokens with their times, where asked for.
    pub tokens: Option<Vec<Stamp>>,
}

/// A loaded model folder: weights on a backend, feature extractor, vocabulary.
pub struct Recognizer<'a> {
    pub model: Wav2Vec2,
    pub pre: Preprocessor,
    pub vocab: Vocab,
    pub backend: &'a dyn Backend,
    /// Greedy decoding of whole files without times unless set otherwise after
    /// [`Recognizer::load`].
    pub decoding: Decoding,
    /// Called after each batch that leaves a file cut into windows unfinished (none unless set
    /// after [`Recognizer::load`]).
    pub progress: Option<&'a WindowProgress<'a>>,
}

impl<'a> Recognizer<'a> {
    /// Loads a model folder, optionally with an MMS language's adapters and vocabulary (`lang`,
    /// `--target-lang`; by default the one the mask set was learned with) and a mask set
    /// (`--masks DIR`) whose head and `vocab.json` then define the task. With `sparse`, linears
    /// that are mostly zeros (masked or pruned) skip them where that is faster
    /// ([`Wav2Vec2::prepare_sparse`]).
    pub fn load(dir: &Path, lang: Option<&str>, masks: Option<&Path>, backend: &'a dyn Backend, sparse: bool) -> Result<Recognizer<'a>> {
        let masks = masks.map(MaskSet::load).transpose()?;
        let lang = lang.or(masks.as_ref().and_then(|m| m.target_lang.as_deref()));
        let mut model = Wav2Vec2::load_language(dir, lang, masks.as_ref(), backend)?;
        if sparse {
            model.prepare_sparse(backend)?;
        }
        let (c, set_vocab) = (&model.config, masks.as_ref().and_then(MaskSet::vocab_path));
        let vocab = match set_vocab {
            Some(path) => Vocab::load(&path, c.vocab_size, c.pad_token_id)?,
            None => Vocab::load_language(&dir.join("vocab.json"), lang, c.vocab_size, c.pad_token_id)?,
        };
        Ok(Recognizer::new(model, Preprocessor::load(dir)?, vocab, backend))
    }

    /// A loaded model with greedy decoding of whole files, without times or progress reports.
    pub fn new(model: Wav2Vec2, pre: Preprocessor, vocab: Vocab, backend: &'a dyn Backend) -> Recognizer<'a> {
        Recognizer { model, pre, vocab, backend, decoding: Decoding::default(), progress: None }
    }

    /// Decodes, batches and recognises `paths` in order, calling `each` per utterance as soon as
    /// its last piece is done. Audio is decoded a batch ahead on a background thread, so memory
    /// stays bounded and the compute device does not wait for the decoder.
    pub fn run(&self, paths: &[PathBuf], limits: BatchLimits, mut each: impl FnMut(Utterance) -> Result<()>) -> Result<()> {
        let mut stitcher = Stitcher::default();
        let config = &self.model.config;
        for batch in decoded_batches(paths.to_vec(), self.pre, config, self.decoding.chunking, limits) {
            let batch = batch?;
            let inputs: Vec<&[f32]> = batch.iter().map(|p| p.samples.as_slice()).collect();
            let (logits, seqs) = self.model.logits(self.backend, &inputs, None)?;
            let logits = self.backend.to_host(&logits)?.to_vec()?;
            let v = self.vocab.len();
            let mut done = Vec::new();
            for (u, piece) in batch.iter().enumerate() {
                let r = seqs.range(u);
                if let Some(file) = stitcher.add(piece.index, &piece.window, &logits[r.start * v..r.end * v], v)? {
                    done.push((piece.index, file));
                }
            }
            transcribe(done, paths, &self.vocab, self.decoding, config).into_iter().try_for_each(&mut each)?;
            // Only the batch's last file can still have windows to come.
            if let (Some(report), Some(p)) = (self.progress, batch.last().filter(|p| !p.window.last)) {
                report(&paths[p.index], stitcher.windows_of(p.index), p.windows);
            }
        }
        Ok(())
    }
}

/// How a recogniser goes from audio files to transcripts, beyond the model itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decoding {
    pub decoder: Decoder,
    /// Where long files are cut (none: every file whole).
    pub chunking: Option<Chunking>,
    /// Whether utterances carry token times.
    pub timestamps: bool,
}

/// Decodes whole files' logits, each with its index in `paths`, in parallel into utterances
/// (times at `config`'s frame stride).
pub fn transcribe(files: Vec<(usize, Stitched)>, paths: &[PathBuf], vocab: &Vocab, decoding: Decoding, config: &Config) -> Vec<Utterance> {
    let (v, blank, decoder) = (vocab.len(), vocab.blank(), decoding.decoder);
    files
        .into_par_iter()
        .map(|(index, Stitched { logits, windows })| {
            let (transcript, tokens) = if decoding.timestamps {
                let spans = decoder.spans(&logits, v, blank);
                let ids: Vec<u32> = spans.iter().map(|s| s.token).collect();
                (vocab.text(&ids), Some(token_stamps(&spans, vocab, config.frame_stride())))
            } else {
                (vocab.text(&decoder.decode(&logits, v, blank)), None)
            };
            Utterance { index, path: paths[index].clone(), frames: logits.len() / v, logits, windows, transcript, tokens }
        })
        .collect()
}
