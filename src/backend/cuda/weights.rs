//! Weight layouts and weight norm on the device (kernels/weights.cu), and row copies: what weight
//! finetuning needs to rebuild the model from its trained tensors every update, and to split and
//! mask their gradients, without a trip through the host.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::{CudaBackend, CudaBuf};
use crate::tensor::{DType, Tensor};

impl CudaBackend {
    /// `[a, b, c]` to `[a, c, b]` (f32).
    pub(super) fn swap_last_two_f32(&self, t: &Tensor) -> Result<Tensor> {
        let &[a, b, c] = t.shape() else { bail!("swap_last_two: expected a 3-D tensor, found {:?}", t.shape()) };
        let x = self.upload_f32(t)?;
        let out = self.empty(&[a, c, b], DType::F32)?;
        let (px, py, a, b, c) = (self.ptr(&x)?, self.ptr(&out)?, a as i64, b as i32, c as i32);
        self.launcher().elementwise(self.func("swap_last_two_f32"), out.numel(), |k| {
            k.arg(&px).arg(&py).arg(&a).arg(&b).arg(&c);
        })?;
        Ok(out)
    }

    /// f64 sums per kernel position of `v` viewed as `[rows, kernel]`: `‖v[:, k]‖²`, and with
    /// `dw` also `Σ dw·v`.
    fn weight_norm_sums(&self, v: &Tensor, dw: Option<&Tensor>) -> Result<(CudaSlice<f64>, CudaSlice<f64>, i32)> {
        let kernel = *v.shape().last().unwrap_or(&0);
        ensure!(kernel > 0, "weight norm over an empty kernel");
        let alloc = || self.stream.alloc_zeros::<f64>(kernel).map_err(|e| anyhow!("GPU allocation: {e}"));
        let (norm2, dot) = (alloc()?, alloc()?);
        let (pv, pdw) = (self.ptr(v)?, dw.map(|t| self.ptr(t)).transpose()?.unwrap_or(0));
        let (pn, pd) = (norm2.device_ptr(&self.stream).0, dot.device_ptr(&self.stream).0);
        let (rows, k32) = ((v.numel() / kernel) as i64, kernel as i32);
        self.launcher().launch(self.func("weight_norm_sums"), super::launch::config((kernel as u32, 1, 1), 256), |b| {
            b.arg(&pv).arg(&pdw).arg(&rows).arg(&k32).arg(&pn).arg(&pd);
        })?;
        Ok((norm2, dot, k32))
    }

    /// [`crate::backend::Backend::weight_norm`] on the device.
    pub(super) fn weight_norm_fold(&self, g: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (g, v) = (self.upload_f32(g)?, self.upload_f32(v)?);
        ensure!(g.numel() == *v.shape().last().unwrap_or(&0), "weight norm: {} magnitudes for {:?}", g.numel(), v.shape());
        let (norm2, _, kernel) = self.weight_norm_sums(&v, None)?;
        let out = self.empty(v.shape(), DType::F32)?;
        let (pg, pv, pn, pw, n) = (self.ptr(&g)?, self.ptr(&v)?, norm2.device_ptr(&self.stream).0, self.ptr(&out)?, v.numel() as i64);
        self.launcher().elementwise(self.func("weight_norm_fold"), v.numel(), |b| {
            b.arg(&pg).arg(&pv).arg(&pn).arg(&pw).arg(&n).arg(&kernel);
        })?;
        Ok(out)
    }

    /// [`crate::backend::backward::Backward::weight_norm_grads`] on the device.
    pub(super) fn weight_norm_grad(&self, dw: &Tensor, g: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        ensure!(dw.shape() == v.shape(), "weight norm gradient {:?} for a direction {:?}", dw.shape(), v.shape());
        ensure!(g.numel() == *v.shape().last().unwrap_or(&0), "weight norm: {} magnitudes for {:?}", g.numel(), v.shape());
        let (norm2, dot, kernel) = self.weight_norm_sums(v, Some(dw))?;
        let (dg, dv) = (self.empty(g.shape(), DType::F32)?, self.empty(v.shape(), DType::F32)?);
        let (pdw, pg, pv) = (self.ptr(dw)?, self.ptr(g)?, self.ptr(v)?);
        let (pn, pd) = (norm2.device_ptr(&self.stream).0, dot.device_ptr(&self.stream).0);
        let (pdg, pdv, n) = (self.ptr(&dg)?, self.ptr(&dv)?, v.numel() as i64);
        self.launcher().elementwise(self.func("weight_norm_grad"), v.numel(), |b| {
            b.arg(&pdw).arg(&pg).arg(&pv).arg(&pn).arg(&pd).arg(&pdg).arg(&pdv).arg(&n).arg(&kernel);
        })?;
        Ok((dg, dv))
    }

    /// `a ⊙ b` into a fresh buffer (as every elementwise op here: `a` may be shared).
    pub(super) fn mul_f32(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "mul: {:?} by {:?}", a.shape(), b.shape());
        let out = self.empty(a.shape(), DType::F32)?;
        let (pa, pb, po, n) = (self.ptr(&a)?, self.ptr(b)?, self.ptr(&out)?, a.numel() as i64);
        self.launcher().elementwise(self.func("mul_f32"), a.numel(), |k| {
            k.arg(&pa).arg(&pb).arg(&po).arg(&n);
        })?;
        Ok(out)
    }

    /// Tensors stacked along their first dimension, by device-to-device copies (host parts are
    /// uploaded first).
    pub(super) fn concat_rows_f32(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let Some(first) = parts.first() else { bail!("concat_rows: nothing to stack") };
        let inner = &first.shape()[1..];
        for p in parts {
            ensure!(&p.shape()[1..] == inner, "concat_rows: {:?} does not stack with {:?}", p.shape(), first.shape());
        }
        let rows: usize = parts.iter().map(|p| p.shape()[0]).sum();
        let shape: Vec<usize> = std::iter::once(rows).chain(inner.iter().copied()).collect();
        let total: usize = parts.iter().map(|p| p.numel() * 4).sum();
        // SAFETY: every byte is written by the copies below before anything reads it.
        let mut buf = unsafe { self.stream.alloc::<u8>(total.max(4)) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let mut at = 0;
        for p in parts {
            let part = self.upload_f32(p)?;
            let bytes = part.numel() * 4;
            if bytes == 0 {
                continue;
            }
            let src = Self::buffer(&part)?;
            self.stream.memcpy_dtod(&src.slice(..bytes), &mut buf.slice_mut(at..at + bytes)).map_err(|e| anyhow!("CUDA copy: {e}"))?;
            at += bytes;
        }
        Ok(Tensor::from_cuda(CudaBuf(Arc::new(buf)), DType::F32, &shape))
    }

    /// Rows `start .. start + count` of `t`'s first dimension, copied on the device.
    pub(super) fn rows_f32(&self, t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        Self::expect_dtype(t, DType::F32, "rows")?;
        let rows = *t.shape().first().unwrap_or(&0);
        ensure!(start + count <= rows, "rows {start}..{} of a tensor with {rows}", start + count);
        let width = t.numel() / rows.max(1);
        let mut shape = t.shape().to_vec();
        shape[0] = count;
        let bytes = count * width * 4;
        // SAFETY: the copy below writes every byte before anything reads it.
        let mut buf = unsafe { self.stream.alloc::<u8>(bytes.max(4)) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let from = start * width * 4;
        if bytes == 0 {
            return Ok(Tensor::from_cuda(CudaBuf(Arc::new(buf)), DType::F32, &shape));
        }
        self.stream
            .memcpy_dtod(&Self::buffer(t)?.slice(from..from + bytes), &mut buf.slice_mut(..bytes))
            .map_err(|e| anyhow!("CUDA copy: {e}"))?;
        Ok(Tensor::from_cuda(CudaBuf(Arc::new(buf)), DType::F32, &shape))
    }

    /// An f32 tensor on this device: `t` itself when it is one, else uploaded.
    fn upload_f32(&self, t: &Tensor) -> Result<Tensor> {
        let t = crate::backend::Backend::upload(self, t)?;
        Self::expect_dtype(&t, DType::F32, "weight")?;
        Ok(t)
    }
}
