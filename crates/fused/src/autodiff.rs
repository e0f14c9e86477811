//! `Autodiff<B>`: the fused op as one node of the graph, with its own
//! backward step.
//!
//! When any input is tracked, the forward pass first asks `B` for the loss
//! and the tracked inputs' gradients in one pass
//! ([`FusedCrossEntropyBackend::fused_linear_cross_entropy_with_grads`], at
//! an upstream gradient of 1); the backward step then only multiplies them by
//! the upstream gradient. Where `B` has no such pass, the forward pass runs
//! `B`'s op and checkpoints its differentiable inputs (`hidden`, `weight`
//! and, when there is one, `bias`: two or three parents) with the targets and
//! the token weights, and the backward step hands them to `B`'s backward,
//! which recomputes the logits chunk by chunk. No logits are kept either way.
//!
//! Only `B: Backend` is needed (not `AutodiffBackend`), so the impl also
//! holds under burn-autodiff's `distributed` feature.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};

use crate::{FusedCrossEntropyBackend, WantedGrads};

/// The backward step of the op with `N` differentiable inputs: `hidden`,
/// `weight` (`N = 2`) and `bias` (`N = 3`), in that order.
#[derive(Debug)]
struct FusedCrossEntropyBackward;

/// What the backward step keeps.
#[derive(Debug)]
enum State<B: Backend, const N: usize> {
    /// The gradients of the tracked inputs at an upstream gradient of 1, in
    /// the order `hidden`, `weight`, `bias` (`None` for untracked ones).
    Computed([Option<FloatTensor<B>>; N]),
    /// The checkpointed differentiable inputs, the targets, the token
    /// weights and the chunk size, for a backward that recomputes.
    Recompute([NodeId; N], IntTensor<B>, Option<FloatTensor<B>>, usize),
}

// By hand: a derive would ask `B: Clone`.
impl<B: Backend, const N: usize> Clone for State<B, N> {
    fn clone(&self) -> Self {
        match self {
            State::Computed(g) => State::Computed(g.clone()),
            State::Recompute(ids, t, w, c) => State::Recompute(*ids, t.clone(), w.clone(), *c),
        }
    }
}

impl<B: FusedCrossEntropyBackend, const N: usize> Backward<B, N> for FusedCrossEntropyBackward {
    type State = State<B, N>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let grads_out: Vec<Option<FloatTensor<B>>> = match ops.state {
            State::Computed(computed) => computed
                .into_iter()
                .map(|g| g.map(|g| times_upstream::<B>(g, grad.clone())))
                .collect(),
            State::Recompute(inputs, targets, token_weights, chunk_tokens) => {
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
                vec![Some(grad_hidden), Some(grad_weight), grad_bias]
            }
        };
        for (parent, grad) in ops.parents.into_iter().zip(grads_out) {
            if let Some(node) = parent {
                let grad = grad.expect("a gradient for each input");
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// `grad * upstream`, the upstream gradient (a 1-element tensor, `f32` as the
/// loss) broadcast over `grad` in `grad`'s dtype.
fn times_upstream<B: Backend>(grad: FloatTensor<B>, upstream: FloatTensor<B>) -> FloatTensor<B> {
    let rank = grad.shape().num_dims();
    let upstream = B::float_reshape(upstream, Shape::new_raw(vec![1; rank].into()));
    let upstream = B::float_cast(upstream, grad.dtype().into());
    B::float_mul(grad, upstream)
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
    let nodes_tracked = nodes.clone();
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
        // The gradients with the loss: the backward step only scales them.
        OpsKind::Tracked(prep) if B::fused_grads_with_loss(inputs[0].primitive.dtype().into()) => {
            let tracked = nodes_tracked.map(|n| n.clone_if_require_grad().is_some());
            let wanted = WantedGrads {
                hidden: tracked[0],
                weight: tracked[1],
                bias: N == 3 && tracked[N - 1],
            };
            let primitive = |t: &FloatTensor<Autodiff<B, C>>| t.primitive.clone();
            let mut prims = inputs.iter().map(primitive);
            let (hidden, weight, bias) = (
                prims.next().expect("hidden"),
                prims.next().expect("weight"),
                prims.next(),
            );
            let out = B::fused_linear_cross_entropy_with_grads(
                hidden,
                weight,
                bias,
                targets,
                token_weights,
                chunk_tokens,
                wanted,
            );
            let mut computed = [out.hidden, out.weight, out.bias].into_iter();
            let computed = std::array::from_fn(|_| computed.next().flatten());
            prep.finish(State::Computed(computed), out.loss)
        }
        OpsKind::Tracked(mut prep) => {
            // Every input is needed to recompute the logits, tracked or not.
            let ids = inputs.each_ref().map(|t| prep.checkpoint(t));
            let loss = run(inputs, targets.clone(), token_weights.clone());
            prep.finish(
                State::Recompute(ids, targets, token_weights, chunk_tokens),
                loss,
            )
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
