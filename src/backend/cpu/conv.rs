//! 1-D convolution over the utterances of a packed, time-major batch, as GEMMs.
//!
//! With time-major activations the receptive field of output frame `t` (for one group, no
//! padding) is the contiguous run `x[stride*t .. stride*t + kernel, :]`, so the im2col matrix is a
//! strided *view* of the input with row stride `stride * c_in`: the feature encoder's convolutions
//! need no copies at all. Grouped or padded convolutions (the positional conv) build im2col
//! blocks of bounded size instead.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{matmul, MatRef};
use super::gemm_bf16::{self, PairRows};
use super::math::bias_act_rows;
use crate::backend::{Activation, ConvGeometry, Seqs};

/// Output frames per im2col block, bounding scratch memory for long utterances.
const FRAMES_PER_BLOCK: usize = 256;

/// `act(conv(x) + b)` per utterance. With `bf16`, the weight packed by
/// [`gemm_bf16::pack_weight`] as `[c_out, kernel * c_in]`, the one-group unpadded convolutions
/// run through the bf16 GEMM (see [`packs`]).
#[allow(clippy::too_many_arguments)]
pub fn conv1d(
    x: &[f32],
    x_shape: &[usize],
    seqs_in: &Seqs,
    seqs_out: &Seqs,
    w: &[f32],
    w_shape: &[usize],
    bias: Option<&[f32]>,
    geom: ConvGeometry,
    act: Activation,
    bf16: Option<&[u32]>,
) -> Result<crate::tensor::Tensor> {
    let ConvGeometry { kernel, stride, pad_left, groups } = geom;
    let &[rows, c_in] = x_shape else { anyhow::bail!("conv1d input must be [frames, channels], found {x_shape:?}") };
    let &[c_out, w_k, cg] = w_shape else { anyhow::bail!("conv1d weight must be [out, kernel, in/groups], found {w_shape:?}") };
    ensure!(rows == seqs_in.total(), "conv1d: {rows} input frames but the batch holds {}", seqs_in.total());
    ensure!(seqs_in.count() == seqs_out.count(), "conv1d: input and output batches differ in size");
    ensure!(groups > 0 && c_in % groups == 0 && c_out % groups == 0, "conv1d: channels {c_in}->{c_out} do not split into {groups} groups");
    ensure!(
        w_k == kernel && cg == c_in / groups,
        "conv1d: weight {w_shape:?} does not fit kernel {kernel}, {c_in} inputs, {groups} groups"
    );
    if let Some(b) = bias {
        ensure!(b.len() == c_out, "conv1d: bias has {} values for {c_out} channels", b.len());
    }
    let mut out = vec![0.0f32; seqs_out.total() * c_out];
    for u in 0..seqs_in.count() {
        let (t_in, t_out) = (seqs_in.lens()[u], seqs_out.lens()[u]);
        let src = &x[seqs_in.range(u).start * c_in..seqs_in.range(u).end * c_in];
        let dst = &mut out[seqs_out.range(u).start * c_out..seqs_out.range(u).end * c_out];
        if t_out == 0 {
            continue;
        }
        let fits = (t_out - 1).checked_mul(stride).and_then(|s| s.checked_add(kernel)).is_some_and(|end| end <= t_in);
        let epilogue = |rows: &mut [f32]| bias_act_rows(rows, c_out, bias, act);
        if groups == 1 && pad_left == 0 && fits {
            // im2col as a view: row t = x[stride*t .. stride*t + kernel, :] flattened.
            match bf16 {
                Some(packed) => {
                    let pairs = gemm_bf16::to_pairs(src, c_in);
                    let view = PairRows { data: &pairs, rows: t_out, stride: stride * c_in / 2, pairs: kernel * c_in / 2 };
                    gemm_bf16::matmul(dst, view, packed, c_out, 0, |_, _, _| {})
                }
                None => {
                    let cols = MatRef { data: src, rows: t_out, cols: kernel * c_in, row_stride: stride * c_in, col_stride: 1 };
                    matmul(dst, c_out, cols, MatRef::row_major(w, c_out, kernel * c_in).t(), false, 0);
                }
            }
        } else {
            conv_im2col(src, t_in, c_in, dst, t_out, c_out, w, geom);
        }
        dst.par_chunks_mut(c_out * 64).for_each(epilogue);
    }
    Ok(crate::tensor::Tensor::from_vec(out, &[seqs_out.total(), c_out]))
}

/// Whether a convolution of `c_in` channels with the `[c_out, kernel, c_in / groups]` weight
/// takes the bf16 GEMM: one group, no padding (its receptive fields a strided view of the
/// input), and an even number of channels, so each view row starts on a pair. The first layer
/// of the feature encoder (one channel) stays f32, and so does the grouped positional conv:
/// gathering its receptive fields dominates, and a bf16 trial was 40% slower (44 against 31 ms
/// at 1 x 10 s, its 48 outputs per group padded to 64).
pub fn packs(w_shape: &[usize], c_in: usize, geom: ConvGeometry) -> bool {
    matches!(w_shape, &[_, _, cg] if cg == c_in) && geom.groups == 1 && geom.pad_left == 0 && c_in.is_multiple_of(2)
}

/// General path: per group and per block of output frames, gather the receptive fields into a
/// dense `[frames, kernel * c_in/groups]` block (zeros outside the utterance) and multiply.
#[allow(clippy::too_many_arguments)]
fn conv_im2col(src: &[f32], t_in: usize, c_in: usize, dst: &mut [f32], t_out: usize, c_out: usize, w: &[f32], geom: ConvGeometry) {
    let ConvGeometry { kernel, stride, pad_left, groups } = geom;
    let (cg, og) = (c_in / groups, c_out / groups);
    let blocks: Vec<(usize, usize)> = (0..groups).flat_map(|g| (0..t_out).step_by(FRAMES_PER_BLOCK).map(move |t0| (g, t0))).collect();
    // Each task computes one [frames, og] tile; tiles are scattered into `dst` afterwards.
    let tiles: Vec<(usize, usize, Vec<f32>)> = blocks
        .into_par_iter()
        .map(|(g, t0)| {
            let frames = FRAMES_PER_BLOCK.min(t_out - t0);
            let mut cols = vec![0.0f32; frames * kernel * cg];
            for (i, col_row) in cols.chunks_exact_mut(kernel * cg).enumerate() {
                let first = (stride * (t0 + i)) as isize - pad_left as isize;
                for (k, tap) in col_row.chunks_exact_mut(cg).enumerate() {
                    let s = first + k as isize;
                    if s >= 0 && (s as usize) < t_in {
                        let at = s as usize * c_in + g * cg;
                        tap.copy_from_slice(&src[at..at + cg]);
                    }
                }
            }
            let mut tile = vec![0.0f32; frames * og];
            let wg = &w[g * og * kernel * cg..(g + 1) * og * kernel * cg];
            matmul(&mut tile, og, MatRef::row_major(&cols, frames, kernel * cg), MatRef::row_major(wg, og, kernel * cg).t(), false, 1);
            (g, t0, tile)
        })
        .collect();
    for (g, t0, tile) in tiles {
        for (i, row) in tile.chunks_exact(og).enumerate() {
            let at = (t0 + i) * c_out + g * og;
            dst[at..at + og].copy_from_slice(row);
        }
    }
}
