//! The NCCL engine: collectives between GPUs through `cudarc`'s NCCL bindings
//! (cargo feature `cuda`).
//!
//! CUDA and NCCL are loaded **at run time** (`cudarc`'s dynamic loading), so
//! this module builds on machines without CUDA. A missing `libcuda.so`,
//! `libnvrtc.so` or `libnccl.so` is one [`CommError::Engine`] naming the
//! library and the fix, never a panic ([`check_libraries`]). The PyPI wheel
//! `nvidia-nccl-cu13` (the NCCL that torch uses) ships only `libnccl.so.2`,
//! while `cudarc` looks for `libnccl.so`: the error says where the `.so.2`
//! is and which symlink makes it loadable (`scripts/nccl-sanity` sets it up).
//!
//! # How it runs
//!
//! Each [`NcclComm`] owns one NCCL communicator, one CUDA stream and one
//! worker thread, exactly as a [`crate::ThreadComm`] owns a worker: the
//! collectives of a communicator run on its worker **in issue order**, so the
//! caller gets a [`Work`] at once and computes while the collective runs. On
//! the worker a collective of host [`Buffer`]s
//!
//! 1. exchanges a small descriptor (kind, element type, length, reduce op,
//!    root, split colour and key, input status: eight `u64`s) with an NCCL
//!    all-gather, so that ranks passing different sizes, types or roots all
//!    get [`CommError::Mismatch`] and no data collective runs on mismatched
//!    buffers (never corruption; the check can be turned off with
//!    [`NcclEngine::check_arguments`] where the caller guarantees it);
//! 2. copies the input to the device on the communicator's stream, enqueues
//!    the NCCL collective there, and polls an event until it completes, a
//!    NCCL asynchronous error shows up, a waiter gave up on the group, or the
//!    timeout passes; in the last three cases the NCCL communicator is
//!    **aborted** and the group poisoned, so nothing hangs;
//! 3. copies the result back into a host [`Buffer`].
//!
//! The device-buffer path (issue 7: Burn CUDA tensors, no host round trip)
//! plugs in at step 2: [`NcclComm::stream`] is the stream the collectives run
//! on, and the worker's enqueue-and-poll step takes raw device pointers.
//!
//! Barrier is the descriptor exchange alone. Split exchanges the colours and
//! keys, then the lowest new rank of each new group creates its NCCL unique
//! id and every rank all-gathers the ids over the parent communicator; each
//! rank then initialises its new communicator (own id, own stream, own
//! worker). As with MPI, collectives of *different* communicators must be
//! issued in the same relative order on every rank.
//!
//! # Results
//!
//! All-gather and broadcast move bytes and are bit-identical to the threads
//! engine; so is Max. Sum and Mean use NCCL's `ncclSum` and `ncclAvg`, whose
//! reduction order (ring or tree, chosen by NCCL) differs from the threads
//! engine's rank order and which round bf16/f16 partial sums at each step:
//! with more than two ranks results agree **to rounding, not bit-exactly**.
//!
//! # Starting ranks
//!
//! - one process driving several ranks (one or several GPUs; the unique id is
//!   shared in memory): [`NcclEngine::local`] and [`NcclEngine::run`];
//! - one process per rank, torchrun style: [`NcclEngine::from_env`] reads
//!   `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (and `LOCAL_RANK` for
//!   the device); rank 0 listens on `MASTER_PORT` and sends the 128-byte
//!   `ncclUniqueId` to every other rank;
//! - under `mpirun` (features `cuda` and `mpi`): [`NcclEngine`]`::from_mpi`
//!   broadcasts the id over an MPI communicator;
//! - any other launcher: rank 0 creates a
//!   [`UniqueId`], the launcher sends its [`UniqueId::as_bytes`] to every
//!   rank, and each calls [`NcclEngine::init_rank`].
//!
//! Byte accounting follows the ring model ([`crate::ring_bytes`]); the node
//! of each rank is found by exchanging a hash of the host name at start-up.
//!
//! # Files
//!
//! - `libs.rs`: the libraries loaded at run time, the one finder of their
//!   files ([`find_library_files`]) and the errors that say how to fix a
//!   missing one; the NCCL version and device count;
//! - `rendezvous.rs`: the [`UniqueId`] and how ranks receive it (TCP, MPI);
//! - `engine.rs`: [`NcclEngine`] and [`NcclComm`], the caller's side;
//! - `worker.rs`: the worker thread that runs a communicator's collectives;
//! - `errors.rs`: CUDA and NCCL failures as [`CommError`]s;
//! - `sanity.rs`: [`sanity`], the suite that checks the engine on a GPU.

mod engine;
mod errors;
mod libs;
mod rendezvous;
pub mod sanity;
mod worker;

pub use engine::{NcclComm, NcclEngine};
pub use libs::{
    CudaLibrary, ENGINE_LIBRARIES, NcclVersion, check_libraries, device_count, find_library_files,
    library_dirs, nccl_missing_message, nccl_version,
};
pub use rendezvous::UniqueId;

/// Default time a collective waits for the other ranks (as every engine).
pub use crate::worker::DEFAULT_TIMEOUT;
#[cfg(doc)]
use crate::{Buffer, CommError, Work};
