//! Ops that cannot be forwarded mechanically: lazy views on sharded
//! parameters, device queries, and ops with structured results.

use burn::tensor::backend::{Backend, ExecutionError};
use burn::tensor::ops::{
    DeformConv2dBackward, DeformConvOptions, FloatTensor, IntTensor, MaxPool2dBackward,
    MaxPool2dWithIndices, QuantizedTensor,
};
use burn::tensor::quantization::{QuantScheme, QuantizationParametersPrimitive};
use burn::tensor::{Device, Distribution, FloatDType, IntDType, Shape, Slice, TensorData};

use crate::gather::{local, release_gathered};
use crate::tensor::View;
use crate::{Mics, MicsTensor};

type F<I> = FloatTensor<Mics<I>>;

fn view<I: Backend>(
    tensor: F<I>,
    v: View,
    on_local: impl FnOnce(I::FloatTensorPrimitive) -> I::FloatTensorPrimitive,
) -> F<I> {
    match tensor {
        MicsTensor::Local(t) => MicsTensor::Local(on_local(t)),
        MicsTensor::Sharded(s) => MicsTensor::Sharded(s.with_view(v)),
    }
}

/// A stand-in for an argument the inner op reads for its shape, dtype and
/// device only (a weight whose gradient is computed): a sharded parameter
/// becomes an uninitialised tensor of its logical shape, without a gather.
pub fn stand_in<I: Backend>(tensor: F<I>) -> I::FloatTensorPrimitive {
    match tensor {
        MicsTensor::Local(t) => t,
        MicsTensor::Sharded(s) => {
            let device = I::float_device(&s.param.shard);
            let dtype = s.param.dtype.into();
            I::float_empty(s.shape.clone(), &device, dtype)
        }
    }
}

pub fn float_reshape<I: Backend>(tensor: F<I>, shape: Shape) -> F<I> {
    view(tensor, View::Reshape(shape.clone()), |t| {
        I::float_reshape(t, shape)
    })
}

pub fn float_swap_dims<I: Backend>(tensor: F<I>, dim1: usize, dim2: usize) -> F<I> {
    view(tensor, View::SwapDims(dim1, dim2), |t| {
        I::float_swap_dims(t, dim1, dim2)
    })
}

pub fn float_permute<I: Backend>(tensor: F<I>, axes: &[usize]) -> F<I> {
    view(tensor, View::Permute(axes.to_vec()), |t| {
        I::float_permute(t, axes)
    })
}

pub fn float_expand<I: Backend>(tensor: F<I>, shape: Shape) -> F<I> {
    view(tensor, View::Expand(shape.clone()), |t| {
        I::float_expand(t, shape)
    })
}

pub fn float_slice<I: Backend>(tensor: F<I>, slices: &[Slice]) -> F<I> {
    view(tensor, View::Slice(slices.to_vec()), |t| {
        I::float_slice(t, slices)
    })
}

/// From the calling thread's generator once `Mics::seed` was called on it
/// (see `random.rs`), else from the inner backend's.
pub fn float_random<I: Backend>(
    shape: Shape,
    distribution: Distribution,
    device: &Device<Mics<I>>,
    dtype: FloatDType,
) -> F<I> {
    MicsTensor::Local(crate::random::float_random::<I>(
        shape,
        distribution,
        device,
        dtype,
    ))
}

/// As [`float_random`], for integers.
pub fn int_random<I: Backend>(
    shape: Shape,
    distribution: Distribution,
    device: &Device<Mics<I>>,
    dtype: IntDType,
) -> IntTensor<Mics<I>> {
    crate::random::int_random::<I>(shape, distribution, device, dtype)
}

pub fn float_device<I: Backend>(tensor: &F<I>) -> Device<Mics<I>> {
    match tensor {
        MicsTensor::Local(t) => I::float_device(t),
        MicsTensor::Sharded(s) => I::float_device(&s.param.shard),
    }
}

/// A sharded parameter already on `device` stays sharded; moving one to
/// another device gathers it.
pub fn float_to_device<I: Backend>(tensor: F<I>, device: &Device<Mics<I>>) -> F<I> {
    if let MicsTensor::Sharded(s) = &tensor
        && I::float_device(&s.param.shard) == *device
    {
        return tensor;
    }
    let out = I::float_to_device(local(tensor), device);
    release_gathered();
    MicsTensor::Local(out)
}

pub fn float_into_data<I: Backend>(
    tensor: F<I>,
) -> impl Future<Output = Result<TensorData, ExecutionError>> + Send {
    let t = local(tensor);
    release_gathered();
    I::float_into_data(t)
}

pub fn quantize<I: Backend>(
    tensor: F<I>,
    scheme: &QuantScheme,
    qparams: QuantizationParametersPrimitive<Mics<I>>,
) -> QuantizedTensor<Mics<I>> {
    let qparams = QuantizationParametersPrimitive {
        scales: local(qparams.scales),
    };
    let out = I::quantize(local(tensor), scheme, qparams);
    release_gathered();
    out
}

#[allow(clippy::too_many_arguments)]
pub fn deform_conv2d_backward<I: Backend>(
    x: F<I>,
    offset: F<I>,
    weight: F<I>,
    mask: Option<F<I>>,
    bias: Option<F<I>>,
    output_grad: F<I>,
    options: DeformConvOptions<2>,
) -> DeformConv2dBackward<Mics<I>> {
    let out = I::deform_conv2d_backward(
        local(x),
        local(offset),
        local(weight),
        mask.map(local),
        bias.map(local),
        local(output_grad),
        options,
    );
    release_gathered();
    DeformConv2dBackward {
        x_grad: MicsTensor::Local(out.x_grad),
        offset_grad: MicsTensor::Local(out.offset_grad),
        weight_grad: MicsTensor::Local(out.weight_grad),
        mask_grad: out.mask_grad.map(MicsTensor::Local),
        bias_grad: out.bias_grad.map(MicsTensor::Local),
    }
}

pub fn max_pool2d_with_indices<I: Backend>(
    x: F<I>,
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
) -> MaxPool2dWithIndices<Mics<I>> {
    let out =
        I::max_pool2d_with_indices(local(x), kernel_size, stride, padding, dilation, ceil_mode);
    release_gathered();
    MaxPool2dWithIndices {
        output: MicsTensor::Local(out.output),
        indices: out.indices,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn max_pool2d_with_indices_backward<I: Backend>(
    x: F<I>,
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    output_grad: F<I>,
    indices: IntTensor<Mics<I>>,
) -> MaxPool2dBackward<Mics<I>> {
    let out = I::max_pool2d_with_indices_backward(
        local(x),
        kernel_size,
        stride,
        padding,
        dilation,
        ceil_mode,
        local(output_grad),
        indices,
    );
    release_gathered();
    MaxPool2dBackward {
        x_grad: MicsTensor::Local(out.x_grad),
    }
}
