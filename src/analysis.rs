//! Mask analysis: how a learned mask set relates to the weights it covers.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::mask;
use crate::model::checkpoint::Checkpoint;
use crate::model::masks::{MaskSet, PackedMasks};
use crate::router::keep_largest;

/// One masked matrix against its weights.
#[derive(Clone, Debug)]
pub struct MatrixStats {
    pub name: String,
    /// Encoder layer index, read from the name.
    pub layer: Option<usize>,
    pub numel: usize,
    pub kept: usize,
    /// Weights whose keep bit differs from the magnitude mask with the same kept count (the
    /// mask S3-Router's default `weight-rank` initialisation starts from).
    pub flipped: usize,
    /// Weights whose keep bit differs from the run's initial mask, when it is known.
    pub flipped_from_initial: Option<usize>,
}

impl MatrixStats {
    /// Fraction of the matrix's weights flipped from the magnitude mask.
    pub fn flipped_fraction(&self) -> f64 {
        self.flipped as f64 / self.numel as f64
    }
}

/// [`MatrixStats`] summed over a group of matrices (a layer, or all of them), as shares.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSummary {
    pub name: String,
    pub numel: usize,
    pub sparsity: f64,
    /// Share of the weights whose bit differs from their matrix's magnitude mask.
    pub from_magnitude: f64,
    /// Share flipped from the initial masks, when every matrix's is known.
    pub from_initial: Option<f64>,
}

impl StatsSummary {
    pub fn of(name: &str, group: &[&MatrixStats]) -> StatsSummary {
        let numel: usize = group.iter().map(|s| s.numel).sum();
        let share = |n: usize| n as f64 / numel.max(1) as f64;
        StatsSummary {
            name: name.to_string(),
            numel,
            sparsity: 1.0 - share(group.iter().map(|s| s.kept).sum()),
            from_magnitude: share(group.iter().map(|s| s.flipped).sum()),
            from_initial: group.iter().map(|s| s.flipped_from_initial).sum::<Option<usize>>().map(share),
        }
    }

    /// One row per matrix, then per layer (`layer N`), then `overall`.
    pub fn rows(stats: &[MatrixStats]) -> Vec<StatsSummary> {
        let mut rows: Vec<StatsSummary> = stats.iter().map(|s| StatsSummary::of(&s.name, &[s])).collect();
        let layers: std::collections::BTreeSet<usize> = stats.iter().filter_map(|s| s.layer).collect();
        for l in layers {
            let group: Vec<&MatrixStats> = stats.iter().filter(|s| s.layer == Some(l)).collect();
            rows.push(StatsSummary::of(&format!("layer {l}"), &group));
        }
        rows.push(StatsSummary::of("overall", &stats.iter().collect::<Vec<_>>()));
        rows
    }
}

/// Statistics of every mask of `set` (in layer order) against the weights in model folder
/// `model`, and against `initial` (the run's starting masks) where given.
pub fn mask_stats(model: &Path, set: &MaskSet, initial: Option<&PackedMasks>) -> Result<Vec<MatrixStats>> {
    let ck = Checkpoint::open_dir(model)?;
    let stats = set
        .masks
        .par_iter()
        .map(|(name, (shape, bits))| {
            let w = ck
                .tensor(name)
                .with_context(|| format!("{}: mask \"{name}\" names no weight of {}", set.dir.display(), model.display()))?;
            anyhow::ensure!(
                w.shape() == shape.as_slice(),
                "{}: mask \"{name}\" is for {shape:?}, the weight is {:?}",
                set.dir.display(),
                w.shape()
            );
            let numel = w.numel();
            let keep = mask::unpack(bits, numel);
            let kept = keep.iter().filter(|&&k| k).count();
            let magnitude = keep_largest(&w.to_vec()?, kept);
            let flipped = keep.iter().zip(&magnitude).filter(|(a, b)| a != b).count();
            let flipped_from_initial = match initial.map(|i| i.get(name)) {
                None => None,
                Some(Some((s, start))) if s == shape => Some(bits.iter().zip(start).map(|(a, b)| (a ^ b).count_ones() as usize).sum()),
                Some(_) => anyhow::bail!("the initial masks do not cover \"{name}\" with shape {shape:?}"),
            };
            Ok(MatrixStats { name: name.clone(), layer: layer_of(name), numel, kept, flipped, flipped_from_initial })
        })
        .collect::<Result<Vec<_>>>();
    let mut stats = stats?;
    // Distances from the magnitude mask of other weights would be silently meaningless.
    set.check_base(&ck, model)?;
    stats.sort_by_key(|s| (s.layer, s.name.clone()));
    Ok(stats)
}

/// `|a ∧ b|`, `|a|` and `|b|` of two packed masks (LSB-first bytes, same length), by popcount.
pub fn overlap_counts(a: &[u8], b: &[u8]) -> (u64, u64, u64) {
    a.iter().zip(b).fold((0, 0, 0), |(both, na, nb), (&x, &y)| {
        (both + (x & y).count_ones() as u64, na + x.count_ones() as u64, nb + y.count_ones() as u64)
    })
}

/// Cosine similarity of binary masks from their counts: `|a ∧ b| / sqrt(|a| |b|)`.
pub fn cosine(both: u64, na: u64, nb: u64) -> f64 {
    if na == 0 || nb == 0 {
        return 0.0;
    }
    both as f64 / ((na as f64) * (nb as f64)).sqrt()
}

/// Mask similarity of two mask sets over the same matrices.
#[derive(Clone, Debug)]
pub struct PairSimilarity {
    pub a: String,
    pub b: String,
    /// Per matrix (in layer order): (name, cosine, chance level).
    pub matrices: Vec<(String, f64, f64)>,
    /// Per encoder layer (all its masked matrices together): (layer, cosine, chance level).
    pub layers: Vec<(usize, f64, f64)>,
    pub overall: (f64, f64),
}

/// Cosine similarity between every pair of `sets` (labelled), per matrix, per layer and overall,
/// each with its chance level: for independent masks keeping fractions `ka` and `kb`, the expected
/// cosine is `sqrt(ka kb)`.
pub fn compare(sets: &[(String, MaskSet)]) -> Result<Vec<PairSimilarity>> {
    anyhow::ensure!(sets.len() >= 2, "compare needs at least two mask sets");
    let (first_name, first) = &sets[0];
    for (name, s) in &sets[1..] {
        let names = |m: &MaskSet| m.masks.iter().map(|(n, (shape, _))| (n.clone(), shape.clone())).collect::<Vec<_>>();
        anyhow::ensure!(
            names(s) == names(first),
            "mask sets {first_name} and {name} cover different matrices (or shapes): masks from different models or --mask choices"
        );
        if let (Some(a), Some(b)) = (&first.base, &s.base) {
            anyhow::ensure!(a == b, "mask sets {first_name} and {name} were learned over different weights (base_fingerprint {a} and {b})");
        }
    }
    let mut out = Vec::new();
    for i in 0..sets.len() {
        for j in i + 1..sets.len() {
            let (a, b) = (&sets[i].1, &sets[j].1);
            let mut matrices = Vec::new();
            let mut by_layer: std::collections::BTreeMap<usize, (u64, u64, u64, u64)> = Default::default();
            let mut total = (0, 0, 0, 0);
            for ((name, (shape, bits_a)), (_, (_, bits_b))) in a.masks.iter().zip(&b.masks) {
                let numel: usize = shape.iter().product();
                let (both, na, nb) = overlap_counts(bits_a, bits_b);
                let chance = ((na as f64 / numel as f64) * (nb as f64 / numel as f64)).sqrt();
                matrices.push((name.clone(), cosine(both, na, nb), chance));
                let add = |t: &mut (u64, u64, u64, u64)| *t = (t.0 + both, t.1 + na, t.2 + nb, t.3 + numel as u64);
                add(&mut total);
                if let Some(l) = layer_of(name) {
                    add(by_layer.entry(l).or_default());
                }
            }
            // Layer order (names sort "layers.10" before "layers.2").
            matrices.sort_by_key(|(name, _, _)| (layer_of(name), name.clone()));
            let summary = |t: (u64, u64, u64, u64)| (cosine(t.0, t.1, t.2), ((t.1 as f64 / t.3 as f64) * (t.2 as f64 / t.3 as f64)).sqrt());
            let layers = by_layer
                .into_iter()
                .map(|(l, t)| {
                    let (c, chance) = summary(t);
                    (l, c, chance)
                })
                .collect();
            out.push(PairSimilarity { a: sets[i].0.clone(), b: sets[j].0.clone(), matrices, layers, overall: summary(total) });
        }
    }
    Ok(out)
}

/// The encoder layer a weight name belongs to.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("wav2vec2.encoder.layers.")?.split('.').next()?.parse().ok()
}

/// Cosine similarity of two phoneme inventories as binary vectors over their union.
pub fn inventory_cosine(a: &std::collections::BTreeSet<String>, b: &std::collections::BTreeSet<String>) -> f64 {
    cosine(a.intersection(b).count() as u64, a.len() as u64, b.len() as u64)
}

/// Pearson correlation of `x` and `y` (NaN when either is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// Ranks with ties averaged (1-based).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        order[i..=j].iter().for_each(|&k| r[k] = avg);
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson on tie-averaged ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Two-sided permutation p-value of the Pearson correlation between two symmetric `n x n`
/// similarity matrices over their upper triangles (a Mantel test): the items of one matrix are
/// relabelled at random `rounds` times; p = (1 + #{|r_perm| >= |r|}) / (1 + rounds).
pub fn mantel_p(a: &[Vec<f64>], b: &[Vec<f64>], rounds: usize, seed: u64) -> f64 {
    let n = a.len();
    let upper = |m: &[Vec<f64>], p: &[usize]| -> Vec<f64> {
        (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).map(|(i, j)| m[p[i]][p[j]]).collect()
    };
    let id: Vec<usize> = (0..n).collect();
    let x = upper(a, &id);
    let observed = pearson(&x, &upper(b, &id)).abs();
    let mut rng = crate::rng::SplitMix(seed);
    let mut perm = id.clone();
    let mut hits = 0;
    for _ in 0..rounds {
        rng.shuffle(&mut perm);
        if pearson(&x, &upper(b, &perm)).abs() >= observed - 1e-12 {
            hits += 1;
        }
    }
    (1 + hits) as f64 / (1 + rounds) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets that record the weights they were learned over are compared only over the same ones.
    #[test]
    fn compare_refuses_sets_learned_over_different_weights() {
        let set = |base: &str| MaskSet {
            dir: std::path::PathBuf::from(base),
            masks: PackedMasks::from([("w".to_string(), (vec![2, 4], vec![0b1011_0110]))]),
            sparsity: Some(0.5),
            base: Some(base.to_string()),
            target_lang: None,
            head: None,
            blank: None,
        };
        assert!(compare(&[("a".into(), set("00ff")), ("b".into(), set("00ff"))]).is_ok());
        let e = compare(&[("a".into(), set("00ff")), ("b".into(), set("ff00"))]).unwrap_err().to_string();
        assert!(e.contains("learned over different weights") && e.contains("00ff") && e.contains("ff00"), "{e}");
    }

    #[test]
    fn popcount_overlap_equals_the_unpacked_count() {
        let mut rng = crate::rng::SplitMix(4);
        let a: Vec<bool> = (0..1003).map(|_| !rng.next_u64().is_multiple_of(10)).collect();
        let b: Vec<bool> = (0..1003).map(|_| !rng.next_u64().is_multiple_of(4)).collect();
        let (both, na, nb) = overlap_counts(&mask::pack(&a), &mask::pack(&b));
        assert_eq!(both as usize, a.iter().zip(&b).filter(|(x, y)| **x && **y).count());
        assert_eq!((na as usize, nb as usize), (a.iter().filter(|x| **x).count(), b.iter().filter(|x| **x).count()));
    }

    #[test]
    fn layers_sort_numerically() {
        let mut names = vec!["wav2vec2.encoder.layers.10.x", "wav2vec2.encoder.layers.2.x", "other"];
        names.sort_by_key(|n| (layer_of(n), n.to_string()));
        assert_eq!(names, vec!["other", "wav2vec2.encoder.layers.2.x", "wav2vec2.encoder.layers.10.x"]);
    }

    #[test]
    fn cosine_of_hand_built_masks() {
        // a = 1100, b = 1010: one shared bit of two each.
        assert!((cosine(1, 2, 2) - 0.5).abs() < 1e-12);
        assert_eq!(cosine(3, 3, 3), 1.0);
        assert_eq!(cosine(0, 0, 5), 0.0);
        let inv = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<std::collections::BTreeSet<_>>();
        assert!((inventory_cosine(&inv(&["a", "b", "c"]), &inv(&["b", "c", "d", "e"])) - 2.0 / 12f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn correlations_match_known_values() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.0, 5.0, 4.0, 5.0];
        // scipy.stats.pearsonr: 0.7745966692414834; spearmanr: 0.7378647873726218.
        assert!((pearson(&x, &y) - 0.774_596_669_241_483_4).abs() < 1e-12);
        assert!((spearman(&x, &y) - 0.737_864_787_372_621_8).abs() < 1e-12);
        assert!((spearman(&x, &[5.0, 6.0, 7.0, 8.0, 70.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mantel_p_separates_related_from_unrelated_matrices() {
        let n = 7;
        let mut rng = crate::rng::SplitMix(8);
        let pts: Vec<f64> = (0..n).map(|_| rng.symmetric() as f64).collect();
        let sim = |f: &dyn Fn(usize, usize) -> f64| (0..n).map(|i| (0..n).map(|j| f(i, j)).collect()).collect::<Vec<Vec<f64>>>();
        let a = sim(&|i, j| -(pts[i] - pts[j]).abs());
        let b = sim(&|i, j| -(pts[i] - pts[j]).abs() * 2.0 + 0.01 * ((i * j) % 3) as f64);
        let noise: Vec<f64> = (0..n * n).map(|_| rng.symmetric() as f64).collect();
        let c = sim(&|i, j| noise[i.min(j) * n + i.max(j)]);
        assert!(mantel_p(&a, &b, 2000, 1) < 0.01);
        assert!(mantel_p(&a, &c, 2000, 1) > 0.05);
    }
}
