//! The CPU backend: f32 throughout, multi-threaded with rayon, GEMMs through the `gemm` crate
//! ([`bf16::CpuBf16Backend`] runs its matrix products in bf16).
//!
//! This is the readable reference every other backend is checked against, and fast enough to be
//! a real engine on a laptop.

pub mod attention;
mod backward;
pub mod bf16;
pub(crate) mod conv;
mod ctc;
pub mod gemm;
pub mod gemm_bf16;
pub mod grad;
pub mod math;
pub mod sparse;
pub mod transpose;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use self::gemm::{matmul_blocked, MatRef};
use self::sparse::SparseLinear;
use super::{attention_width, linear_output_shape, Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs, SparseWeight};
use crate::tensor::{Storage, Tensor};

/// Rows handed to one rayon task by row-wise kernels; large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// The f32 slice of a tensor this backend can compute on, or a clear error.
fn data(t: &Tensor) -> Result<&[f32]> {
    match t.storage() {
        Storage::Host(_) => t.f32s(),
        Storage::Cuda(_) => bail!("a GPU tensor {:?} was passed to the CPU backend", t.shape()),
    }
}

/// The `[in, out]` weight `w` under `mask` (masked into `scratch` when the mask is bits).
fn masked_weight<'a>(w: &'a [f32], mask: Option<&'a LinearMask>, scratch: &'a mut Vec<f32>) -> Result<&'a [f32]> {
    match mask {
        None => Ok(w),
        Some(LinearMask::Host(bits)) => {
            ensure!(bits.len() * 8 >= w.len(), "mask has {} bits for a weight of {} entries", bits.len() * 8, w.len());
            *scratch = crate::mask::apply_bits(w, bits);
            Ok(scratch)
        }
        Some(LinearMask::Applied(t)) => {
            let masked = data(t)?;
            ensure!(masked.len() == w.len(), "a masked weight of {} entries for a weight of {}", masked.len(), w.len());
            Ok(masked)
        }
        Some(LinearMask::Cuda(_)) => bail!("a mask prepared for the GPU was given to the CPU backend"),
    }
}

/// `[rows, cols]` of a tensor used as a matrix (every leading dimension folds into rows).
fn as_matrix(t: &Tensor) -> (usize, usize) {
    let cols = *t.shape().last().unwrap_or(&1);
    (t.numel() / cols.max(1), cols)
}

/// Norm parameters as slices, checked against the channel count.
fn norm_params(norm: NormParams<'_>, c: usize) -> Result<(&[f32], &[f32])> {
    ensure!(
        norm.gamma.numel() == c && norm.beta.numel() == c,
        "norm over {c} channels got {} / {} parameters",
        norm.gamma.numel(),
        norm.beta.numel()
    );
    Ok((data(norm.gamma)?, data(norm.beta)?))
}

/// Per-column sums of `f(value, column)` over the rows of a row-major `[rows, c]` matrix.
fn column_sums(x: &[f32], c: usize, f: impl Fn(f32, usize) -> f64 + Sync) -> Vec<f64> {
    x.par_chunks(ROWS_PER_TASK * c)
        .map(|rows| {
            let mut acc = vec![0.0f64; c];
            for row in rows.chunks_exact(c) {
                acc.iter_mut().zip(row).enumerate().for_each(|(ch, (a, &v))| *a += f(v, ch));
            }
            acc
        })
        .reduce(
            || vec![0.0f64; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

impl Backend for CpuBackend {
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// The process's peak resident set (`VmHWM` in `/proc/self/status`, Linux), then reset to
    /// the current one (`/proc/self/clear_refs`, Linux 4.0 and later). Where the reset is
    /// refused the next reading covers the whole run so far; off Linux, `None`.
    fn take_peak_memory(&self) -> Result<Option<u64>> {
        if !cfg!(target_os = "linux") {
            return Ok(None);
        }
        let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let kib =
            status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        // A refused reset is not an error: the next reading then covers the whole run so far.
        std::fs::write("/proc/self/clear_refs", "5").ok();
        Ok(kib.map(|k| k * 1024))
    }

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        t.to_f32()
    }

    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        t.to_f32()
    }

    fn prepare_conv_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.upload(w)
    }

    fn swap_last_two(&self, t: &Tensor) -> Result<Tensor> {
        let &[a, b, c] = t.shape() else { bail!("swap_last_two: expected a 3-D tensor, found {:?}", t.shape()) };
        let src = t.to_f32()?;
        let x = data(&src)?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut((b * c).max(1)).zip(x.par_chunks((b * c).max(1))).for_each(|(y, x)| transpose::transpose_into(y, x, b, c));
        Ok(Tensor::from_vec(y, &[a, c, b]))
    }

    fn weight_norm(&self, g: &Tensor, v: &Tensor) -> Result<Tensor> {
        let kernel = *v.shape().last().unwrap_or(&0);
        ensure!(g.numel() == kernel, "weight norm: {} magnitudes for a kernel of {kernel}", g.numel());
        let (g, v_host) = (g.to_f32()?, v.to_f32()?);
        let (g, x) = (data(&g)?, data(&v_host)?);
        let mut norm = vec![0.0f64; kernel];
        for (i, &e) in x.iter().enumerate() {
            norm[i % kernel] += e as f64 * e as f64;
        }
        let w = x.iter().enumerate().map(|(i, &e)| (g[i % kernel] as f64 * e as f64 / norm[i % kernel].sqrt()) as f32).collect();
        Ok(Tensor::from_vec(w, v.shape()))
    }

    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let Some(first) = parts.first() else { bail!("concat_rows: nothing to stack") };
        let inner = &first.shape()[1..];
        let mut rows = 0;
        let mut out = Vec::new();
        for p in parts {
            ensure!(&p.shape()[1..] == inner, "concat_rows: {:?} does not stack with {:?}", p.shape(), first.shape());
            rows += p.shape()[0];
            out.extend_from_slice(data(&p.to_f32()?)?);
        }
        let shape: Vec<usize> = std::iter::once(rows).chain(inner.iter().copied()).collect();
        Ok(Tensor::from_vec(out, &shape))
    }

    fn prepare_linear_weight(&self, w: &Tensor) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let src = w.to_f32()?;
        Ok(Tensor::from_vec(transpose::transpose(data(&src)?, d_out, d_in), &[d_in, d_out]))
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.linear_segments(x, w, b, act, &[(as_matrix(x).0, None)])
    }

    fn prepare_mask(&self, bits: &[u8], d_out: usize, d_in: usize) -> Result<LinearMask> {
        ensure!(bits.len() * 8 >= d_out * d_in, "mask has {} bits for a {d_out} x {d_in} weight", bits.len() * 8);
        let keep = crate::mask::unpack(bits, d_out * d_in);
        Ok(LinearMask::Host(crate::mask::pack(&(0..d_in * d_out).map(|j| keep[(j % d_out) * d_in + j / d_out]).collect::<Vec<_>>())))
    }

    fn prepare_sparse(&self, w: &Tensor) -> Result<Option<SparseWeight>> {
        let &[d_in, d_out] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let values = data(w)?;
        if !sparse::worth_compressing(values) {
            return Ok(None);
        }
        Ok(SparseLinear::from_in_out(values, d_in, d_out).map(SparseWeight::Cpu))
    }

    fn sparse_pays(&self, sp: &SparseWeight, rows: usize) -> bool {
        sparse::sparse_pays(1.0 - sp.density(), rows, sparse::CPU_LARGE_BATCH_DROPPED)
    }

    fn linear_sparse(&self, x: &Tensor, sp: &SparseWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let shape = sp.output_shape(x, b)?;
        let SparseWeight::Cpu(sp) = sp else { bail!("a sparse weight built on the GPU was given to the CPU backend") };
        let y = sp.forward(data(x)?, b.map(data).transpose()?, act);
        Ok(Tensor::from_vec(y, &shape))
    }

    fn linear_segments(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor> {
        let &[d_in, d_out] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let shape = linear_output_shape("linear", x, (d_in, d_out), b, Some(segments.iter().map(|s| s.0).sum()))?;
        let bias = b.map(data).transpose()?;
        let (x, w) = (data(x)?, data(w)?);
        let mut out = vec![0.0f32; shape.iter().product()];
        let mut row = 0;
        for &(rows, mask) in segments {
            let mut scratch = Vec::new();
            let weight = masked_weight(w, mask, &mut scratch)?;
            let (xs, os) = (&x[row * d_in..(row + rows) * d_in], &mut out[row * d_out..(row + rows) * d_out]);
            matmul_blocked(os, MatRef::row_major(xs, rows, d_in), MatRef::row_major(weight, d_in, d_out), |_, r| {
                math::bias_act_rows(r, d_out, bias, act)
            });
            row += rows;
        }
        Ok(Tensor::from_vec(out, &shape))
    }

    fn layer_norm(&self, x: Tensor, residual: Option<&Tensor>, norm: NormParams, act: Activation) -> Result<Tensor> {
        let (_, c) = as_matrix(&x);
        let shape = x.shape().to_vec();
        let (g, b) = norm_params(norm, c)?;
        let mut out = x.into_f32_vec()?;
        let residual = match residual {
            Some(r) => {
                ensure!(r.shape() == shape, "residual {:?} does not match {shape:?}", r.shape());
                Some(data(r)?)
            }
            None => None,
        };
        out.par_chunks_mut(ROWS_PER_TASK * c).enumerate().for_each(|(i, rows)| {
            if let Some(r) = residual {
                let start = i * ROWS_PER_TASK * c;
                math::add_assign(rows, &r[start..start + rows.len()]);
            }
            math::layer_norm_rows(rows, g, b, norm.eps);
            math::bias_act_rows(rows, c, None, act);
        });
        Ok(Tensor::from_vec(out, &shape))
    }

    fn group_norm_time(&self, x: Tensor, seqs: &Seqs, norm: NormParams, act: Activation) -> Result<Tensor> {
        let (rows, c) = as_matrix(&x);
        ensure!(rows == seqs.total(), "group norm: {rows} frames but the batch holds {}", seqs.total());
        let (g, b) = norm_params(norm, c)?;
        let shape = x.shape().to_vec();
        let mut out = x.into_f32_vec()?;
        for u in 0..seqs.count() {
            let r = seqs.range(u);
            let frames = &mut out[r.start * c..r.end * c];
            // Per-channel statistics over this utterance's frames only, accumulated in f64
            // (thousands of frames) over row blocks in parallel.
            let n = r.len() as f64;
            let mean = column_sums(frames, c, |v, _| v as f64).into_iter().map(|s| s / n).collect::<Vec<_>>();
            let var = column_sums(frames, c, |v, ch| (v as f64 - mean[ch]).powi(2));
            let scale: Vec<f32> = var.iter().zip(g).map(|(v, g)| (1.0 / (v / n + norm.eps as f64).sqrt()) as f32 * g).collect();
            let shift: Vec<f32> = mean.iter().zip(&scale).zip(b).map(|((m, s), b)| b - *m as f32 * s).collect();
            frames.par_chunks_mut(ROWS_PER_TASK * c).for_each(|rows| math::scale_shift_act_rows(rows, &scale, &shift, act));
        }
        Ok(Tensor::from_vec(out, &shape))
    }

    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let shape = a.shape().to_vec();
        let mut out = a.into_f32_vec()?;
        let chunk = ROWS_PER_TASK * 1024;
        out.par_chunks_mut(chunk).zip(data(b)?.par_chunks(chunk)).for_each(|(x, y)| math::add_assign(x, y));
        Ok(Tensor::from_vec(out, &shape))
    }

    fn conv1d(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        act: Activation,
    ) -> Result<Tensor> {
        conv::conv1d(data(x)?, x.shape(), seqs_in, seqs_out, data(w)?, w.shape(), b.map(data).transpose()?, geom, act, None)
    }

    fn attention(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32) -> Result<Tensor> {
        let c = attention_width(qkv, seqs, heads)?;
        Ok(Tensor::from_vec(attention::attention(data(qkv)?, c, seqs, heads, scale, None), &[seqs.total(), c]))
    }

    fn ctc_loss(&self, logits: &Tensor, seqs: &Seqs, targets: &crate::ctc::CtcTargets, grad_scale: f32) -> Result<(Vec<f32>, Tensor)> {
        let (_, vocab) = as_matrix(logits);
        let (losses, grad) = ctc::ctc_loss(data(logits)?, vocab, seqs, targets, grad_scale)?;
        Ok((losses, Tensor::from_vec(grad, logits.shape())))
    }

    fn log_softmax(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c) = as_matrix(x);
        let mut out = data(x)?.to_vec();
        out.par_chunks_mut(c.max(1)).for_each(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            row.iter_mut().for_each(|v| *v -= lse);
        });
        Ok(Tensor::from_vec(out, x.shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_memory_covers_what_was_just_touched() {
        let be = CpuBackend;
        be.take_peak_memory().unwrap();
        let touched = std::hint::black_box(vec![1u8; 64 << 20]);
        let peak = be.take_peak_memory().unwrap();
        if cfg!(target_os = "linux") {
            assert!(peak.is_some_and(|p| p >= 64 << 20), "peak {peak:?} is below the 64 MiB just touched");
        }
        drop(touched);
    }
}
