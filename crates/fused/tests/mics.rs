//! `Mics<NdArray>` with the weight sharded over a partition group of two
//! ranks (threads engine): the fused loss and gradients equal the
//! one-process values.

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

/// An LM head: the (tied) embedding matrix `[V, H]`.
#[derive(Module, Debug)]
struct Head<B: Backend> {
    weight: Param<Tensor<B, 2>>,
}

const CHUNK: usize = 8;

/// The rank's problem: the same weight on every rank, its own tokens.
fn problem(rank: usize) -> Problem {
    let shared = Problem::random(100, 29, 12, 1003, 0.2, true, 3.0);
    Problem {
        weight: shared.weight,
        ..Problem::random(200 + rank as u64, 29, 12, 1003, 0.2, true, 3.0)
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
    }
}

#[test]
fn sharded_weight_matches_one_process() {
    let topology = Topology::new(2, 2, 2).unwrap();
    let ranks = ThreadsEngine::new(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            // The test reads the full weight gradient from Burn's container:
            // keep it there instead of reduce-scattering it during backward.
            runtime.set_reduce_in_backward(false);
            let device = Default::default();
            let p = problem(rank);
            let head = Head {
                weight: Param::from_tensor(p.weight::<Dist>(&device)),
            };
            let head = shard_module::<NdArray, Dist, _>(head, &runtime, ShardInit::Identical);
            let shard_bytes = runtime.counters().shard_bytes;
            let out = fused::<Dist>(&p, &head, &device);
            (rank, out, shard_bytes, runtime.counters())
        })
        .unwrap();
    let full_bytes = (1003 * 12 * 4) as u64;
    for result in ranks {
        let (rank, out, shard_bytes, counters) = result.unwrap();
        // Each rank held half the weight (padded), not all of it.
        assert_eq!(shard_bytes, (1003 * 12_u64).div_ceil(2) * 4);
        // Gathered for the forward pass and again for the backward pass, and
        // released after each.
        assert_eq!(counters.gathers, 2);
        assert_eq!(counters.bytes_gathered, 2 * full_bytes);
        assert_eq!(counters.live_gathered_bytes, 0);
        assert_eq!(counters.peak_live_gathered_bytes, full_bytes);

        let p = problem(rank);
        let device = Default::default();
        let head = Head {
            weight: Param::from_tensor(p.weight::<Ref>(&device)),
        };
        // The same computation in one process: the same bits.
        let one = fused::<Ref>(&p, &head, &device);
        assert_eq!(out.loss.to_bits(), one.loss.to_bits(), "rank {rank}");
        assert!(bits(&out.grad_hidden) == bits(&one.grad_hidden));
        assert!(bits(&out.grad_weight) == bits(&one.grad_weight));
        // And the unfused value.
        let want = unfused::<Ref>(&p);
        assert!(rel_err(&[out.loss], &[want.loss]) <= 1e-5);
        assert!(rel_err(&out.grad_hidden, &want.grad_hidden) <= 1e-5);
        assert!(rel_err(&out.grad_weight, &want.grad_weight) <= 1e-5);
    }
}
