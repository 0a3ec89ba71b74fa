//! Vectorisable scalar math (exp, erf) and elementwise kernels compiled for AVX-512 and AVX2 with
//! a run-time choice, so a binary built for baseline x86-64 still uses the machine's vector units.

/// Defines `pub fn $name(args)` that runs `$body` compiled for the best instruction set found at
/// run time. The body must be branch-light straight-line code over slices so it autovectorises,
/// with plain `for` loops: a `for_each` / `fold` adaptor is a separate generic function that LLVM
/// may leave out of line, and then it is compiled for baseline x86-64 (no vectors wider than
/// SSE2, `floor` a libm call). That happened to the GELU once its erfc grew: 8% of the forward.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the features this version was compiled for are present.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

pub(crate) use multiversion;

use crate::backend::Activation;

/// e^x with relative error below 2e-7 over the f32 range; branch-free so loops vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // SAFETY: |n| <= 128 after the clamp, so the conversion is exact (and vectorises, unlike `as`).
    let n: i32 = unsafe { n.to_int_unchecked() };
    // Taylor series of e^r on |r| <= ln2/2, Horner form; truncation error < 1e-8.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// erfc(x) with relative error below 1.2e-7 everywhere (the Chebyshev fit of Numerical Recipes,
/// `erfcc`), so tails keep their precision: 1 - erf(x) would lose it for x >> 0.
#[inline(always)]
pub fn erfc(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07 + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * exp(-z * z + poly);
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// erf(x) = 1 - erfc(x).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    1.0 - erfc(x)
}

/// GELU, exact (erf) form: x/2 · (1 + erf(x/√2)) = x/2 · erfc(-x/√2), accurate in both tails.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// `act(x)`.
#[inline(always)]
pub fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Identity => x,
        Activation::Gelu => gelu(x),
        Activation::Relu => x.max(0.0),
    }
}

multiversion! {
    /// `row = act(row + bias)` for each `width`-wide row (no bias: just the activation).
    pub fn bias_act_rows(x: &mut [f32], width: usize, bias: Option<&[f32]>, act: Activation) {
        match (bias, act) {
            (Some(b), Activation::Identity) => {
                for row in x.chunks_exact_mut(width) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
            }
            (Some(b), _) => {
                for row in x.chunks_exact_mut(width) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v = activate(*v + b, act);
                    }
                }
            }
            (None, Activation::Identity) => {}
            (None, _) => {
                for v in x.iter_mut() {
                    *v = activate(*v, act);
                }
            }
        }
    }
}

multiversion! {
    /// `dx = dy · gelu'(x)` with `gelu'(x) = Φ(x) + x φ(x)` (exact erf form; Φ through erfc).
    pub fn gelu_grad(dx: &mut [f32], dy: &[f32], x: &[f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((dx, &d), &v) in dx.iter_mut().zip(dy).zip(x) {
            *dx = d * (0.5 * erfc(-v * std::f32::consts::FRAC_1_SQRT_2) + v * INV_SQRT_2PI * exp(-0.5 * v * v));
        }
    }
}

multiversion! {
    /// `x += y` elementwise.
    pub fn add_assign(x: &mut [f32], y: &[f32]) {
        for (x, y) in x.iter_mut().zip(y) {
            *x += y;
        }
    }
}

multiversion! {
    /// `row = act(row * scale + shift)` for each `scale.len()`-wide row (a folded affine norm).
    pub fn scale_shift_act_rows(x: &mut [f32], scale: &[f32], shift: &[f32], act: Activation) {
        for row in x.chunks_exact_mut(scale.len()) {
            for ((v, s), t) in row.iter_mut().zip(scale).zip(shift) {
                *v = activate(*v * s + t, act);
            }
        }
    }
}

/// Lanes of the partial reductions below: 16 independent accumulators let the compiler keep
/// them in one vector register instead of a serial chain.
const LANES: usize = 16;

/// Largest element (−∞ for an empty slice); NaNs are ignored.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    tail.iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Sum with lane-wise partial sums (more accurate than a serial sum as well as faster).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut s = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            s[i] += c[i];
        }
    }
    s.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

multiversion! {
    /// Numerically stable in-place softmax of one row, scaled by `scale` first.
    pub fn softmax_scaled(row: &mut [f32], scale: f32) {
        let shift = max(row) * scale;
        for v in row.iter_mut() {
            *v = exp(*v * scale - shift);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// In-place layer norm of each `gamma.len()`-wide row: two-pass mean and variance.
    pub fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let c = gamma.len();
        for row in x.chunks_exact_mut(c) {
            let mean = sum(row) / c as f32;
            let mut sq = [0.0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for ch in chunks {
                for i in 0..LANES {
                    sq[i] += (ch[i] - mean) * (ch[i] - mean);
                }
            }
            let var = (sq.iter().sum::<f32>() + tail) / c as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_float_precision() {
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, std {want}");
        }
    }

    #[test]
    fn erf_matches_known_values() {
        // erf values from tables (Abramowitz & Stegun, Table 7.1).
        for (x, want) in [(0.0, 0.0), (0.5, 0.520_499_9), (1.0, 0.842_700_8), (2.0, 0.995_322_3), (-1.5, -0.966_105_1)] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
        // The tails keep relative precision: erfc(4) = 1.541725790e-8, erfc(-4) = 2 - that.
        assert!(((erfc(4.0) - 1.541_725_8e-8) / 1.541_725_8e-8).abs() < 1e-6, "erfc(4) = {}", erfc(4.0));
        assert!((erfc(-4.0) - 2.0).abs() < 1e-7);
    }

    #[test]
    fn lane_reductions_equal_plain_ones() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        assert_eq!(max(&x), 8.0);
        assert_eq!(sum(&x), x.iter().map(|&v| v as f64).sum::<f64>() as f32);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut row: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let orig = row.clone();
        softmax_scaled(&mut row, 0.5);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let (a, b) = (orig.iter().position(|&v| v == max(&orig)).unwrap(), row.iter().position(|&v| v == max(&row)).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn dispatched_gelu_equals_scalar_gelu() {
        let mut xs: Vec<f32> = (-300..300).map(|i| i as f32 * 0.037).collect();
        let want: Vec<f32> = xs.iter().map(|&x| gelu(x)).collect();
        bias_act_rows(&mut xs, 600, None, Activation::Gelu);
        for (g, w) in xs.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0));
        }
    }
}
