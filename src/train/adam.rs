//! Adam (Kingma & Ba), as `torch.optim.Adam` computes it, with S3-Router's betas (0.9, 0.98) and
//! eps 1e-8 by default. State is plain vectors so checkpoints can store and restore it exactly.

use rayon::prelude::*;

#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates taken so far per parameter tensor (for the bias corrections). A tensor that got
    /// no gradient in an update (all its layers skipped by LayerDrop) is left alone, moments and
    /// count included, as torch.optim.Adam skips a parameter whose `.grad` is `None`.
    pub steps: Vec<u64>,
    /// First and second moments, one pair per parameter tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Adam {
    pub fn new(sizes: &[usize]) -> Adam {
        Adam {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            steps: vec![0; sizes.len()],
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter tensor with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: &mut [&mut [f32]], grads: &[Option<&[f32]>], lr: f64) {
        assert_eq!(params.len(), self.m.len(), "one parameter tensor per moment buffer");
        let (b1, b2) = (self.beta1, self.beta2);
        let tensors = params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v).zip(&mut self.steps);
        for ((((p, g), m), v), step) in tensors {
            let Some(g) = g else { continue };
            *step += 1;
            let c1 = 1.0 - b1.powi(*step as i32);
            let c2 = 1.0 - b2.powi(*step as i32);
            let step_size = lr / c1;
            // Elementwise, so splitting over threads changes nothing in the result.
            let eps = self.eps;
            p.par_iter_mut().zip(g.par_iter()).zip(m.par_iter_mut()).zip(v.par_iter_mut()).with_min_len(1 << 14).for_each(
                |(((p, &g), m), v)| {
                    let g = g as f64;
                    *m = (b1 * *m as f64 + (1.0 - b1) * g) as f32;
                    *v = (b2 * *v as f64 + (1.0 - b2) * g * g) as f32;
                    let denom = (*v as f64).sqrt() / c2.sqrt() + eps;
                    *p = (*p as f64 - step_size * *m as f64 / denom) as f32;
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_without_gradient_is_left_alone() {
        let mut adam = Adam::new(&[1, 1]);
        let (mut a, mut b) = (vec![1.0f32], vec![1.0f32]);
        adam.update(&mut [&mut a, &mut b], &[Some(&[1.0]), None], 0.1);
        assert_eq!((b[0], adam.steps.clone(), adam.m[1][0]), (1.0, vec![1, 0], 0.0));
        assert!((a[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn first_step_moves_each_parameter_by_lr_against_its_gradient_sign() {
        // After one step the bias-corrected ratio m/sqrt(v) is sign(g) (|g| >> eps).
        let mut adam = Adam::new(&[3]);
        let mut p = vec![1.0f32, 1.0, 1.0];
        adam.update(&mut [&mut p], &[Some(&[0.5, -2.0, 1e-3])], 0.1);
        for (got, want) in p.iter().zip([0.9f32, 1.1, 0.9]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn matches_the_closed_form_over_several_steps() {
        // Constant gradient g: m_t = g(1 - b1^t), v_t = g^2(1 - b2^t), so every bias-corrected
        // step is exactly lr * sign(g) (up to eps).
        let mut adam = Adam::new(&[1]);
        let mut p = vec![0.0f32];
        for _ in 0..50 {
            adam.update(&mut [&mut p], &[Some(&[0.25])], 1e-3);
        }
        assert!((p[0] + 0.05).abs() < 1e-5, "{}", p[0]);
        assert_eq!(adam.steps, vec![50]);
    }
}
