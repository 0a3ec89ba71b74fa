//! The bf16 tensor-core GEMM comes in several tile shapes (kernels/gemm.cu, `gemm_bf16_mma*`,
//! mma.sync) and, on Hopper, as warpgroup MMAs (kernels/gemm_sm90a.cu, `gemm_bf16_wgmma*`).
//! Which one is fastest depends on the card and the GEMM's shape (wave quantisation, occupancy,
//! barriers per K), so the backend times them on the shapes a run meets, once per shape class,
//! and keeps the winner. All mma.sync shapes give the same bits (each output sums the same
//! products in the same K order), so choosing among them never changes a result, only its
//! speed; the same holds among the wgmma shapes. The two families may round differently (the
//! tests print how often they agree), so which family wins a shape can move a result by bf16
//! rounding. On an H200 (2026-11-28) the wgmma kernels passed the tile tests and took the bf16
//! forward at 8 x 15 s from 21 to 16 ms, so on Hopper they are timed with the others unless
//! `S3R_WGMMA=0`.
//!
//! The fp32-accurate GEMM (3xTF32) is a second family chosen the same way: `gemm_tf32x3` and
//! `gemm_tf32x3_narrow` (mma.sync, 128x128 and 128x64 tiles, the same bits) and, on Hopper,
//! `gemm_tf32x3_wgmma`, which adds the same products in other groups (so its bits differ, each
//! within fp32 accuracy of the exact result).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use cudarc::driver::sys::CUevent_flags;

use super::launch::{GemmArgs, GemmGeometry};
use super::CudaBackend;

/// One tile shape of the bf16 tensor-core GEMM: its kernel, module and launch geometry (the
/// kernel's tile type in kernels/gemm.cu or kernels/gemm_sm90a.cu says the same).
#[derive(Clone, Copy, Debug)]
pub struct MmaKernel {
    pub name: &'static str,
    pub module: &'static str,
    pub tile_m: usize,
    pub tile_n: usize,
    pub threads: u32,
}

impl MmaKernel {
    /// A Hopper-only warpgroup-MMA kernel (loaded on compute capability 9.0 alone).
    pub fn is_wgmma(&self) -> bool {
        self.module == SM90A_MODULE
    }
}

/// The module of the Hopper-only kernels (kernels/gemm_sm90a.cu, built for sm_90a alone).
pub const SM90A_MODULE: &str = "gemm_sm90a";

const fn mma(name: &'static str, tile_m: usize, tile_n: usize, threads: u32) -> MmaKernel {
    MmaKernel { name, module: "gemm", tile_m, tile_n, threads }
}

const fn wgmma(name: &'static str, tile_n: usize) -> MmaKernel {
    MmaKernel { name, module: SM90A_MODULE, tile_m: 128, tile_n, threads: 256 }
}

/// The shapes, the first being the one GEMMs too small to be worth timing run.
pub const BF16_MMA_KERNELS: [MmaKernel; 9] = [
    mma("gemm_bf16_mma", 128, 128, 128),
    mma("gemm_bf16_mma_k64", 128, 128, 128),
    mma("gemm_bf16_mma_wide", 128, 256, 256),
    mma("gemm_bf16_mma_tall", 256, 128, 256),
    mma("gemm_bf16_mma_short", 64, 128, 64),
    mma("gemm_bf16_mma_narrow", 128, 64, 64),
    wgmma("gemm_bf16_wgmma", 128),
    wgmma("gemm_bf16_wgmma_s3", 128),
    wgmma("gemm_bf16_wgmma_wide", 256),
];

/// The 3xTF32 GEMM's kernels, the first being the one small GEMMs run.
pub const TF32X3_KERNELS: [MmaKernel; 3] =
    [mma("gemm_tf32x3", 128, 128, 256), mma("gemm_tf32x3_narrow", 128, 64, 128), wgmma("gemm_tf32x3_wgmma", 128)];

/// A family of interchangeable tensor-core GEMM kernels (same arguments, same results up to
/// their rounding), one choice per shape class in each.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Family {
    /// bf16 operands ([`BF16_MMA_KERNELS`]).
    Bf16,
    /// fp32 operands as 3xTF32 ([`TF32X3_KERNELS`]).
    Tf32x3,
}

impl Family {
    pub fn kernels(self) -> &'static [MmaKernel] {
        match self {
            Family::Bf16 => &BF16_MMA_KERNELS,
            Family::Tf32x3 => &TF32X3_KERNELS,
        }
    }
}

/// GEMMs of fewer flops run the first shape untimed: a few microseconds each, where timing
/// them would cost more than any choice could win back.
const TUNE_MIN_FLOPS: f64 = 1e9;

/// GEMMs that share a choice: same N, K, batch and kind of A and B, and M within a factor of
/// two (a training run's batches vary in length; one timing serves all of a size class).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ShapeClass {
    family: Family,
    m_class: u32,
    n: i32,
    k: i32,
    batch: usize,
    masked: bool,
    implicit_conv: bool,
}

impl ShapeClass {
    fn of(family: Family, args: &GemmArgs, batch: usize) -> ShapeClass {
        ShapeClass {
            family,
            m_class: (args.m.max(1) as u32).next_power_of_two().trailing_zeros(),
            n: args.n,
            k: args.k,
            batch,
            masked: args.mask != 0,
            implicit_conv: args.conv_cg > 0,
        }
    }
}

/// The choices made so far, and optionally, per family, the kernel every GEMM of that family
/// must use (tests, benchmarks).
#[derive(Default)]
pub struct Tuner {
    chosen: Mutex<HashMap<ShapeClass, usize>>,
    forced: HashMap<Family, usize>,
    /// Whether the wgmma kernels are timed with the others (loaded, and not `S3R_WGMMA=0`).
    pub(super) with_wgmma: bool,
}

impl Tuner {
    /// A tuner that times the wgmma kernels too when `wgmma_loaded`, unless the user opted out.
    pub fn new(wgmma_loaded: bool) -> Tuner {
        let opted_out = std::env::var("S3R_WGMMA").is_ok_and(|v| v == "0");
        Tuner { with_wgmma: wgmma_loaded && !opted_out, ..Tuner::default() }
    }

    /// Makes every GEMM of `family` use `family.kernels()[i]`, or (`None`) the timed choice.
    pub fn force(&mut self, family: Family, i: Option<usize>) {
        match i {
            Some(i) => self.forced.insert(family, i),
            None => self.forced.remove(&family),
        };
    }

    /// Which kernel each shape class timed fastest, as (M up to, N, K, kernel name).
    pub fn choices(&self) -> Vec<(usize, i32, i32, &'static str)> {
        let chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = chosen.iter().map(|(c, &i)| (1usize << c.m_class, c.n, c.k, c.family.kernels()[i].name)).collect();
        v.sort();
        v
    }
}

impl CudaBackend {
    /// Runs `args` through the kernel of `family` chosen for its shape class (A in bf16 for
    /// [`Family::Bf16`], alignment checked by the caller), timing every candidate first when
    /// the class is new.
    pub(super) fn gemm_tuned(&self, family: Family, args: GemmArgs, batch: usize) -> Result<()> {
        let flops = 2.0 * f64::from(args.m) * f64::from(args.n) * f64::from(args.k) * batch as f64;
        if let Some(&i) = self.tuner.forced.get(&family) {
            return self.launch_tuned(family, i, args, batch);
        }
        if flops < TUNE_MIN_FLOPS {
            return self.launch_tuned(family, 0, args, batch);
        }
        let class = ShapeClass::of(family, &args, batch);
        let known = self.tuner.chosen.lock().unwrap_or_else(|e| e.into_inner()).get(&class).copied();
        if let Some(i) = known {
            return self.launch_tuned(family, i, args, batch);
        }
        // Each timed launch writes the whole output, so the last one leaves the result in place:
        // the tuning is this GEMM's own computation, repeated. Where that last one is of the
        // other kind than the winner (wgmma may round otherwise than mma.sync), the winner
        // runs once more, so that every result of a class comes from the same kernel.
        let kernels = family.kernels();
        let candidates: Vec<usize> = (0..kernels.len()).filter(|&i| self.tuner.with_wgmma || !kernels[i].is_wgmma()).collect();
        let mut best = (f32::INFINITY, 0);
        for &i in &candidates {
            let ms = self.time_tuned(family, i, args, batch)?;
            if ms < best.0 {
                best = (ms, i);
            }
        }
        self.tuner.chosen.lock().unwrap_or_else(|e| e.into_inner()).insert(class, best.1);
        let last = candidates[candidates.len() - 1];
        if kernels[last].is_wgmma() != kernels[best.1].is_wgmma() {
            self.launch_tuned(family, best.1, args, batch)?;
        }
        Ok(())
    }

    /// Milliseconds of one launch of `family.kernels()[i]` on `args`, from stream events, after
    /// a launch over the first row of tiles only (the first launch of a kernel also loads it).
    fn time_tuned(&self, family: Family, i: usize, args: GemmArgs, batch: usize) -> Result<f32> {
        let event = || self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow!("CUDA event: {e}"));
        let (start, end) = (event()?, event()?);
        let first_rows = GemmArgs { m: args.m.min(family.kernels()[i].tile_m as i32), ..args };
        self.launch_tuned(family, i, first_rows, batch)?;
        start.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        self.launch_tuned(family, i, args, batch)?;
        end.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        start.elapsed_ms(&end).map_err(|e| anyhow!("timing {}: {e}", family.kernels()[i].name))
    }

    fn launch_tuned(&self, family: Family, i: usize, args: GemmArgs, batch: usize) -> Result<()> {
        let k = &family.kernels()[i];
        let geom = GemmGeometry { tile: (k.tile_m, k.tile_n), threads: k.threads, smem: self.dynamic_smem[k.name] };
        self.launch_gemm(k.name, args, geom, batch)
    }
}
