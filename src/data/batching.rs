//! Batches by total audio samples (fairseq's `--max-tokens`), with length bucketing and a
//! deterministic shuffle of the batch order.

use crate::rng::SplitMix;

/// Groups utterance indices into batches of at most `max_tokens` samples in total (an utterance
/// longer than that gets a batch of its own). Utterances are sorted by length first, so each
/// batch holds similar lengths and little padding or waiting is wasted; with `seed` the batch
/// order (not the bucketing) is shuffled deterministically. Every index appears exactly once.
pub fn batches(lengths: &[usize], max_tokens: usize, seed: Option<u64>) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut total = 0;
    for i in order {
        if !current.is_empty() && total + lengths[i] > max_tokens {
            out.push(std::mem::take(&mut current));
            total = 0;
        }
        total += lengths[i];
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    if let Some(seed) = seed {
        SplitMix(seed).shuffle(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_max_tokens_and_cover_every_utterance_once() {
        let lengths: Vec<usize> = (0..500).map(|i| 16_000 + (i * 7919) % 240_000).collect();
        for seed in [None, Some(1), Some(2)] {
            let b = batches(&lengths, 1_000_000, seed);
            let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..500).collect::<Vec<_>>());
            for batch in &b {
                let total: usize = batch.iter().map(|&i| lengths[i]).sum();
                assert!(total <= 1_000_000 || batch.len() == 1);
            }
        }
        assert_eq!(batches(&lengths, 1_000_000, Some(7)), batches(&lengths, 1_000_000, Some(7)));
        assert_ne!(batches(&lengths, 1_000_000, Some(7)), batches(&lengths, 1_000_000, Some(8)));
    }

    #[test]
    fn an_utterance_longer_than_the_budget_gets_its_own_batch() {
        assert_eq!(batches(&[10, 500, 20], 100, None), vec![vec![0, 2], vec![1]]);
    }
}
