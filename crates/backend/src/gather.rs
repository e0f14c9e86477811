//! Gather before use: turn a sharded parameter into a local tensor of the
//! inner backend, and account for the gathered bytes while an op holds them.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use mics_comm::{CommError, Fingerprint, Sharding, Work};

use crate::prefetch::GatherSource;
use crate::runtime::MicsRuntime;
use crate::staging;
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
        counters
            .bytes_gathered_wire
            .fetch_add(param.wire_bytes(), Ordering::Relaxed);
        let dtype = param.runtime.precision().gather;
        let full = if dtype == mics_comm::DType::F32 {
            let full = B::float_reshape(param.shard.clone(), param.shape.clone());
            if param.dtype == crate::tensor::MASTER {
                full
            } else {
                B::float_cast(full, param.dtype.into())
            }
        } else {
            // Compute sees the weights rounded as a gather would round them.
            let shard = staging::download::<B>(counters, param.shard.clone());
            let values = crate::precision::rounded(dtype, shard);
            let device = B::float_device(&param.shard);
            staging::upload::<B>(counters, values, param.shape.clone(), param.dtype, &device)
        };
        return tensor.views.iter().fold(full, |t, view| view.apply::<B>(t));
    }
    let runtime = param.runtime.clone();
    let bytes = param.full_bytes();
    let full = match runtime
        .prefetcher
        .take(param.id, param.uid, &runtime.counters)
    {
        Some(gathered) => gathered,
        None => {
            runtime.counters.acquire_live(bytes);
            Gathered::Own(start_gather(param, runtime.precision().gather))
        }
    };
    let full = full.wait().unwrap_or_else(|err| {
        panic!(
            "mics: all-gather of parameter {} (slot {}, version {}, shape {:?}) in partition group {:?} (world ranks) failed: {err}",
            param.id,
            param.slot,
            param.version,
            param.shape,
            runtime.groups().partition().world_ranks(),
        )
    });
    runtime.prefetcher.after_use(&runtime.counters);
    HELD.with(|held| held.borrow_mut().push((runtime, bytes)));
    let device = B::float_device(&param.shard);
    let counters = &param.runtime.counters;
    let mut out = staging::upload::<B>(counters, full, param.shape.clone(), param.dtype, &device);
    for view in &tensor.views {
        out = view.apply::<B>(out);
    }
    out
}

/// Start the all-gather of a parameter inside its partition group; the
/// result is the full parameter, unpadded.
pub(crate) fn start_gather<B: Backend>(
    param: &ShardedParam<B>,
    dtype: mics_comm::DType,
) -> Work<Vec<f32>> {
    let counters = &param.runtime.counters;
    counters.gathers.fetch_add(1, Ordering::Relaxed);
    counters.gather_collectives.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_gathered
        .fetch_add(param.full_bytes(), Ordering::Relaxed);
    counters
        .bytes_gathered_wire
        .fetch_add(param.wire_bytes(), Ordering::Relaxed);
    let shard = staging::download::<B>(counters, param.shard.clone());
    let numel = param.sharding.numel();
    let runtime = &param.runtime;
    let tag = Fingerprint::of_pieces([param.fingerprint_words()]);
    crate::precision::all_gather_partition(runtime.groups(), dtype, shard, tag).map(
        move |mut full| {
            full.truncate(numel);
            Ok::<_, CommError>(full)
        },
    )
}

/// Host copy of a primitive of the inner backend, as `f32`.
pub(crate) fn primitive_to_vec<B: Backend>(t: B::FloatTensorPrimitive) -> Vec<f32> {
    // NdArray's `into_data` copies an array that has another owner (a
    // parameter's shard always has: the parameter) element by element
    // through a dynamic-rank iterator, at a few ns per element: 15% of a
    // training step at N = 2. A contiguous f32 array is copied as a slice.
    if let Some(values) = crate::host_adamw::host_values(&t) {
        return values.to_vec();
    }
    let data = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).into_data();
    data.convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

impl<B: Backend> GatherSource for ShardedParam<B> {
    fn start(&self) -> Work<Vec<f32>> {
        start_gather(self, self.runtime.precision().gather)
    }

    fn bytes(&self) -> u64 {
        self.full_bytes()
    }

    fn host_shard(&self) -> Vec<f32> {
        staging::download::<B>(&self.runtime.counters, self.shard.clone())
    }

    fn uid(&self) -> u64 {
        self.uid
    }

    fn fingerprint_words(&self) -> [u64; 3] {
        ShardedParam::fingerprint_words(self)
    }

    fn sharding(&self) -> Sharding {
        self.sharding
    }

    fn runtime(&self) -> &Arc<MicsRuntime> {
        &self.runtime
    }
}

/// A gathered parameter on its way: its own all-gather, or its part of an
/// all-gather shared with the parameters started together with it.
pub(crate) enum Gathered {
    Own(Work<Vec<f32>>),
    Part(Arc<Mutex<Coalesced>>, usize),
}

/// One all-gather of the concatenated shards of several parameters.
pub(crate) struct Coalesced {
    work: Option<Work<Vec<f32>>>,
    shardings: Vec<Sharding>,
    /// Each parameter's full value once the collective has been waited for.
    parts: Vec<Option<Result<Vec<f32>, CommError>>>,
}

impl Gathered {
    /// The full parameter, unpadded.
    pub fn wait(self) -> Result<Vec<f32>, CommError> {
        match self {
            Gathered::Own(work) => work.wait(),
            Gathered::Part(shared, i) => {
                let mut c = shared.lock().unwrap();
                if let Some(work) = c.work.take() {
                    let result = work.wait();
                    c.parts = split_coalesced(result, &c.shardings);
                }
                c.parts[i]
                    .take()
                    .expect("each part of a coalesced gather is taken once")
            }
        }
    }
}

/// Rank r's chunk of the gathered buffer is its shard of every parameter,
/// in order: parameter i's full value is its slice of every chunk, unpadded.
/// Pure data movement, so each value is bit-identical to its own gather.
fn split_coalesced(
    result: Result<Vec<f32>, CommError>,
    shardings: &[Sharding],
) -> Vec<Option<Result<Vec<f32>, CommError>>> {
    let full = match result {
        Ok(full) => full,
        Err(err) => return shardings.iter().map(|_| Some(Err(err.clone()))).collect(),
    };
    let chunk: usize = shardings.iter().map(Sharding::shard_len).sum();
    let mut offset = 0;
    shardings
        .iter()
        .map(|sharding| {
            let len = sharding.shard_len();
            let mut value = Vec::with_capacity(sharding.padded_len());
            for part in 0..sharding.parts() {
                let at = part * chunk + offset;
                value.extend_from_slice(&full[at..at + len]);
            }
            value.truncate(sharding.numel());
            offset += len;
            Some(Ok(value))
        })
        .collect()
}

/// Start the gathers of parameters issued together: one all-gather of their
/// concatenated shards (one per parameter if there is only one).
pub(crate) fn start_together(sources: &[Arc<dyn GatherSource>]) -> Vec<Gathered> {
    if sources.len() == 1 {
        return vec![Gathered::Own(sources[0].start())];
    }
    let runtime = sources[0].runtime();
    let counters = &runtime.counters;
    counters
        .gathers
        .fetch_add(sources.len() as u64, Ordering::Relaxed);
    counters.gather_collectives.fetch_add(1, Ordering::Relaxed);
    let shardings: Vec<Sharding> = sources.iter().map(|s| s.sharding()).collect();
    let mut buffer = Vec::with_capacity(shardings.iter().map(Sharding::shard_len).sum());
    let dtype = runtime.precision().gather;
    for source in sources {
        counters
            .bytes_gathered
            .fetch_add(source.bytes(), Ordering::Relaxed);
        counters.bytes_gathered_wire.fetch_add(
            (source.sharding().numel() * dtype.size()) as u64,
            Ordering::Relaxed,
        );
        buffer.extend(source.host_shard());
    }
    let tag = Fingerprint::of_pieces(sources.iter().map(|s| s.fingerprint_words()));
    let work = crate::precision::all_gather_partition(runtime.groups(), dtype, buffer, tag);
    let parts = sources.len();
    let shared = Arc::new(Mutex::new(Coalesced {
        work: Some(work),
        shardings,
        parts: Vec::new(),
    }));
    (0..parts)
        .map(|i| Gathered::Part(shared.clone(), i))
        .collect()
}

/// The tensor as a tensor of the inner backend, a sharded parameter gathered
/// in full precision (f32 on the wire, whatever [`Precision::gather`] says):
/// the master values, for export. Not prefetched; no gathered bytes stay
/// counted after it returns.
pub(crate) fn local_exact<B: Backend>(tensor: MicsTensor<B>) -> B::FloatTensorPrimitive {
    let sharded = match tensor {
        MicsTensor::Local(t) => return t,
        MicsTensor::Sharded(s) => s,
    };
    let param = &sharded.param;
    let counters = &param.runtime.counters;
    let full = if param.sharding.parts() == 1 {
        let mut shard = staging::download::<B>(counters, param.shard.clone());
        shard.truncate(param.sharding.numel());
        shard
    } else {
        start_gather(param, mics_comm::DType::F32)
            .wait()
            .unwrap_or_else(|err| {
                panic!(
                    "mics: all-gather of parameter {} (slot {}, shape {:?}) for export in partition group {:?} (world ranks) failed: {err}",
                    param.id,
                    param.slot,
                    param.shape,
                    param.runtime.groups().partition().world_ranks(),
                )
            })
    };
    let device = B::float_device(&param.shard);
    let out = staging::upload::<B>(counters, full, param.shape.clone(), param.dtype, &device);
    sharded.views.iter().fold(out, |t, view| view.apply::<B>(t))
}
