//! Train your own Burn model sharded with MiCS, using the backend API
//! directly: no trainer, no config file.
//!
//! The model below is plain Burn code (`burn::nn` layers, generic over the
//! backend) and has no mics type in it. Training runs on
//! `Autodiff<Mics<NdArray>>`, the MiCS backend decorator around Burn's CPU
//! backend, on 4 in-process ranks (one thread each) laid out as 2 "nodes" of
//! 2 ranks:
//!
//! - partition size p = 2: each partition group (one node here) holds one
//!   replica of the parameters, gradients and AdamW moments, each rank half;
//! - s = 2 micro-steps per optimizer step: gradients are reduce-scattered
//!   inside the partition group every micro-step and all-reduced across the
//!   replication group (across the nodes) once per step.
//!
//! The task is a synthetic regression (a fixed nonlinear function of 6
//! inputs); every rank draws its own samples of each global batch. The
//! example prints the loss of every step, checks that it went down, gathers
//! the model back into a plain `Regressor<NdArray>` and evaluates it, and
//! shows the backend's counters: gathers, prefetch hits, peak live gathered
//! bytes against the shard bytes each rank keeps, and the bytes each group
//! sent.
//!
//! ```sh
//! cargo run --example custom_model -- --tiny     # 40 steps (seconds)
//! cargo run --release --example custom_model     # 300 steps
//! cargo run --features wgpu --example custom_model -- --tiny --device wgpu
//! ```
//!
//! `MICS_EXAMPLE_TINY=1` selects the tiny settings like `--tiny`. `--out DIR`
//! (default `$TMPDIR/mics-examples/custom_model`) receives the trained model
//! as a Burn record (`regressor.bin`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, ensure};
use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamW, AdamWConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use mics::backend::{
    Counters, Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, gather_module,
    shard_module,
};
use mics::comm::{
    Collectives, CommStats, Communicator, MicsGroups, ReduceOp, ThreadsEngine, Topology,
};
use mics::train::{BackendTask, Device, Precision, TrainBackend};

// ---------------------------------------------------------------------------
// The user's model: plain Burn, generic over the backend.
// ---------------------------------------------------------------------------

/// A residual MLP regressor: `inputs -> width`, `depth` blocks of
/// `x + gelu(norm(linear(x)))`, then `width -> 1`.
#[derive(Module, Debug)]
struct Regressor<B: Backend> {
    input: Linear<B>,
    blocks: Vec<Block<B>>,
    output: Linear<B>,
    act: Gelu,
}

#[derive(Module, Debug)]
struct Block<B: Backend> {
    linear: Linear<B>,
    norm: LayerNorm<B>,
}

impl<B: Backend> Regressor<B> {
    /// Widths chosen so that some parameters (37, 6·37, ...) do not split
    /// evenly over p = 2 ranks: the backend pads the shards.
    fn new(inputs: usize, width: usize, depth: usize, device: &B::Device) -> Self {
        Regressor {
            input: LinearConfig::new(inputs, width).init(device),
            blocks: (0..depth)
                .map(|_| Block {
                    linear: LinearConfig::new(width, width).init(device),
                    norm: LayerNormConfig::new(width).init(device),
                })
                .collect(),
            output: LinearConfig::new(width, 1).init(device),
            act: Gelu::new(),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut h = self.act.forward(self.input.forward(x));
        for block in &self.blocks {
            h = h.clone()
                + self
                    .act
                    .forward(block.norm.forward(block.linear.forward(h)));
        }
        self.output.forward(h)
    }

    /// Mean squared error against `y`.
    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 1> {
        (self.forward(x) - y).powi_scalar(2).mean()
    }
}

// ---------------------------------------------------------------------------
// The synthetic task.
// ---------------------------------------------------------------------------

const INPUTS: usize = 6;
const WIDTH: usize = 37;
const DEPTH: usize = 4;
/// Samples per rank per micro-step.
const MICRO_BATCH: usize = 16;
const WORLD: usize = 4;
const RANKS_PER_NODE: usize = 2;
const PARTITION: usize = 2;
const ACCUM: usize = 2;

/// SplitMix64: deterministic pseudo-random numbers without a dependency.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `rows` samples of the task from `seed`: x uniform in [-1, 1]^6 and
/// y = sin(3 x0) + x1 x2 - 0.5 x3^2 + 0.3 x4 - 0.2 x5.
fn samples(seed: u64, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let mut state = splitmix(seed);
    let mut x = Vec::with_capacity(rows * INPUTS);
    for _ in 0..rows * INPUTS {
        state = splitmix(state);
        x.push((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
    }
    let y = x
        .chunks(INPUTS)
        .map(|v| (3.0 * v[0]).sin() + v[1] * v[2] - 0.5 * v[3] * v[3] + 0.3 * v[4] - 0.2 * v[5])
        .collect();
    (x, y)
}

fn tensors<B: Backend>(
    (x, y): (Vec<f32>, Vec<f32>),
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let rows = y.len();
    (
        Tensor::from_data(TensorData::new(x, [rows, INPUTS]), device),
        Tensor::from_data(TensorData::new(y, [rows, 1]), device),
    )
}

/// The samples rank `rank` trains on in micro-step `micro` of step `step`.
fn batch_seed(step: usize, rank: usize, micro: usize) -> u64 {
    ((step * WORLD + rank) * ACCUM + micro) as u64
}

/// A held-out set, disjoint from the training seeds.
const TEST_SEED: u64 = u64::MAX / 3;
const TEST_ROWS: usize = 512;

// ---------------------------------------------------------------------------
// Moving parameters between backends (Burn records, nothing mics-specific).
// ---------------------------------------------------------------------------

fn to_bytes<B: Backend, M: Module<B>>(model: M) -> Result<Vec<u8>> {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    Recorder::<B>::record(&recorder, model.into_record(), ())
        .map_err(|e| anyhow!("cannot serialise the model: {e}"))
}

fn from_bytes<B: Backend, M: Module<B>>(fresh: M, bytes: &[u8], device: &B::Device) -> Result<M> {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let record = Recorder::<B>::load(&recorder, bytes.to_vec(), device)
        .map_err(|e| anyhow!("cannot load the model record: {e}"))?;
    Ok(fresh.load_record(record))
}

// ---------------------------------------------------------------------------
// Training.
// ---------------------------------------------------------------------------

/// Where the initial and the trained model live: Burn's CPU backend.
type Cpu = NdArray;

/// What one rank reports back.
struct RankReport {
    rank: usize,
    /// Global mean training loss of every step (the same on every rank).
    losses: Vec<f32>,
    counters: Counters,
    partition_stats: CommStats,
    replication_stats: CommStats,
    /// The trained parameters (rank 0 only), as a Burn record.
    trained: Option<Vec<u8>>,
}

/// One rank, computing on `B` (NdArray, wgpu or CUDA: `--device`): the
/// model trains on `Autodiff<Mics<B>>`, the MiCS decorator around `B`.
fn run_rank<B: Backend>(
    world: Arc<dyn Communicator>,
    initial: &[u8],
    steps: usize,
    device: &B::Device,
) -> Result<RankReport> {
    type Train<B> = Autodiff<Mics<B>>;
    let rank = world.rank();
    let device = device.clone();
    let topology = Topology::new(WORLD, RANKS_PER_NODE, PARTITION)?;
    let groups = MicsGroups::new(world.clone(), topology)?;
    // Prefetch: the first step records the order parameters are used in,
    // later steps gather up to 2 ahead.
    let runtime = MicsRuntime::with_prefetch(groups, PrefetchConfig::new(2, 1 << 20));

    // The same initial values on every rank, then one call shards them:
    // each rank keeps 1/p of every parameter.
    let model = from_bytes(
        Regressor::<Train<B>>::new(INPUTS, WIDTH, DEPTH, &device),
        initial,
        &device,
    )?;
    let mut model = shard_module(model, &runtime, ShardInit::Identical);
    let mut optim: ShardedOptimizer<B, AdamW> =
        ShardedOptimizer::adamw(&AdamWConfig::new().with_weight_decay(1e-4), &runtime)
            .with_grad_clip_norm(1.0);

    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        runtime.begin_step();
        let mut local = 0.0f32;
        for micro in 0..ACCUM {
            let (x, y) = tensors(samples(batch_seed(step, rank, micro), MICRO_BATCH), &device);
            let loss = model.loss(x, y);
            local += burn::tensor::ElementConversion::elem::<f32>(loss.clone().into_scalar());
            // Backward, then reduce-scatter the gradients inside the partition group.
            optim.accumulate(&model, loss.backward());
        }
        // One all-reduce across the replication group, then AdamW on the shards.
        let lr = 5e-3 * (1.0 - 0.9 * step as f64 / steps as f64);
        model = optim.step(lr, model);
        let total = world
            .all_reduce(vec![local / ACCUM as f32], ReduceOp::Mean)
            .wait()?;
        losses.push(total[0]);
    }
    let counters = runtime.counters();
    let (partition_stats, replication_stats) = (
        runtime.groups().partition().stats(),
        runtime.groups().replication().stats(),
    );

    // One call gathers the full parameters back (collective in each
    // partition group); `valid()` drops autodiff. The record then loads into
    // the same model on plain NdArray.
    let gathered = gather_module(model).valid();
    let trained = if rank == 0 {
        Some(to_bytes::<Mics<B>, _>(gathered)?)
    } else {
        None
    };
    Ok(RankReport {
        rank,
        losses,
        counters,
        partition_stats,
        replication_stats,
        trained,
    })
}

// ---------------------------------------------------------------------------

/// Train a user-defined Burn model sharded with MiCS, through the backend API.
#[derive(Parser)]
struct Args {
    /// Tiny settings (40 steps): seconds, for CI.
    #[arg(long, env = "MICS_EXAMPLE_TINY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    tiny: bool,
    /// Optimizer steps (default 40 with --tiny, else 300).
    #[arg(long)]
    steps: Option<usize>,
    /// Where the trained model goes (`regressor.bin`).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("mics-examples/custom_model"))]
    out: PathBuf,
    /// The compute device of the ranks: `cpu`, `wgpu` (built with `--features wgpu`), `cuda`.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// The ranks on the backend `--device` selects.
struct Ranks<'a> {
    initial: &'a [u8],
    steps: usize,
}

impl BackendTask for Ranks<'_> {
    type Output = Result<Vec<Result<Result<RankReport>, String>>>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let engine = ThreadsEngine::new(WORLD).ranks_per_node(RANKS_PER_NODE);
        engine
            .run(|comm| run_rank::<B>(Arc::new(comm), self.initial, self.steps, &device))
            .context("cannot start the ranks")
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let steps = args.steps.unwrap_or(if args.tiny { 40 } else { 300 });
    ensure!(steps >= 2, "--steps must be at least 2");
    let device = Default::default();

    // The initial model, built once on plain NdArray with a fixed seed.
    Cpu::seed(&device, 42);
    let initial = Regressor::<Cpu>::new(INPUTS, WIDTH, DEPTH, &device);
    let params = initial.num_params();
    let (test_x, test_y) = tensors::<Cpu>(samples(TEST_SEED, TEST_ROWS), &device);
    let initial_test = initial.loss(test_x.clone(), test_y.clone()).into_scalar();
    let initial = to_bytes(initial)?;

    println!(
        "Regressor ({params} parameters, {} bytes) on N = {WORLD} ranks, {RANKS_PER_NODE} per \
         node, partition size p = {PARTITION}, {ACCUM} micro-steps of {MICRO_BATCH} samples per \
         rank: global batch {}",
        params * 4,
        WORLD * ACCUM * MICRO_BATCH
    );

    let ranks = Ranks {
        initial: &initial,
        steps,
    };
    let results = mics::train::with_backend(args.device, Precision::Fp32, ranks)??;
    let mut reports = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        let report = result
            .map_err(|panic| anyhow!("rank {rank} panicked: {panic}"))?
            .with_context(|| format!("rank {rank} failed"))?;
        reports.push(report);
    }

    let losses = &reports[0].losses;
    for (step, loss) in losses.iter().enumerate() {
        println!("step {:>4}  loss {loss:.5}", step + 1);
    }
    let k = (losses.len() / 5).max(1);
    let head = losses[..k].iter().sum::<f32>() / k as f32;
    let tail = losses[losses.len() - k..].iter().sum::<f32>() / k as f32;
    ensure!(
        tail < 0.8 * head,
        "the loss did not go down: mean of the first {k} steps {head:.5}, of the last {k} {tail:.5}"
    );
    println!("loss went down: {head:.5} (first {k} steps) -> {tail:.5} (last {k})");

    // The gathered model is an ordinary Burn module on NdArray.
    let trained_bytes = reports[0]
        .trained
        .as_ref()
        .context("rank 0 sent no model")?;
    let plain: Regressor<Cpu> = from_bytes(
        Regressor::<Cpu>::new(INPUTS, WIDTH, DEPTH, &device),
        trained_bytes,
        &device,
    )?;
    let test = plain.loss(test_x, test_y).into_scalar();
    println!("held-out MSE of the gathered plain model: {initial_test:.5} before, {test:.5} after");
    ensure!(
        test < initial_test,
        "the trained model is not better on held-out data"
    );

    println!(
        "per-rank counters (model states of one replica: {} bytes):",
        params * 4
    );
    println!(
        "  rank  gathers  prefetch hits  peak live gathered B  shard B  partition sent B  replication sent B"
    );
    for r in &reports {
        let c = &r.counters;
        println!(
            "  {:>4}  {:>7}  {:>13}  {:>20}  {:>7}  {:>16}  {:>18}",
            r.rank,
            c.gathers,
            c.prefetch_hits,
            c.peak_live_gathered_bytes,
            c.shard_bytes,
            r.partition_stats.intra_node_bytes() + r.partition_stats.inter_node_bytes(),
            r.replication_stats.intra_node_bytes() + r.replication_stats.inter_node_bytes(),
        );
    }
    let (shard, peak) = (
        reports[0].counters.shard_bytes,
        reports[0].counters.peak_live_gathered_bytes,
    );
    let percent = |bytes: u64| 100.0 * bytes as f64 / (params * 4) as f64;
    println!(
        "each rank keeps {shard} bytes of parameters ({:.0}% of the model, padding included) \
         and held at most {peak} gathered bytes at once ({:.0}%: the parameters in use and \
         those prefetched)",
        percent(shard),
        percent(peak)
    );

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let path = args.out.join("regressor.bin");
    std::fs::write(&path, trained_bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "trained model (Burn BinBytesRecorder record): {}",
        path.display()
    );
    Ok(())
}
