//! The CUDA backend: hand-written kernels (`kernels/*.cu`, compiled by build.rs into fatbins and
//! embedded in the binary), driven through cudarc with the driver library loaded at run time, so
//! the same binary runs on machines with and without a GPU.
//!
//! One stream; device memory comes from the driver's stream-ordered pool with its release
//! threshold raised, so freed blocks are cached and steady state makes no new allocations.
//! Two precisions: `F32` (fp32 FMA everywhere, the parity path) and `Bf16` (GEMMs and convs on
//! tensor cores with bf16 operands and fp32 accumulation; everything else fp32).

mod backward;
mod ctc;
mod launch;
mod sparse;
mod split_k;
mod tune;
mod weights;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc::Ptx;
use rayon::prelude::*;

use super::{
    attention_width, linear_output_shape, packed_rows, Activation, Backend, ConvGeometry, LinearMask, NormParams, Seqs, SparseWeight,
};
use crate::dropout::SiteDropout;
use crate::tensor::{DType, HostBytes, Storage, Tensor};
use launch::{GemmArgs, GemmGeometry, Launch, NormSource, MAX_SOURCE_TAPS};
pub use sparse::SparseCuda;
pub use tune::{Family, MmaKernel, BF16_MMA_KERNELS, TF32X3_KERNELS};

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Device memory behind a GPU tensor (bytes; the tensor's dtype says how to read them).
#[derive(Clone)]
pub struct CudaBuf(Arc<CudaSlice<u8>>);

/// Arithmetic of the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// Kernels the backend launches by name, by (module, function). The flash-attention and
/// tensor-core GEMM families are named once, in their tables ([`FlashKernels`],
/// [`BF16_MMA_KERNELS`], [`TF32X3_KERNELS`]); [`table_kernels`] adds them.
const FUNCTIONS: &[(&str, &str)] = &[
    ("gemm", "gemm_f32"),
    ("gemm", "gemm_bf16"),
    ("gemm", "gemm_split_sum"),
    ("norm", "to_bf16"),
    ("norm", "layer_norm"),
    ("norm", "group_norm_time"),
    ("norm", "add"),
    ("norm", "log_softmax"),
    ("norm", "fill_f32"),
    ("attention", "attention_hd16"),
    ("attention", "attention_hd32"),
    ("attention", "attention_hd64"),
    ("attention", "attention_dq_scatter"),
    ("attention", "attention_hd128"),
    ("attention", "attention_bwd_dot"),
    ("ctc", "ctc_lse"),
    ("ctc", "ctc_recursions_s1"),
    ("ctc", "ctc_recursions_s2"),
    ("ctc", "ctc_recursions_s4"),
    ("ctc", "ctc_grad"),
    ("mask", "pack_mask"),
    ("mask", "unpack_mask"),
    ("weights", "swap_last_two_f32"),
    ("weights", "weight_norm_sums"),
    ("weights", "weight_norm_fold"),
    ("weights", "weight_norm_grad"),
    ("weights", "mul_f32"),
    ("sparse", "sparse_linear_f32"),
    ("sparse", "sparse_linear_bf16"),
    ("backward", "gemm_strided_f32"),
    ("backward", "gemm_strided_bf16"),
    ("backward", "gemm_strided_tf32x3"),
    ("backward", "dropout_f32"),
    ("backward", "gelu_f32"),
    ("backward", "gelu_bf16"),
    ("backward", "gelu_grad_f32"),
    ("backward", "gelu_grad_bf16"),
    ("backward", "relu_grad_f32"),
    ("backward", "column_partials_sum"),
    ("backward", "column_sum_f32"),
    ("backward", "column_sum_bf16"),
    ("backward", "layer_norm_grad_f32"),
    ("backward", "layer_norm_param_grad_f32"),
    ("backward", "mask_features_f32"),
    ("backward", "embedding_grad_f32"),
    ("backward", "mask_features_grad_f32"),
    ("backward", "attention_softmax_f32"),
    ("backward", "attention_softmax_grad_f32"),
    ("backward", "conv_flip_weight_f32"),
    ("backward", "conv_weight_grad_f32"),
    ("backward", "conv_input_grad_f32"),
    ("backward", "group_norm_time_grad_f32"),
    ("backward", "transpose_to_bf16"),
    ("backward", "transpose_to_f32"),
    ("backward", "transpose_bf16"),
    ("backward", "transpose_mask_bf16"),
    ("backward", "transpose_mask_f32"),
    ("backward", "bf16_to_f32"),
    ("backward", "scale_f32"),
    ("backward", "count_nonfinite_f32"),
    ("backward", "adam_f32"),
    ("backward", "topk_fill"),
    ("backward", "topk_init"),
    ("backward", "topk_histogram"),
    ("backward", "topk_pick"),
    ("backward", "topk_tie_counts"),
    ("backward", "topk_tie_scan"),
    ("backward", "topk_write"),
];

/// The flash-style attention kernels of one operand flavour (kernels/attention.cu), by head-size
/// class (16, 32, 64, 128): the forward, and the backward's kernel (dK, dV, and dQ's operands),
/// whose tiles hold `tile` (bf16, or fp32 for 3xTF32).
struct FlashKernels {
    forward: [&'static str; 4],
    kv: [&'static str; 4],
    tile: DType,
}

const BF16_FLASH: FlashKernels = FlashKernels {
    forward: ["attention_bf16_mma_hd16", "attention_bf16_mma_hd32", "attention_bf16_mma_hd64", "attention_bf16_mma_hd128"],
    kv: ["attention_bwd_kv_bf16_hd16", "attention_bwd_kv_bf16_hd32", "attention_bwd_kv_bf16_hd64", "attention_bwd_kv_bf16_hd128"],
    tile: DType::BF16,
};

/// The most bytes of dS slabs the attention backward holds at once (utterances beyond it go in
/// further groups): 8 x 15 s of speech is one group in bf16 (108 MB) and two in fp32.
pub const DQ_SLAB_BYTES: usize = 128 << 20;

/// Where the attention backward kernel leaves dQ's GEMM operands (`struct DqOperands` in
/// kernels/attention.cu, same layout): scale dS `[slab][tmax][ld]` and Kᵀ `[slab][hd][ld]` in
/// the tile type, slab = utterance of the group x heads + head.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DqOperands {
    ds: u64,
    kt: u64,
    tmax: i32,
    ld: i32,
}

// SAFETY: plain-old-data with the C layout the kernel expects.
unsafe impl cudarc::driver::DeviceRepr for DqOperands {}

/// bf16 from a bf16 qkv (a bf16 GEMM's output, [`Backend::linear_as_operand`]).
const BF16_FLASH_FROM_BF16: FlashKernels = FlashKernels {
    forward: [
        "attention_bf16_mma_from_bf16_hd16",
        "attention_bf16_mma_from_bf16_hd32",
        "attention_bf16_mma_from_bf16_hd64",
        "attention_bf16_mma_from_bf16_hd128",
    ],
    kv: [
        "attention_bwd_kv_bf16_from_bf16_hd16",
        "attention_bwd_kv_bf16_from_bf16_hd32",
        "attention_bwd_kv_bf16_from_bf16_hd64",
        "attention_bwd_kv_bf16_from_bf16_hd128",
    ],
    tile: DType::BF16,
};

const TF32X3_FLASH: FlashKernels = FlashKernels {
    forward: ["attention_tf32x3_hd16", "attention_tf32x3_hd32", "attention_tf32x3_hd64", "attention_tf32x3_hd128"],
    kv: ["attention_bwd_kv_tf32x3_hd16", "attention_bwd_kv_tf32x3_hd32", "attention_bwd_kv_tf32x3_hd64", "attention_bwd_kv_tf32x3_hd128"],
    tile: DType::F32,
};

/// The kernels of the flash-attention and tensor-core GEMM tables, by (module, function). Each
/// has a `NAME_smem` companion that reports its dynamic shared memory.
fn table_kernels() -> impl Iterator<Item = (&'static str, &'static str)> {
    let flash = [&BF16_FLASH, &BF16_FLASH_FROM_BF16, &TF32X3_FLASH].into_iter().flat_map(|t| t.forward.iter().chain(&t.kv));
    let gemms = BF16_MMA_KERNELS.iter().chain(&TF32X3_KERNELS);
    flash.map(|&f| ("attention", f)).chain(gemms.map(|k| (k.module, k.name)))
}

/// Every kernel the backend loads, by (module, function): [`FUNCTIONS`], then the tables' kernels
/// and their `_smem` companions.
fn loaded_kernels() -> impl Iterator<Item = (&'static str, String)> {
    let listed = FUNCTIONS.iter().map(|&(m, f)| (m, f.to_string()));
    listed.chain(table_kernels().flat_map(|(m, f)| [(m, f.to_string()), (m, format!("{f}_smem"))]))
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    /// Dynamic shared memory of each kernel that takes some, by kernel name.
    dynamic_smem: HashMap<&'static str, u32>,
    /// bf16 GEMMs: mma.sync (v3) where its alignment rules hold when on, always WMMA (v2) when off.
    mma_sync: bool,
    /// The mma.sync GEMM's tile shape for each GEMM shape met so far.
    tuner: tune::Tuner,
    /// fp32 GEMMs: 3xTF32 on tensor cores where its alignment rules hold when on, always FMA
    /// (`gemm_f32`) when off.
    tf32x3: bool,
    precision: Precision,
    /// Fill every new output with NaN first (tests: unwritten elements show).
    poison: bool,
    /// Page-locked host memory that [`Backend::upload_rows`] packs a batch's audio into.
    staging: Mutex<Option<Staging>>,
    /// The GPU's SM count, and whether GEMMs and sparse products that leave SMs idle are split
    /// along K (`split_k.rs`).
    sms: usize,
    split_k: bool,
    /// The most bytes of dS slabs the attention backward holds at once ([`DQ_SLAB_BYTES`]).
    dq_slab_bytes: usize,
}

/// A page-locked host buffer the DMA engine reads at full bus speed (a pageable copy goes
/// through the driver's own bounce buffers), reused from batch to batch.
struct Staging {
    host: PinnedHostSlice<f32>,
    /// Recorded after the last copy out of `host`: it may be rewritten once this completes.
    copied: CudaEvent,
}

/// Below this many bytes a plain upload costs no more than packing through [`Staging`].
const STAGING_MIN_BYTES: usize = 1 << 20;

/// Why the CUDA backend cannot start here, or `None` when it can.
pub fn unavailable_reason() -> Option<String> {
    if kernels::MODULES.is_empty() {
        return Some(
            "the CUDA kernels were not built (nvcc was not found when this binary was compiled); \
             run scripts/install-cuda-toolchain.sh and rebuild with cargo build --release"
                .into(),
        );
    }
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Some("no CUDA driver on this machine (libcuda.so could not be loaded)".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no GPU".into()),
        Err(e) => Some(format!("the CUDA driver reports no usable GPU ({e})")),
    }
}

/// The (probability, site key) a dropout-fusing kernel takes: (0, 0) drops nothing.
fn dropout_args(dropout: Option<SiteDropout>) -> (f32, u64) {
    dropout.map_or((0.0, 0), |d| (d.dropout.p, d.dropout.site_key(d.site)))
}

fn cu(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| anyhow!("{what}: {e}"))
}

impl CudaBackend {
    pub fn new(ordinal: usize, precision: Precision) -> Result<CudaBackend> {
        if let Some(why) = unavailable_reason() {
            bail!("--device cuda: {why}");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA: {e}"))? as usize;
        ensure!(ordinal < count, "--device cuda:{ordinal}: this machine has {count} GPU(s)");
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open GPU {ordinal}: {e}"))?;
        // SAFETY: everything runs on the one stream below, so no allocation is ever used on a
        // stream other than its own: the per-allocation read/write events cudarc would create
        // (two cuEventCreate per allocation, ~1000 allocations per training step) order nothing.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // SAFETY: plain driver calls on the context's own device with valid out-pointers.
        unsafe {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            cu(sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()), "cuDeviceGetDefaultMemPool")?;
            let mut keep = u64::MAX;
            cu(
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                ),
                "cuMemPoolSetAttribute",
            )?;
        }
        // The sm_90a module holds SASS for compute capability 9.0 alone (H100, H200).
        let hopper = ctx.compute_capability().map_err(|e| anyhow!("CUDA: {e}"))? == (9, 0);
        let mut modules = HashMap::new();
        for (name, image) in kernels::MODULES {
            if *name == tune::SM90A_MODULE && !hopper {
                continue;
            }
            match ctx.load_module(Ptx::from_binary(image.to_vec())) {
                Ok(m) => {
                    modules.insert(*name, m);
                }
                // The Hopper-only GEMMs are an option: without them the mma.sync ones run.
                Err(e) if *name == tune::SM90A_MODULE => {
                    eprintln!("warning: kernels/{name}.cu did not load ({e}); the wgmma GEMMs are off")
                }
                Err(e) => bail!("loading kernels/{name}.cu: {e}"),
            }
        }
        let mut funcs = HashMap::new();
        for (module, func) in loaded_kernels() {
            let Some(m) = modules.get(module) else {
                ensure!(module == tune::SM90A_MODULE, "kernel module {module} missing from this build");
                continue;
            };
            let f = m.load_function(&func).map_err(|e| anyhow!("kernel {func}: {e}"))?;
            funcs.insert(func, f);
        }
        let wgmma = modules.contains_key(tune::SM90A_MODULE);
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| anyhow!("CUDA: {e}"))?;
        let mut be = CudaBackend {
            ctx,
            stream,
            funcs,
            dynamic_smem: HashMap::new(),
            mma_sync: true,
            tuner: tune::Tuner::new(wgmma),
            tf32x3: true,
            precision,
            poison: false,
            staging: Mutex::new(None),
            sms: sms.max(1) as usize,
            split_k: true,
            dq_slab_bytes: DQ_SLAB_BYTES,
        };
        be.size_dynamic_smem_kernels()?;
        Ok(be)
    }

    /// Asks each dynamic-shared-memory kernel's `_smem` companion for its layout size (defined
    /// once, in the .cu file) and allows the kernel that much.
    fn size_dynamic_smem_kernels(&mut self) -> Result<()> {
        let names = FUNCTIONS.iter().filter_map(|(_, f)| f.strip_suffix("_smem")).chain(table_kernels().map(|(_, f)| f));
        for name in names.filter(|name| self.funcs.contains_key(*name)) {
            let out = self.stream.alloc_zeros::<i32>(1).map_err(|e| anyhow!("GPU allocation: {e}"))?;
            let p = out.device_ptr(&self.stream).0;
            let query = self.funcs.get(format!("{name}_smem").as_str()).with_context(|| format!("kernel {name}_smem missing"))?;
            self.launcher().launch(query, launch::config((1, 1, 1), 1), |b| {
                b.arg(&p);
            })?;
            let bytes = self.stream.clone_dtoh(&out).map_err(|e| anyhow!("CUDA copy: {e}"))?[0];
            self.funcs[name]
                .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
                .map_err(|e| anyhow!("{name}: cannot allow {bytes} bytes of shared memory: {e}"))?;
            self.dynamic_smem.insert(name, bytes as u32);
        }
        Ok(())
    }

    /// The stream every kernel runs on (benchmarks queue comparison work on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Chooses the bf16 GEMM: mma.sync (on, the default) or WMMA (benchmarks and tests compare
    /// the two).
    pub fn set_mma_sync(&mut self, on: bool) {
        self.mma_sync = on;
    }

    /// Makes the bf16 tensor-core GEMM always use tile shape `BF16_MMA_KERNELS[i]`, or (`None`,
    /// the default) the fastest one timed for each GEMM shape.
    pub fn set_mma_tile(&mut self, i: Option<usize>) -> Result<()> {
        self.force_kernel(Family::Bf16, i)
    }

    /// Makes every 3xTF32 GEMM use `TF32X3_KERNELS[i]` (tests compare them), or (`None`, the
    /// default) the faster one timed for each GEMM shape.
    pub fn set_tf32x3_kernel(&mut self, i: Option<usize>) -> Result<()> {
        self.force_kernel(Family::Tf32x3, i)
    }

    /// Makes every GEMM of `family` use `family.kernels()[i]` (one this GPU has), or `None`
    /// the timed choice.
    fn force_kernel(&mut self, family: Family, i: Option<usize>) -> Result<()> {
        if let Some(i) = i {
            let kernels = family.kernels();
            let kernel = kernels.get(i).with_context(|| format!("no {family:?} GEMM kernel {i} (there are {})", kernels.len()))?;
            ensure!(self.funcs.contains_key(kernel.name), "{} needs a compute capability 9.0 GPU (H100, H200)", kernel.name);
        }
        self.tuner.force(family, i);
        Ok(())
    }

    /// Times the wgmma tile shapes with the others when choosing a GEMM's kernel (the default
    /// on Hopper), or leaves them out (what `S3R_WGMMA=0` sets).
    pub fn set_wgmma_tuning(&mut self, on: bool) -> Result<()> {
        let loaded = (0..BF16_MMA_KERNELS.len()).any(|i| BF16_MMA_KERNELS[i].is_wgmma() && self.mma_tile_available(i));
        ensure!(loaded || !on, "the wgmma GEMMs need a compute capability 9.0 GPU (H100, H200)");
        self.tuner.with_wgmma = on;
        Ok(())
    }

    /// Whether tile shape `BF16_MMA_KERNELS[i]` runs on this GPU (the wgmma ones need compute
    /// capability 9.0).
    pub fn mma_tile_available(&self, i: usize) -> bool {
        self.funcs.contains_key(BF16_MMA_KERNELS[i].name)
    }

    /// The mma.sync tile shape timed fastest for each class of GEMM shape met so far, as
    /// (M up to, N, K, kernel).
    pub fn mma_tile_choices(&self) -> Vec<(usize, i32, i32, &'static str)> {
        self.tuner.choices()
    }

    /// Chooses the fp32 GEMM: 3xTF32 tensor cores (on, the default; fp32-accurate) or FMA only
    /// (benchmarks and tests compare both).
    pub fn set_tf32x3(&mut self, on: bool) {
        self.tf32x3 = on;
    }

    /// Splits GEMMs and sparse products whose blocks leave SMs idle along K (on, the default),
    /// or runs every one whole (tests compare both).
    pub fn set_split_k(&mut self, on: bool) {
        self.split_k = on;
    }

    /// Caps the dS slabs the attention backward holds at once (default [`DQ_SLAB_BYTES`]; tests
    /// make it small to run one utterance per group).
    pub fn set_dq_slab_bytes(&mut self, bytes: usize) {
        self.dq_slab_bytes = bytes;
    }

    /// Whether fp32 GEMMs run as 3xTF32 where they can.
    pub fn tf32x3(&self) -> bool {
        self.tf32x3
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Makes every new output start as NaN (for tests that must see unwritten elements).
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    /// Waits for all queued work (timing, and surfacing asynchronous errors).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA: {e}"))
    }

    fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn launcher(&self) -> Launch<'_> {
        Launch { stream: &self.stream }
    }

    /// Raw device address of a GPU tensor's first element.
    fn ptr(&self, t: &Tensor) -> Result<u64> {
        match t.storage() {
            Storage::Cuda(b) => Ok(b.0.device_ptr(&self.stream).0),
            Storage::Host(_) => bail!("a host tensor {:?} was passed to the CUDA backend (upload it first)", t.shape()),
        }
    }

    /// The device buffer behind a GPU tensor.
    fn buffer(t: &Tensor) -> Result<&CudaSlice<u8>> {
        match t.storage() {
            Storage::Cuda(b) => Ok(&b.0),
            Storage::Host(_) => bail!("a host tensor {:?} was passed to the CUDA backend (upload it first)", t.shape()),
        }
    }

    fn expect_dtype(t: &Tensor, dtype: DType, what: &str) -> Result<()> {
        ensure!(t.dtype() == dtype, "{what}: expected {dtype:?}, found {:?}", t.dtype());
        Ok(())
    }

    /// A fresh device tensor (NaN-filled when poisoning).
    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // SAFETY: every op writes all elements of its output before anything reads them; with
        // poisoning on they are first set to NaN.
        let buf = unsafe { self.stream.alloc::<u8>((n * dtype.size_of()).max(4)) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let t = Tensor::from_cuda(CudaBuf(Arc::new(buf)), dtype, shape);
        if self.poison && dtype == DType::F32 {
            self.fill(&t, f32::NAN)?;
        }
        Ok(t)
    }

    fn fill(&self, t: &Tensor, v: f32) -> Result<()> {
        let (p, n) = (self.ptr(t)?, t.numel() as i64);
        self.launcher().elementwise(self.func("fill_f32"), n as usize, |b| {
            b.arg(&p).arg(&v).arg(&n);
        })
    }

    /// `offsets` of a packed batch (n + 1 prefix sums) as a device i32 array.
    fn offsets(&self, seqs: &Seqs) -> Result<CudaSlice<i32>> {
        let o: Vec<i32> = seqs.offsets().iter().map(|&o| o as i32).collect();
        self.stream.clone_htod(&o).map_err(|e| anyhow!("CUDA copy: {e}"))
    }

    fn bytes_to_device(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let buf = self.stream.clone_htod(bytes).map_err(|e| anyhow!("CUDA copy: {e}"))?;
        Ok(Tensor::from_cuda(CudaBuf(Arc::new(buf)), dtype, shape))
    }

    /// `act(a · bᵀ + bias)` on raw device addresses: `a` is `[m, k]` with row stride `lda` (f32),
    /// `b` is `[n, k]` with row stride `ldb` (f32 or bf16 as `b_dtype`), `mask` optional bits over
    /// `b`, `c` is written `[m, n]` with row stride `ldc` (in bf16 with `c_bf16`, which only the
    /// mma.sync kernel writes); `batch` products along blockIdx.z.
    ///
    /// `a16`, when given, is the address of a bf16 copy of A laid out like A; with bf16 weights
    /// the mma.sync kernel then runs wherever its alignment rules hold.
    fn gemm(&self, args: GemmArgs, a16: Option<u64>, b_dtype: DType, batch: usize) -> Result<()> {
        let fast = a16.map(|a| GemmArgs { a, ..args }).filter(|f| b_dtype == DType::BF16 && f.tensor_core_ok());
        if let Some(fast) = fast {
            return self.gemm_tuned(Family::Bf16, fast, batch);
        }
        // A that exists only in bf16 (a conv's or linear's bf16 input) has no f32 for the others.
        ensure!(a16 != Some(args.a), "a bf16 GEMM input needs the mma.sync GEMM, which cannot run {}x{}x{} here", args.m, args.n, args.k);
        // Only the mma.sync kernels write bf16; callers ask for it only where they run.
        ensure!(args.c_bf16 == 0, "a bf16 GEMM output needs the mma.sync GEMM");
        match b_dtype {
            DType::F32 if self.tf32x3 && args.tf32x3_ok() => self.gemm_tuned(Family::Tf32x3, args, batch),
            DType::F32 => self.launch_gemm("gemm_f32", args, GemmGeometry { tile: (64, 64), threads: 256, smem: 0 }, batch),
            DType::BF16 => {
                self.launch_gemm("gemm_bf16", args.with_vector_check(2), GemmGeometry { tile: (128, 128), threads: 256, smem: 0 }, batch)
            }
            other => bail!("GEMM weights in {other:?} are not supported"),
        }
    }

    /// Whether activations with rows of `row_len` elements go to the mma.sync GEMM in bf16: the
    /// bf16 backend with that kernel on, each row 16-byte aligned in bf16.
    fn mma_rows(&self, row_len: usize) -> bool {
        self.precision == Precision::Bf16 && self.mma_sync && row_len.is_multiple_of(8)
    }

    /// A GEMM's A operand `x` (f32, or bf16 from an `_as_operand` op): `x` as every kernel but
    /// the mma.sync one reads it (widened when bf16 and `tensor_cores` is false), and, where the
    /// mma.sync kernel runs (`tensor_cores`), its bf16 form: `x` itself, or a bf16 copy.
    fn gemm_operand(&self, x: &Tensor, tensor_cores: bool, what: &str) -> Result<(Tensor, Option<Tensor>)> {
        let x = self.kernel_input(x, tensor_cores, what)?;
        let x16 = match (tensor_cores, x.dtype()) {
            (false, _) => None,
            (true, DType::BF16) => Some(x.clone()),
            (true, _) => Some(self.to_bf16(&x)?),
        };
        Ok((x, x16))
    }

    /// `act(group_norm_time(·))` over `c` channels of `seqs` read from `src` (a stored tensor, or
    /// the first conv computed on the fly), into a fresh tensor.
    fn group_norm_from(
        &self,
        src: NormSource,
        seqs: &Seqs,
        c: usize,
        norm: NormParams,
        act: Activation,
        out_dtype: DType,
    ) -> Result<Tensor> {
        ensure!(norm.gamma.numel() == c && norm.beta.numel() == c, "group norm over {c} channels got {} parameters", norm.gamma.numel());
        let out = self.empty(&[seqs.total(), c], out_dtype)?;
        let offsets = self.offsets(seqs)?;
        let utts = seqs.count();
        let stats = self.stream.alloc_zeros::<f64>(2 * utts * c).map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let (po, poff, pstats, pg, pb) = (
            self.ptr(&out)?,
            offsets.device_ptr(&self.stream).0,
            stats.device_ptr(&self.stream).0,
            self.ptr(norm.gamma)?,
            self.ptr(norm.beta)?,
        );
        let (c_i, utts_i, act_i, out_bf16) = (c as i32, utts as i32, act as i32, (out_dtype == DType::BF16) as i32);
        let chunk_rows = 512i32;
        let chunks = seqs.lens().iter().copied().max().unwrap_or(0).div_ceil(chunk_rows as usize).max(1);
        let cfg = launch::config((c.div_ceil(32) as u32, utts as u32, chunks as u32), 256);
        for pass in 0i32..3 {
            self.launcher().launch(self.func("group_norm_time"), cfg, |b| {
                b.arg(&src)
                    .arg(&po)
                    .arg(&poff)
                    .arg(&pstats)
                    .arg(&pg)
                    .arg(&pb)
                    .arg(&c_i)
                    .arg(&utts_i)
                    .arg(&norm.eps)
                    .arg(&act_i)
                    .arg(&pass)
                    .arg(&chunk_rows)
                    .arg(&out_bf16);
            })?;
        }
        Ok(out)
    }

    /// A bf16 copy of an f32 device tensor (the operand format of the bf16 kernels).
    pub fn to_bf16(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.empty(x.shape(), DType::BF16)?;
        let (px, po, n) = (self.ptr(x)?, self.ptr(&out)?, x.numel() as i64);
        self.launcher().elementwise(self.func("to_bf16"), n as usize, |b| {
            b.arg(&px).arg(&po).arg(&n);
        })?;
        Ok(out)
    }

    /// The flash-style attention kernels this backend runs on a qkv of `dtype`: bf16 (from an
    /// fp32 or a bf16 qkv), or fp32 as 3xTF32; none for fp32 with `tf32x3` off (the FMA kernel
    /// forward, T x T products in training).
    fn flash_kernels(&self, dtype: DType) -> Result<Option<&'static FlashKernels>> {
        Ok(match (self.precision, dtype) {
            (Precision::Bf16, DType::F32) => Some(&BF16_FLASH),
            (Precision::Bf16, DType::BF16) => Some(&BF16_FLASH_FROM_BF16),
            (Precision::F32, DType::F32) if self.tf32x3 => Some(&TF32X3_FLASH),
            (Precision::F32, DType::F32) => None,
            (precision, dtype) => bail!("attention: a {dtype:?} qkv on the {precision:?} backend"),
        })
    }

    /// Splits qkv `[frames, 3c]` of `seqs` into (c, head size, the head-size class the
    /// attention kernels are instantiated for: 16, 32, 64, 128).
    fn attention_shape(qkv: &Tensor, seqs: &Seqs, heads: usize) -> Result<(usize, usize, usize)> {
        let c = attention_width(qkv, seqs, heads)?;
        let hd = c / heads;
        let class = match hd {
            0..=16 => 0,
            17..=32 => 1,
            33..=64 => 2,
            65..=128 => 3,
            _ => bail!("attention: head size {hd} is larger than the kernels support (128)"),
        };
        Ok((c, hd, class))
    }

    /// The attention kernels' grid: 64 rows (queries, or keys in the backward) per block, for
    /// every head of every utterance.
    fn attention_config(seqs: &Seqs, heads: usize, threads: u32, smem: u32) -> cudarc::driver::LaunchConfig {
        let longest = seqs.lens().iter().copied().max().unwrap_or(0);
        let mut cfg = launch::config((longest.div_ceil(64).max(1) as u32, heads as u32, seqs.count() as u32), threads);
        cfg.shared_mem_bytes = smem;
        cfg
    }

    /// Flash-style attention of each utterance (no T x T matrix in memory). The tensor-core
    /// kernels (bf16, fp32 as 3xTF32) also take dropout on the probabilities and write each
    /// row's log-sum-exp into `lse` (`[frames, heads]`) for the backward; the fp32 FMA kernel
    /// (one thread per query, `tf32x3` off) takes neither.
    fn fused_attention(
        &self,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        lse: Option<&Tensor>,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        let (c, hd, class) = Self::attention_shape(qkv, seqs, heads)?;
        let out = self.empty(&[seqs.total(), c], DType::F32)?;
        let offsets = self.offsets(seqs)?;
        let (pq, po, poff) = (self.ptr(qkv)?, self.ptr(&out)?, offsets.device_ptr(&self.stream).0);
        let (c_i, hd_i) = (c as i32, hd as i32);
        match self.flash_kernels(qkv.dtype())? {
            Some(k) => {
                let name = k.forward[class];
                let plse = lse.map(|t| self.ptr(t)).transpose()?.unwrap_or(0);
                let (p, key) = dropout_args(dropout);
                self.launcher().launch(self.func(name), Self::attention_config(seqs, heads, 128, self.dynamic_smem[name]), |b| {
                    b.arg(&pq).arg(&po).arg(&poff).arg(&c_i).arg(&hd_i).arg(&scale).arg(&plse).arg(&p).arg(&key);
                })?;
            }
            None => {
                ensure!(lse.is_none() && dropout.is_none(), "the fp32 FMA attention keeps no log-sum-exp and drops nothing");
                let name = ["attention_hd16", "attention_hd32", "attention_hd64", "attention_hd128"][class];
                self.launcher().launch(self.func(name), Self::attention_config(seqs, heads, 64, 0), |b| {
                    b.arg(&pq).arg(&po).arg(&poff).arg(&c_i).arg(&hd_i).arg(&scale);
                })?;
            }
        }
        Ok(out)
    }

    /// The gradient of [`Self::fused_attention`] (bf16 or 3xTF32) with respect to qkv: the
    /// forward's output and log-sum-exp (`saved`, or the forward run again), D = rowsum(dO ⊙ O),
    /// then the flash-style backward kernel (kernels/attention.cu: dK and dV per key tile, and
    /// dQ's operands) and dQ's batched GEMM.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention_grad(
        &self,
        d_out: &Tensor,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
        saved: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let k = self
            .flash_kernels(qkv.dtype())?
            .context("the flash-style attention backward runs on bf16 or 3xTF32 tensor cores (tf32x3 is off)")?;
        let (c, hd, class) = Self::attention_shape(qkv, seqs, heads)?;
        ensure!(d_out.numel() == seqs.total() * c, "attention backward: gradient {:?} for qkv {:?}", d_out.shape(), qkv.shape());
        let rows = seqs.total();
        // The forward's output and log-sum-exp: as it kept them, or from running it again (the
        // same kernel, so the same bits).
        let (out, lse) = match saved {
            Some((out, lse)) => {
                ensure!(
                    out.numel() == rows * c && lse.numel() == rows * heads,
                    "attention backward: saved {:?} and {:?}",
                    out.shape(),
                    lse.shape()
                );
                (out.clone(), lse.clone())
            }
            None => {
                let lse = self.empty(&[rows, heads], DType::F32)?;
                (self.fused_attention(qkv, seqs, heads, scale, Some(&lse), dropout)?, lse)
            }
        };
        let dot = self.empty(&[rows, heads], DType::F32)?;
        let (pdo, pout, pdot, total, c_i, hd_i) = (self.ptr(d_out)?, self.ptr(&out)?, self.ptr(&dot)?, rows as i64, c as i32, hd as i32);
        self.launcher().elementwise(self.func("attention_bwd_dot"), rows * heads, |b| {
            b.arg(&pdo).arg(&pout).arg(&pdot).arg(&total).arg(&c_i).arg(&hd_i);
        })?;
        let d_qkv = self.empty(qkv.shape(), DType::F32)?;
        let offsets = self.offsets(seqs)?;
        let (pq, plse, pdq, poff) = (self.ptr(qkv)?, self.ptr(&lse)?, self.ptr(&d_qkv)?, offsets.device_ptr(&self.stream).0);
        let (p, key) = dropout_args(dropout);
        let name = k.kv[class];
        // Utterances in groups whose dS slabs stay under DQ_SLAB_BYTES (memory), each: the
        // kernel (dK, dV; dQ's operands), dQ = (scale dS) K for every (utterance, head) in one
        // batched GEMM, then its rows into d_qkv.
        let lens = seqs.lens();
        let longest = |us: std::ops::Range<usize>| lens[us].iter().copied().max().unwrap_or(0);
        // A slab row: keys padded to the tensor-core GEMMs' K multiple.
        let row_len = |tmax: usize| tmax.next_multiple_of(8).max(8);
        let mut u0 = 0;
        while u0 < lens.len() {
            let slab_bytes = |u1: usize| (u1 - u0) * heads * longest(u0..u1) * row_len(longest(u0..u1)) * k.tile.size_of();
            let mut u1 = u0 + 1;
            while u1 < lens.len() && slab_bytes(u1 + 1) <= self.dq_slab_bytes {
                u1 += 1;
            }
            let tmax = longest(u0..u1);
            let (group, ld, slabs) = (Seqs::new(lens[u0..u1].to_vec()), row_len(tmax), (u1 - u0) * heads);
            let (ds, kt) = (self.empty(&[slabs, tmax, ld], k.tile)?, self.empty(&[slabs, hd, ld], k.tile)?);
            let operands = DqOperands { ds: self.ptr(&ds)?, kt: self.ptr(&kt)?, tmax: tmax as i32, ld: ld as i32 };
            let poff_g = poff + 4 * u0 as u64;
            self.launcher().launch(self.func(name), Self::attention_config(&group, heads, 128, self.dynamic_smem[name]), |b| {
                b.arg(&pq).arg(&pdo).arg(&plse).arg(&pdot).arg(&pdq).arg(&poff_g).arg(&c_i).arg(&hd_i).arg(&scale).arg(&p).arg(&key);
                b.arg(&operands);
            })?;
            let dq = self.empty(&[slabs, tmax, hd], DType::F32)?;
            let (ld_i, tmax_i, hd_l) = (ld as i64, tmax as i64, hd as i64);
            let args = GemmArgs {
                a: operands.ds,
                lda: ld_i,
                batch_a: tmax_i * ld_i,
                b: operands.kt,
                ldb: ld_i,
                batch_b: hd_l * ld_i,
                c: self.ptr(&dq)?,
                ldc: hd_l,
                batch_c: tmax_i * hd_l,
                m: tmax as i32,
                n: hd as i32,
                k: ld as i32,
                ..GemmArgs::default()
            };
            self.gemm(args, (k.tile == DType::BF16).then_some(args.a), k.tile, slabs)?;
            let (pdq_s, n) = (self.ptr(&dq)?, dq.numel() as i64);
            self.launcher().elementwise(self.func("attention_dq_scatter"), dq.numel(), |b| {
                b.arg(&pdq_s).arg(&pdq).arg(&poff_g).arg(&c_i).arg(&hd_i).arg(&operands.tmax).arg(&n);
            })?;
            u0 = u1;
        }
        Ok(d_qkv)
    }

    /// `act(LN(drop(x) + residual))` (residual and dropout optional) in one pass, the sum
    /// before the norm written to `sum` when given.
    fn layer_norm_kernel(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        norm: NormParams,
        act: Activation,
        sum: Option<&Tensor>,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        Self::expect_dtype(x, DType::F32, "layer norm input")?;
        let c = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / c.max(1);
        ensure!(norm.gamma.numel() == c && norm.beta.numel() == c, "layer norm over {c} channels got {} parameters", norm.gamma.numel());
        for r in residual.iter().chain(&sum) {
            ensure!(r.shape() == x.shape(), "layer norm: {:?} does not match its input {:?}", r.shape(), x.shape());
        }
        let out = self.empty(x.shape(), DType::F32)?;
        let optional = |t: Option<&Tensor>| t.map(|t| self.ptr(t)).transpose().map(|p| p.unwrap_or(0));
        let (px, pr, pg, pb, po, ps) =
            (self.ptr(x)?, optional(residual)?, self.ptr(norm.gamma)?, self.ptr(norm.beta)?, self.ptr(&out)?, optional(sum)?);
        let (rows_i, c_i, act_i) = (rows as i32, c as i32, act as i32);
        let (p, key) = dropout_args(dropout);
        self.launcher().rows_per_warp(self.func("layer_norm"), rows, |b| {
            b.arg(&px).arg(&pr).arg(&pg).arg(&pb).arg(&po).arg(&rows_i).arg(&c_i).arg(&norm.eps).arg(&act_i);
            b.arg(&ps).arg(&p).arg(&key);
        })?;
        Ok(out)
    }

    /// `x` as a kernel reads it: as it is, or, when it is bf16 (an operand a bf16 GEMM wrote)
    /// and the kernel reads only f32 (`bf16_ok` false), widened to an f32 copy. Other dtypes
    /// are refused.
    fn kernel_input(&self, x: &Tensor, bf16_ok: bool, what: &str) -> Result<Tensor> {
        match x.dtype() {
            DType::BF16 if !bf16_ok => self.to_f32(x),
            DType::F32 | DType::BF16 => Ok(x.clone()),
            other => bail!("{what}: expected F32 or BF16, found {other:?}"),
        }
    }

    /// An fp32 copy of a bf16 device tensor.
    fn to_f32(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.empty(x.shape(), DType::F32)?;
        let (px, po, n) = (self.ptr(x)?, self.ptr(&out)?, x.numel() as i64);
        self.launcher().elementwise(self.func("bf16_to_f32"), x.numel(), |b| {
            b.arg(&px).arg(&po).arg(&n);
        })?;
        Ok(out)
    }

    /// Whether a conv with weight `w` over `c_in` channels in groups of `cg` runs on the
    /// mma.sync GEMM (bf16 weights, that kernel on, rows keeping its 16-byte alignment): only
    /// there do its input and output exist in bf16.
    fn conv_on_tensor_cores(&self, w: &Tensor, c_in: usize, cg: usize) -> bool {
        w.dtype() == DType::BF16 && self.mma_rows(c_in) && cg.is_multiple_of(8)
    }

    /// [`Backend::conv1d`] of an f32 or bf16 input (bf16: the output of a conv that fed this
    /// one), into `out_dtype` where the tensor-core path runs (f32 elsewhere).
    #[allow(clippy::too_many_arguments)]
    fn conv1d_as(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        act: Activation,
        out_dtype: DType,
    ) -> Result<Tensor> {
        let ConvGeometry { kernel, stride, pad_left, groups } = geom;
        let &[rows, c_in] = x.shape() else { bail!("conv1d input must be [frames, channels], found {:?}", x.shape()) };
        let &[c_out, w_k, cg] = w.shape() else { bail!("conv1d weight must be [out, kernel, in/groups], found {:?}", w.shape()) };
        ensure!(rows == seqs_in.total() && seqs_in.count() == seqs_out.count(), "conv1d: input does not match its batch");
        ensure!(
            groups > 0 && c_in % groups == 0 && c_out % groups == 0 && w_k == kernel && cg == c_in / groups,
            "conv1d: weight {:?} does not fit the geometry {geom:?}",
            w.shape()
        );
        let tensor_cores = self.conv_on_tensor_cores(w, c_in, cg);
        let (x, x16) = self.gemm_operand(x, tensor_cores, "conv1d input")?;
        let x = &x;
        let out_dtype = if tensor_cores { out_dtype } else { DType::F32 };
        let og = c_out / groups;
        let out = self.empty(&[seqs_out.total(), c_out], out_dtype)?;
        let (px, pw, po) = (self.ptr(x)?, self.ptr(w)?, self.ptr(&out)?);
        let (in_size, out_size) = (x.dtype().size_of(), out_dtype.size_of());
        let kc = (kernel * cg) as i64;
        let px16 = x16.as_ref().map(|t| self.ptr(t)).transpose()?;
        // One implicit-GEMM launch per utterance, the groups along z: no im2col buffer.
        for u in 0..seqs_in.count() {
            let t_out = seqs_out.lens()[u];
            let args = GemmArgs {
                a: px + (seqs_in.range(u).start * c_in * in_size) as u64,
                lda: c_in as i64,
                batch_a: cg as i64,
                b: pw,
                ldb: kc,
                batch_b: og as i64 * kc,
                bias: b.map(|b| self.ptr(b)).transpose()?.unwrap_or(0),
                batch_bias: og as i64,
                c: po + (seqs_out.range(u).start * c_out * out_size) as u64,
                ldc: c_out as i64,
                batch_c: og as i64,
                m: t_out as i32,
                n: og as i32,
                k: kc as i32,
                act: act as i32,
                conv_cg: cg as i32,
                conv_stride: stride as i32,
                conv_pad: pad_left as i32,
                conv_tin: seqs_in.lens()[u] as i32,
                c_bf16: (out_dtype == DType::BF16) as i32,
                ..GemmArgs::default()
            };
            let a16 = px16.map(|p| p + (seqs_in.range(u).start * c_in * 2) as u64);
            self.gemm(args, a16, w.dtype(), groups)?;
        }
        Ok(out)
    }

    /// [`Backend::conv1d_group_norm`] into `out_dtype` (bf16 for a conv reading it on tensor
    /// cores).
    #[allow(clippy::too_many_arguments)]
    fn conv1d_group_norm_as(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        norm: NormParams,
        act: Activation,
        out_dtype: DType,
    ) -> Result<Tensor> {
        let &[c_out, kernel, c_in] = w.shape() else { bail!("conv1d weight must be [out, kernel, in/groups], found {:?}", w.shape()) };
        let on_the_fly = x.shape() == [seqs_in.total(), 1]
            && x.dtype() == DType::F32
            && c_in == 1
            && geom.groups == 1
            && kernel == geom.kernel
            && kernel <= MAX_SOURCE_TAPS
            && seqs_in.count() == seqs_out.count()
            && matches!(w.dtype(), DType::F32 | DType::BF16);
        if !on_the_fly {
            let y = self.conv1d(x, seqs_in, seqs_out, w, b, geom, Activation::Identity)?;
            let c = *y.shape().last().unwrap_or(&1);
            return self.group_norm_from(NormSource { x: self.ptr(&y)?, ..NormSource::default() }, seqs_out, c, norm, act, out_dtype);
        }
        // Frames the conv gives each utterance (with zero padding on the left only).
        let frames = |n: usize| (n + geom.pad_left).checked_sub(kernel).map_or(0, |d| d / geom.stride + 1);
        ensure!(
            seqs_in.lens().iter().zip(seqs_out.lens()).all(|(&n, &t)| t <= frames(n)),
            "conv1d + group norm: output lengths {:?} exceed what inputs of {:?} samples give",
            seqs_out.lens(),
            seqs_in.lens()
        );
        ensure!(b.is_none_or(|b| b.numel() == c_out), "conv bias of {} values for {c_out} channels", b.map_or(0, Tensor::numel));
        let in_offsets = self.offsets(seqs_in)?;
        let src = NormSource {
            audio: self.ptr(x)?,
            in_offsets: in_offsets.device_ptr(&self.stream).0,
            w: self.ptr(w)?,
            bias: b.map(|b| self.ptr(b)).transpose()?.unwrap_or(0),
            kernel: kernel as i32,
            stride: geom.stride as i32,
            pad: geom.pad_left as i32,
            w_bf16: (w.dtype() == DType::BF16) as i32,
            ..NormSource::default()
        };
        self.group_norm_from(src, seqs_out, c_out, norm, act, out_dtype)
    }

    /// Packs a 0/1 f32 mask tensor on the device into bits (see [`crate::mask`]).
    pub fn pack_mask(&self, mask: &Tensor) -> Result<CudaSlice<u8>> {
        let n = mask.numel() as i64;
        // SAFETY: the kernel writes every byte of `bits` before anything reads it.
        let bits = unsafe { self.stream.alloc::<u8>((n as usize).div_ceil(8).max(1)) }.map_err(|e| anyhow!("GPU allocation: {e}"))?;
        let (pm, pb) = (self.ptr(mask)?, bits.device_ptr(&self.stream).0);
        self.launcher().elementwise(self.func("pack_mask"), (n as usize).div_ceil(8), |b| {
            b.arg(&pm).arg(&pb).arg(&n);
        })?;
        Ok(bits)
    }

    /// Unpacks `n` mask bits into a 0/1 f32 tensor of `shape`.
    pub fn unpack_mask(&self, bits: &CudaSlice<u8>, shape: &[usize]) -> Result<Tensor> {
        let out = self.empty(shape, DType::F32)?;
        let n = out.numel() as i64;
        ensure!(bits.len() * 8 >= n as usize, "mask has {} bits for {n} weights", bits.len() * 8);
        let (pb, po) = (bits.device_ptr(&self.stream).0, self.ptr(&out)?);
        self.launcher().elementwise(self.func("unpack_mask"), n as usize, |b| {
            b.arg(&pb).arg(&po).arg(&n);
        })?;
        Ok(out)
    }

    /// Copies packed mask bits to the device.
    pub fn upload_mask(&self, bits: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream.clone_htod(bits).map_err(|e| anyhow!("CUDA copy: {e}"))
    }

    /// [`Backend::linear`] with a packed bit mask over the weight applied inside the GEMM.
    pub fn linear_masked(&self, x: &Tensor, w: &Tensor, mask: &CudaSlice<u8>, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let [d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        ensure!(mask.len() * 8 >= d_out * d_in, "mask has {} bits for a {:?} weight", mask.len() * 8, w.shape());
        self.linear_impl(x, w, Some(mask.device_ptr(&self.stream).0), b, act)
    }

    fn linear_impl(&self, x: &Tensor, w: &Tensor, mask: Option<u64>, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let n = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
        self.segmented_linear(x, w, b, act, &[(n, mask)], DType::F32)
    }

    /// Whether a linear with weight `w` over `d_in` features (masked or not) runs on the
    /// mma.sync GEMM (bf16 weights, that kernel on, rows keeping its 16-byte alignment, a
    /// mask's bits one aligned word per stage): only there do its input and output exist in bf16.
    fn linear_on_tensor_cores(&self, w: &Tensor, d_in: usize, masked: bool) -> bool {
        w.dtype() == DType::BF16 && self.mma_rows(d_in) && (!masked || d_in.is_multiple_of(32))
    }

    /// `act(x · wᵀ + b)` over consecutive row segments of `x` (f32, or bf16 from
    /// [`Backend::linear_as_operand`]), each GEMM with its own mask bits (device addresses;
    /// `None`: unmasked), into `out_dtype` where the tensor-core path runs (f32 elsewhere).
    fn segmented_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<u64>)],
        out_dtype: DType,
    ) -> Result<Tensor> {
        let &[d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        let shape = linear_output_shape("linear", x, (d_in, d_out), b, Some(segments.iter().map(|s| s.0).sum()))?;
        let tensor_cores = self.linear_on_tensor_cores(w, d_in, segments.iter().any(|s| s.1.is_some()));
        let (x, x16) = self.gemm_operand(x, tensor_cores, "linear input")?;
        let x = &x;
        let out_dtype = if tensor_cores { out_dtype } else { DType::F32 };
        let out = self.empty(&shape, out_dtype)?;
        let (pa, pc, pa16) = (self.ptr(x)?, self.ptr(&out)?, x16.as_ref().map(|t| self.ptr(t)).transpose()?);
        let (in_size, out_size) = (x.dtype().size_of() as u64, out_dtype.size_of() as u64);
        let mut row = 0u64;
        for &(rows, mask) in segments.iter().filter(|s| s.0 > 0) {
            let args = GemmArgs {
                a: pa + row * d_in as u64 * in_size,
                lda: d_in as i64,
                b: self.ptr(w)?,
                ldb: d_in as i64,
                mask: mask.unwrap_or(0),
                bias: b.map(|b| self.ptr(b)).transpose()?.unwrap_or(0),
                c: pc + row * d_out as u64 * out_size,
                ldc: d_out as i64,
                m: rows as i32,
                n: d_out as i32,
                k: d_in as i32,
                act: act as i32,
                c_bf16: (out_dtype == DType::BF16) as i32,
                ..GemmArgs::default()
            };
            self.gemm(args, pa16.map(|p| p + row * d_in as u64 * 2), w.dtype(), 1)?;
            row += rows as u64;
        }
        Ok(out)
    }

    /// Routing segments with their masks as device addresses.
    fn device_segments(&self, w: &Tensor, segments: &[(usize, Option<&LinearMask>)]) -> Result<Vec<(usize, Option<u64>)>> {
        let [d_out, d_in] = w.shape() else { bail!("linear weight must be 2-D, found {:?}", w.shape()) };
        segments
            .iter()
            .map(|&(rows, mask)| match mask {
                None => Ok((rows, None)),
                Some(LinearMask::Cuda(bits)) => {
                    ensure!(bits.0.len() * 8 >= d_out * d_in, "mask has {} bits for a {:?} weight", bits.0.len() * 8, w.shape());
                    Ok((rows, Some(bits.0.device_ptr(&self.stream).0)))
                }
                Some(LinearMask::Host(_) | LinearMask::Applied(_)) => bail!("a mask prepared for the CPU was given to the CUDA backend"),
            })
            .collect()
    }

    /// The weight dtype this backend's GEMMs take.
    fn weight_dtype(&self) -> DType {
        match self.precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl Backend for CudaBackend {
    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    /// The stream-ordered pool's high-water mark of memory in use (every allocation of this
    /// backend comes from it), then reset.
    fn take_peak_memory(&self) -> Result<Option<u64>> {
        self.synchronize()?;
        let mut peak = 0u64;
        // SAFETY: driver calls on this context's default pool with valid in/out pointers.
        unsafe {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            cu(sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()), "cuDeviceGetDefaultMemPool")?;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            cu(sys::cuMemPoolGetAttribute(pool, attr, &mut peak as *mut u64 as *mut std::ffi::c_void), "cuMemPoolGetAttribute")?;
            let mut zero = 0u64;
            cu(sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut std::ffi::c_void), "cuMemPoolSetAttribute")?;
        }
        Ok(Some(peak))
    }

    fn name(&self) -> String {
        format!("cuda:{} ({:?})", self.ctx.ordinal(), self.precision)
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        match t.storage() {
            Storage::Cuda(_) => Ok(t.clone()),
            Storage::Host(_) => {
                let host = t.to_f32()?;
                self.bytes_to_device(bytemuck::cast_slice(host.f32s()?), DType::F32, t.shape())
            }
        }
    }

    fn upload_rows(&self, parts: &[&[f32]], cols: usize) -> Result<Tensor> {
        let rows = packed_rows(parts, cols)?;
        let n = rows * cols;
        if n * 4 < STAGING_MIN_BYTES {
            return self.upload(&Tensor::from_vec(parts.concat(), &[rows, cols]));
        }
        let mut guard = self.staging.lock().map_err(|_| anyhow!("the upload staging buffer was poisoned by a panic"))?;
        if let Some(st) = guard.as_ref() {
            st.copied.synchronize().map_err(|e| anyhow!("CUDA event: {e}"))?;
        }
        if guard.as_ref().is_none_or(|st| st.host.len() < n) {
            *guard = None; // free the old buffer first
                           // SAFETY: page-locked memory of `n` (rounded up) f32s; every element read below is
                           // written first.
            let host =
                unsafe { self.ctx.alloc_pinned::<f32>(n.next_power_of_two()) }.map_err(|e| anyhow!("pinned host allocation: {e}"))?;
            let copied = self.ctx.new_event(None).map_err(|e| anyhow!("CUDA event: {e}"))?;
            *guard = Some(Staging { host, copied });
        }
        let st = guard.as_mut().expect("allocated above");
        let host = st.host.as_mut_slice().map_err(|e| anyhow!("pinned host buffer: {e}"))?;
        // Each part into its own span, in parallel.
        let mut spans = Vec::with_capacity(parts.len());
        let mut rest = &mut host[..n];
        for p in parts {
            let (span, tail) = rest.split_at_mut(p.len());
            spans.push(span);
            rest = tail;
        }
        spans.into_par_iter().zip(parts.par_iter()).for_each(|(span, p)| span.copy_from_slice(p));
        let out = self.empty(&[rows, cols], DType::F32)?;
        // SAFETY: `out` holds n f32s on the device, `host` at least n on the host; the copy is
        // queued on the one stream, and `copied` keeps `host` from being rewritten before it ends.
        unsafe {
            cu(
                sys::cuMemcpyHtoDAsync_v2(self.ptr(&out)?, host.as_ptr() as *const std::ffi::c_void, n * 4, self.stream.cu_stream()),
                "cuMemcpyHtoDAsync",
            )?;
        }
        st.copied.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        Ok(out)
    }

    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        let Storage::Cuda(b) = t.storage() else { return t.to_f32() };
        let bytes = self.stream.clone_dtoh(b.0.as_ref()).map_err(|e| anyhow!("CUDA copy: {e}"))?;
        let bytes = &bytes[..t.numel() * t.dtype().size_of()];
        match t.dtype() {
            DType::F32 => Ok(Tensor::from_vec(bytemuck::pod_collect_to_vec(bytes), t.shape())),
            // bf16 weights (`--precision bf16`), widened exactly.
            dtype => Tensor::from_host_bytes(HostBytes::Half(Arc::new(bytemuck::pod_collect_to_vec(bytes))), dtype, t.shape())?.to_f32(),
        }
    }

    fn prepare_conv_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.prepare_linear_weight(w)
    }

    fn swap_last_two(&self, t: &Tensor) -> Result<Tensor> {
        self.swap_last_two_f32(t)
    }

    fn weight_norm(&self, g: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.weight_norm_fold(g, v)
    }

    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.concat_rows_f32(parts)
    }

    fn prepare_linear_weight(&self, w: &Tensor) -> Result<Tensor> {
        let dtype = self.weight_dtype();
        if let Storage::Cuda(_) = w.storage() {
            // Already here (a finetuned weight): shared as it is in fp32, converted on the device for bf16.
            Self::expect_dtype(w, DType::F32, "linear weight")?;
            return if dtype == DType::F32 { Ok(w.clone()) } else { self.to_bf16(w) };
        }
        let host = w.to_f32()?.to_dtype(dtype)?;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(host.f32s()?).to_vec(),
            _ => host.to_vec()?.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        };
        self.bytes_to_device(&bytes, dtype, w.shape())
    }

    fn prepare_mask(&self, bits: &[u8], d_out: usize, d_in: usize) -> Result<LinearMask> {
        ensure!(bits.len() * 8 >= d_out * d_in, "mask has {} bits for a {d_out} x {d_in} weight", bits.len() * 8);
        Ok(LinearMask::Cuda(CudaBuf(Arc::new(self.upload_mask(bits)?))))
    }

    fn prepare_sparse(&self, w: &Tensor) -> Result<Option<SparseWeight>> {
        self.prepare_sparse_weight(w)
    }

    /// Measured on an H200 (docs/PERF.md, `cargo bench --bench sparse`, 2026-11-28): at batch
    /// 1 x 1 s the sparse kernel beat the fp32 GEMM from 80-90% dropped (1.6x at 90%, a tie at
    /// 70%), never the bf16 one (57 against 40 us, 185 against 95 us at 90%: the bf16 backend
    /// makes no sparse copy, see `prepare_sparse_weight`); at 8 x 15 s the dense GEMMs won by
    /// 1.6-5x even at 90%.
    fn sparse_pays(&self, sp: &SparseWeight, rows: usize) -> bool {
        crate::backend::cpu::sparse::sparse_pays(1.0 - sp.density(), rows, f64::INFINITY)
    }

    fn linear_sparse(&self, x: &Tensor, sp: &SparseWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.sparse_linear(x, sp, b, act)
    }

    fn linear_segments(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor> {
        self.segmented_linear(x, w, b, act, &self.device_segments(w, segments)?, DType::F32)
    }

    /// bf16 where the GEMM runs on tensor cores and the rows it writes stay 16-byte aligned for
    /// the next GEMM (`out` features a multiple of 8); f32 otherwise.
    fn linear_as_operand(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor> {
        let out_dtype = if w.shape().first().is_some_and(|&d_out| self.mma_rows(d_out)) { DType::BF16 } else { DType::F32 };
        self.segmented_linear(x, w, b, act, &self.device_segments(w, segments)?, out_dtype)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.linear_impl(x, w, None, b, act)
    }

    fn layer_norm(&self, x: Tensor, residual: Option<&Tensor>, norm: NormParams, act: Activation) -> Result<Tensor> {
        self.layer_norm_kernel(&x, residual, norm, act, None, None)
    }

    fn group_norm_time(&self, x: Tensor, seqs: &Seqs, norm: NormParams, act: Activation) -> Result<Tensor> {
        Self::expect_dtype(&x, DType::F32, "group norm input")?;
        let c = *x.shape().last().unwrap_or(&1);
        ensure!(x.numel() / c.max(1) == seqs.total(), "group norm: {:?} does not hold {} frames", x.shape(), seqs.total());
        self.group_norm_from(NormSource { x: self.ptr(&x)?, ..NormSource::default() }, seqs, c, norm, act, DType::F32)
    }

    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let out = self.empty(a.shape(), DType::F32)?;
        let (pa, pb, po, n) = (self.ptr(&a)?, self.ptr(b)?, self.ptr(&out)?, a.numel() as i64);
        self.launcher().elementwise(self.func("add"), n as usize, |l| {
            l.arg(&pa).arg(&pb).arg(&po).arg(&n);
        })?;
        Ok(out)
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
        self.conv1d_as(x, seqs_in, seqs_out, w, b, geom, act, DType::F32)
    }

    fn conv1d_group_norm(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        norm: NormParams,
        act: Activation,
    ) -> Result<Tensor> {
        self.conv1d_group_norm_as(x, seqs_in, seqs_out, w, b, geom, norm, act, DType::F32)
    }

    fn conv_layer_into_conv(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        norm: Option<NormParams>,
        act: Activation,
    ) -> Result<Tensor> {
        // bf16 where the next conv reads bf16: it then needs no conversion pass of its own.
        let out = if self.precision == Precision::Bf16 && self.mma_sync { DType::BF16 } else { DType::F32 };
        match norm {
            None => self.conv1d_as(x, seqs_in, seqs_out, w, b, geom, act, out),
            Some(norm) => self.conv1d_group_norm_as(x, seqs_in, seqs_out, w, b, geom, norm, act, out),
        }
    }

    fn attention(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32) -> Result<Tensor> {
        self.fused_attention(qkv, seqs, heads, scale, None, None)
    }

    fn ctc_loss(&self, logits: &Tensor, seqs: &Seqs, targets: &crate::ctc::CtcTargets, grad_scale: f32) -> Result<(Vec<f32>, Tensor)> {
        self.ctc(logits, seqs, targets, grad_scale)
    }

    fn log_softmax(&self, x: &Tensor) -> Result<Tensor> {
        let c = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / c.max(1);
        let out = self.empty(x.shape(), DType::F32)?;
        let (px, po, rows_i, c_i) = (self.ptr(x)?, self.ptr(&out)?, rows as i32, c as i32);
        self.launcher().rows_per_warp(self.func("log_softmax"), rows, |b| {
            b.arg(&px).arg(&po).arg(&rows_i).arg(&c_i);
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a kernel renamed or removed in kernels/*.cu but still loaded here, without a GPU:
    /// build.rs keeps ptxas's report of every compiled entry point.
    #[test]
    fn every_kernel_the_backend_loads_was_compiled() {
        if kernels::MODULES.is_empty() {
            eprintln!("skipping: kernels were not built (no nvcc)");
            return;
        }
        let report = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));
        for (module, func) in loaded_kernels() {
            assert!(kernels::MODULES.iter().any(|(m, _)| *m == module), "module {module} not built");
            assert!(report.contains(&format!("entry function '{func}'")), "kernel {func} is not in kernels/{module}.cu");
        }
    }
}
