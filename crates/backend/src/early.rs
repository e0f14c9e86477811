//! Early gradient reduction through Burn 0.21's `distributed` hook (the
//! `early-reduce` feature).
//!
//! [`shard_module`](crate::shard_module) (and every optimizer step) marks each
//! sharded parameter with `set_distributed_params`. Burn's autodiff then
//! counts, before running backward, how many ops feed each marked parameter's
//! gradient, and calls [`DistributedBackend::submit_gradient_sync`] on
//! `Mics<B>` from `Gradients::register` as soon as the last contribution has
//! been added. The hook takes the full gradient out of Burn's gradient
//! container (leaving an empty placeholder), hands it to the rank's
//! [`GradReducer`](crate::reduce::GradReducer), which starts the bucket's
//! reduce-scatter once the bucket is full, and returns: backward goes on
//! while the collective runs.
//!
//! The hook receives only the gradient and a `DistributedParamId`, so the
//! runtime of the parameter is found in a per-thread registry filled when the
//! parameter's shard is created: backward must run on the thread that
//! sharded the module (one rank per thread or per process, as everywhere in
//! this crate). A parameter the registry does not know keeps its gradient in
//! the container, and `accumulate` reduces it after backward as without the
//! feature.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::tensor::backend::distributed::{
    DistributedBackend, DistributedParamId, DistributedParams, TensorRef,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorMetadata};

use crate::gather::{local, release_gathered};
use crate::reduce::GradKey;
use crate::runtime::MicsRuntime;
use crate::{Mics, MicsTensor};

thread_local! {
    static PARAMS: RefCell<HashMap<DistributedParamId, (GradKey, Weak<MicsRuntime>)>> =
        RefCell::new(HashMap::new());
}

/// The id Burn's autodiff carries for parameter `id`.
pub(crate) fn distributed_id(id: ParamId) -> DistributedParamId {
    DistributedParamId::from(id.val())
}

/// Route the gradient of parameter `id`, computed on this thread, to `runtime`.
pub(crate) fn register(key: GradKey, runtime: &Arc<MicsRuntime>) {
    PARAMS.with(|params| {
        let mut params = params.borrow_mut();
        // Drop the entries of runtimes that are gone (earlier runs on this thread).
        if params.len() > 1024 && params.len().is_power_of_two() {
            params.retain(|_, (_, rt)| rt.strong_count() > 0);
        }
        params.insert(distributed_id(key.id), (key, Arc::downgrade(runtime)));
    });
}

fn lookup(id: DistributedParamId) -> Option<(GradKey, Arc<MicsRuntime>)> {
    PARAMS.with(|params| {
        let params = params.borrow();
        let (param, runtime) = params.get(&id)?;
        Some((*param, runtime.upgrade()?))
    })
}

impl<B: Backend> DistributedBackend for Mics<B> {
    fn submit_gradient_sync(tensor: TensorRef<Self>, params: DistributedParams) {
        let Some((id, runtime)) = lookup(params.param_id) else {
            return;
        };
        if !runtime.reduce_in_backward() {
            return; // Left in the container: reduced after backward.
        }
        // SAFETY: Burn passes a pointer to the gradient in its container,
        // which nothing else borrows while `Gradients::register` runs this
        // hook on the current thread; the parameter's last contribution has
        // been added, so autodiff does not touch it again.
        let slot: &mut MicsTensor<B> = unsafe { &mut *tensor.0 };
        let device = match &*slot {
            MicsTensor::Local(t) => B::float_device(t),
            MicsTensor::Sharded(s) => B::float_device(&s.param.shard),
        };
        let dtype = slot.dtype().into();
        let placeholder = MicsTensor::Local(B::float_empty([0].into(), &device, dtype));
        let grad = std::mem::replace(slot, placeholder);
        let full = crate::staging::download::<B>(&runtime.counters, local(grad));
        release_gathered();
        runtime.grads.push(&runtime, id, full, false, true);
    }

    /// Never called by `Mics`: collectives go through `mics-comm`.
    fn sync_collective(_device: &Self::Device) {}
}

/// Marks every sharded parameter of a module again for the next backward pass.
///
/// Burn registers a marked parameter's "distributed" root step when the
/// tensor is marked, and the first backward pass consumes it: without a new
/// mark, the next micro-step's backward (gradient accumulation reuses the
/// same parameter tensors) would not call the hook. Marking a clone of the
/// parameter registers a new root step for the same graph node, kept alive by
/// the parameter tensor's reference count.
pub(crate) struct Remark;

impl<B, AB> ModuleVisitor<AB> for Remark
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let tensor = param.val();
        if !tensor.is_require_grad() {
            return;
        }
        let prim = tensor.into_primitive().tensor();
        if !matches!(AB::inner(prim.clone()), MicsTensor::Sharded(_)) {
            return;
        }
        let _ = AB::set_distributed_params(prim, distributed_id(param.id));
    }
}
