//! The NdArray fast path is bit-identical from run to run, whatever the
//! threads do meanwhile, with and without a bias.

mod common;

use common::{Output, Problem, bits};
use mics_fused::{WantedGrads, cpu};
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

/// The one-pass loss and gradients (what `Autodiff<NdArray>` trains with)
/// are the forward pass's loss and the backward pass's gradients at an
/// upstream gradient of 1, bit for bit, for every subset of wanted
/// gradients; an unwanted gradient is not computed.
#[test]
fn gradients_with_the_loss_equal_forward_then_backward() {
    for (seed, with_bias, chunk) in [(44, false, 64), (45, true, 7), (46, true, 300)] {
        let mut p = Problem::random(seed, 130, 24, 2049, 0.2, true, 4.0);
        if with_bias {
            p = p.with_bias(seed, 4.0);
        }
        let hidden = ArrayView2::from_shape((p.t, p.h), &p.hidden).unwrap();
        let weight = ArrayView2::from_shape((p.v, p.h), &p.weight).unwrap();
        let bias = p.bias.as_deref().map(ArrayView1::from);
        let weights = p.weights.as_deref().map(ArrayView1::from);
        let loss = cpu::forward(hidden, weight, bias, &p.targets, weights, chunk);
        let (gh, gw, gb) = cpu::backward(hidden, weight, bias, &p.targets, weights, chunk, 1.0);
        for mask in 0..8_u32 {
            let wanted = WantedGrads {
                hidden: mask & 1 != 0,
                weight: mask & 2 != 0,
                bias: mask & 4 != 0,
            };
            let (l, h, w, b) =
                cpu::forward_with_grads(hidden, weight, bias, &p.targets, weights, chunk, wanted);
            let case = format!("seed {seed}, {wanted:?}");
            assert_eq!(l.to_bits(), loss.to_bits(), "{case}: loss");
            assert_eq!(h.is_some(), wanted.hidden, "{case}");
            assert_eq!(w.is_some(), wanted.weight, "{case}");
            assert_eq!(b.is_some(), wanted.bias && with_bias, "{case}");
            if let Some(h) = h {
                assert!(
                    bits(h.as_slice().unwrap()) == bits(gh.as_slice().unwrap()),
                    "{case}"
                );
            }
            if let Some(w) = w {
                assert!(
                    bits(w.as_slice().unwrap()) == bits(gw.as_slice().unwrap()),
                    "{case}"
                );
            }
            if let (Some(b), Some(gb)) = (b, &gb) {
                assert!(
                    bits(b.as_slice().unwrap()) == bits(gb.as_slice().unwrap()),
                    "{case}"
                );
            }
        }
    }
}

/// The same bits whatever the number of threads: the GEMMs and the rows
/// run on the current Rayon pool, and ranks that share the cores run in
/// pools of 1 or a few threads (`mics_train::cores`).
#[test]
fn bit_identical_whatever_the_thread_count() {
    let p = Problem::random(47, 300, 64, 5003, 0.1, true, 4.0).with_bias(47, 4.0);
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| run(&p, 64))
    };
    let one = on(1);
    for threads in [2, 3, 4] {
        assert_identical(&one, &on(threads));
    }
}
