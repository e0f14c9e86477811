//! Prefetch: record the order in which parameters are gathered on the first
//! step, and on later steps start the next gathers while the current op runs.
//!
//! Every rank of a partition group runs the same program, so they record the
//! same order and issue the same collectives in the same sequence. When a
//! step uses parameters in another order, the prefetched buffers are dropped,
//! the step continues with on-demand gathers and the new order is recorded.
//!
//! A prefetched buffer is used only if it was gathered from the very shard
//! value the op uses (its `uid`: same parameter, same version, same copy of
//! the module). A forward after `step()` without `begin_step()`, or a second
//! copy of a module whose parameters share the ids, would otherwise be
//! served a buffer gathered from another value; such a buffer is dropped, the
//! op gathers on demand, and the miss is counted as stale.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use burn::module::ParamId;
use mics_comm::{Sharding, Work};

use crate::gather::{Gathered, start_together};
use crate::runtime::{AtomicCounters, MicsRuntime};

/// How far ahead to gather.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Gathers in flight or waiting ahead of the current use; 0 turns prefetch off.
    pub depth: usize,
    /// Most bytes of gathered parameters held ahead of their use.
    pub budget_bytes: u64,
}

impl PrefetchConfig {
    /// No prefetch: every gather is issued when an op needs it.
    pub fn disabled() -> Self {
        PrefetchConfig {
            depth: 0,
            budget_bytes: 0,
        }
    }

    /// Prefetch `depth` gathers ahead within `budget_bytes`.
    pub fn new(depth: usize, budget_bytes: u64) -> Self {
        PrefetchConfig {
            depth,
            budget_bytes,
        }
    }
}

/// Something that can start the gather of a parameter (type-erased shard).
pub(crate) trait GatherSource: Send + Sync {
    /// Its own all-gather.
    fn start(&self) -> Work<Vec<f32>>;
    /// Bytes of the full parameter.
    fn bytes(&self) -> u64;
    /// This rank's padded shard on the host, for a coalesced gather.
    fn host_shard(&self) -> Vec<f32>;
    /// The shard value's unique identity (see `ShardedParam`).
    fn uid(&self) -> u64;
    /// Slot, version and length, for the collective's fingerprint.
    fn fingerprint_words(&self) -> [u64; 3];
    fn sharding(&self) -> Sharding;
    fn runtime(&self) -> &Arc<MicsRuntime>;
}

/// A gather started ahead of its use.
struct Ahead {
    /// Position in the recorded order.
    pos: usize,
    work: Gathered,
    bytes: u64,
    /// The shard value it was gathered from.
    uid: u64,
}

#[derive(Default)]
struct State {
    /// Order of uses recorded on the last complete step.
    order: Vec<ParamId>,
    /// Uses seen so far in this step.
    trace: Vec<ParamId>,
    /// Replaying `order` in this step (no divergence seen yet).
    replaying: bool,
    /// Prefetched gathers by position in `order`.
    ahead: VecDeque<Ahead>,
    ahead_bytes: u64,
    /// Next position of `order` to prefetch.
    next_issue: usize,
    sources: HashMap<ParamId, Weak<dyn GatherSource>>,
}

pub(crate) struct Prefetcher {
    config: PrefetchConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("config", &self.config)
            .finish()
    }
}

impl Prefetcher {
    pub fn new(config: PrefetchConfig) -> Self {
        Prefetcher {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn enabled(&self) -> bool {
        self.config.depth > 0
    }

    /// The current shard of a parameter, for gathers issued ahead.
    pub fn register(&self, id: ParamId, source: Weak<dyn GatherSource>) {
        if self.enabled() {
            self.state.lock().unwrap().sources.insert(id, source);
        }
    }

    pub fn begin_step(&self, counters: &AtomicCounters) {
        if !self.enabled() {
            return;
        }
        let mut st = self.state.lock().unwrap();
        drop_ahead(&mut st, counters);
        let trace = std::mem::take(&mut st.trace);
        if !trace.is_empty() {
            st.order = trace;
        }
        st.replaying = !st.order.is_empty();
        st.next_issue = 0;
    }

    /// Called on each use of parameter `id` with shard value `uid`: the
    /// prefetched gather for this position when there is one and it was
    /// gathered from that value (its bytes are already counted live).
    pub fn take(&self, id: ParamId, uid: u64, counters: &AtomicCounters) -> Option<Gathered> {
        if !self.enabled() {
            return None;
        }
        let mut st = self.state.lock().unwrap();
        let pos = st.trace.len();
        st.trace.push(id);
        if st.replaying && st.order.get(pos) != Some(&id) {
            st.replaying = false;
            drop_ahead(&mut st, counters);
        }
        if !st.replaying {
            if !st.order.is_empty() {
                counters.prefetch_misses.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        if st.next_issue <= pos {
            st.next_issue = pos + 1;
        }
        match st.ahead.front() {
            Some(ahead) if ahead.pos == pos => {
                let ahead = st.ahead.pop_front().expect("front exists");
                st.ahead_bytes -= ahead.bytes;
                if ahead.uid != uid {
                    // Gathered from another value of this parameter: every
                    // rank of the group issued it, so it completes; drop it.
                    let _ = ahead.work.wait();
                    counters.release_live(ahead.bytes);
                    counters.prefetch_stale.fetch_add(1, Ordering::Relaxed);
                    counters.prefetch_misses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                Some(ahead.work)
            }
            _ => {
                counters.prefetch_misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// After a use has been served: start the gathers of the next uses.
    ///
    /// The queue is refilled once at most half of `depth` gathers are left
    /// ahead (always for a depth of 1 or 2), and the gathers started together
    /// go out as one all-gather of their concatenated shards: fewer, larger
    /// collectives, each paying the engine's latency once.
    pub fn after_use(&self, counters: &AtomicCounters) {
        if !self.enabled() {
            return;
        }
        let mut st = self.state.lock().unwrap();
        if !st.replaying || st.ahead.len() * 2 > self.config.depth.max(2) {
            return;
        }
        let mut batch: Vec<(usize, Arc<dyn GatherSource>, u64)> = Vec::new();
        // Sources are looked up now, not when the order was recorded: the
        // current value of each parameter (the optimizer's latest).
        while st.ahead.len() + batch.len() < self.config.depth && st.next_issue < st.order.len() {
            let pos = st.next_issue;
            let Some(source) = st.sources.get(&st.order[pos]).and_then(Weak::upgrade) else {
                break;
            };
            let bytes = source.bytes();
            if st.ahead_bytes + bytes > self.config.budget_bytes {
                break;
            }
            counters.acquire_live(bytes);
            st.ahead_bytes += bytes;
            batch.push((pos, source, bytes));
            st.next_issue += 1;
        }
        if batch.is_empty() {
            return;
        }
        let sources: Vec<Arc<dyn GatherSource>> = batch.iter().map(|b| b.1.clone()).collect();
        for ((pos, source, bytes), work) in batch.into_iter().zip(start_together(&sources)) {
            let uid = source.uid();
            st.ahead.push_back(Ahead {
                pos,
                work,
                bytes,
                uid,
            });
        }
    }
}

/// Wait for and drop the gathers issued ahead (every rank issued them, so
/// they complete).
fn drop_ahead(st: &mut State, counters: &AtomicCounters) {
    for ahead in st.ahead.drain(..) {
        let _ = ahead.work.wait();
        counters.release_live(ahead.bytes);
    }
    st.ahead_bytes = 0;
}
