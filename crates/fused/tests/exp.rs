//! The vectorised `exp` against `f64::exp`, and its vector forms against its
//! scalar form, bit for bit.

use mics_fused::math;

/// Relative error of every input of a dense grid, through the slice kernel
/// (the vectorised path), checked bit-equal to the scalar kernel.
fn worst_on_grid(lo: f32, hi: f32, n: usize) -> f64 {
    let xs: Vec<f32> = (0..=n)
        .map(|i| lo + (hi - lo) * (i as f64 / n as f64) as f32)
        .collect();
    let mut ys = xs.clone();
    math::exp_shifted_in_place(&mut ys, 0.0);
    let mut worst = 0.0_f64;
    for (&x, &y) in xs.iter().zip(&ys) {
        assert_eq!(y.to_bits(), math::exp(x).to_bits(), "exp({x})");
        let want = (x as f64).exp();
        worst = worst.max(((y as f64 - want) / want).abs());
    }
    worst
}

#[test]
fn exp_is_accurate_on_a_dense_grid() {
    let neg = worst_on_grid(-87.0, 0.0, 4_000_000);
    let pos = worst_on_grid(0.0, 88.7, 1_000_000);
    let small = worst_on_grid(-1.0, 1.0, 1_000_000);
    println!(
        "exp: worst relative error {neg:.3e} on [-87, 0], {pos:.3e} on [0, 88.7], {small:.3e} on [-1, 1]"
    );
    // 1 ulp of f32 is 2^-23 = 1.19e-7 relative at most.
    assert!(neg <= 1.0e-7, "{neg:e}");
    assert!(pos <= 1.0e-7, "{pos:e}");
    assert!(small <= 1.0e-7, "{small:e}");
}

/// Every `f32` in a few stretches of the range (200 000 consecutive floats
/// from each start towards zero), through the scalar kernel.
#[test]
fn exp_is_accurate_on_every_float_near_key_points() {
    let mut worst = 0.0_f64;
    for start in [-87.33_f32, -60.0, -10.0, -0.5, -1e-3, 0.3466, 1.0, 88.72] {
        let mut x = start;
        for _ in 0..200_000 {
            x = f32::from_bits(x.to_bits() - 1);
            let want = (x as f64).exp();
            worst = worst.max(((math::exp(x) as f64 - want) / want).abs());
        }
    }
    println!("exp: worst relative error {worst:.3e} on every float near the key points");
    assert!(worst <= 1.0e-7, "{worst:e}");
}

#[test]
fn exp_special_values() {
    for x in [
        -87.34_f32,
        -87.5,
        -88.0,
        -100.0,
        -1e30,
        f32::MIN,
        f32::NEG_INFINITY,
    ] {
        assert_eq!(math::exp(x).to_bits(), 0.0_f32.to_bits(), "exp({x})");
    }
    assert_eq!(math::exp(0.0), 1.0);
    assert!(math::exp(f32::NAN).is_nan());
    assert_eq!(math::exp(88.73), f32::INFINITY);
    assert_eq!(math::exp(f32::INFINITY), f32::INFINITY);
    assert!(math::exp(88.72).is_finite());
    // Subnormal results just above the flush threshold are still right.
    let x = -87.3_f32;
    let want = (x as f64).exp();
    assert!(((math::exp(x) as f64 - want) / want).abs() < 1e-6);
    // In a slice, with lengths around the lane count.
    for len in [0, 1, 15, 16, 17, 33, 1003] {
        let xs: Vec<f32> = (0..len).map(|i| -200.0 + i as f32 * 0.37).collect();
        let mut ys = xs.clone();
        math::exp_shifted_in_place(&mut ys, -1.5);
        for (x, y) in xs.iter().zip(&ys) {
            assert_eq!(y.to_bits(), math::exp(x + 1.5).to_bits());
        }
    }
}

#[test]
fn reductions_are_lane_sums_in_a_fixed_order() {
    let xs: Vec<f32> = (0..1003)
        .map(|i| ((i * 37 % 101) as f32) * 0.01 - 0.5)
        .collect();
    let max = math::max(&xs);
    assert_eq!(max, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum = math::sum_exp_shifted(&xs, max);
    let want: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    assert!(((sum as f64 - want) / want).abs() < 1e-6);
    let mut ys = xs.clone();
    math::exp_shifted_in_place(&mut ys, max);
    // The same partial sums, whether the exponentials are stored or not.
    assert_eq!(math::sum(&ys).to_bits(), sum.to_bits());
    // Independent of the slice's alignment: the same values at another
    // address give the same bits.
    let mut shifted = vec![0.0_f32; 1];
    shifted.extend_from_slice(&ys);
    assert_eq!(math::sum(&shifted[1..]).to_bits(), sum.to_bits());
    assert_eq!(math::max(&[]), f32::NEG_INFINITY);
    assert_eq!(math::sum(&[]), 0.0);
}
