//! The CPU backend at `--precision bf16`: linear layers, the feature encoder's convolutions (all
//! but the first) and attention's two products through the AVX512-BF16 GEMM
//! ([`super::gemm_bf16`]: weights and activations rounded to bf16, f32 accumulation; linear
//! weights packed once at load), everything else exactly as the f32 [`CpuBackend`]. Inference
//! only: training keeps f32 on the CPU.

use anyhow::{bail, ensure, Result};

use super::gemm_bf16::{self, PairRows, PANEL};
use super::{as_matrix, attention, conv, data, math, CpuBackend};
use crate::backend::{attention_width, linear_output_shape, Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs, SparseWeight};
use crate::tensor::{DType, HostBytes, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct CpuBf16Backend(());

impl CpuBf16Backend {
    /// Fails, saying so, on a CPU without AVX512-BF16.
    pub fn new() -> Result<CpuBf16Backend> {
        ensure!(
            gemm_bf16::available(),
            "--precision bf16 on the CPU needs AVX512-BF16 (AMD Zen 4, Intel Cooper Lake / Sapphire Rapids or later), \
             which this CPU lacks; use --precision f32 (the default)"
        );
        Ok(CpuBf16Backend(()))
    }
}

/// A packed bf16 weight's `(d_out, d_in)` and its pairs, or `None` for an f32 `[in, out]` one
/// (shapes that do not fill whole panels stay f32).
fn packed(w: &Tensor) -> Result<Option<(usize, usize, &[u32])>> {
    match (w.dtype(), w.shape()) {
        (DType::BF16, &[panels, pairs, PANEL, 2]) => Ok(Some((panels * PANEL, 2 * pairs, as_pairs(w.halves()?)?))),
        (DType::F32, [_, _]) => Ok(None),
        (dt, shape) => bail!("a {dt:?} linear weight of shape {shape:?} is neither packed bf16 nor f32 [in, out]"),
    }
}

/// Packed bf16 bits as the pairs the GEMM reads.
fn as_pairs(bits: &[u16]) -> Result<&[u32]> {
    bytemuck::try_cast_slice(bits).map_err(|e| anyhow::anyhow!("packed bf16 weight bits: {e}"))
}

/// Forwards the ops that stay f32 to the f32 backend.
macro_rules! as_f32_backend {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret { CpuBackend.$name($($arg),*) })*
    };
}

impl Backend for CpuBf16Backend {
    fn name(&self) -> String {
        "cpu (bf16)".into()
    }

    as_f32_backend! {
        synchronize() -> Result<()>;
        take_peak_memory() -> Result<Option<u64>>;
        upload(t: &Tensor) -> Result<Tensor>;
        to_host(t: &Tensor) -> Result<Tensor>;
        prepare_conv_weight(w: &Tensor) -> Result<Tensor>;
        swap_last_two(t: &Tensor) -> Result<Tensor>;
        weight_norm(g: &Tensor, v: &Tensor) -> Result<Tensor>;
        concat_rows(parts: &[&Tensor]) -> Result<Tensor>;
        sparse_pays(sp: &SparseWeight, rows: usize) -> bool;
        linear_sparse(x: &Tensor, sp: &SparseWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor>;
        layer_norm(x: Tensor, residual: Option<&Tensor>, norm: NormParams, act: Activation) -> Result<Tensor>;
        group_norm_time(x: Tensor, seqs: &Seqs, norm: NormParams, act: Activation) -> Result<Tensor>;
        add(a: Tensor, b: &Tensor) -> Result<Tensor>;
        log_softmax(x: &Tensor) -> Result<Tensor>;
        ctc_loss(logits: &Tensor, seqs: &Seqs, targets: &crate::ctc::CtcTargets, grad_scale: f32) -> Result<(Vec<f32>, Tensor)>;
    }

    #[allow(clippy::too_many_arguments)]
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
        let (_, c_in) = as_matrix(x);
        if !conv::packs(w.shape(), c_in, geom) {
            return CpuBackend.conv1d(x, seqs_in, seqs_out, w, b, geom, act);
        }
        // Packed per call (under a millisecond for the largest layer, against its ~70 ms): the
        // weight's shape alone does not say at load whether a call can take the bf16 GEMM.
        let (weight, bias) = (data(w)?, b.map(data).transpose()?);
        let packed = gemm_bf16::pack_weight(weight, w.shape()[0], weight.len() / w.shape()[0]);
        conv::conv1d(data(x)?, x.shape(), seqs_in, seqs_out, weight, w.shape(), bias, geom, act, Some(&packed))
    }

    fn attention(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32) -> Result<Tensor> {
        let c = attention_width(qkv, seqs, heads)?;
        // Odd head sizes (none in released checkpoints) do not split into pairs: f32.
        if !(c / heads).is_multiple_of(2) {
            return CpuBackend.attention(qkv, seqs, heads, scale);
        }
        Ok(Tensor::from_vec(attention::attention_bf16(data(qkv)?, c, seqs, heads, scale), &[seqs.total(), c]))
    }

    /// Whole panels of 32 outputs over an even number of inputs are packed in bf16 (every
    /// transformer linear); other shapes (a CTC head of 47 tokens) stay f32 `[in, out]`.
    fn prepare_linear_weight(&self, w: &Tensor) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        if !gemm_bf16::packable(d_out, d_in) {
            return CpuBackend.prepare_linear_weight(w);
        }
        let bits: Vec<u16> = bytemuck::cast_slice(&gemm_bf16::pack_weight(data(&w.to_f32()?)?, d_out, d_in)).to_vec();
        Tensor::from_host_bytes(HostBytes::Half(bits.into()), DType::BF16, &[d_out / PANEL, d_in / 2, PANEL, 2])
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.linear_segments(x, w, b, act, &[(as_matrix(x).0, None)])
    }

    /// Bits over the `[out, in]` weight as given (the packed layout is indexed from them) for a
    /// packed weight; the f32 backend's for the others.
    fn prepare_mask(&self, bits: &[u8], d_out: usize, d_in: usize) -> Result<LinearMask> {
        if !gemm_bf16::packable(d_out, d_in) {
            return CpuBackend.prepare_mask(bits, d_out, d_in);
        }
        ensure!(bits.len() * 8 >= d_out * d_in, "mask has {} bits for a {d_out} x {d_in} weight", bits.len() * 8);
        Ok(LinearMask::Host(bits.to_vec()))
    }

    fn linear_segments(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor> {
        let Some((d_out, d_in, weight)) = packed(w)? else { return CpuBackend.linear_segments(x, w, b, act, segments) };
        let shape = linear_output_shape("linear", x, (d_in, d_out), b, Some(segments.iter().map(|s| s.0).sum()))?;
        let bias = b.map(data).transpose()?;
        let pairs = d_in / 2;
        let a = gemm_bf16::to_pairs(data(x)?, d_in);
        let mut out = vec![0.0f32; shape.iter().product()];
        let mut row = 0;
        for &(rows, mask) in segments {
            let masked;
            let weight = match mask {
                None => weight,
                Some(LinearMask::Host(bits)) => {
                    masked = gemm_bf16::mask_packed(w.halves()?, bits, d_in);
                    as_pairs(&masked)?
                }
                Some(_) => bail!("a mask prepared for another backend was given to the CPU's bf16 linear"),
            };
            let a = PairRows::dense(&a[row * pairs..(row + rows) * pairs], pairs);
            gemm_bf16::matmul(&mut out[row * d_out..(row + rows) * d_out], a, weight, d_out, 0, |_, c0, y| {
                math::bias_act_rows(y, y.len(), bias.map(|b| &b[c0..c0 + y.len()]), act)
            });
            row += rows;
        }
        Ok(Tensor::from_vec(out, &shape))
    }

    /// Packed weights run dense (the sparse kernels are f32); f32 ones as on the f32 backend.
    fn prepare_sparse(&self, w: &Tensor) -> Result<Option<SparseWeight>> {
        match packed(w)? {
            Some(_) => Ok(None),
            None => CpuBackend.prepare_sparse(w),
        }
    }
}
