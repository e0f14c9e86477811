//! Alpha-beta costs of ring and hierarchical collectives on a two-level
//! topology (NVLink inside a node, the network between nodes).
//!
//! A ring collective over `n` ranks takes `n-1` steps (all-gather,
//! reduce-scatter) or `2(n-1)` (all-reduce); each step pays a hop latency and
//! moves `M/n` bytes, so each rank sends `(n-1)/n·M` (twice that for
//! all-reduce). When the ring spans several nodes, each node's network link
//! carries the ring's traffic once: `(n-1)/n·M` per node per ring, shared by
//! the rings of every group that has ranks in the node.

use crate::cluster::ClusterSpec;

/// Which collective (`all_gather`, `reduce_scatter`, `all_reduce` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    /// Every rank ends with the concatenation of all shards.
    AllGather,
    /// Every rank ends with the sum of its shard over the group.
    ReduceScatter,
    /// Every rank ends with the sum over the group.
    AllReduce,
}

impl Collective {
    /// Ring steps for a group of `n` ranks.
    fn steps(self, n: u64) -> u64 {
        match self {
            Collective::AllGather | Collective::ReduceScatter => n - 1,
            Collective::AllReduce => 2 * (n - 1),
        }
    }

    /// Bytes each rank sends, as a fraction of the full message.
    fn send_factor(self, n: u64) -> f64 {
        self.steps(n) as f64 / n as f64
    }
}

/// How a communication group sits on the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Ranks in the group.
    pub size: u64,
    /// Ranks of the group in each node it touches.
    pub ranks_per_node: u64,
    /// Groups of the same kind that run at once and share each node's network
    /// link (e.g. the `k` replication groups of MiCS when `p >= k`).
    pub concurrent_per_node: u64,
}

impl Group {
    /// Nodes the group spans.
    pub fn nodes(&self) -> u64 {
        self.size / self.ranks_per_node
    }
}

/// Time and traffic of one or more collectives.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommCost {
    /// Seconds spent on NVLink-only collectives.
    pub intra_time_s: f64,
    /// Seconds spent on collectives that cross the network.
    pub inter_time_s: f64,
    /// Bytes one GPU sends to GPUs of its own node (average over the node).
    pub intra_bytes: f64,
    /// Bytes one GPU sends to other nodes (average over the node).
    pub inter_bytes: f64,
}

impl CommCost {
    /// Time if every part ran one after the other.
    pub fn serial_time_s(&self) -> f64 {
        self.intra_time_s + self.inter_time_s
    }

    /// Time when NVLink-only and network collectives run at once on their own
    /// links, each kind serialised on its own.
    pub fn concurrent_time_s(&self) -> f64 {
        self.intra_time_s.max(self.inter_time_s)
    }

    /// This cost `times` times over.
    pub fn scaled(self, times: f64) -> Self {
        Self {
            intra_time_s: self.intra_time_s * times,
            inter_time_s: self.inter_time_s * times,
            intra_bytes: self.intra_bytes * times,
            inter_bytes: self.inter_bytes * times,
        }
    }
}

impl std::ops::Add for CommCost {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            intra_time_s: self.intra_time_s + other.intra_time_s,
            inter_time_s: self.inter_time_s + other.inter_time_s,
            intra_bytes: self.intra_bytes + other.intra_bytes,
            inter_bytes: self.inter_bytes + other.inter_bytes,
        }
    }
}

impl std::ops::AddAssign for CommCost {
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

/// One ring collective of a `message_bytes` message (the full, gathered or
/// reduced size) over `group`.
///
/// Inside one node: `t = base + steps·α_nvlink + factor·M / B_nvlink`.
/// Across nodes the `nodes-1` (all-reduce: `2(nodes-1)`) hops that leave a node
/// pay the network latency and the bandwidth term is set by the slower of the
/// GPU's NVLink and its share of the node's network link:
/// `factor·M · max(c / B_net, 1 / B_nvlink)` with `c` concurrent groups.
pub fn ring(cluster: &ClusterSpec, op: Collective, group: Group, message_bytes: f64) -> CommCost {
    let n = group.size;
    if n <= 1 || message_bytes <= 0.0 {
        return CommCost::default();
    }
    let steps = op.steps(n) as f64;
    let factor = op.send_factor(n);
    let base = cluster.base_latency_us * 1e-6;
    let nodes = group.nodes();
    if nodes <= 1 {
        return CommCost {
            intra_time_s: base
                + steps * cluster.intra_latency_us * 1e-6
                + factor * message_bytes / cluster.intra_bytes_per_s(),
            inter_time_s: 0.0,
            intra_bytes: factor * message_bytes,
            inter_bytes: 0.0,
        };
    }
    let inter_steps = match op {
        Collective::AllReduce => 2 * (nodes - 1),
        _ => nodes - 1,
    } as f64;
    let latency = base
        + (steps - inter_steps) * cluster.intra_latency_us * 1e-6
        + inter_steps * cluster.inter_latency_us * 1e-6;
    let per_byte = (group.concurrent_per_node as f64 / cluster.inter_bytes_per_s())
        .max(1.0 / cluster.intra_bytes_per_s());
    let m = group.ranks_per_node as f64;
    // One rank per node and ring sends across the node boundary; the others
    // forward inside the node.
    CommCost {
        intra_time_s: 0.0,
        inter_time_s: latency + factor * message_bytes * per_byte,
        intra_bytes: factor * message_bytes * (m - 1.0) / m,
        inter_bytes: factor * message_bytes / m,
    }
}

/// MiCS's hierarchical all-gather inside a partition group of `p` ranks that
/// spans `p/k` whole nodes: first `k` concurrent ring all-gathers of `M/k`
/// bytes among the ranks with the same local index (one per node), then a ring
/// all-gather of `M` inside each node. Each node sends `(p-k)/p·M` over the
/// network instead of the flat ring's `(p-1)/p·M`.
pub fn hierarchical_all_gather(cluster: &ClusterSpec, p: u64, message_bytes: f64) -> CommCost {
    let k = cluster.gpus_per_node;
    assert!(
        p > k && p.is_multiple_of(k),
        "hierarchical all-gather needs p a multiple of k"
    );
    let cross = ring(
        cluster,
        Collective::AllGather,
        Group {
            size: p / k,
            ranks_per_node: 1,
            concurrent_per_node: k,
        },
        message_bytes / k as f64,
    );
    let local = ring(
        cluster,
        Collective::AllGather,
        Group {
            size: k,
            ranks_per_node: k,
            concurrent_per_node: 1,
        },
        message_bytes,
    );
    cross + local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_gpu_nodes() -> ClusterSpec {
        ClusterSpec {
            gpus_per_node: 2,
            ..ClusterSpec::preset("p4d").unwrap()
        }
    }

    #[test]
    fn hierarchical_gather_cuts_cross_node_volume_from_three_quarters_to_half() {
        // The paper's example: p = 4 ranks on nodes of k = 2. Per node, the flat
        // ring sends (p-1)/p = 3/4 of the message across nodes, the hierarchical
        // gather (p-k)/p = 1/2.
        let cluster = two_gpu_nodes();
        let message = 1e9;
        let flat = ring(
            &cluster,
            Collective::AllGather,
            Group {
                size: 4,
                ranks_per_node: 2,
                concurrent_per_node: 1,
            },
            message,
        );
        let hier = hierarchical_all_gather(&cluster, 4, message);
        let per_node = |c: CommCost| c.inter_bytes * 2.0 / message;
        assert!((per_node(flat) - 0.75).abs() < 1e-12, "{}", per_node(flat));
        assert!((per_node(hier) - 0.5).abs() < 1e-12, "{}", per_node(hier));
        // Both deliver the same data to every rank: (p-1)/p of M received.
        let total = |c: CommCost| c.inter_bytes + c.intra_bytes;
        assert!((total(flat) - 0.75 * message).abs() < 1.0);
        // The hierarchical one sends 1/4 across and 1/2 inside per GPU.
        assert!((total(hier) - 0.75 * message).abs() < 1.0);
        assert!(hier.serial_time_s() < flat.serial_time_s());
    }

    #[test]
    fn ring_bandwidth_term_does_not_grow_with_the_ring_but_latency_does() {
        let cluster = ClusterSpec::preset("p4d").unwrap();
        let cost = |n: u64, bytes: f64| {
            ring(
                &cluster,
                Collective::AllGather,
                Group {
                    size: n,
                    ranks_per_node: 8,
                    concurrent_per_node: 1,
                },
                bytes,
            )
            .serial_time_s()
        };
        // A large message: time nearly independent of the ring size.
        // (511/512)/(63/64) = 1.014 of bandwidth, plus ~1% of latency.
        let ratio = cost(512, 1e10) / cost(64, 1e10);
        assert!(ratio < 1.03, "{ratio}");
        // A small one: latency-bound, grows about linearly with the ring.
        let ratio = cost(512, 1e4) / cost(64, 1e4);
        assert!(ratio > 6.0 && ratio < 9.0, "{ratio}");
    }
}
