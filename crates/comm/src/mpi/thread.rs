//! The communication thread: the only thread that calls MPI. It initialises
//! and finalises MPI, owns every MPI communicator of the process, and runs the
//! queued collectives in order: the descriptor exchange, then the data as raw
//! bits through MPI's non-blocking collectives, polled to completion (or to
//! `MPI_Abort` on a timeout), reductions done locally in rank order.

use std::os::raw::c_int;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::mpi::Threading;
use ::mpi::request::{Request, Scope};
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::traits::{Communicator as _, CommunicatorCollectives, Equivalence, Root};

use super::{ABORT_CODE, AbortState, Call, ENGINE, Msg, WorldInfo, engine_error};
use crate::communicator::{Input, OpDesc, WireDesc, check_matching, validate_local};
use crate::reduce::{concat, reduce_range};
use crate::stats::ring_bytes;
use crate::worker::nodes_by_first_appearance;
use crate::{Buffer, CollectiveKind, CommError, CommStats, ReduceOp, SentBytes, Work};

/// A communicator as the communication thread holds it.
struct Slot {
    comm: SimpleCommunicator,
    /// Set, identically on every rank, when a collective's input failed.
    poisoned: Option<CommError>,
}

/// State of the communication thread: every MPI object of the process.
pub(super) struct Ctx {
    world_rank: usize,
    timeout: Duration,
    abort: Arc<AbortState>,
    slots: Vec<Slot>,
}

/// A new communicator made by a split.
pub(super) struct Made {
    pub(super) id: usize,
    pub(super) rank: usize,
    pub(super) world_ranks: Vec<usize>,
    pub(super) nodes: Vec<usize>,
}

pub(super) fn comm_thread(
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
    pub(super) fn collective(
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
    pub(super) fn split(&mut self, call: Call, world_ranks: &[usize]) -> Result<Made, CommError> {
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
