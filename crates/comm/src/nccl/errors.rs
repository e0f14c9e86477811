//! The NCCL engine's errors: CUDA and NCCL failures as [`CommError::Engine`],
//! and panics inside `cudarc` (its loader panics on a missing library or
//! symbol) turned into errors.

use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use cudarc::driver::DriverError;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::sys;

use crate::CommError;
use crate::worker::panic_text;

/// The engine's name in [`CommError::Engine`].
const ENGINE: &str = "nccl";

/// An error of the NCCL engine.
pub(super) fn engine_error(message: impl Into<String>) -> CommError {
    CommError::Engine {
        engine: ENGINE,
        message: message.into(),
    }
}

/// A failed CUDA driver call.
pub(super) fn cuda_error(what: &str, err: DriverError) -> CommError {
    engine_error(format!("CUDA {what} failed: {err:?}"))
}

/// A failed NCCL call, with NCCL's own description and last error.
pub(super) fn nccl_error(what: &str, err: NcclError, comm: Option<sys::ncclComm_t>) -> CommError {
    // Both functions return static (or communicator-owned) C strings;
    // ncclGetLastError ignores its argument and exists from NCCL 2.13 on, so
    // an older library's missing symbol (a cudarc panic) only loses detail.
    let comm = comm.unwrap_or(std::ptr::null_mut());
    let describe =
        catch_unwind(|| unsafe { cstr(sys::ncclGetErrorString(err.0)) }).unwrap_or_default();
    let last = catch_unwind(|| unsafe { cstr(sys::ncclGetLastError(comm)) }).unwrap_or_default();
    let mut message = format!("{what} failed: {:?} ({describe})", err.0);
    if !last.is_empty() {
        message.push_str(": ");
        message.push_str(&last);
    }
    engine_error(message)
}

/// # Safety
/// `ptr` is null or a NUL-terminated string.
unsafe fn cstr(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Runs `f`, turning a panic inside `cudarc` (its dynamic loader panics on a
/// missing library or symbol) into an engine error.
pub(super) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, CommError>,
) -> Result<T, CommError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(engine_error(format!(
            "{what}: cudarc panicked: {}. Check that the CUDA driver (libcuda.so) and NCCL \
             (libnccl.so) are recent enough and on LD_LIBRARY_PATH",
            panic_text(payload.as_ref())
        ))),
    }
}
