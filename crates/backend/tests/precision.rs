//! Mixed precision: parameters gathered and gradients reduced in bf16
//! (shards, accumulation and AdamW in f32), and loss scaling.
//!
//! Tolerances: bf16 keeps 8 significant bits, a relative spacing of 2^-8 ≈
//! 3.9e-3 (rounding error ≤ 2^-9 ≈ 2e-3). Every use of a weight sees it
//! rounded, and every gradient is rounded at least twice (before the
//! reduce-scatter and before the replication all-reduce, plus the rounding
//! of each sum). The loss is a smooth function of the weights, so through
//! the few layers of these models its relative change stays within a few
//! roundings: [`LOSS_TOL`] = 1e-2 ≈ 2.5 × 2^-8 (worst measured 2.1e-3, MLP
//! at (1,1,1,1); the test prints each). Parameters are compared per tensor
//! (max |Δ| / max |value|) with [`PARAM_TOL`] = 5e-2 under AdamW, which
//! normalises each update to about `lr` = 1e-2 whatever the gradient's
//! size, so a gradient near zero whose sign a rounding flips moves its
//! parameter up to 2·lr the other way per step: no bound follows from the
//! rounding there. The parameter bound derived from bf16's rounding is
//! checked under SGD, whose update is linear in the gradient (test (e)).
//! The tests also require bf16 results to differ from f32 ones, so bf16
//! being silently ignored is caught.

mod common;

use std::ops::Range;
use std::sync::Arc;

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer, SgdConfig, SimpleOptimizer};
use burn::tensor::Tensor;
use common::tasks::{GptTask, MlpTask};
use common::*;
use mics_backend::{
    Counters, LossScale, MicsRuntime, Precision, PrefetchConfig, ShardInit, ShardedOptimizer,
    gather_module, shard_module,
};
use mics_comm::{
    CollectiveKind, Collectives, CommStats, Communicator, DType, MicsGroups, ReduceOp,
    ThreadsEngine, Topology,
};

/// Relative loss difference allowed in bf16 (see the module docs).
const LOSS_TOL: f32 = 1e-2;
/// Per-tensor relative parameter error allowed in bf16 (see the module docs).
const PARAM_TOL: f32 = 5e-2;

struct Opts {
    precision: Precision,
    prefetch: PrefetchConfig,
    loss_scale: LossScale,
    /// Step at which rank 0 multiplies its loss by infinity.
    inject_inf_at: Option<usize>,
}

impl Opts {
    fn new(precision: Precision) -> Opts {
        Opts {
            precision,
            prefetch: PrefetchConfig::disabled(),
            loss_scale: LossScale::None,
            inject_inf_at: None,
        }
    }
}

struct Out {
    losses: Vec<f32>,
    params: Vec<Vec<f32>>,
    /// The loss scale after each step, and whether the step was skipped.
    scales: Vec<f32>,
    skipped: Vec<bool>,
    /// This rank's shards after each step.
    shards: Vec<Vec<Vec<f32>>>,
    counters: Counters,
    partition: CommStats,
    replication: CommStats,
}

fn rank_run<T: Task>(task: &T, c: Config, o: &Opts, world: Arc<dyn Communicator>) -> Out {
    rank_run_with(task, c, o, world, |runtime| {
        ShardedOptimizer::adamw(&optimizer_config(), runtime)
    })
}

fn rank_run_with<T: Task, O: SimpleOptimizer<NdArray>>(
    task: &T,
    c: Config,
    o: &Opts,
    world: Arc<dyn Communicator>,
    make_optim: impl Fn(&Arc<MicsRuntime>) -> ShardedOptimizer<NdArray, O>,
) -> Out {
    let topology = Topology::new(c.n, c.k, c.p).unwrap();
    let groups = MicsGroups::new(world.clone(), topology).unwrap();
    let runtime = MicsRuntime::with_precision(groups, o.prefetch, o.precision);
    let device = Default::default();
    let model = task.init::<Dist>(&device).map(&mut DetInit(0));
    let mut model = shard_module(model, &runtime, ShardInit::Identical);
    let mut optim = make_optim(&runtime).with_loss_scale(o.loss_scale);
    let global = c.n * c.b * c.s;
    let rank = world.rank();
    let mut out = Out {
        losses: Vec::new(),
        params: Vec::new(),
        scales: Vec::new(),
        skipped: Vec::new(),
        shards: Vec::new(),
        counters: Counters::default(),
        partition: CommStats::default(),
        replication: CommStats::default(),
    };
    for step in 0..c.steps {
        runtime.begin_step();
        let mut loss_sum = 0.0f32;
        for m in 0..c.s {
            let start = step * global + (m * c.n + rank) * c.b;
            let samples: Range<usize> = start..start + c.b;
            let loss = task.loss(&model, samples, &device);
            loss_sum += loss.clone().into_scalar();
            let mut scaled = loss * optim.loss_scale();
            if o.inject_inf_at == Some(step) && rank == 0 {
                scaled = scaled * f32::INFINITY;
            }
            optim.accumulate(&model, scaled.backward());
        }
        model = optim.step(LR, model);
        out.scales.push(optim.loss_scale());
        out.skipped.push(optim.last_step_skipped());
        let state = optim.export_state(&model).unwrap();
        out.shards
            .push(state.into_iter().map(|s| s.shard).collect());
        let total = world
            .all_reduce(vec![loss_sum], ReduceOp::Sum)
            .wait()
            .unwrap();
        out.losses.push(total[0] / (c.n * c.s) as f32);
    }
    out.counters = runtime.counters();
    out.partition = runtime.groups().partition().stats();
    out.replication = runtime.groups().replication().stats();
    out.params = param_values(&gather_module(model));
    out
}

fn run<T: Task>(task: &T, c: Config, o: &Opts) -> Vec<Out> {
    ThreadsEngine::new(c.n)
        .ranks_per_node(c.k)
        .run(|world| rank_run(task, c, o, Arc::new(world)))
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

fn cfg(n: usize, k: usize, p: usize, s: usize) -> Config {
    Config {
        n,
        k,
        p,
        s,
        b: 2,
        steps: 5,
    }
}

/// The worst relative loss difference and parameter error of every rank
/// against `reference`.
fn worst(reference: &Run, ranks: &[Out]) -> (f32, f32) {
    let mut loss = 0f32;
    let mut param = 0f32;
    for rank in ranks {
        for (a, b) in rank.losses.iter().zip(&reference.losses) {
            loss = loss.max((a - b).abs() / b.abs());
        }
        for (a, b) in rank.params.iter().zip(&reference.params) {
            param = param.max(rel_err(a, b));
        }
    }
    (loss, param)
}

/// (a) bf16 gathers and reductions train like f32 within bf16 tolerance,
/// and not bit-identically.
#[test]
fn bf16_training_is_close_to_fp32_and_not_identical() {
    fn check<T: Task>(task: &T, name: &str) {
        for c in [cfg(1, 1, 1, 1), cfg(4, 2, 2, 2), cfg(4, 2, 4, 1)] {
            let reference = reference(task, c, None);
            let fp32 = run(task, c, &Opts::new(Precision::FP32));
            let bf16 = run(task, c, &Opts::new(Precision::BF16));
            let (loss32, param32) = worst(&reference, &fp32);
            assert!(loss32 <= 1e-5 && param32 <= 1e-5, "{loss32} {param32}");
            let (loss, param) = worst(&reference, &bf16);
            eprintln!(
                "{name} {c:?} bf16 vs f32: worst relative loss difference {loss:e}, \
                 parameter error {param:e}"
            );
            assert!(loss <= LOSS_TOL, "{name} {c:?}: loss differs by {loss}");
            assert!(
                param <= PARAM_TOL,
                "{name} {c:?}: parameters differ by {param}"
            );
            for (a, b) in bf16.iter().zip(&fp32) {
                assert_ne!(a.losses, b.losses, "{name} {c:?}: bf16 had no effect");
                assert_ne!(a.params, b.params, "{name} {c:?}: bf16 had no effect");
            }
            // Different roundings give different results: gather alone and
            // reduce alone each change the training.
            for precision in [
                Precision::new(DType::Bf16, DType::F32),
                Precision::new(DType::F32, DType::Bf16),
            ] {
                let one = run(task, c, &Opts::new(precision));
                assert_ne!(one[0].losses, fp32[0].losses, "{precision:?} had no effect");
                assert_ne!(one[0].params, bf16[0].params, "{precision:?}");
            }
        }
    }
    check(&MlpTask, "mlp");
    check(&GptTask, "transformer");
}

fn bytes(stats: &CommStats, kind: CollectiveKind) -> u64 {
    let k = stats.kind(kind);
    k.intra_node_bytes + k.inter_node_bytes
}

/// (b) bf16 halves the bytes the collectives move.
#[test]
fn bf16_halves_gathered_and_reduced_bytes() {
    for c in [cfg(4, 4, 2, 2), cfg(8, 2, 4, 1)] {
        let fp32 = run(&GptTask, c, &Opts::new(Precision::FP32));
        let bf16 = run(&GptTask, c, &Opts::new(Precision::BF16));
        for (a, b) in fp32.iter().zip(&bf16) {
            let (ka, kb) = (a.counters, b.counters);
            assert_eq!(ka.bytes_gathered, kb.bytes_gathered);
            assert_eq!(ka.bytes_gathered_wire, ka.bytes_gathered);
            assert_eq!(2 * kb.bytes_gathered_wire, ka.bytes_gathered_wire);
            if c.p <= c.k {
                // A flat gather: the partition group's all-gathers.
                let (ga, gb) = (
                    bytes(&a.partition, CollectiveKind::AllGather),
                    bytes(&b.partition, CollectiveKind::AllGather),
                );
                assert!(ga > 0);
                assert_eq!(2 * gb, ga, "all-gather bytes");
            }
            let (ra, rb) = (
                bytes(&a.partition, CollectiveKind::ReduceScatter),
                bytes(&b.partition, CollectiveKind::ReduceScatter),
            );
            assert!(ra > 0);
            assert_eq!(2 * rb, ra, "reduce-scatter bytes");
            let (aa, ab) = (
                bytes(&a.replication, CollectiveKind::AllReduce),
                bytes(&b.replication, CollectiveKind::AllReduce),
            );
            assert!(aa > 0);
            // 2(r-1)/r of the message, rounded down per call.
            let calls = a.replication.calls(CollectiveKind::AllReduce);
            assert!(
                2 * ab <= aa && aa - 2 * ab <= 2 * calls,
                "all-reduce bytes {ab} vs {aa}"
            );
        }
        let (a, b) = (&fp32[0], &bf16[0]);
        eprintln!(
            "{c:?}: gathered bytes on the wire f32 {} bf16 {}; reduce-scatter {} / {}; \
             all-reduce {} / {}",
            a.counters.bytes_gathered_wire,
            b.counters.bytes_gathered_wire,
            bytes(&a.partition, CollectiveKind::ReduceScatter),
            bytes(&b.partition, CollectiveKind::ReduceScatter),
            bytes(&a.replication, CollectiveKind::AllReduce),
            bytes(&b.replication, CollectiveKind::AllReduce),
        );
    }
}

/// (c) Topologies agree in bf16: (N, p) = (4, 2) over two nodes, with
/// coalesced prefetched gathers and without, against one process on the
/// same global batch.
#[test]
fn bf16_parity_across_topologies() {
    fn check<T: Task>(task: &T, name: &str) {
        let one = Config {
            b: 8,
            ..cfg(1, 1, 1, 1)
        };
        let four = cfg(4, 2, 2, 1);
        let single = run(task, one, &Opts::new(Precision::BF16));
        let on_demand = run(task, four, &Opts::new(Precision::BF16));
        let prefetched = run(
            task,
            four,
            &Opts {
                prefetch: PrefetchConfig::new(4, 1 << 20),
                ..Opts::new(Precision::BF16)
            },
        );
        let reference = Run {
            losses: single[0].losses.clone(),
            params: single[0].params.clone(),
        };
        let (loss, param) = worst(&reference, &on_demand);
        eprintln!("{name} bf16 (4,2) vs (1,1): loss {loss:e}, parameters {param:e}");
        assert!(loss <= LOSS_TOL, "{name}: loss differs by {loss}");
        assert!(param <= PARAM_TOL, "{name}: parameters differ by {param}");
        // Rounding is per element, so a coalesced gather is still exact.
        for (a, b) in on_demand.iter().zip(&prefetched) {
            assert_eq!(a.losses, b.losses);
            assert_eq!(a.params, b.params);
            assert!(b.counters.prefetch_hits > 0);
        }
    }
    check(&MlpTask, "mlp");
    check(&GptTask, "transformer");
}

/// (d) Dynamic loss scaling: an inf gradient on one rank skips the step on
/// every rank (shards unchanged) and halves the scale; good steps double it.
#[test]
fn dynamic_loss_scale_skips_overflowed_step_and_halves() {
    let c = cfg(4, 2, 2, 1);
    let opts = Opts {
        loss_scale: LossScale::Dynamic {
            initial: 1024.0,
            growth_interval: 2,
        },
        inject_inf_at: Some(2),
        ..Opts::new(Precision::FP16)
    };
    let ranks = run(&MlpTask, c, &opts);
    for rank in &ranks {
        // Doubles after steps 0 and 1, halves at the skipped step 2, doubles
        // again after steps 3 and 4.
        assert_eq!(rank.scales, [1024.0, 2048.0, 1024.0, 1024.0, 2048.0]);
        assert_eq!(rank.skipped, [false, false, true, false, false]);
        assert_eq!(
            rank.shards[2], rank.shards[1],
            "the skipped step changed the shards"
        );
        assert_ne!(rank.shards[3], rank.shards[2]);
        assert!(rank.params.iter().flatten().all(|x| x.is_finite()));
    }
}

/// Loss scales that are powers of two are exact in f32: training with a
/// static or (overflow-free) dynamic scale is bit-identical to none.
#[test]
fn power_of_two_loss_scale_is_exact() {
    let c = cfg(4, 2, 2, 2);
    let plain = run(&GptTask, c, &Opts::new(Precision::FP32));
    for loss_scale in [LossScale::Static(1024.0), LossScale::dynamic()] {
        let scaled = run(
            &GptTask,
            c,
            &Opts {
                loss_scale,
                ..Opts::new(Precision::FP32)
            },
        );
        for (a, b) in plain.iter().zip(&scaled) {
            assert_eq!(a.losses, b.losses, "{loss_scale:?}");
            assert_eq!(a.params, b.params, "{loss_scale:?}");
            assert!(b.skipped.iter().all(|s| !s));
        }
    }
}

/// bf16 unit roundoff: half the spacing of bf16's 8 significant bits.
const BF16_ROUNDOFF: f32 = 1.0 / 512.0;

/// Roundings of a gradient on its way to the optimizer, each relative to
/// the largest gradient a rank contributes: the full gradient before the
/// reduce-scatter, the reduce-scatter's sum, the accumulated shard before
/// the all-reduce and the all-reduce's sum; one more for the f32 sums'
/// own error, far smaller.
const GRADIENT_ROUNDINGS: f32 = 5.0;

/// Rounds every parameter to bf16, keeping its id: the weights a bf16
/// gather hands to compute.
struct RoundBf16;

impl<B: burn::tensor::backend::Backend> burn::module::ModuleMapper<B> for RoundBf16 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let values: Vec<f32> = tensor
            .clone()
            .into_data()
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| burn::tensor::bf16::from_f32(x).to_f32())
            .collect();
        let mut t = Tensor::<B, D>::from_data(
            burn::tensor::TensorData::new(values, shape),
            &tensor.device(),
        );
        if tensor.is_require_grad() {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// The one-process f32 SGD reference of bf16 training's compute: f32 master
/// weights, each forward and backward on the weights rounded to bf16 (as
/// a bf16 gather hands them over), gradients and updates in f32. Also the
/// largest |gradient| any rank's micro-batch contributes, per step and
/// parameter tensor.
fn sgd_reference<T: Task>(task: &T, c: Config) -> (Vec<Vec<f32>>, Run) {
    struct MaxAbs<'a>(&'a GradientsParams, Vec<f32>);
    impl ModuleVisitor<Ref> for MaxAbs<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ref, D>>) {
            let g = self.0.get::<RefInner, D>(param.id).map_or(0.0, |g| {
                g.into_data()
                    .into_vec::<f32>()
                    .unwrap()
                    .iter()
                    .fold(0f32, |m, x| m.max(x.abs()))
            });
            self.1.push(g);
        }
    }
    let device = Default::default();
    let mut model = task.init::<Ref>(&device).map(&mut DetInit(0));
    let mut optim = SgdConfig::new().init::<Ref, T::Model<Ref>>();
    let global = c.n * c.b * c.s;
    let mut grads_max = Vec::new();
    let mut losses = Vec::new();
    for step in 0..c.steps {
        let rounded = model.clone().map(&mut RoundBf16);
        // The largest gradient of any rank's micro-batch (the roundings
        // apply to those before they are summed).
        let mut step_max: Vec<f32> = Vec::new();
        for slice in 0..c.n * c.s {
            let start = step * global + slice * c.b;
            let loss = task.loss(&rounded, start..start + c.b, &device);
            let grads = GradientsParams::from_grads(loss.backward(), &rounded);
            let mut visit = MaxAbs(&grads, Vec::new());
            rounded.visit(&mut visit);
            if step_max.is_empty() {
                step_max = visit.1;
            } else {
                step_max
                    .iter_mut()
                    .zip(visit.1)
                    .for_each(|(m, g)| *m = m.max(g));
            }
        }
        grads_max.push(step_max);
        let loss = task.loss(&rounded, step * global..(step + 1) * global, &device);
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &rounded);
        model = optim.step(LR, model, grads);
    }
    let run = Run {
        losses,
        params: param_values(&model),
    };
    (grads_max, run)
}

/// (e) Against a reference that computes on the same bf16-rounded weights,
/// what remains is the rounding of the gradients on the wire. With SGD an
/// update is `lr` times the gradient, so after T steps every parameter is
/// within lr · Σ_t GRADIENT_ROUNDINGS · 2^-9 · max|g_t| of the reference
/// (per tensor, max|g_t| the largest gradient a rank contributes). AdamW
/// normalises each update to about `lr` whatever the gradient's size, so a
/// rounding that flips a tiny gradient's sign moves its parameter by up to
/// 2·lr: no such bound holds there, and the AdamW tests above compare losses
/// and require a change.
#[test]
fn bf16_sgd_parameters_are_within_the_rounding_bound() {
    fn check<T: Task>(task: &T, name: &str) {
        for c in [cfg(1, 1, 1, 1), cfg(4, 2, 2, 2), cfg(4, 2, 4, 1)] {
            let (grads_max, reference) = sgd_reference(task, c);
            let bf16 = ThreadsEngine::new(c.n)
                .ranks_per_node(c.k)
                .run(|world| {
                    rank_run_with(
                        task,
                        c,
                        &Opts::new(Precision::BF16),
                        Arc::new(world),
                        |rt| ShardedOptimizer::sgd(&SgdConfig::new(), rt),
                    )
                })
                .unwrap()
                .into_iter()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>();
            let mut worst_ratio = 0f32;
            for rank in &bf16 {
                for (i, (a, b)) in rank.params.iter().zip(&reference.params).enumerate() {
                    let bound: f32 = LR as f32
                        * GRADIENT_ROUNDINGS
                        * BF16_ROUNDOFF
                        * grads_max.iter().map(|g| g[i]).sum::<f32>();
                    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        diff <= bound,
                        "{name} {c:?} param {i}: |Δ| {diff:e} above the rounding bound {bound:e}"
                    );
                    if bound > 0.0 {
                        worst_ratio = worst_ratio.max(diff / bound);
                    }
                }
            }
            // The gradient roundings did happen (unless the group is one
            // rank, where only the gather rounds).
            if c.n > 1 {
                assert!(worst_ratio > 0.0, "{name} {c:?}: no difference at all");
            }
            eprintln!("{name} {c:?}: bf16 SGD parameters at most {worst_ratio:.2} of the bound");
        }
    }
    check(&MlpTask, "mlp");
    check(&GptTask, "transformer");
}
