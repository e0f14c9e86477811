//! Byte accounting: what each rank sends, inside its node and across nodes.
//!
//! Engines account by the **ring algorithm**, the bandwidth-optimal schedule
//! NCCL and MPI use for large messages: group rank `i` sends only to rank
//! `(i + 1) % p`, so whether its bytes cross nodes depends on that one
//! neighbour. For a message whose gathered (or reduced) size is `M` bytes:
//!
//! | collective | bytes rank `i` sends |
//! |---|---|
//! | all-gather | `(p-1)/p · M` |
//! | reduce-scatter | `(p-1)/p · M` |
//! | all-reduce | `2(p-1)/p · M` |
//! | broadcast | `M`, by every rank of the chain from the root except its last |
//! | barrier, split | 0 (control messages only) |
//!
//! With ranks numbered node by node, a flat all-gather over `p` ranks on
//! `p/k` nodes sends `(p-1)/p · M` across nodes out of each node; the
//! hierarchical one ([`crate::hierarchical_all_gather`]) sends `(p-k)/p · M`.

use std::ops::AddAssign;

use crate::CollectiveKind;

/// Calls and bytes of one collective kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Collectives issued.
    pub calls: u64,
    /// Bytes sent to ranks on the same node.
    pub intra_node_bytes: u64,
    /// Bytes sent to ranks on other nodes.
    pub inter_node_bytes: u64,
}

/// Per-kind counters of one rank on one communicator (or summed over several).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommStats {
    kinds: [KindStats; CollectiveKind::ALL.len()],
}

impl CommStats {
    /// The counters of one kind.
    pub fn kind(&self, kind: CollectiveKind) -> KindStats {
        self.kinds[kind.index()]
    }

    /// Calls of one kind.
    pub fn calls(&self, kind: CollectiveKind) -> u64 {
        self.kind(kind).calls
    }

    /// Bytes sent inside the node, all kinds.
    pub fn intra_node_bytes(&self) -> u64 {
        self.kinds.iter().map(|k| k.intra_node_bytes).sum()
    }

    /// Bytes sent across nodes, all kinds.
    pub fn inter_node_bytes(&self) -> u64 {
        self.kinds.iter().map(|k| k.inter_node_bytes).sum()
    }

    /// Records one collective.
    pub fn record(&mut self, kind: CollectiveKind, sent: SentBytes) {
        let k = &mut self.kinds[kind.index()];
        k.calls += 1;
        k.intra_node_bytes += sent.intra_node;
        k.inter_node_bytes += sent.inter_node;
    }
}

impl AddAssign<&CommStats> for CommStats {
    fn add_assign(&mut self, other: &CommStats) {
        for (a, b) in self.kinds.iter_mut().zip(other.kinds.iter()) {
            a.calls += b.calls;
            a.intra_node_bytes += b.intra_node_bytes;
            a.inter_node_bytes += b.inter_node_bytes;
        }
    }
}

/// Bytes one rank sends in one collective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentBytes {
    /// To a rank on the same node.
    pub intra_node: u64,
    /// To a rank on another node.
    pub inter_node: u64,
}

/// The bytes group rank `rank` sends in a ring collective of `kind`, where
/// `input_bytes` is what this rank passes in and `nodes[i]` is the node of
/// group rank `i`. `root` is the broadcast root.
pub fn ring_bytes(
    kind: CollectiveKind,
    input_bytes: u64,
    nodes: &[usize],
    rank: usize,
    root: usize,
) -> SentBytes {
    let p = nodes.len() as u64;
    let next = (rank + 1) % nodes.len();
    let bytes = match kind {
        _ if p == 1 => 0,
        // Each rank forwards the p-1 chunks it does not own; a chunk is the
        // per-rank input for all-gather, 1/p of it for the reductions.
        CollectiveKind::AllGather => (p - 1) * input_bytes,
        CollectiveKind::ReduceScatter => (p - 1) * input_bytes / p,
        CollectiveKind::AllReduce => 2 * (p - 1) * input_bytes / p,
        CollectiveKind::Broadcast => {
            let last_of_chain = (root + nodes.len() - 1) % nodes.len();
            if rank == last_of_chain {
                0
            } else {
                input_bytes
            }
        }
        CollectiveKind::Barrier | CollectiveKind::Split => 0,
    };
    if nodes[rank] == nodes[next] {
        SentBytes {
            intra_node: bytes,
            inter_node: 0,
        }
    } else {
        SentBytes {
            intra_node: 0,
            inter_node: bytes,
        }
    }
}
