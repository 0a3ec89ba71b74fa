//! Kernel launch helpers: grid shapes for the kernel families, and the GEMM argument block.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

/// Arguments of `gemm_f32` / `gemm_bf16` (`struct GemmArgs` in kernels/gemm.cu, same layout).
/// Addresses are raw device pointers; 0 means "none" for `mask` and `bias`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmArgs {
    pub a: u64,
    pub lda: i64,
    pub batch_a: i64,
    pub b: u64,
    pub ldb: i64,
    pub batch_b: i64,
    pub mask: u64,
    pub bias: u64,
    pub batch_bias: i64,
    pub c: u64,
    pub ldc: i64,
    pub batch_c: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub act: i32,
    /// Implicit convolution when `conv_cg > 0` (see kernels/gemm.cu).
    pub conv_cg: i32,
    pub conv_stride: i32,
    pub conv_pad: i32,
    pub conv_tin: i32,
    /// 1 when 16-byte vector loads are legal; set by [`GemmArgs::with_vector_check`].
    pub vec: i32,
    /// With batch 1: `W` (fp32, or bf16 with `st_w_bf16`) and the scores (`C`'s layout) of the
    /// straight-through product each output is finished with (`C ⊙ W ⊙ sign(S)`); 0: none.
    pub st_w: u64,
    pub st_s: u64,
    /// 1: `c` is bf16 (written by the tensor-core kernels' shared epilogue only).
    pub c_bf16: i32,
    /// 1: `st_w` is bf16 (the bf16 backend's weight, read as it is).
    pub st_w_bf16: i32,
    /// Split-K: block z multiplies the z-th chunk of this many K into slab z of `c` (set by
    /// `CudaBackend::launch_gemm` only); 0: all of K.
    pub k_split: i32,
}

impl GemmArgs {
    /// Sets `vec` when every A and B access the kernel makes is 16-byte aligned: K a multiple of
    /// 8, A rows (and conv group columns) on 4-float boundaries, B rows on 8-element boundaries.
    pub fn with_vector_check(mut self, b_elem_bytes: u64) -> GemmArgs {
        let a_ok = self.a.is_multiple_of(16) && self.lda % 4 == 0 && self.batch_a % 4 == 0 && (self.conv_cg == 0 || self.conv_cg % 4 == 0);
        let b_ok = self.b.is_multiple_of(16)
            && (self.ldb as u64 * b_elem_bytes).is_multiple_of(16)
            && (self.batch_b as u64 * b_elem_bytes).is_multiple_of(16);
        self.vec = (self.k % 8 == 0 && a_ok && b_ok) as i32;
        self
    }

    /// Whether `gemm_bf16_mma` can run these arguments with `a` pointing at bf16 data.
    pub fn tensor_core_ok(&self) -> bool {
        self.async_chunks_ok(8)
    }

    /// Whether `gemm_tf32x3` can run these (fp32) arguments.
    pub fn tf32x3_ok(&self) -> bool {
        self.async_chunks_ok(4)
    }

    /// Whether a cp.async pipeline can stage A and B in 16-byte chunks of `chunk` elements: every
    /// chunk 16-byte aligned and inside one conv group, and a stage's mask bits one aligned 32-bit
    /// word per weight row.
    fn async_chunks_ok(&self, chunk: i64) -> bool {
        let a_ok = self.a.is_multiple_of(16)
            && self.lda % chunk == 0
            && self.batch_a % chunk == 0
            && (self.conv_cg == 0 || i64::from(self.conv_cg) % chunk == 0);
        let b_ok = self.b.is_multiple_of(16) && self.ldb % chunk == 0 && self.batch_b % chunk == 0;
        i64::from(self.k) % chunk == 0 && a_ok && b_ok && (self.mask == 0 || self.k % 32 == 0)
    }
}

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl DeviceRepr for GemmArgs {}

/// Where `group_norm_time` reads its input (`struct NormSource` in kernels/norm.cu, same
/// layout): the stored tensor at `x`, or, when `audio` is set, a one-channel conv of the audio
/// computed on the fly (`w` `[c, kernel]` in f32, or bf16 when `w_bf16` is 1; `bias` 0 for none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NormSource {
    pub x: u64,
    pub audio: u64,
    pub in_offsets: u64,
    pub w: u64,
    pub bias: u64,
    pub kernel: i32,
    pub stride: i32,
    pub pad: i32,
    pub w_bf16: i32,
}

/// The most conv taps `NormSource` computes on the fly (`MAX_SOURCE_TAPS` in kernels/norm.cu).
pub const MAX_SOURCE_TAPS: usize = 16;

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl DeviceRepr for NormSource {}

/// How a GEMM kernel is launched: `(rows, columns)` tiles of C, `threads` per block, `smem` bytes
/// of dynamic shared memory.
#[derive(Clone, Copy, Debug)]
pub struct GemmGeometry {
    pub tile: (usize, usize),
    pub threads: u32,
    pub smem: u32,
}

pub fn config(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub struct Launch<'s> {
    pub stream: &'s Arc<CudaStream>,
}

impl<'s> Launch<'s> {
    /// Launches `f` with the arguments `push` adds. Debug builds wait and check for errors after
    /// every launch, so a faulting kernel is named where it fails.
    pub fn launch<'a>(&'a self, f: &'a CudaFunction, cfg: LaunchConfig, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        push(&mut b);
        // SAFETY: each caller pushes exactly the parameters its kernel declares, with device
        // addresses of live allocations on this stream and sizes it has checked.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("kernel launch: {e}"))?;
        if cfg!(debug_assertions) {
            self.stream.synchronize().map_err(|e| anyhow!("kernel failed: {e}"))?;
        }
        Ok(())
    }

    /// Grid-stride elementwise kernels over `n` items.
    pub fn elementwise<'a>(&'a self, f: &'a CudaFunction, n: usize, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        let blocks = n.div_ceil(256).clamp(1, 16 * 1024) as u32;
        self.launch(f, config((blocks, 1, 1), 256), push)
    }

    /// Transpose kernels: one 32 x 32 tile of a `[rows, cols]` matrix per block of 32 x 8 threads.
    pub fn tiles_32<'a>(&'a self, f: &'a CudaFunction, rows: usize, cols: usize, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        let grid = (cols.div_ceil(32).max(1) as u32, rows.div_ceil(32).max(1) as u32, 1);
        self.launch(f, LaunchConfig { grid_dim: grid, block_dim: (32, 8, 1), shared_mem_bytes: 0 }, push)
    }

    /// Kernels with one warp per row, eight rows per block.
    pub fn rows_per_warp<'a>(&'a self, f: &'a CudaFunction, rows: usize, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        self.launch(f, config((rows.div_ceil(8).max(1) as u32, 1, 1), 256), push)
    }

    /// A GEMM kernel of launch geometry `geom`, `batch` products along z.
    pub fn gemm<'a>(&'a self, f: &'a CudaFunction, args: GemmArgs, geom: GemmGeometry, batch: usize) -> Result<()> {
        if args.m == 0 || args.n == 0 {
            return Ok(());
        }
        let (tile_m, tile_n) = geom.tile;
        let grid = ((args.n as usize).div_ceil(tile_n) as u32, (args.m as usize).div_ceil(tile_m) as u32, batch as u32);
        let mut cfg = config(grid, geom.threads);
        cfg.shared_mem_bytes = geom.smem;
        self.launch(f, cfg, |b| {
            b.arg(&args);
        })
    }
}

/// Arguments of `gemm_strided_f32` (`struct StridedGemm` in kernels/backward.cu, same layout):
/// `C[z](m, n) = alpha · Σ_k A[z](m, k) · B[z](k, n)`, A and B with any element strides, the
/// batch strides in elements, `mask` optional bits at B's element offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StridedGemm {
    pub a: u64,
    pub a_sm: i64,
    pub a_sk: i64,
    pub batch_a: i64,
    pub b: u64,
    pub b_sk: i64,
    pub b_sn: i64,
    pub batch_b: i64,
    pub mask: u64,
    pub c: u64,
    pub ldc: i64,
    pub batch_c: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    /// 1: `C += alpha · A·B`.
    pub accumulate: i32,
    /// As [`GemmArgs::st_w`] / [`GemmArgs::st_s`].
    pub st_w: u64,
    pub st_s: u64,
}

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl DeviceRepr for StridedGemm {}

/// One scored block of a step's top-k batch (`struct TopkSegment` in kernels/backward.cu, same
/// layout): `n` scores at `s` whose drops clear bits `bit0 ..` of the words at `bits`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TopkSegment {
    pub s: u64,
    pub n: i64,
    pub bits: u64,
    pub bit0: i64,
    /// Dropped count - 1.
    pub rank: u32,
    /// Tie-count blocks of the segment, and where their counts live.
    pub nblocks: i32,
    pub counts: u64,
}

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl DeviceRepr for TopkSegment {}

/// The `n` mask words of one matrix at `p` (`struct MaskWords` in kernels/backward.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MaskWords {
    pub p: u64,
    pub n: i64,
}

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl DeviceRepr for MaskWords {}
