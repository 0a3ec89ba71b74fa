//! Forward pass of full-size wav2vec2-base (random weights) on the CPU: one 10 s clip, in f32
//! and (where the CPU has AVX512-BF16) with bf16 linears; and the FFN's two linears alone at
//! that clip's 499 frames. `cargo bench --bench forward`; `engine bench` measures the pass
//! without criterion.

use criterion::{criterion_group, criterion_main, Criterion};
use s3router::backend::cpu::bf16::CpuBf16Backend;
use s3router::backend::cpu::CpuBackend;
use s3router::backend::{Activation, Backend};
use s3router::model::checkpoint::{RandomWeights, WeightSource};
use s3router::model::config::Config;
use s3router::model::Wav2Vec2;
use s3router::tensor::Tensor;

/// The CPU backends this machine runs: f32, and bf16 where the CPU has it.
fn backends() -> Vec<(&'static str, Box<dyn Backend>)> {
    let mut v: Vec<(&str, Box<dyn Backend>)> = vec![("f32", Box::new(CpuBackend))];
    match CpuBf16Backend::new() {
        Ok(be) => v.push(("bf16", Box::new(be))),
        Err(e) => eprintln!("skipping the bf16 benches: {e}"),
    }
    v
}

fn forward_base_10s(c: &mut Criterion) {
    let clip: Vec<f32> = (0..160_000).map(|i| (i as f32 * 0.031).sin() * 0.3).collect();
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for (precision, be) in backends() {
        let model = Wav2Vec2::from_weights(Config::preset("base").unwrap(), &RandomWeights { seed: 0 }, be.as_ref()).unwrap();
        g.bench_function(format!("wav2vec2-base b1x10s cpu {precision}"), |b| {
            b.iter(|| model.logits(be.as_ref(), &[&clip], None).unwrap())
        });
    }
    g.finish();
}

fn ffn_linears(c: &mut Criterion) {
    let (frames, hidden, inner) = (499, 768, 3072);
    let mut g = c.benchmark_group("cpu linear");
    for (precision, be) in backends() {
        for (d_in, d_out, act) in
            [(hidden, inner, Activation::Gelu), (hidden, inner, Activation::Identity), (inner, hidden, Activation::Identity)]
        {
            let w = be.prepare_linear_weight(&RandomWeights { seed: 1 }.get("w", &[d_out, d_in]).unwrap()).unwrap();
            let b = Tensor::from_vec(vec![0.1; d_out], &[d_out]);
            let x = Tensor::from_vec((0..frames * d_in).map(|i| (i as f32 * 0.37).sin()).collect(), &[frames, d_in]);
            let flops = 2.0 * (frames * d_in * d_out) as f64;
            g.throughput(criterion::Throughput::Elements(flops as u64));
            g.bench_function(format!("{frames}x{d_in}->{d_out} {act:?} {precision}"), |bench| {
                bench.iter(|| be.linear(&x, &w, Some(&b), act).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, forward_base_10s, ffn_linears);
criterion_main!(benches);
