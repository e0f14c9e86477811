//! The MiCS topology: which ranks share a node, a partition, a replica shard.

use std::fmt;

/// Why a `(world, ranks_per_node, partition_size)` combination is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// A size is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// `k` does not divide `N`.
    #[error(
        "ranks per node ({ranks_per_node}) must divide the world size ({world}): nodes hold the same number of ranks"
    )]
    NodesUneven {
        /// World size N.
        world: usize,
        /// Ranks per node k.
        ranks_per_node: usize,
    },
    /// `p` does not divide `N`.
    #[error(
        "partition size ({partition_size}) must divide the world size ({world}): every partition group holds a full replica"
    )]
    PartitionUneven {
        /// World size N.
        world: usize,
        /// Partition size p.
        partition_size: usize,
    },
    /// `p < k` and `p` does not divide `k`: some partition group would
    /// straddle two nodes with part of its ranks on each.
    #[error(
        "partition size ({partition_size}) is smaller than ranks per node ({ranks_per_node}) but does not divide it, so some partition group would straddle two nodes: p must divide k (groups inside a node) or be a multiple of k (groups of whole nodes)"
    )]
    PartitionStraddlesNodes {
        /// Partition size p.
        partition_size: usize,
        /// Ranks per node k.
        ranks_per_node: usize,
    },
    /// `p > k` and `k` does not divide `p`.
    #[error(
        "partition size ({partition_size}) spans several nodes, so it must be a multiple of ranks per node ({ranks_per_node}) for the hierarchical all-gather"
    )]
    PartitionSpansPartialNodes {
        /// Partition size p.
        partition_size: usize,
        /// Ranks per node k.
        ranks_per_node: usize,
    },
}

/// World of `N` ranks, `k` per node, partition groups of `p` ranks
/// (docs/design.md, "What MiCS is"). Ranks are numbered node by node.
///
/// Valid layouts: `k` and `p` divide `N`, and a partition group either lies
/// inside one node (`p` divides `k`) or is made of whole nodes (`k` divides
/// `p`, gathered hierarchically). Anything else would put part of a group on
/// one node and part on the next, which neither gather handles correctly,
/// and is rejected.
///
/// - partition group `g` = ranks `[g*p, (g+1)*p)`; it holds one full replica
///   of the model states, each rank `1/p` of it;
/// - replication group `j` = ranks `{j, j+p, j+2p, ...}`: the ranks holding
///   the same shard, one per partition group; `r = N/p` ranks;
/// - node group: the ranks of one node;
/// - when `p > k`, the hierarchical all-gather splits the partition group
///   into its *intra-node* part (the `k` ranks it has on this node) and its
///   *inter-node* part (its `p/k` ranks with this rank's local index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    world: usize,
    ranks_per_node: usize,
    partition_size: usize,
}

impl Topology {
    /// Validates and builds a topology.
    pub fn new(
        world: usize,
        ranks_per_node: usize,
        partition_size: usize,
    ) -> Result<Topology, TopologyError> {
        if world == 0 {
            return Err(TopologyError::Zero("world size"));
        }
        if ranks_per_node == 0 {
            return Err(TopologyError::Zero("ranks per node"));
        }
        if partition_size == 0 {
            return Err(TopologyError::Zero("partition size"));
        }
        if !world.is_multiple_of(ranks_per_node) {
            return Err(TopologyError::NodesUneven {
                world,
                ranks_per_node,
            });
        }
        if !world.is_multiple_of(partition_size) {
            return Err(TopologyError::PartitionUneven {
                world,
                partition_size,
            });
        }
        if partition_size < ranks_per_node && !ranks_per_node.is_multiple_of(partition_size) {
            return Err(TopologyError::PartitionStraddlesNodes {
                partition_size,
                ranks_per_node,
            });
        }
        if partition_size > ranks_per_node && !partition_size.is_multiple_of(ranks_per_node) {
            return Err(TopologyError::PartitionSpansPartialNodes {
                partition_size,
                ranks_per_node,
            });
        }
        Ok(Topology {
            world,
            ranks_per_node,
            partition_size,
        })
    }

    /// World size `N`.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Ranks per node `k`.
    pub fn ranks_per_node(&self) -> usize {
        self.ranks_per_node
    }

    /// Partition size `p`.
    pub fn partition_size(&self) -> usize {
        self.partition_size
    }

    /// Replication size `r = N/p`.
    pub fn replication_size(&self) -> usize {
        self.world / self.partition_size
    }

    /// Number of nodes `N/k`.
    pub fn nodes(&self) -> usize {
        self.world / self.ranks_per_node
    }

    /// The node of `rank`.
    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.ranks_per_node
    }

    /// Whether a partition group spans several nodes (`p > k`), so gathers
    /// inside it go hierarchically.
    pub fn is_hierarchical(&self) -> bool {
        self.partition_size > self.ranks_per_node
    }

    /// The partition group `rank` belongs to, as its index.
    pub fn partition_index(&self, rank: usize) -> usize {
        rank / self.partition_size
    }

    /// The world ranks of `rank`'s partition group, in group-rank order.
    pub fn partition_group(&self, rank: usize) -> Vec<usize> {
        let g = self.partition_index(rank);
        (g * self.partition_size..(g + 1) * self.partition_size).collect()
    }

    /// The world ranks of `rank`'s replication group (same shard index in
    /// every partition group), in group-rank order.
    pub fn replication_group(&self, rank: usize) -> Vec<usize> {
        let j = rank % self.partition_size;
        (j..self.world).step_by(self.partition_size).collect()
    }

    /// The world ranks of `rank`'s node.
    pub fn node_group(&self, rank: usize) -> Vec<usize> {
        let n = self.node_of(rank);
        (n * self.ranks_per_node..(n + 1) * self.ranks_per_node).collect()
    }

    /// The ranks of `rank`'s partition group on its own node: the second,
    /// intra-node stage of the hierarchical all-gather.
    pub fn intra_node_group(&self, rank: usize) -> Vec<usize> {
        let node = self.node_of(rank);
        self.partition_group(rank)
            .into_iter()
            .filter(|&r| self.node_of(r) == node)
            .collect()
    }

    /// The ranks of `rank`'s partition group with its local index, one per
    /// node: the first, inter-node stage of the hierarchical all-gather.
    pub fn inter_node_group(&self, rank: usize) -> Vec<usize> {
        let local = rank % self.ranks_per_node;
        self.partition_group(rank)
            .into_iter()
            .filter(|&r| r % self.ranks_per_node == local)
            .collect()
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "N={} ranks, k={} per node, p={} per partition group (r={} replicas)",
            self.world,
            self.ranks_per_node,
            self.partition_size,
            self.replication_size()
        )
    }
}
