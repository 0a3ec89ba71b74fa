//! Sparse linears on the GPU (kernels/sparse.cu): a masked or pruned weight's kept entries in
//! the CPU's sparse layout ([`crate::backend::cpu::sparse`]), copied to the device once at load
//! with values in the backend's weight precision.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::launch::{config, GemmArgs};
use super::{split_k, CudaBackend, Precision};
use crate::backend::cpu::sparse::{self, SparseLinear};
use crate::backend::{Activation, Backend, SparseWeight};
use crate::tensor::{DType, Tensor};

/// Frames and output rows per block of `sparse_linear_*` (`SP_FRAMES`, `SP_ROWS`, 8 warps).
const FRAMES_PER_BLOCK: usize = 32;
const ROWS_PER_BLOCK: usize = 64;

/// A weight's kept entries on the device (see kernels/sparse.cu for the layout).
pub struct SparseCuda {
    d_in: usize,
    d_out: usize,
    kept: usize,
    row_start: CudaSlice<u8>,
    cols: CudaSlice<u8>,
    vals: CudaSlice<u8>,
    vals_dtype: DType,
}

impl SparseCuda {
    /// The fraction of weights kept.
    pub fn density(&self) -> f64 {
        self.kept as f64 / (self.d_in * self.d_out).max(1) as f64
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }
}

impl CudaBackend {
    /// The non-zero entries of a PyTorch-layout `[out, in]` host weight as a sparse weight on
    /// this device (values in bf16 under `--precision bf16`, as the dense weights are), whatever
    /// its density (benchmarks compare every sparsity; [`crate::backend::Backend::prepare_sparse`]
    /// decides when a model gets one).
    pub fn sparse_weight(&self, w: &[f32], d_out: usize, d_in: usize) -> Result<SparseWeight> {
        let Some(sp) = SparseLinear::from_out_in(w, d_out, d_in) else {
            bail!("a {d_out} x {d_in} weight is too large for the sparse layout (2^32 entries or more)")
        };
        let (row_start, cols, vals) = sp.parts();
        // An all-zero weight keeps an unread placeholder (the driver allocates no zero bytes).
        let up = |bytes: &[u8]| {
            self.stream.clone_htod(if bytes.is_empty() { &[0u8; 4][..] } else { bytes }).map_err(|e| anyhow!("CUDA copy: {e}"))
        };
        let (vals, vals_dtype) = match self.precision {
            Precision::F32 => (up(bytemuck::cast_slice(vals))?, DType::F32),
            Precision::Bf16 => {
                let half: Vec<u16> = vals.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                (up(bytemuck::cast_slice(&half))?, DType::BF16)
            }
        };
        Ok(SparseWeight::Cuda(SparseCuda {
            d_in,
            d_out,
            kept: cols.len(),
            row_start: up(bytemuck::cast_slice(row_start))?,
            cols: up(bytemuck::cast_slice(cols))?,
            vals,
            vals_dtype,
        }))
    }

    /// [`crate::backend::Backend::prepare_sparse`]: the weight comes back to the host once to be
    /// compressed. None at bf16, where the dense GEMM won at every measured shape and sparsity
    /// (`sparse_pays`); [`Self::sparse_weight`] still builds one for the bench to compare.
    pub(super) fn prepare_sparse_weight(&self, w: &Tensor) -> Result<Option<SparseWeight>> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        if self.precision == Precision::Bf16 {
            return Ok(None);
        }
        let host = self.to_host(w)?;
        let values = host.f32s()?;
        if !sparse::worth_compressing(values) {
            return Ok(None);
        }
        self.sparse_weight(values, d_out, d_in).map(Some)
    }

    /// [`crate::backend::Backend::linear_sparse`] on the device.
    pub(super) fn sparse_linear(&self, x: &Tensor, sp: &SparseWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let shape = sp.output_shape(x, b)?;
        let SparseWeight::Cuda(sp) = sp else { bail!("a sparse weight built on the CPU was given to the CUDA backend") };
        // A bf16 input (from `linear_as_operand`, whose dense GEMM wrote it) is read in f32.
        let x = &self.kernel_input(x, false, "sparse linear input")?;
        let d_in = sp.d_in;
        let n = x.numel() / d_in.max(1);
        let out = self.empty(&shape, DType::F32)?;
        if n == 0 || sp.d_out == 0 {
            return Ok(out);
        }
        let kernel = match sp.vals_dtype {
            DType::BF16 => "sparse_linear_bf16",
            _ => "sparse_linear_f32",
        };
        let s = &self.stream;
        let (px, prs, pc, pv) = (self.ptr(x)?, sp.row_start.device_ptr(s).0, sp.cols.device_ptr(s).0, sp.vals.device_ptr(s).0);
        let pb = b.map(|b| self.ptr(b)).transpose()?.unwrap_or(0);
        let (blocks_x, blocks_y) = (sp.d_out.div_ceil(ROWS_PER_BLOCK), n.div_ceil(FRAMES_PER_BLOCK));
        let panels = d_in.div_ceil(sparse::PANEL);
        let per_split = if self.split_k { split_k::units_per_chunk(blocks_x * blocks_y, panels, 1, self.sms) } else { None };
        let (n32, d_in32, d_out32) = (n as i32, d_in as i32, sp.d_out as i32);
        let launch = |y: u64, bias: u64, act: i32, splits: usize, per_split: i32| {
            self.launcher().launch(self.func(kernel), config((blocks_x as u32, blocks_y as u32, splits as u32), 256), |a| {
                a.arg(&px).arg(&prs).arg(&pc).arg(&pv).arg(&bias).arg(&y).arg(&n32).arg(&d_in32).arg(&d_out32).arg(&act).arg(&per_split);
            })
        };
        match per_split {
            None => launch(self.ptr(&out)?, pb, act as i32, 1, 0)?,
            Some(per) => {
                // Raw sums per group of panels, then added in order with bias and activation.
                let splits = panels.div_ceil(per);
                let partials = self.empty(&[splits, n, sp.d_out], DType::F32)?;
                launch(self.ptr(&partials)?, 0, Activation::Identity as i32, splits, per as i32)?;
                let epilogue = GemmArgs {
                    bias: pb,
                    c: self.ptr(&out)?,
                    ldc: sp.d_out as i64,
                    m: n32,
                    n: d_out32,
                    act: act as i32,
                    ..GemmArgs::default()
                };
                self.split_sum(epilogue, &partials)?;
            }
        }
        Ok(out)
    }
}
