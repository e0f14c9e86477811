//! The sharded optimizer: two-hop gradient sync and a per-shard step.
//!
//! Per micro-step, each parameter's full gradient is reduce-scattered inside
//! the partition group and added to this rank's accumulated shard. At the
//! accumulation boundary the accumulated shard is all-reduced once across the
//! replication group, scaled to the mean over the global batch, optionally
//! clipped by the global norm, and Burn's own per-tensor optimizer step
//! (`SimpleOptimizer`: AdamW, SGD, ...) runs on the shard.
//!
//! Both hops move gradients in the runtime's [`Precision::reduce`](crate::Precision)
//! element type and accumulate in `f32`. For fp16, a [`LossScale`] divides
//! the gradients back before the step and, when dynamic, skips steps whose
//! gradients overflowed.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, LearningRate, Sgd, SgdConfig, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use mics_comm::{Collectives, ReduceOp, Work};

use crate::precision;

use crate::gather::{local, primitive_to_vec, release_gathered};
use crate::reduce::{DEFAULT_BUCKET_BYTES, done, ids_list};
use crate::shard::{param_tensor, sharded_value};
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
    loss_scaling: LossScale,
    /// The current loss scale.
    scale: f32,
    /// Good steps in a row since the scale last changed (dynamic scaling).
    good_steps: u32,
    skipped_steps: u64,
    last_step_skipped: bool,
}

/// Loss scaling, for training whose gradients travel in f16
/// ([`Precision::FP16`](crate::Precision::FP16)): small gradients would
/// flush to zero in f16, so the loss is multiplied by a scale before
/// `backward()` and the optimizer divides the gradients by it before the step.
///
/// The caller multiplies each micro-step's loss by
/// [`ShardedOptimizer::loss_scale`] (read it after the previous `step`);
/// the optimizer unscales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossScale {
    /// No scaling: a scale of 1 (the default).
    None,
    /// A fixed scale. A power of two scales and unscales `f32` gradients
    /// exactly (barring overflow and subnormals).
    Static(f32),
    /// Dynamic scaling: start at `initial`; a step whose averaged gradients
    /// hold an inf or NaN on any rank is skipped (parameters and optimizer
    /// state unchanged, accumulated gradients dropped) and the scale halved;
    /// after `growth_interval` good steps in a row the scale doubles. Costs
    /// the global-norm all-reduce (one float) per step, which is also how
    /// every rank learns of an overflow on another.
    Dynamic {
        /// The scale of the first step.
        initial: f32,
        /// Good steps in a row after which the scale doubles.
        growth_interval: u32,
    },
}

impl LossScale {
    /// Dynamic scaling with PyTorch's `GradScaler` defaults: initial scale
    /// 2^16, doubled after 2000 good steps.
    pub fn dynamic() -> LossScale {
        LossScale::Dynamic {
            initial: 65536.0,
            growth_interval: 2000,
        }
    }

    fn initial(self) -> f32 {
        match self {
            LossScale::None => 1.0,
            LossScale::Static(scale) => scale,
            LossScale::Dynamic { initial, .. } => initial,
        }
    }
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
        runtime.grads.set_bucket_bytes(DEFAULT_BUCKET_BYTES);
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
            loss_scaling: LossScale::None,
            scale: 1.0,
            good_steps: 0,
            skipped_steps: 0,
            last_step_skipped: false,
        }
    }

    /// Scale the loss (see [`LossScale`]): multiply every micro-step's loss
    /// by [`loss_scale`](Self::loss_scale) before `backward()`; the step
    /// divides the gradients by it (and, when dynamic, skips steps whose
    /// gradients overflowed).
    ///
    /// Panics if the (initial) scale is not finite and positive.
    pub fn with_loss_scale(mut self, scaling: LossScale) -> Self {
        let initial = scaling.initial();
        assert!(
            initial.is_finite() && initial > 0.0,
            "mics: loss scale {initial} is not finite and positive"
        );
        self.loss_scaling = scaling;
        self.scale = scaling.initial();
        self.good_steps = 0;
        self
    }

    /// The factor to multiply the loss by before `backward()` (1 without
    /// loss scaling). With dynamic scaling it changes at [`step`](Self::step).
    pub fn loss_scale(&self) -> f32 {
        self.scale
    }

    /// Steps skipped because their gradients held an inf or NaN (dynamic
    /// loss scaling).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Whether the last [`step`](Self::step) was skipped (dynamic loss
    /// scaling, overflowed gradients).
    pub fn last_step_skipped(&self) -> bool {
        self.last_step_skipped
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
    ///
    /// Gradients are packed in the order they become complete (reverse order
    /// of use with the `early-reduce` feature, module order without). With
    /// `early-reduce`, the bucket size also bounds the full gradients a rank
    /// holds during backward (see [`Counters::peak_live_grad_bytes`](crate::Counters)).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes;
        self.runtime.grads.set_bucket_bytes(bytes);
        self
    }

    /// Compute the global gradient norm at every step even without clipping
    /// (one more all-reduce of one float per step), for
    /// [`last_grad_norm`](Self::last_grad_norm).
    pub fn with_grad_norm_tracking(mut self) -> Self {
        self.track_grad_norm = true;
        self
    }

    /// The global L2 norm of the averaged, unscaled gradient at the last step
    /// (before clipping), when clipping, norm tracking or dynamic loss
    /// scaling is on (inf or NaN for a step skipped on overflow).
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
    /// Call it after every `backward()` of a sharded module, on the same thread.
    ///
    /// Gradient memory: with the `early-reduce` feature, Burn's autodiff
    /// hands each sharded parameter's gradient to this rank's runtime as soon
    /// as it is complete, during backward; the runtime packs it into the open
    /// bucket, starts the bucket's reduce-scatter once it is full and frees
    /// the full gradients, so a rank holds at most about
    /// `(MAX_BUCKETS_IN_FLIGHT + 1)` buckets of full gradients (2 in flight,
    /// one filling) plus one parameter's; this call then flushes the last
    /// bucket and waits. Without the feature Burn hands over the gradients
    /// only when backward has finished, so the rank holds one full copy of
    /// the model's gradients at that point; they go through the same buckets
    /// from here. What stays between micro-steps is the accumulated shard, 1/p.
    pub fn accumulate<AB, M>(&mut self, module: &M, mut grads: AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        let mut collector = GradCollector::<AB> {
            grads: &mut grads,
            runtime: &self.runtime,
            full: Vec::new(),
        };
        module.visit(&mut collector);
        let full = std::mem::take(&mut collector.full);
        drop(collector);
        drop(grads);
        // Every gradient left here is complete and held at once.
        let held: usize = full.iter().map(|(_, g)| g.len() * 4).sum();
        self.runtime.counters.acquire_grad(held as u64);
        for (id, grad) in full {
            self.runtime
                .grads
                .push(&self.runtime, id, grad, true, false);
        }
        // The next micro-step reuses these parameter tensors: mark them again
        // so that Burn calls the early hook in its backward pass too.
        #[cfg(feature = "early-reduce")]
        module.visit(&mut crate::early::Remark);
        for (id, shard) in self.runtime.grads.finish(&self.runtime) {
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
        let dtype = self.runtime.precision().reduce;
        let groups = buckets(&accumulated, self.bucket_bytes / p.max(1), Vec::len);
        let pending: Vec<PendingBucket> = groups
            .into_iter()
            .map(|bucket| {
                let ids = bucket.iter().map(|&i| params.0[i].0).collect();
                let buffer: Vec<f32> = bucket
                    .iter()
                    .flat_map(|&i| accumulated[i].iter().copied())
                    .collect();
                let lens = bucket.iter().map(|&i| accumulated[i].len()).collect();
                let work = if replication.size() == 1 {
                    done(precision::rounded(dtype, buffer))
                } else {
                    precision::all_reduce(replication, dtype, buffer)
                };
                (ids, lens, work)
            })
            .collect();
        let world = self.runtime.groups().world().size();
        // The mean over the global batch, and the loss scale undone.
        let scale = 1.0 / ((world * self.micro_steps) as f32 * self.scale);
        let mut grads: Vec<Vec<f32>> = Vec::with_capacity(accumulated.len());
        for (ids, lens, work) in pending {
            let summed = work.wait().unwrap_or_else(|err| {
                panic!(
                    "mics: gradient all-reduce of parameters {} in replication group {:?} (world ranks) failed: {err}",
                    ids_list(&ids),
                    replication.world_ranks(),
                )
            });
            grads.extend(
                split(&summed, &lens)
                    .into_iter()
                    .map(|g| g.iter().map(|x| x * scale).collect::<Vec<f32>>()),
            );
        }
        drop(accumulated);
        let dynamic = matches!(self.loss_scaling, LossScale::Dynamic { .. });
        self.last_step_skipped = false;
        if self.clip_norm.is_some() || self.track_grad_norm || dynamic {
            let norm = self.global_norm(&grads);
            self.last_grad_norm = Some(norm);
            if let LossScale::Dynamic {
                growth_interval, ..
            } = self.loss_scaling
            {
                // The norm is summed over the partition group and the
                // replicas agree after the all-reduce, so every rank sees
                // the same verdict.
                if !norm.is_finite() {
                    self.scale /= 2.0;
                    self.good_steps = 0;
                    self.skipped_steps += 1;
                    self.last_step_skipped = true;
                    self.micro_steps = 0;
                    return module;
                }
                self.good_steps += 1;
                if self.good_steps >= growth_interval {
                    self.scale *= 2.0;
                    self.good_steps = 0;
                }
            }
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
            .unwrap_or_else(|err| {
                panic!(
                    "mics: all-reduce of the gradient norm in partition group {:?} (world ranks) failed: {err}",
                    self.runtime.groups().partition().world_ranks(),
                )
            });
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

/// Full gradients on the host, in module order (missing ones are zeros),
/// except those the backward hook already took.
struct GradCollector<'a, AB: AutodiffBackend> {
    grads: &'a mut AB::Gradients,
    runtime: &'a MicsRuntime,
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
        let grad = tensor.grad_remove(self.grads);
        if self.runtime.grads.was_submitted(param.id) {
            // Reduce-scattered during backward; what is left is a placeholder.
            return;
        }
        let full = match grad {
            Some(grad) => {
                let full = primitive_to_vec::<B>(local(grad.into_primitive().tensor()));
                release_gathered();
                full
            }
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

/// A bucket's replication all-reduce in flight: its parameters, their shard
/// lengths and the work.
type PendingBucket = (Vec<ParamId>, Vec<usize>, Work<Vec<f32>>);

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
        let tensor = param_tensor::<B, AB, D>(id, value, require_grad);
        Param::from_mapped_value(id, tensor, mapper)
    }
}
