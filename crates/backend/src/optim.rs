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
use mics_comm::{Collectives, ReduceOp, Sharding, Work, reduce_scatter_padded};

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
    accum: HashMap<ParamId, Vec<f32>>,
    states: HashMap<ParamId, O::State<1>>,
    micro_steps: usize,
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
            accum: HashMap::new(),
            states: HashMap::new(),
            micro_steps: 0,
        }
    }

    /// Clip gradients by their global L2 norm (over every parameter of the
    /// model), the same on every rank.
    pub fn with_grad_clip_norm(mut self, max_norm: f32) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    /// Micro-steps accumulated since the last optimizer step.
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// One micro-step: reduce-scatter each parameter's gradient inside the
    /// partition group and accumulate this rank's shard. `grads` comes from
    /// `loss.backward()` with the loss averaged over the local micro-batch.
    pub fn accumulate<AB, M>(&mut self, module: &M, mut grads: AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        let mut collector = GradCollector::<AB> {
            grads: &mut grads,
            runtime: &self.runtime,
            pending: Vec::new(),
        };
        module.visit(&mut collector);
        for (id, work) in collector.pending {
            let shard = work
                .wait()
                .unwrap_or_else(|err| panic!("mics: reduce-scatter of {id} failed: {err}"));
            match self.accum.get_mut(&id) {
                Some(acc) => acc.iter_mut().zip(&shard).for_each(|(a, g)| *a += g),
                None => {
                    self.accum.insert(id, shard);
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
        let pending: Vec<(ParamId, Work<Vec<f32>>)> = params
            .0
            .iter()
            .map(|(id, _)| {
                let acc = self
                    .accum
                    .remove(id)
                    .unwrap_or_else(|| panic!("mics: parameter {id} has no accumulated gradient"));
                (*id, replication.all_reduce(acc, ReduceOp::Sum))
            })
            .collect();
        let world = self.runtime.groups().world().size();
        let scale = 1.0 / (world * self.micro_steps) as f32;
        let mut grads: Vec<Vec<f32>> = pending
            .into_iter()
            .map(|(id, work)| {
                let mut g = work
                    .wait()
                    .unwrap_or_else(|err| panic!("mics: all-reduce of {id} failed: {err}"));
                g.iter_mut().for_each(|x| *x *= scale);
                g
            })
            .collect();
        if let Some(max_norm) = self.clip_norm {
            let coef = self.clip_coefficient(&grads, max_norm);
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

    /// `min(1, max_norm / (norm + tiny))` with the norm over all shards of all
    /// parameters (replicas hold the same values after the all-reduce, so
    /// summing inside the partition group covers the whole model once).
    fn clip_coefficient(&self, grads: &[Vec<f32>], max_norm: f32) -> f32 {
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
        let norm = total[0].sqrt();
        (max_norm / (norm + f32::MIN_POSITIVE)).min(1.0)
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

struct GradCollector<'a, AB: AutodiffBackend> {
    grads: &'a mut AB::Gradients,
    runtime: &'a Arc<MicsRuntime>,
    pending: Vec<(ParamId, Work<Vec<f32>>)>,
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
        let partition = self.runtime.groups().partition();
        let sharding = Sharding::new(numel, partition.size());
        self.pending.push((
            param.id,
            reduce_scatter_padded(partition.as_ref(), full, sharding, ReduceOp::Sum),
        ));
    }
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

struct Replacer<B: Backend> {
    updated: HashMap<ParamId, MicsTensor<B>>,
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
