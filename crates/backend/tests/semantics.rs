//! What the sharded optimizer updates, and when a prefetched gather may be
//! used: the rules of Burn's optimizers and of PyTorch, proven against a
//! one-process reference that does not run through `Mics`.
//!
//! - A frozen parameter (`require_grad` off) and a parameter the model never
//!   uses stay bit-identical, have no optimizer state, and move no zeros.
//! - A parameter used by some partition groups only (data-dependent use) is
//!   reduced with zeros from the others and matches the reference, also when
//!   its use starts, stops and starts again between steps.
//! - A prefetched gather is used only if it was gathered from the very value
//!   the op uses: a forward right after `step()` without `begin_step()`, and
//!   two copies of a module, each see their own values.
//! - Ranks whose op order differs (equal lengths) fail on every rank.

mod common;

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Gelu, Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::{DetInit, Dist, LR, Ref, optimizer_config, param_values, rel_err};
use mics_backend::{
    MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, gather_module, shard_module,
};
use mics_comm::{
    CollectiveKind, Collectives, CommStats, Communicator, MicsGroups, ReduceOp, ThreadsEngine,
    Topology,
};

const IN: usize = 7;
const HIDDEN: usize = 13;
const OUT: usize = 5;
const B: usize = 2;

/// A model with a frozen layer, a layer it never uses (like BERT's pooler
/// under the MLM head) and a bias it adds only on some micro-batches.
#[derive(Module, Debug)]
struct Gated<B: Backend> {
    a: Linear<B>,
    frozen: Linear<B>,
    unused: Linear<B>,
    extra: Param<Tensor<B, 1>>,
    b: Linear<B>,
    act: Gelu,
}

impl<B: AutodiffBackend> Gated<B> {
    fn new(device: &B::Device, freeze_unused: bool) -> Self {
        let model = Gated {
            a: LinearConfig::new(IN, HIDDEN).init(device),
            frozen: LinearConfig::new(HIDDEN, HIDDEN).init(device),
            unused: LinearConfig::new(HIDDEN, 3).init(device),
            extra: Param::from_tensor(Tensor::zeros([HIDDEN], device)),
            b: LinearConfig::new(HIDDEN, OUT).init(device),
            act: Gelu::new(),
        }
        .map(&mut DetInit(0));
        let unused = if freeze_unused {
            model.unused.no_grad()
        } else {
            model.unused
        };
        Gated {
            frozen: model.frozen.no_grad(),
            unused,
            ..model
        }
    }

    /// Mean squared error over samples `first..first + B`, adding `extra`
    /// when `use_extra`.
    fn loss(&self, first: usize, use_extra: bool, device: &B::Device) -> Tensor<B, 1> {
        let x: Vec<f32> = (first..first + B)
            .flat_map(|s| (0..IN).map(move |i| ((s * IN + i) as f32 * 0.37).cos()))
            .collect();
        let y: Vec<f32> = (first..first + B)
            .flat_map(|s| (0..OUT).map(move |i| ((s * 3 + i) as f32 * 0.11).sin()))
            .collect();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x, [B, IN]), device);
        let y = Tensor::<B, 2>::from_data(TensorData::new(y, [B, OUT]), device);
        let mut h = self.frozen.forward(self.act.forward(self.a.forward(x)));
        if use_extra {
            h = h + self.extra.val().unsqueeze::<2>();
        }
        (self.b.forward(h) - y).powi_scalar(2).mean()
    }
}

/// The parameters in module order: a.w, a.b, frozen.w, frozen.b,
/// unused.w, unused.b, extra, b.w, b.b.
const FROZEN: [usize; 2] = [2, 3];
const UNUSED: [usize; 2] = [4, 5];

#[derive(Debug, Clone, Copy)]
struct Run {
    n: usize,
    k: usize,
    p: usize,
    s: usize,
    steps: usize,
}

/// Whether micro-batch `m` of rank `r` at `step` uses `extra`: only the odd
/// partition groups, and only at steps 1 and 3 (so its use starts, stops
/// and starts again).
fn uses_extra(run: Run, step: usize, rank: usize) -> bool {
    (rank / run.p) % 2 == 1 && (step == 1 || step == 3)
}

fn first_sample(run: Run, step: usize, m: usize, rank: usize) -> usize {
    step * run.n * run.s * B + (m * run.n + rank) * B
}

/// One process: every (micro-batch, rank) slice of the global batch in turn,
/// the loss the mean of the slices' losses, Burn's AdamW.
fn reference(run: Run) -> (Vec<f32>, Vec<Vec<f32>>) {
    let device = Default::default();
    let mut model = Gated::<Ref>::new(&device, false);
    let mut optim = optimizer_config().init::<Ref, Gated<Ref>>();
    let mut losses = Vec::new();
    for step in 0..run.steps {
        let mut total: Option<Tensor<Ref, 1>> = None;
        for m in 0..run.s {
            for r in 0..run.n {
                let l = model.loss(
                    first_sample(run, step, m, r),
                    uses_extra(run, step, r),
                    &device,
                );
                total = Some(match total {
                    Some(t) => t + l,
                    None => l,
                });
            }
        }
        let loss = total.unwrap() / (run.n * run.s) as f32;
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads);
    }
    (losses, param_values(&model))
}

struct RankRun {
    losses: Vec<f32>,
    params: Vec<Vec<f32>>,
    has_state: Vec<bool>,
    partition: CommStats,
    replication: CommStats,
}

fn distributed(run: Run, freeze_unused: bool) -> Vec<RankRun> {
    let topology = Topology::new(run.n, run.k, run.p).unwrap();
    ThreadsEngine::new(run.n)
        .ranks_per_node(run.k)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let groups = MicsGroups::new(world.clone(), topology).unwrap();
            let runtime = MicsRuntime::with_prefetch(groups, PrefetchConfig::new(3, 1 << 20));
            let device = Default::default();
            let model = Gated::<Dist>::new(&device, freeze_unused);
            let mut model = shard_module(model, &runtime, ShardInit::Identical);
            let mut optim = ShardedOptimizer::adamw(&optimizer_config(), &runtime);
            let mut losses = Vec::new();
            for step in 0..run.steps {
                runtime.begin_step();
                let mut sum = 0.0f32;
                for m in 0..run.s {
                    let first = first_sample(run, step, m, rank);
                    let loss = model.loss(first, uses_extra(run, step, rank), &device);
                    sum += loss.clone().into_scalar();
                    optim.accumulate(&model, loss.backward());
                }
                model = optim.step(LR, model);
                let total = world.all_reduce(vec![sum], ReduceOp::Sum).wait().unwrap();
                losses.push(total[0] / (run.n * run.s) as f32);
            }
            let has_state = optim
                .export_state(&model)
                .unwrap()
                .into_iter()
                .map(|s| s.optimizer.is_some())
                .collect();
            RankRun {
                losses,
                params: param_values(&gather_module(model)),
                has_state,
                partition: runtime.groups().partition().stats(),
                replication: runtime.groups().replication().stats(),
            }
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

fn initial_values() -> Vec<Vec<f32>> {
    param_values(&Gated::<Ref>::new(&Default::default(), false))
}

#[test]
fn frozen_and_unused_parameters_are_not_updated_and_data_dependent_use_matches() {
    let initial = initial_values();
    for run in [
        // p = 1: `extra` is used by the odd ranks only.
        Run {
            n: 4,
            k: 4,
            p: 1,
            s: 2,
            steps: 5,
        },
        // p = 2: by partition group 1 (ranks 2 and 3) only; uneven shards.
        Run {
            n: 4,
            k: 4,
            p: 2,
            s: 1,
            steps: 5,
        },
        // Two nodes, hierarchical gathers: partition groups 1 and 3.
        Run {
            n: 8,
            k: 2,
            p: 4,
            s: 2,
            steps: 5,
        },
    ] {
        let (ref_losses, ref_params) = reference(run);
        // The reference itself leaves them alone (Burn's rule).
        for i in FROZEN.into_iter().chain(UNUSED) {
            assert_eq!(ref_params[i], initial[i], "reference param {i}");
        }
        let ranks = distributed(run, false);
        let mut worst = 0f32;
        for (r, rank) in ranks.iter().enumerate() {
            for (step, (a, b)) in rank.losses.iter().zip(&ref_losses).enumerate() {
                let e = (a - b).abs() / b.abs();
                assert!(e <= 1e-5, "{run:?} rank {r} step {step}: loss {a} vs {b}");
                worst = worst.max(e);
            }
            for (i, (a, b)) in rank.params.iter().zip(&ref_params).enumerate() {
                if FROZEN.contains(&i) || UNUSED.contains(&i) {
                    // Bit-identical: never stepped, no weight decay.
                    assert_eq!(a, &initial[i], "{run:?} rank {r} param {i} moved");
                } else {
                    let e = rel_err(a, b);
                    assert!(e <= 1e-5, "{run:?} rank {r} param {i}: rel err {e}");
                    worst = worst.max(e);
                }
            }
            // `extra` changed (it was trained at steps 1 and 3).
            assert_ne!(rank.params[6], initial[6], "{run:?}: extra never trained");
            // Optimizer state only for parameters that were stepped.
            let expected: Vec<bool> = (0..9)
                .map(|i| !FROZEN.contains(&i) && !UNUSED.contains(&i))
                .collect();
            assert_eq!(rank.has_state, expected, "{run:?} rank {r}");
        }
        eprintln!("{run:?}: worst relative error {worst:e}");
    }
}

#[test]
fn an_unused_parameter_moves_no_zeros() {
    // The same run with the unused layer trainable and with it frozen
    // (which never enters a bucket) moves exactly the same bytes.
    let run = Run {
        n: 4,
        k: 4,
        p: 2,
        s: 2,
        steps: 4,
    };
    let trainable = distributed(run, false);
    let frozen = distributed(run, true);
    for (a, b) in trainable.iter().zip(&frozen) {
        for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllReduce] {
            assert_eq!(a.partition.kind(kind), b.partition.kind(kind), "{kind}");
            assert_eq!(a.replication.kind(kind), b.replication.kind(kind), "{kind}");
        }
        assert!(a.partition.calls(CollectiveKind::ReduceScatter) > 0);
        assert!(a.replication.calls(CollectiveKind::AllReduce) > 0);
    }
}

/// A small model used twice in the tests below.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
    act: Gelu,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Mlp {
            l1: LinearConfig::new(IN, HIDDEN).init(device),
            l2: LinearConfig::new(HIDDEN, OUT).init(device),
            act: Gelu::new(),
        }
        .map(&mut DetInit(0))
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2.forward(self.act.forward(self.l1.forward(x)))
    }
}

fn input<B: Backend>(seed: usize, device: &B::Device) -> Tensor<B, 2> {
    let x: Vec<f32> = (0..B * IN)
        .map(|i| ((seed * 31 + i) as f32 * 0.29).sin())
        .collect();
    Tensor::from_data(TensorData::new(x, [B, IN]), device)
}

fn values<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

/// The same forward on the module's gathered (plain, local) copy: a fresh
/// gather of every parameter, no prefetch involved.
fn fresh(model: &Mlp<Dist>, x: Tensor<Dist, 2>) -> Vec<f32> {
    values(gather_module(model.clone()).forward(x))
}

#[test]
fn a_forward_right_after_step_sees_the_new_values() {
    let topology = Topology::new(2, 2, 2).unwrap();
    let results = ThreadsEngine::new(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let runtime = MicsRuntime::with_prefetch(MicsGroups::new(world, topology).unwrap(), {
                PrefetchConfig::new(4, 1 << 20)
            });
            let device = Default::default();
            let mut model = shard_module(Mlp::<Dist>::new(&device), &runtime, ShardInit::Identical);
            let mut optim = ShardedOptimizer::adamw(&optimizer_config(), &runtime);
            // Step 1 records the order of two micro-steps (forward, backward, twice).
            runtime.begin_step();
            for m in 0..2 {
                let loss = model.forward(input(m, &device)).powi_scalar(2).mean();
                optim.accumulate(&model, loss.backward());
            }
            model = optim.step(LR, model);
            // Step 2 replays it: during the first backward the prefetcher
            // gathers the second forward's parameters ahead, from the
            // values of before the step.
            runtime.begin_step();
            let loss = model.forward(input(2, &device)).powi_scalar(2).mean();
            optim.accumulate(&model, loss.backward());
            model = optim.step(LR, model);
            // An evaluation forward right after the step, without
            // begin_step(): its uses fall on the second forward's positions.
            let stale_before = runtime.counters().prefetch_stale;
            let got = values(model.forward(input::<Dist>(9, &device)));
            let stale = runtime.counters().prefetch_stale - stale_before;
            let want = fresh(&model, input(9, &device));
            (got, want, stale)
        })
        .unwrap();
    for (r, result) in results.into_iter().enumerate() {
        let (got, want, stale) = result.unwrap();
        assert_eq!(
            got, want,
            "rank {r}: the forward after step saw other values"
        );
        assert!(
            stale > 0,
            "rank {r}: the scenario did not exercise a stale prefetch"
        );
    }
}

#[test]
fn two_copies_of_a_module_each_see_their_own_values() {
    let topology = Topology::new(2, 2, 2).unwrap();
    let results = ThreadsEngine::new(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let runtime = MicsRuntime::with_prefetch(MicsGroups::new(world, topology).unwrap(), {
                PrefetchConfig::new(4, 1 << 20)
            });
            let device = Default::default();
            let mut model = shard_module(Mlp::<Dist>::new(&device), &runtime, ShardInit::Identical);
            let mut optim = ShardedOptimizer::adamw(&optimizer_config(), &runtime);
            // A best-so-far snapshot: the same parameter ids, its own values.
            let snapshot = model.clone();
            for step in 0..2 {
                runtime.begin_step();
                let loss = model.forward(input(step, &device)).powi_scalar(2).mean();
                optim.accumulate(&model, loss.backward());
                model = optim.step(LR, model);
            }
            // Replaying the recorded order on the snapshot: the prefetcher
            // would gather the trained model's current shards.
            runtime.begin_step();
            let from_snapshot = values(snapshot.forward(input(7, &device)));
            let from_model = values(model.forward(input(7, &device)));
            let stale = runtime.counters().prefetch_stale;
            (
                from_snapshot,
                fresh(&snapshot, input(7, &device)),
                from_model,
                fresh(&model, input(7, &device)),
                stale,
            )
        })
        .unwrap();
    for (r, result) in results.into_iter().enumerate() {
        let (snap, snap_fresh, model, model_fresh, stale) = result.unwrap();
        assert_eq!(snap, snap_fresh, "rank {r}: the snapshot saw other values");
        assert_eq!(model, model_fresh, "rank {r}: the model saw other values");
        assert_ne!(snap, model, "rank {r}: training changed nothing");
        assert!(stale > 0, "rank {r}: no stale prefetch was exercised");
    }
}

#[derive(Module, Debug)]
struct Pair<B: Backend> {
    a: Linear<B>,
    b: Linear<B>,
}

#[test]
fn ranks_using_parameters_in_another_order_fail_on_every_rank() {
    // Two layers of the same shape: rank 1 applies them in the other order,
    // so the two ranks' first gathers have the same length but not the same
    // parameter. Without a fingerprint they would exchange the wrong shards.
    let topology = Topology::new(2, 2, 2).unwrap();
    let results = ThreadsEngine::new(2)
        .timeout(std::time::Duration::from_secs(20))
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            let device = Default::default();
            let pair = Pair {
                a: LinearConfig::new(4, 4)
                    .with_bias(false)
                    .init::<Dist>(&device),
                b: LinearConfig::new(4, 4)
                    .with_bias(false)
                    .init::<Dist>(&device),
            };
            let Pair { a, b } = shard_module(pair, &runtime, ShardInit::Identical);
            let x = Tensor::<Dist, 2>::ones([1, 4], &device);
            let y = if rank == 0 {
                b.forward(a.forward(x))
            } else {
                a.forward(b.forward(x))
            };
            y.sum().into_scalar()
        })
        .unwrap();
    for (r, result) in results.iter().enumerate() {
        let message = match result {
            Ok(v) => panic!("rank {r} did not fail: {v}"),
            Err(m) => m,
        };
        assert!(message.contains("fingerprint"), "rank {r}: {message}");
        assert!(
            message.contains("mics: all-gather of parameter"),
            "rank {r}: {message}"
        );
    }
}
