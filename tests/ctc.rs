//! CTC loss and gradient against torch.nn.functional.ctc_loss (tools/make_ctc_fixtures.py), a
//! finite-difference check, and bad targets.

mod common;

use common::{ctc_cases, random, rel_l2};
use s3router::backend::cpu::CpuBackend;
use s3router::backend::Seqs;
use s3router::ctc::{ctc_loss, CtcTargets, Reduction};
use s3router::tensor::Tensor;

#[test]
fn loss_and_gradient_match_pytorch() {
    let be = CpuBackend;
    let all = ctc_cases();
    assert_eq!(all.len(), 7);
    for c in &all {
        let out = ctc_loss(&be, &c.logits, &c.seqs, &c.targets, Reduction::Sum).unwrap();
        for (u, (got, want)) in out.losses.iter().zip(&c.losses).enumerate() {
            let err = ((got - want) / want.abs().max(1e-6)).abs();
            assert!(err <= 1e-5, "{} utt{u}: loss {got} vs torch {want}", c.name);
        }
        let total: f32 = c.losses.iter().sum();
        assert!(((out.loss - total) / total).abs() <= 1e-5, "{}: summed loss", c.name);
        let err = rel_l2(&out.grad.to_vec().unwrap(), &c.grad);
        assert!(err <= 1e-4, "{}: gradient rel L2 {err:.2e}", c.name);
        // Per-utterance mean (fairseq sentence_avg): everything divided by the batch size.
        let mean = ctc_loss(&be, &c.logits, &c.seqs, &c.targets, Reduction::MeanPerUtterance).unwrap();
        let b = c.seqs.count() as f32;
        assert!(((mean.loss - total / b) / (total / b)).abs() <= 1e-5);
        let scaled: Vec<f32> = c.grad.iter().map(|g| g / b).collect();
        assert!(rel_l2(&mean.grad.to_vec().unwrap(), &scaled) <= 1e-4);
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let be = CpuBackend;
    let (frames, vocab) = (vec![9, 6], 5);
    let seqs = Seqs::new(frames);
    let logits = random(seqs.total() * vocab, 11, 2.0);
    let targets = CtcTargets { labels: vec![vec![1, 1, 3], vec![2, 4]], blank: 0, zero_infinity: false };
    let loss_at = |x: &[f32]| {
        ctc_loss(&be, &Tensor::from_vec(x.to_vec(), &[seqs.total(), vocab]), &seqs, &targets, Reduction::Sum).unwrap().loss as f64
    };
    let grad = ctc_loss(&be, &Tensor::from_vec(logits.clone(), &[seqs.total(), vocab]), &seqs, &targets, Reduction::Sum)
        .unwrap()
        .grad
        .to_vec()
        .unwrap();
    let h = 1e-2f32;
    for i in (0..logits.len()).step_by(3) {
        let (mut up, mut down) = (logits.clone(), logits.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * h as f64);
        assert!((fd - grad[i] as f64).abs() <= 2e-3 * (1.0 + fd.abs()), "logit {i}: finite difference {fd} vs gradient {}", grad[i]);
    }
}

#[test]
fn bad_targets_are_clear_errors() {
    let be = CpuBackend;
    let seqs = Seqs::new(vec![4]);
    let logits = Tensor::from_vec(random(4 * 6, 3, 1.0), &[4, 6]);
    let run = |labels: Vec<u32>, zero_infinity| {
        ctc_loss(&be, &logits, &seqs, &CtcTargets { labels: vec![labels], blank: 0, zero_infinity }, Reduction::Sum).map(|o| o.losses[0])
    };
    assert!(run(vec![1, 0, 2], false).unwrap_err().to_string().contains("contain the blank"));
    assert!(run(vec![1, 6], false).unwrap_err().to_string().contains("label id 6"));
    assert!(run(vec![1, 2, 3, 4, 5], false).unwrap_err().to_string().contains("need at least 5 frames, it has 4"));
    assert_eq!(run(vec![1, 2, 3, 4, 5], true).unwrap(), 0.0);
    // An empty transcript is defined: the path of blanks.
    let empty = run(vec![], false).unwrap();
    assert!(empty.is_finite() && empty > 0.0);
}

#[test]
fn extreme_logits_stay_finite() {
    // Logit gaps of 2000 nats: probabilities below f64's range for every off-path token.
    let be = CpuBackend;
    let (frames, vocab) = (50, 4);
    let mut logits = vec![0.0f32; frames * vocab];
    for t in 0..frames {
        logits[t * vocab + if t % 2 == 0 { 0 } else { 1 + (t / 2) % 3 }] = 2000.0;
    }
    let seqs = Seqs::new(vec![frames]);
    let labels = (0..25).map(|i| 1 + (i % 3) as u32).collect();
    let out = ctc_loss(
        &be,
        &Tensor::from_vec(logits, &[frames, vocab]),
        &seqs,
        &CtcTargets { labels: vec![labels], blank: 0, zero_infinity: false },
        Reduction::Sum,
    )
    .unwrap();
    assert!(out.loss.is_finite() && out.loss.abs() < 1e-3, "loss {}", out.loss);
    assert!(out.grad.to_vec().unwrap().iter().all(|g| g.is_finite()));
}
