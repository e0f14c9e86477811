//! MiCS groups on the threads engine: the hierarchical all-gather equals the
//! flat one bit for bit, byte counters match the ring formulas, and uneven
//! shards never leak their padding.

use std::sync::Arc;

use mics_comm::{
    CollectiveKind, Collectives, CommStats, Communicator, MicsGroups, ReduceOp, Sharding,
    ThreadsEngine, Topology, all_gather_unpadded, reduce_scatter_padded,
};

fn groups_run<R: Send>(n: usize, k: usize, p: usize, f: impl Fn(MicsGroups) -> R + Sync) -> Vec<R> {
    let topology = Topology::new(n, k, p).unwrap();
    ThreadsEngine::new(n)
        .ranks_per_node(k)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            f(MicsGroups::new(world, topology).unwrap())
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Values whose bits differ everywhere (not just small integers).
fn shard_values(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 7919 + i * 31) as f32).sqrt() * 1e-3 - 0.5)
        .collect()
}

#[test]
fn hierarchical_all_gather_is_bit_identical_to_flat() {
    for (n, k, p) in [
        (4, 2, 4),
        (8, 2, 4),
        (8, 2, 8),
        (12, 2, 6),
        (16, 4, 8),
        (8, 1, 4),
    ] {
        let len = 7;
        let results = groups_run(n, k, p, |g| {
            let rank = g.world().rank();
            assert!(g.topology().is_hierarchical());
            let hier = g
                .all_gather_partition(shard_values(rank, len))
                .wait()
                .unwrap();
            let flat = g
                .partition()
                .all_gather(shard_values(rank, len))
                .wait()
                .unwrap();
            (rank, hier, flat)
        });
        for (rank, hier, flat) in results {
            let group = rank / p * p;
            let expected: Vec<f32> = (group..group + p)
                .flat_map(|r| shard_values(r, len))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&hier),
                bits(&expected),
                "hierarchical N={n} k={k} p={p} rank {rank}"
            );
            assert_eq!(
                bits(&flat),
                bits(&expected),
                "flat N={n} k={k} p={p} rank {rank}"
            );
        }
    }
}

#[test]
fn flat_ring_all_gather_sends_p_minus_1_over_p_per_rank() {
    // M = gathered bytes; each rank sends (p-1)/p * M.
    for (n, k, p) in [(4, 4, 4), (8, 8, 4), (6, 6, 3), (8, 4, 8)] {
        let shard_len = 1000;
        let m = (p * shard_len * 4) as u64;
        let stats = groups_run(n, k, p, |g| {
            g.partition()
                .all_gather(vec![1.0f32; shard_len])
                .wait()
                .unwrap();
            g.partition().stats()
        });
        for s in &stats {
            let sent = s.kind(CollectiveKind::AllGather);
            assert_eq!(sent.calls, 1);
            assert_eq!(
                sent.intra_node_bytes + sent.inter_node_bytes,
                (p as u64 - 1) * m / p as u64
            );
        }
    }
}

/// Sum of one node's ranks' inter-node bytes, as the paper counts them.
fn node_inter_bytes(stats: &[CommStats], k: usize, node: usize) -> u64 {
    stats[node * k..(node + 1) * k]
        .iter()
        .map(|s| s.inter_node_bytes())
        .sum()
}

#[test]
fn hierarchical_all_gather_cuts_cross_node_volume_from_3_4_to_1_2() {
    // The MiCS paper's example: p = 4 over two nodes of k = 2. Per node, a
    // flat ring sends (p-1)/p = 3/4 of the message M across nodes, the
    // hierarchical gather (p-k)/p = 1/2.
    let (n, k, p) = (4, 2, 4);
    let shard_len = 1024;
    let m = (p * shard_len * 4) as u64;
    let flat = groups_run(n, k, p, |g| {
        g.partition()
            .all_gather(vec![1.0f32; shard_len])
            .wait()
            .unwrap();
        g.partition().stats()
    });
    let hier = groups_run(n, k, p, |g| {
        g.all_gather_partition(vec![1.0f32; shard_len])
            .wait()
            .unwrap();
        let mut s = g.inter_node().stats();
        s += &g.intra_node().stats();
        s
    });
    for node in 0..n / k {
        assert_eq!(
            node_inter_bytes(&flat, k, node),
            3 * m / 4,
            "flat, node {node}"
        );
        assert_eq!(
            node_inter_bytes(&hier, k, node),
            m / 2,
            "hierarchical, node {node}"
        );
    }
    // General formula (p-k)/p·M per node, for larger groups.
    for (n, k, p) in [(8, 2, 8), (16, 4, 16), (16, 4, 8)] {
        let m = (p * shard_len * 4) as u64;
        let hier = groups_run(n, k, p, |g| {
            g.all_gather_partition(vec![1.0f32; shard_len])
                .wait()
                .unwrap();
            let mut s = g.inter_node().stats();
            s += &g.intra_node().stats();
            s
        });
        for node in 0..n / k {
            assert_eq!(
                node_inter_bytes(&hier, k, node),
                (p - k) as u64 * m / p as u64,
                "N={n} k={k} p={p} node {node}"
            );
        }
    }
}

#[test]
fn reduction_bytes_follow_the_ring_formulas() {
    let (n, p) = (8, 4);
    let len = 4096;
    let m = (len * 4) as u64;
    let stats = groups_run(n, n, p, |g| {
        g.partition()
            .reduce_scatter(vec![1.0f32; len], ReduceOp::Sum)
            .wait()
            .unwrap();
        g.replication()
            .all_reduce(vec![1.0f32; len], ReduceOp::Sum)
            .wait()
            .unwrap();
        (g.partition().stats(), g.replication().stats())
    });
    let r = (n / p) as u64;
    for (part, repl) in stats {
        let rs = part.kind(CollectiveKind::ReduceScatter);
        assert_eq!(rs.intra_node_bytes, (p as u64 - 1) * m / p as u64);
        let ar = repl.kind(CollectiveKind::AllReduce);
        assert_eq!(ar.intra_node_bytes, 2 * (r - 1) * m / r);
        assert_eq!(part.inter_node_bytes() + repl.inter_node_bytes(), 0);
    }
}

#[test]
fn uneven_shards_never_leak_padding() {
    // numel not divisible by p: 10 over 4 -> shards of 3, padded to 12.
    for (numel, p) in [(10, 4), (1, 4), (7, 3), (9, 9), (5, 8)] {
        let sharding = Sharding::new(numel, p);
        let full: Vec<f32> = (0..numel).map(|i| i as f32 + 0.5).collect();
        let grads: Vec<Vec<f32>> = (0..p)
            .map(|r| (0..numel).map(|i| (r * numel + i) as f32).collect())
            .collect();
        let results = ThreadsEngine::new(p)
            .run(|comm| {
                let r = comm.rank();
                let shard = sharding.shard_of(&full, r);
                assert_eq!(shard.len(), numel.div_ceil(p));
                let gathered = all_gather_unpadded(&comm, shard, sharding).wait().unwrap();
                let reduced =
                    reduce_scatter_padded(&comm, grads[r].clone(), sharding, ReduceOp::Sum)
                        .wait()
                        .unwrap();
                (gathered, reduced)
            })
            .unwrap();
        for (r, result) in results.into_iter().enumerate() {
            let (gathered, reduced) = result.unwrap();
            assert_eq!(gathered, full, "numel={numel} p={p}");
            let range = sharding.range(r);
            let mut expected: Vec<f32> = range
                .clone()
                .map(|i| (0..p).map(|q| grads[q][i]).sum())
                .collect();
            expected.resize(sharding.shard_len(), 0.0);
            assert_eq!(reduced, expected, "numel={numel} p={p} rank {r}");
        }
    }
}

#[test]
fn engine_layout_must_match_the_topology() {
    let topology = Topology::new(4, 2, 4).unwrap();
    let results = ThreadsEngine::new(4)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            MicsGroups::new(world, topology)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        })
        .unwrap();
    let msg = results[2].clone().unwrap();
    assert!(msg.contains("places rank 2 on node 0"), "{msg}");
}
