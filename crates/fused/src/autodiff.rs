//! `Autodiff<B>`: the fused op as one node of the graph, with its own
//! backward step.
//!
//! The forward pass runs `B`'s op and checkpoints its two differentiable
//! inputs (`hidden`, `weight`); the state also holds the targets and the
//! token weights. No logits are kept: the backward step hands the inputs and
//! the upstream gradient to `B`'s backward, which recomputes them chunk by
//! chunk, and registers the gradients of the tracked inputs.
//!
//! Only `B: Backend` is needed (not `AutodiffBackend`), so the impl also
//! holds under burn-autodiff's `distributed` feature.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};

use crate::FusedCrossEntropyBackend;

#[derive(Debug)]
struct FusedCrossEntropyBackward;

/// What the backward step keeps: the checkpointed `hidden` and `weight`, the
/// targets, the token weights and the chunk size.
type State<B> = (NodeId, NodeId, IntTensor<B>, Option<FloatTensor<B>>, usize);

impl<B: FusedCrossEntropyBackend> Backward<B, 2> for FusedCrossEntropyBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [hidden_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (hidden, weight, targets, token_weights, chunk_tokens) = ops.state;
        let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(hidden);
        let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight);
        let (grad_hidden, grad_weight) = B::fused_linear_cross_entropy_backward(
            hidden,
            weight,
            targets,
            token_weights,
            chunk_tokens,
            grad,
        );
        if let Some(node) = hidden_node {
            grads.register::<B>(node.id, grad_hidden);
        }
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, grad_weight);
        }
    }
}

impl<B: FusedCrossEntropyBackend, C: CheckpointStrategy> FusedCrossEntropyBackend
    for Autodiff<B, C>
{
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        // The token weights are constants: their primitive, no graph edge.
        let token_weights = token_weights.map(|w| w.primitive);
        match FusedCrossEntropyBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let hidden_state = prep.checkpoint(&hidden);
                let weight_state = prep.checkpoint(&weight);
                let loss = B::fused_linear_cross_entropy(
                    hidden.primitive,
                    weight.primitive,
                    targets.clone(),
                    token_weights.clone(),
                    chunk_tokens,
                );
                prep.finish(
                    (
                        hidden_state,
                        weight_state,
                        targets,
                        token_weights,
                        chunk_tokens,
                    ),
                    loss,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_linear_cross_entropy(
                hidden.primitive,
                weight.primitive,
                targets,
                token_weights,
                chunk_tokens,
            )),
        }
    }

    fn fused_linear_cross_entropy_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
        grad_output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Gradients as values (no graph of their own, no double backward).
        let (grad_hidden, grad_weight) = B::fused_linear_cross_entropy_backward(
            hidden.primitive,
            weight.primitive,
            targets,
            token_weights.map(|w| w.primitive),
            chunk_tokens,
            grad_output.primitive,
        );
        (
            FloatTensor::<Self>::new(grad_hidden),
            FloatTensor::<Self>::new(grad_weight),
        )
    }
}
