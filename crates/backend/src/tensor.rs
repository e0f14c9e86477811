//! The float primitive of `Mics<B>`: a local tensor or a sharded parameter
//! seen through a chain of lazy views.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Slice, TensorMetadata};
use mics_comm::Sharding;

use crate::runtime::MicsRuntime;

/// Float primitive of [`Mics`](crate::Mics).
#[derive(Debug, Clone)]
pub enum MicsTensor<B: Backend> {
    /// A tensor of the inner backend, owned by this rank alone.
    Local(B::FloatTensorPrimitive),
    /// A parameter sharded over a partition group, possibly seen through views.
    Sharded(ShardedTensor<B>),
}

/// A view op kept lazy on a sharded parameter; applied after the gather.
#[derive(Debug, Clone)]
pub(crate) enum View {
    Reshape(Shape),
    SwapDims(usize, usize),
    Permute(Vec<usize>),
    Expand(Shape),
    Slice(Vec<Slice>),
}

/// The dtype of every shard: f32 master copies, whatever the dtype compute
/// uses (a bf16 model keeps f32 shards and f32 optimizer moments).
pub(crate) const MASTER: DType = DType::F32;

/// Unique identities of shard values in this process (see [`ShardedParam::uid`]).
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// This rank's shard of one parameter: what the rank keeps between uses.
///
/// A shard value never changes: the optimizer makes a new one. Three numbers
/// say which value this is:
/// - `slot`: the parameter's place in the order `shard_module` met it on this
///   runtime, the same on every rank (unlike Burn's `ParamId`, which ranks
///   draw independently); kept by every later version of the parameter;
/// - `version`: 0 when sharded, +1 at every optimizer step or import, the
///   same on every rank that runs the same program;
/// - `uid`: unique to this value in this process, so that two copies of a
///   module (an EMA, a best-so-far snapshot) or two versions of one
///   parameter are never mistaken for each other.
#[derive(Debug)]
pub struct ShardedParam<B: Backend> {
    pub(crate) id: ParamId,
    pub(crate) slot: u64,
    pub(crate) version: u64,
    pub(crate) uid: u64,
    /// The padded shard, 1-D, `sharding.shard_len()` elements.
    pub(crate) shard: B::FloatTensorPrimitive,
    /// The parameter's full shape.
    pub(crate) shape: Shape,
    /// The dtype compute sees: the parameter's own, what a gather produces.
    /// The shard itself is always f32 ([`MASTER`]), the master copy the
    /// optimizer steps.
    pub(crate) dtype: DType,
    pub(crate) sharding: Sharding,
    pub(crate) runtime: Arc<MicsRuntime>,
}

impl<B: Backend> ShardedParam<B> {
    pub(crate) fn new(
        id: ParamId,
        (slot, version): (u64, u64),
        shard: B::FloatTensorPrimitive,
        shape: Shape,
        dtype: DType,
        runtime: Arc<MicsRuntime>,
    ) -> Self {
        let sharding = Sharding::new(shape.num_elements(), runtime.partition_size());
        debug_assert_eq!(shard.shape().num_elements(), sharding.shard_len());
        let bytes = (sharding.shard_len() * MASTER.size()) as u64;
        runtime
            .counters
            .shard_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        ShardedParam {
            id,
            slot,
            version,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            shard,
            shape,
            dtype,
            sharding,
            runtime,
        }
    }

    /// What a collective carrying this shard value is fingerprinted with:
    /// slot, version and length (see [`mics_comm::Fingerprint`]).
    pub(crate) fn fingerprint_words(&self) -> [u64; 3] {
        [self.slot, self.version, self.sharding.numel() as u64]
    }

    /// Bytes of the full (gathered, unpadded) parameter.
    pub(crate) fn full_bytes(&self) -> u64 {
        (self.sharding.numel() * self.dtype.size()) as u64
    }

    /// Bytes of the full parameter in the gather's element type.
    pub(crate) fn wire_bytes(&self) -> u64 {
        (self.sharding.numel() * self.runtime.precision().gather.size()) as u64
    }
}

impl<B: Backend> Drop for ShardedParam<B> {
    fn drop(&mut self) {
        let bytes = (self.sharding.shard_len() * MASTER.size()) as u64;
        self.runtime
            .counters
            .shard_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A sharded parameter and the views applied to it so far.
#[derive(Debug, Clone)]
pub struct ShardedTensor<B: Backend> {
    pub(crate) param: Arc<ShardedParam<B>>,
    pub(crate) views: Vec<View>,
    /// Logical shape after the views.
    pub(crate) shape: Shape,
}

impl<B: Backend> ShardedTensor<B> {
    pub(crate) fn new(param: Arc<ShardedParam<B>>) -> Self {
        let shape = param.shape.clone();
        ShardedTensor {
            param,
            views: Vec::new(),
            shape,
        }
    }

    /// The parameter this tensor views.
    pub fn param_id(&self) -> ParamId {
        self.param.id
    }

    /// The version of the shard value: 0 when sharded, one more after every
    /// optimizer step (or import) that changed it.
    pub fn version(&self) -> u64 {
        self.param.version
    }

    pub(crate) fn with_view(mut self, view: View) -> Self {
        self.shape = view.shape_after(&self.shape);
        self.views.push(view);
        self
    }
}

impl View {
    fn shape_after(&self, shape: &Shape) -> Shape {
        match self {
            View::Reshape(s) | View::Expand(s) => s.clone(),
            View::SwapDims(a, b) => {
                let mut dims = shape.to_vec();
                dims.swap(*a, *b);
                Shape::from(dims)
            }
            View::Permute(axes) => Shape::from(axes.iter().map(|&a| shape[a]).collect::<Vec<_>>()),
            View::Slice(slices) => Shape::from(
                shape
                    .iter()
                    .enumerate()
                    .map(|(d, &size)| slices.get(d).map_or(size, |s| s.output_size(size)))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    pub(crate) fn apply<B: Backend>(&self, t: B::FloatTensorPrimitive) -> B::FloatTensorPrimitive {
        match self {
            View::Reshape(s) => B::float_reshape(t, s.clone()),
            View::SwapDims(a, b) => B::float_swap_dims(t, *a, *b),
            View::Permute(axes) => B::float_permute(t, axes),
            View::Expand(s) => B::float_expand(t, s.clone()),
            View::Slice(slices) => B::float_slice(t, slices),
        }
    }
}

impl<B: Backend> TensorMetadata for MicsTensor<B> {
    fn dtype(&self) -> DType {
        match self {
            MicsTensor::Local(t) => t.dtype(),
            MicsTensor::Sharded(s) => s.param.dtype,
        }
    }

    fn shape(&self) -> Shape {
        match self {
            MicsTensor::Local(t) => t.shape(),
            MicsTensor::Sharded(s) => s.shape.clone(),
        }
    }
}
