//! Burn's cubecl backends (behind `burn::backend::Wgpu`, `Cuda`, ...): the
//! generic implementation, for `CubeBackend<R, F, I, BT>` over any runtime
//! `R` and for `Fusion<B>` over any fusion backend.
//!
//! The `cubecl` feature names no runtime and turns on none of burn-cubecl's
//! defaults (fusion, autotune): the crate that picks the backend enables
//! them, or not (the trainer runs wgpu as `CubeBackend<WgpuRuntime, f32,
//! i32, u32>`, without fusion, autotune off).

use burn::tensor::backend::DeviceOps;
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{Fusion, FusionBackend};

use crate::FusedCrossEntropyBackend;

impl<R, F, I, BT> FusedCrossEntropyBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: ComputeServer,
    R::Device: DeviceOps,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
}

impl<B: FusionBackend> FusedCrossEntropyBackend for Fusion<B> {}

/// Compile-time checks: the backends built from these, and their decorators,
/// implement the trait, whatever the runtime (no runtime is compiled in).
#[allow(dead_code)]
mod checks {
    use burn_autodiff::Autodiff;
    use mics_backend::Mics;
    use mics_plain::Plain;

    use super::*;

    fn implemented<B: FusedCrossEntropyBackend>() {}

    /// The trainer's wgpu backend (`burn_wgpu::CubeBackend<WgpuRuntime,
    /// f32, i32, u32>`, also `burn::backend::Wgpu` without fusion) is the
    /// first with `R = WgpuRuntime`; `burn::backend::Cuda` without fusion is
    /// the second with `R = CudaRuntime`.
    fn cube<R>()
    where
        R: CubeRuntime,
        R::Server: ComputeServer,
        R::Device: DeviceOps,
    {
        implemented::<CubeBackend<R, f32, i32, u32>>();
        implemented::<CubeBackend<R, f32, i32, u8>>();
        implemented::<Autodiff<CubeBackend<R, f32, i32, u32>>>();
        implemented::<Mics<CubeBackend<R, f32, i32, u32>>>();
        implemented::<Autodiff<Mics<CubeBackend<R, f32, i32, u32>>>>();
        implemented::<Autodiff<Plain<CubeBackend<R, f32, i32, u32>>>>();
    }

    fn fusion<B: FusionBackend>() {
        implemented::<Fusion<B>>();
        implemented::<Autodiff<Fusion<B>>>();
        implemented::<Autodiff<Mics<Fusion<B>>>>();
    }
}
