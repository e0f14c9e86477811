//! Gather before use: turn a sharded parameter into a local tensor of the
//! inner backend, and account for the gathered bytes while an op holds them.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use mics_comm::{CommError, Work};

use crate::runtime::MicsRuntime;
use crate::tensor::{MicsTensor, ShardedParam, ShardedTensor};

thread_local! {
    /// Gathered buffers handed to the op running on this thread (ranks are
    /// threads or processes, and an op runs on the rank's own thread).
    static HELD: RefCell<Vec<(Arc<MicsRuntime>, u64)>> = const { RefCell::new(Vec::new()) };
}

/// The tensor as a tensor of the inner backend, gathering a sharded parameter.
pub(crate) fn local<B: Backend>(tensor: MicsTensor<B>) -> B::FloatTensorPrimitive {
    match tensor {
        MicsTensor::Local(t) => t,
        MicsTensor::Sharded(s) => gather(s),
    }
}

/// Called after the inner op has consumed its gathered inputs: they are gone.
pub(crate) fn release_gathered() {
    HELD.with(|held| {
        for (runtime, bytes) in held.borrow_mut().drain(..) {
            runtime.counters.release_live(bytes);
        }
    });
}

fn gather<B: Backend>(tensor: ShardedTensor<B>) -> B::FloatTensorPrimitive {
    let param = &tensor.param;
    if param.sharding.parts() == 1 {
        // A partition group of one holds the whole parameter: no collective,
        // no copy.
        let counters = &param.runtime.counters;
        counters.gathers.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_gathered
            .fetch_add(param.full_bytes(), Ordering::Relaxed);
        let full = B::float_reshape(param.shard.clone(), param.shape.clone());
        return tensor.views.iter().fold(full, |t, view| view.apply::<B>(t));
    }
    let runtime = param.runtime.clone();
    let bytes = param.full_bytes();
    let full = match runtime.prefetcher.take(param.id, &runtime.counters) {
        Some(work) => work,
        None => {
            runtime.counters.acquire_live(bytes);
            start_gather(param)
        }
    };
    let full = full.wait().unwrap_or_else(|err| {
        panic!(
            "mics: all-gather of parameter {} (shape {:?}) in partition group {:?} (world ranks) failed: {err}",
            param.id,
            param.shape,
            runtime.groups().partition().world_ranks(),
        )
    });
    runtime.prefetcher.after_use(&runtime.counters);
    HELD.with(|held| held.borrow_mut().push((runtime, bytes)));
    let device = B::float_device(&param.shard);
    let data = TensorData::new(full, param.shape.clone()).convert_dtype(param.dtype);
    let mut out = B::float_from_data(data, &device);
    for view in &tensor.views {
        out = view.apply::<B>(out);
    }
    out
}

/// Start the all-gather of a parameter inside its partition group; the
/// result is the full parameter, unpadded.
pub(crate) fn start_gather<B: Backend>(param: &ShardedParam<B>) -> Work<Vec<f32>> {
    let counters = &param.runtime.counters;
    counters.gathers.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_gathered
        .fetch_add(param.full_bytes(), Ordering::Relaxed);
    let shard = primitive_to_vec::<B>(param.shard.clone());
    let numel = param.sharding.numel();
    param
        .runtime
        .groups()
        .all_gather_partition(shard)
        .map(move |mut full| {
            full.truncate(numel);
            Ok::<_, CommError>(full)
        })
}

/// Host copy of a primitive of the inner backend, as `f32`.
pub(crate) fn primitive_to_vec<B: Backend>(t: B::FloatTensorPrimitive) -> Vec<f32> {
    let data = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).into_data();
    data.convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

impl<B: Backend> crate::prefetch::GatherSource for ShardedParam<B> {
    fn start(&self) -> Work<Vec<f32>> {
        start_gather(self)
    }

    fn bytes(&self) -> u64 {
        self.full_bytes()
    }
}
