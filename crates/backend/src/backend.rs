//! The `Mics<B>` backend type.

use std::marker::PhantomData;

use burn::tensor::backend::{Backend, BackendTypes, DTypeUsageSet, ExecutionError};
use burn::tensor::ops::TransactionOps;
use burn::tensor::{DType, TensorData};

use crate::MicsTensor;

/// Burn backend decorator for MiCS: float tensors are local tensors of `B` or
/// sharded parameters, gathered inside their partition group when an op
/// computes on them. Int, bool and quantized tensors are `B`'s.
///
/// Train on `Autodiff<Mics<B>>`; see the crate docs.
#[derive(Clone, Default, Debug)]
pub struct Mics<B: Backend> {
    _inner: PhantomData<B>,
}

impl<B: Backend> BackendTypes for Mics<B> {
    type Device = B::Device;
    type FloatTensorPrimitive = MicsTensor<B>;
    type FloatElem = B::FloatElem;
    type IntTensorPrimitive = B::IntTensorPrimitive;
    type IntElem = B::IntElem;
    type BoolTensorPrimitive = B::BoolTensorPrimitive;
    type BoolElem = B::BoolElem;
    type QuantizedTensorPrimitive = B::QuantizedTensorPrimitive;
}

impl<B: Backend> Backend for Mics<B> {
    fn name(device: &Self::Device) -> String {
        format!("mics<{}>", B::name(device))
    }

    /// Seeds a generator owned by the calling thread (each in-process rank
    /// is a thread), from which `float_random` and `int_random` then draw on
    /// this thread, and seeds the inner backend too.
    fn seed(device: &Self::Device, seed: u64) {
        crate::random::seed(seed);
        B::seed(device, seed)
    }

    fn sync(device: &Self::Device) -> Result<(), ExecutionError> {
        B::sync(device)
    }

    fn staging<'a, Iter>(data: Iter, device: &Self::Device)
    where
        Iter: Iterator<Item = &'a mut TensorData>,
    {
        B::staging(data, device)
    }

    fn dtype_usage(device: &Self::Device, dtype: DType) -> DTypeUsageSet {
        B::dtype_usage(device, dtype)
    }

    fn device_count(type_id: u16) -> usize {
        B::device_count(type_id)
    }

    fn memory_cleanup(device: &Self::Device) {
        B::memory_cleanup(device)
    }
}

impl<B: Backend> TransactionOps<Self> for Mics<B> {}
