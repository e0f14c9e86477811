//! Step time of a GPT-like model:
//! (a) `Autodiff<Mics<NdArray>>` at world 1 vs plain `Autodiff<NdArray>`;
//! (b) 4 ranks (p = 4) on the threads engine with an artificial latency per
//!     collective: prefetch vs on-demand gathers vs no communication at all.
//!
//! `cargo bench -p mics-backend --bench step` (env `MICS_BENCH_STEPS`,
//! `MICS_BENCH_LATENCY_US` to change the defaults). The ranks of (b) share
//! the cores as `mics train`'s do (each in a Rayon pool of its share,
//! `MATMUL_NUM_THREADS` set); `MICS_BENCH_OVERSUBSCRIBE=1` puts every rank
//! on every core instead.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, shard_module};
use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};
use mics_plain::Plain;

const VOCAB: usize = 256;
const D: usize = 96;
const SEQ: usize = 32;
const BATCH: usize = 4;
const LAYERS: usize = 2;
const LR: f64 = 1e-3;

#[derive(Module, Debug)]
struct Block<B: Backend> {
    ln1: LayerNorm<B>,
    attn: MultiHeadAttention<B>,
    ln2: LayerNorm<B>,
    fc: Linear<B>,
    proj: Linear<B>,
}

#[derive(Module, Debug)]
struct Gpt<B: Backend> {
    embed: Embedding<B>,
    blocks: Vec<Block<B>>,
    ln_f: LayerNorm<B>,
    act: Gelu,
}

impl<B: Backend> Gpt<B> {
    fn new(device: &B::Device) -> Self {
        Gpt {
            embed: EmbeddingConfig::new(VOCAB, D).init(device),
            blocks: (0..LAYERS)
                .map(|_| Block {
                    ln1: LayerNormConfig::new(D).init(device),
                    attn: MultiHeadAttentionConfig::new(D, 4)
                        .with_dropout(0.0)
                        .init(device),
                    ln2: LayerNormConfig::new(D).init(device),
                    fc: LinearConfig::new(D, 4 * D).init(device),
                    proj: LinearConfig::new(4 * D, D).init(device),
                })
                .collect(),
            ln_f: LayerNormConfig::new(D).init(device),
            act: Gelu::new(),
        }
    }

    fn loss(&self, samples: Range<usize>, device: &B::Device) -> Tensor<B, 1> {
        let b = samples.len();
        let toks = |s: usize| (0..=SEQ).map(move |t| ((s * 31 + t * 7 + t * t) % VOCAB) as i64);
        let input: Vec<i64> = samples.clone().flat_map(|s| toks(s).take(SEQ)).collect();
        let target: Vec<i64> = samples.flat_map(|s| toks(s).skip(1)).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [b, SEQ]), device);
        let target = Tensor::<B, 2, Int>::from_data(TensorData::new(target, [b, SEQ]), device);
        let mut x = self.embed.forward(input);
        for blk in &self.blocks {
            let mask = generate_autoregressive_mask::<B>(b, SEQ, device);
            let a = blk
                .attn
                .forward(MhaInput::self_attn(blk.ln1.forward(x.clone())).mask_attn(mask));
            x = x + a.context;
            let h = blk.ln2.forward(x.clone());
            x = x.clone() + blk.proj.forward(self.act.forward(blk.fc.forward(h)));
        }
        let x = self.ln_f.forward(x);
        let logits = x.matmul(self.embed.weight.val().transpose().unsqueeze::<3>());
        let picked = log_softmax(logits, 2).gather(2, target.unsqueeze_dim::<3>(2));
        picked.mean().neg()
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Plain Burn: `steps` timed steps after one warm-up, per-rank batch `BATCH`.
fn plain_steps(rank: usize, steps: usize) -> Duration {
    // Plain Burn; `Plain` because Burn's `distributed` autodiff (on with
    // `early-reduce`) makes `Autodiff<B>` an autodiff backend only for
    // `B: DistributedBackend`.
    type B = Autodiff<Plain<NdArray>>;
    let device = Default::default();
    let mut model = Gpt::<B>::new(&device);
    let mut optim = AdamWConfig::new().init::<B, Gpt<B>>();
    let mut start = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            start = Instant::now();
        }
        let at = (step * 8 + rank) * BATCH;
        let t0 = Instant::now();
        let loss = model.loss(at..at + BATCH, &device);
        let grads = loss.backward();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(LR, model, grads);
        if std::env::var("MICS_BENCH_SPLIT").is_ok() && step == steps && rank == 0 {
            eprintln!("plain: fwd+bwd {:?} step {:?}", t1 - t0, t1.elapsed());
        }
    }
    start.elapsed() / steps as u32
}

/// `Autodiff<Mics<NdArray>>` on one rank of `world`.
fn mics_steps(
    world: Arc<dyn Communicator>,
    p: usize,
    k: usize,
    prefetch: PrefetchConfig,
    steps: usize,
) -> Duration {
    type B = Autodiff<Mics<NdArray>>;
    let n = world.size();
    let rank = world.rank();
    let groups = MicsGroups::new(world, Topology::new(n, k, p).unwrap()).unwrap();
    let runtime = MicsRuntime::with_prefetch(groups, prefetch);
    let device = Default::default();
    let mut model = shard_module(Gpt::<B>::new(&device), &runtime, ShardInit::Identical);
    let mut optim = ShardedOptimizer::adamw(&AdamWConfig::new(), &runtime);
    let mut start = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            start = Instant::now();
        }
        runtime.begin_step();
        let at = (step * 8 + rank) * BATCH;
        let t0 = Instant::now();
        let loss = model.loss(at..at + BATCH, &device);
        let grads = loss.backward();
        let t1 = Instant::now();
        optim.accumulate(&model, grads);
        let t2 = Instant::now();
        model = optim.step(LR, model);
        if std::env::var("MICS_BENCH_SPLIT").is_ok() && step == steps {
            eprintln!(
                "rank {rank}: fwd+bwd {:?} accumulate {:?} step {:?}",
                t1 - t0,
                t2 - t1,
                t2.elapsed()
            );
        }
    }
    start.elapsed() / steps as u32
}

fn slowest(times: Vec<Result<Duration, String>>) -> Duration {
    times.into_iter().map(|t| t.unwrap()).max().unwrap()
}

/// The best of `MICS_BENCH_REPEATS` runs (the machine is shared: the minimum
/// is the least disturbed).
fn best(f: impl Fn() -> Duration) -> Duration {
    (0..env("MICS_BENCH_REPEATS", 3))
        .map(|_| f())
        .min()
        .unwrap()
}

/// Runs `f` as a rank that shares the machine's cores with `ranks` ranks, as
/// `mics train` runs them (`mics_train::cores`): in a Rayon pool of its
/// share; `MATMUL_NUM_THREADS` was set at the start.
fn as_rank<R: Send>(ranks: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(share(ranks))
        .build()
        .unwrap()
        .install(f)
}

/// Threads per rank for `ranks` ranks on this machine's cores.
fn share(ranks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / ranks).max(1)
}

fn main() {
    // The ranks of (b) share the cores as `mics train`'s do: NdArray's
    // matmul (matrixmultiply reads this once) on their share of them.
    // MICS_BENCH_OVERSUBSCRIBE=1 leaves every rank on every core.
    let oversubscribe = std::env::var_os("MICS_BENCH_OVERSUBSCRIBE").is_some();
    if !oversubscribe && std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", share(4).to_string()) };
    }
    let steps = env("MICS_BENCH_STEPS", 8) as usize;
    let latency = Duration::from_micros(env("MICS_BENCH_LATENCY_US", 500));
    let none = PrefetchConfig::disabled();

    let plain = best(|| plain_steps(0, steps));
    let mics1 = best(|| {
        slowest(
            ThreadsEngine::new(1)
                .run(|c| mics_steps(Arc::new(c), 1, 1, none, steps))
                .unwrap(),
        )
    });
    println!(
        "(a) world 1: NdArray {plain:?}/step, Mics<NdArray> {mics1:?}/step, ratio {:.3}",
        mics1.as_secs_f64() / plain.as_secs_f64()
    );

    let n = 4;
    let run = |f: &(dyn Fn() -> Duration + Sync)| {
        if oversubscribe { f() } else { as_rank(n, f) }
    };
    let no_comm = best(|| {
        slowest(
            ThreadsEngine::new(n)
                .run(|c| run(&|| plain_steps(c.rank(), steps)))
                .unwrap(),
        )
    });
    let engine = ThreadsEngine::new(n).ranks_per_node(n).latency(latency);
    let on_demand = best(|| {
        slowest(
            engine
                .run(|c| {
                    let c: Arc<dyn Communicator> = Arc::new(c);
                    run(&|| mics_steps(c.clone(), n, n, none, steps))
                })
                .unwrap(),
        )
    });
    let ahead = PrefetchConfig::new(4, 4 * (VOCAB * D * 4) as u64);
    let prefetched = best(|| {
        slowest(
            engine
                .run(|c| {
                    let c: Arc<dyn Communicator> = Arc::new(c);
                    run(&|| mics_steps(c.clone(), n, n, ahead, steps))
                })
                .unwrap(),
        )
    });
    println!(
        "(b) {n} ranks, p = {n}, {latency:?} per collective: no communication {no_comm:?}/step, \
         on-demand gathers {on_demand:?} ({:.3}), prefetch {prefetched:?} ({:.3})",
        on_demand.as_secs_f64() / no_comm.as_secs_f64(),
        prefetched.as_secs_f64() / no_comm.as_secs_f64()
    );
}
