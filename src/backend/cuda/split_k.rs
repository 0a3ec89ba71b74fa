//! Split-K for GEMMs too small in M and N to fill the GPU.
//!
//! A GEMM kernel gives each block one tile of C and walks all of K. When the tiles are fewer
//! than the SMs (batch-1 streaming: 49 frames x 3072 -> 768 is 6 tiles of 128 x 128; a weight
//! gradient 768 x 768 over 5992 frames is 36), most SMs idle and each block's K walk is a chain
//! of memory round trips: 49 x 3072 -> 768 took 292 us in fp32 on an H200, where its 9.4 MB of
//! weight stream in ~3 us. Cutting K into chunks gives each (tile, chunk) a block: the kernels
//! write one fp32 M x N slab of partial sums per chunk, and `gemm_split_sum` adds the slabs in
//! chunk order and applies the epilogue (bias, activation, straight-through factor, bf16 output).
//!
//! The chunking depends on the GEMM's shape and the SM count alone, never on the kernel's tile,
//! so every kernel of a family still adds the same products in the same order and gives the
//! same bits (tests/cuda.rs checks this), and the tuner compares them on equal terms.

use anyhow::Result;
use cudarc::driver::PushKernelArg;

use super::launch::{self, GemmArgs, GemmGeometry};
use super::CudaBackend;
use crate::tensor::{DType, Tensor};

/// A chunk is a multiple of this many K: every GEMM kernel's BK (16 to 64) divides it, so a
/// chunk is whole K tiles of any kernel.
const CHUNK_ALIGN: usize = 64;

/// The shortest chunk: two to eight K tiles, so that a block's pipeline fills before it drains.
const MIN_CHUNK: usize = 128;

/// The tile the chunking counts with (the kernels' usual 128 x 128), whatever the kernel's own.
const NOMINAL_TILE: usize = 128;

/// Blocks a split GEMM aims at per SM: two keep one block's loads in flight while the other
/// multiplies.
const BLOCKS_PER_SM: usize = 2;

/// How many of its `units` along K (K tiles, panels) each block of a product that runs as
/// `blocks` blocks takes when split on a GPU of `sms` SMs, or `None` to run it whole: split only
/// where the blocks leave SMs idle, into as many chunks as fill `BLOCKS_PER_SM` blocks per SM,
/// each of at least `min_units`.
pub fn units_per_chunk(blocks: usize, units: usize, min_units: usize, sms: usize) -> Option<usize> {
    if blocks == 0 || blocks >= sms {
        return None;
    }
    let splits = (BLOCKS_PER_SM * sms / blocks).min(units / min_units.max(1));
    if splits < 2 {
        return None;
    }
    let per = units.div_ceil(splits);
    (units.div_ceil(per) >= 2).then_some(per)
}

/// The K chunk a GEMM of `m x n x k` (batch `batch`) is split into on a GPU of `sms` SMs, or
/// `None` to run it whole: single products only, chunks of whole `CHUNK_ALIGN`s, at least
/// `MIN_CHUNK` deep.
pub fn k_chunk(m: usize, n: usize, k: usize, batch: usize, sms: usize) -> Option<usize> {
    let tiles = m.div_ceil(NOMINAL_TILE) * n.div_ceil(NOMINAL_TILE);
    let units = units_per_chunk(tiles, k.div_ceil(CHUNK_ALIGN), MIN_CHUNK / CHUNK_ALIGN, sms);
    units.filter(|_| batch == 1).map(|u| u * CHUNK_ALIGN)
}

impl CudaBackend {
    /// Launches GEMM kernel `name` of launch geometry `geom` on `args`, split along K where
    /// [`k_chunk`] says so.
    pub(super) fn launch_gemm(&self, name: &str, args: GemmArgs, geom: GemmGeometry, batch: usize) -> Result<()> {
        let (m, n, k) = (args.m.max(0) as usize, args.n.max(0) as usize, args.k.max(0) as usize);
        let chunk = if self.split_k { k_chunk(m, n, k, batch, self.sms) } else { None };
        let Some(chunk) = chunk else {
            return self.launcher().gemm(self.func(name), args, geom, batch);
        };
        let splits = k.div_ceil(chunk);
        let partials = self.empty(&[splits, m, n], DType::F32)?;
        let slabs = GemmArgs {
            batch_a: 0,
            batch_b: 0,
            bias: 0,
            batch_bias: 0,
            c: self.ptr(&partials)?,
            ldc: n as i64,
            batch_c: (m * n) as i64,
            act: 0,
            st_w: 0,
            st_s: 0,
            c_bf16: 0,
            k_split: chunk as i32,
            ..args
        };
        self.launcher().gemm(self.func(name), slabs, geom, splits)?;
        self.split_sum(args, &partials)
    }

    /// `C` of `args` (`[m, n]`, its epilogue applied) from `partials`, `[splits, m, n]` fp32
    /// partial sums added in slab order.
    pub(super) fn split_sum(&self, args: GemmArgs, partials: &Tensor) -> Result<()> {
        let (pp, splits) = (self.ptr(partials)?, partials.shape()[0] as i32);
        let quads = args.m.max(0) as usize * (args.n.max(0) as usize).div_ceil(4);
        self.launcher().launch(self.func("gemm_split_sum"), launch::config((quads.div_ceil(256).max(1) as u32, 1, 1), 256), |b| {
            b.arg(&args).arg(&pp).arg(&splits);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gemms_that_leave_sms_idle_are_split() {
        // Batch-1 streaming, 1 s (49 frames), the FFN's second linear on 132 SMs: 6 tiles,
        // 44 chunks wanted, 3072 / MIN_CHUNK = 24 allowed.
        assert_eq!(k_chunk(49, 768, 3072, 1, 132), Some(128));
        // The first linear: 24 tiles, 264 / 24 = 11 chunks wanted, 768 / 128 = 6 allowed.
        assert_eq!(k_chunk(49, 3072, 768, 1, 132), Some(128));
        // A weight gradient over 8 x 15 s of frames: 36 tiles, 7 chunks of 5992 / 7 -> 896.
        assert_eq!(k_chunk(768, 768, 5992, 1, 132), Some(896));
        // A full wave of tiles, a batch, or too little K: whole.
        assert_eq!(k_chunk(5992, 3072, 768, 1, 132), None);
        assert_eq!(k_chunk(49, 768, 3072, 16, 132), None);
        assert_eq!(k_chunk(49, 768, 127, 1, 132), None);
        assert_eq!(k_chunk(0, 768, 3072, 1, 132), None);
    }

    #[test]
    fn chunks_are_whole_k_tiles_and_cover_k() {
        for sms in [1, 16, 132] {
            for m in [1, 49, 300, 1000] {
                for k in [256, 300, 768, 1000, 3072, 5992] {
                    if let Some(chunk) = k_chunk(m, 768, k, 1, sms) {
                        let splits = k.div_ceil(chunk);
                        assert!(chunk % CHUNK_ALIGN == 0 && chunk >= MIN_CHUNK, "m {m} k {k}: chunk {chunk}");
                        assert!(splits >= 2 && (splits - 1) * chunk < k, "m {m} k {k}: {splits} chunks of {chunk}, the last empty");
                        let tiles = m.div_ceil(NOMINAL_TILE) * 6;
                        assert!(splits * tiles <= BLOCKS_PER_SM * sms, "m {m} k {k}: {splits} chunks of {tiles} tiles on {sms} SMs");
                    }
                }
            }
        }
    }
}
