//! Forward pass of full-size wav2vec2-base (random weights) on the CPU: one 10 s clip.
//! `cargo bench --bench forward`; `engine bench` measures the same without criterion.

use criterion::{criterion_group, criterion_main, Criterion};
use s3router::backend::cpu::CpuBackend;
use s3router::model::checkpoint::RandomWeights;
use s3router::model::config::Config;
use s3router::model::Wav2Vec2;

fn forward_base_10s(c: &mut Criterion) {
    let be = CpuBackend;
    let model = Wav2Vec2::from_weights(Config::preset("base").unwrap(), &RandomWeights { seed: 0 }, &be).unwrap();
    let clip: Vec<f32> = (0..160_000).map(|i| (i as f32 * 0.031).sin() * 0.3).collect();
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    g.bench_function("wav2vec2-base b1x10s cpu", |b| b.iter(|| model.logits(&be, &[&clip], None).unwrap()));
    g.finish();
}

criterion_group!(benches, forward_base_10s);
criterion_main!(benches);
