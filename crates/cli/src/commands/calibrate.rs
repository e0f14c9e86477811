//! `mics plan --calibrate`: measures this machine (the in-process engine's
//! collectives, the NdArray backend's matmul and element-wise throughput),
//! describes it as a planner cluster, predicts the step time of small real
//! MiCS trainings of a small GPT-2 (`mics_gpt`) with the planner's time
//! model, runs them on `Autodiff<Mics<NdArray>>` over the threads engine, and
//! compares. The fit and the cluster are the planner's
//! (`mics_planner::{fit_collectives, machine_cluster}`); this module measures
//! and reports.
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
use burn::optim::AdamWConfig;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, shard_module};
use mics_comm::{Collectives, Communicator, MicsGroups, ReduceOp, ThreadsEngine, Topology};
use mics_gpt::{Gpt2Config, Gpt2LMHeadModel};
use mics_planner::{
    Architecture, Collective, CollectiveProbe, CommFit, ModelSpec, Planner, SharedThroughput,
    Strategy, TrainConfig, fit_collectives, machine_cluster,
};
use serde_json::{Value, json};

use super::gpu_bench::lm_loss;

/// Sizes of the calibration: the model, the runs and the probes.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Hidden size of the GPT-2 model.
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

    /// The model: a GPT-2 of these sizes without dropout, its position table
    /// as long as the sequence.
    pub fn gpt_config(&self) -> Gpt2Config {
        let mut config = Gpt2Config::tiny(self.vocab, self.hidden, self.layers, self.heads);
        config.n_positions = self.seq;
        config
    }

    /// The model as the planner sees it (GPT layout: learned positions, tied
    /// head).
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
    pub probes: Vec<CollectiveProbe>,
    /// Their fit.
    pub fit: CommFit,
    /// Compute and memory throughput per rank under sharing.
    pub shared: Vec<SharedThroughput>,
    /// Predicted vs measured per configuration.
    pub rows: Vec<Row>,
}

// ---------------------------------------------------------------- the model

/// The calibration model's mean next-token loss on `samples`: sample `s` is
/// the deterministic sequence `(31·s + 7·t + t²) mod vocab`, `t = 0..=seq`.
fn loss<B: Backend>(
    model: &Gpt2LMHeadModel<B>,
    c: &Setup,
    samples: Range<usize>,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (b, seq, vocab) = (samples.len(), c.seq, c.vocab);
    let tokens: Vec<i64> = samples
        .flat_map(|s| (0..=seq).map(move |t| ((s * 31 + t * 7 + t * t) % vocab) as i64))
        .collect();
    lm_loss(model, tokens, b, seq, device)
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
fn probe_collectives(setup: &Setup, groups: &[usize]) -> anyhow::Result<Vec<CollectiveProbe>> {
    let mut probes = Vec::new();
    for &n in groups.iter().filter(|&&n| n > 1) {
        for &elems in &setup.message_elems {
            let elems = elems.div_ceil(n) * n;
            for kind in [
                Collective::AllGather,
                Collective::ReduceScatter,
                Collective::AllReduce,
            ] {
                let reps = setup.probe_reps;
                let results = ThreadsEngine::new(n).run(|c| {
                    let mut times = Vec::with_capacity(reps);
                    for rep in 0..reps + 1 {
                        c.barrier().wait().expect("barrier");
                        let t = Instant::now();
                        match kind {
                            Collective::AllGather => {
                                drop(c.all_gather(vec![1f32; elems / n]).wait())
                            }
                            Collective::ReduceScatter => {
                                drop(c.reduce_scatter(vec![1f32; elems], ReduceOp::Sum).wait())
                            }
                            Collective::AllReduce => {
                                drop(c.all_reduce(vec![1f32; elems], ReduceOp::Sum).wait())
                            }
                        }
                        if rep > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    times
                })?;
                probes.push(CollectiveProbe {
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

/// Matmul GFLOP/s and element-wise GB/s of one thread while `ranks` threads
/// run the same work at once on NdArray, at the model's matmul shapes (one
/// forward pass worth: c_attn (q, k, v), c_proj, c_fc, mlp c_proj per layer,
/// the output head).
fn probe_shared(setup: &Setup, ranks: usize) -> anyhow::Result<SharedThroughput> {
    type B = NdArray;
    let (t, h, f, v) = (
        setup.batch * setup.seq,
        setup.hidden,
        4 * setup.hidden,
        setup.vocab,
    );
    let mut shapes = Vec::new();
    for _ in 0..setup.layers {
        shapes.push((t, h, 3 * h));
        shapes.push((t, h, h));
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
    Ok(SharedThroughput {
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
                    let mut model = Gpt2LMHeadModel::<B>::init(&setup.gpt_config(), &device);
                    let mut optim = AdamWConfig::new().init::<B, Gpt2LMHeadModel<B>>();
                    let mut times = Vec::new();
                    for step in 0..setup.warmup + setup.steps {
                        barrier.wait();
                        let start = Instant::now();
                        let at = (step * ranks + rank) * setup.batch;
                        let loss = loss(&model, setup, at..at + setup.batch, &device);
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

/// One rank's run of a configuration.
struct RankRun {
    /// Seconds of each timed step.
    step_s: Vec<f64>,
    /// Parameter gathers per timed step (the backend's counter).
    gathers_per_step: f64,
}

/// A configuration as it ran.
struct Measured {
    /// Median step time of the slowest rank, s.
    step_s: f64,
    /// Gathers per step on rank 0.
    gathers_per_step: f64,
}

/// Runs (N, p, s) for real.
fn run_config(setup: &Setup, n: usize, p: usize, s: usize) -> anyhow::Result<Measured> {
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
            Gpt2LMHeadModel::<B>::init(&setup.gpt_config(), &device),
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
                let loss = loss(&model, setup, at..at + setup.batch, &device);
                optim.accumulate(&model, loss.backward());
            }
            model = optim.step(1e-3, model);
            if step >= setup.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        RankRun {
            step_s: times,
            gathers_per_step: (runtime.counters().gathers - gathers) as f64 / setup.steps as f64,
        }
    })?;
    let gathers_per_step = results
        .first()
        .and_then(|r| r.as_ref().ok())
        .map_or(0.0, |r| r.gathers_per_step);
    let times = slowest(results.into_iter().map(|r| r.map(|r| r.step_s)).collect())?;
    Ok(Measured {
        step_s: median(times),
        gathers_per_step,
    })
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
        let measured = run_config(setup, n, p, s)?;
        rows.push(Row {
            n,
            p,
            s,
            predicted_matmul_s: raw.step_time_s,
            predicted_s: estimate.step_time_s,
            predicted_compute_s: estimate.compute_time_s,
            measured_s: measured.step_s,
            ratio: measured.step_s / estimate.step_time_s,
            gathers_per_step: measured.gathers_per_step,
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
        "calibration model: GPT-2, hidden {}, {} layers, {} heads, vocab {}, seq {}, micro-batch {} per rank ({} parameters, fp32, AdamW)\n",
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
}
