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

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use cudarc::driver::sys::CUevent_flags;

use super::launch::GemmArgs;
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

/// GEMMs of fewer flops run the first shape untimed: a few microseconds each, where timing
/// them would cost more than any choice could win back.
const TUNE_MIN_FLOPS: f64 = 1e9;

/// GEMMs that share a choice: same N, K, batch and kind of A and B, and M within a factor of
/// two (a training run's batches vary in length; one timing serves all of a size class).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ShapeClass {
    m_class: u32,
    n: i32,
    k: i32,
    batch: usize,
    masked: bool,
    implicit_conv: bool,
}

impl ShapeClass {
    fn of(args: &GemmArgs, batch: usize) -> ShapeClass {
        ShapeClass {
            m_class: (args.m.max(1) as u32).next_power_of_two().trailing_zeros(),
            n: args.n,
            k: args.k,
            batch,
            masked: args.mask != 0,
            implicit_conv: args.conv_cg > 0,
        }
    }
}

/// The choices made so far, and an optional shape every GEMM must use (tests, benchmarks).
#[derive(Default)]
pub struct Tuner {
    chosen: Mutex<HashMap<ShapeClass, usize>>,
    forced: Option<usize>,
    /// Whether the wgmma kernels are timed with the others (loaded, and not `S3R_WGMMA=0`).
    pub(super) with_wgmma: bool,
}

impl Tuner {
    /// A tuner that times the wgmma kernels too when `wgmma_loaded`, unless the user opted out.
    pub fn new(wgmma_loaded: bool) -> Tuner {
        let opted_out = std::env::var("S3R_WGMMA").is_ok_and(|v| v == "0");
        Tuner { with_wgmma: wgmma_loaded && !opted_out, ..Tuner::default() }
    }

    /// Makes every bf16 tensor-core GEMM use `BF16_MMA_KERNELS[i]`, or (`None`) the timed choice.
    pub fn force(&mut self, i: Option<usize>) {
        self.forced = i;
    }

    /// Which tile shape each shape class timed fastest, as (M up to, N, K, kernel name).
    pub fn choices(&self) -> Vec<(usize, i32, i32, &'static str)> {
        let chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = chosen.iter().map(|(c, &i)| (1usize << c.m_class, c.n, c.k, BF16_MMA_KERNELS[i].name)).collect();
        v.sort();
        v
    }
}

impl CudaBackend {
    /// Runs `args` (A in bf16, alignment checked by the caller) through the bf16 mma.sync GEMM
    /// in the tile shape chosen for its class, timing every shape first when the class is new.
    pub(super) fn gemm_bf16_mma(&self, args: GemmArgs, batch: usize) -> Result<()> {
        let flops = 2.0 * f64::from(args.m) * f64::from(args.n) * f64::from(args.k) * batch as f64;
        if let Some(i) = self.tuner.forced {
            return self.launch_mma(i, args, batch);
        }
        if flops < TUNE_MIN_FLOPS {
            return self.launch_mma(0, args, batch);
        }
        let class = ShapeClass::of(&args, batch);
        let known = self.tuner.chosen.lock().unwrap_or_else(|e| e.into_inner()).get(&class).copied();
        if let Some(i) = known {
            return self.launch_mma(i, args, batch);
        }
        // Each timed launch writes the whole output, so the last one leaves the result in place:
        // the tuning is this GEMM's own computation, repeated. Where that last one is of the
        // other family than the winner (wgmma may round otherwise than mma.sync), the winner
        // runs once more, so that every result of a class comes from the same kernel.
        let candidates: Vec<usize> =
            (0..BF16_MMA_KERNELS.len()).filter(|&i| self.tuner.with_wgmma || !BF16_MMA_KERNELS[i].is_wgmma()).collect();
        let mut best = (f32::INFINITY, 0);
        for &i in &candidates {
            let ms = self.time_mma(i, args, batch)?;
            if ms < best.0 {
                best = (ms, i);
            }
        }
        self.tuner.chosen.lock().unwrap_or_else(|e| e.into_inner()).insert(class, best.1);
        let last = candidates[candidates.len() - 1];
        if BF16_MMA_KERNELS[last].is_wgmma() != BF16_MMA_KERNELS[best.1].is_wgmma() {
            self.launch_mma(best.1, args, batch)?;
        }
        Ok(())
    }

    /// Milliseconds of one launch of shape `i` on `args`, from stream events, after a launch
    /// over the first row of tiles only (the first launch of a kernel also loads it).
    fn time_mma(&self, i: usize, args: GemmArgs, batch: usize) -> Result<f32> {
        let event = || self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow!("CUDA event: {e}"));
        let (start, end) = (event()?, event()?);
        let first_rows = GemmArgs { m: args.m.min(BF16_MMA_KERNELS[i].tile_m as i32), ..args };
        self.launch_mma(i, first_rows, batch)?;
        start.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        self.launch_mma(i, args, batch)?;
        end.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        start.elapsed_ms(&end).map_err(|e| anyhow!("timing {}: {e}", BF16_MMA_KERNELS[i].name))
    }

    fn launch_mma(&self, i: usize, args: GemmArgs, batch: usize) -> Result<()> {
        let k = &BF16_MMA_KERNELS[i];
        self.launcher().gemm(self.func(k.name), args, (k.tile_m, k.tile_n), batch, k.threads, self.dynamic_smem[k.name])
    }
}
