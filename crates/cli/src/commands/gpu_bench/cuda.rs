//! What only a CUDA build has: the probe of the libraries Burn's CUDA
//! backend loads, device memory figures and the NCCL sanity suite
//! ([`mics_comm::nccl::sanity`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mics_comm::nccl::sanity::{self, Options};
use mics_comm::nccl::{self, CudaLibrary};
use serde_json::{Value, json};

/// Where CubeCL looks for the CUDA toolkit (its `install::cuda_path`):
/// `CUDA_PATH`, `/usr/local/cuda`, `/opt/cuda`, `/usr` when `/usr/bin/nvcc`
/// exists.
pub fn cubecl_cuda_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CUDA_PATH") {
        return Some(PathBuf::from(path));
    }
    ["/usr/local/cuda", "/opt/cuda"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| Path::new("/usr/bin/nvcc").exists().then(|| "/usr".into()))
}

/// Checks, without panicking, what Burn's CUDA backend needs at run time:
/// the driver (`libcuda.so`), NVRTC (`libnvrtc.so`), a visible device,
/// and the CUDA headers NVRTC compiles CubeCL's kernels against
/// (`$CUDA_PATH/include/cuda_runtime.h`).
pub fn probe() -> anyhow::Result<()> {
    for lib in [CudaLibrary::Driver, CudaLibrary::Nvrtc] {
        if !lib.is_present() {
            bail!(
                "Burn's CUDA backend cannot start: {}",
                lib.missing_message(&lib.find_files())
            );
        }
    }
    let devices = nccl::device_count().context("Burn's CUDA backend cannot start")?;
    if devices == 0 {
        bail!(
            "Burn's CUDA backend cannot start: no CUDA device is visible \
             (CUDA_VISIBLE_DEVICES={:?})",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        );
    }
    match cubecl_cuda_path() {
        Some(root) if root.join("include/cuda_runtime.h").exists() => Ok(()),
        Some(root) => bail!(
            "Burn's CUDA backend cannot compile kernels: {} has no include/cuda_runtime.h. \
             NVRTC compiles CubeCL's kernels against the CUDA headers: set CUDA_PATH to a \
             CUDA toolkit, the directory holding include/cuda_runtime.h and \
             include/cuda_bf16.h (e.g. /usr/local/cuda-13)",
            root.display()
        ),
        None => bail!(
            "Burn's CUDA backend cannot compile kernels: no CUDA toolkit found (CUDA_PATH \
             unset, no /usr/local/cuda, /opt/cuda or /usr/bin/nvcc). NVRTC compiles \
             CubeCL's kernels against the CUDA headers: set CUDA_PATH to the directory \
             holding include/cuda_runtime.h and include/cuda_bf16.h"
        ),
    }
}

/// Device memory of one GPU through the driver (`cuMemGetInfo`).
pub struct DeviceMemory {
    context: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl DeviceMemory {
    /// Retains device `ordinal`'s primary context (the one CubeCL uses).
    pub fn new(ordinal: usize) -> anyhow::Result<DeviceMemory> {
        let context = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("CUDA context on device {ordinal}: {e:?}"))?;
        Ok(DeviceMemory { context })
    }

    /// `(used, total)` bytes of the whole device.
    pub fn sample(&self) -> Option<(u64, u64)> {
        self.context.bind_to_thread().ok()?;
        let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }
}

/// The NCCL part of `scripts/gpu-bench`: the NCCL sanity suite on GPU 0
/// ([`sanity::run`], without the checks that need child processes), as
/// this part's JSON report.
pub fn nccl_sanity() -> anyhow::Result<Value> {
    // SAFETY: no other thread has started yet (clap only parsed).
    unsafe { sanity::enable_multi_rank_gpu() };
    let options = Options {
        name: "gpu-bench nccl",
        child_processes: false,
    };
    let report = sanity::run(&options)?;
    let mut value: Value = serde_json::from_str(&format!("{{{}}}", report.json_fields()))
        .context("the NCCL sanity report is not JSON")?;
    value["bench"] = json!("gpu-bench");
    value["part"] = json!("nccl");
    Ok(value)
}
