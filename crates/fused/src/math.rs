//! Vectorised `f32` kernels for the softmax: a polynomial `exp` written so
//! that LLVM auto-vectorises it, and lane-wise reductions.
//!
//! Every kernel is plain Rust arithmetic (no fused multiply-add, no libm), so
//! IEEE rounding fixes each result: the AVX-512, AVX2 and baseline builds of
//! a kernel, chosen at run time, return bit-identical values, and a result
//! never depends on the buffer's alignment or on thread timing. Reductions
//! keep [`LANES`] partial sums indexed by position (element `i` goes to
//! accumulator `i % LANES`), combined in a fixed order at the end.

/// Number of independent accumulators of the reductions; a multiple of
/// every vector width in use (16 `f32` lanes = one AVX-512 register).
pub const LANES: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two (Cody and Waite): `n * LN2_HI` is exact for |n| < 2^15.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// 1.5 · 2^23: adding it rounds to an integer (ties to even) and leaves the
// integer in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
/// Below `ln(2^-126)` the result is flushed to zero.
const X_MIN: f32 = -87.336_54;
/// Above `ln(f32::MAX)` the result is `+inf`.
const X_MAX: f32 = 88.722_83;

/// `e^x` in `f32`, within 1 ulp (relative error below 1e-7 for `x` in
/// `[-87.33, 88.72]`; measured 8.1e-8 over every `f32` in `[-87.33, 0)`).
///
/// `x < -87.336` (`ln` of the smallest normal `f32`) gives exactly `0.0`,
/// `x > 88.7228` gives `+inf`, NaN gives NaN. The scalar form of the kernel
/// that [`exp_shifted_in_place`] and [`sum_exp_shifted`] vectorise: they
/// return the same bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Clamp so that the exponent arithmetic stays in range (NaN stays NaN).
    let xc = x.clamp(-88.0, X_MAX);
    // x = n ln2 + r, n integer, |r| <= ln2 / 2.
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI;
    let r = r - n * LN2_LO;
    // e^r = 1 + r + r^2 P(r) (Cephes' minimax coefficients for expf).
    let z = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, the same f32
    let y = p * z + r + 1.0;
    // 2^n as two factors, so that n = 128 (near the top) and subnormal
    // results (near the bottom) need no special case.
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let out = y * s1 * s2;
    let out = if x > X_MAX { f32::INFINITY } else { out };
    if x < X_MIN { 0.0 } else { out }
}

/// Run `$body` with the best vector extension the CPU has: the same source
/// compiled for AVX-512, for AVX2 or for the baseline target.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        #[inline]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { kernel($($arg),*) }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { kernel($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}

multiversion! {
    fn max_impl(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut blocks = xs.chunks_exact(LANES);
        for block in &mut blocks {
            for (a, &x) in acc.iter_mut().zip(block) {
                *a = if x > *a { x } else { *a };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &x in acc.iter().chain(blocks.remainder()) {
            m = if x > m { x } else { m };
        }
        m
    }
}

multiversion! {
    fn sum_impl(xs: &[f32]) -> f32 {
        let mut acc = [0.0_f32; LANES];
        let mut blocks = xs.chunks_exact(LANES);
        for block in &mut blocks {
            for (a, &x) in acc.iter_mut().zip(block) {
                *a += x;
            }
        }
        let mut tail = 0.0_f32;
        for &x in blocks.remainder() {
            tail += x;
        }
        fold(acc) + tail
    }
}

multiversion! {
    fn sum_exp_shifted_impl(xs: &[f32], shift: f32) -> f32 {
        let mut acc = [0.0_f32; LANES];
        let mut blocks = xs.chunks_exact(LANES);
        for block in &mut blocks {
            for (a, &x) in acc.iter_mut().zip(block) {
                *a += exp(x - shift);
            }
        }
        let mut tail = 0.0_f32;
        for &x in blocks.remainder() {
            tail += exp(x - shift);
        }
        fold(acc) + tail
    }
}

multiversion! {
    fn exp_shifted_in_place_and_sum_impl(xs: &mut [f32], shift: f32) -> f32 {
        // The lanes and order of `sum_exp_shifted_impl`: the same sum.
        let mut acc = [0.0_f32; LANES];
        let mut blocks = xs.chunks_exact_mut(LANES);
        for block in &mut blocks {
            for (a, x) in acc.iter_mut().zip(block) {
                *x = exp(*x - shift);
                *a += *x;
            }
        }
        let mut tail = 0.0_f32;
        for x in blocks.into_remainder() {
            *x = exp(*x - shift);
            tail += *x;
        }
        fold(acc) + tail
    }
}

multiversion! {
    fn exp_shifted_in_place_impl(xs: &mut [f32], shift: f32) {
        for x in xs.iter_mut() {
            *x = exp(*x - shift);
        }
    }
}

multiversion! {
    fn scale_in_place_impl(xs: &mut [f32], factor: f32) {
        for x in xs.iter_mut() {
            *x *= factor;
        }
    }
}

multiversion! {
    fn add_in_place_impl(xs: &mut [f32], ys: &[f32]) {
        for (x, &y) in xs.iter_mut().zip(ys) {
            *x += y;
        }
    }
}

/// The lanes' partial sums, pairwise, in a fixed order.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The largest element (`-inf` for an empty slice; NaNs are skipped).
pub fn max(xs: &[f32]) -> f32 {
    max_impl(xs)
}

/// The sum of the elements, in [`LANES`] lane-wise partial sums.
pub fn sum(xs: &[f32]) -> f32 {
    sum_impl(xs)
}

/// `sum_i exp(xs[i] - shift)` with the vectorised [`exp`], without writing.
pub fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
    sum_exp_shifted_impl(xs, shift)
}

/// `xs[i] = exp(xs[i] - shift)` with the vectorised [`exp`]: bit-identical
/// to calling [`exp`] on each element.
pub fn exp_shifted_in_place(xs: &mut [f32], shift: f32) {
    exp_shifted_in_place_impl(xs, shift)
}

/// `xs[i] = exp(xs[i] - shift)` in place, returning their sum: equal to
/// [`sum_exp_shifted`] bit for bit, in one pass.
pub fn exp_shifted_in_place_and_sum(xs: &mut [f32], shift: f32) -> f32 {
    exp_shifted_in_place_and_sum_impl(xs, shift)
}

/// `xs[i] *= factor`.
pub fn scale_in_place(xs: &mut [f32], factor: f32) {
    scale_in_place_impl(xs, factor)
}

/// `xs[i] += ys[i]` (element-wise, one rounding each).
///
/// # Panics
///
/// If the lengths differ.
pub fn add_in_place(xs: &mut [f32], ys: &[f32]) {
    assert_eq!(xs.len(), ys.len(), "add_in_place: lengths differ");
    add_in_place_impl(xs, ys)
}
