//! s3router: wav2vec2 / XLS-R inference and S3-Router mask learning, on CPU and GPU.

pub mod alignment;
pub mod analysis;
pub mod backend;
pub mod bench;
pub mod ctc;
pub mod data;
pub mod dropout;
pub mod eval;
pub mod fsio;
pub mod infer;
pub mod mask;
pub mod metrics;
pub mod model;
pub mod multitask;
pub mod plot;
pub mod rng;
pub mod router;
pub mod tensor;
pub mod train;

/// Makes glibc keep freed blocks of up to 32 MB in the heap instead of returning each one to the
/// kernel: a training step allocates and frees activations and gradients of a few MB to tens of
/// MB per op, and with glibc's defaults every step page-faulted and zeroed them again (20% of a
/// CPU finetuning update in `perf`; 17% faster updates with it, docs/PERF.md). The price is a
/// resident size that stays at its high-water mark. Call once at start-up; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
