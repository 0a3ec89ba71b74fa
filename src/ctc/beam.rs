//! CTC prefix beam search without a language model (Graves 2012, §7.5; Hannun et al. 2014,
//! "First-pass large vocabulary continuous speech recognition using bi-directional recurrent
//! DNNs", algorithm 1 with the language model left out).
//!
//! Greedy decoding follows the single most probable frame-by-frame path. A labelling's
//! probability is the sum over all of its alignments, so the most probable *labelling* can be
//! another one, typically where several frames split their mass between a token and blank.
//! Prefix beam search keeps the `beam` most probable label prefixes, each with the probability
//! of its alignments so far split by whether they end in blank or not, so repeats are merged
//! exactly as CTC collapses them. With a beam wide enough to keep every prefix it is exact.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use super::align::{forced_path, greedy_path, path_spans, Span};
use crate::backend::Seqs;

/// How frame scores become a token sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Decoder {
    /// Best path: the argmax of each frame, repeats collapsed, blanks dropped.
    #[default]
    Greedy,
    /// Prefix beam search keeping this many prefixes (at least 1).
    Beam(usize),
}

impl Decoder {
    /// Token ids of one utterance from its `[frames, vocab]` scores (logits or log-probabilities).
    pub fn decode(self, logits: &[f32], vocab: usize, blank: usize) -> Vec<u32> {
        match self {
            Decoder::Greedy => super::greedy_ids(logits, vocab, blank),
            Decoder::Beam(beam) => prefix_beam_search(logits, vocab, blank, beam).into_iter().next().map(|h| h.ids).unwrap_or_default(),
        }
    }

    /// Where each token of [`Decoder::decode`]'s labelling sits: the greedy path's runs, or those
    /// of the most probable path of the beam search's labelling.
    pub fn spans(self, logits: &[f32], vocab: usize, blank: usize) -> Vec<Span> {
        let path = match self {
            Decoder::Greedy => greedy_path(logits, vocab),
            Decoder::Beam(_) => {
                let ids = self.decode(logits, vocab, blank);
                // The search only extends a prefix by a frame that can emit the token, so its
                // labelling always fits the frames.
                forced_path(logits, vocab, &ids, blank as u32).expect("a beam search labelling has an alignment")
            }
        };
        path_spans(&path, blank as u32)
    }

    /// [`Decoder::decode`] of each utterance of a packed `[seqs.total(), vocab]` batch, in
    /// parallel.
    pub fn decode_batch(self, logits: &[f32], seqs: &Seqs, vocab: usize, blank: usize) -> Vec<Vec<u32>> {
        (0..seqs.count())
            .into_par_iter()
            .map(|u| self.decode(&logits[seqs.range(u).start * vocab..seqs.range(u).end * vocab], vocab, blank))
            .collect()
    }

    /// "greedy" or "beam N", for reports.
    pub fn name(self) -> String {
        match self {
            Decoder::Greedy => "greedy".into(),
            Decoder::Beam(n) => format!("beam {n}"),
        }
    }
}

/// One labelling found by [`prefix_beam_search`] and the log-probability of all its alignments
/// the search kept (the exact `ln P(ids | x)` if no alignment of it was pruned).
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub ids: Vec<u32>,
    pub log_prob: f64,
}

/// Tokens less probable than this (in nats) below a frame's most probable one are not
/// considered at that frame: e^-20 ≈ 2e-9, far below anything that can reorder a beam.
const TOKEN_PRUNE_NATS: f64 = 20.0;

/// The `beam` (at least 1) most probable labellings of one utterance's `[frames, vocab]`
/// scores, most probable first (ties: the shorter, then the smaller ids). Zero frames give
/// the empty labelling with probability 1.
pub fn prefix_beam_search(logits: &[f32], vocab: usize, blank: usize, beam: usize) -> Vec<Hypothesis> {
    assert!(
        vocab > 0 && blank < vocab && logits.len().is_multiple_of(vocab),
        "prefix beam search: {} scores for vocab {vocab}, blank {blank}",
        logits.len()
    );
    let beam = beam.max(1);
    let mut trie = Trie::default();
    let mut kept = vec![Prefix { node: Trie::ROOT, blank: 0.0, token: f64::NEG_INFINITY }];
    let mut log_probs = vec![0.0f64; vocab];
    for frame in logits.chunks_exact(vocab) {
        log_softmax(frame, &mut log_probs);
        let floor = log_probs.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v)) - TOKEN_PRUNE_NATS;
        let mut next = Extensions::default();
        for p in &kept {
            let total = log_add(p.blank, p.token);
            let same = (p.node, SAME);
            next.add(same, total + log_probs[blank], Ends::Blank);
            let last = trie.last(p.node);
            for (c, &lp) in log_probs.iter().enumerate() {
                if c == blank || lp < floor {
                    continue;
                }
                let c = c as u32;
                let child = trie.find(p.node, c).map_or((p.node, c), |n| (n, SAME));
                if Some(c) == last {
                    // A repeat only starts a new token after a blank; without one it stays the
                    // same token (the prefix itself).
                    next.add(child, p.blank + lp, Ends::Token);
                    next.add(same, p.token + lp, Ends::Token);
                } else {
                    next.add(child, total + lp, Ends::Token);
                }
            }
        }
        kept = next.into_best(beam, &mut trie);
    }
    let mut out: Vec<Hypothesis> = kept.iter().map(|p| Hypothesis { ids: trie.ids(p.node), log_prob: log_add(p.blank, p.token) }).collect();
    out.sort_by(|a, b| b.log_prob.total_cmp(&a.log_prob).then_with(|| a.ids.len().cmp(&b.ids.len())).then_with(|| a.ids.cmp(&b.ids)));
    out
}

/// A kept prefix: its trie node, and the log-probabilities of its alignments so far that end
/// in blank and that end in its last token.
#[derive(Clone, Copy)]
struct Prefix {
    node: u32,
    blank: f64,
    token: f64,
}

/// A prefix one frame reaches: `(node, SAME)` for one already in the trie, `(parent, token)`
/// for one not yet there (made only if it is kept, so the trie grows by at most the beam a
/// frame, not by beam x vocabulary).
type Key = (u32, u32);
const SAME: u32 = u32::MAX;

/// Hashes the trie's small integer keys with one multiply per word (Fx hash): the default
/// SipHash, built to resist adversarial keys, cost more than the search itself.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_u64(b as u64));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Which of a prefix's two probabilities an extension adds to.
#[derive(Clone, Copy)]
enum Ends {
    Blank,
    Token,
}

/// The prefixes one frame reaches with their two log-probabilities, in the order first
/// reached.
#[derive(Default)]
struct Extensions {
    at: FxMap<Key, usize>,
    list: Vec<(Key, f64, f64)>,
}

impl Extensions {
    /// Adds alignments of log-probability `lp` to prefix `key` (none: no entry, so no prefix of
    /// probability 0 is ever kept).
    fn add(&mut self, key: Key, lp: f64, ends: Ends) {
        if lp == f64::NEG_INFINITY {
            return;
        }
        let list = &mut self.list;
        let i = *self.at.entry(key).or_insert_with(|| {
            list.push((key, f64::NEG_INFINITY, f64::NEG_INFINITY));
            list.len() - 1
        });
        let (_, blank, token) = &mut self.list[i];
        match ends {
            Ends::Blank => *blank = log_add(*blank, lp),
            Ends::Token => *token = log_add(*token, lp),
        }
    }

    /// The `beam` most probable, added to `trie` where new; ties go to the smaller key
    /// (deterministic, and cheap: exact ties are common where frames repeat).
    fn into_best(self, beam: usize, trie: &mut Trie) -> Vec<Prefix> {
        let mut scored: Vec<(f64, (Key, f64, f64))> = self.list.into_iter().map(|e| (log_add(e.1, e.2), e)).collect();
        let order = |a: &(f64, (Key, f64, f64)), b: &(f64, (Key, f64, f64))| b.0.total_cmp(&a.0).then_with(|| a.1 .0.cmp(&b.1 .0));
        if scored.len() > beam {
            scored.select_nth_unstable_by(beam - 1, order);
            scored.truncate(beam);
        }
        scored.sort_by(order);
        let node = |(at, token): Key, trie: &mut Trie| if token == SAME { at } else { trie.child(at, token) };
        scored.into_iter().map(|(_, (key, blank, token))| Prefix { node: node(key, trie), blank, token }).collect()
    }
}

/// Label prefixes as a tree: node 0 is the empty prefix, every other node one token appended
/// to its parent.
#[derive(Default)]
struct Trie {
    /// (parent, token) of each node but the root.
    nodes: Vec<(u32, u32)>,
    children: FxMap<(u32, u32), u32>,
}

impl Trie {
    const ROOT: u32 = 0;

    fn find(&self, parent: u32, token: u32) -> Option<u32> {
        self.children.get(&(parent, token)).copied()
    }

    fn child(&mut self, parent: u32, token: u32) -> u32 {
        let nodes = &mut self.nodes;
        *self.children.entry((parent, token)).or_insert_with(|| {
            nodes.push((parent, token));
            nodes.len() as u32
        })
    }

    fn last(&self, node: u32) -> Option<u32> {
        (node != Self::ROOT).then(|| self.nodes[node as usize - 1].1)
    }

    fn ids(&self, mut node: u32) -> Vec<u32> {
        let mut ids = Vec::new();
        while node != Self::ROOT {
            let (parent, token) = self.nodes[node as usize - 1];
            ids.push(token);
            node = parent;
        }
        ids.reverse();
        ids
    }
}

/// ln(e^a + e^b), exact at -inf.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

fn log_softmax(frame: &[f32], out: &mut [f64]) {
    let log_z = super::log_partition(frame);
    for (o, &v) in out.iter_mut().zip(frame) {
        *o = v as f64 - log_z;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    /// Every labelling's probability by brute force: the sum over all V^T frame paths that
    /// collapse to it.
    fn labelling_probabilities(logits: &[f32], vocab: usize, blank: usize) -> HashMap<Vec<u32>, f64> {
        let frames = logits.len() / vocab;
        let mut lp = vec![0.0; logits.len()];
        for (f, o) in logits.chunks_exact(vocab).zip(lp.chunks_exact_mut(vocab)) {
            log_softmax(f, o);
        }
        let mut out = HashMap::new();
        for path in 0..vocab.pow(frames as u32) {
            let (mut p, mut rest, mut ids, mut prev) = (0.0, path, Vec::new(), usize::MAX);
            for t in 0..frames {
                let c = rest % vocab;
                rest /= vocab;
                p += lp[t * vocab + c];
                if c != blank && c != prev {
                    ids.push(c as u32);
                }
                prev = c;
            }
            *out.entry(ids).or_insert(0.0) += p.exp();
        }
        out
    }

    fn random_logits(rng: &mut SplitMix, frames: usize, vocab: usize, spread: f32) -> Vec<f32> {
        (0..frames * vocab).map(|_| rng.symmetric() * spread).collect()
    }

    /// A beam wide enough to keep every prefix finds every labelling with its exact probability
    /// (the brute-force sum over paths), most probable first.
    #[test]
    fn an_unpruned_beam_gives_every_labelling_its_exact_probability() {
        let mut rng = SplitMix(7);
        for (frames, vocab, blank) in [(5, 3, 0), (6, 3, 2), (4, 4, 1), (7, 2, 0)] {
            let logits = random_logits(&mut rng, frames, vocab, 2.0);
            let want = labelling_probabilities(&logits, vocab, blank);
            let got = prefix_beam_search(&logits, vocab, blank, 10_000);
            assert_eq!(got.len(), want.len(), "{frames} frames, vocab {vocab}: one hypothesis per labelling");
            for h in &got {
                let p = want[&h.ids];
                assert!((h.log_prob.exp() - p).abs() <= 1e-12 + 1e-9 * p, "{:?}: {} vs brute force {p}", h.ids, h.log_prob.exp());
            }
            assert!(got.windows(2).all(|w| w[0].log_prob >= w[1].log_prob), "most probable first");
            let best = want.values().fold(0.0f64, |m, &p| m.max(p));
            assert!((got[0].log_prob.exp() - best).abs() <= 1e-12, "the top hypothesis is the most probable labelling");
        }
    }

    /// Where frames split their mass between a token and blank, the most probable labelling is
    /// not the best path's: beam search finds it, greedy cannot.
    #[test]
    fn finds_the_labelling_greedy_decoding_misses() {
        // Blank 0. Each of 3 frames: blank 0.4, token 1 0.3, token 2 0.3 (ln of those as logits).
        // The best path is all blank (the empty labelling, 0.4^3 = 0.064); the labelling [1]
        // gathers every path of 1s and blanks with one run of 1s: 3 x 0.3 x 0.4^2 (one 1) +
        // 2 x 0.3^2 x 0.4 (two) + 0.3^3 = 0.243.
        let frame = [0.4f32.ln(), 0.3f32.ln(), 0.3f32.ln()];
        let logits: Vec<f32> = frame.iter().cycle().take(9).copied().collect();
        assert_eq!(Decoder::Greedy.decode(&logits, 3, 0), Vec::<u32>::new());
        let best = &prefix_beam_search(&logits, 3, 0, 8)[0];
        assert!(best.ids == [1] || best.ids == [2], "{:?}", best.ids);
        assert!((best.log_prob.exp() - 0.243).abs() < 1e-6, "{}", best.log_prob.exp());
        // The two tokens tie; the smaller id wins, as documented.
        assert_eq!(Decoder::Beam(8).decode(&logits, 3, 0), vec![1]);
        // Its span: the best single path of [1] puts it on one frame (ties: the first).
        let spans = Decoder::Beam(8).spans(&logits, 3, 0);
        assert_eq!(spans.iter().map(|s| s.token).collect::<Vec<_>>(), [1]);
        assert_eq!(spans[0].frames.len(), 1);
        assert!(Decoder::Greedy.spans(&logits, 3, 0).is_empty());
    }

    #[test]
    fn spans_hold_the_decoded_tokens_in_order() {
        let mut rng = SplitMix(11);
        for decoder in [Decoder::Greedy, Decoder::Beam(4)] {
            let logits = random_logits(&mut rng, 60, 5, 3.0);
            let spans = decoder.spans(&logits, 5, 0);
            assert_eq!(spans.iter().map(|s| s.token).collect::<Vec<_>>(), decoder.decode(&logits, 5, 0), "{decoder:?}");
            assert!(spans.windows(2).all(|w| w[0].frames.end <= w[1].frames.start && !w[0].frames.is_empty()));
        }
    }

    /// Prefix scores agree with the CTC loss (checked against PyTorch elsewhere): the loss of
    /// the top labelling is minus its log-probability once the beam keeps all its alignments,
    /// and a narrow beam's sum, missing some, can only fall short of it.
    #[test]
    fn the_top_labelling_scores_as_the_ctc_loss_does() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::{Backend, Seqs};
        use crate::ctc::{ctc_loss, CtcTargets, Reduction};
        use crate::tensor::Tensor;
        let mut rng = SplitMix(3);
        let be = CpuBackend;
        // 8 frames over 3 tokens make at most 3^0 + ... + 3^8 = 9841 prefixes: a beam of 10000
        // keeps them all. 40 frames and a beam of 2 keep a small part.
        for (frames, beam) in [(8, 10_000), (40, 2)] {
            let vocab = 4;
            let logits = random_logits(&mut rng, frames, vocab, 3.0);
            let t = be.upload(&Tensor::from_vec(logits.clone(), &[frames, vocab])).unwrap();
            let best = prefix_beam_search(&logits, vocab, 0, beam).remove(0);
            let targets = CtcTargets { labels: vec![best.ids.clone()], blank: 0, zero_infinity: false };
            let exact = -ctc_loss(&be, &t, &Seqs::new(vec![frames]), &targets, Reduction::Sum).unwrap().losses[0] as f64;
            if beam == 10_000 {
                assert!((exact - best.log_prob).abs() < 1e-5 * exact.abs(), "CTC {exact} vs beam {}", best.log_prob);
            } else {
                assert!(best.log_prob <= exact + 1e-5 * exact.abs(), "a pruned sum {} above the CTC's {exact}", best.log_prob);
            }
        }
    }

    #[test]
    fn no_frames_decode_to_nothing_and_a_beam_of_one_still_decodes() {
        assert_eq!(prefix_beam_search(&[], 3, 0, 4), vec![Hypothesis { ids: vec![], log_prob: 0.0 }]);
        let logits: Vec<f32> = [[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]].concat();
        assert_eq!(Decoder::Beam(1).decode(&logits, 3, 0), vec![1, 2]);
        assert_eq!(Decoder::Greedy.decode(&logits, 3, 0), vec![1, 2]);
    }
}
