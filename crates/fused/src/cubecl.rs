//! Burn's cubecl backends (`Wgpu`, `Cuda`): the generic implementation, for
//! `CubeBackend<R, F, I, BT>` and for `Fusion<B>` over it.

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

/// The backends behind the features implement the trait, with autodiff.
#[allow(dead_code)]
fn implemented<B: FusedCrossEntropyBackend>() {}

#[allow(dead_code)]
fn backends() {
    #[cfg(feature = "wgpu")]
    {
        implemented::<burn::backend::Wgpu>();
        implemented::<burn_autodiff::Autodiff<burn::backend::Wgpu>>();
        implemented::<mics_backend::Mics<burn::backend::Wgpu>>();
    }
    #[cfg(feature = "cuda")]
    {
        implemented::<burn::backend::Cuda>();
        implemented::<burn_autodiff::Autodiff<burn::backend::Cuda>>();
        implemented::<mics_backend::Mics<burn::backend::Cuda>>();
    }
}
