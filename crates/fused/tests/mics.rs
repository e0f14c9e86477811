//! `Mics<NdArray>` with the weight (and the bias) sharded over a partition
//! group of two ranks (threads engine): the fused loss and gradients equal
//! the one-process values.

/// The autodiff reference backend (one process).
// Plain: plain Burn, an autodiff backend under Burn's distributed autodiff too.
type Ref = Autodiff<mics_plain::Plain<NdArray>>;

mod common;

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use common::{Output, Problem, bits, rel_err, unfused, values};
use mics_backend::{Mics, MicsRuntime, ShardInit, shard_module};
use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};
use mics_fused::{CrossEntropyOptions, FusedCrossEntropyBackend, linear_cross_entropy};

/// The sharded backend.
type Dist = Autodiff<Mics<NdArray>>;

/// An LM head: the (tied) embedding matrix `[V, H]` and, as BERT's
/// masked-LM head, an optional vocabulary bias `[V]`.
#[derive(Module, Debug)]
struct Head<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Head<B> {
    fn new(p: &Problem, device: &B::Device) -> Self {
        Head {
            weight: Param::from_tensor(p.weight::<B>(device)),
            bias: p.bias::<B>(device).map(Param::from_tensor),
        }
    }
}

const CHUNK: usize = 8;
const V: usize = 1003;
const H: usize = 12;

/// The rank's problem: the same weight (and bias) on every rank, its own
/// tokens.
fn problem(rank: usize, with_bias: bool) -> Problem {
    let mut shared = Problem::random(100, 29, H, V, 0.2, true, 3.0);
    if with_bias {
        shared = shared.with_bias(100, 3.0);
    }
    Problem {
        weight: shared.weight,
        bias: shared.bias,
        ..Problem::random(200 + rank as u64, 29, H, V, 0.2, true, 3.0)
    }
}

fn fused<B: AutodiffBackend + FusedCrossEntropyBackend>(
    p: &Problem,
    head: &Head<B>,
    device: &B::Device,
) -> Output {
    let hidden = p.hidden::<B>(device).require_grad();
    let loss = linear_cross_entropy(
        hidden.clone(),
        head.weight.val(),
        head.bias.as_ref().map(|b| b.val()),
        p.targets::<B>(device),
        p.token_weights::<B>(device),
        &CrossEntropyOptions::default().with_chunk_tokens(CHUNK),
    );
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    Output {
        loss: value,
        grad_hidden: values(hidden.grad(&grads).unwrap()),
        grad_weight: values(head.weight.val().grad(&grads).unwrap()),
        grad_bias: head
            .bias
            .as_ref()
            .map(|b| values(b.val().grad(&grads).unwrap())),
    }
}

fn sharded_matches_one_process(with_bias: bool) {
    let topology = Topology::new(2, 2, 2).unwrap();
    let ranks = ThreadsEngine::new(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            // The test reads the full gradients from Burn's container: keep
            // them there instead of reduce-scattering them during backward.
            runtime.set_reduce_in_backward(false);
            let device = Default::default();
            let p = problem(rank, with_bias);
            let head = Head::<Dist>::new(&p, &device);
            let head = shard_module::<NdArray, Dist, _>(head, &runtime, ShardInit::Identical);
            let shard_bytes = runtime.counters().shard_bytes;
            let out = fused::<Dist>(&p, &head, &device);
            (rank, out, shard_bytes, runtime.counters())
        })
        .unwrap();
    let weight_bytes = (V * H * 4) as u64;
    let bias_bytes = if with_bias { (V * 4) as u64 } else { 0 };
    let params = if with_bias { 2 } else { 1 };
    for result in ranks {
        let (rank, out, shard_bytes, counters) = result.unwrap();
        // Each rank held half the weight and half the bias (padded), not all
        // of them.
        let bias_shard = if with_bias {
            (V as u64).div_ceil(2) * 4
        } else {
            0
        };
        assert_eq!(
            shard_bytes,
            (V as u64 * H as u64).div_ceil(2) * 4 + bias_shard
        );
        // Each parameter gathered once, for the forward pass, and released
        // after it: on NdArray in f32 the gradients come with the loss
        // (`fused_grads_with_loss`), so the backward step needs no inputs.
        assert_eq!(counters.gathers, params);
        assert_eq!(counters.bytes_gathered, weight_bytes + bias_bytes);
        assert_eq!(counters.live_gathered_bytes, 0);
        assert_eq!(counters.peak_live_gathered_bytes, weight_bytes + bias_bytes);

        let p = problem(rank, with_bias);
        let device = Default::default();
        let head = Head::<Ref>::new(&p, &device);
        // The same computation in one process: the same bits.
        let one = fused::<Ref>(&p, &head, &device);
        assert_eq!(out.loss.to_bits(), one.loss.to_bits(), "rank {rank}");
        assert!(bits(&out.grad_hidden) == bits(&one.grad_hidden));
        assert!(bits(&out.grad_weight) == bits(&one.grad_weight));
        assert_eq!(out.grad_bias.is_some(), with_bias);
        assert_eq!(
            out.grad_bias.as_deref().map(bits),
            one.grad_bias.as_deref().map(bits)
        );
        // And the unfused values.
        let want = unfused::<Ref>(&p);
        let mut errs = vec![
            rel_err(&[out.loss], &[want.loss]),
            rel_err(&out.grad_hidden, &want.grad_hidden),
            rel_err(&out.grad_weight, &want.grad_weight),
        ];
        if let (Some(g), Some(w)) = (&out.grad_bias, &want.grad_bias) {
            errs.push(rel_err(g, w));
        }
        let shown: Vec<String> = errs.iter().map(|e| format!("{e:.3e}")).collect();
        println!(
            "rank {rank}, bias {with_bias}: relative errors (loss, hidden, weight[, bias]) {shown:?}"
        );
        assert!(errs.iter().all(|&e| e <= 1e-5), "{errs:?}");
    }
}

#[test]
fn sharded_weight_matches_one_process() {
    sharded_matches_one_process(false);
}

#[test]
fn sharded_weight_and_bias_match_one_process() {
    sharded_matches_one_process(true);
}
