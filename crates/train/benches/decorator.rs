//! The cost of the MiCS decorator itself: the same GPT-2 training step on
//! plain `Autodiff<Plain<B>>` with Burn's AdamW and on `Autodiff<Mics<B>>`
//! at world 1 with the sharded AdamW, for each compute backend in the build
//! (NdArray always; Burn's wgpu with `--features wgpu`).
//!
//! ```sh
//! cargo bench -p mics-train --bench decorator                    # NdArray
//! cargo bench -p mics-train --features wgpu --bench decorator    # + wgpu
//! ```
//!
//! Steps are timed in alternating rounds (plain, mics, plain, ...) so that
//! a machine's drift hits both alike; the figure is the ratio of the median
//! step times, mics / plain (goal ≤ 1.05). On lavapipe (wgpu on the CPU)
//! this measures the decorator's overhead over a CubeCL backend — its host
//! staging of every gradient, the extra launches — not GPU speed.
//!
//! `MICS_BENCH_ROUNDS` (default 5) and `MICS_BENCH_STEPS` (per round,
//! default 4) change the defaults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, shard_module};
use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};
use mics_fused::{CrossEntropyOptions, FusedCrossEntropyBackend, linear_cross_entropy};
use mics_gpt::{Gpt2Config, Gpt2LMHeadModel};
use mics_plain::Plain;

const VOCAB: usize = 2048;
const HIDDEN: usize = 128;
const LAYERS: usize = 2;
const SEQ: usize = 64;
const BATCH: usize = 4;
const LR: f64 = 1e-3;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> Gpt2Config {
    let mut c = Gpt2Config::tiny(VOCAB, HIDDEN, LAYERS, 4);
    c.n_positions = SEQ;
    c
}

fn initial() -> Vec<u8> {
    let device = Default::default();
    NdArray::<f32>::seed(&device, 1);
    let model = Gpt2LMHeadModel::<NdArray>::init(&config(), &device);
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    Recorder::<NdArray>::record(&recorder, model.into_record(), ()).expect("record")
}

fn load<B: Backend>(record: &[u8], device: &B::Device) -> Gpt2LMHeadModel<B> {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let record = Recorder::<B>::load(&recorder, record.to_vec(), device).expect("record");
    Gpt2LMHeadModel::init(&config(), device).load_record(record)
}

fn loss<B: FusedCrossEntropyBackend>(
    model: &Gpt2LMHeadModel<B>,
    step: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let id = |i: usize| ((i * 2654435761 + step * 97) % VOCAB) as i64;
    let input: Vec<i64> = (0..BATCH * SEQ).map(id).collect();
    let target: Vec<i64> = (1..=BATCH * SEQ).map(id).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [BATCH, SEQ]), device);
    let target = Tensor::<B, 1, Int>::from_data(TensorData::new(target, [BATCH * SEQ]), device);
    let hidden = model.forward_hidden(input).reshape([BATCH * SEQ, HIDDEN]);
    let options = CrossEntropyOptions::default();
    linear_cross_entropy(hidden, model.lm_head_weight(), None, target, None, &options)
        / (BATCH * SEQ) as f32
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median step times (plain, mics) on backend `B`.
fn measure<B: FusedCrossEntropyBackend>(device: B::Device) -> (Duration, Duration) {
    type Plainly<B> = Autodiff<Plain<B>>;
    type Sharded<B> = Autodiff<Mics<B>>;
    let (rounds, steps) = (env("MICS_BENCH_ROUNDS", 5), env("MICS_BENCH_STEPS", 4));
    let record = initial();
    let mut plain = load::<Plainly<B>>(&record, &device);
    let mut plain_optim = AdamWConfig::new().init::<Plainly<B>, Gpt2LMHeadModel<Plainly<B>>>();
    // World 1 on the threads engine, run on this thread.
    let world: Arc<dyn Communicator> = Arc::new(
        ThreadsEngine::new(1)
            .build()
            .expect("one rank")
            .pop()
            .expect("one rank"),
    );
    let groups = MicsGroups::new(world, Topology::new(1, 1, 1).expect("world 1")).expect("groups");
    let runtime = MicsRuntime::with_prefetch(groups, PrefetchConfig::new(2, 64 << 20));
    let mut sharded = shard_module(
        load::<Sharded<B>>(&record, &device),
        &runtime,
        ShardInit::Identical,
    );
    let mut optim = ShardedOptimizer::adamw(&AdamWConfig::new(), &runtime);
    let mut plain_step = |step: usize| {
        let l = loss(&plain, step, &device);
        let grads = GradientsParams::from_grads(l.backward(), &plain);
        plain = plain_optim.step(LR, plain.clone(), grads);
        B::sync(&device).expect("sync");
    };
    let mut mics_step = |step: usize| {
        runtime.begin_step();
        let l = loss(&sharded, step, &device);
        optim.accumulate(&sharded, l.backward());
        sharded = optim.step(LR, sharded.clone());
        B::sync(&device).expect("sync");
    };
    // Warm-up: kernels compiled, buffers allocated, the prefetch order recorded.
    for step in 0..3 {
        plain_step(step);
        mics_step(step);
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for step in 0..steps {
            let t = Instant::now();
            plain_step(round * steps + step);
            a.push(t.elapsed());
        }
        for step in 0..steps {
            let t = Instant::now();
            mics_step(round * steps + step);
            b.push(t.elapsed());
        }
    }
    let _ = sharded.valid();
    (median(a), median(b))
}

fn report(name: &str, (plain, mics): (Duration, Duration)) {
    println!(
        "{name}: plain {:.1} ms, Mics at world 1 {:.1} ms per step: mics / plain = {:.3}",
        plain.as_secs_f64() * 1e3,
        mics.as_secs_f64() * 1e3,
        mics.as_secs_f64() / plain.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    println!(
        "GPT-2 step (layers {LAYERS}, hidden {HIDDEN}, vocabulary {VOCAB}, {BATCH} x {SEQ} tokens), AdamW"
    );
    report("ndarray", measure::<NdArray>(Default::default()));
    #[cfg(feature = "wgpu")]
    {
        type Wgpu = burn_wgpu::CubeBackend<burn_wgpu::WgpuRuntime, f32, i32, u32>;
        report(
            "wgpu",
            measure::<Wgpu>(burn_wgpu::WgpuDevice::DefaultDevice),
        );
    }
}
