//! The structs of Burn's ops that name their backend, from `B`'s to
//! `Plain<B>`'s: the fields are the same primitives.

use burn::tensor::TensorPrimitive;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{
    DeformConv2dBackward, MaxPool1dBackward, MaxPool1dWithIndices, MaxPool2dBackward,
    MaxPool2dWithIndices,
};
use burn::tensor::quantization::QuantizationParametersPrimitive;

use crate::Plain;

pub fn deform_conv2d_backward<B: Backend>(
    b: DeformConv2dBackward<B>,
) -> DeformConv2dBackward<Plain<B>> {
    DeformConv2dBackward {
        x_grad: b.x_grad,
        offset_grad: b.offset_grad,
        weight_grad: b.weight_grad,
        mask_grad: b.mask_grad,
        bias_grad: b.bias_grad,
    }
}

pub fn max_pool1d_with_indices<B: Backend>(
    m: MaxPool1dWithIndices<B>,
) -> MaxPool1dWithIndices<Plain<B>> {
    MaxPool1dWithIndices {
        output: m.output,
        indices: m.indices,
    }
}

pub fn max_pool1d_backward<B: Backend>(m: MaxPool1dBackward<B>) -> MaxPool1dBackward<Plain<B>> {
    MaxPool1dBackward { x_grad: m.x_grad }
}

pub fn max_pool2d_with_indices<B: Backend>(
    m: MaxPool2dWithIndices<B>,
) -> MaxPool2dWithIndices<Plain<B>> {
    MaxPool2dWithIndices {
        output: m.output,
        indices: m.indices,
    }
}

pub fn max_pool2d_backward<B: Backend>(m: MaxPool2dBackward<B>) -> MaxPool2dBackward<Plain<B>> {
    MaxPool2dBackward { x_grad: m.x_grad }
}

pub fn tensor_primitive<B: Backend>(t: TensorPrimitive<B>) -> TensorPrimitive<Plain<B>> {
    match t {
        TensorPrimitive::Float(t) => TensorPrimitive::Float(t),
        TensorPrimitive::QFloat(t) => TensorPrimitive::QFloat(t),
    }
}

pub fn tensor_primitive_in<B: Backend>(t: TensorPrimitive<Plain<B>>) -> TensorPrimitive<B> {
    match t {
        TensorPrimitive::Float(t) => TensorPrimitive::Float(t),
        TensorPrimitive::QFloat(t) => TensorPrimitive::QFloat(t),
    }
}

pub fn qparams<B: Backend>(
    q: QuantizationParametersPrimitive<Plain<B>>,
) -> QuantizationParametersPrimitive<B> {
    QuantizationParametersPrimitive { scales: q.scales }
}
