//! The S3-Router mask rule, as the official code (`GetSubnet` in `Linear_ST`) runs it: one real
//! score per weight; per matrix, the `floor(sparsity * numel)` entries of smallest |score| are
//! dropped and the rest kept; the effective weight is `W * M`; the straight-through estimator
//! passes the mask's gradient to |score|, so `dL/dscore = dL/dW_eff * W * sign(score)`.
//! (The training loop around it comes with `engine train`.)

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::rng::SplitMix;

/// Score initialisation (`--init`), after the official `init_score` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// Kaiming-uniform values re-placed so their |value| order follows |W|: the first mask is the
    /// magnitude mask, with small random gaps between neighbours (`weight_rank`, the default).
    WeightRank,
    /// Binary: 1 on the top-k |W|, 0 elsewhere (`weight_magnitude`).
    Magnitude,
    /// score = W (`weight_magnitude_with_scale`, S3-Router-P).
    MagnitudeScaled,
    /// Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Random,
}

/// Fails unless `0 <= sparsity < 1`.
pub fn check_sparsity(sparsity: f64) -> Result<()> {
    ensure!((0.0..1.0).contains(&sparsity), "sparsity {sparsity} is outside [0, 1) (it is the fraction of weights dropped)");
    Ok(())
}

/// How many of `numel` weights a matrix keeps: `numel - floor(sparsity * numel)`.
pub fn kept(numel: usize, sparsity: f64) -> usize {
    numel - (sparsity * numel as f64).floor() as usize
}

/// The keep-mask of one matrix: the `kept(..)` entries of largest |score|. Ties in |score| are
/// broken by position (the earlier entry is dropped first), so masks are reproducible.
pub fn top_k_mask(scores: &[f32], sparsity: f64) -> Vec<bool> {
    keep_largest(scores, kept(scores.len(), sparsity))
}

/// The keep-mask holding the `k` entries of largest |score| (ties as in [`top_k_mask`]).
pub fn keep_largest(scores: &[f32], k: usize) -> Vec<bool> {
    let drop = scores.len() - k.min(scores.len());
    let mut keep = vec![true; scores.len()];
    if drop == 0 {
        return keep;
    }
    let mut order = magnitude_keys(scores);
    order.select_nth_unstable(drop - 1);
    for &key in &order[..drop] {
        keep[position(key)] = false;
    }
    keep
}

/// Global magnitude pruning (PARP, OMP): over all `tensors` together, the
/// `floor(sparsity * total)` entries of smallest |w| are dropped, ties broken by tensor order and
/// then position (the earlier is dropped first), so the global sparsity is exact.
pub fn global_magnitude_keep(tensors: &[&[f32]], sparsity: f64) -> Vec<Vec<bool>> {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let to_drop = (sparsity * total as f64).floor() as usize;
    let mut keep: Vec<Vec<bool>> = tensors.iter().map(|t| vec![true; t.len()]).collect();
    if to_drop == 0 {
        return keep;
    }
    // The threshold: the to_drop-th smallest magnitude.
    let mut magnitudes: Vec<f32> = tensors.iter().flat_map(|t| t.iter().map(|v| v.abs())).collect();
    let threshold = *magnitudes.select_nth_unstable_by(to_drop - 1, f32::total_cmp).1;
    drop(magnitudes);
    let below = |v: &f32| v.abs().total_cmp(&threshold).is_lt();
    let mut ties_to_drop = to_drop - tensors.iter().map(|t| t.iter().filter(|v| below(v)).count()).sum::<usize>();
    for (t, k) in tensors.iter().zip(&mut keep) {
        for (v, k) in t.iter().zip(k.iter_mut()) {
            if below(v) {
                *k = false;
            } else if ties_to_drop > 0 && v.abs().total_cmp(&threshold).is_eq() {
                *k = false;
                ties_to_drop -= 1;
            }
        }
    }
    keep
}

/// One key per entry that orders as |value|, then position (a total order: NaN above infinity):
/// the bits of |value| (which order as the non-negative floats they are) above the position, so
/// sorting and selecting compare plain integers instead of indexing `v` through a comparator.
fn magnitude_keys(v: &[f32]) -> Vec<u64> {
    assert!(u32::try_from(v.len()).is_ok(), "a matrix of {} entries exceeds the 2^32 a key can address", v.len());
    v.iter().enumerate().map(|(i, x)| (u64::from(x.abs().to_bits()) << 32) | i as u64).collect()
}

/// The position a [`magnitude_keys`] key stands for.
fn position(key: u64) -> usize {
    (key & 0xffff_ffff) as usize
}

/// Initial scores for a weight matrix with `fan_in` inputs (see [`Init`]).
pub fn init_scores(weight: &[f32], fan_in: usize, init: Init, sparsity: f64, rng: &mut SplitMix) -> Vec<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    match init {
        Init::Random => (0..weight.len()).map(|_| rng.symmetric() * bound).collect(),
        Init::MagnitudeScaled => weight.to_vec(),
        Init::Magnitude => top_k_mask(weight, sparsity).into_iter().map(|k| k as u8 as f32).collect(),
        Init::WeightRank => {
            let random: Vec<f32> = (0..weight.len()).map(|_| rng.symmetric() * bound).collect();
            // s_new[argsort |W|] = s_old[argsort |s_old|]: the i-th smallest |W| receives the
            // i-th smallest |score| (ties by position, as top_k_mask breaks them).
            let by_abs = |v: &[f32]| {
                let mut keys = magnitude_keys(v);
                keys.par_sort_unstable();
                keys
            };
            let (w_order, s_order) = rayon::join(|| by_abs(weight), || by_abs(&random));
            let mut scores = vec![0.0; weight.len()];
            for (&wk, &sk) in w_order.iter().zip(&s_order) {
                scores[position(wk)] = random[position(sk)];
            }
            scores
        }
    }
}

/// Straight-through gradient of the scores, `dL/dW_eff * W * sign(score)`, written over
/// `grad` (which holds `dL/dW_eff`): the GEMM that produces `dL/dW_eff` finishes it in place.
pub fn score_grad(grad: &mut [f32], weight: &[f32], scores: &[f32]) {
    for ((g, w), s) in grad.iter_mut().zip(weight).zip(scores) {
        *g *= w * s.signum() * (*s != 0.0) as u8 as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_count_is_exact_per_matrix() {
        let mut rng = SplitMix(3);
        for (numel, s) in [(2_359_296, 0.1), (1000, 0.333), (7, 0.5), (10, 0.0), (10, 0.99)] {
            let scores: Vec<f32> = (0..numel).map(|_| rng.symmetric()).collect();
            let keep = top_k_mask(&scores, s);
            assert_eq!(keep.iter().filter(|&&k| k).count(), numel - (s * numel as f64).floor() as usize, "{numel} {s}");
            // Every kept |score| is at least every dropped one.
            let min_kept = scores.iter().zip(&keep).filter(|(_, &k)| k).map(|(v, _)| v.abs()).fold(f32::INFINITY, f32::min);
            let max_dropped = scores.iter().zip(&keep).filter(|(_, &k)| !k).map(|(v, _)| v.abs()).fold(0.0, f32::max);
            assert!(min_kept >= max_dropped);
        }
    }

    #[test]
    fn magnitude_keys_order_as_magnitude_then_position() {
        let mut rng = SplitMix(5);
        let mut v: Vec<f32> = (0..5000).map(|_| (rng.symmetric() * 8.0).round() / 4.0).collect();
        v.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MIN_POSITIVE / 4.0, -1e30]);
        let mut want: Vec<usize> = (0..v.len()).collect();
        want.sort_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()).then(a.cmp(&b)));
        let mut keys = magnitude_keys(&v);
        keys.sort_unstable();
        assert_eq!(keys.into_iter().map(position).collect::<Vec<_>>(), want);
    }

    #[test]
    fn ties_are_broken_by_position() {
        // Six equal scores, half dropped: the first three go.
        assert_eq!(top_k_mask(&[1.0, -1.0, 1.0, 1.0, -1.0, 1.0], 0.5), vec![false, false, false, true, true, true]);
    }

    #[test]
    fn each_init_scheme_starts_from_its_specified_mask() {
        let mut rng = SplitMix(9);
        let (out, fan_in) = (64, 48);
        let w: Vec<f32> = (0..out * fan_in).map(|_| rng.symmetric()).collect();
        let magnitude_mask = top_k_mask(&w, 0.1);
        let rank = init_scores(&w, fan_in, Init::WeightRank, 0.1, &mut rng);
        assert_eq!(top_k_mask(&rank, 0.1), magnitude_mask, "weight-rank starts at the magnitude mask");
        let bound = 1.0 / (fan_in as f32).sqrt();
        assert!(rank.iter().all(|v| v.abs() <= bound) && rank.iter().any(|v| *v < 0.0));
        let bin = init_scores(&w, fan_in, Init::Magnitude, 0.1, &mut rng);
        assert!(bin.iter().zip(&magnitude_mask).all(|(s, &k)| *s == k as u8 as f32));
        assert_eq!(top_k_mask(&bin, 0.1), magnitude_mask);
        assert_eq!(init_scores(&w, fan_in, Init::MagnitudeScaled, 0.1, &mut rng), w);
        let random = init_scores(&w, fan_in, Init::Random, 0.1, &mut rng);
        assert!(random.iter().all(|v| v.abs() <= bound));
        assert_ne!(top_k_mask(&random, 0.1), magnitude_mask);
    }

    #[test]
    fn straight_through_gradient_follows_the_score_sign() {
        let mut grad = [2.0, 2.0, 2.0, 2.0];
        score_grad(&mut grad, &[3.0, 3.0, 3.0, 3.0], &[0.5, -0.5, 0.0, -0.0]);
        assert_eq!(grad, [6.0, -6.0, 0.0, 0.0]);
    }

    #[test]
    fn sparsity_outside_unit_interval_is_refused() {
        assert!(check_sparsity(0.1).is_ok() && check_sparsity(0.0).is_ok());
        for s in [1.0, -0.1, 1.5, f64::NAN] {
            assert!(check_sparsity(s).unwrap_err().to_string().contains("outside [0, 1)"));
        }
    }

    #[test]
    fn global_magnitude_pruning_is_exact_and_global() {
        // Ties at the threshold (|0.5| four times) are broken by tensor, then position.
        let (a, b) = (vec![0.1f32, -0.5, 3.0, 0.5], vec![-0.05f32, 0.5, 2.0, 0.5, 7.0]);
        let keep = global_magnitude_keep(&[&a, &b], 0.5);
        assert_eq!(keep, vec![vec![false, false, true, false], vec![false, true, true, true, true]]);
        // Global, not per tensor: a tensor of small weights loses more than the sparsity.
        let (small, large): (Vec<f32>, Vec<f32>) = ((1..=100).map(|i| i as f32 * 1e-3).collect(), (1..=100).map(|i| i as f32).collect());
        let keep = global_magnitude_keep(&[&small, &large], 0.3);
        assert_eq!(keep[0].iter().filter(|&&k| !k).count(), 60);
        assert!(keep[1].iter().all(|&k| k));
        assert!(global_magnitude_keep(&[&a], 0.0).iter().flatten().all(|&k| k));
    }
}
