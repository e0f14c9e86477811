//! The in-process engine: one rank per thread, the embedded default.
//!
//! Each communicator has a worker thread that runs its collectives in issue
//! order, so a collective proceeds while the rank's own thread computes
//! (the same overlap a NCCL stream or an MPI progress thread gives). The
//! ranks of a group meet at a rendezvous slot per collective sequence number;
//! each rank's worker reads the peers' inputs from the slot and builds its own
//! output, so results are bit-identical on every rank and equal to a
//! single-threaded reference that combines values in rank order.
//!
//! A topology can be imposed ([`ThreadsEngine::ranks_per_node`]) so that byte
//! accounting and hierarchical collectives behave as on several nodes, and an
//! artificial per-collective latency ([`ThreadsEngine::latency`]) models a
//! network for overlap benchmarks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::communicator::{Input, OpDesc, check_matching, validate_local};
use crate::reduce::{concat, reduce_range};
use crate::stats::ring_bytes;
use crate::work::AbortFn;
use crate::worker::{Issuer, run_ranks};
use crate::{
    Buffer, CollectiveKind, CommError, CommStats, Communicator, Fingerprint, ReduceOp, Work,
};

pub use crate::worker::DEFAULT_TIMEOUT;

/// Builder of an in-process world.
#[derive(Debug, Clone)]
pub struct ThreadsEngine {
    world: usize,
    ranks_per_node: usize,
    timeout: Duration,
    latency: Duration,
}

impl ThreadsEngine {
    /// A world of `world` ranks, all on one node, with [`DEFAULT_TIMEOUT`].
    pub fn new(world: usize) -> ThreadsEngine {
        ThreadsEngine {
            world,
            ranks_per_node: world,
            timeout: DEFAULT_TIMEOUT,
            latency: Duration::ZERO,
        }
    }

    /// Imposes `k` ranks per node (ranks numbered node by node).
    pub fn ranks_per_node(mut self, k: usize) -> ThreadsEngine {
        self.ranks_per_node = k;
        self
    }

    /// How long a collective waits for the other ranks before every rank's
    /// collective fails.
    pub fn timeout(mut self, timeout: Duration) -> ThreadsEngine {
        self.timeout = timeout;
        self
    }

    /// An artificial per-collective latency, as a network would add: a
    /// collective completes no earlier than `latency` after its input was
    /// handed to the engine. The latencies of collectives queued on one
    /// communicator overlap (a pipelined link: several messages in flight),
    /// while their data exchange still runs one at a time in issue order;
    /// a collective issued only after the previous one was waited for pays
    /// the full latency again.
    pub fn latency(mut self, latency: Duration) -> ThreadsEngine {
        self.latency = latency;
        self
    }

    /// The world communicators, one per rank, to hand to the rank threads.
    pub fn build(&self) -> Result<Vec<ThreadComm>, CommError> {
        if self.world == 0
            || self.ranks_per_node == 0
            || !self.world.is_multiple_of(self.ranks_per_node)
        {
            return Err(CommError::InvalidArgument(format!(
                "threads engine: {} ranks cannot be laid out {} per node",
                self.world, self.ranks_per_node
            )));
        }
        let world_ranks: Vec<usize> = (0..self.world).collect();
        let nodes = world_ranks
            .iter()
            .map(|r| r / self.ranks_per_node)
            .collect();
        let group = Group::new(world_ranks, nodes, self.timeout, self.latency);
        Ok((0..self.world)
            .map(|rank| ThreadComm::new(group.clone(), rank))
            .collect())
    }

    /// Runs `f` on one thread per rank with that rank's world communicator,
    /// and returns each rank's result, or its panic message.
    pub fn run<R, F>(&self, f: F) -> Result<Vec<Result<R, String>>, CommError>
    where
        R: Send,
        F: Fn(ThreadComm) -> R + Sync,
    {
        let comms = self.build()?;
        Ok(run_ranks(comms, |rank| format!("mics-rank-{rank}"), &f))
    }
}

/// What one rank brings to a collective.
struct Post {
    desc: OpDesc,
    data: Option<Buffer>,
    color: usize,
    key: usize,
}

/// The meeting point of one collective.
struct Slot {
    posts: Vec<Option<Arc<Post>>>,
    arrived: usize,
    /// Second stage of all-reduce: each rank's reduced chunk.
    stage2: Vec<Option<Arc<Buffer>>>,
    stage2_arrived: usize,
    /// Ranks done with the slot; it is freed when all are.
    released: usize,
    /// Result of a split: each old rank's new group and new rank.
    split: Option<Vec<(Arc<Group>, usize)>>,
}

impl Slot {
    fn new(p: usize) -> Slot {
        Slot {
            posts: vec![None; p],
            arrived: 0,
            stage2: vec![None; p],
            stage2_arrived: 0,
            released: 0,
            split: None,
        }
    }
}

struct GroupState {
    slots: HashMap<u64, Slot>,
    /// The failure that poisoned the group, if any.
    failure: Option<CommError>,
    /// Why each rank left, if it did.
    left: Vec<Option<String>>,
}

/// Shared state of one group of ranks.
struct Group {
    world_ranks: Vec<usize>,
    nodes: Vec<usize>,
    timeout: Duration,
    latency: Duration,
    state: Mutex<GroupState>,
    changed: Condvar,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("world_ranks", &self.world_ranks)
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl Group {
    fn new(
        world_ranks: Vec<usize>,
        nodes: Vec<usize>,
        timeout: Duration,
        latency: Duration,
    ) -> Arc<Group> {
        let p = world_ranks.len();
        Arc::new(Group {
            world_ranks,
            nodes,
            timeout,
            latency,
            state: Mutex::new(GroupState {
                slots: HashMap::new(),
                failure: None,
                left: vec![None; p],
            }),
            changed: Condvar::new(),
        })
    }

    fn size(&self) -> usize {
        self.world_ranks.len()
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A rank thread that panicked while holding the lock leaves the data
        // consistent (every update is a single assignment), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poison(&self, err: CommError) {
        let mut state = self.lock();
        if state.failure.is_none() {
            state.failure = Some(err);
        }
        self.changed.notify_all();
    }

    /// Waits on the condition until `ready` says done, the group fails, a
    /// missing rank leaves, or the timeout passes.
    fn wait_for<'a, T>(
        &'a self,
        mut state: MutexGuard<'a, GroupState>,
        kind: CollectiveKind,
        seq: u64,
        mut ready: impl FnMut(&mut GroupState) -> Option<T>,
        missing: impl Fn(&GroupState) -> Vec<usize>,
    ) -> Result<(MutexGuard<'a, GroupState>, T), CommError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(err) = &state.failure {
                return Err(err.clone());
            }
            if let Some(value) = ready(&mut state) {
                return Ok((state, value));
            }
            let absent = missing(&state);
            if let Some(&rank) = absent.iter().find(|&&r| state.left[r].is_some()) {
                let err = CommError::RankLeft {
                    rank,
                    reason: state.left[rank].clone().unwrap_or_default(),
                    kind,
                    seq,
                };
                state.failure = Some(err.clone());
                self.changed.notify_all();
                return Err(err);
            }
            let now = Instant::now();
            if now >= deadline {
                let err = CommError::Timeout {
                    kind,
                    seq,
                    timeout: self.timeout,
                    missing: absent,
                };
                state.failure = Some(err.clone());
                self.changed.notify_all();
                return Err(err);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Posts this rank's input and waits for every rank's.
    fn rendezvous(&self, seq: u64, rank: usize, post: Post) -> Result<Vec<Arc<Post>>, CommError> {
        let kind = post.desc.kind;
        let p = self.size();
        let mut state = self.lock();
        if let Some(err) = &state.failure {
            return Err(err.poisoned());
        }
        let slot = state.slots.entry(seq).or_insert_with(|| Slot::new(p));
        slot.posts[rank] = Some(Arc::new(post));
        slot.arrived += 1;
        self.changed.notify_all();
        let (_state, posts) = self.wait_for(
            state,
            kind,
            seq,
            |st| {
                let slot = &st.slots[&seq];
                (slot.arrived == p).then(|| slot.posts.iter().flatten().cloned().collect())
            },
            |st| {
                let slot = &st.slots[&seq];
                (0..p).filter(|&r| slot.posts[r].is_none()).collect()
            },
        )?;
        Ok(posts)
    }

    /// Second stage of all-reduce: posts this rank's reduced chunk and waits
    /// for all chunks.
    fn exchange_chunks(
        &self,
        seq: u64,
        rank: usize,
        chunk: Buffer,
    ) -> Result<Vec<Arc<Buffer>>, CommError> {
        let p = self.size();
        let mut state = self.lock();
        let slot = state
            .slots
            .get_mut(&seq)
            .expect("slot lives until released");
        slot.stage2[rank] = Some(Arc::new(chunk));
        slot.stage2_arrived += 1;
        self.changed.notify_all();
        let (_state, chunks) = self.wait_for(
            state,
            CollectiveKind::AllReduce,
            seq,
            |st| {
                let slot = &st.slots[&seq];
                (slot.stage2_arrived == p).then(|| slot.stage2.iter().flatten().cloned().collect())
            },
            |st| {
                let slot = &st.slots[&seq];
                (0..p).filter(|&r| slot.stage2[r].is_none()).collect()
            },
        )?;
        Ok(chunks)
    }

    /// Builds (once) the groups of a split and returns this rank's.
    fn split_groups(&self, seq: u64, rank: usize, posts: &[Arc<Post>]) -> (Arc<Group>, usize) {
        let mut state = self.lock();
        let slot = state
            .slots
            .get_mut(&seq)
            .expect("slot lives until released");
        if slot.split.is_none() {
            let mut result = vec![None; posts.len()];
            let mut colors: Vec<usize> = posts.iter().map(|p| p.color).collect();
            colors.sort_unstable();
            colors.dedup();
            for color in colors {
                let mut members: Vec<usize> = (0..posts.len())
                    .filter(|&r| posts[r].color == color)
                    .collect();
                members.sort_by_key(|&r| (posts[r].key, r));
                let group = Group::new(
                    members.iter().map(|&r| self.world_ranks[r]).collect(),
                    members.iter().map(|&r| self.nodes[r]).collect(),
                    self.timeout,
                    self.latency,
                );
                for (new_rank, &old) in members.iter().enumerate() {
                    result[old] = Some((group.clone(), new_rank));
                }
            }
            slot.split = Some(result.into_iter().flatten().collect());
        }
        slot.split.as_ref().expect("just built")[rank].clone()
    }

    /// This rank is done with the slot; the last one frees it.
    fn release(&self, seq: u64) {
        let p = self.size();
        let mut state = self.lock();
        if let Some(slot) = state.slots.get_mut(&seq) {
            slot.released += 1;
            if slot.released == p {
                state.slots.remove(&seq);
            }
        }
    }

    /// Runs collective `seq` for `rank` (on the rank's worker thread), not
    /// before `latency` has passed since `sent`, the time its input was
    /// handed to the engine.
    fn execute(
        &self,
        seq: u64,
        rank: usize,
        post: Post,
        sent: Instant,
    ) -> Result<Buffer, CommError> {
        if !self.latency.is_zero() {
            let arrives = sent + self.latency;
            let now = Instant::now();
            if arrives > now {
                std::thread::sleep(arrives - now);
            }
        }
        let posts = self.rendezvous(seq, rank, post)?;
        let result = self.combine(seq, rank, &posts);
        if !matches!(
            result,
            Err(CommError::Timeout { .. } | CommError::RankLeft { .. })
        ) {
            self.release(seq);
        }
        result
    }

    fn combine(&self, seq: u64, rank: usize, posts: &[Arc<Post>]) -> Result<Buffer, CommError> {
        let descs: Vec<OpDesc> = posts.iter().map(|p| p.desc).collect();
        check_matching(seq, &descs)?;
        let desc = descs[0];
        // Checked after matching, so that every rank reports the same error.
        validate_local(&desc, self.size())?;
        let p = self.size();
        let inputs: Vec<&Buffer> = posts.iter().filter_map(|p| p.data.as_ref()).collect();
        match desc.kind {
            CollectiveKind::AllGather => Ok(concat(&inputs)),
            CollectiveKind::ReduceScatter => {
                let chunk = desc.len / p;
                let op = desc.op.unwrap_or(ReduceOp::Sum);
                Ok(reduce_range(&inputs, rank * chunk..(rank + 1) * chunk, op))
            }
            CollectiveKind::AllReduce => {
                // Reduce-scatter then all-gather, as a ring does: each rank
                // reduces one chunk, so the work is spread over the ranks.
                let chunk = desc.len.div_ceil(p);
                let start = (rank * chunk).min(desc.len);
                let end = ((rank + 1) * chunk).min(desc.len);
                let op = desc.op.unwrap_or(ReduceOp::Sum);
                let mine = reduce_range(&inputs, start..end, op);
                let chunks = self.exchange_chunks(seq, rank, mine)?;
                let refs: Vec<&Buffer> = chunks.iter().map(|c| c.as_ref()).collect();
                Ok(concat(&refs))
            }
            CollectiveKind::Broadcast => Ok(inputs[desc.root.unwrap_or(0)].clone()),
            CollectiveKind::Barrier | CollectiveKind::Split => Ok(Buffer::F32(Vec::new())),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One rank's communicator in the in-process engine.
pub struct ThreadComm {
    group: Arc<Group>,
    rank: usize,
    issuer: Issuer<Job>,
    worker: Option<JoinHandle<()>>,
    stats: Arc<Mutex<CommStats>>,
    group_id: u64,
}

static NEXT_GROUP_ID: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("size", &self.group.size())
            .field("world_ranks", &self.group.world_ranks)
            .finish()
    }
}

impl ThreadComm {
    fn new(group: Arc<Group>, rank: usize) -> ThreadComm {
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name(format!("mics-comm-{}", group.world_ranks[rank]))
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawning a communicator worker thread");
        ThreadComm {
            group,
            rank,
            issuer: Issuer::new(tx),
            worker: Some(worker),
            stats: Arc::new(Mutex::new(CommStats::default())),
            group_id: NEXT_GROUP_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn abort_fn(&self) -> AbortFn {
        let group = self.group.clone();
        Arc::new(move |err| group.poison(err))
    }

    /// Queues a collective on the worker and returns its handle. The input
    /// is taken (or waited for) on the worker, in issue order.
    fn submit(&self, mut desc: OpDesc, input: Input) -> Work {
        let group = self.group.clone();
        let stats = self.stats.clone();
        let rank = self.rank;
        let mut handle = None;
        let issued = self.issuer.issue(|seq| {
            let describe = format!(
                "{} #{seq} on rank {} of group {}",
                desc.kind, self.rank, self.group_id
            );
            let (work, done) = Work::pending(self.group.timeout, describe, Some(self.abort_fn()));
            handle = Some(work);
            // The latency runs from the moment the input is on its way: the
            // issue for a ready input, the end of the wait for a later one.
            let issued = Instant::now();
            Box::new(move || {
                let mut on_wire = issued;
                let data = match input {
                    Input::None => None,
                    Input::Ready(buffer) => Some(buffer),
                    Input::Later(pending) => match pending.wait() {
                        Ok(buffer) => {
                            on_wire = Instant::now();
                            Some(buffer)
                        }
                        Err(err) => {
                            // The peers will wait for this rank: fail them too.
                            group.poison(err.clone());
                            done.complete(Err(err));
                            return;
                        }
                    },
                };
                if let Some(buffer) = &data {
                    desc.dtype = Some(buffer.dtype());
                    desc.len = buffer.len();
                }
                let input_bytes = data.as_ref().map_or(0, |b| b.byte_len() as u64);
                let sent = ring_bytes(
                    desc.kind,
                    input_bytes,
                    &group.nodes,
                    rank,
                    desc.root.unwrap_or(0),
                );
                stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(desc.kind, sent);
                let post = Post {
                    desc,
                    data,
                    color: 0,
                    key: 0,
                };
                done.complete(group.execute(seq, rank, post, on_wire));
            })
        });
        match (issued, handle) {
            (Ok(_), Some(work)) => work,
            _ => Work::failed(worker_gone()),
        }
    }
}

fn worker_gone() -> CommError {
    CommError::Engine {
        engine: "threads",
        message: "the communicator's worker thread is gone".into(),
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.group.world_ranks
    }

    fn nodes(&self) -> &[usize] {
        &self.group.nodes
    }

    fn timeout(&self) -> Duration {
        self.group.timeout
    }

    crate::communicator::queued_collectives!();

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        let split = self.split_threads(color, key)?;
        Ok(Arc::new(split))
    }

    fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ThreadComm {
    /// [`Communicator::split`], returning the concrete type.
    pub fn split_threads(&self, color: usize, key: usize) -> Result<ThreadComm, CommError> {
        let (tx, rx) = mpsc::channel();
        let post = Post {
            desc: OpDesc::queued(CollectiveKind::Split, None, None, Fingerprint::NONE),
            data: None,
            color,
            key,
        };
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(CollectiveKind::Split, Default::default());
        let group = self.group.clone();
        let rank = self.rank;
        self.issuer
            .issue(|seq| -> Job {
                Box::new(move || {
                    let result = group.rendezvous(seq, rank, post).map(|posts| {
                        let mine = group.split_groups(seq, rank, &posts);
                        group.release(seq);
                        mine
                    });
                    let _ = tx.send(result);
                })
            })
            .map_err(|_| worker_gone())?;
        let (group, rank) = rx.recv().map_err(|_| CommError::Engine {
            engine: "threads",
            message: "split: the worker thread died".into(),
        })??;
        Ok(ThreadComm::new(group, rank))
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "its thread panicked"
        } else {
            "its communicator was dropped"
        };
        // Let queued collectives finish (each is bounded by the timeout),
        // then tell the group this rank will not come again.
        self.issuer.close();
        if !std::thread::panicking()
            && let Some(worker) = self.worker.take()
        {
            let _ = worker.join();
        }
        let mut state = self.group.lock();
        state.left[self.rank] = Some(reason.to_string());
        self.group.changed.notify_all();
    }
}
