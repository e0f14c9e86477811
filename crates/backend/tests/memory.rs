//! Memory: each rank keeps 1/p of the parameters, and the gathered copies
//! alive at once stay within the prefetch budget plus one layer's weights,
//! through forward and backward (Autodiff saves shard handles, not copies).
//!
//! The backend's own counters are checked against real allocations: this
//! test binary counts every byte allocated through a global allocator
//! (nextest runs each test in its own process, so the counts are the test's).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

use std::ops::Range;

use burn::module::Module;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::*;
use mics_backend::{PrefetchConfig, ShardedOptimizer};

const D: usize = 23;
const LAYERS: usize = 6;

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    linear: Linear<B>,
    norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Deep<B: Backend> {
    blocks: Vec<Block<B>>,
    act: Gelu,
}

/// `reverse_on_odd_steps`: odd steps run the blocks in reverse order (the
/// step is read from the sample range), so the recorded gather order changes.
struct DeepTask {
    reverse_on_odd_steps: Option<usize>,
}

const DEEP: DeepTask = DeepTask {
    reverse_on_odd_steps: None,
};

impl Task for DeepTask {
    type Model<B: AutodiffBackend> = Deep<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Deep<B> {
        Deep {
            blocks: (0..LAYERS)
                .map(|_| Block {
                    linear: LinearConfig::new(D, D).init(device),
                    norm: LayerNormConfig::new(D).init(device),
                })
                .collect(),
            act: Gelu::new(),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &Deep<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let n = samples.len();
        let start = samples.start;
        let x: Vec<f32> = samples
            .flat_map(|s| (0..D).map(move |i| ((s * D + i) as f32 * 0.29).sin()))
            .collect();
        let mut h = Tensor::<B, 2>::from_data(TensorData::new(x, [n, D]), device);
        let odd = self
            .reverse_on_odd_steps
            .is_some_and(|global| (start / global) % 2 == 1);
        let order: Vec<&Block<B>> = if odd {
            m.blocks.iter().rev().collect()
        } else {
            m.blocks.iter().collect()
        };
        for block in order {
            h = m.act.forward(block.norm.forward(block.linear.forward(h)));
        }
        h.powi_scalar(2).mean()
    }
}

/// Per-parameter sizes of one block: linear weight, linear bias, gamma, beta.
const BLOCK_NUMELS: [usize; 4] = [D * D, D, D, D];
const F32: u64 = 4;

fn expected_shard_bytes(p: usize) -> u64 {
    LAYERS as u64
        * BLOCK_NUMELS
            .iter()
            .map(|&n| n.div_ceil(p) as u64 * F32)
            .sum::<u64>()
}

/// The most one op gathers at once: `linear` takes its weight and bias.
const LARGEST_OP_BYTES: u64 = ((D * D + D) as u64) * F32;
const MODEL_BYTES: u64 = LAYERS as u64 * ((D * D + 3 * D) as u64) * F32;

fn config() -> Config {
    Config {
        n: 4,
        k: 2,
        p: 4,
        s: 2,
        b: 2,
        steps: 3,
    }
}

#[test]
fn shards_are_one_pth_and_gathers_are_freed() {
    let c = config();
    let reference = reference(&DEEP, c, None);
    let ranks = distributed(&DEEP, c, None, PrefetchConfig::disabled());
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        assert_eq!(k.shard_bytes, expected_shard_bytes(c.p), "{k:?}");
        assert_eq!(k.live_gathered_bytes, 0, "{k:?}");
        assert!(k.peak_live_gathered_bytes <= LARGEST_OP_BYTES, "{k:?}");
        // Forward gathers every parameter; backward gathers again the ones
        // its gradients need (the linear weights for the input gradient).
        let forward = (LAYERS * BLOCK_NUMELS.len() * c.s * c.steps) as u64;
        assert!(
            k.gathers >= forward + (LAYERS * c.s * c.steps) as u64,
            "{k:?}"
        );
        // Never more than one layer of the model gathered at once.
        assert!(
            k.peak_live_gathered_bytes <= MODEL_BYTES / LAYERS as u64,
            "{k:?}"
        );
    }
}

#[test]
fn peak_stays_within_prefetch_budget() {
    let c = config();
    let budget = 2 * LARGEST_OP_BYTES;
    let reference = reference(&DEEP, c, None);
    let ranks = distributed(&DEEP, c, None, PrefetchConfig::new(4, budget));
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        assert_eq!(k.shard_bytes, expected_shard_bytes(c.p), "{k:?}");
        assert!(k.prefetch_hits > 0, "{k:?}");
        assert!(
            k.peak_live_gathered_bytes <= budget + LARGEST_OP_BYTES,
            "{k:?}"
        );
        eprintln!("{k:?}");
    }
}

#[test]
fn prefetch_falls_back_when_the_order_changes() {
    let c = Config {
        steps: 4,
        ..config()
    };
    let task = DeepTask {
        reverse_on_odd_steps: Some(c.n * c.b * c.s),
    };
    let budget = 2 * LARGEST_OP_BYTES;
    let reference = reference(&task, c, None);
    let ranks = distributed(&task, c, None, PrefetchConfig::new(4, budget));
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        // Every step after the first diverges from the order recorded on the previous one.
        assert!(k.prefetch_misses >= (c.steps - 1) as u64, "{k:?}");
        assert!(
            k.peak_live_gathered_bytes <= budget + LARGEST_OP_BYTES,
            "{k:?}"
        );
        assert_eq!(k.live_gathered_bytes, 0, "{k:?}");
    }
}

/// What a rank keeps between steps, measured by the allocator: its
/// parameter shards and AdamW's two moments for them, so 1/p of the model
/// states. In-process ranks share the allocator; the bytes retained by all
/// `N` ranks after training, while their models are alive, are compared
/// with `N × 3 ×` the shard bytes the backend counts.
#[test]
fn real_allocations_follow_the_shards() {
    use std::sync::Arc;

    use burn::optim::AdamWConfig;
    use mics_backend::{MicsRuntime, ShardInit, shard_module};
    use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};

    const WIDE: usize = 96;
    #[derive(Module, Debug)]
    struct Wide<B: Backend> {
        layers: Vec<Linear<B>>,
    }

    let n = 4;
    let mut retained = Vec::new();
    for p in [1, 4] {
        let topology = Topology::new(n, n, p).unwrap();
        let shard_bytes = std::sync::Mutex::new(0u64);
        let measured = std::sync::Mutex::new(0i64);
        let before = LIVE.load(Ordering::SeqCst);
        ThreadsEngine::new(n)
            .run(|world| {
                let world: Arc<dyn Communicator> = Arc::new(world);
                let runtime = MicsRuntime::new(MicsGroups::new(world.clone(), topology).unwrap());
                let device = Default::default();
                let model = Wide::<Dist> {
                    layers: (0..4)
                        .map(|_| LinearConfig::new(WIDE, WIDE).init(&device))
                        .collect(),
                };
                let mut model = shard_module(model, &runtime, ShardInit::Identical);
                let mut optim = ShardedOptimizer::adamw(&AdamWConfig::new(), &runtime);
                for step in 0..2 {
                    runtime.begin_step();
                    let x = Tensor::<Dist, 2>::ones([1, WIDE], &device) * (step + 1) as f32;
                    let mut h = x;
                    for layer in &model.layers {
                        h = layer.forward(h);
                    }
                    optim.accumulate(&model, h.powi_scalar(2).mean().backward());
                    model = optim.step(1e-3, model);
                }
                *shard_bytes.lock().unwrap() += runtime.counters().shard_bytes;
                // Every rank's model and optimizer are alive here.
                world.barrier().wait().unwrap();
                if world.rank() == 0 {
                    *measured.lock().unwrap() = LIVE.load(Ordering::SeqCst) - before;
                }
                world.barrier().wait().unwrap();
                drop((model, optim));
            })
            .unwrap()
            .into_iter()
            .for_each(|r| r.unwrap());
        let states = 3 * shard_bytes.into_inner().unwrap() as i64;
        let got = measured.into_inner().unwrap();
        eprintln!("p = {p}: {got} B retained by {n} ranks; parameters + AdamW moments {states} B");
        // At least the states the counters report; the rest (runtimes,
        // engine, graph bookkeeping) a small fixed overhead.
        assert!(got >= states, "p = {p}: {got} B < {states} B of states");
        assert!(
            got <= states + states / 4 + (1 << 20),
            "p = {p}: {got} B for {states} B of states"
        );
        retained.push(got);
    }
    // Sharding over 4 ranks keeps about a quarter.
    assert!(
        retained[1] * 3 < retained[0],
        "p = 4 retains {} B, p = 1 {} B",
        retained[1],
        retained[0]
    );
}

/// Full gradients held at once. Without `early-reduce` Burn hands every
/// gradient over when backward returns: the whole model's gradient is held
/// (plus nothing: each bucket's reduce-scatter frees it). With `early-reduce`
/// each gradient is reduce-scattered as soon as it is complete, at most two
/// buckets stay in flight while a third fills, so the peak is bounded by
/// three buckets (a bucket holds at least one parameter) and the gradient
/// that just arrived, whatever the depth.
#[test]
fn full_gradients_held_at_once() {
    let c = config();
    let reference = reference(&DEEP, c, None);
    // One block's parameters per bucket, and one parameter per bucket; the
    // gradients reduced during backward (the default) or after it.
    for (bucket, buckets_per_micro_step, in_backward) in [
        (BLOCK_BYTES as usize, LAYERS, true),
        (0, LAYERS * 4, true),
        (0, LAYERS * 4, false),
    ] {
        let early = cfg!(feature = "early-reduce") && in_backward;
        let ranks = distributed_with(&DEEP, c, None, PrefetchConfig::disabled(), |rt| {
            rt.set_reduce_in_backward(in_backward);
            ShardedOptimizer::adamw(&optimizer_config(), rt).with_bucket_bytes(bucket)
        });
        assert_parity(&reference, &ranks, 1e-5);
        // Buckets are filled in the order gradients complete: module order
        // after backward, Burn's tape order (by graph depth, blocks
        // interleaved) with `early-reduce`, where only one parameter per
        // bucket gives a count independent of that order.
        if bucket == 0 || !early {
            assert_collective_counts(&ranks, buckets_per_micro_step, c, false);
        }
        for rank in &ranks {
            let k = rank.counters;
            assert_eq!(k.live_grad_bytes, 0, "{k:?}");
            // Two buckets in flight, a third just closed and the gradient
            // that closed it (counted as soon as it exists).
            let bound = 3 * (bucket as u64).max(LARGEST_PARAM_BYTES) + LARGEST_PARAM_BYTES;
            if early {
                assert!(k.peak_live_grad_bytes <= bound, "bucket {bucket}: {k:?}");
                assert!(
                    k.peak_live_grad_bytes < MODEL_BYTES,
                    "bucket {bucket}: {k:?}"
                );
            } else {
                assert_eq!(
                    k.peak_live_grad_bytes, MODEL_BYTES,
                    "bucket {bucket}: {k:?}"
                );
            }
        }
        eprintln!(
            "bucket {bucket} B: peak full-gradient bytes {} of a {MODEL_BYTES} B model (reduced during backward: {early})",
            ranks[0].counters.peak_live_grad_bytes,
        );
    }
}

/// The largest parameter: a linear weight.
const LARGEST_PARAM_BYTES: u64 = (D * D) as u64 * F32;
/// One block's parameters.
const BLOCK_BYTES: u64 = ((D * D + 3 * D) as u64) * F32;
