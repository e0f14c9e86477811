//! `mics plan --calibrate`: measures this machine (the in-process engine's
//! collectives, the NdArray backend's matmul and element-wise throughput),
//! describes it as a planner cluster, predicts the step time of small real
//! MiCS trainings with the planner's time model, runs them on
//! `Autodiff<Mics<NdArray>>` over the threads engine, and compares.
//!
//! The machine is modelled as one node of `k = N` "GPUs" (rank threads). The
//! ranks share the machine's cores and memory bandwidth, so compute and
//! element-wise throughput are measured with `N` threads working at once and
//! the cluster of a configuration with `N` ranks gets the per-rank figure
//! measured under that sharing (one cluster description per `N`).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::optim::AdamWConfig;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, shard_module};
use mics_comm::{Collectives, Communicator, MicsGroups, ReduceOp, ThreadsEngine, Topology};
use mics_planner::{Architecture, ClusterSpec, ModelSpec, Planner, Strategy, TrainConfig};
use serde_json::{Value, json};

/// Sizes of the calibration: the model, the runs and the probes.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Hidden size of the GPT-like model.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary (the output head is tied to the token embedding).
    pub vocab: usize,
    /// Sequence length (also the size of the learned position table).
    pub seq: usize,
    /// Micro-batch per rank.
    pub batch: usize,
    /// Untimed steps (the first records the prefetch order).
    pub warmup: usize,
    /// Timed steps; the median is reported.
    pub steps: usize,
    /// (N, p, s) configurations to predict and run.
    pub configs: Vec<(usize, usize, usize)>,
    /// Full message sizes of the collective probes, in f32 elements.
    pub message_elems: Vec<usize>,
    /// Timed repetitions of each collective probe (median).
    pub probe_reps: usize,
}

impl Setup {
    /// The measurement reported in `docs/planner.md`.
    pub fn standard() -> Self {
        Self {
            hidden: 256,
            layers: 2,
            heads: 4,
            vocab: 512,
            seq: 64,
            batch: 4,
            warmup: 2,
            steps: 5,
            configs: vec![(1, 1, 1), (2, 2, 1), (4, 2, 2), (4, 4, 1)],
            message_elems: vec![1 << 10, 1 << 14, 1 << 17, 1 << 20],
            probe_reps: 9,
        }
    }

    /// Seconds-long end-to-end check (tests).
    #[cfg(test)]
    pub fn tiny() -> Self {
        Self {
            hidden: 32,
            layers: 1,
            heads: 2,
            vocab: 64,
            seq: 8,
            batch: 2,
            warmup: 1,
            steps: 2,
            configs: vec![(1, 1, 1), (2, 2, 1), (4, 2, 2), (4, 4, 1)],
            message_elems: vec![1 << 8, 1 << 12],
            probe_reps: 3,
        }
    }

    /// The model as the planner sees it (GPT layout: learned positions, tied
    /// head; Burn's attention has separate q/k/v/o projections where GPT-2
    /// fuses q/k/v, the same parameter count in more tensors).
    pub fn model_spec(&self) -> ModelSpec {
        ModelSpec {
            name: format!("calibration-gpt-h{}-l{}", self.hidden, self.layers),
            architecture: Architecture::Gpt,
            layers: self.layers as u64,
            hidden: self.hidden as u64,
            heads: self.heads as u64,
            ffn: 4 * self.hidden as u64,
            vocab: self.vocab as u64,
            max_positions: self.seq as u64,
            default_seq: self.seq as u64,
        }
    }

    fn rank_counts(&self) -> Vec<usize> {
        let mut ns: Vec<usize> = self.configs.iter().map(|c| c.0).collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }
}

/// One timed collective probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// all_gather, reduce_scatter or all_reduce.
    pub kind: &'static str,
    /// Ranks in the group.
    pub ranks: usize,
    /// Full message (gathered or reduced) bytes.
    pub message_bytes: f64,
    /// Median seconds.
    pub time_s: f64,
}

/// Throughput of one rank while `ranks` threads work at once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shared {
    /// Threads working at once.
    pub ranks: usize,
    /// Matmul GFLOP/s of one of them, at the model's shapes.
    pub matmul_gflops: f64,
    /// Element-wise GB/s (bytes read + written) of one of them.
    pub elementwise_gbps: f64,
    /// Median step time of a plain `Autodiff<NdArray>` training step (no
    /// sharding, no communication) of the calibration model, one per
    /// thread, all threads at once, s.
    pub plain_step_s: f64,
    /// FLOPs of that step at the matmul rate / its measured time: the
    /// fraction of the matmul rate Burn's whole step reaches.
    pub compute_efficiency: f64,
}

/// The alpha-beta fit of the probes, in the planner's ring form
/// `t = base + steps·hop + factor·M / B`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CommFit {
    /// Fixed cost per collective, µs.
    pub base_latency_us: f64,
    /// Cost per ring step, µs.
    pub hop_latency_us: f64,
    /// Bandwidth per rank, GB/s.
    pub bandwidth_gbps: f64,
}

/// One configuration, predicted and measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// World size.
    pub n: usize,
    /// Partition size.
    pub p: usize,
    /// Micro-steps per optimizer step.
    pub s: usize,
    /// Planner's step time with compute at the matmul rate alone, s.
    pub predicted_matmul_s: f64,
    /// Planner's step time with the compute efficiency of a plain step, s.
    pub predicted_s: f64,
    /// Of which pure compute (FLOPs at the shared matmul rate), s.
    pub predicted_compute_s: f64,
    /// Median measured step time (slowest rank), s.
    pub measured_s: f64,
    /// measured / predicted.
    pub ratio: f64,
    /// Gathers per step on rank 0 (the backend's counter).
    pub gathers_per_step: f64,
}

/// Everything the calibration measured and predicted.
#[derive(Debug, Clone)]
pub struct Report {
    /// The sizes used.
    pub setup: Setup,
    /// Parameters of the model.
    pub params: u64,
    /// Collective probes.
    pub probes: Vec<Probe>,
    /// Their fit.
    pub fit: CommFit,
    /// Compute and memory throughput per rank under sharing.
    pub shared: Vec<Shared>,
    /// Predicted vs measured per configuration.
    pub rows: Vec<Row>,
}

// ---------------------------------------------------------------- the model

#[derive(Module, Debug)]
struct Block<B: Backend> {
    ln1: LayerNorm<B>,
    attn: MultiHeadAttention<B>,
    ln2: LayerNorm<B>,
    fc: Linear<B>,
    proj: Linear<B>,
}

/// GPT-like: token and position embeddings, pre-norm blocks, final norm,
/// output head tied to the token embedding.
#[derive(Module, Debug)]
struct Gpt<B: Backend> {
    embed: Embedding<B>,
    pos: Embedding<B>,
    blocks: Vec<Block<B>>,
    ln_f: LayerNorm<B>,
    act: Gelu,
}

impl<B: Backend> Gpt<B> {
    fn new(c: &Setup, device: &B::Device) -> Self {
        let d = c.hidden;
        Gpt {
            embed: EmbeddingConfig::new(c.vocab, d).init(device),
            pos: EmbeddingConfig::new(c.seq, d).init(device),
            blocks: (0..c.layers)
                .map(|_| Block {
                    ln1: LayerNormConfig::new(d).init(device),
                    attn: MultiHeadAttentionConfig::new(d, c.heads)
                        .with_dropout(0.0)
                        .init(device),
                    ln2: LayerNormConfig::new(d).init(device),
                    fc: LinearConfig::new(d, 4 * d).init(device),
                    proj: LinearConfig::new(4 * d, d).init(device),
                })
                .collect(),
            ln_f: LayerNormConfig::new(d).init(device),
            act: Gelu::new(),
        }
    }

    fn loss(&self, c: &Setup, samples: Range<usize>, device: &B::Device) -> Tensor<B, 1> {
        let (b, seq, vocab) = (samples.len(), c.seq, c.vocab);
        let toks =
            move |s: usize| (0..=seq).map(move |t| ((s * 31 + t * 7 + t * t) % vocab) as i64);
        let input: Vec<i64> = samples.clone().flat_map(|s| toks(s).take(seq)).collect();
        let target: Vec<i64> = samples.flat_map(|s| toks(s).skip(1)).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [b, seq]), device);
        let target = Tensor::<B, 2, Int>::from_data(TensorData::new(target, [b, seq]), device);
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, device)
            .reshape([1, seq])
            .repeat_dim(0, b);
        let mut x = self.embed.forward(input) + self.pos.forward(positions);
        for blk in &self.blocks {
            let mask = generate_autoregressive_mask::<B>(b, seq, device);
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

// ------------------------------------------------------------ measurements

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn slowest(results: Vec<Result<Vec<f64>, String>>) -> anyhow::Result<Vec<f64>> {
    let per_rank = results
        .into_iter()
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let reps = per_rank[0].len();
    Ok((0..reps)
        .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
        .collect())
}

/// Times all-gather, reduce-scatter and all-reduce of each message size over
/// groups of each size (barrier first; the slowest rank's time; median).
fn probe_collectives(setup: &Setup, groups: &[usize]) -> anyhow::Result<Vec<Probe>> {
    let mut probes = Vec::new();
    for &n in groups.iter().filter(|&&n| n > 1) {
        for &elems in &setup.message_elems {
            let elems = elems.div_ceil(n) * n;
            for kind in ["all_gather", "reduce_scatter", "all_reduce"] {
                let reps = setup.probe_reps;
                let results = ThreadsEngine::new(n).run(|c| {
                    let mut times = Vec::with_capacity(reps);
                    for rep in 0..reps + 1 {
                        c.barrier().wait().expect("barrier");
                        let t = Instant::now();
                        match kind {
                            "all_gather" => drop(c.all_gather(vec![1f32; elems / n]).wait()),
                            "reduce_scatter" => {
                                drop(c.reduce_scatter(vec![1f32; elems], ReduceOp::Sum).wait())
                            }
                            _ => drop(c.all_reduce(vec![1f32; elems], ReduceOp::Sum).wait()),
                        }
                        if rep > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    times
                })?;
                probes.push(Probe {
                    kind,
                    ranks: n,
                    message_bytes: (elems * 4) as f64,
                    time_s: median(slowest(results)?),
                });
            }
        }
    }
    Ok(probes)
}

/// Least squares of `t = base + steps·hop + factor·M·(1/B)` over the probes,
/// with every coefficient kept non-negative (a negative one is dropped and
/// the rest refitted).
fn fit_collectives(probes: &[Probe]) -> CommFit {
    let rows: Vec<([f64; 3], f64)> = probes
        .iter()
        .map(|p| {
            let n = p.ranks as f64;
            let steps = if p.kind == "all_reduce" {
                2.0 * (n - 1.0)
            } else {
                n - 1.0
            };
            ([1.0, steps, steps / n * p.message_bytes], p.time_s)
        })
        .collect();
    let mut active = [true; 3];
    let mut coef = [0.0; 3];
    for _ in 0..3 {
        coef = least_squares(&rows, &active);
        match (0..3).find(|&i| active[i] && coef[i] < 0.0) {
            Some(i) => active[i] = false,
            None => break,
        }
    }
    CommFit {
        base_latency_us: coef[0].max(0.0) * 1e6,
        hop_latency_us: coef[1].max(0.0) * 1e6,
        bandwidth_gbps: if coef[2] > 0.0 {
            1.0 / coef[2] / 1e9
        } else {
            f64::INFINITY
        },
    }
}

/// Solves the normal equations on the active columns (Gaussian elimination).
fn least_squares(rows: &[([f64; 3], f64)], active: &[bool; 3]) -> [f64; 3] {
    let cols: Vec<usize> = (0..3).filter(|&i| active[i]).collect();
    let m = cols.len();
    let mut a = vec![vec![0.0; m + 1]; m];
    for (x, y) in rows {
        // Relative error: weight each probe by 1/t, so small messages count.
        let w = 1.0 / (y * y).max(1e-18);
        for (i, &ci) in cols.iter().enumerate() {
            for (j, &cj) in cols.iter().enumerate() {
                a[i][j] += w * x[ci] * x[cj];
            }
            a[i][m] += w * x[ci] * y;
        }
    }
    for i in 0..m {
        let pivot = (i..m)
            .max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))
            .unwrap_or(i);
        a.swap(i, pivot);
        let d = a[i][i];
        if d.abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[i].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != i {
                let f = row[i] / d;
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(i) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = [0.0; 3];
    for (i, &ci) in cols.iter().enumerate() {
        out[ci] = if a[i][i].abs() < 1e-300 {
            0.0
        } else {
            a[i][m] / a[i][i]
        };
    }
    out
}

/// Matmul GFLOP/s and element-wise GB/s of one thread while `ranks` threads
/// run the same work at once on NdArray, at the model's matmul shapes (one
/// forward pass worth: q, k, v, o, fc, proj per layer, the output head).
fn probe_shared(setup: &Setup, ranks: usize) -> anyhow::Result<Shared> {
    type B = NdArray;
    let (t, h, f, v) = (
        setup.batch * setup.seq,
        setup.hidden,
        4 * setup.hidden,
        setup.vocab,
    );
    let mut shapes = Vec::new();
    for _ in 0..setup.layers {
        shapes.extend([(t, h, h); 4]);
        shapes.push((t, h, f));
        shapes.push((t, f, h));
    }
    shapes.push((t, h, v));
    let flops: f64 = shapes
        .iter()
        .map(|&(m, k, n)| 2.0 * (m * k * n) as f64)
        .sum();
    let reps = setup.probe_reps.max(3);
    let elems = (t * f).max(1 << 16);
    let results: Vec<(f64, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|_| {
                let shapes = &shapes;
                scope.spawn(move || {
                    let device = Default::default();
                    let mats: Vec<_> = shapes
                        .iter()
                        .map(|&(m, k, n)| {
                            (
                                Tensor::<B, 2>::ones([m, k], &device),
                                Tensor::<B, 2>::ones([k, n], &device),
                            )
                        })
                        .collect();
                    let x = Tensor::<B, 1>::ones([elems], &device);
                    let y = Tensor::<B, 1>::ones([elems], &device);
                    let mut mm = Vec::new();
                    let mut ew = Vec::new();
                    for rep in 0..=reps {
                        let start = Instant::now();
                        for (a, b) in &mats {
                            let _product = a.clone().matmul(b.clone());
                        }
                        let mid = Instant::now();
                        for _ in 0..8 {
                            let _sum = x.clone() + y.clone();
                        }
                        if rep > 0 {
                            mm.push((mid - start).as_secs_f64());
                            ew.push(mid.elapsed().as_secs_f64() / 8.0);
                        }
                    }
                    (median(mm), median(ew))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    let mm = median(results.iter().map(|r| r.0).collect());
    let ew = median(results.iter().map(|r| r.1).collect());
    let matmul_gflops = flops / mm / 1e9;
    let plain_step_s = plain_steps(setup, ranks);
    let model = setup.model_spec();
    let step_flops =
        (setup.batch * setup.seq) as f64 * model.flops_per_token(model.default_seq, false);
    Ok(Shared {
        ranks,
        matmul_gflops,
        elementwise_gbps: (elems * 12) as f64 / ew / 1e9,
        plain_step_s,
        compute_efficiency: (step_flops / (matmul_gflops * 1e9) / plain_step_s).min(1.0),
    })
}

/// A plain `Autodiff<NdArray>` training step (Burn's AdamW), `ranks` threads
/// at once each with its own model: the median of the slowest thread.
fn plain_steps(setup: &Setup, ranks: usize) -> f64 {
    use burn::optim::{GradientsParams, Optimizer};
    // Plain: an autodiff backend under Burn's distributed autodiff too.
    type B = Autodiff<mics_plain::Plain<NdArray>>;
    let barrier = std::sync::Barrier::new(ranks);
    let per_thread: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let device = Default::default();
                    let mut model = Gpt::<B>::new(setup, &device);
                    let mut optim = AdamWConfig::new().init::<B, Gpt<B>>();
                    let mut times = Vec::new();
                    for step in 0..setup.warmup + setup.steps {
                        barrier.wait();
                        let start = Instant::now();
                        let at = (step * ranks + rank) * setup.batch;
                        let loss = model.loss(setup, at..at + setup.batch, &device);
                        let grads = GradientsParams::from_grads(loss.backward(), &model);
                        model = optim.step(1e-3, model, grads);
                        if step >= setup.warmup {
                            times.push(start.elapsed().as_secs_f64());
                        }
                    }
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("plain step thread"))
            .collect()
    });
    median(
        (0..setup.steps)
            .map(|i| per_thread.iter().map(|t| t[i]).fold(0.0, f64::max))
            .collect(),
    )
}

/// This machine as a planner cluster for a configuration of `shared.ranks`
/// rank threads: one node of k = N, each "GPU" with the matmul rate and the
/// memory bandwidth one thread gets while N work at once, and the threads
/// engine's fitted collective costs. The bandwidth efficiency is 1 (the fit
/// is what the engine reaches); the compute efficiency is 1 (the matmul rate
/// alone) or, with `step_efficiency`, the fraction of it a plain unsharded
/// Burn step reaches at the same N ([`Shared::compute_efficiency`]).
pub fn machine_cluster(shared: &Shared, fit: &CommFit, step_efficiency: bool) -> ClusterSpec {
    ClusterSpec {
        name: format!("this-machine-{}", shared.ranks),
        description: format!(
            "this machine, {} rank threads sharing its cores (measured)",
            shared.ranks
        ),
        gpus_per_node: shared.ranks as u64,
        gpu_memory_gib: 1024.0,
        peak_tflops: shared.matmul_gflops / 1e3,
        hbm_gbps: shared.elementwise_gbps,
        intra_node_gbps: fit.bandwidth_gbps,
        inter_node_gbit: fit.bandwidth_gbps * 8.0,
        intra_latency_us: fit.hop_latency_us,
        inter_latency_us: fit.hop_latency_us,
        base_latency_us: fit.base_latency_us,
        bandwidth_efficiency: 1.0,
        compute_efficiency: if step_efficiency {
            shared.compute_efficiency
        } else {
            1.0
        },
        reserved_gib: 0.0,
    }
}

/// Runs (N, p, s) for real; returns the median step time of the slowest
/// rank and the gathers per step of rank 0.
fn run_config(setup: &Setup, n: usize, p: usize, s: usize) -> anyhow::Result<(f64, f64)> {
    type B = Autodiff<Mics<NdArray>>;
    let topology = Topology::new(n, n, p)?;
    let budget = 2 * 12 * (setup.hidden * setup.hidden * 4) as u64;
    let results = ThreadsEngine::new(n).run(|world| {
        let world: Arc<dyn Communicator> = Arc::new(world);
        let rank = world.rank();
        let groups = MicsGroups::new(world.clone(), topology).expect("groups");
        let runtime = MicsRuntime::with_prefetch(groups, PrefetchConfig::new(2, budget));
        let device = Default::default();
        let mut model = shard_module(
            Gpt::<B>::new(setup, &device),
            &runtime,
            ShardInit::Identical,
        );
        let mut optim = ShardedOptimizer::adamw(&AdamWConfig::new(), &runtime);
        let mut times = Vec::new();
        let mut gathers = 0u64;
        for step in 0..setup.warmup + setup.steps {
            world.barrier().wait().expect("barrier");
            if step == setup.warmup {
                gathers = runtime.counters().gathers;
            }
            let start = Instant::now();
            runtime.begin_step();
            for m in 0..s {
                let at = ((step * s + m) * n + rank) * setup.batch;
                let loss = model.loss(setup, at..at + setup.batch, &device);
                optim.accumulate(&model, loss.backward());
            }
            model = optim.step(1e-3, model);
            if step >= setup.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let gathers = (runtime.counters().gathers - gathers) as f64 / setup.steps as f64;
        times.push(gathers);
        times
    })?;
    let rank0_gathers = results
        .first()
        .and_then(|r| r.as_ref().ok())
        .and_then(|t| t.last().copied())
        .unwrap_or(0.0);
    let times = slowest(
        results
            .into_iter()
            .map(|r| {
                r.map(|mut t| {
                    t.pop();
                    t
                })
            })
            .collect(),
    )?;
    Ok((median(times), rank0_gathers))
}

/// Measures, predicts, runs and compares.
pub fn calibrate(setup: &Setup) -> anyhow::Result<Report> {
    let ns = setup.rank_counts();
    let probes = probe_collectives(setup, &ns)?;
    let fit = fit_collectives(&probes);
    let shared = ns
        .iter()
        .map(|&n| probe_shared(setup, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = setup.model_spec();
    let mut rows = Vec::new();
    for &(n, p, s) in &setup.configs {
        let machine = shared
            .iter()
            .find(|m| m.ranks == n)
            .expect("measured for every N");
        let predict = |step_efficiency: bool| {
            Planner::new(
                model.clone(),
                machine_cluster(machine, &fit, step_efficiency),
                TrainConfig {
                    gpus: n as u64,
                    gpus_per_node: n as u64,
                    seq: setup.seq as u64,
                    micro_batch: setup.batch as u64,
                    grad_accum: s as u64,
                    checkpointing: false,
                    prefetch_depth: 2,
                },
            )?
            .with_element_bytes(4.0)
            .estimate(Strategy::Mics {
                partition_size: p as u64,
            })
        };
        let raw = predict(false)?;
        let estimate = predict(true)?;
        let (measured_s, gathers_per_step) = run_config(setup, n, p, s)?;
        rows.push(Row {
            n,
            p,
            s,
            predicted_matmul_s: raw.step_time_s,
            predicted_s: estimate.step_time_s,
            predicted_compute_s: estimate.compute_time_s,
            measured_s,
            ratio: measured_s / estimate.step_time_s,
            gathers_per_step,
        });
    }
    Ok(Report {
        setup: setup.clone(),
        params: model.params(),
        probes,
        fit,
        shared,
        rows,
    })
}

// ------------------------------------------------------------------ output

/// The report as a table.
pub fn render(r: &Report) -> String {
    let c = &r.setup;
    let mut out = format!(
        "calibration model: GPT-like, hidden {}, {} layers, {} heads, vocab {}, seq {}, micro-batch {} per rank ({} parameters, fp32, AdamW)\n",
        c.hidden, c.layers, c.heads, c.vocab, c.seq, c.batch, r.params
    );
    out += &format!(
        "threads engine fit: base {:.1} us + {:.1} us per ring step, {:.2} GB/s per rank ({} probes)\n",
        r.fit.base_latency_us,
        r.fit.hop_latency_us,
        r.fit.bandwidth_gbps,
        r.probes.len()
    );
    for m in &r.shared {
        out += &format!(
            "{} thread(s) at once: matmul {:.1} GFLOP/s, element-wise {:.2} GB/s, plain Burn step {:.1} ms (efficiency {:.3}) per thread\n",
            m.ranks,
            m.matmul_gflops,
            m.elementwise_gbps,
            m.plain_step_s * 1e3,
            m.compute_efficiency
        );
    }
    out += &format!(
        "{:>3}{:>3}{:>3}{:>12}{:>14}{:>12}{:>14}{:>8}{:>10}\n",
        "N",
        "p",
        "s",
        "matmul-only",
        "predicted ms",
        "compute ms",
        "measured ms",
        "ratio",
        "gathers"
    );
    for row in &r.rows {
        out += &format!(
            "{:>3}{:>3}{:>3}{:>12.1}{:>14.1}{:>12.1}{:>14.1}{:>8.2}{:>10.0}\n",
            row.n,
            row.p,
            row.s,
            row.predicted_matmul_s * 1e3,
            row.predicted_s * 1e3,
            row.predicted_compute_s * 1e3,
            row.measured_s * 1e3,
            row.ratio,
            row.gathers_per_step
        );
    }
    out += &format!(
        "(step = s micro-steps of {} steps after {} warm-up, median of the slowest rank; ratio = measured / predicted)\n",
        c.steps, c.warmup
    );
    out
}

/// The report as JSON.
pub fn to_json(r: &Report) -> Value {
    let c = &r.setup;
    json!({
        "model": {
            "hidden": c.hidden, "layers": c.layers, "heads": c.heads, "vocab": c.vocab,
            "seq": c.seq, "micro_batch": c.batch, "params": r.params,
        },
        "warmup_steps": c.warmup,
        "timed_steps": c.steps,
        "collective_fit": r.fit,
        "collective_probes": r.probes,
        "shared_throughput": r.shared,
        "rows": r.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_calibration_runs_end_to_end() {
        let report = calibrate(&Setup::tiny()).unwrap();
        assert_eq!(report.rows.len(), 4);
        for row in &report.rows {
            assert!(
                row.predicted_s > 0.0 && row.predicted_s.is_finite(),
                "{row:?}"
            );
            assert!(row.measured_s > 0.0, "{row:?}");
            assert!(row.predicted_compute_s > 0.0, "{row:?}");
        }
        let table = render(&report);
        assert_eq!(table.lines().filter(|l| l.starts_with("  4")).count(), 2);
        let json = to_json(&report);
        assert_eq!(json["rows"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn the_fit_recovers_an_alpha_beta_law() {
        let probes: Vec<Probe> = [2usize, 4]
            .iter()
            .flat_map(|&n| {
                [1e3, 1e5, 1e7].into_iter().map(move |m| {
                    let steps = (n - 1) as f64;
                    Probe {
                        kind: "all_gather",
                        ranks: n,
                        message_bytes: m,
                        time_s: 20e-6 + steps * 5e-6 + steps / n as f64 * m / 2e9,
                    }
                })
            })
            .collect();
        let fit = fit_collectives(&probes);
        assert!((fit.base_latency_us - 20.0).abs() < 0.1, "{fit:?}");
        assert!((fit.hop_latency_us - 5.0).abs() < 0.1, "{fit:?}");
        assert!((fit.bandwidth_gbps - 2.0).abs() < 0.01, "{fit:?}");
    }
}
