//! Backward passes of the ops between the CTC loss and the trainable tensors (scores of masked
//! linears, the head, the time-mask embedding; under weight finetuning every weight, bias and
//! norm of the encoder and the feature projection), as the CPU reference: plain f32 slices,
//! packed `[frames, channels]` activations, checked against finite differences.

use rayon::prelude::*;

use super::attention::head_view;
use super::gemm::{matmul, matmul_blocked, MatRef};
use super::math;
use crate::backend::{ConvGeometry, Seqs};
use crate::dropout::SiteDropout;
use crate::router;

/// `dx = dy · W` for `y = x · Wᵀ`, with the CPU's `[in, out]` weight layout `w_t`.
pub fn linear_input_grad(dy: &[f32], w_t: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let n = dy.len() / d_out;
    let mut dx = vec![0.0; n * d_in];
    matmul(&mut dx, d_in, MatRef::row_major(dy, n, d_out), MatRef::row_major(w_t, d_in, d_out).t(), false, 0);
    dx
}

/// `dW = dyᵀ · x` (PyTorch's `[out, in]` layout), the gradient of the effective weight.
pub fn linear_weight_grad(dy: &[f32], x: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let n = dy.len() / d_out;
    let mut dw = vec![0.0; d_out * d_in];
    matmul(&mut dw, d_in, MatRef::row_major(dy, n, d_out).t(), MatRef::row_major(x, n, d_in), false, 0);
    dw
}

/// The straight-through score gradient of rows `row0 .. row0 + rows` of a masked linear with
/// the `[in, out]` weight `w_t`: `(dyᵀ·x)[rows] ⊙ W[rows] ⊙ sign(score)`. Each thread's block of
/// `dW_eff` rows becomes score gradients while it is still in cache, so `dW_eff` is never stored.
pub fn score_grad(dy: &[f32], x: &[f32], w_t: &[f32], scores: &[f32], row0: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let (n, rows) = (dy.len() / d_out, scores.len() / d_in);
    let mut out = vec![0.0; rows * d_in];
    let dy_t = MatRef { data: dy.get(row0..).unwrap_or(&[]), rows, cols: n, row_stride: 1, col_stride: d_out };
    matmul_blocked(&mut out, dy_t, MatRef::row_major(x, n, d_in), |first, block| {
        // W's rows gathered from the [in, out] layout a tile of rows at a time (contiguous reads).
        let mut weight = vec![0.0f32; TILE * d_in];
        for (t, grad) in block.chunks_mut(TILE * d_in).enumerate() {
            let (o0, tile) = (first + t * TILE, grad.len() / d_in);
            for i in 0..d_in {
                let column = &w_t[i * d_out + row0 + o0..][..tile];
                column.iter().enumerate().for_each(|(r, &v)| weight[r * d_in + i] = v);
            }
            router::score_grad(grad, &weight[..tile * d_in], &scores[o0 * d_in..(o0 + tile) * d_in]);
        }
    });
    out
}

/// `db = Σ_rows dy`.
pub fn bias_grad(dy: &[f32], d_out: usize) -> Vec<f32> {
    let mut db = vec![0.0f32; d_out];
    for row in dy.chunks_exact(d_out) {
        math::add_assign(&mut db, row);
    }
    db
}

/// `(dgamma, dbeta)` of a norm.
pub type NormParamGrads = (Vec<f32>, Vec<f32>);

/// Gradients of `y = gamma * (x - mean) / sqrt(var + eps) + beta` over each row of `x`, the
/// statistics recomputed from `x` once per row: the input's, `dx = inv/C · (C·g - Σg - x̂·Σ(g·x̂))`
/// with `g = dy·gamma`; with `params` also `(dgamma, dbeta) = (Σ_rows dy·x̂, Σ_rows dy)`, summed
/// in f64 per fixed block of rows and the blocks in order, so the sums do not depend on the
/// thread count.
pub fn layer_norm_grads(dy: &[f32], x: &[f32], gamma: &[f32], eps: f32, params: bool) -> (Vec<f32>, Option<NormParamGrads>) {
    const ROWS: usize = 64;
    let c = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    let partials: Vec<Option<(Vec<f64>, Vec<f64>)>> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(dy.par_chunks(ROWS * c))
        .map(|((dx, x), dy)| {
            let mut sums = params.then(|| (vec![0.0f64; c], vec![0.0f64; c]));
            for ((dx, x), dy) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(dy.chunks_exact(c)) {
                let n = c as f64;
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let inv = 1.0 / (var + eps as f64).sqrt();
                let xhat: Vec<f64> = x.iter().map(|&v| (v as f64 - mean) * inv).collect();
                let g: Vec<f64> = dy.iter().zip(gamma).map(|(&d, &w)| d as f64 * w as f64).collect();
                let (sum_g, sum_gx) = (g.iter().sum::<f64>(), g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>());
                for ((o, g), xh) in dx.iter_mut().zip(&g).zip(&xhat) {
                    *o = (inv / n * (n * g - sum_g - xh * sum_gx)) as f32;
                }
                if let Some((dgamma, dbeta)) = &mut sums {
                    for (j, (&d, xh)) in dy.iter().zip(&xhat).enumerate() {
                        dgamma[j] += d as f64 * xh;
                        dbeta[j] += d as f64;
                    }
                }
            }
            sums
        })
        .collect();
    let totals = params.then(|| {
        let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
        for (g, b) in partials.into_iter().flatten() {
            dgamma.iter_mut().zip(&g).for_each(|(t, v)| *t += v);
            dbeta.iter_mut().zip(&b).for_each(|(t, v)| *t += v);
        }
        (dgamma.into_iter().map(|v| v as f32).collect(), dbeta.into_iter().map(|v| v as f32).collect())
    });
    (dx, totals)
}

/// The input gradient of [`layer_norm_grads`] alone.
pub fn layer_norm_input_grad(dy: &[f32], x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    layer_norm_grads(dy, x, gamma, eps, false).0
}

/// Gradients of [`crate::backend::Backend::group_norm_time`] (one group per channel, each
/// channel of each utterance normalised over its frames): `(dx, dgamma, dbeta)`, the layer-norm
/// formulas with the roles of time and channels swapped.
pub fn group_norm_time_grads(dy: &[f32], x: &[f32], seqs: &Seqs, gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
    for u in 0..seqs.count() {
        let r = seqs.range(u);
        let n = r.len() as f64;
        for ch in 0..c {
            let at = |t: usize| t * c + ch;
            let mean = r.clone().map(|t| x[at(t)] as f64).sum::<f64>() / n;
            let var = r.clone().map(|t| (x[at(t)] as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
            for t in r.clone() {
                let (xh, d) = ((x[at(t)] as f64 - mean) * inv, dy[at(t)] as f64);
                sum_g += d * gamma[ch] as f64;
                sum_gx += d * gamma[ch] as f64 * xh;
                dgamma[ch] += d * xh;
                dbeta[ch] += d;
            }
            for t in r.clone() {
                let xh = (x[at(t)] as f64 - mean) * inv;
                dx[at(t)] = (inv / n * (n * dy[at(t)] as f64 * gamma[ch] as f64 - sum_g - xh * sum_gx)) as f32;
            }
        }
    }
    (dx, dgamma.into_iter().map(|v| v as f32).collect(), dbeta.into_iter().map(|v| v as f32).collect())
}

/// `dx = dy · gelu'(x)` ([`math::gelu_grad`]), in parallel chunks.
pub fn gelu_input_grad(dy: &[f32], x: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(dy.par_chunks(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)))
        .for_each(|(dx, (dy, x))| math::gelu_grad(dx, dy, x));
    dx
}

/// Elements per parallel task of an elementwise pass (large enough to amortise the dispatch).
pub const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Gradient of `softmax(q kᵀ · scale) v` per utterance and head with respect to the packed
/// `qkv [frames, 3c]` (the probabilities are recomputed, never stored): with `P` the attention
/// weights and `dP = dO vᵀ`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))`, `dq = dS k · scale`,
/// `dk = dSᵀ q · scale`, `dv = Pᵀ dO`.
pub fn attention_grad(
    d_out: &[f32],
    qkv: &[f32],
    c: usize,
    seqs: &Seqs,
    heads: usize,
    scale: f32,
    dropout: Option<SiteDropout>,
) -> Vec<f32> {
    let hd = c / heads;
    let tasks: Vec<(usize, usize)> = (0..seqs.count()).flat_map(|u| (0..heads).map(move |h| (u, h))).collect();
    // (first frame, head, [dq, dk, dv]) per task.
    let parts: Vec<(usize, usize, [Vec<f32>; 3])> = tasks
        .into_par_iter()
        .map(|(u, h)| {
            let (start, len) = (seqs.range(u).start, seqs.lens()[u]);
            let part = |p: usize| head_view(qkv, 3 * c, p * c + h * hd, start, len, hd);
            let (q, k, v) = (part(0), part(1), part(2));
            let d_o = head_view(d_out, c, h * hd, start, len, hd);
            let mut p = vec![0.0f32; len * len];
            matmul(&mut p, len, q, k.t(), false, 1);
            p.chunks_exact_mut(len).for_each(|row| math::softmax_scaled(row, scale));
            // With dropout the output read `P * D`; `dP = (dO vᵀ) * D`.
            let mut p_dropped = p.clone();
            let mut dp = vec![0.0f32; len * len];
            matmul(&mut dp, len, d_o, v.t(), false, 1);
            if let Some(d) = dropout {
                for (i, (pd_row, dp_row)) in p_dropped.chunks_exact_mut(len).zip(dp.chunks_exact_mut(len)).enumerate() {
                    d.apply_to_probs(heads, h, start + i, pd_row);
                    d.apply_to_probs(heads, h, start + i, dp_row);
                }
            }
            for (dp_row, p_row) in dp.chunks_exact_mut(len).zip(p.chunks_exact(len)) {
                let dot: f32 = dp_row.iter().zip(p_row).map(|(a, b)| a * b).sum();
                dp_row.iter_mut().zip(p_row).for_each(|(d, &pv)| *d = pv * (*d - dot) * scale);
            }
            let ds = MatRef::row_major(&dp, len, len);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; len * hd], vec![0.0f32; len * hd], vec![0.0f32; len * hd]);
            matmul(&mut dq, hd, ds, k, false, 1);
            matmul(&mut dk, hd, ds.t(), q, false, 1);
            matmul(&mut dv, hd, MatRef::row_major(&p_dropped, len, len).t(), d_o, false, 1);
            (start, h, [dq, dk, dv])
        })
        .collect();
    let mut dqkv = vec![0.0f32; qkv.len()];
    for (start, h, grads) in parts {
        for (part, grad) in grads.iter().enumerate() {
            for (i, row) in grad.chunks_exact(hd).enumerate() {
                let at = (start + i) * 3 * c + part * c + h * hd;
                dqkv[at..at + hd].copy_from_slice(row);
            }
        }
    }
    dqkv
}

/// Input gradient of [`crate::backend::Backend::conv1d`] for one utterance of `t_in` frames:
/// per group, `dcols = dy_g · W_g` (the gradient of each receptive field), scattered back onto
/// the frames it read (col2im); padding positions receive nothing.
pub fn conv1d_input_grad(dy: &[f32], w: &[f32], c_in: usize, c_out: usize, t_in: usize, geom: ConvGeometry) -> Vec<f32> {
    let ConvGeometry { kernel, stride, pad_left, groups } = geom;
    let (cg, og) = (c_in / groups, c_out / groups);
    let t_out = dy.len() / c_out;
    let mut dx = vec![0.0f32; t_in * c_in];
    for g in 0..groups {
        let mut dcols = vec![0.0f32; t_out * kernel * cg];
        let dy_g = MatRef { data: &dy[g * og..], rows: t_out, cols: og, row_stride: c_out, col_stride: 1 };
        let w_g = MatRef::row_major(&w[g * og * kernel * cg..(g + 1) * og * kernel * cg], og, kernel * cg);
        matmul(&mut dcols, kernel * cg, dy_g, w_g, false, 0);
        for (t, row) in dcols.chunks_exact(kernel * cg).enumerate() {
            for (k, tap) in row.chunks_exact(cg).enumerate() {
                let s = (stride * t + k) as isize - pad_left as isize;
                if s >= 0 && (s as usize) < t_in {
                    let at = s as usize * c_in + g * cg;
                    math::add_assign(&mut dx[at..at + cg], tap);
                }
            }
        }
    }
    dx
}

/// Weight gradient of [`crate::backend::Backend::conv1d`] for one utterance of `t_in` frames,
/// in the time-major `[out, kernel, in/groups]` layout: per group `dW_g = dy_gᵀ · cols_g` with
/// `cols` the receptive fields (im2col; padding reads zeros).
pub fn conv1d_weight_grad(dy: &[f32], x: &[f32], c_in: usize, c_out: usize, geom: ConvGeometry) -> Vec<f32> {
    let ConvGeometry { kernel, stride, pad_left, groups } = geom;
    let (cg, og) = (c_in / groups, c_out / groups);
    let (t_in, t_out) = (x.len() / c_in, dy.len() / c_out);
    let mut dw = vec![0.0f32; c_out * kernel * cg];
    dw.par_chunks_mut(og * kernel * cg).enumerate().for_each(|(g, dw_g)| {
        let mut cols = vec![0.0f32; t_out * kernel * cg];
        for (t, row) in cols.chunks_exact_mut(kernel * cg).enumerate() {
            for (k, tap) in row.chunks_exact_mut(cg).enumerate() {
                let s = (stride * t + k) as isize - pad_left as isize;
                if s >= 0 && (s as usize) < t_in {
                    let at = s as usize * c_in + g * cg;
                    tap.copy_from_slice(&x[at..at + cg]);
                }
            }
        }
        let dy_g = MatRef { data: &dy[g * og..], rows: t_out, cols: og, row_stride: c_out, col_stride: 1 };
        matmul(dw_g, kernel * cg, dy_g.t(), MatRef::row_major(&cols, t_out, kernel * cg), false, 1);
    });
    dw
}

/// Gradients of `weight_norm(dim=2)`'s magnitude `g` (`[kernel]`) and direction `v` (PyTorch's
/// `[out, in, kernel]`) from the gradient `dw` of the folded weight `W[.., k] = g_k v[.., k] /
/// ‖v[.., k]‖`: `dg_k = ⟨dw, v⟩_k / ‖v‖_k`, `dv = g_k / ‖v‖_k · (dw - dg_k · v / ‖v‖_k)`.
pub fn weight_norm_grads(dw: &[f32], g: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let kernel = g.len();
    let (mut norm, mut dot) = (vec![0.0f64; kernel], vec![0.0f64; kernel]);
    for (i, (&d, &x)) in dw.iter().zip(v).enumerate() {
        norm[i % kernel] += x as f64 * x as f64;
        dot[i % kernel] += d as f64 * x as f64;
    }
    norm.iter_mut().for_each(|n| *n = n.sqrt());
    let dg: Vec<f64> = dot.iter().zip(&norm).map(|(d, n)| d / n).collect();
    let dv = dw
        .iter()
        .zip(v)
        .enumerate()
        .map(|(i, (&d, &x))| {
            let k = i % kernel;
            (g[k] as f64 / norm[k] * (d as f64 - dg[k] * x as f64 / norm[k])) as f32
        })
        .collect();
    (dg.into_iter().map(|v| v as f32).collect(), dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{attention, CpuBackend};
    use crate::backend::{Activation, Backend, NormParams};
    use crate::dropout::Dropout;
    use crate::rng::SplitMix;
    use crate::tensor::Tensor;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix(seed);
        (0..n).map(|_| r.symmetric()).collect()
    }

    /// Checks `grad` against central differences of `<dy, f(x)>` at a spread of coordinates.
    fn check(name: &str, x: &[f32], dy: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) {
        let h = 1e-2f32;
        for i in (0..x.len()).step_by((x.len() / 40).max(1)) {
            let (mut up, mut down) = (x.to_vec(), x.to_vec());
            up[i] += h;
            down[i] -= h;
            let dot = |y: Vec<f32>| y.iter().zip(dy).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            let fd = (dot(f(&up)) - dot(f(&down))) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() <= 2e-3 * (1.0 + fd.abs()), "{name}[{i}]: finite difference {fd} vs {}", grad[i]);
        }
    }

    #[test]
    fn linear_gradients() {
        let (n, d_in, d_out) = (7, 5, 6);
        let be = CpuBackend;
        let (x, w, dy) = (random(n * d_in, 1), random(d_out * d_in, 2), random(n * d_out, 3));
        let forward = |x: &[f32], w: &[f32]| {
            let wt = be.prepare_linear_weight(&Tensor::from_vec(w.to_vec(), &[d_out, d_in])).unwrap();
            be.linear(&Tensor::from_vec(x.to_vec(), &[n, d_in]), &wt, None, Activation::Identity).unwrap().to_vec().unwrap()
        };
        let w_t = be.prepare_linear_weight(&Tensor::from_vec(w.clone(), &[d_out, d_in])).unwrap();
        check("dx", &x, &dy, &linear_input_grad(&dy, w_t.f32s().unwrap(), d_in, d_out), |x| forward(x, &w));
        check("dW", &w, &dy, &linear_weight_grad(&dy, &x, d_in, d_out), |w| forward(&x, w));
        let db = bias_grad(&dy, d_out);
        assert!((db[2] - dy.iter().skip(2).step_by(d_out).sum::<f32>()).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_and_gelu_gradients() {
        let (rows, c) = (4, 9);
        let be = CpuBackend;
        let (x, dy) = (random(rows * c, 4).iter().map(|v| v * 3.0).collect::<Vec<_>>(), random(rows * c, 5));
        let (g, b) = (Tensor::from_vec(random(c, 6), &[c]), Tensor::from_vec(random(c, 7), &[c]));
        let ln = |x: &[f32]| {
            let p = NormParams { gamma: &g, beta: &b, eps: 1e-5 };
            be.layer_norm(Tensor::from_vec(x.to_vec(), &[rows, c]), None, p, Activation::Identity).unwrap().to_vec().unwrap()
        };
        check("layer norm", &x, &dy, &layer_norm_input_grad(&dy, &x, g.f32s().unwrap(), 1e-5), ln);
        let (dx, params) = layer_norm_grads(&dy, &x, g.f32s().unwrap(), 1e-5, true);
        assert_eq!(dx, layer_norm_input_grad(&dy, &x, g.f32s().unwrap(), 1e-5));
        let (dgamma, dbeta) = params.unwrap();
        let ln_params = |gamma: &[f32], beta: &[f32]| {
            let (g, b) = (Tensor::from_vec(gamma.to_vec(), &[c]), Tensor::from_vec(beta.to_vec(), &[c]));
            let p = NormParams { gamma: &g, beta: &b, eps: 1e-5 };
            be.layer_norm(Tensor::from_vec(x.clone(), &[rows, c]), None, p, Activation::Identity).unwrap().to_vec().unwrap()
        };
        let (gv, bv) = (g.to_vec().unwrap(), b.to_vec().unwrap());
        check("layer norm gamma", &gv, &dy, &dgamma, |gamma| ln_params(gamma, &bv));
        check("layer norm beta", &bv, &dy, &dbeta, |beta| ln_params(&gv, beta));
        let gelu = |x: &[f32]| x.iter().map(|&v| math::gelu(v)).collect::<Vec<_>>();
        check("gelu", &x, &dy, &gelu_input_grad(&dy, &x), gelu);
    }

    #[test]
    fn conv_input_gradient_for_positional_and_strided_geometries() {
        let be = CpuBackend;
        for (i, (c_in, c_out, kernel, stride, pad, groups, t_in)) in
            [(8, 8, 4, 1, 2, 2, 9), (3, 5, 3, 2, 0, 1, 11), (6, 6, 5, 1, 2, 3, 4)].into_iter().enumerate()
        {
            let geom = ConvGeometry { kernel, stride, pad_left: pad, groups };
            let t_out = if pad == 0 { (t_in - kernel) / stride + 1 } else { t_in };
            let (x, w) = (random(t_in * c_in, 20 + i as u64), random(c_out * kernel * (c_in / groups), 30 + i as u64));
            let dy = random(t_out * c_out, 40 + i as u64);
            let (si, so) = (Seqs::new(vec![t_in]), Seqs::new(vec![t_out]));
            let wt = Tensor::from_vec(w.clone(), &[c_out, kernel, c_in / groups]);
            let f = |x: &[f32]| {
                be.conv1d(&Tensor::from_vec(x.to_vec(), &[t_in, c_in]), &si, &so, &wt, None, geom, Activation::Identity)
                    .unwrap()
                    .to_vec()
                    .unwrap()
            };
            check(&format!("conv case {i}"), &x, &dy, &conv1d_input_grad(&dy, &w, c_in, c_out, t_in, geom), f);
            let f_w = |w: &[f32]| {
                let wt = Tensor::from_vec(w.to_vec(), &[c_out, kernel, c_in / groups]);
                be.conv1d(&Tensor::from_vec(x.clone(), &[t_in, c_in]), &si, &so, &wt, None, geom, Activation::Identity)
                    .unwrap()
                    .to_vec()
                    .unwrap()
            };
            check(&format!("conv weight case {i}"), &w, &dy, &conv1d_weight_grad(&dy, &x, c_in, c_out, geom), f_w);
        }
    }

    #[test]
    fn group_norm_gradients() {
        let (c, seqs) = (3, Seqs::new(vec![5, 2, 7]));
        let be = CpuBackend;
        let (x, dy) = (random(seqs.total() * c, 60).iter().map(|v| v * 2.0).collect::<Vec<_>>(), random(seqs.total() * c, 61));
        let (g, b) = (random(c, 62), random(c, 63));
        let gn = |x: &[f32], g: &[f32], b: &[f32]| {
            let (g, b) = (Tensor::from_vec(g.to_vec(), &[c]), Tensor::from_vec(b.to_vec(), &[c]));
            let p = NormParams { gamma: &g, beta: &b, eps: 1e-5 };
            be.group_norm_time(Tensor::from_vec(x.to_vec(), &[seqs.total(), c]), &seqs, p, Activation::Identity).unwrap().to_vec().unwrap()
        };
        let (dx, dg, db) = group_norm_time_grads(&dy, &x, &seqs, &g, 1e-5);
        check("group norm x", &x, &dy, &dx, |x| gn(x, &g, &b));
        check("group norm gamma", &g, &dy, &dg, |g| gn(&x, g, &b));
        check("group norm beta", &b, &dy, &db, |b| gn(&x, &g, b));
    }

    #[test]
    fn weight_norm_gradients() {
        let (out, cin, kernel) = (3, 2, 4);
        let (g, v, dy) = (random(kernel, 50), random(out * cin * kernel, 51), random(out * cin * kernel, 52));
        let fold = |g: &[f32], v: &[f32]| -> Vec<f32> {
            (0..v.len())
                .map(|i| {
                    let k = i % kernel;
                    let n: f32 = v.iter().skip(k).step_by(kernel).map(|x| x * x).sum::<f32>().sqrt();
                    g[k] * v[i] / n
                })
                .collect()
        };
        let (dg, dv) = weight_norm_grads(&dy, &g, &v);
        check("weight norm g", &g, &dy, &dg, |g| fold(g, &v));
        check("weight norm v", &v, &dy, &dv, |v| fold(&g, v));
    }

    #[test]
    fn attention_gradient_with_and_without_probability_dropout() {
        let (heads, hd) = (2, 4);
        let c = heads * hd;
        let seqs = Seqs::new(vec![5, 1, 3]);
        let (qkv, dy) = (random(seqs.total() * 3 * c, 8), random(seqs.total() * c, 9));
        let scale = 0.5;
        for dropout in [None, Some(SiteDropout { dropout: Dropout { p: 0.3, seed: 5 }, site: 2 })] {
            let f = |x: &[f32]| attention::attention(x, c, &seqs, heads, scale, dropout);
            check("attention", &qkv, &dy, &attention_grad(&dy, &qkv, c, &seqs, heads, scale, dropout), f);
        }
        let dropout = Some(SiteDropout { dropout: Dropout { p: 0.3, seed: 5 }, site: 2 });
        assert_ne!(attention::attention(&qkv, c, &seqs, heads, scale, dropout), attention::attention(&qkv, c, &seqs, heads, scale, None));
    }
}
