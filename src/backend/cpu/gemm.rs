//! Safe, bounds-checked wrapper over the `gemm` crate's strided f32 matrix multiply.

use gemm::Parallelism;
use rayon::prelude::*;

/// A read-only strided view of a row-major-or-not matrix inside a slice.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Index one past the last element this view touches (0 for an empty view; `usize::MAX`
    /// when that overflows, so an absurd view fails the bounds check instead of wrapping past it).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1)
                .saturating_mul(self.row_stride)
                .saturating_add((self.cols - 1).saturating_mul(self.col_stride))
                .saturating_add(1)
        }
    }
}

/// `dst[m x n] (row stride dst_stride) = (accumulate ? dst : 0) + a[m x k] · b[k x n]`.
///
/// `threads == 1` runs on the calling thread (use it inside an outer parallel loop); otherwise the
/// product is split over the rayon pool.
pub fn matmul(dst: &mut [f32], dst_stride: usize, a: MatRef, b: MatRef, accumulate: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len(), "operand view exceeds its slice");
    let dst_view = MatRef { data: dst, rows: m, cols: n, row_stride: dst_stride, col_stride: 1 };
    assert!(dst_view.extent() <= dst_view.data.len(), "destination view exceeds its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_stride..r * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if threads == 1 { Parallelism::None } else { Parallelism::Rayon(threads) };
    let unaliased = unaliased_columns(b, m, threads);
    let b = match &unaliased {
        Some((data, col_stride)) => MatRef { data, col_stride: *col_stride, ..b },
        None => b,
    };
    // SAFETY: every index the kernel touches was bounds-checked above via `extent`, and `dst` is
    // borrowed mutably so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Floats in 4 KiB: columns this far apart in memory fall in the same L1 cache set.
const L1_SET_PERIOD: usize = 1024;

/// A copy of a column-major `b` whose column stride is a multiple of 4 KiB, its columns one
/// cache line further apart (with that stride), when `m` rows will read it.
///
/// The gemm crate reads a column-major `b` (the transposed weight of an input gradient, the
/// weight of a grouped or strided conv) in place, several columns at once; at such a stride
/// those columns all map to one L1 set and keep evicting each other. The FFN's input-gradient
/// product (`[T, 3072] · W₁`, stride 3072) ran at half the speed of the forward's, 20 ms against
/// 11 ms at T = 498 on 2 Zen 4 cores; copied, 12.5 ms with the copy (~1 ms per 10 MB).
fn unaliased_columns(b: MatRef, m: usize, threads: usize) -> Option<(Vec<f32>, usize)> {
    const MIN_ROWS: usize = 64; // below this the copy costs more than the misses it saves
    if b.row_stride != 1 || b.cols < 2 || !b.col_stride.is_multiple_of(L1_SET_PERIOD) || m < MIN_ROWS {
        return None;
    }
    let stride = b.rows + 16;
    let mut copy = vec![0.0f32; stride * b.cols];
    let column = |(j, col): (usize, &mut [f32])| col[..b.rows].copy_from_slice(&b.data[j * b.col_stride..][..b.rows]);
    if threads == 1 {
        copy.chunks_mut(stride).enumerate().for_each(column);
    } else {
        copy.par_chunks_mut(stride).enumerate().for_each(column);
    }
    Some((copy, stride))
}

/// `dst[m x n] = a · b` in blocks of rows spread over the rayon pool, each block multiplied on
/// one thread and passed to `epilogue` (bias, activation, the straight-through score product)
/// with the index of its first row, while it is still in cache.
pub fn matmul_blocked(dst: &mut [f32], a: MatRef, b: MatRef, epilogue: impl Fn(usize, &mut [f32]) + Sync) {
    let (m, n) = (a.rows, b.cols);
    assert_eq!(dst.len(), m * n, "destination must be exactly m x n");
    if m == 0 || n == 0 {
        return;
    }
    // An equal share of rows per thread, in blocks of at most ~256 rows (a block's rows of `a`
    // and `dst` stay cache-resident while the packed `b` streams past).
    let threads = rayon::current_num_threads();
    let blocks = threads * m.div_ceil(threads * 256);
    let block = m.div_ceil(blocks);
    dst.par_chunks_mut(block * n).enumerate().for_each(|(i, rows)| {
        let first = i * block;
        let a_rows = MatRef { data: &a.data[first * a.row_stride..], rows: rows.len() / n, ..a };
        matmul(rows, n, a_rows, b, false, 1);
        epilogue(first, rows);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.row_stride + p * a.col_stride] as f64 * b.data[p * b.row_stride + j * b.col_stride] as f64;
                }
                out[i * b.cols + j] = s as f32;
            }
        }
        out
    }

    /// A column-major `b` with a 4 KiB column stride is read through a re-strided copy: the
    /// same product, accumulated or not, on one thread or several.
    #[test]
    fn column_major_operands_with_an_aliasing_stride_multiply_the_same() {
        let (m, k, n, stride) = (70, 40, 9, L1_SET_PERIOD);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * stride).map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5).collect();
        let bv = MatRef { data: &w, rows: k, cols: n, row_stride: 1, col_stride: stride };
        assert!(unaliased_columns(bv, m, 1).is_some(), "this view must take the copy");
        let want = naive(MatRef::row_major(&a, m, k), bv);
        for threads in [1, 2] {
            let mut got = vec![f32::NAN; m * n];
            matmul(&mut got, n, MatRef::row_major(&a, m, k), bv, false, threads);
            matmul(&mut got, n, MatRef::row_major(&a, m, k), bv, true, threads);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 2e-5, "{g} vs 2 x {w}");
            }
        }
    }

    /// A view whose extent overflows `usize` (a conv asked for absurd output lengths) must fail
    /// the bounds check, not wrap around it into an out-of-bounds read.
    #[test]
    #[should_panic(expected = "operand view exceeds its slice")]
    fn a_view_whose_extent_overflows_is_refused() {
        let data = vec![0.0f32; 16];
        let huge = MatRef { data: &data, rows: usize::MAX / 2, cols: 4, row_stride: 4, col_stride: 1 };
        let mut dst = vec![0.0f32; 4];
        matmul(&mut dst, 1, huge, MatRef::row_major(&data, 4, 1), false, 1);
    }

    #[test]
    fn strided_and_transposed_products_match_naive_sums() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5).collect();
        let av = MatRef::row_major(&a, m, k);
        let bv = MatRef::row_major(&w, n, k).t();
        let want = naive(av, bv);
        for threads in [1, 2] {
            let mut got = vec![f32::NAN; m * n];
            matmul(&mut got, n, av, bv, false, threads);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            matmul(&mut got, n, av, bv, true, threads);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 2e-5);
            }
        }
        let mut got = vec![f32::NAN; m * n];
        // The epilogue adds each row's index: every block must be told where it starts.
        matmul_blocked(&mut got, av, bv, |first, rows| {
            rows.chunks_exact_mut(n).enumerate().for_each(|(r, row)| row.iter_mut().for_each(|v| *v += (first + r) as f32))
        });
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w - (i / n) as f32).abs() < 1e-4, "{g} vs {w} + {}", i / n);
        }
    }
}
