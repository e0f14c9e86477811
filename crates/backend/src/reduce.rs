//! The first hop of the gradient sync: full gradients packed into buckets and
//! reduce-scattered inside the partition group, as soon as they are complete.
//!
//! Gradients enter one parameter at a time, either from Burn's autodiff while
//! backward is still running (the `early-reduce` feature, see `early.rs`) or
//! from [`ShardedOptimizer::accumulate`](crate::ShardedOptimizer::accumulate)
//! once backward has returned. Consecutive gradients fill a bucket of at most
//! `bucket_bytes`; a full bucket is packed (rank j's chunk is its shard of
//! every parameter of the bucket), its full gradients are dropped and its
//! reduce-scatter is started without waiting. At most
//! [`MAX_BUCKETS_IN_FLIGHT`] reduce-scatters are left in flight: beyond that
//! the oldest is waited for, so that the full gradients handed to the engine
//! stay bounded. Completed reduce-scatters leave this rank's reduced shard of
//! each parameter for `accumulate`.
//!
//! Every rank of a partition group runs the same program, so gradients arrive
//! in the same order on every rank and the buckets and collectives match.
//! Each reduce-scatter carries the fingerprint of its bucket (every
//! parameter's slot and length, in order): ranks that packed different
//! parameters fail with a mismatch on every rank instead of summing unrelated
//! gradients. A parameter without a gradient is in no bucket: no zeros move.
//!
//! A bucket travels in the runtime's [`Precision::reduce`](crate::Precision)
//! element type (rounded from `f32` just before its reduce-scatter) and its
//! reduced shards are widened back to `f32` for accumulation.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use burn::module::ParamId;
use mics_comm::{Buffer, Fingerprint, Sharding, Work};

use crate::precision;
use crate::runtime::MicsRuntime;

/// Reduce-scatters left in flight before the oldest is waited for: one can
/// run while the next bucket fills and another is packed.
pub(crate) const MAX_BUCKETS_IN_FLIGHT: usize = 2;

/// Default gradient bucket: 32 MiB of full `f32` gradients.
pub const DEFAULT_BUCKET_BYTES: usize = 32 << 20;

/// Which parameter a gradient belongs to: Burn's id (for this rank's
/// bookkeeping) and its slot (the same on every rank, for fingerprints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GradKey {
    pub id: ParamId,
    pub slot: u64,
}

struct InFlight {
    ids: Vec<ParamId>,
    lens: Vec<usize>,
    work: Work<Vec<f32>>,
    /// Full-gradient bytes this bucket holds until its reduce-scatter is seen complete.
    bytes: u64,
}

struct State {
    bucket_bytes: usize,
    /// The bucket being filled: full gradients, in arrival order.
    open: Vec<(GradKey, Vec<f32>)>,
    open_bytes: usize,
    in_flight: VecDeque<InFlight>,
    /// This rank's reduced shard of each parameter whose reduce-scatter completed.
    done: Vec<(ParamId, Vec<f32>)>,
    /// Parameters handed over during the current backward pass (by the hook).
    submitted: HashSet<ParamId>,
}

/// Per-rank reduce-scatter pipeline (see the module docs).
pub(crate) struct GradReducer {
    state: Mutex<State>,
}

impl std::fmt::Debug for GradReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReducer").finish_non_exhaustive()
    }
}

impl Default for GradReducer {
    fn default() -> Self {
        GradReducer {
            state: Mutex::new(State {
                bucket_bytes: DEFAULT_BUCKET_BYTES,
                open: Vec::new(),
                open_bytes: 0,
                in_flight: VecDeque::new(),
                done: Vec::new(),
                submitted: HashSet::new(),
            }),
        }
    }
}

impl GradReducer {
    pub fn set_bucket_bytes(&self, bytes: usize) {
        self.state.lock().unwrap().bucket_bytes = bytes;
    }

    /// Whether `id`'s gradient of the current micro-step was already taken
    /// by the backward hook.
    pub fn was_submitted(&self, id: ParamId) -> bool {
        self.state.lock().unwrap().submitted.contains(&id)
    }

    /// Hand over a complete full gradient. `counted`: its bytes are already
    /// in the live gradient counter.
    pub fn push(
        &self,
        runtime: &MicsRuntime,
        key: GradKey,
        full: Vec<f32>,
        counted: bool,
        from_hook: bool,
    ) {
        let bytes = full.len() * 4;
        if !counted {
            runtime.counters.acquire_grad(bytes as u64);
        }
        let mut st = self.state.lock().unwrap();
        if from_hook {
            st.submitted.insert(key.id);
        }
        poll(&mut st, runtime);
        let max = st.bucket_bytes;
        if !st.open.is_empty() && (max == 0 || st.open_bytes + bytes > max) {
            flush(&mut st, runtime);
        }
        st.open.push((key, full));
        st.open_bytes += bytes;
        if max == 0 || st.open_bytes >= max {
            flush(&mut st, runtime);
        }
    }

    /// Flush the open bucket, wait for every reduce-scatter and return this
    /// rank's reduced shard of every parameter handed over since the last call.
    pub fn finish(&self, runtime: &MicsRuntime) -> Vec<(ParamId, Vec<f32>)> {
        let mut st = self.state.lock().unwrap();
        if !st.open.is_empty() {
            flush(&mut st, runtime);
        }
        while let Some(bucket) = st.in_flight.pop_front() {
            complete(&mut st, runtime, bucket);
        }
        st.submitted.clear();
        std::mem::take(&mut st.done)
    }
}

/// Pack the open bucket and start its reduce-scatter.
fn flush(st: &mut State, runtime: &MicsRuntime) {
    let partition = runtime.groups().partition();
    let p = partition.size();
    let open = std::mem::take(&mut st.open);
    st.open_bytes = 0;
    let shardings: Vec<Sharding> = open
        .iter()
        .map(|(_, full)| Sharding::new(full.len(), p))
        .collect();
    let bytes = open.iter().map(|(_, full)| full.len() as u64 * 4).sum();
    // Rank j's chunk is the concatenation of its shard of every parameter.
    let mut buffer = Vec::with_capacity(shardings.iter().map(Sharding::padded_len).sum());
    for part in 0..p {
        for ((_, full), sharding) in open.iter().zip(&shardings) {
            let range = sharding.range(part);
            let len = range.len();
            buffer.extend_from_slice(&full[range]);
            buffer.resize(buffer.len() + sharding.shard_len() - len, 0.0);
        }
    }
    let tag = Fingerprint::of_pieces(open.iter().map(|(key, full)| [key.slot, full.len() as u64]));
    let ids = open.into_iter().map(|(key, _)| key.id).collect();
    let lens = shardings.iter().map(Sharding::shard_len).collect();
    let dtype = runtime.precision().reduce;
    let work = if p == 1 {
        done(precision::rounded(dtype, buffer))
    } else {
        precision::reduce_scatter(partition, dtype, buffer, tag)
    };
    st.in_flight.push_back(InFlight {
        ids,
        lens,
        work,
        bytes,
    });
    while st.in_flight.len() > MAX_BUCKETS_IN_FLIGHT {
        let oldest = st.in_flight.pop_front().expect("more than the cap");
        complete(st, runtime, oldest);
    }
}

/// Collect the reduce-scatters that have completed, oldest first.
fn poll(st: &mut State, runtime: &MicsRuntime) {
    while st.in_flight.front_mut().is_some_and(|b| b.work.is_ready()) {
        let bucket = st.in_flight.pop_front().expect("front exists");
        complete(st, runtime, bucket);
    }
}

fn complete(st: &mut State, runtime: &MicsRuntime, bucket: InFlight) {
    let shards = bucket.work.wait().unwrap_or_else(|err| {
        panic!(
            "mics: gradient reduce-scatter of parameters {} in partition group {:?} (world ranks) failed: {err}",
            ids_list(&bucket.ids),
            runtime.groups().partition().world_ranks(),
        )
    });
    runtime.counters.release_grad(bucket.bytes);
    let mut at = 0;
    for (id, len) in bucket.ids.into_iter().zip(bucket.lens) {
        st.done.push((id, shards[at..at + len].to_vec()));
        at += len;
    }
}

/// `[id, id, ...]` for error messages.
pub(crate) fn ids_list(ids: &[ParamId]) -> String {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!("[{}]", ids.join(", "))
}

/// A completed `Work`: what a collective over a group of one returns, without
/// going through the engine.
pub(crate) fn done(values: Vec<f32>) -> Work<Vec<f32>> {
    Work::ready(Ok(Buffer::F32(values))).map(|buffer| match buffer {
        Buffer::F32(values) => Ok(values),
        _ => unreachable!("built as f32"),
    })
}
