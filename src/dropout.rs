//! Counter-based dropout: whether element `i` of dropout site `site` survives is a pure function
//! of `(seed, site, i)`. The backward pass re-derives the forward's mask instead of storing it,
//! a resumed run draws the same masks as an uninterrupted one, and a GPU kernel can compute the
//! same bits from the same three numbers.

use crate::rng::mix;

/// One regulariser's dropout for one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element; 0 turns dropout off exactly.
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// The hash of (seed, site) every element's draw of `site` starts from (GPU kernels take it
    /// precomputed).
    pub fn site_key(&self, site: u64) -> u64 {
        mix(self.seed ^ site.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The factor element `i` of `site` is multiplied by: 0 if dropped, else `1 / (1 - p)`
    /// (inverted dropout, as PyTorch scales).
    pub fn factor(&self, site: u64, i: u64) -> f32 {
        if !self.is_active() {
            return 1.0;
        }
        // The top 24 bits as a uniform draw in [0, 1), compared in f32 like torch.rand.
        let u = (mix(self.site_key(site) ^ i) >> 40) as f32 / (1u32 << 24) as f32;
        if u < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    /// Applies the site's mask to `x` in place (forward, and backward on the gradient: the
    /// Jacobian of inverted dropout is the same diagonal).
    pub fn apply(&self, site: u64, x: &mut [f32]) {
        if self.is_active() {
            x.iter_mut().enumerate().for_each(|(i, v)| *v *= self.factor(site, i as u64));
        }
    }
}

/// Dropout at one site of a step, for the ops that take it fused: the FFN's GELU (elementwise,
/// as [`Dropout::apply`]) and attention (its probabilities, as [`SiteDropout::apply_to_probs`]).
#[derive(Clone, Copy, Debug)]
pub struct SiteDropout {
    pub dropout: Dropout,
    pub site: u64,
}

impl SiteDropout {
    /// `dropout` at `site`, or `None` when it drops nothing.
    pub fn at(dropout: Option<Dropout>, site: u64) -> Option<SiteDropout> {
        dropout.filter(Dropout::is_active).map(|dropout| SiteDropout { dropout, site })
    }

    /// Applies the mask to the attention probabilities of query `row` (packed index) of head
    /// `h`, whose keys are the utterance's frames in order.
    pub fn apply_to_probs(&self, heads: usize, h: usize, row: usize, probs: &mut [f32]) {
        let base = ((row * heads + h) as u64) << 24;
        probs.iter_mut().enumerate().for_each(|(j, p)| *p *= self.dropout.factor(self.site, base | j as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_requested_fraction_and_keeps_the_expectation() {
        let d = Dropout { p: 0.25, seed: 11 };
        let mut x = vec![1.0f32; 200_000];
        d.apply(3, &mut x);
        let dropped = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.25).abs() < 0.005, "dropped {dropped}");
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn masks_depend_only_on_seed_site_and_index() {
        let d = Dropout { p: 0.5, seed: 4 };
        let draw = |d: Dropout, site| (0..512).map(|i| d.factor(site, i)).collect::<Vec<_>>();
        assert_eq!(draw(d, 1), draw(d, 1));
        assert_ne!(draw(d, 1), draw(d, 2));
        assert_ne!(draw(d, 1), draw(Dropout { p: 0.5, seed: 5 }, 1));
    }

    #[test]
    fn zero_probability_is_the_identity() {
        let mut x = vec![0.5f32, -2.0, 3.0];
        Dropout { p: 0.0, seed: 1 }.apply(0, &mut x);
        assert_eq!(x, vec![0.5, -2.0, 3.0]);
    }
}
