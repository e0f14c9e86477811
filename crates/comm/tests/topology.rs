//! The MiCS topology against its definition, for many (N, k, p).

use mics_comm::{Topology, TopologyError};

/// Every valid (N, k, p) with N <= 32.
fn valid_topologies() -> Vec<Topology> {
    let mut out = Vec::new();
    for n in 1..=32 {
        for k in 1..=n {
            for p in 1..=n {
                if let Ok(t) = Topology::new(n, k, p) {
                    out.push(t);
                }
            }
        }
    }
    out
}

#[test]
fn groups_match_the_definitions() {
    let all = valid_topologies();
    assert!(all.len() > 100, "only {} valid topologies", all.len());
    for t in all {
        let (n, k, p) = (t.world(), t.ranks_per_node(), t.partition_size());
        for rank in 0..n {
            let g = rank / p;
            assert_eq!(
                t.partition_group(rank),
                (g * p..g * p + p).collect::<Vec<_>>(),
                "{t}"
            );
            let j = rank % p;
            let replication: Vec<usize> = (0..n / p).map(|i| j + i * p).collect();
            assert_eq!(t.replication_group(rank), replication, "{t}");
            assert_eq!(t.replication_size(), n / p);
            let node = rank / k;
            assert_eq!(
                t.node_group(rank),
                (node * k..node * k + k).collect::<Vec<_>>()
            );
            // Hierarchical stages: partition ∩ node, partition ∩ local index.
            let intra: Vec<usize> = (g * p..g * p + p).filter(|r| r / k == node).collect();
            let inter: Vec<usize> = (g * p..g * p + p).filter(|r| r % k == rank % k).collect();
            assert_eq!(t.intra_node_group(rank), intra, "{t}");
            assert_eq!(t.inter_node_group(rank), inter, "{t}");
            if t.is_hierarchical() {
                assert_eq!(intra.len(), k, "{t}");
                assert_eq!(inter.len(), p / k, "{t}");
            }
            // Every rank is in its own groups.
            assert!(t.partition_group(rank).contains(&rank));
            assert!(t.replication_group(rank).contains(&rank));
        }
        // Partition groups tile the world; replication groups pick one rank
        // per partition group, each holding the same shard index.
        let mut seen = vec![0; n];
        for g in (0..n).step_by(p) {
            for r in t.partition_group(g) {
                seen[r] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{t}");
        for j in 0..p {
            let rep = t.replication_group(j);
            let parts: Vec<usize> = rep.iter().map(|&r| t.partition_index(r)).collect();
            assert_eq!(parts, (0..n / p).collect::<Vec<_>>(), "{t}");
            assert!(rep.iter().all(|&r| r % p == j));
        }
    }
}

#[test]
fn paper_example_two_nodes_of_two_partition_four() {
    // N=8, k=2, p=4: partition groups {0..3} and {4..7}, each spanning two
    // nodes; replication groups {0,4}, {1,5}, ...
    let t = Topology::new(8, 2, 4).unwrap();
    assert!(t.is_hierarchical());
    assert_eq!(t.partition_group(5), vec![4, 5, 6, 7]);
    assert_eq!(t.replication_group(5), vec![1, 5]);
    assert_eq!(t.intra_node_group(5), vec![4, 5]);
    assert_eq!(t.inter_node_group(5), vec![5, 7]);
}

#[test]
fn partition_groups_never_straddle_nodes() {
    // Every valid layout keeps each partition group inside one node or made
    // of whole nodes: the ranks of a group on one node are either all of the
    // group or all of that node.
    for t in valid_topologies() {
        let (n, k, p) = (t.world(), t.ranks_per_node(), t.partition_size());
        for g in (0..n).step_by(p) {
            let group = t.partition_group(g);
            let nodes: std::collections::BTreeSet<usize> = group.iter().map(|r| r / k).collect();
            for node in nodes {
                let here = group.iter().filter(|&&r| r / k == node).count();
                assert!(
                    here == p || here == k,
                    "{t}: group {g} has {here} ranks on node {node}"
                );
            }
        }
    }
}

#[test]
fn invalid_combinations_name_the_rule() {
    let cases = [
        ((0, 1, 1), TopologyError::Zero("world size")),
        ((4, 0, 1), TopologyError::Zero("ranks per node")),
        ((4, 2, 0), TopologyError::Zero("partition size")),
        (
            (6, 4, 2),
            TopologyError::NodesUneven {
                world: 6,
                ranks_per_node: 4,
            },
        ),
        (
            (8, 4, 3),
            TopologyError::PartitionUneven {
                world: 8,
                partition_size: 3,
            },
        ),
        (
            (6, 3, 2),
            TopologyError::PartitionStraddlesNodes {
                partition_size: 2,
                ranks_per_node: 3,
            },
        ),
        (
            (12, 4, 3),
            TopologyError::PartitionStraddlesNodes {
                partition_size: 3,
                ranks_per_node: 4,
            },
        ),
        (
            (24, 4, 6),
            TopologyError::PartitionSpansPartialNodes {
                partition_size: 6,
                ranks_per_node: 4,
            },
        ),
    ];
    for ((n, k, p), expected) in cases {
        let err = Topology::new(n, k, p).unwrap_err();
        assert_eq!(err, expected, "N={n} k={k} p={p}");
    }
    let msg = Topology::new(8, 4, 3).unwrap_err().to_string();
    assert!(
        msg.contains("partition size (3) must divide the world size (8)"),
        "{msg}"
    );
    let msg = Topology::new(6, 3, 2).unwrap_err().to_string();
    assert!(msg.contains("p must divide k"), "{msg}");
    let msg = Topology::new(24, 4, 6).unwrap_err().to_string();
    assert!(msg.contains("multiple of ranks per node (4)"), "{msg}");
}
