//! Where each decoded token sits in time: the frame path behind a labelling, and the runs of
//! frames it gives each token (transformers' CTC tokenizer calls them character offsets).
//!
//! Greedy decoding has its path already: the argmax of each frame. For any other labelling
//! (a beam search result, or a known transcript) the path is the most probable one of all that
//! collapse to it, found by Viterbi over the usual CTC states (blank, label 1, blank, label 2,
//! ..., blank). The per-frame normalisation of log-softmax adds the same amount to every path,
//! so raw logits give the same path.

use std::ops::Range;

/// A run of frames the path spends on one token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub token: u32,
    pub frames: Range<usize>,
}

/// The argmax token of each frame (the first maximum on ties, as torch.argmax).
pub fn greedy_path(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits.chunks_exact(vocab).map(|f| f.iter().enumerate().fold(0, |b, (i, &v)| if v > f[b] { i } else { b }) as u32).collect()
}

/// The runs of one token along a frame path, blanks dropped: collapsing them gives the labelling.
pub fn path_spans(path: &[u32], blank: u32) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for (t, &token) in path.iter().enumerate() {
        match spans.last_mut() {
            Some(s) if s.token == token && s.frames.end == t => s.frames.end = t + 1,
            _ if token == blank => {}
            _ => spans.push(Span { token, frames: t..t + 1 }),
        }
    }
    spans
}

/// The most probable frame path that collapses to `labels`, or None if the frames are too few
/// for them (each repeat needs a blank between). Memory stays O(√T · S): the forward pass keeps
/// its scores every √T frames, and the backtrace recomputes one stretch at a time.
pub fn forced_path(logits: &[f32], vocab: usize, labels: &[u32], blank: u32) -> Option<Vec<u32>> {
    let frames = logits.len() / vocab;
    let states: Vec<u32> = std::iter::once(blank).chain(labels.iter().flat_map(|&l| [l, blank])).collect();
    let n = states.len();
    if frames == 0 {
        return labels.is_empty().then(Vec::new);
    }
    // From state s, a path may come from s, s - 1, or s - 2 when that skips a blank between
    // different labels.
    let may_skip: Vec<bool> = (0..n).map(|s| s >= 2 && states[s] != blank && states[s] != states[s - 2]).collect();
    let score = |t: usize, s: usize| logits[t * vocab + states[s] as usize] as f64;
    let step = |t: usize, prev: &[f64], next: &mut [f64], back: Option<&mut [u8]>| {
        let mut back = back;
        for s in 0..n {
            let mut best = (prev[s], 0u8);
            if s >= 1 && prev[s - 1] > best.0 {
                best = (prev[s - 1], 1);
            }
            if may_skip[s] && prev[s - 2] > best.0 {
                best = (prev[s - 2], 2);
            }
            next[s] = best.0 + score(t, s);
            if let Some(b) = back.as_deref_mut() {
                b[s] = best.1;
            }
        }
    };
    let mut first = vec![f64::NEG_INFINITY; n];
    first[0] = score(0, 0);
    if n > 1 {
        first[1] = score(0, 1);
    }
    let stretch = (frames as f64).sqrt().ceil() as usize;
    // Scores at frames 0, stretch, 2 stretch, ...
    let mut checkpoints = vec![first];
    let mut row = checkpoints[0].clone();
    let mut next = vec![0.0; n];
    for t in 1..frames {
        step(t, &row, &mut next, None);
        std::mem::swap(&mut row, &mut next);
        if t % stretch == 0 {
            checkpoints.push(row.clone());
        }
    }
    let ends = [n - 1, n.saturating_sub(2)];
    let mut state = *ends.iter().max_by(|&&a, &&b| row[a].total_cmp(&row[b]))?;
    if row[state] == f64::NEG_INFINITY {
        return None;
    }
    let mut path = vec![0u32; frames];
    path[frames - 1] = states[state];
    // Backtrace stretch by stretch, from the last frame down to frame 0.
    let mut back = vec![0u8; stretch * n];
    let mut end = frames - 1;
    while end > 0 {
        let start = (end - 1) / stretch * stretch;
        let mut row = checkpoints[start / stretch].clone();
        for t in start + 1..=end {
            step(t, &row, &mut next, Some(&mut back[(t - start - 1) * n..(t - start) * n]));
            std::mem::swap(&mut row, &mut next);
        }
        for t in (start + 1..=end).rev() {
            state -= back[(t - start - 1) * n + state] as usize;
            path[t - 1] = states[state];
        }
        end = start;
    }
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path over `frames` frames and `vocab` tokens.
    fn all_paths(frames: usize, vocab: usize) -> impl Iterator<Item = Vec<u32>> {
        (0..vocab.pow(frames as u32)).map(move |mut i| {
            (0..frames)
                .map(|_| {
                    let t = (i % vocab) as u32;
                    i /= vocab;
                    t
                })
                .collect()
        })
    }

    fn collapse(path: &[u32], blank: u32) -> Vec<u32> {
        path_spans(path, blank).into_iter().map(|s| s.token).collect()
    }

    fn path_score(logits: &[f32], vocab: usize, path: &[u32]) -> f64 {
        path.iter().enumerate().map(|(t, &k)| logits[t * vocab + k as usize] as f64).sum()
    }

    #[test]
    fn forced_path_is_the_best_path_of_its_labelling_by_brute_force() {
        let (vocab, frames) = (3, 7);
        let mut rng = crate::rng::SplitMix(5);
        for blank in [0u32, 2] {
            for _ in 0..20 {
                let logits: Vec<f32> = (0..frames * vocab).map(|_| rng.symmetric() * 4.0).collect();
                // Best path score of each labelling reachable in 7 frames.
                let mut best: std::collections::HashMap<Vec<u32>, f64> = Default::default();
                for p in all_paths(frames, vocab) {
                    let e = best.entry(collapse(&p, blank)).or_insert(f64::NEG_INFINITY);
                    *e = e.max(path_score(&logits, vocab, &p));
                }
                for (labels, &score) in &best {
                    let path = forced_path(&logits, vocab, labels, blank).unwrap();
                    assert_eq!(&collapse(&path, blank), labels);
                    assert!((path_score(&logits, vocab, &path) - score).abs() < 1e-9, "{labels:?}");
                }
                // The greedy path is the best path of the greedy labelling.
                let greedy = greedy_path(&logits, vocab);
                let forced = forced_path(&logits, vocab, &collapse(&greedy, blank), blank).unwrap();
                assert_eq!(path_score(&logits, vocab, &forced), path_score(&logits, vocab, &greedy));
            }
            // Too few frames: a repeat needs a blank between.
            let logits = vec![0.0f32; 2 * vocab];
            let (a, b) = if blank == 0 { (1, 2) } else { (0, 1) };
            assert_eq!(forced_path(&logits, vocab, &[a, a], blank), None);
            assert!(forced_path(&logits, vocab, &[a, b], blank).is_some());
        }
    }

    #[test]
    fn long_inputs_backtrace_across_stretches() {
        // 1000 frames (stretches of 32), a labelling spread evenly: the path follows the peaks.
        let (vocab, frames) = (5, 1000);
        let labels: Vec<u32> = (0..100).map(|i| 1 + (i % 4) as u32).collect();
        let mut logits = vec![0.0f32; frames * vocab];
        for t in 0..frames {
            let k = if t % 10 < 3 { labels[t / 10] } else { 0 };
            logits[t * vocab + k as usize] = 5.0;
        }
        let path = forced_path(&logits, vocab, &labels, 0).unwrap();
        assert_eq!(path, greedy_path(&logits, vocab));
        let spans = path_spans(&path, 0);
        assert_eq!(spans.len(), 100);
        assert!(spans.iter().enumerate().all(|(i, s)| s.frames == (10 * i..10 * i + 3)));
    }

    #[test]
    fn spans_are_runs_without_blanks() {
        // a a _ a b b _ : a over 0..2, a over 3..4, b over 4..6.
        let spans = path_spans(&[1, 1, 0, 1, 2, 2, 0], 0);
        let want = [(1, 0..2), (1, 3..4), (2, 4..6)];
        assert_eq!(spans, want.map(|(token, frames)| Span { token, frames }));
    }
}
