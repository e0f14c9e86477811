//! `Mics<B>`'s ops: generated delegation plus the few ops written by hand.

mod delegate;
mod manual;

mod prelude {
    pub(super) use super::manual;
    pub(super) use crate::gather::{local, release_gathered};
    pub(super) use crate::{Mics, MicsTensor};
    pub(super) use burn::tensor::backend::{Backend, ExecutionError};
    pub(super) use burn::tensor::ops::*;
    pub(super) use burn::tensor::quantization::{QuantScheme, QuantizationParametersPrimitive};
    pub(super) use burn::tensor::{
        BoolDType, Distribution, FloatDType, IndexingUpdateOp, IntDType, Scalar, Shape, Slice,
        TensorData,
    };
    pub(super) use std::future::Future;
    pub(super) use std::ops::Range;
}
