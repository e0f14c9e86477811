//! The generic implementation: Burn tensor ops, one chunk of tokens at a
//! time. Works on every backend; the trait's default methods call it, and
//! it is public so that tests can run it on any backend.
//!
//! Per chunk: the `[chunk, V]` logits by one matmul (plus the bias, broadcast
//! over the rows), their maximum, the max-subtracted exponentials and
//! log-sum-exp, the target logits by a gather; ignored tokens are masked by a
//! zero weight. The backward pass recomputes the chunk's logits, forms
//! `w_t g (softmax - onehot)`, multiplies it into the chunk's rows of
//! `d hidden` and into `d weight`, and adds its column sums to `d bias`.
//! No host read-back, so nothing waits on the device.
//!
//! The matmuls run in the inputs' dtype; the softmax, the loss and the sums
//! over chunks run in f32, as PyTorch's autocast does for cross-entropy: in
//! f16 the summed loss of a few thousand tokens overflows (65504), and the
//! exponentials' sum over a 50k vocabulary comes close. The loss is
//! returned in f32; the gradients in the inputs' dtype.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::IGNORE_INDEX;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Target ids with ignored ones replaced by 0 (a valid index), and each
/// token's weight (0 for ignored tokens), in `dtype`.
fn prepare<B: Backend>(
    targets: IntTensor<B>,
    token_weights: Option<FloatTensor<B>>,
    dtype: DType,
) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let ignored = targets.clone().equal_elem(IGNORE_INDEX);
    let safe = targets.mask_fill(ignored.clone(), 0);
    let mut weights = ignored.bool_not().float().cast(dtype);
    if let Some(w) = token_weights {
        weights = weights * float::<B, 1>(w).cast(dtype);
    }
    (safe, weights)
}

/// The bias as a `[1, V]` row, in `dtype`.
fn bias_row<B: Backend>(bias: Option<FloatTensor<B>>, dtype: DType) -> Option<Tensor<B, 2>> {
    bias.map(|b| float::<B, 1>(b).cast(dtype).unsqueeze_dim::<2>(0))
}

/// A chunk's logits: `h · weightᵀ (+ bias)`.
fn logits<B: Backend>(
    h: Tensor<B, 2>,
    weight_t: &Tensor<B, 2>,
    bias: &Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let logits = h.matmul(weight_t.clone());
    match bias {
        Some(b) => logits + b.clone(),
        None => logits,
    }
}

/// Chunks `[start, end)` of `0..tokens`.
fn chunks(tokens: usize, chunk_tokens: usize) -> impl Iterator<Item = (usize, usize)> {
    assert!(chunk_tokens > 0, "chunk_tokens must be at least 1");
    (0..tokens)
        .step_by(chunk_tokens)
        .map(move |start| (start, (start + chunk_tokens).min(tokens)))
}

/// The loss of
/// [`fused_linear_cross_entropy`](crate::FusedCrossEntropyBackend::fused_linear_cross_entropy)
/// with Burn tensor ops, on any backend.
pub fn fused_linear_cross_entropy<B: Backend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    token_weights: Option<FloatTensor<B>>,
    chunk_tokens: usize,
) -> FloatTensor<B> {
    let hidden = float::<B, 2>(hidden);
    let weight = float::<B, 2>(weight);
    let [tokens, _] = hidden.dims();
    let device = hidden.device();
    let dtype = hidden.dtype();
    let (safe, weights) = prepare::<B>(targets, token_weights, DType::F32);
    let bias = bias_row::<B>(bias, dtype);
    let weight_t = weight.transpose();
    let mut total = Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    for (start, end) in chunks(tokens, chunk_tokens) {
        let logits = logits(hidden.clone().slice(start..end), &weight_t, &bias).cast(DType::F32);
        let max = logits.clone().max_dim(1);
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let target = logits.gather(1, safe.clone().slice(start..end).unsqueeze_dim(1));
        let nll = (lse - target).squeeze_dim::<1>(1);
        total = total + (nll * weights.clone().slice(start..end)).sum();
    }
    total.into_primitive().tensor()
}

/// The gradients of
/// [`fused_linear_cross_entropy_backward`](crate::FusedCrossEntropyBackend::fused_linear_cross_entropy_backward)
/// with Burn tensor ops, on any backend:
/// `(d hidden [T, H], d weight [V, H], d bias [V])`, times `grad_output`;
/// `d bias` is `Some` exactly when `bias` is.
pub fn fused_linear_cross_entropy_backward<B: Backend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    token_weights: Option<FloatTensor<B>>,
    chunk_tokens: usize,
    grad_output: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>) {
    let hidden = float::<B, 2>(hidden);
    let weight = float::<B, 2>(weight);
    let [tokens, _] = hidden.dims();
    let dtype = hidden.dtype();
    let device = hidden.device();
    let (safe, weights) = prepare::<B>(targets, token_weights, DType::F32);
    // Each token's factor w_t * g.
    let grad = float::<B, 1>(grad_output).reshape([1]).cast(DType::F32);
    let scale = weights * grad;
    let bias = bias_row::<B>(bias, dtype);
    let weight_t = weight.clone().transpose();
    let mut grad_weight = Tensor::<B, 2>::zeros(weight.dims(), (&device, DType::F32));
    let mut grad_bias = bias
        .as_ref()
        .map(|b| Tensor::<B, 2>::zeros(b.dims(), (&device, DType::F32)));
    let mut grad_hidden = Vec::new();
    for (start, end) in chunks(tokens, chunk_tokens) {
        let h = hidden.clone().slice(start..end);
        let logits = logits(h.clone(), &weight_t, &bias).cast(DType::F32);
        let max = logits.clone().max_dim(1);
        let exp = (logits - max).exp();
        let sum = exp.clone().sum_dim(1);
        let s = scale.clone().slice(start..end).unsqueeze_dim::<2>(1);
        // w_t g softmax - w_t g onehot(target).
        let g = (exp * (s.clone() / sum)).scatter(
            1,
            safe.clone().slice(start..end).unsqueeze_dim(1),
            s.neg(),
            IndexingUpdateOp::Add,
        );
        if let Some(gb) = grad_bias {
            grad_bias = Some(gb + g.clone().sum_dim(0));
        }
        // The matmuls in the compute dtype, their sums over chunks in f32.
        let g = g.cast(dtype);
        grad_hidden.push(g.clone().matmul(weight.clone()));
        grad_weight = grad_weight + g.transpose().matmul(h).cast(DType::F32);
    }
    let grad_hidden = if grad_hidden.is_empty() {
        hidden.zeros_like()
    } else {
        Tensor::cat(grad_hidden, 0)
    };
    (
        grad_hidden.into_primitive().tensor(),
        grad_weight.cast(dtype).into_primitive().tensor(),
        grad_bias.map(|gb| gb.squeeze_dim::<1>(0).cast(dtype).into_primitive().tensor()),
    )
}
