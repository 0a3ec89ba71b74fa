//! CTC forward-backward on the CPU, in f64 log space, one utterance per rayon task.
//!
//! With `lp = log_softmax(logits)` and the extended label sequence `l'` (blanks around and
//! between the labels, length 2S+1), `alpha[t][s]` and `beta[t][s]` both include the emission at
//! `t`, so `alpha + beta - lp[t][l'(s)]` is the log mass of all paths through `(t, s)` and
//! dL/dlogit[t][k] = softmax[t][k] - Σ_{s: l'(s)=k} exp(alpha + beta - lp - log p).

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::backend::Seqs;
use crate::ctc::CtcTargets;

fn log_add(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        m
    } else {
        m + ((a - m).exp() + (b - m).exp()).ln()
    }
}

/// Loss and (scaled) gradient of one utterance, or `None` when no alignment exists.
fn utterance(logits: &[f32], vocab: usize, labels: &[u32], blank: usize, scale: f32) -> Option<(f32, Vec<f32>)> {
    let frames = logits.len() / vocab;
    let lp: Vec<f64> = logits
        .chunks_exact(vocab)
        .flat_map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(move |&v| v as f64 - lse)
        })
        .collect();
    let ext: Vec<usize> = (0..2 * labels.len() + 1).map(|s| if s % 2 == 0 { blank } else { labels[s / 2] as usize }).collect();
    let n = ext.len();
    // May state s be entered from s - 2 (skipping a blank)?
    let skip = |s: usize| s >= 2 && ext[s] != blank && ext[s] != ext[s - 2];
    let mut alpha = vec![f64::NEG_INFINITY; frames * n];
    let mut beta = vec![f64::NEG_INFINITY; frames * n];
    alpha[0] = lp[ext[0]];
    if n > 1 {
        alpha[1] = lp[ext[1]];
    }
    for t in 1..frames {
        for s in 0..n {
            let prev = &alpha[(t - 1) * n..t * n];
            let mut a = prev[s];
            if s >= 1 {
                a = log_add(a, prev[s - 1]);
            }
            if skip(s) {
                a = log_add(a, prev[s - 2]);
            }
            alpha[t * n + s] = a + lp[t * vocab + ext[s]];
        }
    }
    let last = (frames - 1) * n;
    let log_p = if n > 1 { log_add(alpha[last + n - 1], alpha[last + n - 2]) } else { alpha[last] };
    if log_p == f64::NEG_INFINITY {
        return None;
    }
    beta[last + n - 1] = lp[(frames - 1) * vocab + ext[n - 1]];
    if n > 1 {
        beta[last + n - 2] = lp[(frames - 1) * vocab + ext[n - 2]];
    }
    for t in (0..frames - 1).rev() {
        for s in 0..n {
            let next = &beta[(t + 1) * n..(t + 2) * n];
            let mut b = next[s];
            if s + 1 < n {
                b = log_add(b, next[s + 1]);
            }
            if s + 2 < n && skip(s + 2) {
                b = log_add(b, next[s + 2]);
            }
            beta[t * n + s] = b + lp[t * vocab + ext[s]];
        }
    }
    let mut grad: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
    for t in 0..frames {
        for s in 0..n {
            let k = ext[s];
            let occupancy = alpha[t * n + s] + beta[t * n + s] - lp[t * vocab + k] - log_p;
            grad[t * vocab + k] -= occupancy.exp();
        }
    }
    Some((-log_p as f32, grad.into_iter().map(|g| (g * scale as f64) as f32).collect()))
}

/// Per-utterance losses and the gradient (times `scale`) for packed `logits [frames, vocab]`.
pub fn ctc_loss(logits: &[f32], vocab: usize, seqs: &Seqs, targets: &CtcTargets, scale: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let results: Vec<Option<(f32, Vec<f32>)>> = (0..seqs.count())
        .into_par_iter()
        .map(|u| {
            let r = seqs.range(u);
            if r.is_empty() {
                return None;
            }
            utterance(&logits[r.start * vocab..r.end * vocab], vocab, &targets.labels[u], targets.blank, scale)
        })
        .collect();
    let mut losses = Vec::with_capacity(seqs.count());
    let mut grad = vec![0.0f32; logits.len()];
    for (u, res) in results.into_iter().enumerate() {
        match res {
            Some((loss, g)) => {
                let r = seqs.range(u);
                grad[r.start * vocab..r.end * vocab].copy_from_slice(&g);
                losses.push(loss);
            }
            None if targets.zero_infinity => losses.push(0.0),
            None => bail!("utterance {u}: no CTC alignment of its {} labels fits its {} frames", targets.labels[u].len(), seqs.lens()[u]),
        }
    }
    Ok((losses, grad))
}
