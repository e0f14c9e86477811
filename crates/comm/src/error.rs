//! The one error type of every collective and engine.

use std::time::Duration;

use crate::CollectiveKind;

/// Why a collective, a split or an engine failed.
///
/// Every engine reports a failure on every rank of the group: a rank that
/// times out, leaves or passes mismatched arguments poisons the group, and
/// the other ranks' pending and later collectives return the same error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Not every rank arrived at a collective within the timeout.
    #[error(
        "{kind} #{seq} timed out after {timeout:?}: ranks {missing:?} of the group never arrived"
    )]
    Timeout {
        /// The collective that was waiting.
        kind: CollectiveKind,
        /// Its sequence number on the communicator.
        seq: u64,
        /// How long it waited.
        timeout: Duration,
        /// Group ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// A rank left the group (its communicator was dropped, or its thread or
    /// process died) while others still expected it in a collective.
    #[error("rank {rank} left the group ({reason}) before {kind} #{seq} completed")]
    RankLeft {
        /// Group rank that left.
        rank: usize,
        /// What happened to it.
        reason: String,
        /// The collective the others were waiting in.
        kind: CollectiveKind,
        /// Its sequence number.
        seq: u64,
    },
    /// Ranks called different collectives, or the same one with different
    /// sizes, element types, roots or reduce operations.
    #[error("{kind} #{seq}: rank {rank} passed {found}, but rank 0 passed {expected}")]
    Mismatch {
        /// The collective rank 0 called.
        kind: CollectiveKind,
        /// Its sequence number.
        seq: u64,
        /// The first group rank whose arguments differ from rank 0's.
        rank: usize,
        /// Rank 0's arguments.
        expected: String,
        /// That rank's arguments.
        found: String,
    },
    /// Bad arguments caught before any communication.
    #[error("{0}")]
    InvalidArgument(String),
    /// The group was poisoned by an earlier failure.
    #[error("the group failed earlier: {0}")]
    Poisoned(Box<CommError>),
    /// An engine-specific failure (MPI, NCCL, CUDA).
    #[error("{engine}: {message}")]
    Engine {
        /// Which engine.
        engine: &'static str,
        /// What it said.
        message: String,
    },
}

impl CommError {
    /// The error that ranks report after the group was poisoned by `self`.
    pub fn poisoned(&self) -> CommError {
        match self {
            CommError::Poisoned(_) => self.clone(),
            other => CommError::Poisoned(Box::new(other.clone())),
        }
    }
}
