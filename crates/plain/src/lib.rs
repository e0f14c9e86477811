//! `Plain<B>`: Burn's backend `B`, unchanged, made a
//! [`DistributedBackend`](burn_backend::distributed::DistributedBackend).
//!
//! `mics-backend` reduces gradients during backward through Burn 0.21's
//! `distributed` autodiff feature. Cargo unifies features over a build, and
//! with that feature `Autodiff<B>` is an autodiff backend only for
//! `B: DistributedBackend`, which `NdArray` is not (and, by the orphan rule,
//! cannot be made from here). `Autodiff<Plain<NdArray>>` is: every op of
//! `Plain<B>` is forwarded to `B` with the same primitives, and its
//! distributed hooks do nothing (no tensor of it is ever marked for
//! gradient sync). Use it wherever plain Burn is meant, in a build that also
//! trains on `Autodiff<Mics<B>>`: the one-process references of the parity
//! tests (which then do not run through the code under test), the models'
//! own tests and the plain-Burn baselines of the benchmarks.
//!
//! The ops are generated (`crates/backend/gen/delegate.py`, one file per ops
//! trait, as burn-autodiff splits its own).
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::Tensor;
//! use mics_plain::Plain;
//!
//! type B = Autodiff<Plain<NdArray>>;
//! let device = Default::default();
//! let x = Tensor::<B, 1>::from_floats([1.0, 2.0, 3.0], &device).require_grad();
//! let grads = x.clone().powi_scalar(2).sum().backward();
//! let dx = x.grad(&grads).unwrap().into_data();
//! assert_eq!(dx.to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
//! ```

#![warn(missing_docs)]

mod convert;
mod ops;

use std::marker::PhantomData;

use burn::tensor::backend::{Backend, BackendTypes, DTypeUsageSet, ExecutionError};
use burn::tensor::ops::TransactionOps;
use burn::tensor::{DType, TensorData};
use burn_backend::distributed::DistributedBackend;

/// Burn's backend `B` with nothing added but a no-op
/// [`DistributedBackend`]: see the crate docs.
#[derive(Clone, Default, Debug)]
pub struct Plain<B: Backend> {
    _inner: PhantomData<B>,
}

impl<B: Backend> BackendTypes for Plain<B> {
    type Device = B::Device;
    type FloatTensorPrimitive = B::FloatTensorPrimitive;
    type FloatElem = B::FloatElem;
    type IntTensorPrimitive = B::IntTensorPrimitive;
    type IntElem = B::IntElem;
    type BoolTensorPrimitive = B::BoolTensorPrimitive;
    type BoolElem = B::BoolElem;
    type QuantizedTensorPrimitive = B::QuantizedTensorPrimitive;
}

impl<B: Backend> Backend for Plain<B> {
    fn name(device: &Self::Device) -> String {
        B::name(device)
    }

    fn seed(device: &Self::Device, seed: u64) {
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

impl<B: Backend> TransactionOps<Self> for Plain<B> {}

/// No tensor of `Plain<B>` is marked for gradient sync, so Burn never calls
/// these hooks; the defaults that would need a sync server are no-ops.
impl<B: Backend> DistributedBackend for Plain<B> {
    fn sync_collective(_device: &Self::Device) {}
}
