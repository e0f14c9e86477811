//! `Autodiff<B>`: the fused op as one node of the graph, with its own
//! backward step.
//!
//! The forward pass runs `B`'s op and checkpoints its differentiable inputs
//! (`hidden`, `weight` and, when there is one, `bias`: two or three parents);
//! the state also holds the targets and the token weights. No logits are
//! kept: the backward step hands the inputs and the upstream gradient to
//! `B`'s backward, which recomputes them chunk by chunk, and registers the
//! gradients of the tracked inputs (any of them may be untracked).
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

/// The backward step of the op with `N` differentiable inputs: `hidden`,
/// `weight` (`N = 2`) and `bias` (`N = 3`), in that order.
#[derive(Debug)]
struct FusedCrossEntropyBackward;

/// What the backward step keeps: the checkpointed differentiable inputs, the
/// targets, the token weights and the chunk size.
type State<B, const N: usize> = ([NodeId; N], IntTensor<B>, Option<FloatTensor<B>>, usize);

impl<B: FusedCrossEntropyBackend, const N: usize> Backward<B, N> for FusedCrossEntropyBackward {
    type State = State<B, N>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (inputs, targets, token_weights, chunk_tokens) = ops.state;
        let mut inputs = inputs
            .into_iter()
            .map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
        let hidden = inputs.next().expect("hidden");
        let weight = inputs.next().expect("weight");
        let bias = inputs.next();
        let (grad_hidden, grad_weight, grad_bias) = B::fused_linear_cross_entropy_backward(
            hidden,
            weight,
            bias,
            targets,
            token_weights,
            chunk_tokens,
            grad,
        );
        let grads_out = [Some(grad_hidden), Some(grad_weight), grad_bias];
        for (parent, grad) in ops.parents.into_iter().zip(grads_out) {
            if let Some(node) = parent {
                let grad = grad.expect("a gradient for each input");
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Records the op on its `N` differentiable inputs (`hidden`, `weight`,
/// then `bias` if any) and runs `B`'s forward pass.
fn record<B, C, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    targets: IntTensor<B>,
    token_weights: Option<FloatTensor<B>>,
    chunk_tokens: usize,
) -> FloatTensor<Autodiff<B, C>>
where
    B: FusedCrossEntropyBackend,
    C: CheckpointStrategy,
{
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let run = |inputs: [FloatTensor<Autodiff<B, C>>; N],
               targets: IntTensor<B>,
               token_weights: Option<FloatTensor<B>>| {
        let mut inputs = inputs.into_iter().map(|t| t.primitive);
        let hidden = inputs.next().expect("hidden");
        let weight = inputs.next().expect("weight");
        let bias = inputs.next();
        B::fused_linear_cross_entropy(hidden, weight, bias, targets, token_weights, chunk_tokens)
    };
    match FusedCrossEntropyBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // Every input is needed to recompute the logits, tracked or not.
            let ids = inputs.each_ref().map(|t| prep.checkpoint(t));
            let loss = run(inputs, targets.clone(), token_weights.clone());
            prep.finish((ids, targets, token_weights, chunk_tokens), loss)
        }
        OpsKind::UnTracked(prep) => prep.finish(run(inputs, targets, token_weights)),
    }
}

impl<B: FusedCrossEntropyBackend, C: CheckpointStrategy> FusedCrossEntropyBackend
    for Autodiff<B, C>
{
    fn fused_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        token_weights: Option<FloatTensor<Self>>,
        chunk_tokens: usize,
    ) -> FloatTensor<Self> {
        // The token weights are constants: their primitive, no graph edge.
        let token_weights = token_weights.map(|w| w.primitive);
        match bias {
            None => record::<B, C, 2>([hidden, weight], targets, token_weights, chunk_tokens),
            Some(bias) => {
                record::<B, C, 3>([hidden, weight, bias], targets, token_weights, chunk_tokens)
            }
        }
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
        // Gradients as values (no graph of their own, no double backward).
        let (grad_hidden, grad_weight, grad_bias) = B::fused_linear_cross_entropy_backward(
            hidden.primitive,
            weight.primitive,
            bias.map(|b| b.primitive),
            targets,
            token_weights.map(|w| w.primitive),
            chunk_tokens,
            grad_output.primitive,
        );
        (
            FloatTensor::<Self>::new(grad_hidden),
            FloatTensor::<Self>::new(grad_weight),
            grad_bias.map(FloatTensor::<Self>::new),
        )
    }
}
