//! `Mics<B>`: the weight may be a sharded parameter (the tied embedding), so
//! the inputs are gathered for `B`'s op, which consumes them, and the
//! gathered bytes are released after it, as every op of `Mics<B>` does
//! (through `mics_backend::extension`).

use burn::tensor::ops::{FloatTensor, IntTensor};
use mics_backend::Mics;
use mics_backend::extension::{from_inner, into_inner, release_gathered};

use crate::FusedCrossEntropyBackend;

impl<B: FusedCrossEntropyBackend> FusedCrossEntropyBackend for Mics<B> {
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        let loss = B::fused_linear_cross_entropy(
            into_inner(hidden),
            into_inner(weight),
            targets,
            token_weights.map(into_inner),
            chunk_tokens,
        );
        release_gathered();
        from_inner(loss)
    }

    fn fused_linear_cross_entropy_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        grad_output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (grad_hidden, grad_weight) = B::fused_linear_cross_entropy_backward(
            into_inner(hidden),
            into_inner(weight),
            targets,
            token_weights.map(into_inner),
            chunk_tokens,
            into_inner(grad_output),
        );
        release_gathered();
        (from_inner(grad_hidden), from_inner(grad_weight))
    }
}
