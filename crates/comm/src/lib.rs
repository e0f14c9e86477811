//! Collectives for MiCS.
//!
//! - [`Communicator`]: one trait of **non-blocking** collectives over a group
//!   of ranks (all-gather, reduce-scatter, all-reduce, broadcast, barrier,
//!   split), each returning a [`Work`] handle to wait on, with a timeout;
//!   [`Collectives`] adds typed forms for `f32`, `bf16` and `f16`.
//! - Engines: [`ThreadsEngine`] (in-process, one rank per thread, always
//!   built), `mpi::MpiEngine` (feature `mpi`) and `nccl::NcclEngine`
//!   (feature `cuda`).
//! - [`Topology`] and [`MicsGroups`]: partition, replication and node groups
//!   exactly as MiCS defines them, and the hierarchical all-gather.
//! - [`Sharding`]: uneven shards padded to `ceil(n/p)·p`.
//! - [`CommStats`]: bytes each rank sends inside and across nodes.
//!
//! Failures are errors on every rank of the group, never hangs: a rank that
//! times out, leaves or passes mismatched arguments fails its peers' pending
//! collectives too.
//!
//! ```
//! use mics_comm::{Collectives, Communicator, ReduceOp, ThreadsEngine};
//!
//! let results = ThreadsEngine::new(4)
//!     .run(|comm| {
//!         let mine = vec![comm.rank() as f32; 2];
//!         let gathered = comm.all_gather(mine.clone()).wait().unwrap();
//!         let summed = comm.all_reduce(mine, ReduceOp::Sum).wait().unwrap();
//!         (gathered, summed)
//!     })
//!     .unwrap();
//! let (gathered, summed) = results[3].clone().unwrap();
//! assert_eq!(gathered, [0., 0., 1., 1., 2., 2., 3., 3.]);
//! assert_eq!(summed, [6., 6.]);
//! ```

mod buffer;
mod communicator;
mod error;
mod groups;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
mod reduce;
mod shard;
mod stats;
pub mod threads;
mod topology;
mod work;
mod worker;

pub use buffer::{Buffer, DType, Element};
pub use communicator::{CollectiveKind, Collectives, Communicator, Fingerprint, OpDesc, ReduceOp};
pub use error::CommError;
pub use groups::{MicsGroups, hierarchical_all_gather};
pub use reduce::{concat, reduce_range};
pub use shard::{Sharding, all_gather_unpadded, reduce_scatter_padded};
pub use stats::{CommStats, KindStats, SentBytes, ring_bytes};
pub use threads::{ThreadComm, ThreadsEngine};
pub use topology::{Topology, TopologyError};
pub use work::{AbortFn, Completion, Work};

/// Helpers for engine implementations: argument checks shared by all engines,
/// the default timeout and panic payloads as text.
pub mod engine {
    pub use crate::communicator::{check_matching, validate_local};
    pub use crate::worker::{DEFAULT_TIMEOUT, panic_text};
}
