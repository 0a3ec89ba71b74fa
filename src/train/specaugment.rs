//! SpecAugment-style masking as wav2vec2 finetuning applies it (fairseq `compute_mask_indices`,
//! transformers `_compute_mask_indices`): spans of `length` frames (or channels) start at
//! positions drawn without replacement, their number `floor(prob * n / length + u)` with
//! `u ~ U[0, 1)`: about `prob * n` positions before overlaps. Masked frames are replaced by the
//! learned mask embedding, masked channels by zero.

use crate::rng::SplitMix;

/// Which of `n` positions fall in a masked span, with at least `min_spans` spans (fairseq and
/// transformers ask for 2 on the time axis, 0 on channels). `prob == 0` masks nothing, exactly.
pub fn span_mask(n: usize, prob: f64, length: usize, min_spans: usize, rng: &mut SplitMix) -> Vec<bool> {
    let mut mask = vec![false; n];
    if prob <= 0.0 || length == 0 || n < length {
        return mask;
    }
    let u = rng.unit();
    let spans = ((prob * n as f64 / length as f64 + u).floor() as usize).max(min_spans).min(n - length + 1);
    let mut starts: Vec<usize> = (0..=n - length).collect();
    // A partial Fisher-Yates: the first `spans` entries are a uniform sample without replacement.
    for i in 0..spans {
        let j = i + (rng.next_u64() % (starts.len() - i) as u64) as usize;
        starts.swap(i, j);
    }
    for &s in &starts[..spans] {
        mask[s..s + length].iter_mut().for_each(|m| *m = true);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_probability_masks_nothing() {
        let mut rng = SplitMix(1);
        assert!(span_mask(500, 0.0, 10, 0, &mut rng).iter().all(|m| !m));
    }

    #[test]
    fn spans_have_the_requested_length_and_expected_count() {
        let mut rng = SplitMix(2);
        let (n, prob, len) = (749, 0.65, 10);
        let mut covered = 0usize;
        for _ in 0..200 {
            let m = span_mask(n, prob, len, 0, &mut rng);
            // Every masked run is a union of whole spans: no run shorter than the span length.
            let mut run = 0;
            for (i, &x) in m.iter().enumerate() {
                if x {
                    run += 1;
                }
                if !x || i + 1 == n {
                    assert!(run == 0 || run >= len, "a run of {run} frames");
                    run = 0;
                }
            }
            covered += m.iter().filter(|&&x| x).count();
        }
        // floor(0.65 * 749 / 10 + u) = 48 or 49 spans of 10 frames; overlaps cover less:
        // about 1 - exp(-0.65) of the frames (48%), and never more than 49 * 10.
        let mean = covered as f64 / 200.0 / n as f64;
        assert!((0.40..0.56).contains(&mean), "mean coverage {mean}");
    }

    #[test]
    fn short_inputs_still_get_the_minimum_span_count() {
        let m = span_mask(40, 0.01, 10, 2, &mut SplitMix(3));
        let starts = (0..40).filter(|&i| m[i] && (i == 0 || !m[i - 1])).count();
        assert!(m.iter().filter(|&&x| x).count() >= 10 && (1..=2).contains(&starts), "{m:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_mask() {
        assert_eq!(span_mask(300, 0.5, 10, 0, &mut SplitMix(7)), span_mask(300, 0.5, 10, 0, &mut SplitMix(7)));
        assert_ne!(span_mask(300, 0.5, 10, 0, &mut SplitMix(7)), span_mask(300, 0.5, 10, 0, &mut SplitMix(8)));
    }
}
