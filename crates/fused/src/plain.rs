//! `Plain<B>`: the same primitives as `B`, so the op is `B`'s.

use burn::tensor::ops::{FloatTensor, IntTensor};
use mics_plain::Plain;

use crate::FusedCrossEntropyBackend;

impl<B: FusedCrossEntropyBackend> FusedCrossEntropyBackend for Plain<B> {
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        B::fused_linear_cross_entropy(hidden, weight, bias, targets, token_weights, chunk_tokens)
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
        B::fused_linear_cross_entropy_backward(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            grad_output,
        )
    }
}
