//! The host path's single-precision matrix products, through the `gemm`
//! crate.
//!
//! `gemm` is 1.07 to 1.33 times `matrixmultiply` (NdArray's own matmul) on
//! the head's shapes on the AVX-512 CPU the project measures on
//! (docs/benchmarks.md), and it takes its threads from the current Rayon
//! pool, so ranks that share the cores (`mics_train::cores`) each use
//! their share. It splits a product's output among its threads and sums
//! each element over `k` in the same blocks whatever the thread count:
//! results do not depend on the threads (`tests/determinism.rs` checks
//! against a single-threaded run). It allocates its packing buffers per
//! call; the `mics` binary keeps freed memory mapped, so they cost no page
//! faults.

use ndarray::{ArrayView2, ArrayViewMut2};

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, on the
/// current Rayon pool's threads. Any strides.
///
/// # Panics
///
/// On shapes that do not chain: `lhs` `[m, k]`, `rhs` `[k, n]`, `dst`
/// `[m, n]`.
pub(crate) fn matmul_into(
    lhs: &ArrayView2<'_, f32>,
    rhs: &ArrayView2<'_, f32>,
    dst: &mut ArrayViewMut2<'_, f32>,
    accumulate: bool,
) {
    let (m, k) = lhs.dim();
    let (k2, n) = rhs.dim();
    assert_eq!(
        k, k2,
        "matmul_into: lhs is [{m}, {k}] but rhs is [{k2}, {n}]"
    );
    assert_eq!(
        dst.dim(),
        (m, n),
        "matmul_into: dst is {:?}, not [{m}, {n}]",
        dst.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let [lhs_rs, lhs_cs] = [lhs.strides()[0], lhs.strides()[1]];
    let [rhs_rs, rhs_cs] = [rhs.strides()[0], rhs.strides()[1]];
    let [dst_rs, dst_cs] = [dst.strides()[0], dst.strides()[1]];
    // SAFETY: the pointers and strides are those of live ndarray views of
    // the checked shapes, `dst` borrowed mutably (it aliases neither input);
    // `gemm` reads `m·k` and `k·n` elements and writes `m·n` through them.
    // `dst = alpha·dst + beta·lhs·rhs`, `dst` read only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}
