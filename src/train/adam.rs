//! Adam (Kingma & Ba), as `torch.optim.Adam` computes it, with S3-Router's betas (0.9, 0.98) and
//! eps 1e-8 by default. State is plain vectors so checkpoints can store and restore it exactly.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::backend::backward::TrainBackend;
use crate::backend::cpu::math::multiversion;
use crate::tensor::Tensor;

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
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let s = self.next_step(self.steps[i], lr);
            self.steps[i] += 1;
            s.apply(p, g, &mut self.m[i], &mut self.v[i]);
        }
    }

    /// The coefficients of the next update of a tensor that has taken `steps` updates so far.
    pub fn next_step(&self, steps: u64, lr: f64) -> AdamStep {
        let t = steps as i32 + 1;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        AdamStep { beta1: self.beta1, beta2: self.beta2, step_size: lr / c1, c2_sqrt: c2.sqrt(), eps: self.eps }
    }
}

/// [`Adam`] over tensors that live on a training backend (the scores): moments beside them and
/// the update run there, so on the GPU neither the scores nor their optimiser state cross the
/// bus between checkpoints. `host` carries the coefficients and step counts; its own moment
/// buffers stay empty except while a checkpoint is written or read.
pub struct TensorAdam {
    host: Adam,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl TensorAdam {
    /// Zero moments for tensors of `shapes` on `be`.
    pub fn new(be: &dyn TrainBackend, shapes: &[Vec<usize>]) -> Result<TensorAdam> {
        let zeros = |s: &Vec<usize>| be.upload(&Tensor::zeros(s));
        Ok(TensorAdam {
            host: Adam::new(&vec![0; shapes.len()]),
            m: shapes.iter().map(zeros).collect::<Result<_>>()?,
            v: shapes.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One update of every tensor with its gradient (`None`: left alone, as in [`Adam::update`]).
    pub fn update(&mut self, be: &dyn TrainBackend, params: &mut [&mut Tensor], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        ensure!(params.len() == self.m.len() && grads.len() == self.m.len(), "one parameter and gradient per moment buffer");
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let s = self.host.next_step(self.host.steps[i], lr);
            self.host.steps[i] += 1;
            // Moved out and back so each buffer is updated in place (nothing else holds it).
            let take = |t: &mut Tensor| std::mem::replace(t, Tensor::zeros(&[0]));
            let (np, nm, nv) = be.adam_update(take(p), g, take(&mut self.m[i]), take(&mut self.v[i]), s)?;
            (**p, self.m[i], self.v[i]) = (np, nm, nv);
        }
        Ok(())
    }

    /// The state as a host [`Adam`] (for checkpoints).
    pub fn to_host(&self, be: &dyn TrainBackend) -> Result<Adam> {
        let host = |t: &Tensor| be.to_host(t)?.into_f32_vec();
        Ok(Adam {
            m: self.m.iter().map(host).collect::<Result<_>>()?,
            v: self.v.iter().map(host).collect::<Result<_>>()?,
            ..self.host.clone()
        })
    }

    /// Replaces the state with `host`'s (a restored checkpoint), onto `be`.
    pub fn load(&mut self, be: &dyn TrainBackend, host: &Adam) -> Result<()> {
        ensure!(host.m.len() == self.m.len(), "optimiser state for {} tensors, the run has {}", host.m.len(), self.m.len());
        let up = |t: &Tensor, v: &[f32]| be.upload(&Tensor::from_vec(v.to_vec(), t.shape()));
        self.m = self.m.iter().zip(&host.m).map(|(t, v)| up(t, v)).collect::<Result<_>>()?;
        self.v = self.v.iter().zip(&host.v).map(|(t, v)| up(t, v)).collect::<Result<_>>()?;
        self.host = Adam { m: vec![Vec::new(); host.m.len()], v: vec![Vec::new(); host.v.len()], ..host.clone() };
        Ok(())
    }
}

/// One Adam update's coefficients for one tensor (bias corrections folded in): what
/// [`crate::backend::backward::Backward::adam_update`] applies on the device the tensor lives on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub beta1: f64,
    pub beta2: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub c2_sqrt: f64,
    pub eps: f64,
}

impl AdamStep {
    /// `m, v` ← moments with gradient `g`; `p` ← `p - step_size · m / (sqrt(v) / c2_sqrt + eps)`,
    /// in f64 per element (as the GPU kernel computes it).
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        const CHUNK: usize = 1 << 14;
        // Elementwise, so splitting over threads changes nothing in the result.
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| adam_chunk(self, p, g, m, v));
    }
}

multiversion! {
    /// [`AdamStep::apply`] on one chunk, vectorised (f64 lanes; IEEE operations, so the same
    /// bits as the scalar code).
    pub fn adam_chunk(s: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (s.beta1, s.beta2);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g as f64;
            *m = (b1 * *m as f64 + (1.0 - b1) * g) as f32;
            *v = (b2 * *v as f64 + (1.0 - b2) * g * g) as f32;
            let denom = (*v as f64).sqrt() / s.c2_sqrt + s.eps;
            *p = (*p as f64 - s.step_size * *m as f64 / denom) as f32;
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
    fn tensor_adam_is_the_host_adam_and_round_trips_through_a_checkpoint() {
        let be = crate::backend::cpu::CpuBackend;
        let shapes = vec![vec![3], vec![2]];
        let mut tensor_adam = TensorAdam::new(&be, &shapes).unwrap();
        let mut host_adam = Adam::new(&[3, 2]);
        let (mut a, mut b) = (vec![1.0f32, -2.0, 0.5], vec![0.25f32, 4.0]);
        let mut params = [Tensor::from_vec(a.clone(), &[3]), Tensor::from_vec(b.clone(), &[2])];
        for k in 0..4 {
            let ga = vec![0.1f32 * k as f32, -0.3, 2.0];
            let gb = (k % 2 == 0).then(|| vec![1.0f32, -1.0]);
            host_adam.update(&mut [&mut a, &mut b], &[Some(&ga), gb.as_deref()], 0.05);
            let grads = [Some(Tensor::from_vec(ga, &[3])), gb.map(|g| Tensor::from_vec(g, &[2]))];
            tensor_adam.update(&be, &mut params.iter_mut().collect::<Vec<_>>(), &grads, 0.05).unwrap();
        }
        assert_eq!((params[0].to_vec().unwrap(), params[1].to_vec().unwrap()), (a, b));
        let saved = tensor_adam.to_host(&be).unwrap();
        assert_eq!(saved, host_adam);
        let mut restored = TensorAdam::new(&be, &shapes).unwrap();
        restored.load(&be, &saved).unwrap();
        assert_eq!(restored.to_host(&be).unwrap(), host_adam);
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
