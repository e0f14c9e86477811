//! The sharded optimizer: two-hop gradient sync and a per-shard step.
//!
//! Per micro-step, each parameter's full gradient is reduce-scattered inside
//! the partition group and added to this rank's accumulated shard. At the
//! accumulation boundary the accumulated shard is all-reduced once across the
//! replication group, scaled to the mean over the global batch, optionally
//! clipped by the global norm, and Burn's own per-tensor optimizer step
//! (`SimpleOptimizer`: AdamW, SGD, ...) runs on the shard.
//!
//! A parameter without a gradient is not updated (the rule of Burn's
//! optimizers and PyTorch's): a frozen parameter (`require_grad` off) or one
//! the step did not use on any rank keeps its shard and its optimizer state
//! bit for bit, and no collective moves its zeros. A parameter used on some
//! ranks only (data-dependent use, across partition groups) is reduced with
//! zeros from the others; the ranks agree on which parameters had a gradient
//! through a bitmask carried by the step's replication all-reduce.
//!
//! Both hops move gradients in the runtime's [`Precision::reduce`](crate::Precision)
//! element type and accumulate in `f32`. For fp16, a [`LossScale`] divides
//! the gradients back before the step and, when dynamic, skips steps whose
//! gradients overflowed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, LearningRate, Sgd, SgdConfig, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use mics_comm::{Collectives, Fingerprint, ReduceOp, Work};

use crate::precision;

use crate::gather::{local, release_gathered};
use crate::reduce::{DEFAULT_BUCKET_BYTES, GradKey};
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
    /// Slots of the parameters that had a gradient somewhere in the last
    /// step: the replication all-reduce of the next step speculates on them
    /// (see [`ShardedOptimizer::step`]).
    synced: HashSet<u64>,
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
    /// Rebuilds a checkpointed optimizer state with f32 tensors (see
    /// [`ShardedOptimizer::with_state_loader`]).
    pub(crate) state_loader: Option<crate::state::StateLoader<B, O>>,
    /// AdamW's hyper-parameters for the one-pass host step on NdArray
    /// (set by [`ShardedOptimizer::adamw`]).
    host_adamw: Option<crate::host_adamw::HostAdamW>,
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

/// The state of loss scaling between steps (see
/// [`ShardedOptimizer::loss_scale_state`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleState {
    /// The current scale.
    pub scale: f32,
    /// Good steps in a row since the scale last changed.
    pub good_steps: u32,
    /// Steps skipped on overflow so far.
    pub skipped_steps: u64,
}

impl LossScale {
    /// Dynamic scaling with PyTorch's `GradScaler` defaults: initial scale
    /// 2^16, doubled after 2000 good steps.
    pub fn dynamic() -> LossScale {
        LossScale::dynamic_from(65536.0)
    }

    /// Dynamic scaling from the scale `initial`, doubled after 2000 good
    /// steps (DeepSpeed's `initial_scale_power`, as a scale).
    pub fn dynamic_from(initial: f32) -> LossScale {
        LossScale::Dynamic {
            initial,
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
        let mut optim =
            Self::new(config.build(), runtime).with_state_loader(crate::state::adamw_state::<B>);
        optim.host_adamw = crate::host_adamw::HostAdamW::from_config(config);
        optim
    }
}

impl<B: Backend> ShardedOptimizer<B, Sgd<B>> {
    /// SGD with Burn's update rule (momentum, weight decay), on shards.
    pub fn sgd(config: &SgdConfig, runtime: &Arc<MicsRuntime>) -> Self {
        Self::new(config.build(), runtime).with_state_loader(crate::state::sgd_state::<B>)
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
            synced: HashSet::new(),
            micro_steps: 0,
            track_grad_norm: false,
            last_grad_norm: None,
            loss_scaling: LossScale::None,
            scale: 1.0,
            good_steps: 0,
            skipped_steps: 0,
            last_step_skipped: false,
            state_loader: None,
            host_adamw: None,
        }
    }

    /// How [`import_state`](Self::import_state) rebuilds this optimizer's
    /// state from checkpoint bytes when the backend's float element is not
    /// f32. Burn's record loader converts every float tensor to that element
    /// (f16 under [`Precision::FP16`](crate::Precision::FP16)), which would
    /// flush Adam's second moments to zero; the loader must rebuild the state
    /// with f32 tensors instead. [`adamw`](Self::adamw) and [`sgd`](Self::sgd)
    /// set theirs; without one, importing a state on such a backend is an
    /// error, never a silent loss of precision.
    pub fn with_state_loader(mut self, loader: crate::state::StateLoader<B, O>) -> Self {
        self.state_loader = Some(loader);
        self
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

    /// The dynamic loss scale's state, for a checkpoint: the current scale,
    /// the good steps in a row since it last changed and the steps skipped.
    /// Restored by [`restore_loss_scale`](Self::restore_loss_scale), a
    /// resumed fp16 run continues with the same scale instead of starting
    /// over from the initial one.
    pub fn loss_scale_state(&self) -> LossScaleState {
        LossScaleState {
            scale: self.scale,
            good_steps: self.good_steps,
            skipped_steps: self.skipped_steps,
        }
    }

    /// Restores a state from [`loss_scale_state`](Self::loss_scale_state).
    /// Panics if the scale is not finite and positive.
    pub fn restore_loss_scale(&mut self, state: LossScaleState) {
        assert!(
            state.scale.is_finite() && state.scale > 0.0,
            "mics: loss scale {} is not finite and positive",
            state.scale
        );
        self.scale = state.scale;
        self.good_steps = state.good_steps;
        self.skipped_steps = state.skipped_steps;
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
    ///
    /// Frozen parameters (`require_grad` off) and parameters without a
    /// gradient in this backward pass are skipped: no zeros are packed. The
    /// ranks of a partition group run the same program, so they pack the
    /// same parameters; each reduce-scatter's fingerprint checks it.
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
        for (key, grad) in full {
            self.runtime
                .grads
                .push(&self.runtime, key, grad, true, false);
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
    /// the replication group, average over the global batch, clip, and step
    /// every shard that had a gradient. Returns the updated module.
    ///
    /// Which parameters had a gradient is agreed across replicas (partition
    /// groups) without an extra collective in the steady state: the
    /// all-reduce carries the gradients of the parameters that had one in
    /// the previous step (zeros from replicas without one) plus one flag per
    /// parameter, summed. A parameter whose flags sum to zero is
    /// not stepped; one that had no gradient last step but has one now on
    /// some replica is all-reduced in a second, rare all-reduce. The first
    /// step has nothing to speculate on: its flags travel alone first.
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
        // Frozen parameters take part as parameters that never have a
        // gradient: the flags do not depend on which are frozen.
        let params = params.0;
        let local: Vec<Option<Vec<f32>>> =
            params.iter().map(|(id, _)| self.accum.remove(id)).collect();
        self.accum.clear();
        let (used, summed) = self.sync_replicas(&params, local);
        let world = self.runtime.groups().world().size();
        // The mean over the global batch, and the loss scale undone.
        let scale = 1.0 / ((world * self.micro_steps) as f32 * self.scale);
        self.micro_steps = 0;
        let mut stepped: Vec<(ParamId, ShardedTensor<B>)> = Vec::new();
        let mut grads: Vec<Vec<f32>> = Vec::new();
        for ((param, is_used), grad) in params.into_iter().zip(used).zip(summed) {
            if let (true, Some(grad)) = (is_used, grad) {
                stepped.push(param);
                grads.push(grad.into_iter().map(|x| x * scale).collect());
            }
        }
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
        for ((id, sharded), grad) in stepped.into_iter().zip(grads) {
            let mut shard = sharded.param.shard.clone();
            let state = self.states.remove(&id);
            let state = match &self.host_adamw {
                Some(h) => {
                    match crate::host_adamw::step::<B, O::State<1>>(h, lr, shard, &grad, state) {
                        Ok((stepped, state)) => {
                            self.states.insert(id, state);
                            updated.insert(id, sharded_value(id, stepped, &sharded));
                            continue;
                        }
                        Err((back, state)) => {
                            shard = back;
                            state
                        }
                    }
                }
                None => state,
            };
            let device = B::float_device(&shard);
            let len = grad.len();
            let tensor = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(shard));
            let counters = &self.runtime.counters;
            let grad = crate::staging::upload::<B>(
                counters,
                grad,
                [len].into(),
                crate::tensor::MASTER,
                &device,
            );
            let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grad));
            let (tensor, state) = self.optim.step(lr, tensor, grad, state);
            if let Some(state) = state {
                self.states.insert(id, state);
            }
            let shard = tensor.into_primitive().tensor();
            updated.insert(id, sharded_value(id, shard, &sharded));
        }
        module.map(&mut Replacer { updated })
    }

    /// The second hop: every parameter's accumulated shard summed
    /// over the replication group, and whether any replica had a gradient
    /// for it (see [`step`](Self::step)). `None` for parameters no replica
    /// had a gradient for.
    fn sync_replicas(
        &mut self,
        params: &[(ParamId, ShardedTensor<B>)],
        mut local: Vec<Option<Vec<f32>>>,
    ) -> (Vec<bool>, Vec<Option<Vec<f32>>>) {
        let replication = self.runtime.groups().replication().clone();
        let dtype = self.runtime.precision().reduce;
        if replication.size() == 1 {
            // The partition group agrees already: its reduce-scatters'
            // fingerprints checked that its ranks packed the same parameters.
            let used = local.iter().map(Option::is_some).collect();
            let summed = local
                .into_iter()
                .map(|g| g.map(|g| precision::rounded(dtype, g)))
                .collect();
            return (used, summed);
        }
        let slots: Vec<u64> = params.iter().map(|(_, s)| s.param.slot).collect();
        let lens: Vec<usize> = params
            .iter()
            .map(|(_, s)| s.param.sharding.shard_len())
            .collect();
        let flags: Vec<f32> = local
            .iter()
            .map(|g| f32::from(u8::from(g.is_some())))
            .collect();
        let mut summed: Vec<Option<Vec<f32>>> = vec![None; params.len()];
        // Phase 1: last step's parameters, with the flags in the last bucket.
        let speculated: Vec<usize> = (0..params.len())
            .filter(|&i| self.synced.contains(&slots[i]))
            .collect();
        let mut flags_back = None;
        let pending = self.start_buckets(&speculated, &mut local, &slots, &lens, Some(flags));
        for (bucket, work, with_flags) in pending {
            let values = self.wait_bucket(&bucket, &slots, work);
            let tail = split_into(&bucket, values, &lens, &mut summed);
            if with_flags {
                flags_back = Some(tail);
            }
        }
        let flags_back = flags_back.expect("the flags travel in the last bucket");
        let used: Vec<bool> = flags_back.iter().map(|&f| f > 0.0).collect();
        // Phase 2 (rare): parameters with a gradient now but not last step.
        let late: Vec<usize> = (0..params.len())
            .filter(|&i| used[i] && !self.synced.contains(&slots[i]))
            .collect();
        if !late.is_empty() {
            let pending = self.start_buckets(&late, &mut local, &slots, &lens, None);
            for (bucket, work, _) in pending {
                let values = self.wait_bucket(&bucket, &slots, work);
                split_into(&bucket, values, &lens, &mut summed);
            }
        }
        self.synced = (0..params.len())
            .filter(|&i| used[i])
            .map(|i| slots[i])
            .collect();
        (used, summed)
    }

    /// Starts the replication all-reduces of the parameters `which` (indices
    /// into `local`), packed into buckets; zeros for a parameter this replica
    /// has no gradient for. `flags`, when given, ride at the end of the last
    /// bucket (a bucket of their own if `which` is empty).
    fn start_buckets(
        &self,
        which: &[usize],
        local: &mut [Option<Vec<f32>>],
        slots: &[u64],
        lens: &[usize],
        flags: Option<Vec<f32>>,
    ) -> Vec<(Vec<usize>, Work<Vec<f32>>, bool)> {
        let replication = self.runtime.groups().replication();
        let dtype = self.runtime.precision().reduce;
        let p = self.runtime.partition_size().max(1);
        let which_lens: Vec<usize> = which.iter().map(|&i| lens[i]).collect();
        let mut groups: Vec<Vec<usize>> = buckets(&which_lens, self.bucket_bytes / p, |&l| l)
            .into_iter()
            .map(|b| b.into_iter().map(|j| which[j]).collect())
            .collect();
        if groups.is_empty() && flags.is_some() {
            groups.push(Vec::new());
        }
        let last = groups.len().saturating_sub(1);
        let mut flags = flags;
        groups
            .into_iter()
            .enumerate()
            .map(|(b, bucket)| {
                let mut buffer = Vec::new();
                let mut pieces: Vec<[u64; 2]> = Vec::with_capacity(bucket.len() + 1);
                for &i in &bucket {
                    let len = lens[i];
                    match local[i].take() {
                        Some(g) => buffer.extend(g),
                        None => buffer.resize(buffer.len() + len, 0.0),
                    }
                    pieces.push([slots[i], len as u64]);
                }
                let with_flags = b == last && flags.is_some();
                if with_flags {
                    let f = flags.take().expect("checked");
                    pieces.push([u64::MAX, f.len() as u64]);
                    buffer.extend(f);
                }
                let tag = Fingerprint::of_pieces(&pieces);
                let work = precision::all_reduce(replication, dtype, buffer, tag);
                (bucket, work, with_flags)
            })
            .collect()
    }

    fn wait_bucket(&self, bucket: &[usize], slots: &[u64], work: Work<Vec<f32>>) -> Vec<f32> {
        work.wait().unwrap_or_else(|err| {
            let slots: Vec<String> = bucket.iter().map(|&i| slots[i].to_string()).collect();
            panic!(
                "mics: gradient all-reduce of parameter slots [{}] in replication group {:?} (world ranks) failed: {err}",
                slots.join(", "),
                self.runtime.groups().replication().world_ranks(),
            )
        })
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

/// Full gradients on the host, in module order, of the trainable parameters
/// that have one, except those the backward hook already took.
struct GradCollector<'a, AB: AutodiffBackend> {
    grads: &'a mut AB::Gradients,
    runtime: &'a MicsRuntime,
    full: Vec<(GradKey, Vec<f32>)>,
}

impl<B, AB> ModuleVisitor<AB> for GradCollector<'_, AB>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let tensor = param.val();
        if !tensor.is_require_grad() {
            return; // Frozen: never reduced, never stepped.
        }
        let grad = tensor.grad_remove(self.grads);
        if self.runtime.grads.was_submitted(param.id) {
            // Reduce-scattered during backward; what is left is a placeholder.
            return;
        }
        let Some(grad) = grad else {
            return; // Not used in this backward pass: no zeros are packed.
        };
        let slot = sharded_of::<B, AB, D>(tensor).param.slot;
        let grad = local(grad.into_primitive().tensor());
        let full = crate::staging::download::<B>(&self.runtime.counters, grad);
        release_gathered();
        let key = GradKey { id: param.id, slot };
        self.full.push((key, full));
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

/// Cuts an all-reduced bucket into its parameters' shards (`lens[i]`
/// elements for parameter `i`), stored in `summed`; returns what follows them
/// (the flags, when the bucket carried them).
fn split_into(
    bucket: &[usize],
    mut values: Vec<f32>,
    lens: &[usize],
    summed: &mut [Option<Vec<f32>>],
) -> Vec<f32> {
    let mut at = 0;
    for &i in bucket {
        summed[i] = Some(values[at..at + lens[i]].to_vec());
        at += lens[i];
    }
    values.drain(..at);
    values
}

/// Every sharded parameter, in module order.
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
