//! The engine and its communicators: [`NcclEngine`] builds communicators
//! (one process driving several ranks, or one rank joining with an id),
//! [`NcclComm`] is one rank's handle that queues collectives on its worker
//! and implements [`Communicator`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::CudaStream;

use super::errors::engine_error;
use super::libs::{ENGINE_LIBRARIES, check_libraries};
use super::worker::{self, InitSpec, Job, Ready, Shared, Worker, run_collective, run_split};
use super::{DEFAULT_TIMEOUT, UniqueId};
use crate::communicator::{Input, OpDesc};
use crate::stats::ring_bytes;
use crate::work::AbortFn;
use crate::worker::{Issuer, run_ranks};
use crate::{CollectiveKind, CommError, CommStats, Communicator, Work};

/// Builder of NCCL communicators.
#[derive(Debug, Clone)]
pub struct NcclEngine {
    pub(super) timeout: Duration,
    check_arguments: bool,
}

impl Default for NcclEngine {
    fn default() -> Self {
        NcclEngine::new()
    }
}

impl NcclEngine {
    /// An engine with [`DEFAULT_TIMEOUT`] and argument checks on.
    pub fn new() -> NcclEngine {
        NcclEngine {
            timeout: DEFAULT_TIMEOUT,
            check_arguments: true,
        }
    }

    /// How long a collective (and communicator set-up) waits for the other
    /// ranks before it fails and the NCCL communicator is aborted.
    pub fn timeout(mut self, timeout: Duration) -> NcclEngine {
        self.timeout = timeout;
        self
    }

    /// Whether every collective first exchanges a descriptor of its arguments
    /// so that mismatches are errors on every rank (default: on). Turning it
    /// off halves the latency of small collectives, but mismatched lengths
    /// then corrupt memory or hang until the timeout.
    pub fn check_arguments(mut self, check: bool) -> NcclEngine {
        self.check_arguments = check;
        self
    }

    /// One process driving `devices.len()` ranks: rank `i` runs on CUDA device
    /// `devices[i]`. Several ranks may name the same device where NCCL allows
    /// it (NCCL ≥ 2.30.3 with `NCCL_MULTI_RANK_GPU_ENABLE=1`). The unique id
    /// is shared in memory; each rank's communicator is initialised on its own
    /// worker thread.
    pub fn local(&self, devices: &[usize]) -> Result<Vec<NcclComm>, CommError> {
        if devices.is_empty() {
            return Err(CommError::InvalidArgument(
                "nccl engine: a world needs at least one rank".into(),
            ));
        }
        check_libraries(&ENGINE_LIBRARIES)?;
        let id = UniqueId::new()?;
        let size = devices.len();
        let pending: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, &device)| {
                let nodes = Some(vec![0; size]);
                NcclComm::start(self, InitSpec::world(id, rank, size, device, nodes))
            })
            .collect::<Result<_, _>>()?;
        pending.into_iter().map(|p| p.finish()).collect()
    }

    /// Runs `f` on one thread per rank with that rank's communicator
    /// ([`NcclEngine::local`]) and returns each rank's result, or its panic
    /// message.
    pub fn run<R, F>(&self, devices: &[usize], f: F) -> Result<Vec<Result<R, String>>, CommError>
    where
        R: Send,
        F: Fn(NcclComm) -> R + Sync,
    {
        let comms = self.local(devices)?;
        Ok(run_ranks(
            comms,
            |rank| format!("mics-nccl-rank-{rank}"),
            &f,
        ))
    }

    /// Rank `rank` of `size` on CUDA device `device`, joining the
    /// communicator of `id` (created by one rank with [`UniqueId::new`] and
    /// sent to all by any launcher, e.g. an MPI broadcast of its bytes).
    /// Blocks until every rank has joined, or the timeout.
    pub fn init_rank(
        &self,
        id: UniqueId,
        rank: usize,
        size: usize,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        check_rank(rank, size)?;
        NcclComm::start(self, InitSpec::world(id, rank, size, device, None))?.finish()
    }
}

/// Checks that `rank` is a rank of a world of `size`, and that the engine's
/// libraries load.
pub(super) fn check_rank(rank: usize, size: usize) -> Result<(), CommError> {
    if rank >= size {
        return Err(CommError::InvalidArgument(format!(
            "nccl engine: rank {rank} in a world of {size}"
        )));
    }
    check_libraries(&ENGINE_LIBRARIES)
}

/// One rank's communicator in the NCCL engine.
pub struct NcclComm {
    rank: usize,
    size: usize,
    device: usize,
    world_ranks: Vec<usize>,
    nodes: Vec<usize>,
    timeout: Duration,
    check: bool,
    stream: Arc<CudaStream>,
    issuer: Issuer<Job>,
    stats: Arc<Mutex<CommStats>>,
    shared: Arc<Shared>,
    label: u64,
}

static NEXT_COMM_LABEL: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device)
            .field("world_ranks", &self.world_ranks)
            .finish()
    }
}

/// A communicator whose worker is initialising NCCL.
struct Pending {
    rx: mpsc::Receiver<Result<Ready, CommError>>,
    tx: Sender<Job>,
    spec_rank: usize,
    spec_size: usize,
    device: usize,
    world_ranks: Vec<usize>,
    engine: NcclEngine,
    shared: Arc<Shared>,
}

impl Pending {
    fn finish(self) -> Result<NcclComm, CommError> {
        let timeout = self.engine.timeout;
        let (stream, nodes) = match self.rx.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(engine_error(format!(
                    "initialising rank {} of {} on device {} did not finish within {timeout:?}: \
                     not every rank joined the communicator",
                    self.spec_rank, self.spec_size, self.device
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(engine_error("the communicator's worker thread died"));
            }
        };
        Ok(NcclComm {
            rank: self.spec_rank,
            size: self.spec_size,
            device: self.device,
            world_ranks: self.world_ranks,
            nodes,
            timeout,
            check: self.engine.check_arguments,
            stream,
            issuer: Issuer::new(self.tx),
            stats: Arc::new(Mutex::new(CommStats::default())),
            shared: self.shared,
            label: NEXT_COMM_LABEL.fetch_add(1, Ordering::Relaxed),
        })
    }
}

impl NcclComm {
    /// Spawns the worker, which initialises the communicator.
    fn start(engine: &NcclEngine, spec: InitSpec) -> Result<Pending, CommError> {
        let shared = Arc::new(Shared::default());
        let world_ranks = spec.world_ranks.clone();
        let (rank, size, device) = (spec.rank, spec.size, spec.device);
        let spawned = worker::spawn(spec, engine.timeout, shared.clone())?;
        Ok(Pending {
            rx: spawned.init,
            tx: spawned.jobs,
            spec_rank: rank,
            spec_size: size,
            device,
            world_ranks,
            engine: engine.clone(),
            shared,
        })
    }

    /// The CUDA device this rank runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The CUDA stream this communicator's collectives run on, in issue
    /// order (for ordering device work against them with events).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    fn abort_fn(&self) -> AbortFn {
        let shared = self.shared.clone();
        Arc::new(move |err| {
            shared.poison(err);
            shared.abort.store(true, Ordering::Release);
        })
    }

    fn send_job(&self, make: impl FnOnce(u64) -> Job) -> Result<u64, CommError> {
        self.issuer
            .issue(make)
            .map_err(|_| engine_error("the communicator's worker thread is gone"))
    }

    /// Queues a collective on the worker and returns its handle.
    fn submit(&self, desc: OpDesc, input: Input) -> Work {
        let stats = self.stats.clone();
        let check = self.check;
        let nodes = self.nodes.clone();
        let rank = self.rank;
        let (timeout, label, abort) = (self.timeout, self.label, self.abort_fn());
        let mut handle = None;
        let sent = self.send_job(|seq| {
            let describe = format!("{} #{seq} on rank {rank} of nccl group {label}", desc.kind);
            let (work, done) = Work::pending(timeout, describe, Some(abort));
            handle = Some(work);
            Box::new(move |w: &mut Worker| {
                let data = match input {
                    Input::None => Ok(None),
                    Input::Ready(buffer) => Ok(Some(buffer)),
                    Input::Later(pending) => pending.wait().map(Some),
                };
                let input_bytes = data
                    .as_ref()
                    .ok()
                    .and_then(|d| d.as_ref())
                    .map_or(0, |b| b.byte_len() as u64);
                let sent = ring_bytes(desc.kind, input_bytes, &nodes, rank, desc.root.unwrap_or(0));
                stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(desc.kind, sent);
                done.complete(run_collective(w, check, seq, desc, data));
            })
        });
        match (sent, handle) {
            (Ok(_), Some(work)) => work,
            (Err(err), _) => Work::failed(err),
            (Ok(_), None) => Work::failed(engine_error("internal: no handle")),
        }
    }

    /// [`Communicator::split`], returning the concrete type.
    pub fn split_nccl(&self, color: usize, key: usize) -> Result<NcclComm, CommError> {
        let (tx, rx) = mpsc::channel();
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(CollectiveKind::Split, Default::default());
        self.send_job(|seq| {
            Box::new(move |w: &mut Worker| {
                let _ = tx.send(run_split(w, seq, color, key));
            })
        })?;
        let plan = match rx.recv_timeout(self.timeout * 2) {
            Ok(plan) => plan?,
            Err(_) => {
                return Err(engine_error(format!(
                    "split on rank {} did not complete within {:?}",
                    self.rank,
                    self.timeout * 2
                )));
            }
        };
        let engine = NcclEngine {
            timeout: self.timeout,
            check_arguments: self.check,
        };
        NcclComm::start(
            &engine,
            InitSpec {
                id: plan.id,
                rank: plan.rank,
                size: plan.members.len(),
                device: self.device,
                world_ranks: plan.members.iter().map(|&r| self.world_ranks[r]).collect(),
                nodes: Some(plan.members.iter().map(|&r| self.nodes[r]).collect()),
            },
        )?
        .finish()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }

    fn nodes(&self) -> &[usize] {
        &self.nodes
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    crate::communicator::queued_collectives!();

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        Ok(Arc::new(self.split_nccl(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Closing the queue lets the worker run what is queued (each bounded
        // by the timeout), then destroy the NCCL communicator (abort it if
        // the group failed). The worker is not joined: ncclCommDestroy waits
        // for the other ranks of the node, and dropping must never hang.
        self.issuer.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nccl::CudaLibrary;

    #[test]
    fn missing_cuda_is_a_clear_error_not_a_panic() {
        if CudaLibrary::Driver.is_present() && CudaLibrary::Nccl.is_present() {
            eprintln!("CUDA and NCCL are installed here: nothing to check");
            return;
        }
        let err = NcclEngine::new()
            .local(&[0])
            .expect_err("no CUDA or no NCCL: the engine cannot start");
        let CommError::Engine { engine, message } = &err else {
            panic!("expected an engine error, got {err:?}");
        };
        assert_eq!(*engine, "nccl");
        let named = if CudaLibrary::Driver.is_present() {
            "libnccl.so"
        } else {
            "libcuda.so"
        };
        assert!(message.contains(named), "{message}");
        assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
        // The other constructors fail the same way.
        assert!(
            NcclEngine::new()
                .init_rank(UniqueId::from_bytes([0; 128]), 0, 1, 0)
                .is_err()
        );
        assert!(
            NcclEngine::new()
                .rendezvous("127.0.0.1:1", 0, 1, 0)
                .is_err()
        );
    }
}
