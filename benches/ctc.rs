//! CTC loss + gradient on the CPU at T = 749, B = 8, S = 220, C = 32 (8 x 15 s of speech,
//! LibriSpeech-like transcript lengths). `cargo bench --bench ctc`.

use criterion::{criterion_group, criterion_main, Criterion};
use s3router::backend::cpu::CpuBackend;
use s3router::backend::Seqs;
use s3router::ctc::{ctc_loss, CtcTargets, Reduction};
use s3router::tensor::Tensor;

fn ctc_b8(c: &mut Criterion) {
    let seqs = Seqs::new(vec![749; 8]);
    let vocab = 32;
    let logits: Vec<f32> = (0..seqs.total() * vocab).map(|i| ((i * 2654435761) % 1000) as f32 / 200.0 - 2.5).collect();
    let logits = Tensor::from_vec(logits, &[seqs.total(), vocab]);
    let labels = (0..8).map(|b| (0..220).map(|i| ((i * 7 + b * 3) % 31 + 1) as u32).collect()).collect();
    let targets = CtcTargets { labels, blank: 0, zero_infinity: true };
    let be = CpuBackend;
    let mut g = c.benchmark_group("ctc");
    g.sample_size(10);
    g.bench_function("loss+grad T749 B8 S220 C32 cpu", |b| b.iter(|| ctc_loss(&be, &logits, &seqs, &targets, Reduction::Sum).unwrap()));
    g.finish();
}

criterion_group!(benches, ctc_b8);
criterion_main!(benches);
