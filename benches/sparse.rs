//! Dense against sparse linear layers at wav2vec2-base FFN shapes (768 -> 3072 and 3072 -> 768),
//! for batch 1 x 1 s (49 frames, memory-bound) and batch 8 x 15 s (5992 frames, compute-bound),
//! at 50/70/90% of the weights dropped (random positions, as learned masks are), on the CPU and,
//! when there is one, on the GPU in fp32 and bf16. The crossovers decide when `engine infer`
//! takes the sparse path. `cargo bench --bench sparse [-- cpu|cuda]`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use s3router::backend::cpu::sparse::SparseLinear;
use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{unavailable_reason, CudaBackend, Precision};
use s3router::backend::{Activation, Backend, SparseWeight};
use s3router::rng::SplitMix;
use s3router::tensor::Tensor;

/// One FFN linear at one batch shape: the input, the dense `[out, in]` weight, and that weight
/// with each sparsity's dropped entries zeroed.
struct Case {
    name: String,
    x: Tensor,
    dense: Tensor,
    masked: Vec<(f64, Tensor)>,
}

fn cases() -> Vec<Case> {
    let mut rng = SplitMix(3);
    let mut out = Vec::new();
    for (shape, frames) in [("b1x1s", 49), ("b8x15s", 5992)] {
        for (d_in, d_out) in [(768, 3072), (3072, 768)] {
            let x = Tensor::from_vec((0..frames * d_in).map(|_| rng.symmetric()).collect(), &[frames, d_in]);
            let dense: Vec<f32> = (0..d_out * d_in).map(|_| rng.symmetric()).collect();
            let masked = [0.5, 0.7, 0.9]
                .into_iter()
                .map(|s| (s, Tensor::from_vec(dense.iter().map(|&v| if rng.unit() < s { 0.0 } else { v }).collect(), &[d_out, d_in])))
                .collect();
            out.push(Case { name: format!("{shape} {d_in}->{d_out}"), x, dense: Tensor::from_vec(dense, &[d_out, d_in]), masked });
        }
    }
    out
}

/// Times the dense product and the sparse one at each sparsity of every case whose name starts
/// with one of `shapes` on `be`, waiting for the device after each call; `sparse` builds a
/// sparse weight from an `[out, in]` one.
fn bench_backend<B: Backend>(c: &mut Criterion, group: &str, be: &B, shapes: &[&str], sparse: impl Fn(&Tensor) -> SparseWeight) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    let id = Activation::Identity;
    for case in cases().into_iter().filter(|c| shapes.iter().any(|s| c.name.starts_with(s))) {
        let x = be.upload(&case.x).unwrap();
        let w = be.prepare_linear_weight(&case.dense).unwrap();
        g.bench_with_input(BenchmarkId::new(case.name.clone(), "dense"), &(), |b, _| {
            b.iter(|| {
                drop(be.linear(&x, &w, None, id).unwrap());
                be.synchronize().unwrap()
            })
        });
        for (sparsity, masked) in &case.masked {
            let sp = sparse(masked);
            g.bench_with_input(BenchmarkId::new(case.name.clone(), format!("sparse {:.0}%", sparsity * 100.0)), &(), |b, _| {
                b.iter(|| {
                    drop(be.linear_sparse(&x, &sp, None, id).unwrap());
                    be.synchronize().unwrap()
                })
            });
        }
    }
    g.finish();
}

fn dense_vs_sparse(c: &mut Criterion) {
    let cpu = CpuBackend;
    bench_backend(c, "ffn linear cpu", &cpu, &["b1", "b8"], |w| {
        let &[d_out, d_in] = w.shape() else { unreachable!("cases are 2-D") };
        let w_t = cpu.prepare_linear_weight(w).unwrap();
        SparseWeight::Cpu(SparseLinear::from_in_out(w_t.f32s().unwrap(), d_in, d_out).unwrap())
    });
    if let Some(why) = unavailable_reason() {
        eprintln!("ffn linear cuda: skipped ({why})");
        return;
    }
    // Then batch 1 with split-K off: every block walks all of K, as before split-K (the large
    // batch fills the GPU with tiles and is never split).
    for (precision, split, shapes) in [
        (Precision::F32, true, &["b1", "b8"][..]),
        (Precision::Bf16, true, &["b1", "b8"]),
        (Precision::F32, false, &["b1"]),
        (Precision::Bf16, false, &["b1"]),
    ] {
        let mut be = CudaBackend::new(0, precision).unwrap();
        be.set_split_k(split);
        let group = format!("ffn linear cuda {precision:?}{}", if split { "" } else { " whole-K" });
        bench_backend(c, &group, &be, shapes, |w| {
            let &[d_out, d_in] = w.shape() else { unreachable!("cases are 2-D") };
            be.sparse_weight(w.f32s().unwrap(), d_out, d_in).unwrap()
        });
    }
}

criterion_group!(benches, dense_vs_sparse);
criterion_main!(benches);
