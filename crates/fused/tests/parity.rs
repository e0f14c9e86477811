//! The fused op against the unfused path (Burn's matmul, `log_softmax`,
//! gather, weighted sum, gradients by autodiff): the NdArray fast path, the
//! generic implementation and the `Autodiff` op.

/// The autodiff reference backend (and the autodiff backend the fused op
/// is checked on).
// Plain: plain Burn, an autodiff backend under Burn's distributed autodiff too.
type Ref = Autodiff<mics_plain::Plain<NdArray>>;

mod common;

use std::sync::Mutex;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use common::{Cpu, Output, Problem, rel_err, unfused, values};
use mics_fused::{
    CrossEntropyOptions, FusedCrossEntropyBackend, IGNORE_INDEX, generic, linear_cross_entropy,
};

const TOL: f64 = 1e-5;

/// The worst relative errors seen, by what was compared, for the report.
static WORST: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());

fn check(what: &str, got: &Output, want: &Output, factor: f32) {
    let scaled = |xs: &[f32]| xs.iter().map(|x| x * factor).collect::<Vec<_>>();
    let errs = [
        ("loss", rel_err(&[got.loss], &[want.loss])),
        (
            "grad_hidden",
            rel_err(&got.grad_hidden, &scaled(&want.grad_hidden)),
        ),
        (
            "grad_weight",
            rel_err(&got.grad_weight, &scaled(&want.grad_weight)),
        ),
    ];
    for (name, err) in errs {
        assert!(
            err <= TOL,
            "{what}: {name} relative error {err:e} > {TOL:e}"
        );
        let key = format!("{what} {name}");
        let mut worst = WORST.lock().unwrap();
        match worst.iter_mut().find(|(k, _)| *k == key) {
            Some((_, e)) => *e = e.max(err),
            None => worst.push((key, err)),
        }
    }
}

fn report() {
    for (k, e) in WORST.lock().unwrap().iter() {
        println!("worst relative error, {k}: {e:.3e}");
    }
}

/// `linear_cross_entropy` on an autodiff backend, gradients by `backward`.
fn fused_autodiff<A: AutodiffBackend + FusedCrossEntropyBackend>(
    p: &Problem,
    chunk: usize,
) -> Output {
    let device = Default::default();
    let hidden = p.hidden::<A>(&device).require_grad();
    let weight = p.weight::<A>(&device).require_grad();
    let options = CrossEntropyOptions::default().with_chunk_tokens(chunk);
    let loss = linear_cross_entropy(
        hidden.clone(),
        weight.clone(),
        p.targets::<A>(&device),
        p.token_weights::<A>(&device),
        &options,
    );
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    Output {
        loss: value,
        grad_hidden: values(hidden.grad(&grads).unwrap()),
        grad_weight: values(weight.grad(&grads).unwrap()),
    }
}

fn float<const D: usize>(t: Tensor<Cpu, D>) -> burn::tensor::ops::FloatTensor<Cpu> {
    t.into_primitive().tensor()
}

fn tensor<const D: usize>(t: burn::tensor::ops::FloatTensor<Cpu>) -> Tensor<Cpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The backend's own forward and backward methods, called directly, with an
/// upstream gradient `grad_output`; `generic` selects the generic free
/// functions instead of NdArray's override.
fn direct(p: &Problem, chunk: usize, grad_output: f32, use_generic: bool) -> Output {
    let d = Default::default();
    let args = || {
        (
            float(p.hidden::<Cpu>(&d)),
            float(p.weight::<Cpu>(&d)),
            p.targets::<Cpu>(&d).into_primitive(),
            p.token_weights::<Cpu>(&d).map(float),
        )
    };
    let grad = float(Tensor::<Cpu, 1>::from_data(
        TensorData::new(vec![grad_output], [1]),
        &d,
    ));
    let (h, w, t, tw) = args();
    let loss = if use_generic {
        generic::fused_linear_cross_entropy::<Cpu>(h, w, t, tw, chunk)
    } else {
        Cpu::fused_linear_cross_entropy(h, w, t, tw, chunk)
    };
    let (h, w, t, tw) = args();
    let (gh, gw) = if use_generic {
        generic::fused_linear_cross_entropy_backward::<Cpu>(h, w, t, tw, chunk, grad)
    } else {
        Cpu::fused_linear_cross_entropy_backward(h, w, t, tw, chunk, grad)
    };
    let loss = tensor::<1>(loss);
    assert_eq!(loss.dims(), [1]);
    Output {
        loss: values(loss)[0],
        grad_hidden: values(tensor::<2>(gh)),
        grad_weight: values(tensor::<2>(gw)),
    }
}

/// (t, h, v, chunk, ignored fraction, weighted, logit scale)
const CASES: &[(usize, usize, usize, usize, f64, bool, f32)] = &[
    (37, 16, 1003, 8, 0.2, true, 3.0),
    (37, 16, 1003, 1, 0.2, false, 3.0),
    (37, 16, 1003, 64, 0.0, true, 3.0),
    (37, 16, 1003, 37, 0.1, true, 3.0),
    (37, 16, 17, 8, 0.3, true, 3.0),
    (37, 16, 17, 5, 0.0, false, 12.0),
    (5, 7, 3, 2, 0.0, false, 1.0),
    (64, 32, 1003, 16, 0.5, true, 6.0),
    (130, 24, 2049, 48, 0.1, true, 4.0),
];

#[test]
fn fused_matches_unfused() {
    for (i, &(t, h, v, chunk, ignored, weighted, scale)) in CASES.iter().enumerate() {
        let p = Problem::random(i as u64, t, h, v, ignored, weighted, scale);
        let want = unfused::<Ref>(&p);
        let case = format!("case {i} (T={t} H={h} V={v} chunk={chunk})");
        check(
            &format!("autodiff {case}"),
            &fused_autodiff::<Ref>(&p, chunk),
            &want,
            1.0,
        );
        check(
            &format!("ndarray {case}"),
            &direct(&p, chunk, 0.37, false),
            &want,
            0.37,
        );
        check(
            &format!("generic {case}"),
            &direct(&p, chunk, 0.37, true),
            &want,
            0.37,
        );
    }
    // Summed over the cases, by path.
    let worst = WORST.lock().unwrap().clone();
    let mut by_path: Vec<(String, f64)> = Vec::new();
    for (k, e) in worst {
        let path =
            k.split(" case").next().unwrap().to_string() + " " + k.rsplit(' ').next().unwrap();
        match by_path.iter_mut().find(|(p, _)| *p == path) {
            Some((_, w)) => *w = w.max(e),
            None => by_path.push((path, e)),
        }
    }
    for (k, e) in by_path {
        println!("worst relative error over the cases, {k}: {e:.3e}");
    }
    if std::env::var_os("FUSED_REPORT_ALL").is_some() {
        report();
    }
}

#[test]
fn gradients_flow_to_tracked_inputs_only() {
    let p = Problem::random(7, 19, 8, 101, 0.2, true, 3.0);
    let want = unfused::<Ref>(&p);
    let device = Default::default();
    let options = CrossEntropyOptions::default().with_chunk_tokens(4);
    for (track_hidden, track_weight) in [(true, false), (false, true), (false, false)] {
        let mut hidden = p.hidden::<Ref>(&device);
        let mut weight = p.weight::<Ref>(&device);
        if track_hidden {
            hidden = hidden.require_grad();
        }
        if track_weight {
            weight = weight.require_grad();
        }
        let loss = linear_cross_entropy(
            hidden.clone(),
            weight.clone(),
            p.targets::<Ref>(&device),
            p.token_weights::<Ref>(&device),
            &options,
        );
        assert!(rel_err(&values(loss.clone()), &[want.loss]) <= TOL);
        if !track_hidden && !track_weight {
            continue;
        }
        let grads = loss.backward();
        assert_eq!(hidden.grad(&grads).is_some(), track_hidden);
        assert_eq!(weight.grad(&grads).is_some(), track_weight);
        if track_hidden {
            let g = values(hidden.grad(&grads).unwrap());
            assert!(rel_err(&g, &want.grad_hidden) <= TOL);
        }
        if track_weight {
            let g = values(weight.grad(&grads).unwrap());
            assert!(rel_err(&g, &want.grad_weight) <= TOL);
        }
    }
}

/// The op inside a larger graph: the upstream gradient scales its
/// gradients, and gradients from another use of `weight` add up.
#[test]
fn upstream_gradient_and_shared_weight() {
    let p = Problem::random(11, 23, 12, 97, 0.1, false, 3.0);
    let device = Default::default();
    let run = |fused: bool| {
        let hidden = p.hidden::<Ref>(&device).require_grad();
        let weight = p.weight::<Ref>(&device).require_grad();
        let loss = if fused {
            linear_cross_entropy(
                hidden.clone(),
                weight.clone(),
                p.targets::<Ref>(&device),
                None,
                &CrossEntropyOptions::default().with_chunk_tokens(6),
            )
        } else {
            let q = Problem {
                weights: None,
                ..p.clone()
            };
            // The unfused loss on the same tensors (as `unfused`, inline).
            let logp = burn::tensor::activation::log_softmax(
                hidden.clone().matmul(weight.clone().transpose()),
                1,
            );
            let safe: Vec<i64> = q
                .targets
                .iter()
                .map(|&x| if x == IGNORE_INDEX { 0 } else { x })
                .collect();
            let mask: Vec<f32> = q
                .targets
                .iter()
                .map(|&x| if x == IGNORE_INDEX { 0.0 } else { 1.0 })
                .collect();
            let picked = logp
                .gather(
                    1,
                    Tensor::from_data(TensorData::new(safe, [q.t, 1]), &device),
                )
                .reshape([q.t]);
            (picked.neg() * Tensor::from_data(TensorData::new(mask, [q.t]), &device)).sum()
        };
        // Another use of the weight (a tied embedding) and a scaled loss.
        let total = loss * 0.25 + weight.clone().powi_scalar(2).sum() * 0.5;
        let grads = total.backward();
        (
            values(hidden.grad(&grads).unwrap()),
            values(weight.grad(&grads).unwrap()),
        )
    };
    let (fh, fw) = run(true);
    let (uh, uw) = run(false);
    assert!(rel_err(&fh, &uh) <= TOL, "{:e}", rel_err(&fh, &uh));
    assert!(rel_err(&fw, &uw) <= TOL, "{:e}", rel_err(&fw, &uw));
}

#[test]
fn all_ignored_is_zero() {
    let mut p = Problem::random(3, 9, 4, 13, 0.0, true, 2.0);
    p.targets = vec![IGNORE_INDEX; p.t];
    for use_generic in [false, true] {
        let out = direct(&p, 4, 1.0, use_generic);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_hidden.iter().all(|&x| x == 0.0));
        assert!(out.grad_weight.iter().all(|&x| x == 0.0));
    }
    let out = fused_autodiff::<Ref>(&p, 4);
    assert_eq!(out.loss, 0.0);
}

#[test]
fn zero_tokens() {
    let p = Problem {
        t: 0,
        h: 4,
        v: 5,
        hidden: vec![],
        weight: vec![0.5; 20],
        targets: vec![],
        weights: None,
    };
    for use_generic in [false, true] {
        let out = direct(&p, 4, 1.0, use_generic);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_hidden.is_empty());
        assert!(out.grad_weight.iter().all(|&x| x == 0.0));
    }
}

#[test]
#[should_panic(expected = "chunk_tokens must be at least 1")]
fn zero_chunk_panics() {
    let p = Problem::random(1, 4, 4, 5, 0.0, false, 1.0);
    let d = Default::default();
    let _ = linear_cross_entropy(
        p.hidden::<Cpu>(&d),
        p.weight::<Cpu>(&d),
        p.targets::<Cpu>(&d),
        None,
        &CrossEntropyOptions::default().with_chunk_tokens(0),
    );
}

#[test]
#[should_panic(expected = "outside the vocabulary")]
fn target_out_of_range_panics_on_ndarray() {
    let mut p = Problem::random(1, 4, 4, 5, 0.0, false, 1.0);
    p.targets[2] = 5;
    let d = Default::default();
    let _ = linear_cross_entropy(
        p.hidden::<Cpu>(&d),
        p.weight::<Cpu>(&d),
        p.targets::<Cpu>(&d),
        None,
        &CrossEntropyOptions::default(),
    );
}

/// Weight as a transposed view of a `[H, V]` tensor (Burn's `Linear`
/// layout), hidden as a slice: any strides.
#[test]
fn strided_inputs() {
    let p = Problem::random(5, 21, 10, 211, 0.1, true, 3.0);
    let want = unfused::<Ref>(&p);
    let d = Default::default();
    let weight_t = p.weight::<Cpu>(&d).transpose().into_data();
    let weight = Tensor::<Cpu, 2>::from_data(weight_t, &d).transpose();
    let padded = Tensor::cat(vec![p.hidden::<Cpu>(&d), p.hidden::<Cpu>(&d)], 1);
    let hidden = padded.slice([0..p.t, 0..p.h]);
    let loss = linear_cross_entropy(
        hidden,
        weight,
        p.targets::<Cpu>(&d),
        p.token_weights::<Cpu>(&d),
        &CrossEntropyOptions::default().with_chunk_tokens(4),
    );
    assert!(rel_err(&values(loss), &[want.loss]) <= TOL);
}
