//! Linear layers that skip dropped weights on the CPU: a masked or pruned weight compressed once
//! at load into rows of (input index, value) pairs, and a product that touches only those.
//!
//! Layout: the input features are cut into panels of [`PANEL`]; per panel and output row, the
//! kept weights' input indices (u16) and values (f32), rows one after another (CSR over each
//! panel of PyTorch's `[out, in]` weight): 6 bytes per kept weight against 4 per weight dense,
//! so the format pays in bytes from about a third of the weights dropped and, since the product
//! gathers, in time from more (docs/PERF.md has the measured crossovers).
//!
//! The product takes frames in blocks of [`LANES`]: each block is transposed so the lanes of
//! one input feature are contiguous, and each kept weight costs one broadcast multiply-add over
//! a block (vectorised over frames). A panel of a block is `PANEL * LANES` floats (32 KB), so the
//! gathered rows come from L1 while every output row's entries of that panel stream past. An
//! output row's lanes add up over the panels in a row-major tile (two vector adds per row and
//! panel), which goes into the frames' rows once, at the end.

use rayon::prelude::*;

use super::math::{bias_act_rows, multiversion};
use crate::backend::Activation;

/// Frames per block: two AVX-512 registers of f32 (four AVX2 ones), so each kept weight's index
/// and value load is shared by two multiply-adds.
const LANES: usize = 32;
/// Input features per panel (the CUDA kernel's `SP_PANEL` too: both read the same layout).
pub const PANEL: usize = 256;
/// Output rows per task, and blocks of frames per task (the group's transposed input,
/// `BLOCKS_PER_TASK * LANES * d_in` floats, stays in L2 while the task's rows stream past).
const ROWS_PER_TASK: usize = 64;
const BLOCKS_PER_TASK: usize = 8;

/// Whether the sparse product beats the dense GEMM for a weight with `dropped` of its entries
/// zero, over `frames` frames, on a device whose dense GEMM keeps up with it over large
/// batches until `large_batch_dropped`. Small batches (memory-bound: the weight's bytes
/// dominate) take it from [`MIN_DROPPED`].
pub fn sparse_pays(dropped: f64, frames: usize, large_batch_dropped: f64) -> bool {
    dropped >= if frames <= SMALL_BATCH_FRAMES { MIN_DROPPED } else { large_batch_dropped }
}

/// The CPU's `large_batch_dropped`. Measured crossovers (docs/PERF.md, `cargo bench --bench
/// sparse`, wav2vec2-base FFN shapes, 2 vCPUs): with 49 frames (batch 1 x 1 s) sparse wins at
/// 70% dropped for 768->3072 and ties there for 3072->768, hence [`MIN_DROPPED`] (3x and 2.3x
/// at 90%); with 5992 frames (batch 8 x 15 s) the dense GEMM still wins at 70% for 3072->768
/// and loses at 90% for both shapes.
pub const CPU_LARGE_BATCH_DROPPED: f64 = 0.9;

/// Products over up to this many frames count as small batches.
const SMALL_BATCH_FRAMES: usize = 256;

/// The fewest dropped weights for which a linear gets a sparse copy at all.
const MIN_DROPPED: f64 = 0.8;

/// Whether a weight has enough zeros to get a sparse copy (on any device).
pub fn worth_compressing(values: &[f32]) -> bool {
    values.iter().filter(|&&v| v == 0.0).count() as f64 >= MIN_DROPPED * values.len() as f64
}

/// A weight with its zeros removed, `[out, in]` row by row within each input panel.
#[derive(Clone, Debug)]
pub struct SparseLinear {
    pub d_in: usize,
    pub d_out: usize,
    /// Panel `p`, row `o`: entries `row_start[p * (d_out + 1) + o] .. [.. + o + 1]`.
    row_start: Vec<u32>,
    /// Input index within the panel.
    cols: Vec<u16>,
    vals: Vec<f32>,
}

impl SparseLinear {
    /// The non-zero weights of a CPU-layout `[in, out]` weight; `None` when the weight has 2^32
    /// or more entries.
    pub fn from_in_out(w_t: &[f32], d_in: usize, d_out: usize) -> Option<SparseLinear> {
        if w_t.len() != d_in * d_out {
            return None;
        }
        SparseLinear::build(d_in, d_out, |o, i| w_t[i * d_out + o])
    }

    /// The non-zero weights of a PyTorch-layout `[out, in]` weight (what a device holds); `None`
    /// when the weight has 2^32 or more entries.
    pub fn from_out_in(w: &[f32], d_out: usize, d_in: usize) -> Option<SparseLinear> {
        if w.len() != d_in * d_out {
            return None;
        }
        SparseLinear::build(d_in, d_out, |o, i| w[o * d_in + i])
    }

    /// The layout from `weight(o, i)`, panel by panel, row by row.
    fn build(d_in: usize, d_out: usize, weight: impl Fn(usize, usize) -> f32) -> Option<SparseLinear> {
        if d_in * d_out >= u32::MAX as usize {
            return None;
        }
        let panels = d_in.div_ceil(PANEL);
        let mut row_start = Vec::with_capacity(panels * (d_out + 1));
        let (mut cols, mut vals) = (Vec::new(), Vec::new());
        for p in 0..panels {
            row_start.push(vals.len() as u32);
            for o in 0..d_out {
                for i in p * PANEL..((p + 1) * PANEL).min(d_in) {
                    let v = weight(o, i);
                    if v != 0.0 {
                        cols.push((i - p * PANEL) as u16);
                        vals.push(v);
                    }
                }
                row_start.push(vals.len() as u32);
            }
        }
        Some(SparseLinear { d_in, d_out, row_start, cols, vals })
    }

    /// The layout's arrays `(row_start, cols, vals)` (see the fields), for a device to copy.
    pub fn parts(&self) -> (&[u32], &[u16], &[f32]) {
        (&self.row_start, &self.cols, &self.vals)
    }

    /// The fraction of weights kept.
    pub fn density(&self) -> f64 {
        self.vals.len() as f64 / (self.d_in * self.d_out).max(1) as f64
    }

    /// `act(x · Wᵀ + b)` for `x [n, d_in]`, as [`crate::backend::Backend::linear`].
    pub fn forward(&self, x: &[f32], bias: Option<&[f32]>, act: Activation) -> Vec<f32> {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let n = x.len() / d_in;
        let blocks = n.div_ceil(LANES);
        // Transposed blocks: xt[b][i][lane] = x[b * LANES + lane][i] (zero past the last frame).
        let mut xt = vec![0.0f32; blocks * d_in * LANES];
        xt.par_chunks_mut(d_in * LANES).enumerate().for_each(|(b, block)| {
            for (lane, row) in x[b * LANES * d_in..((b + 1) * LANES).min(n) * d_in].chunks_exact(d_in).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    block[i * LANES + lane] = v;
                }
            }
        });
        let row_tasks = d_out.div_ceil(ROWS_PER_TASK);
        let block_tasks = blocks.div_ceil(BLOCKS_PER_TASK);
        // Each task computes, per block of its group, a row-major [rows, LANES] tile: the
        // panels add into a row's lanes with vector adds, and the transposition into frames
        // happens once, below, instead of once per panel.
        let tiles: Vec<(std::ops::Range<usize>, Vec<f32>)> = (0..row_tasks * block_tasks)
            .into_par_iter()
            .map(|task| {
                let (rt, bt) = (task % row_tasks, task / row_tasks);
                let rows = rt * ROWS_PER_TASK..((rt + 1) * ROWS_PER_TASK).min(d_out);
                let bs = bt * BLOCKS_PER_TASK..((bt + 1) * BLOCKS_PER_TASK).min(blocks);
                let mut tile = vec![0.0f32; bs.len() * rows.len() * LANES];
                for (b, out) in bs.zip(tile.chunks_exact_mut(rows.len() * LANES)) {
                    let block = &xt[b * d_in * LANES..(b + 1) * d_in * LANES];
                    for (p, panel) in block.chunks(PANEL * LANES).enumerate() {
                        let starts = &self.row_start[p * (d_out + 1) + rows.start..=p * (d_out + 1) + rows.end];
                        panel_rows(starts, &self.cols, &self.vals, panel, out);
                    }
                }
                (rows, tile)
            })
            .collect();
        // Tiles into the rows of their frames, one block group per task, with bias and activation.
        let mut y = vec![0.0f32; n * d_out];
        y.par_chunks_mut(BLOCKS_PER_TASK * LANES * d_out).zip(tiles.par_chunks(row_tasks)).for_each(|(frames, group)| {
            for (rows, tile) in group {
                // Frame by frame, so that writes run along y's rows (strided reads stay in the
                // tile, a few KB; strided writes of y would collide in cache sets when d_out is
                // a multiple of 1024).
                for (block, lanes) in frames.chunks_mut(LANES * d_out).zip(tile.chunks_exact(rows.len() * LANES)) {
                    for (lane, frame) in block.chunks_exact_mut(d_out).enumerate() {
                        for (y, row_lanes) in frame[rows.clone()].iter_mut().zip(lanes.chunks_exact(LANES)) {
                            *y = row_lanes[lane];
                        }
                    }
                }
            }
            bias_act_rows(frames, d_out, bias, act);
        });
        y
    }
}

multiversion! {
    /// One panel of a block of [`LANES`] transposed frames against the rows whose entries start
    /// at `row_start` (one more start than rows): `out[r][lane] += Σ_k vals[k] · panel[cols[k]][lane]`.
    pub fn panel_rows(row_start: &[u32], cols: &[u16], vals: &[f32], panel: &[f32], out: &mut [f32]) {
        for (range, out) in row_start.windows(2).zip(out.chunks_exact_mut(LANES)) {
            let (a, b) = (range[0] as usize, range[1] as usize);
            let mut acc = [0.0f32; LANES];
            for (&c, &v) in cols[a..b].iter().zip(&vals[a..b]) {
                let x: &[f32; LANES] = panel[c as usize * LANES..(c as usize + 1) * LANES].try_into().expect("a panel row is LANES wide");
                for (a, x) in acc.iter_mut().zip(x) {
                    *a += v * x;
                }
            }
            for (o, v) in out.iter_mut().zip(acc) {
                *o += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Activation, Backend};
    use crate::rng::SplitMix;
    use crate::tensor::Tensor;

    /// The sparse product equals the dense one over the same zeros (fp32, rel L2 <= 1e-5) for
    /// awkward sizes: one frame, primes, a partial block and partial row tasks.
    #[test]
    fn sparse_product_matches_the_dense_masked_product() {
        let be = CpuBackend;
        let mut rng = SplitMix(9);
        for (n, d_in, d_out, density) in
            [(1, 7, 5, 0.5), (37, 31, 67, 0.1), (16, 64, 130, 0.3), (50, 129, 64, 0.9), (3, 5, 3, 0.0), (70, 600, 33, 0.2)]
        {
            let w: Vec<f32> = (0..d_out * d_in).map(|_| if rng.unit() < density { rng.symmetric() } else { 0.0 }).collect();
            let x: Vec<f32> = (0..n * d_in).map(|_| rng.symmetric()).collect();
            let bias: Vec<f32> = (0..d_out).map(|_| rng.symmetric()).collect();
            let w_t = be.prepare_linear_weight(&Tensor::from_vec(w, &[d_out, d_in])).unwrap();
            let sp = SparseLinear::from_in_out(w_t.f32s().unwrap(), d_in, d_out).unwrap();
            for act in [Activation::Identity, Activation::Gelu] {
                let dense = be
                    .linear(&Tensor::from_vec(x.clone(), &[n, d_in]), &w_t, Some(&Tensor::from_vec(bias.clone(), &[d_out])), act)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                let got = sp.forward(&x, Some(&bias), act);
                let (num, den) = got
                    .iter()
                    .zip(&dense)
                    .fold((0.0f64, 0.0f64), |(n, d), (a, b)| (n + (*a as f64 - *b as f64).powi(2), d + (*b as f64).powi(2)));
                assert!(
                    num.sqrt() <= 1e-5 * den.sqrt().max(1e-30),
                    "n={n} {d_in}->{d_out} density {density}: rel L2 {}",
                    (num / den).sqrt()
                );
            }
            assert!((sp.density() - density).abs() < 0.2 || d_in * d_out < 100);
        }
    }
}
