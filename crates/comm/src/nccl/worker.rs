//! A communicator's worker thread: it owns the NCCL communicator and its
//! CUDA stream, and runs the collectives in issue order. Each collective
//! exchanges the descriptors of every rank's arguments ([`WireDesc`]), copies
//! host buffers to the device, enqueues the NCCL call on the stream and polls
//! it until it completes, fails, is abandoned or times out (then the NCCL
//! communicator is aborted), and copies the result back.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use super::UniqueId;
use super::errors::{cuda_error, engine_error, guarded, nccl_error};
use crate::communicator::{OpDesc, WireDesc, check_matching, validate_local};
use crate::worker::nodes_by_first_appearance;
use crate::{Buffer, CollectiveKind, CommError, DType, ReduceOp};

/// The raw NCCL communicator, used only on its worker thread.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; it is owned and used by one worker thread.
unsafe impl Send for RawComm {}

/// State shared by a communicator's handle, its worker and its waiters.
#[derive(Default)]
pub(super) struct Shared {
    /// The failure that poisoned the group on this rank.
    failure: Mutex<Option<CommError>>,
    /// Set by a waiter that gave up: the worker aborts the NCCL communicator.
    pub(super) abort: AtomicBool,
}

impl Shared {
    /// The failure that poisoned the group, if any.
    pub(super) fn failure(&self) -> Option<CommError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the first failure of the group.
    pub(super) fn poison(&self, err: CommError) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(err);
        }
    }
}

/// A collective, as its worker runs it.
enum RawOp {
    AllGather,
    ReduceScatter(sys::ncclRedOp_t),
    AllReduce(sys::ncclRedOp_t),
    Broadcast(c_int),
}

/// The worker thread's state: the NCCL communicator and its stream.
pub(super) struct Worker {
    comm: Option<RawComm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
    shared: Arc<Shared>,
}

fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl Worker {
    fn raw(&self) -> Result<sys::ncclComm_t, CommError> {
        match &self.comm {
            Some(c) => Ok(c.0),
            None => Err(self
                .shared
                .failure()
                .map(|e| e.poisoned())
                .unwrap_or_else(|| engine_error("the NCCL communicator was aborted"))),
        }
    }

    /// Aborts the NCCL communicator (after a timeout or an asynchronous
    /// error) and poisons the group.
    fn abort(&mut self, err: CommError) -> CommError {
        if let Some(comm) = self.comm.take() {
            // SAFETY: the communicator is valid and no longer used after this.
            let _ = unsafe { nccl::comm_abort(comm.0) };
        }
        self.shared.poison(err.clone());
        err
    }

    /// Enqueues one NCCL collective on the stream, on raw device pointers.
    /// `count` is per NCCL's convention: the send count for all-gather, the
    /// receive count for reduce-scatter, the element count otherwise.
    ///
    /// # Safety
    /// `send` and `recv` are device buffers large enough for `op` and `count`
    /// that stay alive until the stream has passed this collective.
    unsafe fn enqueue(
        &self,
        op: &RawOp,
        send: u64,
        recv: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        let comm = self.raw()?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let (send, recv) = (send as *const c_void, recv as *mut c_void);
        let result = unsafe {
            match *op {
                RawOp::AllGather => nccl::all_gather(send, recv, count, dtype, comm, stream),
                RawOp::ReduceScatter(r) => {
                    nccl::reduce_scatter(send, recv, count, dtype, r, comm, stream)
                }
                RawOp::AllReduce(r) => nccl::all_reduce(send, recv, count, dtype, r, comm, stream),
                RawOp::Broadcast(root) => {
                    nccl::broadcast(send, recv, count, dtype, root, comm, stream)
                }
            }
        };
        result
            .map(|_| ())
            .map_err(|e| nccl_error("enqueueing a collective", e, Some(comm)))
    }

    /// Polls until the stream's work so far is done; on a timeout, an NCCL
    /// asynchronous error or a waiter's abort, aborts the communicator.
    fn wait_stream(&mut self, kind: CollectiveKind, seq: u64) -> Result<(), CommError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| cuda_error("cuEventRecord", e))?;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let err = cuda_error(&format!("{kind} #{seq}"), e);
                    return Err(self.abort(err));
                }
            }
            let comm = self.raw()?;
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is valid (not aborted yet).
            let _ = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                let err = nccl_error(&format!("{kind} #{seq}"), NcclError(state), Some(comm));
                return Err(self.abort(err));
            }
            if self.shared.abort.load(Ordering::Acquire) {
                let err = self.shared.failure().unwrap_or_else(|| {
                    engine_error(format!("{kind} #{seq} was abandoned by its waiter"))
                });
                return Err(self.abort(err));
            }
            if Instant::now() >= deadline {
                let err = engine_error(format!(
                    "{kind} #{seq} on rank {} of {} did not complete within {:?}: a peer rank \
                     never arrived, died or issued collectives in another order; the NCCL \
                     communicator was aborted",
                    self.rank, self.size, self.timeout
                ));
                return Err(self.abort(err));
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(if spins < 2000 { 20 } else { 500 }));
            }
        }
    }

    /// One collective on host bytes: copy in, run, wait, copy out.
    #[allow(clippy::too_many_arguments)]
    fn host_collective(
        &mut self,
        kind: CollectiveKind,
        seq: u64,
        op: RawOp,
        send: &[u8],
        recv: &mut [u8],
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        let stream = self.stream.clone();
        let dev_send = stream
            .clone_htod(send)
            .map_err(|e| cuda_error("copy to device", e))?;
        // SAFETY: fully written by the collective before it is read.
        let mut dev_recv =
            unsafe { stream.alloc::<u8>(recv.len()) }.map_err(|e| cuda_error("cuMemAlloc", e))?;
        {
            let (send_ptr, _s) = dev_send.device_ptr(&stream);
            let (recv_ptr, _r) = dev_recv.device_ptr_mut(&stream);
            // SAFETY: both buffers live until after wait_stream below.
            unsafe { self.enqueue(&op, send_ptr, recv_ptr, count, dtype)? };
        }
        self.wait_stream(kind, seq)?;
        stream
            .memcpy_dtoh(&dev_recv, recv)
            .map_err(|e| cuda_error("copy to host", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("cuStreamSynchronize", e))?;
        Ok(())
    }

    /// All-gathers `mine` (u64s) from every rank.
    fn exchange_u64(
        &mut self,
        kind: CollectiveKind,
        seq: u64,
        mine: &[u64],
    ) -> Result<Vec<u64>, CommError> {
        let mut all = vec![0u64; mine.len() * self.size];
        self.host_collective(
            kind,
            seq,
            RawOp::AllGather,
            bytemuck::cast_slice(mine),
            bytemuck::cast_slice_mut(&mut all),
            mine.len(),
            sys::ncclDataType_t::ncclUint64,
        )?;
        Ok(all)
    }
}

const STATUS_OK: u64 = WireDesc::STATUS_OK;
const STATUS_INPUT_FAILED: u64 = WireDesc::STATUS_INPUT_FAILED;

/// The descriptors of every rank, with split colours/keys and input status.
struct Exchanged {
    descs: Vec<OpDesc>,
    colors: Vec<usize>,
    keys: Vec<usize>,
    status: Vec<u64>,
}

/// Runs the descriptor exchange (or, unchecked, trusts this rank's own).
fn exchange_descs(
    w: &mut Worker,
    check: bool,
    seq: u64,
    desc: &OpDesc,
    color: usize,
    key: usize,
    status: u64,
) -> Result<Exchanged, CommError> {
    let words = if check || matches!(desc.kind, CollectiveKind::Split | CollectiveKind::Barrier) {
        w.exchange_u64(
            desc.kind,
            seq,
            &WireDesc::new(*desc, status, color, key).encode(),
        )?
    } else {
        WireDesc::new(*desc, status, color, key)
            .encode()
            .repeat(w.size)
    };
    let mut out = Exchanged {
        descs: Vec::with_capacity(w.size),
        colors: Vec::with_capacity(w.size),
        keys: Vec::with_capacity(w.size),
        status: Vec::with_capacity(w.size),
    };
    for chunk in words.chunks(WireDesc::WORDS) {
        let wire = WireDesc::decode(chunk);
        out.descs.push(wire.desc);
        out.colors.push(wire.color);
        out.keys.push(wire.key);
        out.status.push(wire.status);
    }
    Ok(out)
}

/// Runs one data collective of host buffers on the worker.
pub(super) fn run_collective(
    w: &mut Worker,
    check: bool,
    seq: u64,
    mut desc: OpDesc,
    input: Result<Option<Buffer>, CommError>,
) -> Result<Buffer, CommError> {
    if let Some(err) = w.shared.failure() {
        return Err(err.poisoned());
    }
    let (data, status, own_error) = match input {
        Ok(data) => (data, STATUS_OK, None),
        Err(err) => (None, STATUS_INPUT_FAILED, Some(err)),
    };
    if let Some(buffer) = &data {
        desc.dtype = Some(buffer.dtype());
        desc.len = buffer.len();
    }
    if !check && let Some(err) = own_error {
        // Unchecked: no descriptor travels, so the peers learn of it only by
        // their timeout.
        w.shared.poison(err.clone());
        return Err(err);
    }
    let ex = match exchange_descs(w, check, seq, &desc, 0, 0, status) {
        Ok(ex) => ex,
        Err(err) => return Err(own_error.unwrap_or(err)),
    };
    if let Some(failed) = ex.status.iter().position(|&s| s != STATUS_OK) {
        // A deferred input failed on some rank: every rank fails and the
        // group is poisoned, as in the threads engine.
        let err = own_error.unwrap_or_else(|| {
            engine_error(format!(
                "{} #{seq}: the input of rank {failed} failed before the collective",
                desc.kind
            ))
        });
        w.shared.poison(err.clone());
        return Err(err);
    }
    check_matching(seq, &ex.descs)?;
    validate_local(&desc, w.size)?;
    let p = w.size;
    let Some(input) = data else {
        // Barrier: the descriptor exchange was the meeting.
        return Ok(Buffer::F32(Vec::new()));
    };
    let dtype = input.dtype();
    let len = input.len();
    let (op, out_len, count) = match desc.kind {
        CollectiveKind::AllGather => (RawOp::AllGather, len * p, len),
        CollectiveKind::ReduceScatter => (
            RawOp::ReduceScatter(nccl_op(desc.op.unwrap_or(ReduceOp::Sum))),
            len / p,
            len / p,
        ),
        CollectiveKind::AllReduce => (
            RawOp::AllReduce(nccl_op(desc.op.unwrap_or(ReduceOp::Sum))),
            len,
            len,
        ),
        CollectiveKind::Broadcast => (RawOp::Broadcast(desc.root.unwrap_or(0) as c_int), len, len),
        CollectiveKind::Barrier | CollectiveKind::Split => {
            return Ok(Buffer::F32(Vec::new()));
        }
    };
    let mut out = Buffer::zeros(dtype, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    w.host_collective(
        desc.kind,
        seq,
        op,
        input.as_bytes(),
        out.as_bytes_mut(),
        count,
        nccl_dtype(dtype),
    )?;
    Ok(out)
}

/// Where this rank goes in a split: its new group's id, rank and members.
pub(super) struct SplitPlan {
    pub(super) id: UniqueId,
    pub(super) rank: usize,
    pub(super) members: Vec<usize>,
}

/// Runs a split on the worker: exchanges colours and keys, and the new
/// groups' ids over this communicator.
pub(super) fn run_split(
    w: &mut Worker,
    seq: u64,
    color: usize,
    key: usize,
) -> Result<SplitPlan, CommError> {
    if let Some(err) = w.shared.failure() {
        return Err(err.poisoned());
    }
    let desc = OpDesc::new(CollectiveKind::Split, None);
    let ex = exchange_descs(w, true, seq, &desc, color, key, STATUS_OK)?;
    check_matching(seq, &ex.descs)?;
    let mut members: Vec<usize> = (0..w.size).filter(|&r| ex.colors[r] == color).collect();
    members.sort_by_key(|&r| (ex.keys[r], r));
    let new_rank = members
        .iter()
        .position(|&r| r == w.rank)
        .expect("a rank is a member of its own colour");
    // The new group's rank 0 creates its id; all ids travel over the parent.
    let mine = if new_rank == 0 {
        *UniqueId::new()?.as_bytes()
    } else {
        [0u8; 128]
    };
    let mut all = vec![0u8; 128 * w.size];
    w.host_collective(
        CollectiveKind::Split,
        seq,
        RawOp::AllGather,
        &mine,
        &mut all,
        128,
        sys::ncclDataType_t::ncclUint8,
    )?;
    let leader = members[0];
    let id: [u8; 128] = all[leader * 128..(leader + 1) * 128]
        .try_into()
        .expect("128 bytes");
    Ok(SplitPlan {
        id: UniqueId::from_bytes(id),
        rank: new_rank,
        members,
    })
}

fn host_hash() -> u64 {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    // FNV-1a: the same on every process of the same host.
    name.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Initialises the CUDA context, stream and NCCL communicator (on the worker).
fn init_worker(
    spec: &InitSpec,
    timeout: Duration,
    shared: &Arc<Shared>,
) -> Result<(Worker, Vec<usize>), CommError> {
    let (size, rank) = (spec.size, spec.rank);
    let (stream, comm) = guarded("initialising CUDA and NCCL", || {
        let ctx = CudaContext::new(spec.device)
            .map_err(|e| cuda_error(&format!("opening device {}", spec.device), e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("cuStreamCreate", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL on success.
        unsafe { nccl::comm_init_rank(&mut comm, size as c_int, spec.id.to_sys(), rank as c_int) }
            .map_err(|e| {
                nccl_error(
                    &format!(
                        "ncclCommInitRank (rank {rank} of {size}, device {})",
                        spec.device
                    ),
                    e,
                    None,
                )
            })?;
        Ok((stream, comm))
    })?;
    let mut worker = Worker {
        comm: Some(RawComm(comm)),
        stream,
        rank,
        size,
        timeout,
        shared: shared.clone(),
    };
    let nodes = match &spec.nodes {
        Some(nodes) => nodes.clone(),
        None => {
            let hashes = worker.exchange_u64(CollectiveKind::Barrier, 0, &[host_hash()])?;
            nodes_by_first_appearance(&hashes)
        }
    };
    Ok((worker, nodes))
}

/// A job for a communicator's worker.
pub(super) type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// What an initialised worker hands back: its stream and the ranks' nodes.
pub(super) type Ready = (Arc<CudaStream>, Vec<usize>);

/// What a new communicator's worker needs to initialise it.
pub(super) struct InitSpec {
    pub(super) id: UniqueId,
    pub(super) rank: usize,
    pub(super) size: usize,
    pub(super) device: usize,
    pub(super) world_ranks: Vec<usize>,
    /// Known nodes (from the parent of a split), or found by exchanging
    /// host-name hashes.
    pub(super) nodes: Option<Vec<usize>>,
}

impl InitSpec {
    /// Rank `rank` of a new world of `size` ranks (world ranks `0..size`).
    pub(super) fn world(
        id: UniqueId,
        rank: usize,
        size: usize,
        device: usize,
        nodes: Option<Vec<usize>>,
    ) -> InitSpec {
        InitSpec {
            id,
            rank,
            size,
            device,
            world_ranks: (0..size).collect(),
            nodes,
        }
    }
}

/// A worker just spawned: where its initialisation's outcome arrives, and its
/// job queue.
pub(super) struct Spawned {
    pub(super) init: Receiver<Result<Ready, CommError>>,
    pub(super) jobs: Sender<Job>,
}

/// Spawns the worker thread of a new communicator. It initialises CUDA and
/// NCCL (the outcome arrives on the returned receiver), runs the jobs of the
/// returned queue in order until it is closed, then destroys the NCCL
/// communicator (aborts it if the group failed).
pub(super) fn spawn(
    spec: InitSpec,
    timeout: Duration,
    shared: Arc<Shared>,
) -> Result<Spawned, CommError> {
    let (init_tx, init_rx) = mpsc::channel();
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(format!("mics-nccl-{}", spec.world_ranks[spec.rank]))
        .spawn(move || {
            let mut worker = match init_worker(&spec, timeout, &shared) {
                Ok((worker, nodes)) => {
                    let _ = init_tx.send(Ok((worker.stream.clone(), nodes)));
                    worker
                }
                Err(err) => {
                    let _ = init_tx.send(Err(err));
                    return;
                }
            };
            for job in job_rx {
                job(&mut worker);
            }
            // The handle is gone and every queued collective has run.
            if let Some(comm) = worker.comm.take() {
                // SAFETY: valid communicator, not used after this.
                unsafe {
                    if worker.shared.failure().is_some() {
                        let _ = nccl::comm_abort(comm.0);
                    } else {
                        let _ = worker.stream.synchronize();
                        let _ = nccl::comm_destroy(comm.0);
                    }
                }
            }
        })
        .map_err(|e| engine_error(format!("spawning a worker thread: {e}")))?;
    Ok(Spawned {
        init: init_rx,
        jobs: job_tx,
    })
}
