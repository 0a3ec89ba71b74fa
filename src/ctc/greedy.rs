//! Greedy (best-path) CTC decoding.

use super::align::{greedy_path, path_spans};

/// Greedy (best-path) decoding of one utterance's `[frames, vocab]` scores: the argmax token of
/// each frame, repeats collapsed, blanks dropped.
pub fn greedy_ids(logits: &[f32], vocab: usize, blank: usize) -> Vec<u32> {
    path_spans(&greedy_path(logits, vocab), blank as u32).into_iter().map(|s| s.token).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_repeats_but_keeps_blank_separated_ones() {
        // frames: a a _ a b b _  (blank = 0, a = 1, b = 2) -> a a b
        let one_hot = |i: usize| {
            let mut f = [0.0f32; 3];
            f[i] = 1.0;
            f
        };
        let logits: Vec<f32> = [1, 1, 0, 1, 2, 2, 0].iter().flat_map(|&i| one_hot(i)).collect();
        assert_eq!(greedy_ids(&logits, 3, 0), vec![1, 1, 2]);
        assert_eq!(greedy_ids(&logits, 3, 2), vec![1, 0, 1, 0]);
    }
}
