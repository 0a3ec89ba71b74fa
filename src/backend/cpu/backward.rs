//! The CPU's training ops: thin adapters from [`Backward`] onto the reference gradients in
//! [`super::grad`] (checked against finite differences there) and the router's top-k.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::attention::attention;
use super::{as_matrix, data, grad, masked_weight, math, CpuBackend};
use crate::backend::backward::{Backward, NormGrads, ScoredLinear, ScoredRows};
use crate::backend::{Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs};
use crate::dropout::{Dropout, SiteDropout};
use crate::router::top_k_mask;
use crate::tensor::Tensor;
use crate::train::adam::AdamStep;

/// `(c_out, c_in)` of a time-major conv weight `[c_out, kernel, c_in / groups]`.
fn conv_channels(w: &Tensor, geom: ConvGeometry) -> Result<(usize, usize)> {
    let &[c_out, kernel, cg] = w.shape() else { bail!("conv weight must be [out, kernel, in/groups], found {:?}", w.shape()) };
    ensure!(kernel == geom.kernel, "conv weight {:?} does not fit the geometry {geom:?}", w.shape());
    Ok((c_out, cg * geom.groups))
}

impl Backward for CpuBackend {
    fn dropout(&self, x: Tensor, d: Dropout, site: u64) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let mut v = x.into_f32_vec()?;
        d.apply(site, &mut v);
        Ok(Tensor::from_vec(v, &shape))
    }

    fn dropout_add_norm(&self, y: Tensor, dropout: Option<SiteDropout>, residual: &Tensor, norm: NormParams) -> Result<(Tensor, Tensor)> {
        let y = match dropout {
            Some(d) => self.dropout(y, d.dropout, d.site)?,
            None => y,
        };
        let sum = self.add(y, residual)?;
        let normed = self.layer_norm(sum.clone(), None, norm, Activation::Identity)?;
        Ok((sum, normed))
    }

    fn gelu(&self, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        let mut y = data(x)?.to_vec();
        y.par_chunks_mut(grad::ELEMENTWISE_CHUNK).for_each(|c| math::bias_act_rows(c, c.len(), None, Activation::Gelu));
        if let Some(d) = dropout {
            d.dropout.apply(d.site, &mut y);
        }
        Ok(Tensor::from_vec(y, x.shape()))
    }

    fn relu_grad(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        ensure!(dy.shape() == y.shape(), "ReLU backward: gradient {:?} for an output {:?}", dy.shape(), y.shape());
        let dx = data(dy)?.iter().zip(data(y)?).map(|(&d, &v)| if v > 0.0 { d } else { 0.0 }).collect();
        Ok(Tensor::from_vec(dx, y.shape()))
    }

    fn gelu_grad(&self, dy: &Tensor, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        ensure!(dy.shape() == x.shape(), "GELU backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        let dx = match dropout {
            Some(d) => {
                let mut dropped = data(dy)?.to_vec();
                d.dropout.apply(d.site, &mut dropped);
                grad::gelu_input_grad(&dropped, data(x)?)
            }
            None => grad::gelu_input_grad(data(dy)?, data(x)?),
        };
        Ok(Tensor::from_vec(dx, x.shape()))
    }

    fn linear_input_grad(&self, dy: &Tensor, w: &Tensor, mask: Option<&LinearMask>) -> Result<Tensor> {
        let &[d_in, d_out] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let (n, cols) = as_matrix(dy);
        ensure!(cols == d_out, "linear backward: gradient has {cols} columns for a weight with {d_out} outputs");
        let mut scratch = Vec::new();
        let w_t = masked_weight(data(w)?, mask, &mut scratch)?;
        Ok(Tensor::from_vec(grad::linear_input_grad(data(dy)?, w_t, d_in, d_out), &[n, d_in]))
    }

    fn linear_weight_grad(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        let ((n, d_out), (rows, d_in)) = (as_matrix(dy), as_matrix(x));
        ensure!(n == rows, "linear weight gradient: {n} gradient rows for {rows} input rows");
        Ok(Tensor::from_vec(grad::linear_weight_grad(data(dy)?, data(x)?, d_in, d_out), &[d_out, d_in]))
    }

    fn column_sum(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c) = as_matrix(x);
        Ok(Tensor::from_vec(grad::bias_grad(data(x)?, c), &[c]))
    }

    fn layer_norm_grads(&self, dy: &Tensor, x: &Tensor, norm: NormParams, params: bool) -> Result<NormGrads> {
        ensure!(dy.shape() == x.shape(), "layer norm backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        let gamma = data(norm.gamma)?;
        let (_, c) = as_matrix(x);
        ensure!(gamma.len() == c, "layer norm over {c} channels has {} weights", gamma.len());
        let (dx, p) = grad::layer_norm_grads(data(dy)?, data(x)?, gamma, norm.eps, params);
        Ok((Tensor::from_vec(dx, x.shape()), p.map(|(g, b)| (Tensor::from_vec(g, &[c]), Tensor::from_vec(b, &[c])))))
    }

    fn attention_dropout(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32, dropout: Option<SiteDropout>) -> Result<Tensor> {
        let (rows, c3) = as_matrix(qkv);
        ensure!(rows == seqs.total() && c3 % 3 == 0, "attention: {:?} does not hold q, k, v of {} frames", qkv.shape(), seqs.total());
        Ok(Tensor::from_vec(attention(data(qkv)?, c3 / 3, seqs, heads, scale, dropout), &[rows, c3 / 3]))
    }

    fn attention_grad(
        &self,
        d_out: &Tensor,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        let (rows, c3) = as_matrix(qkv);
        ensure!(d_out.numel() * 3 == qkv.numel(), "attention backward: gradient {:?} for qkv {:?}", d_out.shape(), qkv.shape());
        Ok(Tensor::from_vec(grad::attention_grad(data(d_out)?, data(qkv)?, c3 / 3, seqs, heads, scale, dropout), &[rows, c3]))
    }

    fn conv1d_input_grad(&self, dy: &Tensor, w: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor> {
        let (c_out, c_in) = conv_channels(w, geom)?;
        ensure!(
            dy.numel() == seqs_out.total() * c_out,
            "conv backward: gradient {:?} for {} frames x {c_out}",
            dy.shape(),
            seqs_out.total()
        );
        let (dy, w) = (data(dy)?, data(w)?);
        let mut dx = Vec::with_capacity(seqs_in.total() * c_in);
        for u in 0..seqs_in.count() {
            let r = seqs_out.range(u);
            dx.extend(grad::conv1d_input_grad(&dy[r.start * c_out..r.end * c_out], w, c_in, c_out, seqs_in.lens()[u], geom));
        }
        Ok(Tensor::from_vec(dx, &[seqs_in.total(), c_in]))
    }

    fn conv1d_weight_grad(&self, dy: &Tensor, x: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor> {
        let ((_, c_out), (_, c_in)) = (as_matrix(dy), as_matrix(x));
        ensure!(c_in % geom.groups == 0, "conv: {c_in} channels do not split into {} groups", geom.groups);
        let (dy, x) = (data(dy)?, data(x)?);
        let mut dw = vec![0.0f32; c_out * geom.kernel * c_in / geom.groups];
        for u in 0..seqs_in.count() {
            let (ri, ro) = (seqs_in.range(u), seqs_out.range(u));
            let g = grad::conv1d_weight_grad(&dy[ro.start * c_out..ro.end * c_out], &x[ri.start * c_in..ri.end * c_in], c_in, c_out, geom);
            math::add_assign(&mut dw, &g);
        }
        Ok(Tensor::from_vec(dw, &[c_out, geom.kernel, c_in / geom.groups]))
    }

    fn group_norm_time_grads(&self, dy: &Tensor, x: &Tensor, seqs: &Seqs, norm: NormParams) -> Result<(Tensor, Tensor, Tensor)> {
        ensure!(dy.shape() == x.shape(), "group norm backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        let gamma = data(norm.gamma)?;
        let (dx, dgamma, dbeta) = grad::group_norm_time_grads(data(dy)?, data(x)?, seqs, gamma, norm.eps);
        let c = gamma.len();
        Ok((Tensor::from_vec(dx, x.shape()), Tensor::from_vec(dgamma, &[c]), Tensor::from_vec(dbeta, &[c])))
    }

    fn scored_masks(&self, linears: &[ScoredLinear], sparsity: f64) -> Result<Vec<LinearMask>> {
        // `W ⊙ M` in the CPU's [in, out] layout, built once per step for the forward and the
        // backward product; only the dropped entries are visited (the fewer at learning
        // sparsities). The matrices are independent: one task each.
        linears
            .par_iter()
            .map(|&(w, blocks)| {
                let &[d_in, d_out] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
                let mut masked = data(w)?.to_vec();
                for b in blocks {
                    let scores = data(b.scores)?;
                    ensure!(
                        d_in > 0 && scores.len().is_multiple_of(d_in) && b.row0 + scores.len() / d_in <= d_out,
                        "scores {:?} do not fit a {d_out} x {d_in} weight",
                        b.scores.shape()
                    );
                    for (j, _) in top_k_mask(scores, sparsity).into_iter().enumerate().filter(|(_, k)| !k) {
                        masked[(j % d_in) * d_out + b.row0 + j / d_in] = 0.0;
                    }
                }
                Ok(LinearMask::Applied(Tensor::from_vec(masked, w.shape())))
            })
            .collect()
    }

    fn score_grads(&self, dy: &Tensor, x: &Tensor, w: &Tensor, blocks: &[ScoredRows]) -> Result<Vec<Tensor>> {
        let &[d_in, d_out] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let ((n, dy_cols), (rows, x_cols)) = (as_matrix(dy), as_matrix(x));
        ensure!(
            dy_cols == d_out && x_cols == d_in && n == rows && d_in > 0,
            "score gradient: gradient {:?} and input {:?} for a weight {:?} ([in, out])",
            dy.shape(),
            x.shape(),
            w.shape()
        );
        let (dy, x, w_t) = (data(dy)?, data(x)?, data(w)?);
        blocks
            .iter()
            .map(|b| {
                let scores = data(b.scores)?;
                let rows = scores.len() / d_in;
                ensure!(
                    scores.len() == rows * d_in && b.row0 + rows <= d_out,
                    "scores {:?} at row {} do not fit a {d_out} x {d_in} weight",
                    b.scores.shape(),
                    b.row0
                );
                Ok(Tensor::from_vec(grad::score_grad(dy, x, w_t, scores, b.row0, d_in, d_out), b.scores.shape()))
            })
            .collect()
    }

    fn mask_features(&self, x: Tensor, seqs: &Seqs, time: Option<(&[bool], &Tensor)>, channels: Option<&[bool]>) -> Result<Tensor> {
        let (shape, (_, c)) = (x.shape().to_vec(), as_matrix(&x));
        let mut v = x.into_f32_vec()?;
        if let Some((frames, embedding)) = time {
            let embedding = data(embedding)?;
            for (row, _) in v.chunks_exact_mut(c).zip(frames).filter(|(_, &m)| m) {
                row.copy_from_slice(embedding);
            }
        }
        if let Some(cm) = channels {
            for u in 0..seqs.count() {
                for row in v[seqs.range(u).start * c..seqs.range(u).end * c].chunks_exact_mut(c) {
                    row.iter_mut().zip(&cm[u * c..(u + 1) * c]).filter(|(_, &m)| m).for_each(|(x, _)| *x = 0.0);
                }
            }
        }
        Ok(Tensor::from_vec(v, &shape))
    }

    fn rows(&self, t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        let rows = *t.shape().first().unwrap_or(&0);
        ensure!(start + count <= rows, "rows {start}..{} of a tensor with {rows}", start + count);
        let width = t.numel() / rows.max(1);
        let mut shape = t.shape().to_vec();
        shape[0] = count;
        Ok(Tensor::from_vec(data(t)?[start * width..(start + count) * width].to_vec(), &shape))
    }

    fn weight_norm_grads(&self, dw: &Tensor, g: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        ensure!(dw.shape() == v.shape(), "weight norm gradient {:?} for a direction {:?}", dw.shape(), v.shape());
        ensure!(g.numel() == *v.shape().last().unwrap_or(&0), "weight norm: {} magnitudes for {:?}", g.numel(), v.shape());
        let (dg, dv) = grad::weight_norm_grads(data(dw)?, data(g)?, data(v)?);
        Ok((Tensor::from_vec(dg, g.shape()), Tensor::from_vec(dv, v.shape())))
    }

    fn mul(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "mul: {:?} by {:?}", a.shape(), b.shape());
        let shape = a.shape().to_vec();
        let mut v = a.into_f32_vec()?;
        v.par_iter_mut().zip(data(b)?.par_iter()).for_each(|(x, y)| *x *= y);
        Ok(Tensor::from_vec(v, &shape))
    }

    fn scale(&self, x: Tensor, s: f32) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let mut v = x.into_f32_vec()?;
        v.par_iter_mut().for_each(|x| *x *= s);
        Ok(Tensor::from_vec(v, &shape))
    }

    fn all_finite(&self, xs: &[&Tensor]) -> Result<bool> {
        for x in xs {
            if !data(x)?.par_iter().all(|v| v.is_finite()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn adam_update(&self, p: Tensor, g: &Tensor, m: Tensor, v: Tensor, step: AdamStep) -> Result<(Tensor, Tensor, Tensor)> {
        ensure!(
            p.shape() == g.shape() && p.shape() == m.shape() && p.shape() == v.shape(),
            "Adam: parameter {:?}, gradient {:?}, moments {:?} {:?}",
            p.shape(),
            g.shape(),
            m.shape(),
            v.shape()
        );
        let shape = p.shape().to_vec();
        let (mut p, mut m, mut v) = (p.into_f32_vec()?, m.into_f32_vec()?, v.into_f32_vec()?);
        step.apply(&mut p, data(g)?, &mut m, &mut v);
        Ok((Tensor::from_vec(p, &shape), Tensor::from_vec(m, &shape), Tensor::from_vec(v, &shape)))
    }

    fn mask_features_grad(
        &self,
        dy: Tensor,
        seqs: &Seqs,
        time: Option<&[bool]>,
        channels: Option<&[bool]>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (shape, (_, c)) = (dy.shape().to_vec(), as_matrix(&dy));
        let mut v = dy.into_f32_vec()?;
        let channel_row = |u: usize| channels.map(|cm| &cm[u * c..(u + 1) * c]);
        let mut embedding = time.map(|_| vec![0.0f32; c]);
        for u in 0..seqs.count() {
            let r = seqs.range(u);
            for (t, row) in r.clone().zip(v[r.start * c..r.end * c].chunks_exact_mut(c)) {
                if let (Some(g), Some(frames)) = (embedding.as_mut(), time) {
                    if frames[t] {
                        // The embedding reaches every channel the channel mask did not zero after it.
                        match channel_row(u) {
                            None => math::add_assign(g, row),
                            Some(cm) => g.iter_mut().zip(row.iter()).zip(cm).filter(|(_, &m)| !m).for_each(|((g, r), _)| *g += r),
                        }
                        row.fill(0.0);
                        continue;
                    }
                }
                if let Some(cm) = channel_row(u) {
                    row.iter_mut().zip(cm).filter(|(_, &m)| m).for_each(|(x, _)| *x = 0.0);
                }
            }
        }
        Ok((Tensor::from_vec(v, &shape), embedding.map(|g| Tensor::from_vec(g, &[c]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::rng::SplitMix;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        // Every fifth value exactly 0: sign(0) = 0 must zero the score gradient.
        (0..n).map(|i| if i % 5 == 0 { 0.0 } else { rng.symmetric() }).collect()
    }

    /// The fused GELU + dropout (and its backward) give exactly the separate passes' values:
    /// the mask applied once, after the GELU (before GELU' on the way back), at its own site.
    #[test]
    fn gelu_with_dropout_is_gelu_then_dropout() {
        let be = CpuBackend;
        let x = Tensor::from_vec(random(3000, 1), &[100, 30]);
        let dy = Tensor::from_vec(random(3000, 2), &[100, 30]);
        let d = Dropout { p: 0.3, seed: 5 };
        let fused = be.gelu(&x, SiteDropout::at(Some(d), 9)).unwrap();
        let composed = be.dropout(be.gelu(&x, None).unwrap(), d, 9).unwrap();
        assert_eq!(fused.f32s().unwrap(), composed.f32s().unwrap());
        assert_ne!(fused.f32s().unwrap(), be.gelu(&x, None).unwrap().f32s().unwrap(), "the mask dropped something");
        let fused = be.gelu_grad(&dy, &x, SiteDropout::at(Some(d), 9)).unwrap();
        let composed = be.gelu_grad(&be.dropout(dy.clone(), d, 9).unwrap(), &x, None).unwrap();
        assert_eq!(fused.f32s().unwrap(), composed.f32s().unwrap());
        assert!(SiteDropout::at(Some(Dropout { p: 0.0, seed: 5 }), 9).is_none(), "p = 0 fuses nothing");
    }

    /// A stacked q/k/v-like weight with more rows per block than one gather tile.
    const H: usize = 70;
    const D_IN: usize = 13;

    #[test]
    fn score_gradients_are_the_rows_of_dw_times_the_weight_and_the_score_sign() {
        // More rows per block than one thread's share of the product and one weight-gather tile.
        const ROWS: usize = 600;
        let (be, n) = (CpuBackend, 37);
        let w = random(3 * ROWS * D_IN, 1);
        let (dy, x) = (random(n * 3 * ROWS, 2), random(n * D_IN, 3));
        let (q, v) = (Tensor::from_vec(random(ROWS * D_IN, 4), &[ROWS, D_IN]), Tensor::from_vec(random(ROWS * D_IN, 5), &[ROWS, D_IN]));
        let prepared = be.prepare_linear_weight(&Tensor::from_vec(w.clone(), &[3 * ROWS, D_IN])).unwrap();
        let blocks = [ScoredRows { row0: 0, scores: &q }, ScoredRows { row0: 2 * ROWS, scores: &v }];
        let (dy_t, x_t) = (Tensor::from_vec(dy.clone(), &[n, 3 * ROWS]), Tensor::from_vec(x.clone(), &[n, D_IN]));
        let got = be.score_grads(&dy_t, &x_t, &prepared, &blocks).unwrap();
        let dw = grad::linear_weight_grad(&dy, &x, D_IN, 3 * ROWS);
        for (b, got) in blocks.iter().zip(&got) {
            let rows = b.row0 * D_IN..(b.row0 + ROWS) * D_IN;
            let mut want = dw[rows.clone()].to_vec();
            crate::router::score_grad(&mut want, &w[rows], b.scores.f32s().unwrap());
            assert_eq!(got.shape(), b.scores.shape());
            for (i, (g, w)) in got.f32s().unwrap().iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "block at row {}: {i}: {g} vs {w}", b.row0);
            }
        }
        // A block running past the weight's rows is refused, not read out of bounds.
        let late = ScoredRows { row0: 2 * ROWS + 1, scores: &v };
        assert!(be.score_grads(&dy_t, &x_t, &prepared, &[late]).is_err());
    }

    #[test]
    fn scored_mask_zeroes_exactly_the_dropped_entries_of_each_block() {
        let be = CpuBackend;
        let w: Vec<f32> = (0..3 * H * D_IN).map(|i| 1.0 + i as f32).collect();
        let prepared = be.prepare_linear_weight(&Tensor::from_vec(w.clone(), &[3 * H, D_IN])).unwrap();
        let (q, v) = (Tensor::from_vec(random(H * D_IN, 4), &[H, D_IN]), Tensor::from_vec(random(H * D_IN, 5), &[H, D_IN]));
        let blocks = [ScoredRows { row0: 0, scores: &q }, ScoredRows { row0: 2 * H, scores: &v }];
        let mut made = be.scored_masks(&[(&prepared, &blocks)], 0.3).unwrap();
        let Some(LinearMask::Applied(masked)) = made.pop() else { panic!("the CPU applies its masks") };
        let masked = masked.f32s().unwrap();
        let (keep_q, keep_v) = (top_k_mask(q.f32s().unwrap(), 0.3), top_k_mask(v.f32s().unwrap(), 0.3));
        for o in 0..3 * H {
            for i in 0..D_IN {
                let keep = match o / H {
                    0 => keep_q[o * D_IN + i],
                    1 => true,
                    _ => keep_v[(o - 2 * H) * D_IN + i],
                };
                // [in, out] layout: entry (o, i) of the [out, in] weight sits at i * out + o.
                assert_eq!(masked[i * 3 * H + o], if keep { w[o * D_IN + i] } else { 0.0 }, "({o}, {i})");
            }
        }
    }
}
