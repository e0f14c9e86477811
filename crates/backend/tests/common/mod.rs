//! Parity harness: the same training, once in one process on plain
//! `Autodiff<NdArray>` and once on `Autodiff<Mics<NdArray>>` over the threads
//! engine, on the same global batches.
#![allow(dead_code)]

pub mod tasks;

use std::ops::Range;
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer, SimpleOptimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use mics_backend::{
    Counters, Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, gather_module,
    shard_module,
};
use mics_comm::{CollectiveKind, Collectives, CommStats, Communicator, MicsGroups, ReduceOp};
use mics_comm::{ThreadsEngine, Topology};
use mics_plain::Plain;

/// The one-process reference backend: plain Burn on NdArray, through
/// `Plain` (a pass-through that is not `Mics`, so the reference does not run
/// through the code under test), because Burn's `distributed` autodiff
/// feature, on with `early-reduce`, excludes plain NdArray.
pub type Ref = Autodiff<Plain<NdArray>>;
/// The inner backend of [`Ref`].
pub type RefInner = <Ref as burn::tensor::backend::AutodiffBackend>::InnerBackend;
pub type Dist = Autodiff<Mics<NdArray>>;

/// A model and its loss on a range of sample indices (the loss is the mean
/// over those samples).
pub trait Task: Sync {
    type Model<B: AutodiffBackend>: AutodiffModule<B>;
    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Self::Model<B>;
    fn loss<B: AutodiffBackend>(
        &self,
        model: &Self::Model<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1>;
}

/// Deterministic parameter values, independent of any RNG or backend.
pub struct DetInit(pub usize);

impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for DetInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let c = self.0 as f32;
        self.0 += 1;
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|i| (i as f32 * 0.731 + c * 1.37).sin() * 0.4)
            .collect();
        let mut t = Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device());
        if tensor.is_require_grad() {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

struct Values(Vec<Vec<f32>>);

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0
            .push(param.val().into_data().convert::<f32>().into_vec().unwrap());
    }
}

pub fn param_values<B: burn::tensor::backend::Backend, M: Module<B>>(m: &M) -> Vec<Vec<f32>> {
    let mut v = Values(Vec::new());
    m.visit(&mut v);
    v.0
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub n: usize,
    pub k: usize,
    pub p: usize,
    pub s: usize,
    pub b: usize,
    pub steps: usize,
}

pub struct Run {
    pub losses: Vec<f32>,
    pub params: Vec<Vec<f32>>,
}

pub fn optimizer_config() -> AdamWConfig {
    AdamWConfig::new().with_weight_decay(0.01)
}

pub const LR: f64 = 1e-2;

/// One process, global batch N*b*s per step, Burn's AdamW, optional global
/// norm clipping applied to the gradients before the step.
pub fn reference<T: Task>(task: &T, c: Config, clip: Option<f32>) -> Run {
    let optim = optimizer_config().init::<Ref, T::Model<Ref>>();
    reference_with(task, c, clip, optim)
}

/// [`reference`] with another of Burn's optimizers.
pub fn reference_with<T: Task, O: Optimizer<T::Model<Ref>, Ref>>(
    task: &T,
    c: Config,
    clip: Option<f32>,
    mut optim: O,
) -> Run {
    let device = Default::default();
    let mut model = task.init::<Ref>(&device).map(&mut DetInit(0));
    let global = c.n * c.b * c.s;
    let mut losses = Vec::new();
    for step in 0..c.steps {
        let loss = task.loss(&model, step * global..(step + 1) * global, &device);
        losses.push(loss.clone().into_scalar());
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        if let Some(max) = clip {
            grads = clip_global(grads, &model, max);
        }
        model = optim.step(LR, model, grads);
    }
    Run {
        losses,
        params: param_values(&model),
    }
}

fn clip_global<M: AutodiffModule<Ref>>(
    mut grads: GradientsParams,
    model: &M,
    max: f32,
) -> GradientsParams {
    struct Ids(Vec<(burn::module::ParamId, usize)>);
    impl ModuleVisitor<Ref> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ref, D>>) {
            self.0.push((param.id, D));
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    fn sq<const D: usize>(g: &GradientsParams, id: burn::module::ParamId) -> f64 {
        g.get::<RefInner, D>(id)
            .map(|t| {
                t.into_data()
                    .into_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum()
            })
            .unwrap_or(0.0)
    }
    fn scale<const D: usize>(g: &mut GradientsParams, id: burn::module::ParamId, c: f32) {
        if let Some(t) = g.remove::<RefInner, D>(id) {
            g.register::<RefInner, D>(id, t.mul_scalar(c));
        }
    }
    let total: f64 = ids
        .0
        .iter()
        .map(|&(id, d)| match d {
            1 => sq::<1>(&grads, id),
            2 => sq::<2>(&grads, id),
            3 => sq::<3>(&grads, id),
            _ => unreachable!(),
        })
        .sum();
    let norm = (total as f32).sqrt();
    let coef = (max / (norm + f32::MIN_POSITIVE)).min(1.0);
    if coef < 1.0 {
        for &(id, d) in &ids.0 {
            match d {
                1 => scale::<1>(&mut grads, id, coef),
                2 => scale::<2>(&mut grads, id, coef),
                3 => scale::<3>(&mut grads, id, coef),
                _ => unreachable!(),
            }
        }
    }
    grads
}

/// What one rank of a distributed run saw.
pub struct RankRun {
    pub run: Run,
    pub counters: Counters,
    /// Partition and replication collective counts after each optimizer step.
    pub partition_stats: Vec<CommStats>,
    pub replication_stats: Vec<CommStats>,
}

/// The same training on `Autodiff<Mics<NdArray>>`: rank r's micro-step m of
/// step t takes samples `t*G + (m*N + r)*b ..` with b samples.
pub fn distributed<T: Task>(
    task: &T,
    c: Config,
    clip: Option<f32>,
    prefetch: PrefetchConfig,
) -> Vec<RankRun> {
    distributed_with(task, c, clip, prefetch, |runtime| {
        ShardedOptimizer::adamw(&optimizer_config(), runtime)
    })
}

/// [`distributed`] with another sharded optimizer.
pub fn distributed_with<T: Task, O: SimpleOptimizer<NdArray>>(
    task: &T,
    c: Config,
    clip: Option<f32>,
    prefetch: PrefetchConfig,
    make_optim: impl Fn(&Arc<MicsRuntime>) -> ShardedOptimizer<NdArray, O> + Sync,
) -> Vec<RankRun> {
    ThreadsEngine::new(c.n)
        .ranks_per_node(c.k)
        .run(|world| rank_run(task, c, clip, prefetch, &make_optim, Arc::new(world)))
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// One rank's part of [`distributed_with`], on any engine's world
/// communicator (the threads engine here, MPI in `examples/mpi_parity.rs`).
/// The world must have `c.n` ranks laid out `c.k` per node.
pub fn rank_run<T: Task, O: SimpleOptimizer<NdArray>>(
    task: &T,
    c: Config,
    clip: Option<f32>,
    prefetch: PrefetchConfig,
    make_optim: impl Fn(&Arc<MicsRuntime>) -> ShardedOptimizer<NdArray, O>,
    world: Arc<dyn Communicator>,
) -> RankRun {
    assert_eq!(world.size(), c.n, "world size");
    let topology = Topology::new(c.n, c.k, c.p).unwrap();
    let groups = MicsGroups::new(world.clone(), topology).unwrap();
    let runtime = MicsRuntime::with_prefetch(groups, prefetch);
    let device = Default::default();
    let model = task.init::<Dist>(&device).map(&mut DetInit(0));
    let mut model = shard_module(model, &runtime, ShardInit::Identical);
    let mut optim = make_optim(&runtime);
    if let Some(max) = clip {
        optim = optim.with_grad_clip_norm(max);
    }
    let global = c.n * c.b * c.s;
    let rank = world.rank();
    let mut losses = Vec::new();
    let mut partition_stats = Vec::new();
    let mut replication_stats = Vec::new();
    for step in 0..c.steps {
        runtime.begin_step();
        let mut loss_sum = 0.0f32;
        for m in 0..c.s {
            let start = step * global + (m * c.n + rank) * c.b;
            let loss = task.loss(&model, start..start + c.b, &device);
            loss_sum += loss.clone().into_scalar();
            optim.accumulate(&model, loss.backward());
        }
        model = optim.step(LR, model);
        partition_stats.push(runtime.groups().partition().stats());
        replication_stats.push(runtime.groups().replication().stats());
        let total = world
            .all_reduce(vec![loss_sum], ReduceOp::Sum)
            .wait()
            .unwrap();
        losses.push(total[0] / (c.n * c.s) as f32);
    }
    let counters = runtime.counters();
    let plain = gather_module(model);
    RankRun {
        run: Run {
            losses,
            params: param_values(&plain),
        },
        counters,
        partition_stats,
        replication_stats,
    }
}

/// max |a - b| / max |b|, per tensor.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Compare every loss and every final parameter of every rank with the
/// reference; returns the worst relative error.
pub fn assert_parity(reference: &Run, ranks: &[RankRun], tol: f32) -> f32 {
    let mut worst = 0f32;
    for (r, rank) in ranks.iter().enumerate() {
        for (step, (a, b)) in rank.run.losses.iter().zip(&reference.losses).enumerate() {
            let e = (a - b).abs() / b.abs();
            assert!(e <= tol, "rank {r} step {step}: loss {a} vs {b} (rel {e})");
            worst = worst.max(e);
        }
        assert_eq!(rank.run.params.len(), reference.params.len());
        for (i, (a, b)) in rank.run.params.iter().zip(&reference.params).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= tol, "rank {r} param {i}: rel err {e}");
            worst = worst.max(e);
        }
    }
    worst
}

/// Reduce-scatters = buckets × s per step, replication all-reduces = buckets
/// per step, plus one on the first step, whose flags of which parameters
/// had a gradient travel alone (later steps carry them in the last bucket);
/// +1 partition all-reduce per step for the clipping norm; a group of one
/// rank issues no collective.
pub fn assert_collective_counts(ranks: &[RankRun], buckets: usize, c: Config, clip: bool) {
    for (r, rank) in ranks.iter().enumerate() {
        for (step, (ps, rs)) in rank
            .partition_stats
            .iter()
            .zip(&rank.replication_stats)
            .enumerate()
        {
            let steps = (step + 1) as u64;
            assert_eq!(
                ps.calls(CollectiveKind::ReduceScatter),
                if c.p > 1 {
                    steps * (buckets * c.s) as u64
                } else {
                    0
                },
                "rank {r} step {step}: partition reduce-scatters"
            );
            assert_eq!(
                rs.calls(CollectiveKind::AllReduce),
                if c.n > c.p {
                    steps * buckets as u64 + 1
                } else {
                    0
                },
                "rank {r} step {step}: replication all-reduces"
            );
            assert_eq!(
                ps.calls(CollectiveKind::AllReduce),
                if clip { steps } else { 0 },
                "rank {r} step {step}: partition all-reduces (clipping norm)"
            );
        }
    }
}
