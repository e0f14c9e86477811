//! The NdArray fast path is bit-identical from run to run, whatever the
//! threads do meanwhile, with and without a bias.

mod common;

use common::{Output, Problem, bits};
use mics_fused::cpu;
use ndarray::{ArrayView1, ArrayView2};

fn run(p: &Problem, chunk: usize) -> Output {
    let hidden = ArrayView2::from_shape((p.t, p.h), &p.hidden).unwrap();
    let weight = ArrayView2::from_shape((p.v, p.h), &p.weight).unwrap();
    let bias = p.bias.as_deref().map(ArrayView1::from);
    let weights = p.weights.as_deref().map(ArrayView1::from);
    let loss = cpu::forward(hidden, weight, bias, &p.targets, weights, chunk);
    let (gh, gw, gb) = cpu::backward(hidden, weight, bias, &p.targets, weights, chunk, 0.5);
    Output {
        loss,
        grad_hidden: gh.into_raw_vec_and_offset().0,
        grad_weight: gw.into_raw_vec_and_offset().0,
        grad_bias: gb.map(|gb| gb.into_raw_vec_and_offset().0),
    }
}

fn assert_identical(a: &Output, b: &Output) {
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert!(bits(&a.grad_hidden) == bits(&b.grad_hidden));
    assert!(bits(&a.grad_weight) == bits(&b.grad_weight));
    assert_eq!(a.grad_bias.is_some(), b.grad_bias.is_some());
    if let (Some(x), Some(y)) = (&a.grad_bias, &b.grad_bias) {
        assert!(bits(x) == bits(y));
    }
}

fn bit_identical(p: &Problem) {
    let first = run(p, 64);
    let second = run(p, 64);
    assert_identical(&first, &second);
    // Several runs at once: the GEMM, row and bias-column threads
    // interleave differently.
    let outs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| run(p, 64))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &outs {
        assert_identical(&first, out);
    }
}

#[test]
fn bit_identical_across_runs_and_thread_timings() {
    bit_identical(&Problem::random(42, 300, 64, 5003, 0.1, true, 4.0));
}

#[test]
fn bit_identical_with_bias() {
    let p = Problem::random(43, 300, 64, 5003, 0.1, true, 4.0).with_bias(43, 4.0);
    bit_identical(&p);
    // The bias is really used: its gradient is not zero.
    let out = run(&p, 64);
    assert!(out.grad_bias.unwrap().iter().any(|&x| x != 0.0));
}
