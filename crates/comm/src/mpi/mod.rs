//! The MPI engine: CPU processes launched by `mpirun`, on OpenMPI through the
//! `mpi` crate (rsmpi). Built with the cargo feature `mpi`.
//!
//! ```no_run
//! use mics_comm::mpi::MpiEngine;
//! use mics_comm::{Collectives, Communicator, ReduceOp};
//!
//! // mpirun -np 4 ./my-program
//! let world = MpiEngine::new().init().unwrap();
//! let mine = vec![world.rank() as f32; 2];
//! let summed = world.all_reduce(mine, ReduceOp::Sum).wait().unwrap();
//! assert_eq!(summed, [6.0, 6.0]);
//! drop(world); // finalises MPI: drop every communicator before main returns
//! ```
//!
//! # One communication thread
//!
//! [`MpiEngine::init`] starts one **communication thread** per process. It
//! initialises MPI (`MPI_THREAD_FUNNELED`: only that thread ever calls MPI),
//! owns every MPI communicator, runs the collectives of every communicator
//! of the process in the order they were issued, and finalises MPI when the
//! last [`MpiComm`] is dropped. Issuing a collective only queues it, so the
//! caller computes while the communication thread drives the transfer: it
//! starts each collective with MPI's non-blocking form (`MPI_Iallgather`,
//! `MPI_Ialltoall`, `MPI_Ibcast`) and polls it with `MPI_Test`, which is what
//! makes OpenMPI progress (it makes little progress in the background
//! otherwise).
//!
//! Because one serial thread runs everything, **collectives of different
//! communicators must be issued in the same relative order on every rank**
//! (the rule NCCL imposes too): if rank 0 issues a partition gather then a
//! replication all-reduce, every rank must. The input of
//! [`Communicator::all_gather_deferred`] must come from a collective issued
//! earlier (or from work that does not depend on this engine's queue).
//!
//! # Results bit-identical to the threads engine
//!
//! Data travels as raw bits (f32 as `u32`, bf16 and f16 as `u16`), never
//! through MPI's own arithmetic: MPI's `MPI_SUM` combines values in an
//! unspecified order and knows nothing of bf16. Reductions are
//! **gather-then-reduce-locally**:
//!
//! - reduce-scatter: an all-to-all hands every rank the `p` copies of its
//!   chunk (one from each rank), which it reduces with
//!   [`crate::reduce_range`], in rank order, half types accumulated in f32;
//! - all-reduce: the same reduce-scatter over `ceil(n/p)`-element chunks
//!   (the input padded with zeros to `p` chunks), then an all-gather of the
//!   reduced chunks, padding dropped.
//!
//! Each rank sends `(p-1)/p` of the message for the reduce-scatter and twice
//! that for the all-reduce, the same volume as a ring, and every element is
//! combined exactly as the threads engine and the reference combine it, so
//! the engines agree to the bit.
//!
//! # Mismatches and failures
//!
//! Every collective starts with an all-gather of a small descriptor (kind,
//! element type, length, reduce operation, root, whether the input is
//! there). Ranks compare the descriptors before any payload moves, so
//! mismatched sizes, types, operations, roots or collectives are reported
//! as [`CommError::Mismatch`] **on every rank**, and invalid arguments as
//! [`CommError::InvalidArgument`] on every rank; the communicator stays
//! usable. A deferred input that failed fails the collective on every rank
//! and poisons the communicator on every rank, as in the threads engine.
//!
//! A process that dies or exits without finalising makes `mpirun` end the
//! whole job (OpenMPI's behaviour). A collective that does not complete
//! within the timeout (a rank that never arrives), a [`Work::wait`] that
//! times out, or a communicator dropped while its thread panics makes the
//! communication thread print the error and call `MPI_Abort`, which ends
//! every process of the job with a non-zero status: no rank ever hangs, but
//! MPI offers no way to fail one collective and go on, so the job does not
//! survive it. (`Work::wait` returns its error to the caller first; the
//! abort follows at once.)
//!
//! # Nodes and byte accounting
//!
//! [`Communicator::nodes`] comes from `MPI_Comm_split_type(SHARED)` (the real
//! nodes), numbered in order of their lowest world rank. A layout of `k`
//! ranks per node (ranks numbered node by node) can be imposed with
//! [`MpiEngine::ranks_per_node`] or the environment variable
//! `MICS_RANKS_PER_NODE`, so multi-node accounting is testable on one
//! machine. Bytes are counted by the ring model ([`crate::ring_bytes`]), as
//! in every engine.
//!
//! # Files
//!
//! - `mod.rs`: [`MpiEngine`] and [`MpiComm`], the caller's side, which queues
//!   collectives for the communication thread;
//! - `thread.rs`: the communication thread, which runs them.

mod thread;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ::mpi::Threading;

use crate::communicator::{Input, OpDesc};
use crate::work::AbortFn;
use crate::worker::Issuer;
use crate::{CollectiveKind, CommError, CommStats, Communicator, Fingerprint, SentBytes, Work};
use thread::{Ctx, comm_thread};

/// Default time a collective waits for the other ranks before the job is
/// aborted (the same in every engine).
pub use crate::worker::DEFAULT_TIMEOUT;

/// Environment variable that imposes a number of ranks per node.
pub const RANKS_PER_NODE_ENV: &str = "MICS_RANKS_PER_NODE";

/// Exit status `MPI_Abort` gives the job after a timeout or a panic.
pub const ABORT_CODE: i32 = 70;

const ENGINE: &str = "mpi";

/// Builder of the MPI world communicator. One per process.
#[derive(Debug, Clone)]
pub struct MpiEngine {
    ranks_per_node: Option<usize>,
    timeout: Duration,
}

impl Default for MpiEngine {
    fn default() -> Self {
        MpiEngine::new()
    }
}

impl MpiEngine {
    /// Real nodes (or `MICS_RANKS_PER_NODE`), [`DEFAULT_TIMEOUT`].
    pub fn new() -> MpiEngine {
        MpiEngine {
            ranks_per_node: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Imposes `k` ranks per node, ranks numbered node by node, instead of
    /// the real layout. Takes precedence over `MICS_RANKS_PER_NODE`.
    pub fn ranks_per_node(mut self, k: usize) -> MpiEngine {
        self.ranks_per_node = Some(k);
        self
    }

    /// How long a collective may take (waiting for the other ranks
    /// included) before the job is aborted, and the default bound of
    /// [`Work::wait`].
    pub fn timeout(mut self, timeout: Duration) -> MpiEngine {
        self.timeout = timeout;
        self
    }

    /// Starts the communication thread, initialises MPI on it and returns
    /// the world communicator. Collective over the processes of the job.
    ///
    /// Fails if MPI was already initialised in this process, or if the
    /// imposed ranks per node do not divide the world.
    pub fn init(&self) -> Result<MpiComm, CommError> {
        static STARTED: AtomicBool = AtomicBool::new(false);
        let imposed = match self.ranks_per_node {
            Some(k) => Some(k),
            None => ranks_per_node_from_env()?,
        };
        if STARTED.swap(true, Ordering::SeqCst) {
            return Err(engine_error(
                "MPI can be initialised once per process: MpiEngine::init was already called",
            ));
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let (init_tx, init_rx) = mpsc::channel();
        let abort = Arc::new(AbortState::default());
        let thread_abort = abort.clone();
        let timeout = self.timeout;
        let thread = std::thread::Builder::new()
            .name("mics-mpi-comm".into())
            .spawn(move || comm_thread(imposed, timeout, thread_abort, rx, init_tx))
            .map_err(|e| engine_error(&format!("spawning the communication thread: {e}")))?;
        let info = match init_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(err)) => {
                let _ = thread.join();
                return Err(err);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(engine_error(
                    "the communication thread died while initialising MPI",
                ));
            }
        };
        let shared = Arc::new(Shared {
            tx: tx.clone(),
            abort,
            timeout,
            thread: Mutex::new(Some(thread)),
            world_rank: info.rank,
        });
        Ok(MpiComm::new(
            shared,
            WORLD_ID,
            info.rank,
            (0..info.size).collect(),
            info.nodes,
            info.threading,
        ))
    }
}

fn ranks_per_node_from_env() -> Result<Option<usize>, CommError> {
    match std::env::var(RANKS_PER_NODE_ENV) {
        Err(_) => Ok(None),
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => value.trim().parse().map(Some).map_err(|_| {
            CommError::InvalidArgument(format!(
                "{RANKS_PER_NODE_ENV}={value:?} is not a number of ranks per node"
            ))
        }),
    }
}

fn engine_error(message: &str) -> CommError {
    CommError::Engine {
        engine: ENGINE,
        message: message.to_string(),
    }
}

/// What the communication thread learns at initialisation.
struct WorldInfo {
    rank: usize,
    size: usize,
    nodes: Vec<usize>,
    threading: Threading,
}

/// A request to abort the job, from a waiter that timed out or a panic.
#[derive(Default)]
struct AbortState {
    requested: AtomicBool,
    error: Mutex<Option<CommError>>,
}

impl AbortState {
    fn request(&self, err: CommError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(err);
        }
        self.requested.store(true, Ordering::SeqCst);
    }
}

type Job = Box<dyn FnOnce(&mut Ctx) + Send>;

enum Msg {
    /// Run a collective (or split).
    Job(Job),
    /// Look at the abort flag.
    Wake,
    /// Free the communicators, finalise MPI and stop.
    Shutdown,
}

/// The process-wide engine: the queue to the communication thread.
struct Shared {
    tx: Sender<Msg>,
    abort: Arc<AbortState>,
    timeout: Duration,
    thread: Mutex<Option<JoinHandle<()>>>,
    world_rank: usize,
}

impl Shared {
    fn abort_fn(&self) -> AbortFn {
        let abort = self.abort.clone();
        let tx = self.tx.clone();
        Arc::new(move |err| {
            abort.request(err);
            let _ = tx.send(Msg::Wake);
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Queued collectives run first (each bounded by the timeout), then
        // MPI is finalised on the thread that initialised it.
        let _ = self.tx.send(Msg::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

const WORLD_ID: usize = 0;

/// One process's communicator over a group of MPI processes. Cloning is
/// not offered; share it through an `Arc`.
///
/// MPI is finalised when the world communicator and every communicator
/// split from it have been dropped: drop them all before `main` returns
/// (a process that exits without finalising makes `mpirun` fail the job).
pub struct MpiComm {
    shared: Arc<Shared>,
    id: usize,
    rank: usize,
    world_ranks: Vec<usize>,
    nodes: Vec<usize>,
    threading: Threading,
    /// Sequence numbers and the queue to the communication thread.
    issuer: Issuer<Msg>,
    stats: Arc<Mutex<CommStats>>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("id", &self.id)
            .field("rank", &self.rank)
            .field("size", &self.world_ranks.len())
            .field("world_ranks", &self.world_ranks)
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// What the caller's side knows of a collective when it queues it.
struct Call {
    id: usize,
    seq: u64,
    rank: usize,
    desc: OpDesc,
    nodes: Vec<usize>,
    color: usize,
    key: usize,
}

impl MpiComm {
    fn new(
        shared: Arc<Shared>,
        id: usize,
        rank: usize,
        world_ranks: Vec<usize>,
        nodes: Vec<usize>,
        threading: Threading,
    ) -> MpiComm {
        MpiComm {
            issuer: Issuer::new(shared.tx.clone()),
            shared,
            id,
            rank,
            world_ranks,
            nodes,
            threading,
            stats: Arc::new(Mutex::new(CommStats::default())),
        }
    }

    /// The threading level MPI granted (`Funneled` or better is what the
    /// engine asks for).
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn world_rank(&self) -> usize {
        self.shared.world_rank
    }

    /// Queues `job` with the next sequence number.
    fn queue(&self, make: impl FnOnce(u64) -> Job) -> Result<u64, CommError> {
        self.issuer
            .issue(|seq| Msg::Job(make(seq)))
            .map_err(|_| engine_error("the communication thread is gone"))
    }

    fn submit(&self, desc: OpDesc, input: Input) -> Work {
        let stats = self.stats.clone();
        let timeout = self.shared.timeout;
        let abort = self.shared.abort_fn();
        let mut work = None;
        let queued = self.queue(|seq| {
            let describe = format!(
                "{} #{seq} on rank {} of MPI communicator {} (world rank {})",
                desc.kind, self.rank, self.id, self.shared.world_rank
            );
            let (w, done) = Work::pending(timeout, describe, Some(abort));
            work = Some(w);
            let call = Call {
                id: self.id,
                seq,
                rank: self.rank,
                desc,
                nodes: self.nodes.clone(),
                color: 0,
                key: 0,
            };
            Box::new(move |ctx: &mut Ctx| {
                let result = ctx.collective(call, input, &stats);
                done.complete(result);
            })
        });
        match (queued, work) {
            (Ok(_), Some(work)) => work,
            (Err(err), _) => Work::failed(err),
            (Ok(_), None) => Work::failed(engine_error("collective was not queued")),
        }
    }

    /// [`Communicator::split`], returning the concrete type. Blocking and
    /// collective over this communicator; sub-communicators live until MPI
    /// is finalised.
    pub fn split_mpi(&self, color: usize, key: usize) -> Result<MpiComm, CommError> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(CollectiveKind::Split, SentBytes::default());
        let (tx, rx) = mpsc::channel();
        self.queue(|seq| {
            let call = Call {
                id: self.id,
                seq,
                rank: self.rank,
                desc: OpDesc::queued(CollectiveKind::Split, None, None, Fingerprint::NONE),
                nodes: self.nodes.clone(),
                color,
                key,
            };
            let world_ranks = self.world_ranks.clone();
            Box::new(move |ctx: &mut Ctx| {
                let _ = tx.send(ctx.split(call, &world_ranks));
            })
        })?;
        let made = rx
            .recv()
            .map_err(|_| engine_error("split: the communication thread died"))??;
        Ok(MpiComm::new(
            self.shared.clone(),
            made.id,
            made.rank,
            made.world_ranks,
            made.nodes,
            self.threading,
        ))
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.world_ranks.len()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }

    fn nodes(&self) -> &[usize] {
        &self.nodes
    }

    fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    crate::communicator::queued_collectives!();

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        Ok(Arc::new(self.split_mpi(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The peers would wait for this rank until their timeout: end the
            // job now instead.
            let err = engine_error(&format!(
                "the thread of world rank {} panicked while holding MPI communicator {}",
                self.shared.world_rank, self.id
            ));
            (self.shared.abort_fn())(err);
        }
    }
}
