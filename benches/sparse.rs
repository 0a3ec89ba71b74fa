//! Dense against sparse linear layers on the CPU at wav2vec2-base FFN shapes (768 -> 3072 and
//! 3072 -> 768), for batch 1 x 1 s (49 frames, memory-bound) and batch 8 x 15 s (5992 frames,
//! compute-bound), at 50/70/90% of the weights dropped (random positions, as learned masks are).
//! The crossover between the two decides when `engine infer` takes the sparse path.
//! `cargo bench --bench sparse`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use s3router::backend::cpu::sparse::SparseLinear;
use s3router::backend::cpu::CpuBackend;
use s3router::backend::{Activation, Backend};
use s3router::rng::SplitMix;
use s3router::tensor::Tensor;

fn dense_vs_sparse(c: &mut Criterion) {
    let be = CpuBackend;
    let mut rng = SplitMix(3);
    let mut g = c.benchmark_group("ffn linear cpu");
    g.sample_size(10);
    for (shape, frames) in [("b1x1s", 49), ("b8x15s", 5992)] {
        for (d_in, d_out) in [(768, 3072), (3072, 768)] {
            let x = Tensor::from_vec((0..frames * d_in).map(|_| rng.symmetric()).collect(), &[frames, d_in]);
            let dense: Vec<f32> = (0..d_out * d_in).map(|_| rng.symmetric()).collect();
            let w_t = be.prepare_linear_weight(&Tensor::from_vec(dense.clone(), &[d_out, d_in])).unwrap();
            let name = format!("{shape} {d_in}->{d_out}");
            g.bench_with_input(BenchmarkId::new(name.clone(), "dense"), &(), |b, _| {
                b.iter(|| be.linear(&x, &w_t, None, Activation::Identity).unwrap())
            });
            for sparsity in [0.5, 0.7, 0.9] {
                let masked: Vec<f32> = dense.iter().map(|&v| if rng.unit() < sparsity { 0.0 } else { v }).collect();
                let m_t = be.prepare_linear_weight(&Tensor::from_vec(masked, &[d_out, d_in])).unwrap();
                let sp = SparseLinear::from_in_out(m_t.f32s().unwrap(), d_in, d_out).unwrap();
                let xs = x.f32s().unwrap();
                g.bench_with_input(BenchmarkId::new(name.clone(), format!("sparse {:.0}%", sparsity * 100.0)), &(), |b, _| {
                    b.iter(|| sp.forward(xs, None, false))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, dense_vs_sparse);
criterion_main!(benches);
