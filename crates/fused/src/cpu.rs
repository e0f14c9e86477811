//! The `NdArray` implementation: host code on the tensors' `f32` data.
//!
//! Per chunk of counted tokens (tokens whose target is [`IGNORE_INDEX`] or
//! whose weight is 0 are skipped, not masked): the chunk's hidden rows are
//! copied into a contiguous buffer, one GEMM (the `gemm` crate, `sgemm.rs`,
//! on the current Rayon pool) writes the `[chunk, V]` logits,
//! the bias (if any) is added to each row, and each row's maximum,
//! `sum exp(x - max)` and target logit give the loss ([`math`]'s vectorised
//! `exp`, rows in parallel). The backward pass recomputes the logits, turns
//! each row into `w_t g (softmax - onehot)` in place, two more GEMMs give the
//! chunk's rows of `d hidden` and add the chunk's share of `d weight`, and
//! the rows are added into `d bias`. The buffers are allocated once per call
//! (plus a copy of the bias when it is not contiguous).
//!
//! Deterministic: `gemm` splits the output among its threads (each
//! element is summed in the same order whatever the thread count), each row
//! is processed by one thread with lane-wise reductions ([`math`]), the
//! per-token losses are summed in token order, and each element of `d bias`
//! is summed by one thread, over the tokens in order.
//!
//! Tensors of another dtype than `f32` go to the [`generic`]
//! implementation.

use std::borrow::Cow;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, Int, Tensor, TensorPrimitive};
use burn_ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Ix1, Ix2};
use rayon::prelude::*;

use crate::{
    FusedCrossEntropyBackend, IGNORE_INDEX, LossAndGrads, WantedGrads, generic, math, sgemm,
};

/// A counted token: its row, its target and its weight.
#[derive(Debug, Clone, Copy)]
struct Token {
    row: usize,
    target: usize,
    weight: f32,
}

/// The counted tokens, in order; panics on a target outside `0..vocab`.
fn counted(targets: &[i64], weights: Option<ArrayView1<'_, f32>>, vocab: usize) -> Vec<Token> {
    if let Some(w) = &weights {
        assert_eq!(
            w.len(),
            targets.len(),
            "token_weights must have one weight per target"
        );
    }
    targets
        .iter()
        .enumerate()
        .filter_map(|(row, &target)| {
            if target == IGNORE_INDEX {
                return None;
            }
            assert!(
                (0..vocab as i64).contains(&target),
                "target {target} of token {row} is outside the vocabulary 0..{vocab} (and not IGNORE_INDEX = {IGNORE_INDEX})"
            );
            let weight = weights.as_ref().map_or(1.0, |w| w[row]);
            (weight != 0.0).then_some(Token {
                row,
                target: target as usize,
                weight,
            })
        })
        .collect()
}

fn check_shapes(
    hidden: &ArrayView2<'_, f32>,
    weight: &ArrayView2<'_, f32>,
    bias: Option<&ArrayView1<'_, f32>>,
    targets: &[i64],
) {
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            weight.nrows(),
            "bias has {} elements but weight is {:?} (bias must be [V])",
            b.len(),
            weight.dim()
        );
    }
    assert_eq!(
        hidden.ncols(),
        weight.ncols(),
        "hidden is {:?} but weight is {:?} (must be [V, H])",
        hidden.dim(),
        weight.dim()
    );
    assert_eq!(
        hidden.nrows(),
        targets.len(),
        "hidden has {} rows but there are {} targets",
        hidden.nrows(),
        targets.len()
    );
}

/// Copies the tokens' hidden rows into the first rows of `buf` (`[_, H]`).
fn gather_rows(hidden: &ArrayView2<'_, f32>, tokens: &[Token], buf: &mut [f32]) {
    let h = hidden.ncols();
    for (dst, token) in buf.chunks_exact_mut(h).zip(tokens) {
        for (d, &s) in dst.iter_mut().zip(hidden.row(token.row)) {
            *d = s;
        }
    }
}

/// The bias as a contiguous slice: borrowed, or copied if strided.
fn bias_slice<'a>(bias: Option<ArrayView1<'a, f32>>) -> Option<Cow<'a, [f32]>> {
    bias.map(|b| match b.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(b.to_vec()),
    })
}

/// Columns of `d bias` per task when summing a chunk's rows into it.
const BIAS_BLOCK: usize = 1024;

/// `out[v] += sum over the rows r of g[r, v]` (`g`: `[n, V]` row-major, `out`:
/// `[V]`), each element summed over the rows in order, blocks of columns in
/// parallel.
fn add_rows(g: &[f32], out: &mut [f32]) {
    let v = out.len();
    out.par_chunks_mut(BIAS_BLOCK)
        .enumerate()
        .for_each(|(i, out)| {
            let start = i * BIAS_BLOCK;
            for row in g.chunks_exact(v) {
                math::add_in_place(out, &row[start..start + out.len()]);
            }
        });
}

/// The logits of a chunk: `out[..n·V] = hidden rows · weightᵀ`.
fn chunk_logits(hrows: &ArrayView2<'_, f32>, weight: &ArrayView2<'_, f32>, out: &mut [f32]) {
    let (n, v) = (hrows.nrows(), weight.nrows());
    let mut logits = ArrayViewMut2::from_shape((n, v), &mut out[..n * v]).expect("chunk buffer");
    sgemm::matmul_into(hrows, &weight.t(), &mut logits, false);
}

/// What [`pass`] returns: the loss and the gradients it was asked for.
struct Pass {
    loss: f32,
    hidden: Option<Array2<f32>>,
    weight: Option<Array2<f32>>,
    bias: Option<Array1<f32>>,
}

/// One pass over the counted tokens, `chunk_tokens` at a time: the loss,
/// and the gradients in `wanted` times `grad_scale` (`d bias` only with a
/// bias). Without gradients a row's softmax is summed and not written; with
/// them each row becomes `w_t grad_scale (softmax - onehot)` in place and
/// feeds the gradient GEMMs. The loss is the same either way: `exp` and its
/// lane-wise sum run in the same order.
#[allow(clippy::too_many_arguments)]
fn pass(
    hidden: ArrayView2<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    targets: &[i64],
    token_weights: Option<ArrayView1<'_, f32>>,
    chunk_tokens: usize,
    grad_scale: f32,
    wanted: WantedGrads,
) -> Pass {
    assert!(chunk_tokens > 0, "chunk_tokens must be at least 1");
    check_shapes(&hidden, &weight, bias.as_ref(), targets);
    let (t, h, v) = (hidden.nrows(), hidden.ncols(), weight.nrows());
    let tokens = counted(targets, token_weights, v);
    let mut out = Pass {
        loss: 0.0,
        hidden: wanted.hidden.then(|| Array2::<f32>::zeros((t, h))),
        weight: wanted.weight.then(|| Array2::<f32>::zeros((v, h))),
        bias: (wanted.bias && bias.is_some()).then(|| Array1::<f32>::zeros(v)),
    };
    let grads = out.hidden.is_some() || out.weight.is_some() || out.bias.is_some();
    let chunk = chunk_tokens.min(tokens.len());
    if chunk == 0 {
        return out;
    }
    let bias = bias_slice(bias);
    let bias = bias.as_deref();
    let mut hbuf = vec![0.0_f32; chunk * h];
    let mut logits = vec![0.0_f32; chunk * v];
    let mut nll = vec![0.0_f64; chunk];
    let mut dh = out
        .hidden
        .as_ref()
        .map(|_| Array2::<f32>::zeros((chunk, h)));
    let mut total = 0.0_f64;
    for (i, block) in tokens.chunks(chunk).enumerate() {
        let n = block.len();
        gather_rows(&hidden, block, &mut hbuf);
        let hrows = ArrayView2::from_shape((n, h), &hbuf[..n * h]).expect("chunk buffer");
        chunk_logits(&hrows, &weight, &mut logits);
        logits[..n * v]
            .par_chunks_mut(v)
            .zip(block.par_iter())
            .zip(nll[..n].par_iter_mut())
            .for_each(|((row, token), out)| {
                if let Some(b) = bias {
                    math::add_in_place(row, b);
                }
                let max = math::max(row);
                let target = row[token.target];
                let sum = if grads {
                    math::exp_shifted_in_place_and_sum(row, max)
                } else {
                    math::sum_exp_shifted(row, max)
                };
                *out = (max as f64 - target as f64) + (sum as f64).ln();
                if grads {
                    // The row becomes w_t g (softmax - onehot(target)).
                    let scale = grad_scale * token.weight;
                    math::scale_in_place(row, scale / sum);
                    row[token.target] -= scale;
                }
            });
        for (token, &l) in block.iter().zip(&nll) {
            total += token.weight as f64 * l;
        }
        if !grads {
            continue;
        }
        let g = ArrayView2::from_shape((n, v), &logits[..n * v]).expect("chunk buffer");
        if let (Some(grad_hidden), Some(dh)) = (&mut out.hidden, &mut dh) {
            let mut dh = dh.slice_mut(ndarray::s![..n, ..]);
            sgemm::matmul_into(&g, &weight, &mut dh, false);
            for (token, row) in block.iter().zip(dh.rows()) {
                grad_hidden.row_mut(token.row).assign(&row);
            }
        }
        if let Some(grad_weight) = &mut out.weight {
            sgemm::matmul_into(&g.t(), &hrows, &mut grad_weight.view_mut(), i > 0);
        }
        if let Some(gb) = &mut out.bias {
            add_rows(&logits[..n * v], gb.as_slice_mut().expect("contiguous"));
        }
    }
    out.loss = total as f32;
    out
}

/// The loss: `sum_t w_t (logsumexp(z_t) - z_t[target_t])` with the logits
/// `z_t = h_t · Wᵀ + b`, over the counted tokens, `chunk_tokens` tokens at a
/// time.
///
/// `hidden`: `[T, H]`; `weight`: `[V, H]`; `bias`: `[V]`; `targets`: `T` ids
/// in `0..V` or [`IGNORE_INDEX`]; `token_weights`: `[T]`. Any strides.
///
/// # Panics
///
/// On mismatched shapes, `chunk_tokens == 0`, or a target outside `0..V`
/// other than [`IGNORE_INDEX`].
pub fn forward(
    hidden: ArrayView2<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    targets: &[i64],
    token_weights: Option<ArrayView1<'_, f32>>,
    chunk_tokens: usize,
) -> f32 {
    let none = WantedGrads::default();
    pass(
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens,
        1.0,
        none,
    )
    .loss
}

/// The gradients `(d hidden [T, H], d weight [V, H], d bias [V])` of
/// [`forward`]'s loss, times `grad_output`, recomputing each chunk's logits;
/// `d bias` is `Some` exactly when `bias` is. Rows of tokens that do not
/// count are zero in `d hidden`.
///
/// # Panics
///
/// As [`forward`].
pub fn backward(
    hidden: ArrayView2<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    targets: &[i64],
    token_weights: Option<ArrayView1<'_, f32>>,
    chunk_tokens: usize,
    grad_output: f32,
) -> (Array2<f32>, Array2<f32>, Option<Array1<f32>>) {
    let out = pass(
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens,
        grad_output,
        WantedGrads::ALL,
    );
    (
        out.hidden.expect("wanted"),
        out.weight.expect("wanted"),
        out.bias,
    )
}

/// [`forward`]'s loss and, in the same pass (one logits GEMM per chunk
/// instead of two), the gradients in `wanted` at an upstream gradient of 1:
/// `(loss, d hidden, d weight, d bias)`, each gradient `Some` exactly when
/// wanted (`d bias` also needs a bias). Equal to [`forward`] and
/// [`backward`] with `grad_output = 1`, bit for bit.
///
/// # Panics
///
/// As [`forward`].
#[allow(clippy::type_complexity)]
pub fn forward_with_grads(
    hidden: ArrayView2<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    targets: &[i64],
    token_weights: Option<ArrayView1<'_, f32>>,
    chunk_tokens: usize,
    wanted: WantedGrads,
) -> (
    f32,
    Option<Array2<f32>>,
    Option<Array2<f32>>,
    Option<Array1<f32>>,
) {
    let out = pass(
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens,
        1.0,
        wanted,
    );
    (out.loss, out.hidden, out.weight, out.bias)
}

fn view2(t: &NdArrayTensor) -> Option<ArrayView2<'_, f32>> {
    match t {
        NdArrayTensor::F32(s) => s.view().into_dimensionality::<Ix2>().ok(),
        _ => None,
    }
}

fn view1(t: &NdArrayTensor) -> Option<ArrayView1<'_, f32>> {
    match t {
        NdArrayTensor::F32(s) => s.view().into_dimensionality::<Ix1>().ok(),
        _ => None,
    }
}

fn host_targets<E, I, Q>(targets: IntTensor<NdArray<E, I, Q>>) -> Vec<i64>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    match &targets {
        NdArrayTensor::I64(s) => s.view().iter().copied().collect(),
        NdArrayTensor::I32(s) => s.view().iter().map(|&x| x as i64).collect(),
        _ => Tensor::<NdArray<E, I, Q>, 1, Int>::from_primitive(targets)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("converted to i64"),
    }
}

fn host_scalar<E, I, Q>(t: FloatTensor<NdArray<E, I, Q>>) -> f32
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    let values = Tensor::<NdArray<E, I, Q>, 1>::from_primitive(TensorPrimitive::Float(t))
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32");
    assert_eq!(values.len(), 1, "grad_output must have one element");
    values[0]
}

fn tensor<D: ndarray::Dimension>(array: ndarray::Array<f32, D>) -> NdArrayTensor {
    array.into_shared().into_dyn().into()
}

/// `f32` tensors take the host path; other dtypes the generic one.
impl<E, I, Q> FusedCrossEntropyBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        let b = bias.as_ref().map(view1);
        let weights = token_weights.as_ref().map(view1);
        if let (Some(h), Some(w), None | Some(Some(_)), None | Some(Some(_))) =
            (view2(&hidden), view2(&weight), b, weights)
        {
            let targets = host_targets::<E, I, Q>(targets);
            let loss = forward(h, w, b.flatten(), &targets, weights.flatten(), chunk_tokens);
            return SharedArray::<f32>::from_elem(ndarray::IxDyn(&[1]), loss).into();
        }
        generic::fused_linear_cross_entropy::<Self>(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
        )
    }

    fn fused_linear_cross_entropy_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        grad_output: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        let b = bias.as_ref().map(view1);
        let weights = token_weights.as_ref().map(view1);
        if let (Some(h), Some(w), None | Some(Some(_)), None | Some(Some(_))) =
            (view2(&hidden), view2(&weight), b, weights)
        {
            let targets = host_targets::<E, I, Q>(targets);
            let grad = host_scalar::<E, I, Q>(grad_output);
            let (gh, gw, gb) = backward(
                h,
                w,
                b.flatten(),
                &targets,
                weights.flatten(),
                chunk_tokens,
                grad,
            );
            return (tensor(gh), tensor(gw), gb.map(tensor));
        }
        generic::fused_linear_cross_entropy_backward::<Self>(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            grad_output,
        )
    }

    fn fused_grads_with_loss(dtype: FloatDType) -> bool {
        dtype == FloatDType::F32
    }

    fn fused_linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        wanted: WantedGrads,
    ) -> LossAndGrads<Self> {
        let b = bias.as_ref().map(view1);
        let weights = token_weights.as_ref().map(view1);
        if let (Some(h), Some(w), None | Some(Some(_)), None | Some(Some(_))) =
            (view2(&hidden), view2(&weight), b, weights)
        {
            let targets = host_targets::<E, I, Q>(targets);
            let (loss, gh, gw, gb) = forward_with_grads(
                h,
                w,
                b.flatten(),
                &targets,
                weights.flatten(),
                chunk_tokens,
                wanted,
            );
            return LossAndGrads {
                loss: SharedArray::<f32>::from_elem(ndarray::IxDyn(&[1]), loss).into(),
                hidden: gh.map(tensor),
                weight: gw.map(tensor),
                bias: gb.map(tensor),
            };
        }
        // Another dtype: the forward and backward passes.
        crate::forward_then_backward::<Self>(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            wanted,
        )
    }
}
