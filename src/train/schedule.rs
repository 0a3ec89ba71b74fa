//! Learning-rate schedules: fairseq's tri-stage (`tri_stage_lr_scheduler.py`), as S3-Router's
//! recipes run it, and constant.

/// Tri-stage: linear warmup from `init_scale * peak` to `peak`, hold, exponential decay to
/// `final_scale * peak`, then constant. Phase lengths are fractions of the total updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TriStage {
    pub peak: f64,
    pub warmup: usize,
    pub hold: usize,
    pub decay: usize,
    pub init_scale: f64,
    pub final_scale: f64,
}

impl TriStage {
    /// Phases as ratios of `total` updates (S3-Router: 0.1 / 0.4 / 0.5, init 0.01, final 1e-4).
    pub fn from_ratios(peak: f64, total: usize, ratios: [f64; 3], init_scale: f64, final_scale: f64) -> TriStage {
        let n = |r: f64| (r * total as f64) as usize;
        TriStage { peak, warmup: n(ratios[0]), hold: n(ratios[1]), decay: n(ratios[2]), init_scale, final_scale }
    }

    /// The learning rate for update `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (self.init_scale + (1.0 - self.init_scale) * step as f64 / self.warmup as f64);
        }
        let step = step - self.warmup;
        if step < self.hold {
            return self.peak;
        }
        let step = step - self.hold;
        if step <= self.decay {
            return self.peak * (self.final_scale.ln() * step as f64 / self.decay.max(1) as f64).exp();
        }
        self.peak * self.final_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_meet_their_anchor_values() {
        let s = TriStage::from_ratios(5e-5, 20_000, [0.1, 0.4, 0.5], 0.01, 1e-4);
        assert_eq!((s.warmup, s.hold, s.decay), (2000, 8000, 10_000));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-30);
        assert!(close(s.lr(0), 5e-7));
        assert!(close(s.lr(1000), 5e-5 * (0.01 + 0.99 * 0.5)));
        assert!(close(s.lr(2000), 5e-5) && close(s.lr(9999), 5e-5));
        // Halfway through the decay: the geometric mean of peak and final.
        assert!(close(s.lr(15_000), 5e-5 * 1e-2));
        assert!(close(s.lr(20_000), 5e-9) && close(s.lr(50_000), 5e-9));
        // Monotone: up, flat, down.
        assert!((1..2000).all(|t| s.lr(t) > s.lr(t - 1)));
        assert!((10_001..20_000).all(|t| s.lr(t) < s.lr(t - 1)));
    }
}
