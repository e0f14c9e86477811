//! The MiCS groups of a hierarchical (N=4, k=2, p=4) and a two-hop
//! (N=4, k=2, p=2) topology over MPI.

use std::sync::Arc;

use half::bf16;
use mics_comm::mpi::MpiComm;
use mics_comm::{
    CollectiveKind, Collectives, Communicator, MicsGroups, ReduceOp, Sharding, Topology,
    all_gather_unpadded, reduce_scatter_padded,
};

use crate::Checks;
use crate::collectives::{describe, input, reference, same_bits};

pub fn per_node(world: &Arc<MpiComm>, value: u64) -> Option<Vec<u64>> {
    let all = world.all_gather(vec![value as f32]).wait().ok()?;
    let nodes = world.nodes();
    let n_nodes = nodes.iter().max().map_or(0, |m| m + 1);
    let mut sums = vec![0u64; n_nodes];
    for (r, v) in all.iter().enumerate() {
        sums[nodes[r]] += *v as u64;
    }
    Some(sums)
}

/// (N=4, k=2, p=4): the partition group spans both nodes.
pub fn hierarchical_groups(world: &Arc<MpiComm>, c: &mut Checks) {
    let rank = world.rank();
    let topology = Topology::new(4, 2, 4).expect("valid topology");
    let groups = match MicsGroups::new(world.clone(), topology) {
        Ok(groups) => groups,
        Err(err) => {
            c.check(
                "MicsGroups for N=4 k=2 p=4 (set MICS_RANKS_PER_NODE=2)",
                false,
                || format!("{err}"),
            );
            return;
        }
    };
    c.check(
        "N=4 k=2 p=4: partition, replication, intra- and inter-node groups",
        groups.partition().world_ranks() == topology.partition_group(rank)
            && groups.replication().world_ranks() == topology.replication_group(rank)
            && groups.intra_node().world_ranks() == topology.intra_node_group(rank)
            && groups.inter_node().world_ranks() == topology.inter_node_group(rank),
        || format!("{groups:?}"),
    );

    // Hierarchical gather == flat gather == reference, bit for bit.
    let shard_len = 1023;
    for seed in [7u64, 8] {
        let mine = input::<bf16>(seed, rank, shard_len);
        let flat = groups.partition().all_gather(mine.clone()).wait();
        let hier = groups.all_gather_partition(mine).wait();
        let want: Vec<bf16> = (0..4)
            .flat_map(|r| input::<bf16>(seed, r, shard_len))
            .collect();
        c.check(
            format!("hierarchical all_gather (bf16, seed {seed}) == flat == reference"),
            hier.as_ref().is_ok_and(|h| same_bits(h, &want))
                && flat.as_ref().is_ok_and(|f| same_bits(f, &want)),
            || describe(&hier, &want),
        );
    }

    // Bytes across nodes, per node: flat 3/4 of M, hierarchical 1/2.
    let shard_len = 1024;
    let m = (4 * shard_len * 4) as u64;
    let before = groups.partition().stats().inter_node_bytes();
    let flat_ok = groups
        .partition()
        .all_gather(vec![1.0f32; shard_len])
        .wait()
        .is_ok();
    let flat = groups.partition().stats().inter_node_bytes() - before;
    let hier_stats = || {
        let mut s = groups.inter_node().stats();
        s += &groups.intra_node().stats();
        s.inter_node_bytes()
    };
    let before = hier_stats();
    let hier_ok = groups
        .all_gather_partition(vec![1.0f32; shard_len])
        .wait()
        .is_ok();
    let hier = hier_stats() - before;
    let flat_nodes = per_node(world, flat);
    let hier_nodes = per_node(world, hier);
    c.check(
        "flat all_gather sends (p-1)/p = 3/4 of M across nodes, per node",
        flat_ok && flat_nodes.as_deref() == Some(&[3 * m / 4, 3 * m / 4][..]),
        || format!("{flat_nodes:?}, expected {} per node", 3 * m / 4),
    );
    c.check(
        "hierarchical all_gather sends (p-k)/p = 1/2 of M across nodes, per node",
        hier_ok && hier_nodes.as_deref() == Some(&[m / 2, m / 2][..]),
        || format!("{hier_nodes:?}, expected {} per node", m / 2),
    );

    // Uneven shards: numel not divisible by p, padding never leaks.
    let numel = 1001;
    let sharding = Sharding::new(numel, 4);
    let grads: Vec<Vec<f32>> = (0..4).map(|r| input::<f32>(11, r, numel)).collect();
    let shard = reduce_scatter_padded(
        groups.partition().as_ref(),
        grads[rank].clone(),
        sharding,
        ReduceOp::Sum,
    )
    .wait();
    let full = match shard {
        Ok(shard) => all_gather_unpadded(groups.partition().as_ref(), shard, sharding).wait(),
        Err(err) => Err(err),
    };
    let want = reference(&grads, ReduceOp::Sum);
    c.check(
        "uneven shards: reduce_scatter_padded then all_gather_unpadded == reference",
        full.as_ref().is_ok_and(|f| same_bits(f, &want)),
        || describe(&full, &want),
    );
}

/// (N=4, k=2, p=2): two-hop gradient sync, partition inside a node,
/// replication across nodes.
pub fn two_hop_groups(world: &Arc<MpiComm>, c: &mut Checks) {
    let rank = world.rank();
    let topology = Topology::new(4, 2, 2).expect("valid topology");
    let groups = match MicsGroups::new(world.clone(), topology) {
        Ok(groups) => groups,
        Err(err) => {
            c.check("MicsGroups for N=4 k=2 p=2", false, || format!("{err}"));
            return;
        }
    };
    let (p, r) = (2usize, 2usize);
    let len = 2 * 257;
    let grads: Vec<Vec<f32>> = (0..4).map(|q| input::<f32>(21, q, len)).collect();
    let shard = groups
        .partition()
        .reduce_scatter(grads[rank].clone(), ReduceOp::Sum);
    let synced = match shard.wait() {
        Ok(shard) => groups
            .replication()
            .all_reduce(shard, ReduceOp::Mean)
            .wait(),
        Err(err) => Err(err),
    };
    // Reference: sum inside each partition group in rank order, then the
    // mean over the replication group in its rank order.
    let part_sums: Vec<Vec<f32>> = (0..r)
        .map(|g| reference(&grads[g * p..(g + 1) * p], ReduceOp::Sum))
        .collect();
    let full = reference(&part_sums, ReduceOp::Mean);
    let chunk = len / p;
    let local = rank % p;
    let want = full[local * chunk..(local + 1) * chunk].to_vec();
    c.check(
        "two-hop sync (N=4 k=2 p=2): partition reduce_scatter, replication all_reduce == reference",
        synced.as_ref().is_ok_and(|s| same_bits(s, &want)),
        || describe(&synced, &want),
    );
    let m = (len * 4) as u64;
    let part = groups
        .partition()
        .stats()
        .kind(CollectiveKind::ReduceScatter);
    let repl = groups.replication().stats().kind(CollectiveKind::AllReduce);
    let shard_bytes = m / p as u64;
    c.check(
        "two-hop bytes: reduce_scatter (p-1)/p·M inside the node, all_reduce 2(r-1)/r of the shard across nodes",
        part.intra_node_bytes == (p as u64 - 1) * m / p as u64
            && part.inter_node_bytes == 0
            && repl.inter_node_bytes == 2 * (r as u64 - 1) * shard_bytes / r as u64
            && repl.intra_node_bytes == 0,
        || format!("partition {part:?}, replication {repl:?}"),
    );
}
