//! CTC forward-backward on the CPU, in f64 with per-frame scaling (Graves et al. 2006, sec. 4.1):
//! alpha and beta are kept in probability space and renormalised at every frame, so the
//! recursions need no exp/log per state and cannot underflow; log p is the sum of the log
//! normalisers. One utterance per rayon task.
//!
//! With `y = softmax(logits)` and the extended label sequence `l'` (blanks around and between
//! the labels, length 2S+1), the state occupancy at frame t is
//! `gamma[t][s] = a[t][s] b[t][s] / y[t][l'(s)]`, normalised over s (every path is in exactly one
//! state at t), and dL/dlogit[t][k] = y[t][k] - sum over s with l'(s) = k of gamma[t][s].

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::backend::Seqs;
use crate::ctc::loss::min_frames;
use crate::ctc::CtcTargets;

/// Loss and (scaled) gradient of one utterance, or `None` when no alignment exists.
fn utterance(logits: &[f32], vocab: usize, labels: &[u32], blank: usize, scale: f32) -> Option<(f32, Vec<f32>)> {
    let frames = logits.len() / vocab;
    if frames == 0 || min_frames(labels) > frames {
        return None;
    }
    // y = softmax per frame, in f64.
    let y: Vec<f64> = logits
        .chunks_exact(vocab)
        .flat_map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / z)
        })
        .collect();
    let ext: Vec<usize> = (0..2 * labels.len() + 1).map(|s| if s % 2 == 0 { blank } else { labels[s / 2] as usize }).collect();
    let n = ext.len();
    // May state s be entered from s - 2 (skipping a blank)?
    let skip: Vec<bool> = (0..n).map(|s| s >= 2 && ext[s] != blank && ext[s] != ext[s - 2]).collect();
    // Emissions are floored at the smallest normal f64 so a feasible path never multiplies out to
    // exactly zero, however extreme the logits (only probabilities below 2e-308 change).
    let emit = |t: usize, s: usize| y[t * vocab + ext[s]].max(f64::MIN_POSITIVE);
    let mut alpha = vec![0.0f64; frames * n];
    let mut beta = vec![0.0f64; frames * n];
    let mut log_p = 0.0f64;
    // Normalises one frame's row in place; returns the normaliser.
    let normalise = |row: &mut [f64]| {
        let z: f64 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= z);
        z
    };
    alpha[..n.min(2)].iter_mut().enumerate().for_each(|(s, a)| *a = emit(0, s));
    for t in 0..frames {
        if t > 0 {
            let (prev, cur) = alpha[(t - 1) * n..(t + 1) * n].split_at_mut(n);
            for s in 0..n {
                let mut a = prev[s];
                if s >= 1 {
                    a += prev[s - 1];
                }
                if skip[s] {
                    a += prev[s - 2];
                }
                cur[s] = a * emit(t, s);
            }
        }
        log_p += normalise(&mut alpha[t * n..(t + 1) * n]).ln();
    }
    let last = (frames - 1) * n;
    log_p += (alpha[last + n - 1] + if n > 1 { alpha[last + n - 2] } else { 0.0 }).ln();
    for s in n.saturating_sub(2)..n {
        beta[last + s] = emit(frames - 1, s);
    }
    normalise(&mut beta[last..last + n]);
    for t in (0..frames - 1).rev() {
        let (cur, next) = beta[t * n..(t + 2) * n].split_at_mut(n);
        for s in 0..n {
            let mut b = next[s];
            if s + 1 < n {
                b += next[s + 1];
            }
            if s + 2 < n && skip[s + 2] {
                b += next[s + 2];
            }
            cur[s] = b * emit(t, s);
        }
        normalise(cur);
    }
    let mut grad = y.clone();
    let mut gamma = vec![0.0f64; n];
    for t in 0..frames {
        for s in 0..n {
            gamma[s] = alpha[t * n + s] * beta[t * n + s] / emit(t, s);
        }
        let z: f64 = gamma.iter().sum();
        for s in 0..n {
            grad[t * vocab + ext[s]] -= gamma[s] / z;
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
