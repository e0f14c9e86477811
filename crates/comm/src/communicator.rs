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
    fn all_gather_buffer(&self, input: Buffer) -> Work {
        self.all_gather_tagged(input, Fingerprint::NONE)
    }

    /// [`Communicator::all_gather_buffer`] with a [`Fingerprint`] of what the
    /// buffer holds: ranks whose fingerprints differ fail with
    /// [`CommError::Mismatch`] before any data moves.
    fn all_gather_tagged(&self, input: Buffer, tag: Fingerprint) -> Work;

    /// [`Communicator::all_gather_buffer`] of an input another collective is
    /// still producing: issued now, in this communicator's order, it starts
    /// once `input` completes. If `input` fails, this collective fails on
    /// every rank of this group. The hierarchical all-gather chains its two
    /// stages this way without blocking the caller.
    fn all_gather_deferred(&self, input: Work) -> Work {
        self.all_gather_deferred_tagged(input, Fingerprint::NONE)
    }

    /// [`Communicator::all_gather_deferred`] with a [`Fingerprint`].
    fn all_gather_deferred_tagged(&self, input: Work, tag: Fingerprint) -> Work;

    /// Reduces `input` element-wise across ranks and returns chunk `rank()`
    /// of the result. The length must be a multiple of `size()`.
    fn reduce_scatter_buffer(&self, input: Buffer, op: ReduceOp) -> Work {
        self.reduce_scatter_tagged(input, op, Fingerprint::NONE)
    }

    /// [`Communicator::reduce_scatter_buffer`] with a [`Fingerprint`].
    fn reduce_scatter_tagged(&self, input: Buffer, op: ReduceOp, tag: Fingerprint) -> Work;

    /// Reduces `input` element-wise across ranks; every rank gets the result.
    fn all_reduce_buffer(&self, input: Buffer, op: ReduceOp) -> Work {
        self.all_reduce_tagged(input, op, Fingerprint::NONE)
    }

    /// [`Communicator::all_reduce_buffer`] with a [`Fingerprint`].
    fn all_reduce_tagged(&self, input: Buffer, op: ReduceOp, tag: Fingerprint) -> Work;

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

    /// [`Communicator::all_gather_tagged`] on a typed vector.
    fn all_gather_with<E: Element>(&self, input: Vec<E>, tag: Fingerprint) -> Work<Vec<E>> {
        self.all_gather_tagged(E::into_buffer(input), tag)
            .map(unwrap_typed::<E>)
    }

    /// [`Communicator::reduce_scatter_tagged`] on a typed vector.
    fn reduce_scatter_with<E: Element>(
        &self,
        input: Vec<E>,
        op: ReduceOp,
        tag: Fingerprint,
    ) -> Work<Vec<E>> {
        self.reduce_scatter_tagged(E::into_buffer(input), op, tag)
            .map(unwrap_typed::<E>)
    }

    /// [`Communicator::all_reduce_tagged`] on a typed vector.
    fn all_reduce_with<E: Element>(
        &self,
        input: Vec<E>,
        op: ReduceOp,
        tag: Fingerprint,
    ) -> Work<Vec<E>> {
        self.all_reduce_tagged(E::into_buffer(input), op, tag)
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
    /// What the buffer holds beyond its length (the pieces of a packed
    /// buffer), hashed; [`Fingerprint::NONE`] when the caller gave none.
    pub fingerprint: Fingerprint,
}

/// A hash of what a collective exchanges beyond its length and element
/// type: for a packed buffer, the identity and length of every piece, in
/// order. Two ranks whose op order differs but whose packed lengths happen to
/// match would otherwise exchange the wrong data without an error; with a
/// fingerprint, every engine fails such a collective with
/// [`CommError::Mismatch`] on every rank, before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// No fingerprint: only kind, element type, length, operation and root
    /// are compared.
    pub const NONE: Fingerprint = Fingerprint(0);

    /// The fingerprint of a sequence of pieces, each described by a few
    /// integers (e.g. a parameter's identity, version and length). Order
    /// matters. Deterministic across processes (FNV-1a over the words), so
    /// MPI ranks in separate processes agree.
    pub fn of_pieces<I, P>(pieces: I) -> Fingerprint
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u64]>,
    {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut eat = |word: u64| {
            for byte in word.to_le_bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for piece in pieces {
            let words = piece.as_ref();
            eat(words.len() as u64);
            words.iter().for_each(|&w| eat(w));
        }
        // Never NONE: a fingerprinted collective is told apart from an
        // unfingerprinted one.
        Fingerprint(hash.max(1))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
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
            fingerprint: Fingerprint::NONE,
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
        if self.fingerprint != Fingerprint::NONE {
            write!(f, " with fingerprint {}", self.fingerprint)?;
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
        fingerprint: Fingerprint,
    ) -> OpDesc {
        OpDesc {
            kind,
            dtype: None,
            len: 0,
            op,
            root,
            fingerprint,
        }
    }
}

/// Words an engine exchanges before every collective (MPI and NCCL): the
/// descriptor, this rank's input status and, for a split, its colour and key.
/// One wire format for every engine that exchanges descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]
pub(crate) struct WireDesc {
    pub desc: OpDesc,
    /// [`WireDesc::STATUS_OK`] or [`WireDesc::STATUS_INPUT_FAILED`].
    pub status: u64,
    pub color: usize,
    pub key: usize,
}

#[cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]
impl WireDesc {
    /// Words per descriptor.
    pub const WORDS: usize = 9;
    /// The input is here.
    pub const STATUS_OK: u64 = 0;
    /// The input (a deferred collective's) failed on this rank.
    pub const STATUS_INPUT_FAILED: u64 = 1;
    const NONE: u64 = u64::MAX;

    pub fn new(desc: OpDesc, status: u64, color: usize, key: usize) -> WireDesc {
        WireDesc {
            desc,
            status,
            color,
            key,
        }
    }

    pub fn encode(&self) -> [u64; Self::WORDS] {
        let d = &self.desc;
        [
            d.kind.index() as u64,
            d.dtype.map_or(Self::NONE, |t| t as u64),
            d.len as u64,
            d.op.map_or(Self::NONE, |o| o as u64),
            d.root.map_or(Self::NONE, |r| r as u64),
            d.fingerprint.0,
            self.status,
            self.color as u64,
            self.key as u64,
        ]
    }

    /// The inverse of [`WireDesc::encode`]; unknown codes decode to `None`.
    pub fn decode(words: &[u64]) -> WireDesc {
        let dtype = [crate::DType::F32, crate::DType::Bf16, crate::DType::F16]
            .into_iter()
            .find(|&t| t as u64 == words[1]);
        let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max]
            .into_iter()
            .find(|&o| o as u64 == words[3]);
        WireDesc {
            desc: OpDesc {
                kind: CollectiveKind::ALL
                    .get(words[0] as usize)
                    .copied()
                    .unwrap_or(CollectiveKind::Barrier),
                dtype,
                len: words[2] as usize,
                op,
                root: (words[4] != Self::NONE).then_some(words[4] as usize),
                fingerprint: Fingerprint(words[5]),
            },
            status: words[6],
            color: words[7] as usize,
            key: words[8] as usize,
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
        fn all_gather_tagged(
            &self,
            input: $crate::Buffer,
            tag: $crate::Fingerprint,
        ) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllGather, None, None, tag);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn all_gather_deferred_tagged(
            &self,
            input: $crate::Work,
            tag: $crate::Fingerprint,
        ) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllGather, None, None, tag);
            self.submit(d, $crate::communicator::Input::Later(input))
        }

        fn reduce_scatter_tagged(
            &self,
            input: $crate::Buffer,
            op: $crate::ReduceOp,
            tag: $crate::Fingerprint,
        ) -> $crate::Work {
            let d =
                $crate::OpDesc::queued($crate::CollectiveKind::ReduceScatter, Some(op), None, tag);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn all_reduce_tagged(
            &self,
            input: $crate::Buffer,
            op: $crate::ReduceOp,
            tag: $crate::Fingerprint,
        ) -> $crate::Work {
            let d = $crate::OpDesc::queued($crate::CollectiveKind::AllReduce, Some(op), None, tag);
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn broadcast_buffer(&self, input: $crate::Buffer, root: usize) -> $crate::Work {
            let d = $crate::OpDesc::queued(
                $crate::CollectiveKind::Broadcast,
                None,
                Some(root),
                $crate::Fingerprint::NONE,
            );
            self.submit(d, $crate::communicator::Input::Ready(input))
        }

        fn barrier(&self) -> $crate::Work<()> {
            let d = $crate::OpDesc::queued(
                $crate::CollectiveKind::Barrier,
                None,
                None,
                $crate::Fingerprint::NONE,
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn wire_descriptors_round_trip() {
        let d = OpDesc {
            kind: CollectiveKind::Broadcast,
            dtype: Some(DType::Bf16),
            len: 17,
            op: None,
            root: Some(3),
            fingerprint: Fingerprint::NONE,
        };
        let wire = WireDesc::new(d, WireDesc::STATUS_INPUT_FAILED, 5, 9);
        assert_eq!(WireDesc::decode(&wire.encode()), wire);
        let r = OpDesc {
            kind: CollectiveKind::ReduceScatter,
            dtype: Some(DType::F16),
            len: 8,
            op: Some(ReduceOp::Max),
            root: None,
            fingerprint: Fingerprint::of_pieces([[3u64, 8]]),
        };
        let wire = WireDesc::new(r, WireDesc::STATUS_OK, 0, 0);
        assert_eq!(WireDesc::decode(&wire.encode()), wire);
    }

    #[test]
    fn fingerprints_see_order_and_boundaries() {
        let a = Fingerprint::of_pieces([[1u64, 4], [2, 4]]);
        let b = Fingerprint::of_pieces([[2u64, 4], [1, 4]]);
        assert_ne!(a, b, "order matters");
        let c = Fingerprint::of_pieces([vec![1u64, 4, 2], vec![4]]);
        assert_ne!(a, c, "piece boundaries matter");
        assert_eq!(a, Fingerprint::of_pieces([[1u64, 4], [2, 4]]));
        assert_ne!(
            Fingerprint::of_pieces(Vec::<[u64; 0]>::new()),
            Fingerprint::NONE
        );
    }
}
