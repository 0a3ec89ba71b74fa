//! The GPU's training ops (kernels/backward.cu, and the attention backward in
//! kernels/attention.cu), each the counterpart of the CPU adapter in `cpu/backward.rs`. Weight
//! and score gradients take their activations transposed once and run through the cp.async
//! tensor-core GEMMs (3xTF32 in fp32, bf16 otherwise); input gradients read a masked transposed
//! copy of the weight built per call (the strided FMA GEMM with `tf32x3` off). Attention: a
//! flash-style kernel on tensor cores (bf16, fp32 as 3xTF32) for dK and dV, and a batched GEMM
//! over the scale dS slabs it leaves for dQ (`fused_attention_grad` in mod.rs); with `tf32x3`
//! off, fp32 FMA through T x T probabilities per utterance.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::launch::{self, GemmArgs, MaskWords, StridedGemm, TopkSegment};
use super::{dropout_args, CudaBackend, CudaBuf, Precision};
use crate::backend::backward::{AttentionSaved, Backward, NormGrads, ScoredLinear, ScoredRows};
use crate::backend::{Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs};
use crate::dropout::{Dropout, SiteDropout};
use crate::router::kept;
use crate::tensor::{DType, Tensor};
use crate::train::adam::AdamStep;

/// Scores per block of the top-k tie kernels (32 per thread, 256 threads; kernels/backward.cu).
const TOPK_PER_BLOCK: usize = 32 * 256;

/// Rows per block of a column reduction's first pass (kernels/backward.cu, `COLUMN_CHUNK`).
const COLUMN_CHUNK: usize = 128;

/// `[rows, cols]` of a tensor used as a matrix.
fn matrix(t: &Tensor) -> (usize, usize) {
    let cols = *t.shape().last().unwrap_or(&1);
    (t.numel() / cols.max(1), cols)
}

/// The operands of a weight gradient `dW = dyᵀ · x`: as they are for the fp32 strided FMA GEMM,
/// or transposed once (bf16, or fp32 for 3xTF32) for the cp.async tensor-core GEMMs, shared by
/// the blocks of a stacked weight.
enum WeightGradOperands<'t> {
    F32 { dy: &'t Tensor, x: &'t Tensor },
    Transposed { dyt: Tensor, xt: Tensor, k: usize },
}

impl CudaBackend {
    fn strided_gemm(&self, g: StridedGemm, batch: usize) -> Result<()> {
        if g.m == 0 || g.n == 0 || batch == 0 {
            return Ok(());
        }
        let grid = ((g.n as usize).div_ceil(64) as u32, (g.m as usize).div_ceil(64) as u32, batch as u32);
        // Every kernel: 64 x 64 tiles, 256 threads; bf16 rounds the operands for the tensor
        // cores, 3xTF32 keeps fp32 accuracy on them.
        let kernel = match self.precision() {
            Precision::F32 if self.tf32x3() => "gemm_strided_tf32x3",
            Precision::F32 => "gemm_strided_f32",
            Precision::Bf16 => "gemm_strided_bf16",
        };
        self.launcher().launch(self.func(kernel), launch::config(grid, 256), |b| {
            b.arg(&g);
        })
    }

    /// A weight as the fp32 training kernels read it (`[out, in]`, or a conv's time-major
    /// layout): itself, or an fp32 copy of a bf16 one.
    fn f32_weight(&self, w: &Tensor) -> Result<Tensor> {
        match w.dtype() {
            DType::F32 => Ok(w.clone()),
            DType::BF16 => self.to_f32(w),
            other => bail!("training weights in {other:?} are not supported"),
        }
    }

    /// `[cols, rows]` transpose of an fp32 (or bf16, into bf16) `[rows, cols]` activation into `dtype`,
    /// rows padded with zeros to a multiple of 8 (the tensor-core GEMMs' K); returns it and the
    /// padded length.
    fn transposed(&self, x: &Tensor, dtype: DType) -> Result<(Tensor, usize)> {
        let (rows, cols) = matrix(x);
        let padded = rows.div_ceil(8).max(1) * 8;
        let out = self.empty(&[cols, padded], dtype)?;
        let kernel = match (x.dtype(), dtype) {
            (DType::F32, DType::BF16) => "transpose_to_bf16",
            (DType::F32, DType::F32) => "transpose_to_f32",
            (DType::BF16, DType::BF16) => "transpose_bf16",
            (from, to) => bail!("gradient operand: no transpose from {from:?} to {to:?}"),
        };
        let (px, po, rows_i, cols_i, padded_i) = (self.ptr(x)?, self.ptr(&out)?, rows as i32, cols as i32, padded as i32);
        self.launcher().tiles_32(self.func(kernel), padded, cols, |b| {
            b.arg(&px).arg(&po).arg(&rows_i).arg(&cols_i).arg(&padded_i);
        })?;
        Ok((out, padded))
    }

    /// `(W ⊙ M)ᵀ` (`[in, out]`, W's dtype) of a `[out, in]` weight: the B operand of its input
    /// gradient on the cp.async tensor-core GEMMs, built per call (cheap next to the product:
    /// ~9 MB for an FFN weight in fp32), so the mask needs no transposed copy.
    fn masked_transpose(&self, w: &Tensor, mask: u64) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let kernel = match w.dtype() {
            DType::BF16 => "transpose_mask_bf16",
            DType::F32 => "transpose_mask_f32",
            other => bail!("training weights in {other:?} are not supported"),
        };
        let wt = self.empty(&[d_in, d_out], w.dtype())?;
        let (pw, pwt, d_out_i, d_in_i) = (self.ptr(w)?, self.ptr(&wt)?, d_out as i32, d_in as i32);
        self.launcher().tiles_32(self.func(kernel), d_out, d_in, |b| {
            b.arg(&pw).arg(&mask).arg(&pwt).arg(&d_out_i).arg(&d_in_i);
        })?;
        Ok(wt)
    }

    /// `dx = dy · (W ⊙ M)` on tensor cores, through `(W ⊙ M)ᵀ`: mma.sync in bf16, 3xTF32 in
    /// fp32 (the pipelined 128 x 128 `gemm_tf32x3`, where the strided kernel stages its tiles
    /// through scalar loads without a pipeline).
    fn linear_input_grad_transposed(&self, dy: &Tensor, w: &Tensor, mask: u64) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let (n, _) = matrix(dy);
        let wt = self.masked_transpose(w, mask)?;
        let out = self.empty(&[n, d_in], DType::F32)?;
        let (dy, dy16) = match w.dtype() {
            DType::BF16 => self.gemm_operand(dy, self.mma_rows(d_out), "input gradient's output gradient")?,
            _ => (dy.clone(), None),
        };
        let a16 = dy16.as_ref().map(|t| self.ptr(t)).transpose()?;
        let args = GemmArgs {
            a: self.ptr(&dy)?,
            lda: d_out as i64,
            b: self.ptr(&wt)?,
            ldb: d_out as i64,
            c: self.ptr(&out)?,
            ldc: d_in as i64,
            m: n as i32,
            n: d_in as i32,
            k: d_out as i32,
            ..GemmArgs::default()
        };
        self.gemm(args, a16, w.dtype(), 1)?;
        Ok(out)
    }

    /// The operands of `dW = dyᵀ · x` as this precision's GEMM reads them.
    fn weight_grad_operands<'t>(&self, dy: &'t Tensor, x: &'t Tensor) -> Result<WeightGradOperands<'t>> {
        let ((n, _), (rows, _)) = (matrix(dy), matrix(x));
        ensure!(n == rows, "linear weight gradient: {n} gradient rows for {rows} input rows");
        let dtype = match self.precision() {
            Precision::Bf16 => DType::BF16,
            Precision::F32 if self.tf32x3() => DType::F32,
            Precision::F32 => {
                ensure!(dy.dtype() == DType::F32 && x.dtype() == DType::F32, "the fp32 weight gradient reads f32 operands");
                return Ok(WeightGradOperands::F32 { dy, x });
            }
        };
        let ((dyt, k), (xt, _)) = (self.transposed(dy, dtype)?, self.transposed(x, dtype)?);
        Ok(WeightGradOperands::Transposed { dyt, xt, k })
    }

    /// Rows `row0 ..` of `dW = dyᵀ · x` into `out` (`[rows, d_in]`), each output finished with
    /// the straight-through product when `st` gives `W` and the scores from those rows on.
    fn weight_grad_rows(&self, ops: &WeightGradOperands, row0: usize, out: &Tensor, st: Option<(&Tensor, &Tensor)>) -> Result<()> {
        let (rows, d_in) = matrix(out);
        let (st_w, st_s, st_w_dtype) = match st {
            Some((w, scores)) => {
                let size = w.dtype().size_of();
                (self.ptr(w)? + (row0 * d_in * size) as u64, self.ptr(scores)?, w.dtype())
            }
            None => (0, 0, DType::F32),
        };
        match ops {
            WeightGradOperands::F32 { dy, x } => {
                ensure!(st_w_dtype == DType::F32, "the fp32 score gradient reads an fp32 weight");
                let (n, d_out) = matrix(dy);
                let g = StridedGemm {
                    a: self.ptr(dy)? + (row0 * 4) as u64,
                    a_sm: 1,
                    a_sk: d_out as i64,
                    b: self.ptr(x)?,
                    b_sk: d_in as i64,
                    b_sn: 1,
                    c: self.ptr(out)?,
                    ldc: d_in as i64,
                    m: rows as i32,
                    n: d_in as i32,
                    k: n as i32,
                    alpha: 1.0,
                    st_w,
                    st_s,
                    ..StridedGemm::default()
                };
                self.strided_gemm(g, 1)
            }
            // Tensor cores: both operands transposed with K padded to 8; a row offset of the
            // transposed `dy` keeps its 16-byte alignment.
            WeightGradOperands::Transposed { dyt, xt, k } => {
                let dtype = dyt.dtype();
                let args = GemmArgs {
                    a: self.ptr(dyt)? + (row0 * k * dtype.size_of()) as u64,
                    lda: *k as i64,
                    b: self.ptr(xt)?,
                    ldb: *k as i64,
                    c: self.ptr(out)?,
                    ldc: d_in as i64,
                    m: rows as i32,
                    n: d_in as i32,
                    k: *k as i32,
                    st_w,
                    st_s,
                    st_w_bf16: (st_w_dtype == DType::BF16) as i32,
                    ..GemmArgs::default()
                };
                let aligned = if dtype == DType::BF16 { args.tensor_core_ok() } else { args.tf32x3_ok() };
                ensure!(aligned, "{dtype:?} weight gradient: operands not aligned for the tensor-core GEMM");
                self.gemm(args, (dtype == DType::BF16).then_some(args.a), dtype, 1)
            }
        }
    }

    /// The N column reductions of kernel `name` (arguments `inputs`, then the partials, rows
    /// and columns) over `rows` x `c`, each `[c]` in fp32: partial sums in f64 per chunk of
    /// [`COLUMN_CHUNK`] rows and 32 columns, then each column's chunks added in order.
    fn column_reduce<const N: usize>(&self, name: &str, inputs: &[u64], rows: usize, c: usize) -> Result<[Tensor; N]> {
        let chunks = rows.div_ceil(COLUMN_CHUNK).max(1);
        // SAFETY: the first pass writes every partial (each block its chunk's, zero when empty).
        let partials = unsafe { self.stream.alloc::<f64>(N * chunks * c.max(1)) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let (pp, rows_i, c_i, chunks_i) = (self.slice_ptr(&partials), rows as i32, c as i32, chunks as i32);
        self.launcher().launch(self.func(name), launch::config((c.div_ceil(32).max(1) as u32, chunks as u32, 1), 256), |b| {
            for p in inputs {
                b.arg(p);
            }
            b.arg(&pp).arg(&rows_i).arg(&c_i);
        })?;
        let mut sums = Vec::with_capacity(N);
        for i in 0..N {
            let out = self.empty(&[c], DType::F32)?;
            let (pi, po) = (pp + (i * chunks * c * 8) as u64, self.ptr(&out)?);
            self.launcher().elementwise(self.func("column_partials_sum"), c, |b| {
                b.arg(&pi).arg(&po).arg(&chunks_i).arg(&c_i);
            })?;
            sums.push(out);
        }
        sums.try_into().map_err(|_| anyhow!("column reduction {name}: fewer than {N} sums"))
    }

    fn copy_to_device<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(|e| anyhow!("CUDA copy: {e}"))
    }

    fn flags(&self, f: &[bool]) -> Result<CudaSlice<u8>> {
        self.copy_to_device(&f.iter().map(|&b| b as u8).collect::<Vec<u8>>())
    }

    /// The utterance of each packed row.
    fn row_utterances(&self, seqs: &Seqs) -> Result<CudaSlice<i32>> {
        let rows: Vec<i32> = (0..seqs.count()).flat_map(|u| std::iter::repeat_n(u as i32, seqs.lens()[u])).collect();
        self.copy_to_device(&rows)
    }

    fn slice_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// One elementwise kernel `(inputs..., out, n, p, site key)` into a fresh output of `shape`
    /// and `dtype`, the dropout's mask fused in (p = 0: none).
    fn map_elements_dropped(
        &self,
        name: &str,
        inputs: &[&Tensor],
        shape: &[usize],
        dtype: DType,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        let out = self.empty(shape, dtype)?;
        let ptrs: Vec<u64> = inputs.iter().map(|t| self.ptr(t)).collect::<Result<_>>()?;
        let (po, n) = (self.ptr(&out)?, out.numel() as i64);
        let (p, key) = dropout_args(dropout);
        self.launcher().elementwise(self.func(name), n as usize, |b| {
            for p in &ptrs {
                b.arg(p);
            }
            b.arg(&po).arg(&n).arg(&p).arg(&key);
        })?;
        Ok(out)
    }

    /// `[heads, T, T]` scores `q kᵀ` of utterance `u` into `s`, then the probabilities (kept
    /// in `s`) and the dropped probabilities (`pd`).
    #[allow(clippy::too_many_arguments)]
    fn attention_probs(
        &self,
        qkv: u64,
        seqs: &Seqs,
        u: usize,
        heads: usize,
        c: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
        s: u64,
        pd: u64,
    ) -> Result<()> {
        let (r0, t) = (seqs.range(u).start, seqs.lens()[u]);
        let hd = (c / heads) as i64;
        let (c3, tt) = (3 * c as i64, (t * t) as i64);
        let base = qkv + (r0 as u64) * 3 * c as u64 * 4;
        self.strided_gemm(
            StridedGemm {
                a: base,
                a_sm: c3,
                a_sk: 1,
                batch_a: hd,
                b: base + c as u64 * 4,
                b_sk: 1,
                b_sn: c3,
                batch_b: hd,
                c: s,
                ldc: t as i64,
                batch_c: tt,
                m: t as i32,
                n: t as i32,
                k: hd as i32,
                alpha: 1.0,
                ..StridedGemm::default()
            },
            heads,
        )?;
        let (p, key) = dropout_args(dropout);
        let (t_i, heads_i, r0_i) = (t as i32, heads as i32, r0 as i32);
        self.launcher().rows_per_warp(self.func("attention_softmax_f32"), heads * t, |b| {
            b.arg(&s).arg(&pd).arg(&t_i).arg(&heads_i).arg(&r0_i).arg(&scale).arg(&p).arg(&key);
        })
    }
}

impl Backward for CudaBackend {
    fn dropout(&self, x: Tensor, d: Dropout, site: u64) -> Result<Tensor> {
        let out = self.empty(x.shape(), DType::F32)?;
        let (px, po, n, key) = (self.ptr(&x)?, self.ptr(&out)?, x.numel() as i64, d.site_key(site));
        self.launcher().elementwise(self.func("dropout_f32"), n as usize, |b| {
            b.arg(&px).arg(&po).arg(&n).arg(&d.p).arg(&key);
        })?;
        Ok(out)
    }

    /// One pass: the dropout, the join and the norm in the layer norm kernel, the sum kept.
    fn dropout_add_norm(&self, y: Tensor, dropout: Option<SiteDropout>, residual: &Tensor, norm: NormParams) -> Result<(Tensor, Tensor)> {
        let sum = self.empty(y.shape(), DType::F32)?;
        let normed = self.layer_norm_kernel(&y, Some(residual), norm, Activation::Identity, Some(&sum), dropout)?;
        Ok((sum, normed))
    }

    fn gelu(&self, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        self.map_elements_dropped("gelu_f32", &[x], x.shape(), DType::F32, dropout)
    }

    /// bf16 where the linears reading it run on tensor cores (their input width a multiple of 8).
    fn gelu_as_operand(&self, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        if self.mma_rows(matrix(x).1) {
            return self.map_elements_dropped("gelu_bf16", &[x], x.shape(), DType::BF16, dropout);
        }
        self.gelu(x, dropout)
    }

    fn relu_grad(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        ensure!(dy.shape() == y.shape(), "ReLU backward: gradient {:?} for an output {:?}", dy.shape(), y.shape());
        self.map_elements_dropped("relu_grad_f32", &[dy, y], y.shape(), DType::F32, None)
    }

    fn gelu_grad(&self, dy: &Tensor, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        ensure!(dy.shape() == x.shape(), "GELU backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        self.map_elements_dropped("gelu_grad_f32", &[dy, x], x.shape(), DType::F32, dropout)
    }

    /// bf16 where the GEMMs reading it run on tensor cores (its width a multiple of 8).
    fn gelu_grad_as_operand(&self, dy: &Tensor, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        ensure!(dy.shape() == x.shape(), "GELU backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        if self.mma_rows(matrix(x).1) {
            return self.map_elements_dropped("gelu_grad_bf16", &[dy, x], x.shape(), DType::BF16, dropout);
        }
        self.gelu_grad(dy, x, dropout)
    }

    fn linear_input_grad(&self, dy: &Tensor, w: &Tensor, mask: Option<&LinearMask>) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let (n, cols) = matrix(dy);
        ensure!(cols == d_out, "linear backward: gradient has {cols} columns for a weight with {d_out} outputs");
        let mask = match mask {
            None => 0,
            Some(LinearMask::Cuda(bits)) => bits.0.device_ptr(&self.stream).0,
            Some(LinearMask::Host(_) | LinearMask::Applied(_)) => bail!("a mask prepared for the CPU was given to the CUDA backend"),
        };
        match w.dtype() {
            DType::BF16 => return self.linear_input_grad_transposed(dy, w, mask),
            DType::F32 => ensure!(dy.dtype() == DType::F32, "the fp32 input gradient reads an f32 output gradient"),
            other => bail!("training weights in {other:?} are not supported"),
        }
        // 3xTF32 where gemm_tf32x3's 16-byte chunks fit (rows of whole chunks, as every
        // wav2vec2 width is); the strided kernel otherwise, and for the FMA path.
        if self.tf32x3() && d_out.is_multiple_of(4) && d_in.is_multiple_of(4) {
            return self.linear_input_grad_transposed(dy, w, mask);
        }
        let out = self.empty(&[n, d_in], DType::F32)?;
        let g = StridedGemm {
            a: self.ptr(dy)?,
            a_sm: d_out as i64,
            a_sk: 1,
            b: self.ptr(w)?,
            b_sk: d_in as i64,
            b_sn: 1,
            mask,
            c: self.ptr(&out)?,
            ldc: d_in as i64,
            m: n as i32,
            n: d_in as i32,
            k: d_out as i32,
            alpha: 1.0,
            ..StridedGemm::default()
        };
        self.strided_gemm(g, 1)?;
        Ok(out)
    }

    fn linear_weight_grad(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        let ops = self.weight_grad_operands(dy, x)?;
        let out = self.empty(&[matrix(dy).1, matrix(x).1], DType::F32)?;
        self.weight_grad_rows(&ops, 0, &out, None)?;
        Ok(out)
    }

    fn column_sum(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, c) = matrix(x);
        let kernel = match x.dtype() {
            DType::F32 => "column_sum_f32",
            DType::BF16 => "column_sum_bf16",
            other => bail!("column sum of a {other:?} matrix"),
        };
        let [sum] = self.column_reduce(kernel, &[self.ptr(x)?], rows, c)?;
        Ok(sum)
    }

    fn layer_norm_grads(&self, dy: &Tensor, x: &Tensor, norm: NormParams, params: bool) -> Result<NormGrads> {
        ensure!(dy.shape() == x.shape(), "layer norm backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        let (rows, c) = matrix(x);
        ensure!(norm.gamma.numel() == c, "layer norm over {c} channels has {} weights", norm.gamma.numel());
        let dx = self.empty(x.shape(), DType::F32)?;
        let stats = self.empty(&[rows.max(1), 2], DType::F32)?;
        let (pdy, px, pg, pdx, ps) = (self.ptr(dy)?, self.ptr(x)?, self.ptr(norm.gamma)?, self.ptr(&dx)?, self.ptr(&stats)?);
        let (rows_i, c_i) = (rows as i32, c as i32);
        self.launcher().rows_per_warp(self.func("layer_norm_grad_f32"), rows, |b| {
            b.arg(&pdy).arg(&px).arg(&pg).arg(&norm.eps).arg(&pdx).arg(&ps).arg(&rows_i).arg(&c_i);
        })?;
        if !params {
            return Ok((dx, None));
        }
        let [dgamma, dbeta] = self.column_reduce("layer_norm_param_grad_f32", &[pdy, px, ps], rows, c)?;
        Ok((dx, Some((dgamma, dbeta))))
    }

    fn attention_dropout_saved(
        &self,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<AttentionSaved> {
        if self.flash_kernels(qkv.dtype())?.is_none() {
            return Ok(AttentionSaved { out: self.attention_dropout(qkv, seqs, heads, scale, dropout)?, lse: None });
        }
        // The flash kernel writes each row's log-sum-exp along: with the output, all its backward needs.
        let lse = self.empty(&[seqs.total(), heads], DType::F32)?;
        let out = self.fused_attention(qkv, seqs, heads, scale, Some(&lse), dropout.filter(|d| d.dropout.is_active()))?;
        Ok(AttentionSaved { out, lse: Some(lse) })
    }

    fn attention_grad_saved(
        &self,
        d_out: &Tensor,
        qkv: &Tensor,
        saved: &AttentionSaved,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        match &saved.lse {
            Some(lse) => {
                let dropout = dropout.filter(|d| d.dropout.is_active());
                self.fused_attention_grad(d_out, qkv, seqs, heads, scale, dropout, Some((&saved.out, lse)))
            }
            None => self.attention_grad(d_out, qkv, seqs, heads, scale, dropout),
        }
    }

    fn attention_dropout(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32, dropout: Option<SiteDropout>) -> Result<Tensor> {
        // On tensor cores (bf16, fp32 as 3xTF32): the flash-style kernel, whose backward
        // (`attention_grad`) runs it again for its log-sum-exp (`attention_grad_saved` need not). fp32 FMA without dropout: the
        // exact fused kernel, which gives what the backward's T x T recomputation does; with
        // dropout, that recomputation's path.
        let dropout = dropout.filter(|d| d.dropout.is_active());
        if self.flash_kernels(qkv.dtype())?.is_some() || dropout.is_none() {
            return self.fused_attention(qkv, seqs, heads, scale, None, dropout);
        }
        let (rows, c3) = matrix(qkv);
        ensure!(rows == seqs.total() && c3 % 3 == 0, "attention: {:?} does not hold q, k, v of {} frames", qkv.shape(), seqs.total());
        let c = c3 / 3;
        let hd = (c / heads) as i64;
        let out = self.empty(&[rows, c], DType::F32)?;
        let (pq, po) = (self.ptr(qkv)?, self.ptr(&out)?);
        for u in (0..seqs.count()).filter(|&u| seqs.lens()[u] > 0) {
            let (r0, t) = (seqs.range(u).start as u64, seqs.lens()[u]);
            let (s, pd) = (self.empty(&[heads, t, t], DType::F32)?, self.empty(&[heads, t, t], DType::F32)?);
            let (ps, ppd) = (self.ptr(&s)?, self.ptr(&pd)?);
            self.attention_probs(pq, seqs, u, heads, c, scale, dropout, ps, ppd)?;
            // O = (P ⊙ D) V per head.
            let g = StridedGemm {
                a: ppd,
                a_sm: t as i64,
                a_sk: 1,
                batch_a: (t * t) as i64,
                b: pq + (r0 * 3 * c as u64 + 2 * c as u64) * 4,
                b_sk: c3 as i64,
                b_sn: 1,
                batch_b: hd,
                c: po + r0 * c as u64 * 4,
                ldc: c as i64,
                batch_c: hd,
                m: t as i32,
                n: hd as i32,
                k: t as i32,
                alpha: 1.0,
                ..StridedGemm::default()
            };
            self.strided_gemm(g, heads)?;
        }
        Ok(out)
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
        let (rows, c3) = matrix(qkv);
        ensure!(
            d_out.numel() * 3 == qkv.numel() && rows == seqs.total(),
            "attention backward: gradient {:?} for qkv {:?}",
            d_out.shape(),
            qkv.shape()
        );
        let dropout = dropout.filter(|d| d.dropout.is_active());
        if self.flash_kernels(qkv.dtype())?.is_some() {
            return self.fused_attention_grad(d_out, qkv, seqs, heads, scale, dropout, None);
        }
        let c = c3 / 3;
        let hd = (c / heads) as i64;
        let d_qkv = self.empty(qkv.shape(), DType::F32)?;
        let (pq, pdo, pdq) = (self.ptr(qkv)?, self.ptr(d_out)?, self.ptr(&d_qkv)?);
        let (c_u, c3_i) = (c as u64, c3 as i64);
        for u in (0..seqs.count()).filter(|&u| seqs.lens()[u] > 0) {
            let (r0, t) = (seqs.range(u).start as u64, seqs.lens()[u]);
            let (ti, tt) = (t as i64, (t * t) as i64);
            let (s, pd) = (self.empty(&[heads, t, t], DType::F32)?, self.empty(&[heads, t, t], DType::F32)?);
            let (ps, ppd) = (self.ptr(&s)?, self.ptr(&pd)?);
            self.attention_probs(pq, seqs, u, heads, c, scale, dropout, ps, ppd)?;
            let (q, k, v) = (pq + r0 * 3 * c_u * 4, pq + (r0 * 3 * c_u + c_u) * 4, pq + (r0 * 3 * c_u + 2 * c_u) * 4);
            let (dq, dk, dv) = (pdq + r0 * 3 * c_u * 4, pdq + (r0 * 3 * c_u + c_u) * 4, pdq + (r0 * 3 * c_u + 2 * c_u) * 4);
            let d_o = pdo + r0 * c_u * 4;
            let per_head = |a: u64,
                            a_sm: i64,
                            a_sk: i64,
                            batch_a: i64,
                            b: u64,
                            b_sk: i64,
                            b_sn: i64,
                            batch_b: i64,
                            out: u64,
                            ldc: i64,
                            batch_c: i64,
                            n: i64,
                            k: i64| StridedGemm {
                a,
                a_sm,
                a_sk,
                batch_a,
                b,
                b_sk,
                b_sn,
                batch_b,
                c: out,
                ldc,
                batch_c,
                m: t as i32,
                n: n as i32,
                k: k as i32,
                alpha: 1.0,
                ..StridedGemm::default()
            };
            // dV = (P ⊙ D)ᵀ dO.
            self.strided_gemm(per_head(ppd, 1, ti, tt, d_o, c as i64, 1, hd, dv, c3_i, hd, hd, ti), heads)?;
            // G = dO Vᵀ into pd, then dS in place.
            self.strided_gemm(per_head(d_o, c as i64, 1, hd, v, 1, c3_i, hd, ppd, ti, tt, ti, hd), heads)?;
            let (p, key) = dropout_args(dropout);
            let (t_i, heads_i, r0_i) = (t as i32, heads as i32, r0 as i32);
            self.launcher().rows_per_warp(self.func("attention_softmax_grad_f32"), heads * t, |b| {
                b.arg(&ps).arg(&ppd).arg(&t_i).arg(&heads_i).arg(&r0_i).arg(&scale).arg(&p).arg(&key);
            })?;
            // dQ = dS K, dK = dSᵀ Q.
            self.strided_gemm(per_head(ppd, ti, 1, tt, k, c3_i, 1, hd, dq, c3_i, hd, hd, ti), heads)?;
            self.strided_gemm(per_head(ppd, 1, ti, tt, q, c3_i, 1, hd, dk, c3_i, hd, hd, ti), heads)?;
        }
        Ok(d_qkv)
    }

    fn conv1d_input_grad(&self, dy: &Tensor, w: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor> {
        let &[c_out, kernel, cg] = w.shape() else { bail!("conv weight must be [out, kernel, in/groups], found {:?}", w.shape()) };
        ensure!(kernel == geom.kernel && c_out % geom.groups == 0, "conv weight {:?} does not fit the geometry {geom:?}", w.shape());
        let groups = geom.groups;
        let c_in = cg * groups;
        let w = self.f32_weight(w)?;
        let pw = self.ptr(&w)?;
        if geom.stride == 1 && seqs_in == seqs_out && geom.pad_left < kernel {
            // Same length (the positional conv): the conv of dy with the kernel flipped in time
            // and in/out swapped per group, on the implicit-GEMM conv.
            let flipped = self.empty(&[c_in, kernel, c_out / groups], DType::F32)?;
            let pf = self.ptr(&flipped)?;
            let (c_out_i, kernel_i, cg_i, groups_i) = (c_out as i32, kernel as i32, cg as i32, groups as i32);
            self.launcher().elementwise(self.func("conv_flip_weight_f32"), w.numel(), |b| {
                b.arg(&pw).arg(&pf).arg(&c_out_i).arg(&kernel_i).arg(&cg_i).arg(&groups_i);
            })?;
            let transposed = ConvGeometry { kernel, stride: 1, pad_left: kernel - 1 - geom.pad_left, groups };
            return self.conv1d(dy, seqs_out, seqs_in, &flipped, None, transposed, Activation::Identity);
        }
        let dx = self.empty(&[seqs_in.total(), c_in], DType::F32)?;
        let (in_off, out_off, row_utt) = (self.offsets(seqs_in)?, self.offsets(seqs_out)?, self.row_utterances(seqs_in)?);
        let (pdy, pdx) = (self.ptr(dy)?, self.ptr(&dx)?);
        let (pi, po, pr) = (self.slice_ptr(&in_off), self.slice_ptr(&out_off), self.slice_ptr(&row_utt));
        let (rows, c_in_i, c_out_i) = (seqs_in.total() as i64, c_in as i32, c_out as i32);
        let (kernel_i, stride, pad, groups_i) = (kernel as i32, geom.stride as i32, geom.pad_left as i32, groups as i32);
        self.launcher().elementwise(self.func("conv_input_grad_f32"), dx.numel(), |b| {
            b.arg(&pdy).arg(&pw).arg(&pi).arg(&po).arg(&pr).arg(&pdx).arg(&rows);
            b.arg(&c_in_i).arg(&c_out_i).arg(&kernel_i).arg(&stride).arg(&pad).arg(&groups_i);
        })?;
        Ok(dx)
    }

    fn conv1d_weight_grad(&self, dy: &Tensor, x: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor> {
        let ((_, c_out), (_, c_in)) = (matrix(dy), matrix(x));
        ensure!(c_in.is_multiple_of(geom.groups), "conv: {c_in} channels do not split into {} groups", geom.groups);
        let kernel = geom.kernel;
        let dw = self.empty(&[c_out, kernel, c_in / geom.groups], DType::F32)?;
        let (pdy, px, pdw) = (self.ptr(dy)?, self.ptr(x)?, self.ptr(&dw)?);
        if geom.groups == 1 && geom.pad_left == 0 {
            // The receptive fields of an unpadded, ungrouped conv are a strided view of its input
            // (rows `stride * c_in` apart): dW = Σ_utterances dyᵀ · fields, one GEMM each.
            if seqs_out.total() == 0 {
                self.fill(&dw, 0.0)?;
            }
            for (n, u) in (0..seqs_in.count()).filter(|&u| seqs_out.lens()[u] > 0).enumerate() {
                let g = StridedGemm {
                    a: pdy + (seqs_out.range(u).start * c_out * 4) as u64,
                    a_sm: 1,
                    a_sk: c_out as i64,
                    b: px + (seqs_in.range(u).start * c_in * 4) as u64,
                    b_sk: (geom.stride * c_in) as i64,
                    b_sn: 1,
                    c: pdw,
                    ldc: (kernel * c_in) as i64,
                    m: c_out as i32,
                    n: (kernel * c_in) as i32,
                    k: seqs_out.lens()[u] as i32,
                    alpha: 1.0,
                    accumulate: (n > 0) as i32,
                    ..StridedGemm::default()
                };
                self.strided_gemm(g, 1)?;
            }
            return Ok(dw);
        }
        ensure!(
            geom.stride == 1 && seqs_in == seqs_out,
            "conv weight gradient: padded or grouped convs must keep their length, found {geom:?}"
        );
        let offsets = self.offsets(seqs_in)?;
        let poff = self.slice_ptr(&offsets);
        let (utts, c_in_i, c_out_i) = (seqs_in.count() as i32, c_in as i32, c_out as i32);
        let (kernel_i, groups, pad) = (kernel as i32, geom.groups as i32, geom.pad_left as i32);
        // Tiles of 64 outputs x (4 taps x 16 channels) per group (kernels/backward.cu, conv_wgrad).
        let (cg, og) = (c_in / geom.groups, c_out / geom.groups);
        let grid = ((kernel.div_ceil(4) * cg.div_ceil(16)) as u32, og.div_ceil(64) as u32, geom.groups as u32);
        self.launcher().launch(self.func("conv_weight_grad_f32"), launch::config(grid, 256), |b| {
            b.arg(&pdy).arg(&px).arg(&poff).arg(&utts).arg(&pdw).arg(&c_in_i).arg(&c_out_i).arg(&kernel_i).arg(&groups).arg(&pad);
        })?;
        Ok(dw)
    }

    fn group_norm_time_grads(&self, dy: &Tensor, x: &Tensor, seqs: &Seqs, norm: NormParams) -> Result<(Tensor, Tensor, Tensor)> {
        ensure!(dy.shape() == x.shape(), "group norm backward: gradient {:?} for an input {:?}", dy.shape(), x.shape());
        let (_, c) = matrix(x);
        ensure!(norm.gamma.numel() == c, "group norm over {c} channels has {} weights", norm.gamma.numel());
        let utts = seqs.count();
        let dx = self.empty(x.shape(), DType::F32)?;
        let (dgamma_u, dbeta_u) = (self.empty(&[utts, c], DType::F32)?, self.empty(&[utts, c], DType::F32)?);
        let offsets = self.offsets(seqs)?;
        let (pdy, px, pg, pdx) = (self.ptr(dy)?, self.ptr(x)?, self.ptr(norm.gamma)?, self.ptr(&dx)?);
        let (pgu, pbu, poff, c_i) = (self.ptr(&dgamma_u)?, self.ptr(&dbeta_u)?, self.slice_ptr(&offsets), c as i32);
        let cfg = launch::config((c.div_ceil(32) as u32, utts as u32, 1), 256);
        if utts > 0 {
            self.launcher().launch(self.func("group_norm_time_grad_f32"), cfg, |b| {
                b.arg(&pdy).arg(&px).arg(&poff).arg(&pg).arg(&norm.eps).arg(&pdx).arg(&pgu).arg(&pbu).arg(&c_i);
            })?;
        }
        Ok((dx, self.column_sum(&dgamma_u)?, self.column_sum(&dbeta_u)?))
    }

    fn scored_masks(&self, linears: &[ScoredLinear], sparsity: f64) -> Result<Vec<LinearMask>> {
        // One bit buffer per matrix, all ones; then every scored block with something to drop
        // is a segment of one batch through the radix select (kernels/backward.cu).
        if linears.is_empty() {
            return Ok(Vec::new());
        }
        let (mut bufs, mut words, mut segs) = (Vec::new(), Vec::new(), Vec::new());
        let mut tie_blocks = 0usize;
        for &(w, blocks) in linears {
            let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
            let n_words = (d_out * d_in).div_ceil(32).max(1);
            // SAFETY: topk_fill writes every word before anything reads them.
            let bits = unsafe { self.stream.alloc::<u8>(n_words * 4) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
            let pbits = self.slice_ptr(&bits);
            words.push(MaskWords { p: pbits, n: n_words as i64 });
            for blk in blocks {
                let n = blk.scores.numel();
                ensure!(
                    d_in > 0 && n % d_in == 0 && blk.row0 + n / d_in <= d_out,
                    "scores {:?} do not fit a {d_out} x {d_in} weight",
                    blk.scores.shape()
                );
                let drop = n - kept(n, sparsity);
                if drop > 0 {
                    let nblocks = n.div_ceil(TOPK_PER_BLOCK);
                    let seg = TopkSegment {
                        s: self.ptr(blk.scores)?,
                        n: n as i64,
                        bits: pbits,
                        bit0: (blk.row0 * d_in) as i64,
                        rank: (drop - 1) as u32,
                        nblocks: nblocks as i32,
                        counts: tie_blocks as u64, // an index until the counts are allocated
                    };
                    segs.push(seg);
                    tie_blocks += nblocks;
                }
            }
            bufs.push(bits);
        }
        let longest_words = words.iter().map(|w| w.n as usize).max().unwrap_or(0);
        let words_dev = self.copy_to_device(&words)?;
        let pwords = self.slice_ptr(&words_dev);
        let fill_grid = launch::config((longest_words.div_ceil(256).clamp(1, 1024) as u32, words.len() as u32, 1), 256);
        self.launcher().launch(self.func("topk_fill"), fill_grid, |b| {
            b.arg(&pwords);
        })?;
        if !segs.is_empty() {
            let counts = self.stream.alloc_zeros::<u32>(tie_blocks).map_err(|e| anyhow!("GPU allocation: {e}"))?;
            let pcounts = self.slice_ptr(&counts);
            for seg in &mut segs {
                seg.counts = pcounts + seg.counts * 4;
            }
            let n_segs = segs.len();
            let segs_dev = self.copy_to_device(&segs)?;
            let state = self.stream.alloc_zeros::<u32>(3 * n_segs).map_err(|e| anyhow!("GPU allocation: {e}"))?;
            let hist = self.stream.alloc_zeros::<u32>(256 * n_segs).map_err(|e| anyhow!("GPU allocation: {e}"))?;
            let (psegs, pstate, phist) = (self.slice_ptr(&segs_dev), self.slice_ptr(&state), self.slice_ptr(&hist));
            let per_segment = launch::config((n_segs as u32, 1, 1), 1);
            let longest = segs.iter().map(|s| s.n as usize).max().unwrap_or(0);
            let longest_blocks = segs.iter().map(|s| s.nblocks as u32).max().unwrap_or(1);
            self.launcher().launch(self.func("topk_init"), launch::config((n_segs as u32, 1, 1), 256), |b| {
                b.arg(&psegs).arg(&pstate).arg(&phist);
            })?;
            for shift in [24i32, 16, 8, 0] {
                let grid = launch::config((longest.div_ceil(256).clamp(1, 1024) as u32, n_segs as u32, 1), 256);
                self.launcher().launch(self.func("topk_histogram"), grid, |b| {
                    b.arg(&psegs).arg(&pstate).arg(&phist).arg(&shift);
                })?;
                self.launcher().launch(self.func("topk_pick"), per_segment, |b| {
                    b.arg(&pstate).arg(&phist).arg(&shift);
                })?;
            }
            let tie_grid = launch::config((longest_blocks, n_segs as u32, 1), 256);
            self.launcher().launch(self.func("topk_tie_counts"), tie_grid, |b| {
                b.arg(&psegs).arg(&pstate);
            })?;
            self.launcher().launch(self.func("topk_tie_scan"), per_segment, |b| {
                b.arg(&psegs);
            })?;
            self.launcher().launch(self.func("topk_write"), tie_grid, |b| {
                b.arg(&psegs).arg(&pstate);
            })?;
        }
        Ok(bufs.into_iter().map(|b| LinearMask::Cuda(CudaBuf(Arc::new(b)))).collect())
    }

    fn score_grads(&self, dy: &Tensor, x: &Tensor, w: &Tensor, blocks: &[ScoredRows]) -> Result<Vec<Tensor>> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        ensure!(
            matrix(dy).1 == d_out && matrix(x).1 == d_in,
            "score gradient: gradient {:?} and input {:?} for a weight {:?}",
            dy.shape(),
            x.shape(),
            w.shape()
        );
        let ops = self.weight_grad_operands(dy, x)?;
        // The tensor-core GEMMs' epilogue reads a bf16 weight as it is; the fp32 strided one, f32.
        let w = match ops {
            WeightGradOperands::Transposed { .. } if w.dtype() == DType::BF16 => w.clone(),
            _ => self.f32_weight(w)?,
        };
        blocks
            .iter()
            .map(|b| {
                let n = b.scores.numel();
                ensure!(
                    d_in > 0 && n.is_multiple_of(d_in) && b.row0 + n / d_in <= d_out,
                    "scores {:?} at row {} do not fit a {d_out} x {d_in} weight",
                    b.scores.shape(),
                    b.row0
                );
                let out = self.empty(&[n / d_in, d_in], DType::F32)?;
                self.weight_grad_rows(&ops, b.row0, &out, Some((&w, b.scores)))?;
                out.reshape(b.scores.shape())
            })
            .collect()
    }

    fn mask_features(&self, x: Tensor, seqs: &Seqs, time: Option<(&[bool], &Tensor)>, channels: Option<&[bool]>) -> Result<Tensor> {
        let (rows, c) = matrix(&x);
        let out = self.empty(x.shape(), DType::F32)?;
        let time_flags = time.map(|(f, _)| self.flags(f)).transpose()?;
        let channel_flags = channels.map(|f| self.flags(f)).transpose()?;
        let row_utt = self.row_utterances(seqs)?;
        let pt = time_flags.as_ref().map_or(0, |f| self.slice_ptr(f));
        let pe = time.map(|(_, e)| self.ptr(e)).transpose()?.unwrap_or(0);
        let pc = channel_flags.as_ref().map_or(0, |f| self.slice_ptr(f));
        let (px, po, pr, rows_i, c_i) = (self.ptr(&x)?, self.ptr(&out)?, self.slice_ptr(&row_utt), rows as i64, c as i32);
        self.launcher().elementwise(self.func("mask_features_f32"), x.numel(), |b| {
            b.arg(&px).arg(&po).arg(&rows_i).arg(&c_i).arg(&pt).arg(&pe).arg(&pc).arg(&pr);
        })?;
        Ok(out)
    }

    fn scale(&self, x: Tensor, s: f32) -> Result<Tensor> {
        let out = self.empty(x.shape(), DType::F32)?;
        let (px, po, n) = (self.ptr(&x)?, self.ptr(&out)?, x.numel() as i64);
        self.launcher().elementwise(self.func("scale_f32"), x.numel(), |b| {
            b.arg(&px).arg(&po).arg(&n).arg(&s);
        })?;
        Ok(out)
    }

    fn all_finite(&self, xs: &[&Tensor]) -> Result<bool> {
        let count = self.stream.alloc_zeros::<u32>(1).map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let pc = self.slice_ptr(&count);
        for x in xs {
            let (px, n) = (self.ptr(x)?, x.numel() as i64);
            self.launcher().elementwise(self.func("count_nonfinite_f32"), x.numel(), |b| {
                b.arg(&px).arg(&n).arg(&pc);
            })?;
        }
        Ok(self.stream.clone_dtoh(&count).map_err(|e| anyhow!("CUDA copy: {e}"))?[0] == 0)
    }

    fn rows(&self, t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        self.rows_f32(t, start, count)
    }

    fn weight_norm_grads(&self, dw: &Tensor, g: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.weight_norm_grad(dw, g, v)
    }

    fn mul(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        self.mul_f32(a, b)
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
        let (pp, pg, pm, pv, n) = (self.ptr(&p)?, self.ptr(g)?, self.ptr(&m)?, self.ptr(&v)?, p.numel() as i64);
        let AdamStep { beta1, beta2, step_size, c2_sqrt, eps } = step;
        self.launcher().elementwise(self.func("adam_f32"), p.numel(), |b| {
            b.arg(&pp).arg(&pg).arg(&pm).arg(&pv).arg(&n).arg(&beta1).arg(&beta2).arg(&step_size).arg(&c2_sqrt).arg(&eps);
        })?;
        Ok((p, m, v))
    }

    fn mask_features_grad(
        &self,
        dy: Tensor,
        seqs: &Seqs,
        time: Option<&[bool]>,
        channels: Option<&[bool]>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, c) = matrix(&dy);
        let time_flags = time.map(|f| self.flags(f)).transpose()?;
        let channel_flags = channels.map(|f| self.flags(f)).transpose()?;
        let row_utt = self.row_utterances(seqs)?;
        let pt = time_flags.as_ref().map_or(0, |f| self.slice_ptr(f));
        let pc = channel_flags.as_ref().map_or(0, |f| self.slice_ptr(f));
        let (pdy, pr, c_i) = (self.ptr(&dy)?, self.slice_ptr(&row_utt), c as i32);
        let embedding = match time_flags {
            Some(_) => {
                let [e] = self.column_reduce("embedding_grad_f32", &[pdy, pt, pc, pr], rows, c)?;
                Some(e)
            }
            None => None,
        };
        let out = self.empty(dy.shape(), DType::F32)?;
        let (po, rows_l) = (self.ptr(&out)?, rows as i64);
        self.launcher().elementwise(self.func("mask_features_grad_f32"), dy.numel(), |b| {
            b.arg(&pdy).arg(&po).arg(&rows_l).arg(&c_i).arg(&pt).arg(&pc).arg(&pr);
        })?;
        Ok((out, embedding))
    }
}
