//! Per-thread random numbers: `Mics::seed` seeds a generator owned by the
//! calling thread, and `float_random` / `int_random` draw from it.
//!
//! In-process ranks are threads and inner backends such as NdArray keep one
//! process-wide generator, so without this the values each rank draws (a
//! dropout mask) would depend on how the threads interleave.

use std::cell::RefCell;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, FloatDType, IntDType, Shape, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

thread_local! {
    /// The generator seeded by `Mics::seed` on this thread, if any.
    static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Seed the calling thread's generator.
pub(crate) fn seed(seed: u64) {
    RNG.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Values drawn from the calling thread's generator, `None` when this thread
/// never called `Mics::seed`.
fn draw(f: impl FnOnce(&mut StdRng) -> TensorData) -> Option<TensorData> {
    RNG.with(|rng| rng.borrow_mut().as_mut().map(f))
}

/// Random floats from the thread's generator, uploaded with
/// `B::float_from_data`; `B::float_random` when the thread is not seeded.
pub(crate) fn float_random<B: Backend>(
    shape: Shape,
    distribution: Distribution,
    device: &B::Device,
    dtype: FloatDType,
) -> B::FloatTensorPrimitive {
    let data = draw(|rng| match dtype {
        FloatDType::F64 => TensorData::random::<f64, _, _>(shape.clone(), distribution, rng),
        FloatDType::F32 => TensorData::random::<f32, _, _>(shape.clone(), distribution, rng),
        other => TensorData::random::<f32, _, _>(shape.clone(), distribution, rng)
            .convert_dtype(DType::from(other)),
    });
    match data {
        Some(data) => B::float_from_data(data, device),
        None => B::float_random(shape, distribution, device, dtype),
    }
}

/// Random integers from the thread's generator (`Distribution::Default` is
/// uniform over `[0, 255)`, as in burn-ndarray); `B::int_random` when the
/// thread is not seeded.
pub(crate) fn int_random<B: Backend>(
    shape: Shape,
    distribution: Distribution,
    device: &B::Device,
    dtype: IntDType,
) -> B::IntTensorPrimitive {
    let sampled = match distribution {
        Distribution::Default => Distribution::Uniform(0.0, 255.0),
        other => other,
    };
    let data = draw(|rng| {
        TensorData::random::<i64, _, _>(shape.clone(), sampled, rng)
            .convert_dtype(DType::from(dtype))
    });
    match data {
        Some(data) => B::int_from_data(data, device),
        None => B::int_random(shape, distribution, device, dtype),
    }
}
