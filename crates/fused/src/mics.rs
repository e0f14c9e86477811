//! `Mics<B>`: the weight (the tied embedding) and the bias may be sharded
//! parameters, so the inputs are gathered for `B`'s op, which consumes them,
//! and the gathered bytes are released after it, as every op of `Mics<B>`
//! does (through `mics_backend::extension`). The inputs are gathered in a
//! fixed order (`hidden`, `weight`, `bias`, `token_weights`), the same on
//! every rank of a partition group.
//!
//! Where `B` computes the gradients with the loss
//! ([`FusedCrossEntropyBackend::fused_grads_with_loss`]), the head gathers
//! the weight once per step instead of twice: the backward step needs no
//! inputs.

use burn::tensor::FloatDType;
use burn::tensor::ops::{FloatTensor, IntTensor};
use mics_backend::Mics;
use mics_backend::extension::{from_inner, into_inner, release_gathered};

use crate::{FusedCrossEntropyBackend, LossAndGrads, WantedGrads};

impl<B: FusedCrossEntropyBackend> FusedCrossEntropyBackend for Mics<B> {
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        let hidden = into_inner(hidden);
        let weight = into_inner(weight);
        let bias = bias.map(into_inner);
        let token_weights = token_weights.map(into_inner);
        let loss = B::fused_linear_cross_entropy(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
        );
        release_gathered();
        from_inner(loss)
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
        let hidden = into_inner(hidden);
        let weight = into_inner(weight);
        let bias = bias.map(into_inner);
        let token_weights = token_weights.map(into_inner);
        let grad_output = into_inner(grad_output);
        let (grad_hidden, grad_weight, grad_bias) = B::fused_linear_cross_entropy_backward(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            grad_output,
        );
        release_gathered();
        (
            from_inner(grad_hidden),
            from_inner(grad_weight),
            grad_bias.map(from_inner),
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
        let hidden = into_inner(hidden);
        let weight = into_inner(weight);
        let bias = bias.map(into_inner);
        let token_weights = token_weights.map(into_inner);
        let out = B::fused_linear_cross_entropy_with_grads(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            wanted,
        );
        release_gathered();
        out.map(from_inner)
    }
}
