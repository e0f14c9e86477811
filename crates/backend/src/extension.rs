//! Backend extensions for `Mics<B>`: how to implement a custom op.
//!
//! Burn's *backend extension* pattern adds an op to backends through a trait
//! (`trait MyOpBackend: Backend { fn my_op(...) -> FloatTensor<Self>; }`)
//! implemented by each backend, a decorator implementing it by unwrapping
//! its primitives and calling its inner backend. For `Mics<B>`, a float
//! primitive ([`MicsTensor`]) is a local tensor of `B` or a sharded
//! parameter, so an op does what every op of `Mics<B>` does:
//!
//! 1. [`into_inner`] each float input: a local tensor is unwrapped, a sharded
//!    parameter is gathered inside its partition group (a collective: every
//!    rank of the group must run the same op on the same parameters, in the
//!    same order) and its lazy views are applied;
//! 2. run `B`'s op on them, which consumes them;
//! 3. call [`release_gathered`] once the inputs are gone, so that the
//!    rank's counters of live gathered bytes drop again;
//! 4. wrap each float output with [`from_inner`].
//!
//! Int, bool and quantized primitives of `Mics<B>` are `B`'s, passed as they
//! are. The op's gradients, on `Autodiff<Mics<B>>`, are local tensors: the
//! sharded optimizer reduce-scatters them as any other parameter gradient.
//!
//! ```
//! use burn::tensor::backend::Backend;
//! use burn::tensor::ops::FloatTensor;
//! use mics_backend::Mics;
//! use mics_backend::extension::{from_inner, into_inner, release_gathered};
//!
//! /// A custom op: `a * b + a`.
//! trait MulAddBackend: Backend {
//!     fn mul_add_self(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
//!         Self::float_add(Self::float_mul(a.clone(), b), a)
//!     }
//! }
//!
//! impl MulAddBackend for burn::backend::NdArray {}
//!
//! impl<B: MulAddBackend> MulAddBackend for Mics<B> {
//!     fn mul_add_self(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
//!         let out = B::mul_add_self(into_inner(a), into_inner(b));
//!         release_gathered();
//!         from_inner(out)
//!     }
//! }
//! ```

use burn::tensor::backend::Backend;

use crate::MicsTensor;

/// The tensor as a tensor of the inner backend `B`, for `B`'s op: a local
/// tensor is unwrapped; a sharded parameter is gathered inside its partition
/// group (a collective) and its views are applied. Call [`release_gathered`]
/// once `B`'s op has consumed the tensors this returned.
pub fn into_inner<B: Backend>(tensor: MicsTensor<B>) -> B::FloatTensorPrimitive {
    crate::gather::local(tensor)
}

/// An output of `B`'s op as a tensor of `Mics<B>`: a local tensor of this
/// rank.
pub fn from_inner<B: Backend>(tensor: B::FloatTensorPrimitive) -> MicsTensor<B> {
    MicsTensor::Local(tensor)
}

/// Ends the life of the parameters [`into_inner`] gathered on this thread
/// since the last call: call it after the inner op that consumed them (it
/// updates the rank's live gathered bytes; see
/// [`Counters`](crate::Counters)).
pub fn release_gathered() {
    crate::gather::release_gathered()
}
