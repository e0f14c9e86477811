//! The communicators of one rank in a MiCS topology, and the hierarchical
//! all-gather.

use std::sync::Arc;

use crate::{Buffer, CommError, Communicator, Element, Fingerprint, Topology, Work};

/// One rank's communicators for a [`Topology`], split from its world
/// communicator: partition, replication, and the two stages of the
/// hierarchical all-gather.
#[derive(Debug, Clone)]
pub struct MicsGroups {
    topology: Topology,
    world: Arc<dyn Communicator>,
    partition: Arc<dyn Communicator>,
    replication: Arc<dyn Communicator>,
    intra_node: Arc<dyn Communicator>,
    inter_node: Arc<dyn Communicator>,
}

impl MicsGroups {
    /// Splits `world` into this rank's groups. Collective over the world:
    /// every rank calls it with the same topology.
    ///
    /// The engine's node layout must match the topology's `k`, so that what
    /// the topology calls a node is what the byte accounting calls one.
    pub fn new(world: Arc<dyn Communicator>, topology: Topology) -> Result<MicsGroups, CommError> {
        if world.size() != topology.world() {
            return Err(CommError::InvalidArgument(format!(
                "topology is for {} ranks but the world communicator has {}",
                topology.world(),
                world.size()
            )));
        }
        let engine_nodes = world.nodes();
        if let Some(rank) = (0..world.size()).find(|&r| engine_nodes[r] != topology.node_of(r)) {
            return Err(CommError::InvalidArgument(format!(
                "the engine places rank {rank} on node {}, but the topology ({topology}) puts it on node {}; \
                 set the engine's ranks per node to {}",
                engine_nodes[rank],
                topology.node_of(rank),
                topology.ranks_per_node()
            )));
        }
        let rank = world.rank();
        let p = topology.partition_size();
        let k = topology.ranks_per_node();
        // The same splits in the same order on every rank.
        let partition = world.split(topology.partition_index(rank), rank)?;
        let replication = world.split(rank % p, rank)?;
        let group = topology.partition_index(rank);
        let intra_node = world.split(group * topology.nodes() + topology.node_of(rank), rank)?;
        let inter_node = world.split(group * k + rank % k, rank)?;
        Ok(MicsGroups {
            topology,
            world,
            partition,
            replication,
            intra_node,
            inter_node,
        })
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// All ranks.
    pub fn world(&self) -> &Arc<dyn Communicator> {
        &self.world
    }

    /// This rank's partition group: the `p` ranks that together hold one
    /// replica of the model states.
    pub fn partition(&self) -> &Arc<dyn Communicator> {
        &self.partition
    }

    /// This rank's replication group: the `N/p` ranks holding the same shard.
    pub fn replication(&self) -> &Arc<dyn Communicator> {
        &self.replication
    }

    /// The partition group's ranks on this node (hierarchical stage two).
    pub fn intra_node(&self) -> &Arc<dyn Communicator> {
        &self.intra_node
    }

    /// The partition group's ranks with this rank's local index, one per
    /// node (hierarchical stage one).
    pub fn inter_node(&self) -> &Arc<dyn Communicator> {
        &self.inter_node
    }

    /// All-gathers a shard inside the partition group: hierarchically when
    /// the group spans several nodes (`p > k`), flat otherwise. The result is
    /// the same either way, in partition-rank order.
    pub fn all_gather_partition<E: Element>(&self, shard: Vec<E>) -> Work<Vec<E>> {
        self.all_gather_partition_with(shard, Fingerprint::NONE)
    }

    /// [`MicsGroups::all_gather_partition`] with a [`Fingerprint`] of what
    /// the shard holds, checked on every stage.
    pub fn all_gather_partition_with<E: Element>(
        &self,
        shard: Vec<E>,
        tag: Fingerprint,
    ) -> Work<Vec<E>> {
        let buffer = E::into_buffer(shard);
        let work = if self.topology.is_hierarchical() {
            hierarchical_all_gather(
                self.inter_node.as_ref(),
                self.intra_node.as_ref(),
                buffer,
                tag,
            )
        } else {
            self.partition.all_gather_tagged(buffer, tag)
        };
        work.map(|b| {
            let dtype = b.dtype();
            E::from_buffer(b).ok_or_else(|| CommError::Engine {
                engine: "collectives",
                message: format!("engine returned a {dtype} buffer for a {} gather", E::DTYPE),
            })
        })
    }
}

/// The hierarchical all-gather of MiCS (section 3.3 of the paper) over a
/// partition group spanning `p/k` nodes of `k` ranks:
///
/// 1. `inter` (the `p/k` ranks with this rank's local index, one per node)
///    all-gathers the shards: each rank now has the shards of local index
///    `l` from every node;
/// 2. `intra` (the `k` ranks of this node) all-gathers those bundles;
/// 3. the bundles are interleaved back into partition-rank order.
///
/// Only `(p-k)/p` of the message crosses nodes, instead of `(p-1)/p` for a
/// flat ring, and the result is bit-identical to the flat all-gather (it is
/// pure data movement). Both stages are issued at once; the second starts on
/// the intra communicator when the first completes.
pub fn hierarchical_all_gather(
    inter: &dyn Communicator,
    intra: &dyn Communicator,
    shard: Buffer,
    tag: Fingerprint,
) -> Work {
    let nodes = inter.size();
    let k = intra.size();
    let stage1 = inter.all_gather_tagged(shard, tag);
    intra
        .all_gather_deferred_tagged(stage1, tag)
        .map(move |bundles| Ok(interleave(bundles, nodes, k)))
}

/// `bundles` holds, for local index `l = 0..k`, the shards of partition ranks
/// `l, l+k, l+2k, ...`; returns the shards in partition-rank order.
fn interleave(bundles: Buffer, nodes: usize, k: usize) -> Buffer {
    fn typed<E: Element>(v: &[E], nodes: usize, k: usize) -> Vec<E> {
        let shard = v.len() / (nodes * k);
        let mut out = Vec::with_capacity(v.len());
        for node in 0..nodes {
            for local in 0..k {
                let at = (local * nodes + node) * shard;
                out.extend_from_slice(&v[at..at + shard]);
            }
        }
        out
    }
    match &bundles {
        Buffer::F32(v) => Buffer::F32(typed(v, nodes, k)),
        Buffer::Bf16(v) => Buffer::Bf16(typed(v, nodes, k)),
        Buffer::F16(v) => Buffer::F16(typed(v, nodes, k)),
    }
}
