//! Host staging: where a collective's data leaves the inner backend's
//! memory for a host buffer, and comes back.
//!
//! The threads and MPI engines exchange host buffers, so every collective
//! of `Mics<B>` copies its input once from the backend to the host
//! ([`download`]) and its result once back ([`upload`]), and nowhere else.
//! On a CPU backend both are memory copies; on a GPU backend they cross the
//! PCIe bus. Each is counted ([`Counters::host_downloads`],
//! [`Counters::host_uploads`] and their bytes), so tests and benchmarks see
//! what staging costs.
//!
//! This module is the seam for an engine that works on device buffers
//! (NCCL on CUDA tensors): such an engine takes the backend's own buffer
//! here instead of a host copy, and the counters then stay at zero.
//!
//! [`Counters::host_downloads`]: crate::Counters::host_downloads
//! [`Counters::host_uploads`]: crate::Counters::host_uploads

use std::sync::atomic::Ordering;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, TensorData};

use crate::gather::primitive_to_vec;
use crate::runtime::AtomicCounters;

/// A tensor of the inner backend copied into a host `f32` buffer, for a
/// collective.
pub(crate) fn download<B: Backend>(
    counters: &AtomicCounters,
    tensor: B::FloatTensorPrimitive,
) -> Vec<f32> {
    let values = primitive_to_vec::<B>(tensor);
    counters.host_downloads.fetch_add(1, Ordering::Relaxed);
    counters
        .host_download_bytes
        .fetch_add((values.len() * 4) as u64, Ordering::Relaxed);
    values
}

/// A collective's host result copied into a tensor of the inner backend, of
/// `shape` and `dtype`.
pub(crate) fn upload<B: Backend>(
    counters: &AtomicCounters,
    values: Vec<f32>,
    shape: Shape,
    dtype: DType,
    device: &B::Device,
) -> B::FloatTensorPrimitive {
    counters.host_uploads.fetch_add(1, Ordering::Relaxed);
    counters
        .host_upload_bytes
        .fetch_add((values.len() * 4) as u64, Ordering::Relaxed);
    B::float_from_data(TensorData::new(values, shape).convert_dtype(dtype), device)
}
