//! The fused op against the unfused path (Burn's matmul, bias, `log_softmax`,
//! gather, weighted sum, gradients by autodiff): the NdArray fast path, the
//! generic implementation and the `Autodiff` op, with and without a bias.

/// The autodiff reference backend (and the autodiff backend the fused op
/// is checked on).
// Plain: plain Burn, an autodiff backend under Burn's distributed autodiff too.
type Ref = Autodiff<mics_plain::Plain<NdArray>>;

mod common;

use std::sync::Mutex;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use common::{Cpu, Output, Problem, rel_err, unfused, values};
use mics_fused::{
    CrossEntropyOptions, FusedCrossEntropyBackend, IGNORE_INDEX, cpu, generic, linear_cross_entropy,
};
use ndarray::{ArrayView1, ArrayView2, ShapeBuilder};

const TOL: f64 = 1e-5;

/// The worst relative errors seen, by what was compared, for the report.
static WORST: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());

/// Asserts that `got` is within `TOL` of `want` (its gradients times
/// `factor`); returns the relative errors by what was compared.
fn compare(what: &str, got: &Output, want: &Output, factor: f32) -> Vec<(&'static str, f64)> {
    let scaled = |xs: &[f32]| xs.iter().map(|x| x * factor).collect::<Vec<_>>();
    assert_eq!(
        got.grad_bias.is_some(),
        want.grad_bias.is_some(),
        "{what}: a bias gradient exactly when there is a bias"
    );
    let mut errs = vec![
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
    if let (Some(g), Some(w)) = (&got.grad_bias, &want.grad_bias) {
        errs.push(("grad_bias", rel_err(g, &scaled(w))));
    }
    for &(name, err) in &errs {
        assert!(
            err <= TOL,
            "{what}: {name} relative error {err:e} > {TOL:e}"
        );
    }
    errs
}

/// [`compare`], recording the errors for the report.
fn check(what: &str, got: &Output, want: &Output, factor: f32) {
    for (name, err) in compare(what, got, want, factor) {
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
    fused_autodiff_in::<A>(p, chunk, DType::F32)
}

/// [`fused_autodiff`] with the inputs in `dtype`.
fn fused_autodiff_in<A: AutodiffBackend + FusedCrossEntropyBackend>(
    p: &Problem,
    chunk: usize,
    dtype: DType,
) -> Output {
    let device = Default::default();
    let hidden = p.hidden::<A>(&device).cast(dtype).require_grad();
    let weight = p.weight::<A>(&device).cast(dtype).require_grad();
    let bias = p.bias::<A>(&device).map(|b| b.cast(dtype).require_grad());
    let options = CrossEntropyOptions::default().with_chunk_tokens(chunk);
    let loss = linear_cross_entropy(
        hidden.clone(),
        weight.clone(),
        bias.clone(),
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
        grad_bias: bias.map(|b| values(b.grad(&grads).unwrap())),
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
            p.bias::<Cpu>(&d).map(float),
            p.targets::<Cpu>(&d).into_primitive(),
            p.token_weights::<Cpu>(&d).map(float),
        )
    };
    let grad = float(Tensor::<Cpu, 1>::from_data(
        TensorData::new(vec![grad_output], [1]),
        &d,
    ));
    let (h, w, b, t, tw) = args();
    let loss = if use_generic {
        generic::fused_linear_cross_entropy::<Cpu>(h, w, b, t, tw, chunk)
    } else {
        Cpu::fused_linear_cross_entropy(h, w, b, t, tw, chunk)
    };
    let (h, w, b, t, tw) = args();
    let (gh, gw, gb) = if use_generic {
        generic::fused_linear_cross_entropy_backward::<Cpu>(h, w, b, t, tw, chunk, grad)
    } else {
        Cpu::fused_linear_cross_entropy_backward(h, w, b, t, tw, chunk, grad)
    };
    assert_eq!(gb.is_some(), p.bias.is_some());
    let loss = tensor::<1>(loss);
    assert_eq!(loss.dims(), [1]);
    Output {
        loss: values(loss)[0],
        grad_hidden: values(tensor::<2>(gh)),
        grad_weight: values(tensor::<2>(gw)),
        grad_bias: gb.map(|gb| values(tensor::<1>(gb))),
    }
}

/// (t, h, v, chunk, ignored fraction, weighted, logit scale); every case
/// runs without and with a bias. V is never a multiple of the vector width
/// (16), and 2049 spans three blocks of `d bias` columns.
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
        for with_bias in [false, true] {
            let mut p = Problem::random(i as u64, t, h, v, ignored, weighted, scale);
            if with_bias {
                p = p.with_bias(i as u64, scale);
            }
            let want = unfused::<Ref>(&p);
            let label = if with_bias { "bias" } else { "no-bias" };
            let case = format!("{label} case {i} (T={t} H={h} V={v} chunk={chunk})");
            check(
                &format!("autodiff {case}"),
                &fused_autodiff::<Ref>(&p, chunk),
                &want,
                1.0,
            );
            // In f64 `fused_grads_with_loss` is false: the autodiff op keeps
            // its inputs and its backward step recomputes the logits.
            check(
                &format!("autodiff-recompute {case}"),
                &fused_autodiff_in::<Ref>(&p, chunk, DType::F64),
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

/// Every subset of `hidden`, `weight` (and `bias`, with one) tracked.
#[test]
fn gradients_flow_to_tracked_inputs_only() {
    let device = Default::default();
    let options = CrossEntropyOptions::default().with_chunk_tokens(4);
    for with_bias in [false, true] {
        let mut p = Problem::random(7, 19, 8, 101, 0.2, true, 3.0);
        if with_bias {
            p = p.with_bias(7, 3.0);
        }
        let want = unfused::<Ref>(&p);
        for mask in 0..8_u32 {
            let (track_hidden, track_weight, track_bias) =
                (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
            if track_bias && !with_bias {
                continue;
            }
            let mut hidden = p.hidden::<Ref>(&device);
            let mut weight = p.weight::<Ref>(&device);
            let mut bias = p.bias::<Ref>(&device);
            if track_hidden {
                hidden = hidden.require_grad();
            }
            if track_weight {
                weight = weight.require_grad();
            }
            if track_bias {
                bias = bias.map(|b| b.require_grad());
            }
            let loss = linear_cross_entropy(
                hidden.clone(),
                weight.clone(),
                bias.clone(),
                p.targets::<Ref>(&device),
                p.token_weights::<Ref>(&device),
                &options,
            );
            assert!(rel_err(&values(loss.clone()), &[want.loss]) <= TOL);
            if mask == 0 {
                continue;
            }
            let grads = loss.backward();
            assert_eq!(hidden.grad(&grads).is_some(), track_hidden);
            assert_eq!(weight.grad(&grads).is_some(), track_weight);
            if let Some(b) = &bias {
                assert_eq!(b.grad(&grads).is_some(), track_bias);
            }
            if track_hidden {
                let g = values(hidden.grad(&grads).unwrap());
                assert!(rel_err(&g, &want.grad_hidden) <= TOL, "mask {mask}");
            }
            if track_weight {
                let g = values(weight.grad(&grads).unwrap());
                assert!(rel_err(&g, &want.grad_weight) <= TOL, "mask {mask}");
            }
            if track_bias {
                let g = values(bias.unwrap().grad(&grads).unwrap());
                let w = want.grad_bias.as_ref().unwrap();
                assert!(rel_err(&g, w) <= TOL, "mask {mask}");
            }
        }
    }
}

/// The op inside a larger graph: the upstream gradient scales its
/// gradients, and gradients from other uses of `weight` and `bias` add up.
#[test]
fn upstream_gradient_and_shared_weight() {
    let p = Problem::random(11, 23, 12, 97, 0.1, false, 3.0).with_bias(11, 2.0);
    let device = Default::default();
    let run = |fused: bool| {
        let hidden = p.hidden::<Ref>(&device).require_grad();
        let weight = p.weight::<Ref>(&device).require_grad();
        let bias = p.bias::<Ref>(&device).unwrap().require_grad();
        let loss = if fused {
            linear_cross_entropy(
                hidden.clone(),
                weight.clone(),
                Some(bias.clone()),
                p.targets::<Ref>(&device),
                None,
                &CrossEntropyOptions::default().with_chunk_tokens(6),
            )
        } else {
            // The unfused loss on the same tensors (as `unfused`, inline).
            let logits = hidden.clone().matmul(weight.clone().transpose())
                + bias.clone().unsqueeze_dim::<2>(0);
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            let safe: Vec<i64> = p
                .targets
                .iter()
                .map(|&x| if x == IGNORE_INDEX { 0 } else { x })
                .collect();
            let mask: Vec<f32> = p
                .targets
                .iter()
                .map(|&x| if x == IGNORE_INDEX { 0.0 } else { 1.0 })
                .collect();
            let picked = logp
                .gather(
                    1,
                    Tensor::from_data(TensorData::new(safe, [p.t, 1]), &device),
                )
                .reshape([p.t]);
            (picked.neg() * Tensor::from_data(TensorData::new(mask, [p.t]), &device)).sum()
        };
        // Other uses of the weight (a tied embedding) and of the bias, and a
        // scaled loss.
        let total = loss * 0.25
            + weight.clone().powi_scalar(2).sum() * 0.5
            + bias.clone().powi_scalar(2).sum() * 0.125;
        let grads = total.backward();
        (
            values(hidden.grad(&grads).unwrap()),
            values(weight.grad(&grads).unwrap()),
            values(bias.grad(&grads).unwrap()),
        )
    };
    let (fh, fw, fb) = run(true);
    let (uh, uw, ub) = run(false);
    assert!(rel_err(&fh, &uh) <= TOL, "{:e}", rel_err(&fh, &uh));
    assert!(rel_err(&fw, &uw) <= TOL, "{:e}", rel_err(&fw, &uw));
    assert!(rel_err(&fb, &ub) <= TOL, "{:e}", rel_err(&fb, &ub));
}

#[test]
fn all_ignored_is_zero() {
    let mut p = Problem::random(3, 9, 4, 13, 0.0, true, 2.0).with_bias(3, 2.0);
    p.targets = vec![IGNORE_INDEX; p.t];
    for use_generic in [false, true] {
        let out = direct(&p, 4, 1.0, use_generic);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_hidden.iter().all(|&x| x == 0.0));
        assert!(out.grad_weight.iter().all(|&x| x == 0.0));
        assert!(out.grad_bias.unwrap().iter().all(|&x| x == 0.0));
    }
    let out = fused_autodiff::<Ref>(&p, 4);
    assert_eq!(out.loss, 0.0);
    assert!(out.grad_bias.unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn zero_tokens() {
    let p = Problem {
        t: 0,
        h: 4,
        v: 5,
        hidden: vec![],
        weight: vec![0.5; 20],
        bias: Some(vec![0.25; 5]),
        targets: vec![],
        weights: None,
    };
    for use_generic in [false, true] {
        let out = direct(&p, 4, 1.0, use_generic);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_hidden.is_empty());
        assert!(out.grad_weight.iter().all(|&x| x == 0.0));
        assert_eq!(out.grad_bias, Some(vec![0.0; 5]));
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
        None,
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
        None,
        p.targets::<Cpu>(&d),
        None,
        &CrossEntropyOptions::default(),
    );
}

#[test]
#[should_panic(expected = "bias must be [V]")]
fn bias_of_wrong_length_panics() {
    let p = Problem::random(1, 4, 4, 5, 0.0, false, 1.0);
    let d = Default::default();
    let _ = linear_cross_entropy(
        p.hidden::<Cpu>(&d),
        p.weight::<Cpu>(&d),
        Some(Tensor::<Cpu, 1>::zeros([4], &d)),
        p.targets::<Cpu>(&d),
        None,
        &CrossEntropyOptions::default(),
    );
}

/// Weight as a transposed view of a `[H, V]` tensor (Burn's `Linear`
/// layout), hidden as a slice: any strides.
#[test]
fn strided_inputs() {
    let p = Problem::random(5, 21, 10, 211, 0.1, true, 3.0).with_bias(5, 3.0);
    let want = unfused::<Ref>(&p);
    let d = Default::default();
    let weight_t = p.weight::<Cpu>(&d).transpose().into_data();
    let weight = Tensor::<Cpu, 2>::from_data(weight_t, &d).transpose();
    let padded = Tensor::cat(vec![p.hidden::<Cpu>(&d), p.hidden::<Cpu>(&d)], 1);
    let hidden = padded.slice([0..p.t, 0..p.h]);
    let loss = linear_cross_entropy(
        hidden,
        weight,
        p.bias::<Cpu>(&d),
        p.targets::<Cpu>(&d),
        p.token_weights::<Cpu>(&d),
        &CrossEntropyOptions::default().with_chunk_tokens(4),
    );
    assert!(rel_err(&values(loss), &[want.loss]) <= TOL);
}

/// The host functions on views with any strides, the bias included (a
/// strided bias is copied once per call).
#[test]
fn strided_views_on_the_host_path() {
    let p = Problem::random(6, 21, 10, 211, 0.1, true, 3.0).with_bias(6, 3.0);
    let want = unfused::<Ref>(&p);
    // weight: a column-major view; bias: every other element of a buffer;
    // hidden: the first columns of a wider buffer.
    let mut weight_cm = vec![0.0_f32; p.v * p.h];
    for r in 0..p.v {
        for c in 0..p.h {
            weight_cm[c * p.v + r] = p.weight[r * p.h + c];
        }
    }
    let weight = ArrayView2::from_shape((p.v, p.h).f(), &weight_cm).unwrap();
    let bias_buf: Vec<f32> = p
        .bias
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|&b| [b, f32::NAN])
        .collect();
    let bias = ArrayView1::from_shape(p.v.strides(2), &bias_buf).unwrap();
    let hidden_buf: Vec<f32> = p
        .hidden
        .chunks(p.h)
        .flat_map(|row| row.iter().copied().chain([f32::NAN; 3]))
        .collect();
    let hidden = ArrayView2::from_shape((p.t, p.h).strides((p.h + 3, 1)), &hidden_buf).unwrap();
    let weights = p.weights.as_deref().map(ArrayView1::from);
    let loss = cpu::forward(hidden, weight, Some(bias), &p.targets, weights, 4);
    let (gh, gw, gb) = cpu::backward(hidden, weight, Some(bias), &p.targets, weights, 4, 1.0);
    let got = Output {
        loss,
        grad_hidden: gh.iter().copied().collect(),
        grad_weight: gw.iter().copied().collect(),
        grad_bias: gb.map(|gb| gb.to_vec()),
    };
    compare("host strided", &got, &want, 1.0);
}
