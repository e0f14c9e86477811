//! Per-rank state of the decorator: the MiCS groups and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mics_comm::MicsGroups;

use crate::Precision;
use crate::prefetch::Prefetcher;
use crate::reduce::GradReducer;

/// What one rank's `Mics` runtime has done, as counted by the backend itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Parameter gathers issued, on demand and prefetched (one per
    /// parameter, whether or not it shared its collective).
    pub gathers: u64,
    /// All-gather collectives issued for them: one per on-demand gather, one
    /// per group of prefetched gathers started together (their shards
    /// concatenated), none for a partition group of one.
    pub gather_collectives: u64,
    /// Gathers served from the prefetch cache.
    pub prefetch_hits: u64,
    /// Gathers issued on demand once an order had been recorded (prefetch
    /// fell behind, the order changed, or the prefetched value was stale).
    pub prefetch_misses: u64,
    /// Prefetched gathers thrown away because they were gathered from
    /// another value than the one the op uses: the parameter was stepped
    /// since (a forward after `step()` without `begin_step()`), or the op
    /// uses another copy of the module. Each is also a miss.
    pub prefetch_stale: u64,
    /// Bytes of gathered (full, unpadded) parameters produced, in the
    /// parameters' dtype (what compute sees).
    pub bytes_gathered: u64,
    /// The same parameters' bytes in the gather's element type
    /// ([`Precision::gather`]): what the all-gathers carry (before the
    /// engine's ring accounting), half of `bytes_gathered` in bf16.
    pub bytes_gathered_wire: u64,
    /// Gathered bytes alive right now: held by an op or waiting in the prefetch cache.
    pub live_gathered_bytes: u64,
    /// The most gathered bytes alive at once since the last [`MicsRuntime::reset_peak`].
    pub peak_live_gathered_bytes: u64,
    /// Bytes of parameter shards this rank holds (padding included).
    pub shard_bytes: u64,
    /// Copies from the inner backend's memory into host buffers for a
    /// collective (a shard to gather, a gradient to reduce): one per
    /// collective input, none for a partition group of one in f32.
    pub host_downloads: u64,
    /// Bytes of those copies.
    pub host_download_bytes: u64,
    /// Copies of a collective's host result into the inner backend's memory
    /// (a gathered parameter, a reduced gradient shard): one per result.
    pub host_uploads: u64,
    /// Bytes of those copies.
    pub host_upload_bytes: u64,
    /// Bytes of complete full (unsharded) gradients held right now, waiting
    /// for or in their partition reduce-scatter: from the moment a
    /// parameter's gradient is complete until this rank has seen its
    /// bucket's reduce-scatter complete. Full gradients that backward is
    /// still accumulating (a parameter used several times) are not counted.
    pub live_grad_bytes: u64,
    /// The most full-gradient bytes held at once since the last
    /// [`MicsRuntime::reset_peak`]. Without the `early-reduce` feature every
    /// gradient is complete only when `backward()` returns, so this is the
    /// whole model's gradient; with it, about
    /// `(MAX_BUCKETS_IN_FLIGHT + 1) × bucket` plus one parameter.
    pub peak_live_grad_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    pub gathers: AtomicU64,
    pub gather_collectives: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_misses: AtomicU64,
    pub prefetch_stale: AtomicU64,
    pub bytes_gathered: AtomicU64,
    pub bytes_gathered_wire: AtomicU64,
    pub live: AtomicU64,
    pub peak_live: AtomicU64,
    pub shard_bytes: AtomicU64,
    pub host_downloads: AtomicU64,
    pub host_download_bytes: AtomicU64,
    pub host_uploads: AtomicU64,
    pub host_upload_bytes: AtomicU64,
    pub live_grad: AtomicU64,
    pub peak_live_grad: AtomicU64,
}

impl AtomicCounters {
    pub fn acquire_live(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_live.fetch_max(now, Ordering::Relaxed);
    }

    pub fn release_live(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn acquire_grad(&self, bytes: u64) {
        let now = self.live_grad.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_live_grad.fetch_max(now, Ordering::Relaxed);
    }

    pub fn release_grad(&self, bytes: u64) {
        self.live_grad.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One rank's MiCS runtime: its partition and replication groups, the
/// prefetcher and the counters. Every sharded parameter holds an `Arc` to the
/// runtime of the rank that owns it, so the backend's static ops reach the
/// right communicator without global state.
#[derive(Debug)]
pub struct MicsRuntime {
    groups: MicsGroups,
    /// The next parameter slot `shard_module` hands out.
    next_slot: AtomicU64,
    /// Whether gradients are reduce-scattered during backward (the
    /// `early-reduce` hook) or only after it.
    reduce_in_backward: AtomicBool,
    pub(crate) counters: AtomicCounters,
    pub(crate) prefetcher: Prefetcher,
    pub(crate) grads: GradReducer,
    precision: Precision,
}

impl MicsRuntime {
    /// A runtime over this rank's groups, prefetch off.
    pub fn new(groups: MicsGroups) -> Arc<MicsRuntime> {
        Self::with_prefetch(groups, PrefetchConfig::disabled())
    }

    /// A runtime over this rank's groups with the given prefetch settings.
    pub fn with_prefetch(groups: MicsGroups, prefetch: PrefetchConfig) -> Arc<MicsRuntime> {
        Self::with_precision(groups, prefetch, Precision::FP32)
    }

    /// A runtime over this rank's groups with the given prefetch settings
    /// and mixed precision: the element types parameters are all-gathered
    /// and gradients reduced in ([`Precision`]; shards, accumulated
    /// gradients and optimizer states stay `f32`). Every rank of the world
    /// must use the same precision.
    pub fn with_precision(
        groups: MicsGroups,
        prefetch: PrefetchConfig,
        precision: Precision,
    ) -> Arc<MicsRuntime> {
        Arc::new(MicsRuntime {
            groups,
            next_slot: AtomicU64::new(0),
            reduce_in_backward: AtomicBool::new(true),
            counters: AtomicCounters::default(),
            prefetcher: Prefetcher::new(prefetch),
            grads: GradReducer::default(),
            precision,
        })
    }

    /// The slot of the next parameter sharded on this runtime: every rank
    /// shards the same modules in the same order, so slots agree across
    /// ranks (see `ShardedParam`).
    pub(crate) fn claim_slot(&self) -> u64 {
        self.next_slot.fetch_add(1, Ordering::Relaxed)
    }

    /// Reduce-scatter each parameter's gradient during backward, as soon as
    /// it is complete (`true`, the default with the `early-reduce` feature),
    /// or only once `backward()` has returned (`false`: every full gradient
    /// is held at once, and no gradient communication overlaps backward).
    /// The results are the same either way; `false` is for measuring the
    /// overlap. Without the `early-reduce` feature gradients are always
    /// reduced after backward. Set it on every rank alike.
    pub fn set_reduce_in_backward(&self, on: bool) {
        self.reduce_in_backward.store(on, Ordering::Relaxed);
    }

    /// Whether gradients are reduce-scattered during backward (see
    /// [`set_reduce_in_backward`](Self::set_reduce_in_backward)).
    pub fn reduce_in_backward(&self) -> bool {
        cfg!(feature = "early-reduce") && self.reduce_in_backward.load(Ordering::Relaxed)
    }

    /// The element types of this runtime's collectives.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The partition, replication and node groups of this rank.
    pub fn groups(&self) -> &MicsGroups {
        &self.groups
    }

    /// This rank's index inside its partition group (which shard it holds).
    pub fn partition_rank(&self) -> usize {
        self.groups.partition().rank()
    }

    /// The partition size p.
    pub fn partition_size(&self) -> usize {
        self.groups.partition().size()
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        Counters {
            gathers: c.gathers.load(Ordering::Relaxed),
            gather_collectives: c.gather_collectives.load(Ordering::Relaxed),
            prefetch_hits: c.prefetch_hits.load(Ordering::Relaxed),
            prefetch_misses: c.prefetch_misses.load(Ordering::Relaxed),
            prefetch_stale: c.prefetch_stale.load(Ordering::Relaxed),
            bytes_gathered: c.bytes_gathered.load(Ordering::Relaxed),
            bytes_gathered_wire: c.bytes_gathered_wire.load(Ordering::Relaxed),
            live_gathered_bytes: c.live.load(Ordering::Relaxed),
            peak_live_gathered_bytes: c.peak_live.load(Ordering::Relaxed),
            shard_bytes: c.shard_bytes.load(Ordering::Relaxed),
            host_downloads: c.host_downloads.load(Ordering::Relaxed),
            host_download_bytes: c.host_download_bytes.load(Ordering::Relaxed),
            host_uploads: c.host_uploads.load(Ordering::Relaxed),
            host_upload_bytes: c.host_upload_bytes.load(Ordering::Relaxed),
            live_grad_bytes: c.live_grad.load(Ordering::Relaxed),
            peak_live_grad_bytes: c.peak_live_grad.load(Ordering::Relaxed),
        }
    }

    /// Restart the peaks of live gathered bytes and of live full-gradient
    /// bytes from their current values.
    pub fn reset_peak(&self) {
        let now = self.counters.live.load(Ordering::Relaxed);
        self.counters.peak_live.store(now, Ordering::Relaxed);
        let now = self.counters.live_grad.load(Ordering::Relaxed);
        self.counters.peak_live_grad.store(now, Ordering::Relaxed);
    }

    /// Mark the start of a training step for the prefetcher: the first step
    /// records the order in which parameters are used, later ones replay it.
    pub fn begin_step(&self) {
        self.prefetcher.begin_step(&self.counters);
    }
}

pub use crate::prefetch::PrefetchConfig;
