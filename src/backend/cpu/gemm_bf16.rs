//! bf16 matrix products on the CPU through AVX512-BF16's `vdpbf16ps`: both operands rounded to
//! bf16 (round to nearest even), each pair of products summed into f32 accumulators.
//!
//! One `vdpbf16ps` does 32 multiply-adds where an f32 FMA does 16, at the same issue rate on Zen 4
//! (measured on one core: 233 against 116 GFLOP/s in a register-resident loop), and bf16 weights
//! are half the bytes. The CPU's `--precision bf16` runs its linears, convolutions and
//! attention products through [`matmul`].
//!
//! Layouts. Activations are row-major bf16 with an even row length, read as `u32` *pairs*
//! `(x[r, 2p], x[r, 2p + 1])`, which is the operand one `vdpbf16ps` lane multiplies. Weights are
//! packed once, at load, into panels of [`PANEL`] output columns: `w[j, p, c]` is the pair
//! `(W[32j + c, 2p], W[32j + c, 2p + 1])` of the PyTorch `[out, in]` weight, so one k-pair of a
//! panel is 128 contiguous bytes (two registers) and a panel's block of k stays in cache while
//! every micro-tile of a row block passes over it.

use rayon::prelude::*;

/// Output columns per weight panel: two registers of 16 f32 accumulators.
pub const PANEL: usize = 32;
/// Output rows per micro-tile: 2 x 12 accumulators and 2 weight registers of the 32, the
/// activations broadcast from memory (8 and 14 rows were slower).
const MR: usize = 12;
/// k pairs per cache block (a panel's block is 48 KiB): of 128, 256, 384 and 512, the fastest
/// over the FFN's two products at 499 frames on Zen 4 (K = 768 in one block, K = 3072 in four).
const KC_PAIRS: usize = 384;
/// Output rows per task at most: the block's activations for one k block stay in L2.
const MC: usize = 96;

/// Whether this CPU runs the bf16 kernels (AVX512-BF16: AMD Zen 4, Intel Cooper Lake, Sapphire
/// Rapids and later).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a `[d_out, d_in]` weight fits the packed layout (whole panels, whole pairs).
pub fn packable(d_out: usize, d_in: usize) -> bool {
    d_out.is_multiple_of(PANEL) && d_in.is_multiple_of(2) && d_out > 0 && d_in > 0
}

/// `x` rounded to bf16, nearest even (NaN stays NaN), as in `half::bf16::from_f32`.
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The pair `(lo, hi)` as one `u32`, `lo` in the low half (the order `vdpbf16ps` reads).
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// Packs a PyTorch `[d_out, d_in]` weight (`d_in` even) into panels of bf16 pairs (module
/// docs); a last partial panel is padded with zero rows.
pub fn pack_weight(w: &[f32], d_out: usize, d_in: usize) -> Vec<u32> {
    assert!(d_in.is_multiple_of(2) && d_in > 0 && w.len() == d_out * d_in, "a {d_out} x {d_in} weight does not pack");
    let pairs = d_in / 2;
    let rows = to_pairs(w, d_in);
    let mut packed = vec![0u32; d_out.next_multiple_of(PANEL) * pairs];
    // Panel by panel, its 32 rows of pairs read side by side.
    packed.par_chunks_mut(PANEL * pairs).zip(rows.par_chunks(PANEL * pairs)).for_each(|(panel, rows)| {
        for (p, out) in panel.chunks_exact_mut(PANEL).enumerate() {
            for (c, v) in out.iter_mut().enumerate().take(rows.len() / pairs) {
                *v = rows[c * pairs + p];
            }
        }
    });
    packed
}

/// The index into the `[d_out, d_in]` weight of element `i` of its packed form.
fn packed_source(i: usize, d_in: usize) -> usize {
    let (e, c, p, j) = (i % 2, i / 2 % PANEL, i / (2 * PANEL) % (d_in / 2), i / (PANEL * d_in));
    (j * PANEL + c) * d_in + 2 * p + e
}

/// A packed weight with the dropped weights of `keep` (bits LSB first over the `[d_out, d_in]`
/// weight, as [`crate::mask::pack`] writes them) set to zero.
pub fn mask_packed(packed: &[u16], keep: &[u8], d_in: usize) -> Vec<u16> {
    let kept = |at: usize| keep[at / 8] >> (at % 8) & 1 == 1;
    packed.par_iter().enumerate().map(|(i, &v)| if kept(packed_source(i, d_in)) { v } else { 0 }).collect()
}

/// Row-major `x [rows, cols]` (cols even) as bf16 pairs, `cols / 2` per row.
pub fn to_pairs(x: &[f32], cols: usize) -> Vec<u32> {
    assert!(cols.is_multiple_of(2) && x.len().is_multiple_of(cols.max(1)), "rows of {cols} values do not split into pairs");
    let mut out = vec![0u32; x.len() / 2];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(2 * CHUNK)).for_each(|(o, x)| convert_pairs(o, x));
    out
}

/// `out[i] = pair(x[2i], x[2i + 1])`, 16 pairs per instruction where the CPU has AVX512-BF16.
fn convert_pairs(out: &mut [u32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features the function enables were just detected.
        return unsafe { kernel::convert_pairs(out, x) };
    }
    out.iter_mut().zip(x.chunks_exact(2)).for_each(|(o, x)| *o = pair(x[0], x[1]));
}

/// A raw pointer to the output, shared by tasks that each write their own tile of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint tiles (distinct row blocks or column panels); see `matmul`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `i` places on (a method, so closures capture the `Sync` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `rows` rows of `pairs` bf16 pairs each, `stride` pairs apart in `data` (a strided view: the
/// receptive fields of a convolution overlap).
#[derive(Clone, Copy)]
pub struct PairRows<'a> {
    pub data: &'a [u32],
    pub rows: usize,
    pub stride: usize,
    pub pairs: usize,
}

impl<'a> PairRows<'a> {
    /// Dense rows of `pairs` pairs.
    pub fn dense(data: &'a [u32], pairs: usize) -> PairRows<'a> {
        PairRows { data, rows: data.len() / pairs.max(1), stride: pairs, pairs }
    }
}

/// `out [a.rows, n] = a · Wᵀ`, then `epilogue(row, first_col, values)` on each finished stretch
/// of an output row (bias and activation while it is in cache); `w` is [`pack_weight`]'s panels
/// for `n` outputs over `a.pairs` pairs. `threads == 1` runs on the calling thread (inside an
/// outer parallel loop); otherwise over the rayon pool. Needs [`available`].
pub fn matmul(out: &mut [f32], a: PairRows, w: &[u32], n: usize, threads: usize, epilogue: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let (m, pairs) = (a.rows, a.pairs);
    assert!(available(), "the bf16 GEMM needs AVX512-BF16");
    let panels = n.div_ceil(PANEL);
    assert!(w.len() == panels * PANEL * pairs && out.len() == m * n, "operands do not fit a {m} x {n} product over {pairs} pairs");
    assert!(m == 0 || (m - 1) * a.stride + pairs <= a.data.len(), "the activations' view exceeds its slice");
    if m == 0 || n == 0 {
        return;
    }
    // Row blocks an equal share of rows (whole micro-tiles) per thread; when there are too few
    // blocks for the pool, column groups of panels too, so a short input keeps every core busy.
    let threads = if threads == 1 { 1 } else { rayon::current_num_threads() };
    let row_blocks = threads * m.div_ceil(threads * MC);
    let block = m.div_ceil(row_blocks).next_multiple_of(MR);
    let row_blocks = m.div_ceil(block);
    let panels_per_group = panels.div_ceil((2 * threads).div_ceil(row_blocks).clamp(1, panels));
    let col_groups = panels.div_ceil(panels_per_group);
    let dst = OutPtr(out.as_mut_ptr());
    let task = |task: usize| {
        let rows = (task / col_groups) * block..((task / col_groups + 1) * block).min(m);
        let group = (task % col_groups) * panels_per_group..((task % col_groups + 1) * panels_per_group).min(panels);
        for k0 in (0..pairs).step_by(KC_PAIRS) {
            let kc = KC_PAIRS.min(pairs - k0);
            for j in group.clone() {
                let panel = &w[(j * pairs + k0) * PANEL..][..kc * PANEL];
                for r0 in rows.clone().step_by(MR) {
                    let valid = MR.min(rows.end - r0);
                    let a_rows: [&[u32]; MR] = std::array::from_fn(|i| &a.data[(r0 + i.min(valid - 1)) * a.stride + k0..][..kc]);
                    let cols = PANEL.min(n - j * PANEL);
                    // SAFETY: `available()` was asserted; the tile's `valid` rows x `cols` columns
                    // lie inside `out` (r0 + valid <= m, j * PANEL + cols <= n) and no other task
                    // writes them (tasks own distinct row blocks or panel groups).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        kernel::micro_tile(a_rows, panel, dst.at(r0 * n + j * PANEL), n, (valid, cols), k0 > 0)
                    };
                }
            }
        }
        let cols = group.start * PANEL..(group.end * PANEL).min(n);
        for r in rows {
            // SAFETY: this task's own tile, finished above; no other task touches it.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + cols.start), cols.len()) };
            epilogue(r, cols.start, row);
        }
    };
    let tasks = 0..row_blocks * col_groups;
    if threads == 1 {
        tasks.for_each(task);
    } else {
        tasks.into_par_iter().for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{MR, PANEL};

    /// One `MR x PANEL` tile of the output over one k block: `c (+)= a · panel`, only the first
    /// `rows` rows and `cols` columns of it stored (other rows repeat a valid row's operand;
    /// other columns are the padding of a last partial panel).
    ///
    /// # Safety
    /// AVX512F and AVX512-BF16 must be present; `c` must be valid for `rows` rows of `cols`
    /// floats, `ldc` apart; every `a[i]` as long as `panel` has pairs of PANEL.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro_tile(a: [&[u32]; MR], panel: &[u32], c: *mut f32, ldc: usize, (rows, cols): (usize, usize), accumulate: bool) {
        let pairs = panel.len() / PANEL;
        // Lanes of the two 16-column halves that hold output columns.
        let lanes = |first: usize| ((1u32 << cols.saturating_sub(first).min(16)) - 1) as __mmask16;
        let (m0, m1) = (lanes(0), lanes(16));
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                *acc = [_mm512_maskz_loadu_ps(m0, c.add(r * ldc)), _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16))];
            }
        }
        let b = panel.as_ptr();
        let a_ptr: [*const u32; MR] = std::array::from_fn(|i| a[i].as_ptr());
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * PANEL) as *const __m512i));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * PANEL + 16) as *const __m512i));
            for r in 0..MR {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_ptr[r].add(p) as i32));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc[0]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc[1]);
        }
    }

    /// [`super::convert_pairs`] with `vcvtne2ps2bf16` (round to nearest even), 16 pairs at a time.
    ///
    /// # Safety
    /// AVX512F and AVX512-BF16 must be present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn convert_pairs(out: &mut [u32], x: &[f32]) {
        let whole = out.len().min(x.len() / 2) / 16 * 16;
        for i in (0..whole).step_by(16) {
            let lo = _mm512_loadu_ps(x.as_ptr().add(2 * i));
            let hi = _mm512_loadu_ps(x.as_ptr().add(2 * i + 16));
            // The second operand fills the low 16 bf16 lanes: x[2i .. 2i + 16] first, in order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut __m512i, v);
        }
        for (o, x) in out[whole..].iter_mut().zip(x[2 * whole..].chunks_exact(2)) {
            *o = super::pair(x[0], x[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of a packed weight comes from a distinct weight, and `pair` puts the
    /// lower-indexed one in the low half.
    #[test]
    fn packing_places_every_weight_once() {
        let (d_out, d_in) = (64, 6);
        let w: Vec<f32> = (0..d_out * d_in).map(|i| (i % 256) as f32).collect(); // exact in bf16
        let packed = pack_weight(&w, d_out, d_in);
        let mut seen = vec![false; w.len()];
        for (i, &bits) in bytemuck::cast_slice::<u32, u16>(&packed).iter().enumerate() {
            let src = packed_source(i, d_in);
            assert!(!seen[src], "weight {src} packed twice");
            seen[src] = true;
            assert_eq!(half::bf16::from_bits(bits).to_f32(), w[src]);
        }
        let p = pair(1.0, -2.0);
        assert_eq!((half::bf16::from_bits(p as u16).to_f32(), half::bf16::from_bits((p >> 16) as u16).to_f32()), (1.0, -2.0));
    }

    /// The vector conversion rounds as `half` does (ties to even included), tail and all.
    #[test]
    fn vector_conversion_rounds_as_half() {
        let x: Vec<f32> = (0..2 * 37).map(|i| f32::from_bits(0x3f80_8000 + i as u32 * 0x1_0000 + (i as u32 % 3) * 0x7fff)).collect();
        let mut got = vec![0u32; 37];
        convert_pairs(&mut got, &x);
        let want: Vec<u32> = x.chunks_exact(2).map(|p| pair(p[0], p[1])).collect();
        assert_eq!(got, want);
    }
}
