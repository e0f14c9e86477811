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

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::mpi::Threading;
use ::mpi::request::{Request, Scope};
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::traits::{Communicator as _, CommunicatorCollectives, Equivalence, Root};

use crate::communicator::{Input, OpDesc, WireDesc, check_matching, validate_local};
use crate::reduce::{concat, reduce_range};
use crate::stats::ring_bytes;
use crate::work::AbortFn;
use crate::worker::{Issuer, nodes_by_first_appearance};
use crate::{
    Buffer, CollectiveKind, CommError, CommStats, Communicator, Fingerprint, ReduceOp, SentBytes,
    Work,
};

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

// ---------------------------------------------------------------------------
// The communication thread.

/// A communicator as the communication thread holds it.
struct Slot {
    comm: SimpleCommunicator,
    /// Set, identically on every rank, when a collective's input failed.
    poisoned: Option<CommError>,
}

/// State of the communication thread: every MPI object of the process.
struct Ctx {
    world_rank: usize,
    timeout: Duration,
    abort: Arc<AbortState>,
    slots: Vec<Slot>,
}

/// A new communicator made by a split.
struct Made {
    id: usize,
    rank: usize,
    world_ranks: Vec<usize>,
    nodes: Vec<usize>,
}

fn comm_thread(
    imposed: Option<usize>,
    timeout: Duration,
    abort: Arc<AbortState>,
    rx: Receiver<Msg>,
    init_tx: Sender<Result<WorldInfo, CommError>>,
) {
    let Some((universe, threading)) = ::mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = init_tx.send(Err(engine_error(
            "MPI was already initialised in this process",
        )));
        return;
    };
    let world = universe.world();
    let rank = world.rank() as usize;
    let size = world.size() as usize;
    let nodes = match imposed {
        Some(k) if k == 0 || !size.is_multiple_of(k) => {
            let _ = init_tx.send(Err(CommError::InvalidArgument(format!(
                "MPI engine: {size} ranks cannot be laid out {k} per node"
            ))));
            return;
        }
        Some(k) => (0..size).map(|r| r / k).collect(),
        None => real_nodes(&world),
    };
    if init_tx
        .send(Ok(WorldInfo {
            rank,
            size,
            nodes,
            threading,
        }))
        .is_err()
    {
        return;
    }
    let mut ctx = Ctx {
        world_rank: rank,
        timeout,
        abort,
        slots: vec![Slot {
            comm: world,
            poisoned: None,
        }],
    };
    for msg in rx {
        ctx.check_abort();
        match msg {
            Msg::Job(job) => job(&mut ctx),
            Msg::Wake => {}
            Msg::Shutdown => break,
        }
    }
    ctx.check_abort();
    // Free the split communicators, then finalise.
    drop(ctx);
    drop(universe);
}

/// Node of each world rank from `MPI_Comm_split_type(SHARED)`, numbered by
/// the lowest world rank of each node.
fn real_nodes(world: &SimpleCommunicator) -> Vec<usize> {
    let rank = world.rank();
    let node = world.split_shared(rank);
    let mut leader = rank as u64;
    node.process_at_rank(0).broadcast_into(&mut leader);
    let mut leaders = vec![0u64; world.size() as usize];
    world.all_gather_into(&leader, &mut leaders[..]);
    nodes_by_first_appearance(&leaders)
}

/// The raw unit a dtype travels as: its bits, never its value.
trait Unit: bytemuck::Pod + Equivalence {}
impl Unit for u16 {}
impl Unit for u32 {}

fn units<U: Unit>(buffer: &Buffer) -> &[U] {
    bytemuck::cast_slice(buffer.as_bytes())
}

fn units_mut<U: Unit>(buffer: &mut Buffer) -> &mut [U] {
    bytemuck::cast_slice_mut(buffer.as_bytes_mut())
}

/// Elements `range` of `buffer`, copied.
fn slice(buffer: &Buffer, range: std::ops::Range<usize>) -> Buffer {
    match buffer {
        Buffer::F32(v) => Buffer::F32(v[range].to_vec()),
        Buffer::Bf16(v) => Buffer::Bf16(v[range].to_vec()),
        Buffer::F16(v) => Buffer::F16(v[range].to_vec()),
    }
}

/// `buffer` padded with zeros to `len` elements.
fn padded(buffer: &Buffer, len: usize) -> Buffer {
    let mut out = Buffer::zeros(buffer.dtype(), len);
    let bytes = buffer.byte_len();
    out.as_bytes_mut()[..bytes].copy_from_slice(buffer.as_bytes());
    out
}

fn truncated(buffer: Buffer, len: usize) -> Buffer {
    match buffer {
        Buffer::F32(mut v) => {
            v.truncate(len);
            Buffer::F32(v)
        }
        Buffer::Bf16(mut v) => {
            v.truncate(len);
            Buffer::Bf16(v)
        }
        Buffer::F16(mut v) => {
            v.truncate(len);
            Buffer::F16(v)
        }
    }
}

/// One MPI transfer of a collective, on host buffers of one element type.
enum Transfer<'b> {
    /// `MPI_Iallgather` of `send` into `recv` (`p` times as long).
    AllGather {
        send: &'b Buffer,
        recv: &'b mut Buffer,
    },
    /// `MPI_Ialltoall` of `send` into `recv` (as long).
    AllToAll {
        send: &'b Buffer,
        recv: &'b mut Buffer,
    },
    /// `MPI_Ibcast` of `data`, in place, from `root`.
    Broadcast { data: &'b mut Buffer, root: usize },
}

impl Transfer<'_> {
    fn dtype(&self) -> crate::DType {
        match self {
            Transfer::AllGather { send, .. } | Transfer::AllToAll { send, .. } => send.dtype(),
            Transfer::Broadcast { data, .. } => data.dtype(),
        }
    }
}

/// The largest element count one MPI call takes (counts are C ints).
const MAX_COUNT: usize = i32::MAX as usize;

impl Ctx {
    /// Ends the job if a waiter timed out or a rank panicked.
    fn check_abort(&self) {
        if self.abort.requested.load(Ordering::SeqCst) {
            let err = self
                .abort
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| engine_error("abort requested"));
            self.abort_job(&err);
        }
    }

    fn abort_job(&self, err: &CommError) -> ! {
        // One write, so that the ranks' messages do not interleave.
        let message = format!(
            "mics-comm mpi: world rank {}: {err}; calling MPI_Abort so that no rank hangs\n",
            self.world_rank
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), message.as_bytes());
        SimpleCommunicator::world().abort(ABORT_CODE)
    }

    /// Polls a non-blocking MPI operation to completion, aborting the job if
    /// it takes longer than the timeout or an abort is requested.
    fn poll<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        mut request: Request<'a, D, S>,
        kind: CollectiveKind,
        seq: u64,
        started: Instant,
    ) {
        let mut idle: u32 = 0;
        loop {
            match request.test() {
                Ok(_) => return,
                Err(pending) => request = pending,
            }
            self.check_abort();
            if started.elapsed() >= self.timeout {
                self.abort_job(&engine_error(&format!(
                    "{kind} #{seq} did not complete within {:?}: a rank never arrived",
                    self.timeout
                )));
            }
            idle = idle.saturating_add(1);
            if idle < 64 {
                std::hint::spin_loop();
            } else if idle < 4096 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Waits for a deferred input, up to the timeout.
    fn await_input(&self, mut input: Work) -> Result<Buffer, CommError> {
        let deadline = Instant::now() + self.timeout;
        while !input.is_ready() {
            self.check_abort();
            if Instant::now() >= deadline {
                return Err(engine_error(&format!(
                    "the input of a deferred all_gather was not ready within {:?} (it must come \
                     from a collective issued earlier)",
                    self.timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        input.wait()
    }

    /// All-gathers the descriptors of collective `seq` and checks them:
    /// returns every rank's on success, the same error on every rank
    /// otherwise.
    fn exchange(
        &mut self,
        call: &Call,
        mine: WireDesc,
        input_error: Option<CommError>,
        started: Instant,
    ) -> Result<Vec<WireDesc>, CommError> {
        let slot = &self.slots[call.id];
        if let Some(err) = &slot.poisoned {
            return Err(err.poisoned());
        }
        let size = slot.comm.size() as usize;
        let mut all = vec![0u64; WireDesc::WORDS * size];
        let mine = mine.encode();
        ::mpi::request::scope(|scope| {
            let request = slot
                .comm
                .immediate_all_gather_into(scope, &mine[..], &mut all[..]);
            self.poll(request, call.desc.kind, call.seq, started);
        });
        let words: Vec<WireDesc> = all
            .chunks_exact(WireDesc::WORDS)
            .map(WireDesc::decode)
            .collect();
        if let Some(failed) = words.iter().position(|w| w.status != WireDesc::STATUS_OK) {
            let err = input_error.unwrap_or_else(|| CommError::Engine {
                engine: ENGINE,
                message: format!(
                    "{} #{}: the input of rank {failed} failed, so the collective failed on \
                     every rank",
                    call.desc.kind, call.seq
                ),
            });
            self.slots[call.id].poisoned = Some(err.clone());
            return Err(err);
        }
        let descs: Vec<OpDesc> = words.iter().map(|w| w.desc).collect();
        check_matching(call.seq, &descs)?;
        Ok(words)
    }

    /// Runs one collective (not split) for this rank.
    fn collective(
        &mut self,
        mut call: Call,
        input: Input,
        stats: &Mutex<CommStats>,
    ) -> Result<Buffer, CommError> {
        let data = match input {
            Input::None => Ok(None),
            Input::Ready(buffer) => Ok(Some(buffer)),
            Input::Later(work) => self.await_input(work).map(Some),
        };
        let started = Instant::now();
        let input_error = data.as_ref().err().cloned();
        if let Ok(Some(buffer)) = &data {
            call.desc.dtype = Some(buffer.dtype());
            call.desc.len = buffer.len();
            let sent = ring_bytes(
                call.desc.kind,
                buffer.byte_len() as u64,
                &call.nodes,
                call.rank,
                call.desc.root.unwrap_or(0),
            );
            stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(call.desc.kind, sent);
        } else if data.is_ok() {
            stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(call.desc.kind, SentBytes::default());
        }
        let status = if input_error.is_some() {
            WireDesc::STATUS_INPUT_FAILED
        } else {
            WireDesc::STATUS_OK
        };
        let mine = WireDesc::new(call.desc, status, 0, 0);
        self.exchange(&call, mine, input_error, started)?;
        // Descriptors match: every rank passed the same arguments.
        let size = call.nodes.len();
        validate_local(&call.desc, size)?;
        let data = data.ok().flatten();
        let Some(buffer) = data else {
            // Barrier: the descriptor all-gather already synchronised.
            return Ok(Buffer::F32(Vec::new()));
        };
        let len = buffer.len();
        let kind = call.desc.kind;
        let moved = match kind {
            CollectiveKind::AllGather => len * size,
            CollectiveKind::AllReduce => len.div_ceil(size) * size,
            _ => len,
        };
        if moved > MAX_COUNT {
            return Err(CommError::InvalidArgument(format!(
                "{kind} #{}: the MPI engine moves at most {MAX_COUNT} elements per collective, \
                 this one needs {moved}; split the buffer",
                call.seq
            )));
        }
        let comm = &self.slots[call.id].comm;
        let at = (kind, call.seq, started);
        match kind {
            CollectiveKind::AllGather => Ok(self.all_gather(comm, &buffer, at)),
            CollectiveKind::ReduceScatter => {
                let op = call.desc.op.unwrap_or(ReduceOp::Sum);
                Ok(self.reduce_scatter(comm, &buffer, op, at))
            }
            CollectiveKind::AllReduce => {
                let op = call.desc.op.unwrap_or(ReduceOp::Sum);
                let chunk = len.div_ceil(size);
                let input = if chunk * size == len {
                    buffer
                } else {
                    padded(&buffer, chunk * size)
                };
                let mine = self.reduce_scatter(comm, &input, op, at);
                let all = self.all_gather(comm, &mine, at);
                Ok(truncated(all, len))
            }
            CollectiveKind::Broadcast => {
                let root = call.desc.root.unwrap_or(0);
                Ok(self.broadcast(comm, buffer, root, at))
            }
            CollectiveKind::Barrier | CollectiveKind::Split => Ok(Buffer::F32(Vec::new())),
        }
    }

    /// Starts one MPI transfer of raw units (`u32` for 4-byte elements,
    /// `u16` for 2-byte ones) and polls it to completion.
    fn transfer(
        &self,
        comm: &SimpleCommunicator,
        transfer: Transfer<'_>,
        at: (CollectiveKind, u64, Instant),
    ) {
        fn go<U: Unit>(
            ctx: &Ctx,
            comm: &SimpleCommunicator,
            transfer: Transfer<'_>,
            at: (CollectiveKind, u64, Instant),
        ) {
            ::mpi::request::scope(|scope| {
                let request = match transfer {
                    Transfer::AllGather { send, recv } => comm.immediate_all_gather_into(
                        scope,
                        units::<U>(send),
                        units_mut::<U>(recv),
                    ),
                    Transfer::AllToAll { send, recv } => comm.immediate_all_to_all_into(
                        scope,
                        units::<U>(send),
                        units_mut::<U>(recv),
                    ),
                    Transfer::Broadcast { data, root } => comm
                        .process_at_rank(root as c_int)
                        .immediate_broadcast_into(scope, units_mut::<U>(data)),
                };
                ctx.poll(request, at.0, at.1, at.2);
            });
        }
        match transfer.dtype().size() {
            4 => go::<u32>(self, comm, transfer, at),
            _ => go::<u16>(self, comm, transfer, at),
        }
    }

    fn all_gather(
        &self,
        comm: &SimpleCommunicator,
        input: &Buffer,
        at: (CollectiveKind, u64, Instant),
    ) -> Buffer {
        let size = comm.size() as usize;
        let mut out = Buffer::zeros(input.dtype(), input.len() * size);
        let recv = &mut out;
        self.transfer(comm, Transfer::AllGather { send: input, recv }, at);
        out
    }

    /// Every rank's chunk `rank` of `input` (an all-to-all), reduced in
    /// rank order with [`reduce_range`].
    fn reduce_scatter(
        &self,
        comm: &SimpleCommunicator,
        input: &Buffer,
        op: ReduceOp,
        at: (CollectiveKind, u64, Instant),
    ) -> Buffer {
        let size = comm.size() as usize;
        let mut received = Buffer::zeros(input.dtype(), input.len());
        let recv = &mut received;
        self.transfer(comm, Transfer::AllToAll { send: input, recv }, at);
        let chunk = input.len() / size;
        let chunks: Vec<Buffer> = (0..size)
            .map(|r| slice(&received, r * chunk..(r + 1) * chunk))
            .collect();
        let refs: Vec<&Buffer> = chunks.iter().collect();
        if chunk == 0 {
            return concat(&refs);
        }
        reduce_range(&refs, 0..chunk, op)
    }

    fn broadcast(
        &self,
        comm: &SimpleCommunicator,
        mut buffer: Buffer,
        root: usize,
        at: (CollectiveKind, u64, Instant),
    ) -> Buffer {
        let data = &mut buffer;
        self.transfer(comm, Transfer::Broadcast { data, root }, at);
        buffer
    }

    /// Splits communicator `call.id`: ranks with the same color form a new
    /// communicator, ordered by `(key, rank)`.
    fn split(&mut self, call: Call, world_ranks: &[usize]) -> Result<Made, CommError> {
        let started = Instant::now();
        let mine = WireDesc::new(call.desc, WireDesc::STATUS_OK, call.color, call.key);
        let words = self.exchange(&call, mine, None, started)?;
        let mut colors: Vec<usize> = words.iter().map(|w| w.color).collect();
        colors.sort_unstable();
        colors.dedup();
        let my_color = call.color;
        let mut members: Vec<usize> = (0..words.len())
            .filter(|&r| words[r].color == my_color)
            .collect();
        members.sort_by_key(|&r| (words[r].key, r));
        let new_rank = members
            .iter()
            .position(|&r| r == call.rank)
            .expect("this rank is in its own color");
        let dense_color = colors
            .iter()
            .position(|&c| c == my_color)
            .expect("this rank's color is among the colors");
        // Every rank arrived (the descriptors came from all of them), so this
        // blocking call completes promptly.
        let comm = self.slots[call.id]
            .comm
            .split_by_color_with_key(Color::with_value(dense_color as c_int), new_rank as c_int)
            .ok_or_else(|| engine_error("MPI_Comm_split returned MPI_COMM_NULL"))?;
        if comm.rank() as usize != new_rank || comm.size() as usize != members.len() {
            return Err(engine_error(&format!(
                "MPI_Comm_split made rank {} of {}, expected rank {new_rank} of {}",
                comm.rank(),
                comm.size(),
                members.len()
            )));
        }
        self.slots.push(Slot {
            comm,
            poisoned: None,
        });
        Ok(Made {
            id: self.slots.len() - 1,
            rank: new_rank,
            world_ranks: members.iter().map(|&r| world_ranks[r]).collect(),
            nodes: members.iter().map(|&r| call.nodes[r]).collect(),
        })
    }
}
