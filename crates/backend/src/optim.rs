//! The sharded optimizer: two-hop gradient sync and a per-shard step.
//!
//! Per micro-step, each parameter's full gradient is reduce-scattered inside
//! the partition group and added to this rank's accumulated shard. At the
//! accumulation boundary the accumulated shard is all-reduced once across the
//! replication group, scaled to the mean over the global batch, optionally
//! clipped by the global norm, and Burn's own per-tensor optimizer step
//! (`SimpleOptimizer`: AdamW, SGD, ...) runs on the shard.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, LearningRate, Sgd, SgdConfig, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use mics_comm::{Buffer, Collectives, ReduceOp, Sharding, Work};

/// Default gradient bucket: 32 MiB of full `f32` gradients.
pub const DEFAULT_BUCKET_BYTES: usize = 32 << 20;

use crate::gather::{local, primitive_to_vec};
use crate::shard::sharded_value;
use crate::tensor::ShardedTensor;
use crate::{Mics, MicsRuntime, MicsTensor};

/// An optimizer over the shards of a module sharded with
/// [`shard_module`](crate::shard_module).
pub struct ShardedOptimizer<B: Backend, O: SimpleOptimizer<B>> {
    optim: O,
    runtime: Arc<MicsRuntime>,
    clip_norm: Option<f32>,
    bucket_bytes: usize,
    pub(crate) accum: HashMap<ParamId, Vec<f32>>,
    pub(crate) states: HashMap<ParamId, O::State<1>>,
    pub(crate) micro_steps: usize,
    track_grad_norm: bool,
    last_grad_norm: Option<f32>,
}

impl<B: Backend> ShardedOptimizer<B, AdamW> {
    /// AdamW with Burn's update rule, on shards. Gradient clipping set on
    /// `config` is ignored: use [`ShardedOptimizer::with_grad_clip_norm`].
    pub fn adamw(config: &AdamWConfig, runtime: &Arc<MicsRuntime>) -> Self {
        Self::new(config.build(), runtime)
    }
}

impl<B: Backend> ShardedOptimizer<B, Sgd<B>> {
    /// SGD with Burn's update rule (momentum, weight decay), on shards.
    pub fn sgd(config: &SgdConfig, runtime: &Arc<MicsRuntime>) -> Self {
        Self::new(config.build(), runtime)
    }
}

impl<B: Backend, O: SimpleOptimizer<B>> ShardedOptimizer<B, O> {
    /// Any of Burn's per-tensor optimizers, on shards.
    pub fn new(optim: O, runtime: &Arc<MicsRuntime>) -> Self {
        ShardedOptimizer {
            optim,
            runtime: runtime.clone(),
            clip_norm: None,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            accum: HashMap::new(),
            states: HashMap::new(),
            micro_steps: 0,
            track_grad_norm: false,
            last_grad_norm: None,
        }
    }

    /// Clip gradients by their global L2 norm (over every parameter of the
    /// model), the same on every rank.
    pub fn with_grad_clip_norm(mut self, max_norm: f32) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    /// Pack gradients into buckets of at most `bytes` (full `f32` gradients,
    /// in module order; a larger parameter is a bucket alone): one
    /// reduce-scatter per bucket per micro-step and one all-reduce per bucket
    /// per step. 0 gives one bucket per parameter.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes;
        self
    }

    /// Compute the global gradient norm at every step even without clipping
    /// (one more all-reduce of one float per step), for
    /// [`last_grad_norm`](Self::last_grad_norm).
    pub fn with_grad_norm_tracking(mut self) -> Self {
        self.track_grad_norm = true;
        self
    }

    /// The global L2 norm of the averaged gradient at the last step (before
    /// clipping), when clipping or norm tracking is on.
    pub fn last_grad_norm(&self) -> Option<f32> {
        self.last_grad_norm
    }

    /// Micro-steps accumulated since the last optimizer step.
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// One micro-step: reduce-scatter each parameter's gradient inside the
    /// partition group and accumulate this rank's shard. `grads` comes from
    /// `loss.backward()` with the loss averaged over the local micro-batch.
    ///
    /// Gradient memory: Burn 0.21 (without its `distributed` feature) hands
    /// over the gradients when backward has finished, so this rank holds one
    /// full copy of the model's gradients at that point; they move to the host
    /// buckets one parameter at a time and each full gradient is freed once
    /// packed. What stays between micro-steps is the accumulated shard, 1/p.
    pub fn accumulate<AB, M>(&mut self, module: &M, mut grads: AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        let mut collector = GradCollector::<AB> {
            grads: &mut grads,
            full: Vec::new(),
        };
        module.visit(&mut collector);
        let partition = self.runtime.groups().partition();
        let p = partition.size();
        let mut pending = Vec::new();
        for bucket in buckets(&collector.full, self.bucket_bytes, |g| g.1.len()) {
            let shardings: Vec<Sharding> = bucket
                .iter()
                .map(|&i| Sharding::new(collector.full[i].1.len(), p))
                .collect();
            // Rank j's chunk is the concatenation of its shard of every parameter.
            let mut buffer = Vec::with_capacity(shardings.iter().map(Sharding::padded_len).sum());
            for part in 0..p {
                for (&i, sharding) in bucket.iter().zip(&shardings) {
                    let full = &collector.full[i].1;
                    let range = sharding.range(part);
                    let len = range.len();
                    buffer.extend_from_slice(&full[range]);
                    buffer.resize(buffer.len() + sharding.shard_len() - len, 0.0);
                }
            }
            for &i in &bucket {
                // Packed: this full gradient is no longer needed.
                collector.full[i].1 = Vec::new();
            }
            let ids: Vec<ParamId> = bucket.iter().map(|&i| collector.full[i].0).collect();
            let lens: Vec<usize> = shardings.iter().map(Sharding::shard_len).collect();
            let work = if p == 1 {
                done(buffer)
            } else {
                partition.reduce_scatter(buffer, ReduceOp::Sum)
            };
            pending.push((ids, lens, work));
        }
        drop(collector);
        for (ids, lens, work) in pending {
            let shards = work
                .wait()
                .unwrap_or_else(|err| panic!("mics: gradient reduce-scatter failed: {err}"));
            for (id, shard) in ids.into_iter().zip(split(&shards, &lens)) {
                match self.accum.get_mut(&id) {
                    Some(acc) => acc.iter_mut().zip(shard).for_each(|(a, g)| *a += g),
                    None => {
                        self.accum.insert(id, shard.to_vec());
                    }
                }
            }
        }
        self.micro_steps += 1;
    }

    /// The accumulation boundary: all-reduce the accumulated shards across
    /// the replication group (once per parameter), average over the global
    /// batch, clip, and step every shard. Returns the updated module.
    pub fn step<AB, M>(&mut self, lr: LearningRate, module: M) -> M
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        assert!(
            self.micro_steps > 0,
            "ShardedOptimizer::step without a gradient: call accumulate first"
        );
        let mut params = ParamCollector::<B>(Vec::new());
        module.visit(&mut params);
        let replication = self.runtime.groups().replication();
        let accumulated: Vec<Vec<f32>> = params
            .0
            .iter()
            .map(|(id, _)| {
                self.accum
                    .remove(id)
                    .unwrap_or_else(|| panic!("mics: parameter {id} has no accumulated gradient"))
            })
            .collect();
        let p = self.runtime.partition_size();
        let groups = buckets(&accumulated, self.bucket_bytes / p.max(1), Vec::len);
        let pending: Vec<(Vec<usize>, Work<Vec<f32>>)> = groups
            .into_iter()
            .map(|bucket| {
                let buffer: Vec<f32> = bucket
                    .iter()
                    .flat_map(|&i| accumulated[i].iter().copied())
                    .collect();
                let lens = bucket.iter().map(|&i| accumulated[i].len()).collect();
                let work = if replication.size() == 1 {
                    done(buffer)
                } else {
                    replication.all_reduce(buffer, ReduceOp::Sum)
                };
                (lens, work)
            })
            .collect();
        let world = self.runtime.groups().world().size();
        let scale = 1.0 / (world * self.micro_steps) as f32;
        let mut grads: Vec<Vec<f32>> = Vec::with_capacity(accumulated.len());
        for (lens, work) in pending {
            let summed = work
                .wait()
                .unwrap_or_else(|err| panic!("mics: gradient all-reduce failed: {err}"));
            grads.extend(
                split(&summed, &lens)
                    .into_iter()
                    .map(|g| g.iter().map(|x| x * scale).collect::<Vec<f32>>()),
            );
        }
        drop(accumulated);
        if self.clip_norm.is_some() || self.track_grad_norm {
            let norm = self.global_norm(&grads);
            self.last_grad_norm = Some(norm);
            let coef = match self.clip_norm {
                Some(max_norm) => (max_norm / (norm + f32::MIN_POSITIVE)).min(1.0),
                None => 1.0,
            };
            if coef < 1.0 {
                grads
                    .iter_mut()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= coef));
            }
        }
        let mut updated = HashMap::new();
        for ((id, sharded), grad) in params.0.into_iter().zip(grads) {
            let shard = sharded.param.shard.clone();
            let device = B::float_device(&shard);
            let len = grad.len();
            let tensor = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(shard));
            let grad = Tensor::<B, 1>::from_data(
                TensorData::new(grad, [len]).convert_dtype(sharded.param.dtype),
                &device,
            );
            let state = self.states.remove(&id);
            let (tensor, state) = self.optim.step(lr, tensor, grad, state);
            if let Some(state) = state {
                self.states.insert(id, state);
            }
            let shard = tensor.into_primitive().tensor();
            updated.insert(id, sharded_value(id, shard, &sharded));
        }
        self.micro_steps = 0;
        module.map(&mut Replacer { updated })
    }

    /// The L2 norm over all shards of all parameters (replicas hold the same
    /// values after the all-reduce, so summing inside the partition group
    /// covers the whole model once), the same on every rank.
    fn global_norm(&self, grads: &[Vec<f32>]) -> f32 {
        let local: f64 = grads
            .iter()
            .flat_map(|g| g.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        let total = self
            .runtime
            .groups()
            .partition()
            .all_reduce(vec![local as f32], ReduceOp::Sum)
            .wait()
            .unwrap_or_else(|err| panic!("mics: all-reduce of the gradient norm failed: {err}"));
        total[0].sqrt()
    }
}

fn sharded_of<B: Backend, AB: AutodiffBackend<InnerBackend = Mics<B>>, const D: usize>(
    tensor: Tensor<AB, D>,
) -> ShardedTensor<B> {
    match tensor.inner().into_primitive().tensor() {
        MicsTensor::Sharded(s) => s,
        MicsTensor::Local(_) => {
            panic!("mics: the module has an unsharded parameter: call shard_module first")
        }
    }
}

/// Full gradients on the host, in module order (missing ones are zeros).
struct GradCollector<'a, AB: AutodiffBackend> {
    grads: &'a mut AB::Gradients,
    full: Vec<(ParamId, Vec<f32>)>,
}

impl<B, AB> ModuleVisitor<AB> for GradCollector<'_, AB>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let tensor = param.val();
        let numel = tensor.shape().num_elements();
        let full = match tensor.grad_remove(self.grads) {
            Some(grad) => primitive_to_vec::<B>(local(grad.into_primitive().tensor())),
            None => vec![0.0; numel],
        };
        self.full.push((param.id, full));
    }
}

/// Consecutive items packed into groups of at most `max_bytes` of `f32`s
/// (an item larger than that alone); `max_bytes == 0`: one item per group.
fn buckets<T>(items: &[T], max_bytes: usize, len: impl Fn(&T) -> usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        let b = len(item) * 4;
        match out.last_mut() {
            Some(last) if max_bytes > 0 && bytes + b <= max_bytes => {
                last.push(i);
                bytes += b;
            }
            _ => {
                out.push(vec![i]);
                bytes = b;
            }
        }
    }
    out
}

/// A completed `Work`: what a collective over a group of one returns, without
/// going through the engine.
fn done(values: Vec<f32>) -> Work<Vec<f32>> {
    Work::ready(Ok(Buffer::F32(values))).map(|buffer| match buffer {
        Buffer::F32(values) => Ok(values),
        _ => unreachable!("built as f32"),
    })
}

fn split<'a>(buffer: &'a [f32], lens: &[usize]) -> Vec<&'a [f32]> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            at += len;
            &buffer[at - len..at]
        })
        .collect()
}

struct ParamCollector<B: Backend>(Vec<(ParamId, ShardedTensor<B>)>);

impl<B, AB> ModuleVisitor<AB> for ParamCollector<B>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        self.0.push((param.id, sharded_of::<B, AB, D>(param.val())));
    }
}

pub(crate) struct Replacer<B: Backend> {
    pub(crate) updated: HashMap<ParamId, MicsTensor<B>>,
}

impl<B, AB> ModuleMapper<AB> for Replacer<B>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(value) = self.updated.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let mut tensor =
            Tensor::<AB, D>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(value)));
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}
