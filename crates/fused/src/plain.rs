//! `Plain<B>`: the same primitives as `B`, so the op is `B`'s.

use burn::tensor::ops::{FloatTensor, IntTensor};
use mics_plain::Plain;

use crate::FusedCrossEntropyBackend;

impl<B: FusedCrossEntropyBackend> FusedCrossEntropyBackend for Plain<B> {
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        B::fused_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_tokens)
    }

    fn fused_linear_cross_entropy_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        grad_output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        B::fused_linear_cross_entropy_backward(
            hidden,
            weight,
            targets,
            token_weights,
            chunk_tokens,
            grad_output,
        )
    }
}
