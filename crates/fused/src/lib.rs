//! Fused linear + cross-entropy for large vocabularies.
//!
//! A language model's head projects `T` hidden states (`[T, H]`) onto a
//! vocabulary of `V` tokens (`weight`: `[V, H]`, often the tied embedding,
//! plus an optional `bias`: `[V]`, as BERT's masked-LM head), takes the
//! log-softmax and the negative log-likelihood of each target. Done
//! with plain tensor ops, the `[T, V]` logits (206 MB at `T = 1024`,
//! `V = 50257` in `f32`) are written, copied and exponentiated several times,
//! forward and backward. [`linear_cross_entropy`] computes the loss and its
//! gradients **in chunks of tokens** instead: at most one `[chunk, V]` block
//! of logits exists at a time. Where the backend can
//! ([`FusedCrossEntropyBackend::fused_grads_with_loss`]: `NdArray` in `f32`),
//! a tracked forward pass computes the gradients with the loss, chunk by
//! chunk, and the backward pass only scales them by the upstream gradient;
//! elsewhere the backward pass recomputes each chunk's logits from `hidden`,
//! `weight` and `bias`.
//!
//! The op is a Burn *backend extension* ([`FusedCrossEntropyBackend`]):
//!
//! - every backend can use the generic implementation ([`generic`]), made of
//!   Burn tensor ops per chunk;
//! - `NdArray` overrides it with a host implementation ([`cpu`]): the chunk
//!   projections through `matrixmultiply`'s GEMM (as NdArray's own matmul),
//!   the softmax with a vectorised polynomial `exp` ([`math`]), buffers
//!   allocated once per call, tokens whose target is ignored skipped;
//! - `Autodiff<B>` records it as one op: with the gradients of the tracked
//!   inputs computed in the forward pass
//!   ([`FusedCrossEntropyBackend::fused_linear_cross_entropy_with_grads`])
//!   where `B` can, else saving only its inputs (never logits) for a
//!   backward that calls
//!   [`FusedCrossEntropyBackend::fused_linear_cross_entropy_backward`];
//!   gradients go to whichever of `hidden`, `weight`, `bias` is tracked;
//! - `Mics<B>` gathers a sharded weight (the tied embedding) and a sharded
//!   bias for the inner op, through `mics_backend::extension`; `Plain<B>` is
//!   `B`;
//! - with the cargo feature `cubecl`, Burn's cubecl backends
//!   (`CubeBackend<R, F, I, BT>` for any runtime `R`, and `Fusion<B>`: the
//!   types behind `burn::backend::Wgpu` and `Cuda`) use the generic
//!   implementation. The feature enables no runtime and none of Burn's
//!   `wgpu`/`cuda` defaults (fusion, autotune): the crate that picks the
//!   backend enables them.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Int, Tensor};
//! use mics_fused::{CrossEntropyOptions, IGNORE_INDEX, linear_cross_entropy};
//! use mics_plain::Plain;
//!
//! // Plain: an autodiff backend under Burn's distributed autodiff too.
//! type B = Autodiff<Plain<NdArray>>;
//! let device = Default::default();
//! let hidden = Tensor::<B, 2>::ones([3, 4], &device).require_grad();
//! let weight = Tensor::<B, 2>::zeros([10, 4], &device).require_grad();
//! // An optional [V] bias (BERT's `cls.predictions.bias`); None for none.
//! let bias = Tensor::<B, 1>::zeros([10], &device).require_grad();
//! let targets = Tensor::<B, 1, Int>::from_ints([1, IGNORE_INDEX, 7], &device);
//! let options = CrossEntropyOptions::default().with_chunk_tokens(2);
//! let loss = linear_cross_entropy(
//!     hidden.clone(),
//!     weight.clone(),
//!     Some(bias.clone()),
//!     targets,
//!     None,
//!     &options,
//! );
//! // Two counted tokens, uniform logits: 2 ln 10.
//! assert!((loss.clone().into_scalar() - 2.0 * 10f32.ln()).abs() < 1e-5);
//! let grads = loss.backward();
//! assert_eq!(weight.grad(&grads).unwrap().dims(), [10, 4]);
//! // d bias = sum over counted tokens of softmax - onehot(target).
//! let grad_bias = bias.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
//! assert!((grad_bias[1] - (0.2 - 1.0)).abs() < 1e-6);
//! assert!((grad_bias[0] - 0.2).abs() < 1e-6);
//! ```
#![warn(missing_docs)]

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, Int, Shape, Tensor, TensorPrimitive};

mod autodiff;
pub mod cpu;
#[cfg(feature = "cubecl")]
mod cubecl;
pub mod generic;
pub mod math;
mod mics;
mod plain;
mod sgemm;

/// The target id of a token that does not count (PyTorch's `ignore_index`
/// default, also what `mics-datasets` writes): it adds nothing to the loss
/// nor to the gradients.
pub const IGNORE_INDEX: i64 = -100;

/// Options of [`linear_cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossEntropyOptions {
    /// Tokens per chunk: the logits that exist at once are
    /// `[chunk_tokens, V]` (51 MB at 256 tokens and `V = 50257` in `f32`).
    /// Must be at least 1; a chunk larger than the token count is one chunk.
    pub chunk_tokens: usize,
}

impl CrossEntropyOptions {
    /// The default chunk: 256 tokens.
    pub const DEFAULT_CHUNK_TOKENS: usize = 256;

    /// Options with `chunk_tokens` tokens per chunk.
    pub fn with_chunk_tokens(mut self, chunk_tokens: usize) -> Self {
        self.chunk_tokens = chunk_tokens;
        self
    }
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            chunk_tokens: Self::DEFAULT_CHUNK_TOKENS,
        }
    }
}

/// Backend extension: the fused LM-head projection, log-softmax and
/// negative log-likelihood, and its gradients, computed chunk by chunk.
///
/// Shapes: `hidden` `[T, H]`, `weight` `[V, H]`, `bias` `[V]`, `targets`
/// `[T]` (token ids in `0..V`, or [`IGNORE_INDEX`]), `token_weights` `[T]`.
/// With the logits `z[t, v] = hidden[t] · weight[v] + bias[v]` (no `bias[v]`
/// term without a bias), the loss is
///
/// ```text
/// sum over t with targets[t] != IGNORE_INDEX of
///     w_t * (logsumexp_v(z[t, v]) - z[t, targets[t]])
/// ```
///
/// with `w_t = token_weights[t]` (1 without weights): a sum, not a mean
/// (divide by the token count, or pass weights `1 / count`, for a mean).
///
/// The default methods are the generic implementation ([`generic`]); a
/// backend overrides them with a faster one (as `NdArray` does, [`cpu`]).
/// A decorator backend implements the trait by unwrapping its primitives
/// and calling its inner backend's methods (`Autodiff<B>`, `Mics<B>`).
pub trait FusedCrossEntropyBackend: Backend {
    /// The loss (a 1-element tensor of `hidden`'s dtype), computing the
    /// logits `chunk_tokens` tokens at a time.
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        generic::fused_linear_cross_entropy::<Self>(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
        )
    }

    /// The gradients of the loss with respect to `hidden` (`[T, H]`),
    /// `weight` (`[V, H]`) and `bias` (`[V]`, `Some` exactly when a bias is
    /// given), multiplied by `grad_output` (the upstream gradient of the
    /// loss, a 1-element tensor), recomputing each chunk's logits. Rows of
    /// ignored tokens are zero in the first. With
    /// `g[t, v] = w_t (softmax(z[t])[v] - [v = targets[t]]) grad_output`
    /// over the counted tokens: `d hidden = g · weight`,
    /// `d weight = gᵀ · hidden`, `d bias[v] = sum_t g[t, v]`.
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

    /// Whether [`fused_linear_cross_entropy_with_grads`](Self::fused_linear_cross_entropy_with_grads)
    /// is this backend's faster way to train on inputs of `dtype`: then
    /// `Autodiff<B>` computes the gradients with the loss, one `[T, H] x
    /// [H, V]` product fewer than the forward pass and a backward that
    /// recomputes the logits (4 for 3 per step), and keeps no inputs.
    ///
    /// Only where gradients at an upstream gradient of 1 lose nothing when
    /// multiplied by the real one afterwards: `f32` (`NdArray`'s host path).
    /// In `f16` the unscaled gradients would underflow before the loss scale
    /// could save them, so the default is `false`.
    fn fused_grads_with_loss(dtype: FloatDType) -> bool {
        let _ = dtype;
        false
    }

    /// The loss and the gradients named in `wanted`, at an upstream
    /// gradient of 1. The default runs
    /// [`fused_linear_cross_entropy`](Self::fused_linear_cross_entropy) and
    /// then [`fused_linear_cross_entropy_backward`](Self::fused_linear_cross_entropy_backward);
    /// a backend for which [`fused_grads_with_loss`](Self::fused_grads_with_loss)
    /// holds computes them in one pass.
    fn fused_linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        wanted: WantedGrads,
    ) -> LossAndGrads<Self> {
        forward_then_backward::<Self>(
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

/// The loss by `B`'s forward pass, then the wanted gradients by its
/// backward pass at an upstream gradient of 1: the default
/// [`FusedCrossEntropyBackend::fused_linear_cross_entropy_with_grads`].
fn forward_then_backward<B: FusedCrossEntropyBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    token_weights: Option<FloatTensor<B>>,
    chunk_tokens: usize,
    wanted: WantedGrads,
) -> LossAndGrads<B> {
    let loss = B::fused_linear_cross_entropy(
        hidden.clone(),
        weight.clone(),
        bias.clone(),
        targets.clone(),
        token_weights.clone(),
        chunk_tokens,
    );
    let has_bias = bias.is_some();
    let device = B::float_device(&hidden);
    let one = B::float_ones(Shape::new([1]), &device, FloatDType::F32);
    let (gh, gw, gb) = B::fused_linear_cross_entropy_backward(
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens,
        one,
    );
    LossAndGrads {
        loss,
        hidden: wanted.hidden.then_some(gh),
        weight: wanted.weight.then_some(gw),
        bias: (wanted.bias && has_bias).then_some(gb).flatten(),
    }
}

/// Which gradients [`FusedCrossEntropyBackend::fused_linear_cross_entropy_with_grads`]
/// computes: those of the tracked inputs (`bias` only counts when there is
/// one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WantedGrads {
    /// `d hidden`, `[T, H]`.
    pub hidden: bool,
    /// `d weight`, `[V, H]`.
    pub weight: bool,
    /// `d bias`, `[V]`.
    pub bias: bool,
}

impl WantedGrads {
    /// Every gradient.
    pub const ALL: WantedGrads = WantedGrads {
        hidden: true,
        weight: true,
        bias: true,
    };

    /// Whether any gradient is wanted.
    pub fn any(&self) -> bool {
        self.hidden || self.weight || self.bias
    }
}

/// The loss and the wanted gradients at an upstream gradient of 1, from
/// [`FusedCrossEntropyBackend::fused_linear_cross_entropy_with_grads`]; a
/// gradient is `Some` exactly when it was wanted (and, for `bias`, there is
/// a bias).
#[derive(Debug)]
pub struct LossAndGrads<B: Backend> {
    /// The loss, a 1-element `f32` tensor.
    pub loss: FloatTensor<B>,
    /// `d hidden`, `[T, H]`.
    pub hidden: Option<FloatTensor<B>>,
    /// `d weight`, `[V, H]`.
    pub weight: Option<FloatTensor<B>>,
    /// `d bias`, `[V]`.
    pub bias: Option<FloatTensor<B>>,
}

impl<B: Backend> LossAndGrads<B> {
    /// The same loss and gradients with every primitive mapped by `f` (a
    /// decorator backend wrapping its inner backend's tensors).
    pub fn map<C: Backend>(self, f: impl Fn(FloatTensor<B>) -> FloatTensor<C>) -> LossAndGrads<C> {
        LossAndGrads {
            loss: f(self.loss),
            hidden: self.hidden.map(&f),
            weight: self.weight.map(&f),
            bias: self.bias.map(&f),
        }
    }
}

/// The summed, optionally weighted cross-entropy of the logits
/// `hidden · weightᵀ + bias` against `targets`, without ever holding the
/// whole `[T, V]` logits: see [`FusedCrossEntropyBackend`] for the formula.
///
/// `hidden`: `[T, H]`; `weight`: `[V, H]` (the layout of an embedding, or of
/// a `Linear` stored as `[out, in]`; pass `linear.weight.val().transpose()`
/// for Burn's `[in, out]` `Linear`); `bias`: `[V]` or `None` (BERT's
/// masked-LM head has one, `cls.predictions.bias`, or a `Linear`'s bias);
/// `targets`: `[T]` token ids, [`IGNORE_INDEX`] for tokens that do not
/// count; `token_weights`: `[T]`, each token's factor. Returns a 1-element
/// tensor: the sum over the counted tokens, in f32 whatever the inputs' dtype
/// (in f16 the sum of a few thousand tokens' losses would overflow). On an autodiff backend,
/// gradients flow to whichever of `hidden`, `weight` and `bias` is tracked
/// (not to `token_weights`, treated as constants).
///
/// # Panics
///
/// On mismatched shapes, or `options.chunk_tokens == 0`. A target outside
/// `0..V` other than [`IGNORE_INDEX`] panics on `NdArray` and gives an
/// unspecified result on other backends.
pub fn linear_cross_entropy<B: FusedCrossEntropyBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    token_weights: Option<Tensor<B, 1>>,
    options: &CrossEntropyOptions,
) -> Tensor<B, 1> {
    let [t, h] = hidden.dims();
    let [v, hw] = weight.dims();
    assert_eq!(
        h, hw,
        "linear_cross_entropy: hidden is [{t}, {h}] but weight's rows have {hw} features (weight must be [V, H])"
    );
    if let Some(b) = &bias {
        assert_eq!(
            b.dims(),
            [v],
            "linear_cross_entropy: bias must be [V] = [{v}]"
        );
    }
    assert_eq!(
        targets.dims(),
        [t],
        "linear_cross_entropy: targets must be [T] = [{t}]"
    );
    if let Some(w) = &token_weights {
        assert_eq!(
            w.dims(),
            [t],
            "linear_cross_entropy: token_weights must be [T] = [{t}]"
        );
    }
    assert!(
        options.chunk_tokens > 0,
        "linear_cross_entropy: chunk_tokens must be at least 1"
    );
    let out = B::fused_linear_cross_entropy(
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
        targets.into_primitive(),
        token_weights.map(|w| w.into_primitive().tensor()),
        options.chunk_tokens,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
