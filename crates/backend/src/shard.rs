//! The one-call API: shard a Burn module's parameters over this rank's
//! partition group, and gather them back into a plain module.

use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use mics_comm::{Collectives, Sharding};

use crate::gather::{local, local_exact, primitive_to_vec};
use crate::prefetch::GatherSource;
use crate::runtime::MicsRuntime;
use crate::tensor::{MASTER, ShardedParam, ShardedTensor};
use crate::{Mics, MicsTensor};

/// Where the values of the parameters come from when sharding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardInit {
    /// Every rank of the partition group built the same values (same seed
    /// or same checkpoint): each keeps its slice.
    #[default]
    Identical,
    /// World rank 0 broadcasts its values first, so every partition group
    /// (every replica) starts from the same parameters.
    BroadcastFromRank0,
}

/// Shard every float parameter of `module` over this rank's partition group.
/// Collective: every rank of the world calls it with the same module structure.
pub fn shard_module<B, AB, M>(module: M, runtime: &Arc<MicsRuntime>, init: ShardInit) -> M
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
    M: AutodiffModule<AB>,
{
    module.map(&mut Sharder {
        runtime: runtime.clone(),
        init,
    })
}

/// Gather every sharded parameter of `module` into a plain local tensor (for
/// export or evaluation), in full precision: the f32 master values even when
/// the runtime gathers in bf16 or f16 for compute. Collective inside each
/// partition group.
pub fn gather_module<B, AB, M>(module: M) -> M
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
    M: AutodiffModule<AB>,
{
    module.map(&mut Gatherer)
}

/// Put a new shard value in place of parameter `id` (used by the optimizer
/// and by imports): the next version of `like`'s parameter, in its slot.
pub(crate) fn sharded_value<B: Backend>(
    id: burn::module::ParamId,
    shard: B::FloatTensorPrimitive,
    like: &ShardedTensor<B>,
) -> MicsTensor<B> {
    let p = &like.param;
    let param = ShardedParam::new(
        id,
        (p.slot, p.version + 1),
        shard,
        p.shape.clone(),
        p.dtype,
        p.runtime.clone(),
    );
    MicsTensor::Sharded(ShardedTensor::new(register(param)))
}

fn register<B: Backend>(param: ShardedParam<B>) -> Arc<ShardedParam<B>> {
    let param = Arc::new(param);
    let weak: std::sync::Weak<dyn GatherSource> =
        Arc::downgrade(&(param.clone() as Arc<dyn GatherSource>));
    param.runtime.prefetcher.register(param.id, weak);
    #[cfg(feature = "early-reduce")]
    crate::early::register(
        crate::reduce::GradKey {
            id: param.id,
            slot: param.slot,
        },
        &param.runtime,
    );
    param
}

/// A trainable parameter tensor around a sharded value: requires grad when
/// the tensor it replaces did, and (with `early-reduce`) is marked so that
/// Burn's autodiff hands its gradient over as soon as it is complete.
pub(crate) fn param_tensor<B, AB, const D: usize>(
    id: burn::module::ParamId,
    value: MicsTensor<B>,
    require_grad: bool,
) -> Tensor<AB, D>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    let sharded = matches!(value, MicsTensor::Sharded(_));
    let tensor = Tensor::<AB, D>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(value)));
    if !require_grad {
        return tensor;
    }
    let tensor = tensor.require_grad();
    #[cfg(feature = "early-reduce")]
    if sharded {
        let prim = tensor.into_primitive().tensor();
        let prim = AB::set_distributed_params(prim, crate::early::distributed_id(id));
        return Tensor::from_primitive(TensorPrimitive::Float(prim));
    }
    let _ = (id, sharded);
    tensor
}

struct Sharder {
    runtime: Arc<MicsRuntime>,
    init: ShardInit,
}

fn map_inner<B, AB, const D: usize>(
    param: Param<Tensor<AB, D>>,
    f: impl FnOnce(burn::module::ParamId, MicsTensor<B>) -> MicsTensor<B>,
) -> Param<Tensor<AB, D>>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    let (id, tensor, mapper) = param.consume();
    let require_grad = tensor.is_require_grad();
    let prim = tensor.inner().into_primitive().tensor();
    let mapped = f(id, prim);
    let tensor = param_tensor::<B, AB, D>(id, mapped, require_grad);
    Param::from_mapped_value(id, tensor, mapper)
}

impl<B, AB> ModuleMapper<AB> for Sharder
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        map_inner(param, |id, prim| {
            if let MicsTensor::Sharded(_) = prim {
                return prim;
            }
            let shape = burn::tensor::TensorMetadata::shape(&prim);
            let dtype = burn::tensor::TensorMetadata::dtype(&prim);
            let t = local(prim);
            let device = B::float_device(&t);
            let mut full = primitive_to_vec::<B>(t);
            let group = self.runtime.groups().partition();
            if self.init == ShardInit::BroadcastFromRank0 {
                let world = self.runtime.groups().world();
                full = world.broadcast(full, 0).wait().unwrap_or_else(|err| {
                    panic!("mics: broadcast of parameter {id} failed: {err}")
                });
            }
            let sharding = Sharding::new(full.len(), group.size());
            let shard = sharding.shard_of(&full, group.rank());
            let len = shard.len();
            let shard =
                B::float_from_data(TensorData::new(shard, [len]).convert_dtype(MASTER), &device);
            let slot = (self.runtime.claim_slot(), 0);
            let param = ShardedParam::new(id, slot, shard, shape, dtype, self.runtime.clone());
            MicsTensor::Sharded(ShardedTensor::new(register(param)))
        })
    }
}

struct Gatherer;

impl<B, AB> ModuleMapper<AB> for Gatherer
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        // The master values: gathered in full precision, whatever the
        // runtime's gather precision, so an export loses nothing.
        map_inner(param, |_, prim| MicsTensor::Local(local_exact(prim)))
    }
}
