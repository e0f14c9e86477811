//! Compute devices: the inner backend `B` of `Autodiff<Mics<B>>` that a
//! `--device` and `--precision` select, and the one place that maps one to
//! the other.
//!
//! | device | backend | fp32 | bf16 | fp16 |
//! |---|---|---|---|---|
//! | `cpu` | NdArray | f32 | f32 compute, bf16 collectives | f32 compute, f16 collectives |
//! | `wgpu` | Burn's wgpu (CubeCL, no fusion) | f32 | (no bf16 in WGSL: an error) | f16 |
//! | `cuda[:i]` | Burn's CUDA (CubeCL + fusion) | f32 | bf16 | f16 |
//!
//! Whatever the compute type, parameter shards and optimizer moments are
//! f32 master copies (`mics-backend`).

use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use mics_fused::FusedCrossEntropyBackend;

use crate::{Device, Precision, TrainError};

/// What the trainer computes on: any Burn backend with the fused LM head +
/// cross-entropy (every backend has it, through `mics-fused`).
pub trait TrainBackend: Backend + FusedCrossEntropyBackend {}

impl<B: Backend + FusedCrossEntropyBackend> TrainBackend for B {}

/// Something to run on the backend a device and precision select (a generic
/// function, as a trait: Rust closures cannot be generic).
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs on backend `B`, device `device`.
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend of `device` in `precision`: the compute type
/// of the table in the module docs. An error, before anything runs, when
/// the build lacks the device's feature or the device has no such type.
pub fn with_backend<T: BackendTask>(
    device: Device,
    precision: Precision,
    task: T,
) -> Result<T::Output, TrainError> {
    match device {
        Device::Cpu => Ok(task.run::<NdArray>(Default::default())),
        Device::Wgpu => wgpu(precision, task),
        Device::Cuda(index) => cuda(index, precision, task),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu<T: BackendTask>(precision: Precision, task: T) -> Result<T::Output, TrainError> {
    use burn::tensor::f16;
    use burn_wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
    type Wgpu<F> = CubeBackend<WgpuRuntime, F, i32, u32>;
    let device = WgpuDevice::DefaultDevice;
    match precision {
        Precision::Fp32 => Ok(task.run::<Wgpu<f32>>(device)),
        Precision::Fp16 => Ok(task.run::<Wgpu<f16>>(device)),
        Precision::Bf16 => Err(TrainError::Device {
            device: "wgpu".into(),
            problem: "WGSL has no bfloat16: use --precision fp16 (or fp32)".into(),
        }),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu<T: BackendTask>(_: Precision, _: T) -> Result<T::Output, TrainError> {
    Err(TrainError::FeatureMissing {
        what: "--device wgpu".into(),
        feature: "wgpu",
    })
}

#[cfg(feature = "cuda")]
fn cuda<T: BackendTask>(
    index: usize,
    precision: Precision,
    task: T,
) -> Result<T::Output, TrainError> {
    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::{bf16, f16};
    let device = CudaDevice::new(index);
    Ok(match precision {
        Precision::Fp32 => task.run::<Cuda<f32>>(device),
        Precision::Bf16 => task.run::<Cuda<bf16>>(device),
        Precision::Fp16 => task.run::<Cuda<f16>>(device),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda<T: BackendTask>(_: usize, _: Precision, _: T) -> Result<T::Output, TrainError> {
    Err(TrainError::FeatureMissing {
        what: "--device cuda".into(),
        feature: "cuda",
    })
}

/// Whether `device` of backend `B` works: one tiny tensor made and read
/// back. A missing GPU, driver or Vulkan adapter makes Burn's backends
/// panic on first use; this turns that into one error naming the device.
pub(crate) fn probe<B: Backend>(name: Device, device: &B::Device) -> Result<(), TrainError> {
    // Quietly: the hook stays the process's (swapping it from several rank
    // threads at once could leave the silent one installed).
    let result = crate::panics::quietly(|| Tensor::<B, 1>::ones([2], device).sum().into_scalar());
    match result {
        Ok(_) => Ok(()),
        Err((text, _)) => Err(TrainError::Device {
            device: name.to_string(),
            problem: text,
        }),
    }
}

/// A panic payload as text.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// `fresh` holding the values of `record` (Burn record bytes at full
/// precision, as the launcher builds them once for every rank).
pub(crate) fn load_record<B: Backend, M: Module<B>>(
    fresh: M,
    record: &[u8],
    device: &B::Device,
) -> Result<M, TrainError> {
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let record = Recorder::<B>::load(&recorder, record.to_vec(), device)
        .map_err(|e| TrainError::Engine(format!("cannot load the initial model: {e}")))?;
    Ok(fresh.load_record(record))
}

/// Every parameter of `model` as f32 host data, in module order (for
/// comparisons across devices).
pub fn param_values<B: Backend, M: Module<B>>(model: &M) -> Vec<Vec<f32>> {
    struct Values(Vec<Vec<f32>>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Values {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0
                .push(data.into_vec::<f32>().expect("converted to f32"));
        }
    }
    let mut v = Values(Vec::new());
    model.visit(&mut v);
    v.0
}
