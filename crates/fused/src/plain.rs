//! `Plain<B>`: the same primitives as `B`, so the op is `B`'s.

use burn::tensor::FloatDType;
use burn::tensor::ops::{FloatTensor, IntTensor};
use mics_plain::Plain;

use crate::{FusedCrossEntropyBackend, LossAndGrads, WantedGrads};

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

    fn fused_grads_with_loss(dtype: FloatDType) -> bool {
        B::fused_grads_with_loss(dtype)
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
        // The same primitives: `B`'s result is `Self`'s.
        let out = B::fused_linear_cross_entropy_with_grads(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            wanted,
        );
        LossAndGrads {
            loss: out.loss,
            hidden: out.hidden,
            weight: out.weight,
            bias: out.bias,
        }
    }
}
