//! Training data as the loop consumes it: utterances with their token ids and lengths, batched by
//! `--max-tokens` in an order that is a pure function of (seed, epoch), and decoded one batch
//! ahead on a background thread. A position (epoch, batch) is all a checkpoint needs to store
//! for a resumed run to see exactly the batches an uninterrupted one would have.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::data::audio;
use crate::data::batching::batches;
use crate::data::dataset::Dataset;
use crate::model::preprocess::Preprocessor;
use crate::rng::mix;

/// Where the run is in its data: the epoch and the next batch within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub batch: usize,
}

/// The training set: audio paths, token ids and lengths of the utterances used.
pub struct Feed {
    paths: Arc<Vec<PathBuf>>,
    pub labels: Arc<Vec<Vec<u32>>>,
    lengths: Arc<Vec<usize>>,
    max_tokens: usize,
    seed: u64,
    /// Utterances dropped for being shorter than the feature encoder's receptive field.
    pub too_short: usize,
}

/// One batch: utterance indices and their preprocessed audio.
pub type Batch = (Vec<usize>, Vec<Vec<f32>>);

impl Feed {
    /// `labels[i]` are the token ids of `data.utterances[i]`. Lengths come from the manifest
    /// where it records them, else from the audio headers (read in parallel).
    pub fn new(data: &Dataset, labels: Vec<Vec<u32>>, min_samples: usize, max_tokens: usize, seed: u64) -> Result<Feed> {
        let lengths: Vec<usize> = data
            .utterances
            .par_iter()
            .map(|u| match u.samples {
                Some(n) => Ok(n),
                None => audio::duration_samples(&u.audio).with_context(|| format!("cannot read the length of {}", u.audio.display())),
            })
            .collect::<Result<_>>()?;
        let keep: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] >= min_samples).collect();
        anyhow::ensure!(
            !keep.is_empty(),
            "no training utterance is as long as the feature encoder's receptive field ({min_samples} samples)"
        );
        Ok(Feed {
            too_short: lengths.len() - keep.len(),
            paths: Arc::new(keep.iter().map(|&i| data.utterances[i].audio.clone()).collect()),
            labels: Arc::new(keep.iter().map(|&i| labels[i].clone()).collect()),
            lengths: Arc::new(keep.iter().map(|&i| lengths[i]).collect()),
            max_tokens,
            seed,
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn total_samples(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The batches of `epoch`, in order.
    fn epoch(lengths: &[usize], max_tokens: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
        batches(lengths, max_tokens, Some(mix(seed ^ mix(epoch))))
    }

    /// Decodes batches from `from` on, one ahead of the consumer, each with the position after
    /// it. The thread stops when the receiver is dropped.
    pub fn stream(&self, from: Position, pre: Preprocessor) -> Receiver<Result<(Batch, Position)>> {
        let (tx, rx) = sync_channel(1);
        let (paths, lengths) = (Arc::clone(&self.paths), Arc::clone(&self.lengths));
        let (max_tokens, seed) = (self.max_tokens, self.seed);
        std::thread::spawn(move || {
            let mut pos = from;
            let mut order = Feed::epoch(&lengths, max_tokens, seed, pos.epoch);
            loop {
                if pos.batch >= order.len() {
                    pos = Position { epoch: pos.epoch + 1, batch: 0 };
                    order = Feed::epoch(&lengths, max_tokens, seed, pos.epoch);
                }
                let idx = order[pos.batch].clone();
                pos.batch += 1;
                let audio = idx
                    .par_iter()
                    .map(|&i| audio::load(&paths[i]).map(|a| pre.apply(a)).with_context(|| format!("cannot load {}", paths[i].display())))
                    .collect::<Result<Vec<_>>>();
                if tx.send(audio.map(|a| ((idx, a), pos))).is_err() {
                    return;
                }
            }
        });
        rx
    }
}
