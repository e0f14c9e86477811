//! What a sharded checkpoint holds for one rank: each parameter's shard and
//! its optimizer state, keyed by the parameter's module path (ids are random
//! per run, paths are not), exported from and imported into a
//! [`ShardedOptimizer`] and its module.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::momentum::MomentumState;
use burn::optim::{AdamWState, AdaptiveMomentumState, SgdState, SimpleOptimizer};
use burn::record::{BinBytesRecorder, BurnRecord, FullPrecisionSettings, Record, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Element, Tensor, TensorData, TensorPrimitive};

use crate::gather::primitive_to_vec;
use crate::shard::sharded_value;
use crate::tensor::{MASTER, ShardedTensor};
use crate::{Mics, MicsTensor, ShardedOptimizer};

/// One parameter's part of one rank's training state.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamShardState {
    /// Module path, e.g. `blocks.0.attn.c_attn.weight`.
    pub path: String,
    /// Logical (full) shape of the parameter.
    pub shape: Vec<usize>,
    /// This rank's shard, padded to `ceil(numel / p)` elements.
    pub shard: Vec<f32>,
    /// The optimizer's state for the shard, serialised by Burn's
    /// `BinBytesRecorder` at full precision (exact round trip for any
    /// `SimpleOptimizer`); `None` before the first step.
    pub optimizer: Option<Vec<u8>>,
}

/// Why a training state could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The module has a parameter the state does not.
    #[error("the checkpoint has no parameter `{0}`")]
    Missing(String),
    /// The state has a parameter the module does not.
    #[error("the checkpoint has parameter `{0}`, which the model does not")]
    Unexpected(String),
    /// Shapes or shard lengths disagree.
    #[error("parameter `{path}`: {what}")]
    Mismatch {
        /// The parameter.
        path: String,
        /// What disagrees, with both values.
        what: String,
    },
    /// The optimizer state bytes do not decode.
    #[error("parameter `{path}`: optimizer state does not decode: {error}")]
    Optimizer {
        /// The parameter.
        path: String,
        /// The recorder's error.
        error: String,
    },
    /// Accumulated gradients are pending: export only at a step boundary.
    #[error("{0} micro-steps are accumulated but not applied: export the state after step()")]
    MidStep(usize),
}

impl<B: Backend, O: SimpleOptimizer<B>> ShardedOptimizer<B, O> {
    /// This rank's shards and optimizer states, in module order. Call it at an
    /// accumulation boundary (after [`step`](Self::step)).
    pub fn export_state<AB, M>(&self, module: &M) -> Result<Vec<ParamShardState>, StateError>
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        if self.micro_steps > 0 {
            return Err(StateError::MidStep(self.micro_steps));
        }
        let mut visitor = PathCollector::<B> {
            path: Vec::new(),
            params: Vec::new(),
        };
        module.visit(&mut visitor);
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        visitor
            .params
            .into_iter()
            .map(|(path, id, sharded)| {
                let optimizer = match self.states.get(&id) {
                    Some(state) => {
                        Some(Recorder::<B>::record(&recorder, state.clone(), ()).map_err(
                            |err| StateError::Optimizer {
                                path: path.clone(),
                                error: err.to_string(),
                            },
                        )?)
                    }
                    None => None,
                };
                Ok(ParamShardState {
                    shape: sharded.param.shape.to_vec(),
                    shard: primitive_to_vec::<B>(sharded.param.shard.clone()),
                    path,
                    optimizer,
                })
            })
            .collect()
    }

    /// Replace the module's shards and this optimizer's states by `states`
    /// (from [`export_state`](Self::export_state) on the same rank of the
    /// same topology). Every parameter must be present with its shape and
    /// shard length; nothing is changed when an error is returned.
    pub fn import_state<AB, M>(
        &mut self,
        module: M,
        states: Vec<ParamShardState>,
    ) -> Result<M, StateError>
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        let mut visitor = PathCollector::<B> {
            path: Vec::new(),
            params: Vec::new(),
        };
        module.visit(&mut visitor);
        let mut by_path: HashMap<String, ParamShardState> =
            states.into_iter().map(|s| (s.path.clone(), s)).collect();
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let mut updated = HashMap::new();
        let mut optim_states = HashMap::new();
        for (path, id, sharded) in visitor.params {
            let state = by_path
                .remove(&path)
                .ok_or_else(|| StateError::Missing(path.clone()))?;
            let param = &sharded.param;
            if state.shape != param.shape.to_vec() {
                return Err(StateError::Mismatch {
                    path,
                    what: format!(
                        "shape {:?} in the checkpoint, {:?} in the model",
                        state.shape,
                        param.shape.to_vec()
                    ),
                });
            }
            let len = param.sharding.shard_len();
            if state.shard.len() != len {
                return Err(StateError::Mismatch {
                    path,
                    what: format!(
                        "shard of {} elements in the checkpoint, {len} on this rank \
                         (was it saved with another partition size?)",
                        state.shard.len()
                    ),
                });
            }
            let device = B::float_device(&param.shard);
            if let Some(bytes) = state.optimizer {
                let optimizer_error = |error: String| StateError::Optimizer {
                    path: path.clone(),
                    error,
                };
                let optim: O::State<1> = if <B::FloatElem as Element>::dtype() == MASTER {
                    Recorder::<B>::load(&recorder, bytes, &device)
                        .map_err(|err| optimizer_error(err.to_string()))?
                } else {
                    let loader = self.state_loader.ok_or_else(|| {
                        optimizer_error(format!(
                            "Burn's record loader would convert its f32 tensors to the \
                             backend's {:?}; give the optimizer a state loader \
                             (ShardedOptimizer::with_state_loader)",
                            <B::FloatElem as Element>::dtype()
                        ))
                    })?;
                    loader(bytes, &device).map_err(optimizer_error)?
                };
                optim_states.insert(id, optim);
            }
            // The master copy stays f32 whatever the backend's float element
            // (`Tensor::from_data` would convert to the device's default).
            let shard = B::float_from_data(
                TensorData::new(state.shard, [len]).convert_dtype(MASTER),
                &device,
            );
            updated.insert(id, sharded_value(id, shard, &sharded));
        }
        if let Some(path) = by_path.into_keys().min() {
            return Err(StateError::Unexpected(path));
        }
        self.states = optim_states;
        self.accum.clear();
        self.micro_steps = 0;
        Ok(module.map(&mut crate::optim::Replacer { updated }))
    }
}

/// Sharded parameters with their module paths, in module order.
struct PathCollector<B: Backend> {
    path: Vec<String>,
    params: Vec<(String, ParamId, ShardedTensor<B>)>,
}

impl<B, AB> ModuleVisitor<AB> for PathCollector<B>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = Mics<B>>,
{
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let sharded = match param.val().inner().into_primitive() {
            TensorPrimitive::Float(MicsTensor::Sharded(s)) => s,
            _ => panic!(
                "mics: parameter `{}` is not sharded: call shard_module first",
                self.path.join(".")
            ),
        };
        self.params.push((self.path.join("."), param.id, sharded));
    }
}

/// Rebuilds an optimizer's state for one shard from its checkpoint bytes
/// (Burn's `BinBytesRecorder` at full precision) with f32 tensors on
/// `device`; see [`ShardedOptimizer::with_state_loader`].
pub type StateLoader<B, O> =
    fn(Vec<u8>, &burn::tensor::Device<B>) -> Result<<O as SimpleOptimizer<B>>::State<1>, String>;

type Full = FullPrecisionSettings;

/// The record item inside checkpoint bytes, without Burn's conversion of its
/// tensors to the backend's float element.
fn record_item<B: Backend, R: Record<B>>(mut bytes: Vec<u8>) -> Result<R::Item<Full>, String> {
    let recorder = BinBytesRecorder::<Full>::default();
    let record: BurnRecord<R::Item<Full>, B> =
        Recorder::<B>::load_item(&recorder, &mut bytes).map_err(|err| err.to_string())?;
    Ok(record.item)
}

/// A tensor of a record item as an f32 tensor on `device`: the item's data
/// (private to Burn) read back through its serialised form, which is
/// exactly a `TensorData`.
fn master_tensor<B: Backend>(
    item: impl serde::Serialize,
    device: &B::Device,
) -> Result<Tensor<B, 1>, String> {
    let recorder = BinBytesRecorder::<Full>::default();
    let mut bytes = Recorder::<B>::save_item(&recorder, item, ()).map_err(|e| e.to_string())?;
    let data: TensorData =
        Recorder::<B>::load_item(&recorder, &mut bytes).map_err(|e| e.to_string())?;
    let data = data.convert_dtype(MASTER);
    Ok(Tensor::from_primitive(TensorPrimitive::Float(
        B::float_from_data(data, device),
    )))
}

/// [`StateLoader`] of Burn's AdamW: the moments in f32.
pub(crate) fn adamw_state<B: Backend>(
    bytes: Vec<u8>,
    device: &B::Device,
) -> Result<AdamWState<B, 1>, String> {
    let momentum = record_item::<B, AdamWState<B, 1>>(bytes)?.momentum;
    Ok(AdamWState::new(AdaptiveMomentumState {
        time: momentum.time,
        moment_1: master_tensor(momentum.moment_1, device)?,
        moment_2: master_tensor(momentum.moment_2, device)?,
        max_moment_2: momentum
            .max_moment_2
            .map(|t| master_tensor(t, device))
            .transpose()?,
    }))
}

/// [`StateLoader`] of Burn's SGD: the velocity in f32.
pub(crate) fn sgd_state<B: Backend>(
    bytes: Vec<u8>,
    device: &B::Device,
) -> Result<SgdState<B, 1>, String> {
    let momentum = record_item::<B, SgdState<B, 1>>(bytes)?.momentum;
    Ok(SgdState::new(
        momentum
            .map(|m| master_tensor(m.velocity, device).map(MomentumState::new))
            .transpose()?,
    ))
}
