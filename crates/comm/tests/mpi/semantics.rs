//! What the engine promises beyond the values: collectives issued at once,
//! deferred inputs, mismatched arguments as errors on every rank, splits and
//! byte counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use mics_comm::mpi::MpiComm;
use mics_comm::{
    Buffer, CollectiveKind, Collectives, CommError, Communicator, Fingerprint, ReduceOp, Work,
};

use crate::Checks;

// ---------------------------------------------------------------------

pub fn non_blocking(world: &Arc<MpiComm>, c: &mut Checks) {
    let (rank, p) = (world.rank(), world.size());
    let synced = world.barrier().wait();
    if rank == 1 {
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    let mut work = world.all_gather(vec![rank as f32; 1 << 16]);
    let issued = t.elapsed();
    let ready_at_once = work.is_ready();
    let result = work.wait();
    let ok = synced.is_ok()
        && result
            .as_ref()
            .is_ok_and(|v| v.len() == p << 16 && v[(p - 1) << 16] == (p - 1) as f32)
        && (rank == 1 || (issued < Duration::from_millis(100) && !ready_at_once));
    c.check(
        "issuing a collective returns at once; it completes when the late rank arrives",
        ok,
        || {
            format!(
                "issue took {issued:?}, ready at once: {ready_at_once}, result ok: {}",
                result.is_ok()
            )
        },
    );
}

pub fn deferred(world: &Arc<MpiComm>, c: &mut Checks) {
    let (rank, p) = (world.rank(), world.size());
    // Chained on an earlier collective of another communicator.
    let dup = world.split_mpi(0, rank).expect("split");
    let first = world.all_gather_buffer(Buffer::F32(vec![rank as f32; 3]));
    let second = dup.all_gather_deferred(first);
    let want: Vec<f32> = (0..p)
        .flat_map(|_| (0..p).flat_map(|r| [r as f32; 3]))
        .collect();
    let got = second.wait();
    c.check(
        "all_gather_deferred on a collective issued earlier",
        got.as_ref().is_ok_and(|b| *b == Buffer::F32(want.clone())),
        || format!("{got:?}"),
    );

    // A failed input fails the collective on every rank and poisons the
    // communicator on every rank.
    let input = if rank == 1 {
        Work::failed(CommError::InvalidArgument("boom".into()))
    } else {
        Work::ready(Ok(Buffer::F32(vec![1.0; 2])))
    };
    let got = dup.all_gather_deferred(input).wait();
    let ok = match &got {
        Err(CommError::InvalidArgument(m)) => rank == 1 && m == "boom",
        Err(CommError::Engine { message, .. }) => rank != 1 && message.contains("rank 1"),
        _ => false,
    };
    c.check(
        "a failed deferred input fails the gather on every rank",
        ok,
        || format!("{got:?}"),
    );
    let later = dup.barrier().wait();
    c.check(
        "after a failed input the communicator is poisoned on every rank",
        matches!(later, Err(CommError::Poisoned(_))),
        || format!("{later:?}"),
    );
    let world_ok = world.barrier().wait();
    c.check(
        "the poisoned communicator does not affect the world",
        world_ok.is_ok(),
        || format!("{world_ok:?}"),
    );
}

pub fn mismatches(world: &Arc<MpiComm>, c: &mut Checks) {
    let (rank, p) = (world.rank(), world.size());
    let comm = world.split_mpi(0, rank).expect("split");
    let is_mismatch = |r: &Result<Vec<f32>, CommError>, at: usize| matches!(r, Err(CommError::Mismatch { rank, .. }) if *rank == at);
    let last = p - 1;

    let len = if rank == last { 4 } else { 3 };
    let got = comm.all_gather(vec![0.0f32; len]).wait();
    c.check(
        "all_gather with a different length on one rank: Mismatch on every rank",
        is_mismatch(&got, last),
        || format!("{got:?}"),
    );

    let got = if rank == 1 {
        comm.all_gather(vec![bf16::ZERO; 3])
            .wait()
            .map(|_| Vec::new())
    } else {
        comm.all_gather(vec![0.0f32; 3]).wait()
    };
    c.check(
        "all_gather of bf16 on one rank and f32 elsewhere: Mismatch on every rank",
        is_mismatch(&got, 1),
        || format!("{got:?}"),
    );

    let op = if rank == last {
        ReduceOp::Max
    } else {
        ReduceOp::Sum
    };
    let got = comm.all_reduce(vec![1.0f32; 5], op).wait();
    c.check(
        "all_reduce with another op on one rank: Mismatch on every rank",
        is_mismatch(&got, last),
        || format!("{got:?}"),
    );

    // Equal lengths, other pieces: only the fingerprint tells them apart.
    let (a, b) = ([7u64, 3], [9u64, 3]);
    let tag = if rank == last {
        Fingerprint::of_pieces([b, a])
    } else {
        Fingerprint::of_pieces([a, b])
    };
    let got = comm.all_gather_with(vec![0.0f32; 6], tag).wait();
    c.check(
        "all_gather of a buffer packed in another order on one rank: Mismatch on every rank",
        is_mismatch(&got, last),
        || format!("{got:?}"),
    );
    let got = comm
        .reduce_scatter_with(vec![1.0f32; 2 * p], ReduceOp::Sum, tag)
        .wait();
    c.check(
        "reduce_scatter of a bucket packed in another order on one rank: Mismatch on every rank",
        is_mismatch(&got, last),
        || format!("{got:?}"),
    );
    let got = comm
        .all_reduce_with(vec![1.0f32; 6], ReduceOp::Sum, tag)
        .wait();
    c.check(
        "all_reduce of a bucket packed in another order on one rank: Mismatch on every rank",
        is_mismatch(&got, last),
        || format!("{got:?}"),
    );
    let same = Fingerprint::of_pieces([a, b]);
    let got = comm.all_gather_with(vec![1.0f32; 6], same).wait();
    c.check(
        "all_gather with matching fingerprints succeeds",
        got.as_ref().is_ok_and(|v| v.len() == 6 * p),
        || format!("{got:?}"),
    );

    let root = usize::from(rank == 1);
    let got = comm.broadcast(vec![1.0f32; 5], root).wait();
    c.check(
        "broadcast with another root on one rank: Mismatch on every rank",
        is_mismatch(&got, 1),
        || format!("{got:?}"),
    );

    let got = if rank == 0 {
        comm.barrier().wait().map(|_| Vec::new())
    } else {
        comm.all_gather(vec![1.0f32; 2]).wait()
    };
    c.check(
        "barrier on rank 0, all_gather elsewhere: Mismatch on every rank",
        is_mismatch(&got, 1),
        || format!("{got:?}"),
    );

    let got = comm
        .reduce_scatter(vec![1.0f32; p + 1], ReduceOp::Sum)
        .wait();
    c.check(
        "reduce_scatter of a length not divisible by p: InvalidArgument on every rank",
        matches!(got, Err(CommError::InvalidArgument(_))),
        || format!("{got:?}"),
    );
    let got = comm.broadcast(vec![1.0f32; 2], p).wait();
    c.check(
        "broadcast from a root outside the group: InvalidArgument on every rank",
        matches!(got, Err(CommError::InvalidArgument(_))),
        || format!("{got:?}"),
    );

    let got = comm.all_gather(vec![rank as f32]).wait();
    let want: Vec<f32> = (0..p).map(|r| r as f32).collect();
    c.check(
        "after mismatches the communicator still works",
        got.as_ref().is_ok_and(|v| *v == want),
        || format!("{got:?}"),
    );
}

pub fn splits(world: &Arc<MpiComm>, c: &mut Checks) {
    let (rank, p) = (world.rank(), world.size());
    // Odd and even ranks, ordered by descending world rank; colors far
    // beyond a C int.
    let color = usize::MAX - rank % 2;
    let sub = world.split(color, p - rank);
    let mut members: Vec<usize> = (0..p).filter(|r| r % 2 == rank % 2).collect();
    members.reverse();
    match sub {
        Ok(sub) => {
            let want_nodes: Vec<usize> = members.iter().map(|&r| world.nodes()[r]).collect();
            c.check(
                "split by (color, key): membership, order, world ranks and nodes",
                sub.size() == members.len()
                    && sub.world_ranks() == members
                    && members[sub.rank()] == rank
                    && sub.nodes() == want_nodes,
                || format!("{sub:?}, expected members {members:?}"),
            );
            let got = sub.all_gather(vec![rank as f32]).wait();
            let want: Vec<f32> = members.iter().map(|&r| r as f32).collect();
            c.check(
                "all_gather on a split group follows the key order",
                got.as_ref().is_ok_and(|v| *v == want),
                || format!("{got:?}, expected {want:?}"),
            );
            let got = sub.all_reduce(vec![rank as f32], ReduceOp::Sum).wait();
            let want = members.iter().sum::<usize>() as f32;
            c.check(
                "all_reduce on a split group",
                got.as_ref().is_ok_and(|v| *v == [want]),
                || format!("{got:?}"),
            );
        }
        Err(err) => c.check("split", false, || format!("{err}")),
    }
    // Singleton groups.
    match world.split(rank, 0) {
        Ok(single) => {
            let got = single.all_reduce(vec![2.5f32, -1.0], ReduceOp::Mean).wait();
            c.check(
                "a group of one rank",
                single.size() == 1 && got.as_ref().is_ok_and(|v| *v == [2.5, -1.0]),
                || format!("{got:?}"),
            );
        }
        Err(err) => c.check("split into singletons", false, || format!("{err}")),
    }
}

/// Byte counters against the ring formulas, on a fresh communicator.
pub fn byte_counters(world: &Arc<MpiComm>, c: &mut Checks) {
    let (rank, p) = (world.rank(), world.size());
    let comm = world.split_mpi(0, rank).expect("split");
    let nodes = comm.nodes().to_vec();
    let crosses = nodes[rank] != nodes[(rank + 1) % p];
    let p64 = p as u64;
    let len = 96 * p; // divisible by p
    let m = (len * 4) as u64;
    let root = 1 % p;
    let ok = comm.all_gather(vec![1.0f32; len]).wait().is_ok()
        && comm
            .reduce_scatter(vec![1.0f32; len], ReduceOp::Sum)
            .wait()
            .is_ok()
        && comm
            .all_reduce(vec![1.0f32; len], ReduceOp::Sum)
            .wait()
            .is_ok()
        && comm.broadcast(vec![1.0f32; len], root).wait().is_ok()
        && comm.barrier().wait().is_ok();
    let stats = comm.stats();
    let expected = [
        (CollectiveKind::AllGather, (p64 - 1) * m),
        (CollectiveKind::ReduceScatter, (p64 - 1) * m / p64),
        (CollectiveKind::AllReduce, 2 * (p64 - 1) * m / p64),
        (
            CollectiveKind::Broadcast,
            if rank == (root + p - 1) % p { 0 } else { m },
        ),
        (CollectiveKind::Barrier, 0),
    ];
    for (kind, bytes) in expected {
        let k = stats.kind(kind);
        let (intra, inter) = if crosses { (0, bytes) } else { (bytes, 0) };
        c.check(
            format!("byte counters of {kind} follow the ring formula"),
            ok && k.calls == 1 && k.intra_node_bytes == intra && k.inter_node_bytes == inter,
            || format!("{k:?}, expected {intra} intra and {inter} inter bytes"),
        );
    }
}
