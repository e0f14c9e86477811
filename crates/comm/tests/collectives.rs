//! Every collective of the threads engine against a naive single-threaded
//! reference, for world sizes 1..=8, odd lengths, every reduce op and dtype.

use half::{bf16, f16};
use mics_comm::{Collectives, Communicator, Element, ReduceOp, ThreadsEngine};
use proptest::prelude::*;

mod common;
use common::reference_reduce;

/// Rank `r`'s input: a deterministic function of (seed, rank, index) with
/// mixed signs and magnitudes, so that summation order would show.
fn input<E: Element>(seed: u64, rank: usize, len: usize) -> Vec<E> {
    (0..len)
        .map(|i| {
            let x = (seed as f32 * 0.37 + rank as f32 * 1.7 + i as f32 * 0.113).sin();
            E::from_f32(x * 10f32.powi((i % 5) as i32 - 2))
        })
        .collect()
}

fn check_all<E: Element>(world: usize, len: usize, seed: u64, op: ReduceOp) {
    let inputs: Vec<Vec<E>> = (0..world).map(|r| input(seed, r, len)).collect();
    let gathered: Vec<E> = inputs.concat();
    let reduced = reference_reduce(&inputs, op);
    // Reduce-scatter needs a multiple of the world size: use the padded
    // length of the same inputs.
    let rs_len = len.div_ceil(world) * world;
    let rs_inputs: Vec<Vec<E>> = (0..world).map(|r| input(seed, r, rs_len)).collect();
    let rs_reduced = reference_reduce(&rs_inputs, op);
    let root = (seed as usize) % world;

    let results = ThreadsEngine::new(world)
        .run(|comm| {
            let r = comm.rank();
            // Issue everything before waiting: the handles are non-blocking.
            let ag = comm.all_gather(input::<E>(seed, r, len));
            let ar = comm.all_reduce(input::<E>(seed, r, len), op);
            let rs = comm.reduce_scatter(input::<E>(seed, r, rs_len), op);
            let bc_in = if r == root {
                input::<E>(seed, r, len)
            } else {
                vec![E::from_f32(0.0); len]
            };
            let bc = comm.broadcast(bc_in, root);
            let barrier = comm.barrier();
            (
                ag.wait().unwrap(),
                ar.wait().unwrap(),
                rs.wait().unwrap(),
                bc.wait().unwrap(),
                barrier.wait().unwrap(),
            )
        })
        .unwrap();
    let chunk = rs_len / world;
    for (rank, result) in results.into_iter().enumerate() {
        let (ag, ar, rs, bc, ()) = result.unwrap();
        assert_eq!(ag, gathered, "all_gather on rank {rank}");
        assert_eq!(ar, reduced, "all_reduce {op:?} on rank {rank}");
        assert_eq!(
            rs,
            rs_reduced[rank * chunk..(rank + 1) * chunk],
            "reduce_scatter {op:?} on rank {rank}"
        );
        assert_eq!(bc, inputs[root], "broadcast from {root} on rank {rank}");
    }
}

fn op_strategy() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Mean),
        Just(ReduceOp::Max)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn f32_collectives_match_reference(world in 1usize..=8, len in 0usize..67, seed in 0u64..1000, op in op_strategy()) {
        check_all::<f32>(world, len, seed, op);
    }

    #[test]
    fn bf16_collectives_match_reference(world in 1usize..=8, len in 0usize..41, seed in 0u64..1000, op in op_strategy()) {
        check_all::<bf16>(world, len, seed, op);
    }

    #[test]
    fn f16_collectives_match_reference(world in 1usize..=8, len in 0usize..41, seed in 0u64..1000, op in op_strategy()) {
        check_all::<f16>(world, len, seed, op);
    }
}

#[test]
fn every_world_size_and_op_once() {
    for world in 1..=8 {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            check_all::<f32>(world, 2 * world + 1, world as u64, op);
        }
    }
}

#[test]
fn results_are_identical_on_every_rank_for_sums_in_rank_order() {
    // Sums whose order matters in f32: 1e8 + 1 - 1e8 depends on grouping.
    let results = ThreadsEngine::new(3)
        .run(|comm| {
            let v = [1e8f32, 1.0, -1e8][comm.rank()];
            comm.all_reduce(vec![v; 5], ReduceOp::Sum).wait().unwrap()
        })
        .unwrap();
    let expected = (1e8f32 + 1.0) + -1e8;
    for r in results {
        assert_eq!(r.unwrap(), vec![expected; 5]);
    }
}

#[test]
fn split_orders_by_key_then_rank_and_groups_by_color() {
    let results = ThreadsEngine::new(6)
        .run(|comm| {
            let r = comm.rank();
            // Colors: even/odd ranks; keys reverse the order.
            let sub = comm.split(r % 2, 10 - r).unwrap();
            let gathered = sub.all_gather(vec![r as f32]).wait().unwrap();
            (sub.rank(), sub.size(), sub.world_ranks().to_vec(), gathered)
        })
        .unwrap();
    for (r, result) in results.into_iter().enumerate() {
        let (sub_rank, size, world_ranks, gathered) = result.unwrap();
        let members: Vec<usize> = if r % 2 == 0 {
            vec![4, 2, 0]
        } else {
            vec![5, 3, 1]
        };
        assert_eq!(size, 3);
        assert_eq!(world_ranks, members);
        assert_eq!(sub_rank, members.iter().position(|&m| m == r).unwrap());
        assert_eq!(
            gathered,
            members.iter().map(|&m| m as f32).collect::<Vec<_>>()
        );
    }
}

#[test]
fn issuing_a_collective_does_not_block_the_caller() {
    // Rank 1 issues its all-reduce only after rank 0 has *returned* from
    // issuing its own. A blocking all-reduce would deadlock here (and fail
    // by the short timeout); a non-blocking one completes.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let results = ThreadsEngine::new(2)
        .timeout(std::time::Duration::from_secs(10))
        .run(|comm| {
            if comm.rank() == 0 {
                let work = comm.all_reduce(vec![1.0f32; 4], ReduceOp::Sum);
                tx.send(()).unwrap();
                work.wait()
            } else {
                rx.lock().unwrap().recv().unwrap();
                comm.all_reduce(vec![2.0f32; 4], ReduceOp::Sum).wait()
            }
        })
        .unwrap();
    for r in results {
        assert_eq!(r.unwrap().unwrap(), vec![3.0; 4]);
    }
}
