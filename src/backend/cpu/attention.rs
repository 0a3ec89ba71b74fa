//! Multi-head self-attention within each utterance of a packed batch.
//!
//! Work is split over (utterance, head, block of queries); each task holds one
//! `[queries, frames]` score block, so memory stays bounded for long utterances and the full
//! `T x T` matrix is never stored.

use rayon::prelude::*;

use super::gemm::{matmul, MatRef};
use super::math::softmax_scaled;
use crate::backend::Seqs;
use crate::dropout::SiteDropout;

const QUERIES_PER_BLOCK: usize = 256;

/// The `hd` columns from `col` of `n` rows from `first` in a row-major tensor with `stride`
/// columns: one head's slice of packed q, k, v or output.
pub(super) fn head_view(t: &[f32], stride: usize, col: usize, first: usize, n: usize, hd: usize) -> MatRef<'_> {
    MatRef { data: &t[first * stride + col..], rows: n, cols: hd, row_stride: stride, col_stride: 1 }
}

/// `dropout(softmax(q kᵀ · scale)) v` per utterance and head, for packed `qkv [total, 3c]`.
pub fn attention(qkv: &[f32], c: usize, seqs: &Seqs, heads: usize, scale: f32, dropout: Option<SiteDropout>) -> Vec<f32> {
    let hd = c / heads;
    let tasks: Vec<(usize, usize, usize)> = (0..seqs.count())
        .flat_map(|u| (0..heads).flat_map(move |h| (0..seqs.lens()[u]).step_by(QUERIES_PER_BLOCK).map(move |q0| (u, h, q0))))
        .collect();
    // Head `h` of part `p` (0 = q, 1 = k, 2 = v) over `n` rows from `first`.
    let head = |p: usize, first: usize, n: usize, h: usize| head_view(qkv, 3 * c, p * c + h * hd, first, n, hd);
    let tiles: Vec<(usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(u, h, q0)| {
            let (start, len) = (seqs.range(u).start, seqs.lens()[u]);
            let nq = QUERIES_PER_BLOCK.min(len - q0);
            let mut scores = vec![0.0f32; nq * len];
            matmul(&mut scores, len, head(0, start + q0, nq, h), head(1, start, len, h).t(), false, 1);
            for (i, row) in scores.chunks_exact_mut(len).enumerate() {
                softmax_scaled(row, scale);
                if let Some(d) = dropout {
                    d.apply_to_probs(heads, h, start + q0 + i, row);
                }
            }
            let mut tile = vec![0.0f32; nq * hd];
            matmul(&mut tile, hd, MatRef::row_major(&scores, nq, len), head(2, start, len, h), false, 1);
            (start + q0, h, nq, tile)
        })
        .collect();
    let mut out = vec![0.0f32; seqs.total() * c];
    for (row0, h, nq, tile) in tiles {
        for i in 0..nq {
            let at = (row0 + i) * c + h * hd;
            out[at..at + hd].copy_from_slice(&tile[i * hd..(i + 1) * hd]);
        }
    }
    out
}
