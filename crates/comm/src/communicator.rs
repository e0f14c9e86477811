//! The communicator trait every engine implements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{Buffer, CommError, CommStats, Element, Work};

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum, in rank order.
    Sum,
    /// Sum in rank order, divided by the group size.
    Mean,
    /// Element-wise maximum.
    Max,
}

/// The kinds of collective, for errors and byte accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CollectiveKind {
    /// All-gather.
    AllGather,
    /// Reduce-scatter.
    ReduceScatter,
    /// All-reduce.
    AllReduce,
    /// Broadcast from a root.
    Broadcast,
    /// Barrier.
    Barrier,
    /// Split into sub-groups.
    Split,
}

impl CollectiveKind {
    /// Every kind, in a fixed order.
    pub const ALL: [CollectiveKind; 6] = [
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllReduce,
        CollectiveKind::Broadcast,
        CollectiveKind::Barrier,
        CollectiveKind::Split,
    ];

    /// Position in [`CollectiveKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::Barrier => "barrier",
            CollectiveKind::Split => "split",
        })
    }
}

/// A group of ranks that run collectives together.
///
/// Every collective is **non-blocking**: it returns a [`Work`] at once and
/// runs in the engine's background, in the order it was issued on this
/// communicator. All ranks of the group must issue the same collectives, in
/// the same order, with matching arguments; a mismatch is reported as
/// [`CommError::Mismatch`] on every rank. Engines that serialise all
/// communicators of a process on one thread (MPI, NCCL) also need the
/// collectives of *different* communicators issued in the same relative order
/// on every rank.
///
/// Rank `i` of a group holds chunk `i` of gathered and scattered buffers.
pub trait Communicator: Send + Sync + fmt::Debug {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn size(&self) -> usize;

    /// World rank of each group rank (identity for the world communicator).
    fn world_ranks(&self) -> &[usize];

    /// The node of each group rank (the engine's topology; one node if none).
    fn nodes(&self) -> &[usize];

    /// How long a collective waits for the other ranks before failing.
    fn timeout(&self) -> Duration;

    /// Concatenates every rank's `input`, in rank order. Every rank passes the
    /// same length and element type; the result is `size()` times longer.
    fn all_gather_buffer(&self, input: Buffer) -> Work;

    /// [`Communicator::all_gather_buffer`] of an input another collective is
    /// still producing: issued now, in this communicator's order, it starts
    /// once `input` completes. If `input` fails, this collective fails on
    /// every rank of this group. The hierarchical all-gather chains its two
    /// stages this way without blocking the caller.
    fn all_gather_deferred(&self, input: Work) -> Work;

    /// Reduces `input` element-wise across ranks and returns chunk `rank()`
    /// of the result. The length must be a multiple of `size()`.
    fn reduce_scatter_buffer(&self, input: Buffer, op: ReduceOp) -> Work;

    /// Reduces `input` element-wise across ranks; every rank gets the result.
    fn all_reduce_buffer(&self, input: Buffer, op: ReduceOp) -> Work;

    /// Every rank gets `root`'s buffer. Non-root ranks pass a buffer of the
    /// same length and type (its contents are ignored).
    fn broadcast_buffer(&self, input: Buffer, root: usize) -> Work;

    /// Completes once every rank has arrived.
    fn barrier(&self) -> Work<()>;

    /// Splits the group: ranks passing the same `color` form a new group,
    /// ordered by `(key, rank)`. Blocking, and collective over this group.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError>;

    /// Bytes and calls this rank has sent through this communicator.
    fn stats(&self) -> CommStats;
}

/// Typed conveniences over [`Communicator`], for any element type.
pub trait Collectives: Communicator {
    /// [`Communicator::all_gather_buffer`] on a typed vector.
    fn all_gather<E: Element>(&self, input: Vec<E>) -> Work<Vec<E>> {
        self.all_gather_buffer(E::into_buffer(input))
            .map(unwrap_typed::<E>)
    }

    /// [`Communicator::reduce_scatter_buffer`] on a typed vector.
    fn reduce_scatter<E: Element>(&self, input: Vec<E>, op: ReduceOp) -> Work<Vec<E>> {
        self.reduce_scatter_buffer(E::into_buffer(input), op)
            .map(unwrap_typed::<E>)
    }

    /// [`Communicator::all_reduce_buffer`] on a typed vector.
    fn all_reduce<E: Element>(&self, input: Vec<E>, op: ReduceOp) -> Work<Vec<E>> {
        self.all_reduce_buffer(E::into_buffer(input), op)
            .map(unwrap_typed::<E>)
    }

    /// [`Communicator::broadcast_buffer`] on a typed vector.
    fn broadcast<E: Element>(&self, input: Vec<E>, root: usize) -> Work<Vec<E>> {
        self.broadcast_buffer(E::into_buffer(input), root)
            .map(unwrap_typed::<E>)
    }
}

impl<C: Communicator + ?Sized> Collectives for C {}

fn unwrap_typed<E: Element>(buffer: Buffer) -> Result<Vec<E>, CommError> {
    let dtype = buffer.dtype();
    E::from_buffer(buffer).ok_or_else(|| CommError::Engine {
        engine: "collectives",
        message: format!(
            "engine returned a {dtype} buffer for a {} collective",
            E::DTYPE
        ),
    })
}

/// The arguments of one collective, compared across ranks to catch mismatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpDesc {
    /// Which collective.
    pub kind: CollectiveKind,
    /// Element type.
    pub dtype: Option<crate::DType>,
    /// Elements passed by this rank.
    pub len: usize,
    /// Reduce operation, for reductions.
    pub op: Option<ReduceOp>,
    /// Root, for broadcast.
    pub root: Option<usize>,
}

impl OpDesc {
    /// The description of a collective on `input`.
    pub fn new(kind: CollectiveKind, input: Option<&Buffer>) -> OpDesc {
        OpDesc {
            kind,
            dtype: input.map(Buffer::dtype),
            len: input.map_or(0, Buffer::len),
            op: None,
            root: None,
        }
    }
}

impl fmt::Display for OpDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(dtype) = self.dtype {
            write!(f, " of {} {dtype} elements", self.len)?;
        }
        if let Some(op) = self.op {
            write!(f, " with {op:?}")?;
        }
        if let Some(root) = self.root {
            write!(f, " from root {root}")?;
        }
        Ok(())
    }
}

impl OpDesc {
    /// The description of a collective queued before its input is known; the
    /// engine fills in element type and length when the input arrives.
    pub(crate) fn queued(
        kind: CollectiveKind,
        op: Option<ReduceOp>,
        root: Option<usize>,
    ) -> OpDesc {
        OpDesc {
            kind,
            dtype: None,
            len: 0,
            op,
            root,
        }
    }
}

/// Where a queued collective's input comes from.
pub(crate) enum Input {
    /// No payload (barrier).
    None,
    /// A buffer the caller passed.
    Ready(Buffer),
    /// The result of another collective, waited for on the engine's thread.
    Later(Work),
}

/// The collective methods of [`Communicator`] for an engine that queues every
/// collective through `fn submit(&self, desc: OpDesc, input: Input) -> Work`.
macro_rules! queued_collectives {
    () => {
        fn all_gather_buffer(&self, input: $crate::Buffer) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllGather, None, None);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn all_gather_deferred(&self, input: $crate::Work) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllGather, None, None);
            self.submit(d, $crate::communicator::Input::Later(input))
        }

        fn reduce_scatter_buffer(
            &self,
            input: $crate::Buffer,
            op: $crate::ReduceOp,
        ) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::ReduceScatter, Some(op), None);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn all_reduce_buffer(&self, input: $crate::Buffer, op: $crate::ReduceOp) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllReduce, Some(op), None);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn broadcast_buffer(&self, input: $crate::Buffer, root: usize) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::Broadcast, None, Some(root));
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn barrier(&self) -> $crate::Work<()> {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::Barrier, None, None);
            self.submit(d, $crate::communicator::Input::None)
                .map(|_| Ok(()))
        }
    };
}
pub(crate) use queued_collectives;

/// Checks arguments that are wrong on their own, before communicating.
pub fn validate_local(desc: &OpDesc, size: usize) -> Result<(), CommError> {
    match desc.kind {
        CollectiveKind::ReduceScatter if !desc.len.is_multiple_of(size) => {
            Err(CommError::InvalidArgument(format!(
                "reduce_scatter of {} elements over {size} ranks: the length must be a multiple \
                 of the group size (pad it with mics_comm::Sharding)",
                desc.len
            )))
        }
        CollectiveKind::Broadcast if desc.root.is_some_and(|r| r >= size) => {
            Err(CommError::InvalidArgument(format!(
                "broadcast from root {} in a group of {size} ranks",
                desc.root.unwrap_or_default()
            )))
        }
        _ => Ok(()),
    }
}

/// Finds the first rank whose arguments differ from rank 0's.
pub fn check_matching(seq: u64, descs: &[OpDesc]) -> Result<(), CommError> {
    let first = descs[0];
    match descs.iter().position(|d| *d != first) {
        None => Ok(()),
        Some(rank) => Err(CommError::Mismatch {
            kind: first.kind,
            seq,
            rank,
            expected: first.to_string(),
            found: descs[rank].to_string(),
        }),
    }
}
