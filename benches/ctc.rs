//! CTC loss + gradient at T = 749, B = 8, S = 220, C = 32 (8 x 15 s of speech, LibriSpeech-like
//! transcript lengths), on the CPU and, when there is one, the GPU (each call returns the losses
//! to the host, so a GPU iteration is complete); and decoding the same batch greedily and by
//! prefix beam search on the CPU. `cargo bench --bench ctc [-- cpu|cuda|decode]`.

use criterion::{criterion_group, criterion_main, Criterion};
use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{unavailable_reason, CudaBackend, Precision};
use s3router::backend::{Backend, Seqs};
use s3router::ctc::{ctc_loss, CtcTargets, Decoder, Reduction};
use s3router::tensor::Tensor;

fn ctc_b8(c: &mut Criterion) {
    let seqs = Seqs::new(vec![749; 8]);
    let vocab = 32;
    let logits: Vec<f32> = (0..seqs.total() * vocab).map(|i| ((i * 2654435761) % 1000) as f32 / 200.0 - 2.5).collect();
    let logits = Tensor::from_vec(logits, &[seqs.total(), vocab]);
    let labels = (0..8).map(|b| (0..220).map(|i| ((i * 7 + b * 3) % 31 + 1) as u32).collect()).collect();
    let targets = CtcTargets { labels, blank: 0, zero_infinity: true };
    let mut g = c.benchmark_group("ctc");
    g.sample_size(10);
    let mut bench = |name: &str, be: &dyn Backend| {
        let logits = be.upload(&logits).unwrap();
        g.bench_function(format!("loss+grad T749 B8 S220 C32 {name}"), |b| {
            b.iter(|| ctc_loss(be, &logits, &seqs, &targets, Reduction::Sum).unwrap())
        });
    };
    bench("cpu", &CpuBackend);
    match unavailable_reason() {
        None => bench("cuda", &CudaBackend::new(0, Precision::F32).unwrap()),
        Some(why) => eprintln!("ctc cuda: skipped ({why})"),
    }
    let scores = logits.f32s().unwrap();
    for decoder in [Decoder::Greedy, Decoder::Beam(4), Decoder::Beam(16), Decoder::Beam(64)] {
        g.bench_function(format!("decode T749 B8 C32 {}", decoder.name()), |b| b.iter(|| decoder.decode_batch(scores, &seqs, vocab, 0)));
    }
    g.finish();
}

criterion_group!(benches, ctc_b8);
criterion_main!(benches);
