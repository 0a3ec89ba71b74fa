//! Multi-head self-attention within each utterance of a packed batch.
//!
//! Work is split over (utterance, head, block of queries); each task holds one
//! `[queries, frames]` score block, so memory stays bounded for long utterances and the full
//! `T x T` matrix is never stored.

use rayon::prelude::*;

use super::gemm::{matmul, MatRef};
use super::gemm_bf16::{self, PairRows};
use super::math::softmax_scaled;
use super::transpose::transpose_into;
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
    // Head `h` of part `p` (0 = q, 1 = k, 2 = v) over `n` rows from `first`.
    let head = |p: usize, first: usize, n: usize, h: usize| head_view(qkv, 3 * c, p * c + h * hd, first, n, hd);
    by_query_blocks(c, seqs, heads, |(start, len), h, (q0, nq)| {
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
        tile
    })
}

/// [`attention`] without dropout through the bf16 GEMM ([`gemm_bf16`]; `c / heads` even): q and
/// the probabilities rounded to bf16 pairs, each head's k and vᵀ packed as the products'
/// weights, keys padded to an even count with zero values.
pub fn attention_bf16(qkv: &[f32], c: usize, seqs: &Seqs, heads: usize, scale: f32) -> Vec<f32> {
    let hd = c / heads;
    // Head `h` of part `p` over `n` rows from `first`, as a dense `[rows, hd]` copy padded with
    // zero rows to `rows`.
    let head = |p: usize, first: usize, n: usize, h: usize, rows: usize| -> Vec<f32> {
        let mut x = Vec::with_capacity(rows * hd);
        (first..first + n).for_each(|r| x.extend_from_slice(&qkv[r * 3 * c + p * c + h * hd..][..hd]));
        x.resize(rows * hd, 0.0);
        x
    };
    by_query_blocks(c, seqs, heads, |(start, len), h, (q0, nq)| {
        let keys = len.next_multiple_of(2);
        let q = gemm_bf16::to_pairs(&head(0, start + q0, nq, h, nq), hd);
        let k = gemm_bf16::pack_weight(&head(1, start, len, h, keys), keys, hd);
        let mut probs = vec![0.0f32; nq * keys];
        gemm_bf16::matmul(&mut probs, PairRows::dense(&q, hd / 2), &k, keys, 1, |_, _, _| {});
        // Over the real keys only; a padding key's score stays, against its zero value row.
        probs.chunks_exact_mut(keys).for_each(|row| softmax_scaled(&mut row[..len], scale));
        let mut v_t = vec![0.0f32; hd * keys];
        transpose_into(&mut v_t, &head(2, start, len, h, keys), keys, hd);
        let probs = gemm_bf16::to_pairs(&probs, keys);
        let mut tile = vec![0.0f32; nq * hd];
        gemm_bf16::matmul(&mut tile, PairRows::dense(&probs, keys / 2), &gemm_bf16::pack_weight(&v_t, hd, keys), hd, 1, |_, _, _| {});
        tile
    })
}

/// The output `[total, c]` of `tile((start, len), head, (q0, nq))`, which returns the
/// `[nq, c / heads]` attention output of queries `q0..q0 + nq` of the utterance at rows
/// `start..start + len` for one head: tiles computed in parallel, one per (utterance, head,
/// block of queries), so one block of scores is held per task, never `T x T`.
fn by_query_blocks(
    c: usize,
    seqs: &Seqs,
    heads: usize,
    tile: impl Fn((usize, usize), usize, (usize, usize)) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let hd = c / heads;
    let tasks: Vec<(usize, usize, usize)> = (0..seqs.count())
        .flat_map(|u| (0..heads).flat_map(move |h| (0..seqs.lens()[u]).step_by(QUERIES_PER_BLOCK).map(move |q0| (u, h, q0))))
        .collect();
    let tiles: Vec<(usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(u, h, q0)| {
            let (start, len) = (seqs.range(u).start, seqs.lens()[u]);
            let nq = QUERIES_PER_BLOCK.min(len - q0);
            (start + q0, h, nq, tile((start, len), h, (q0, nq)))
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
