//! Which CUDA libraries the NCCL path loads at run time, whether they can be
//! loaded, where copies of them lie when they cannot (one finder for every
//! caller), and what to tell the user; the NCCL version and the device count.

use std::panic::catch_unwind;
use std::path::{Path, PathBuf};

use cudarc::driver::CudaContext;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;

use super::errors::{cuda_error, engine_error, guarded, nccl_error};
use crate::CommError;

/// A shared library the CUDA path loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLibrary {
    /// The CUDA driver, `libcuda.so` (comes with the NVIDIA driver).
    Driver,
    /// The CUDA run-time compiler, `libnvrtc.so` (Burn's CUDA kernels need it;
    /// the NCCL engine does not).
    Nvrtc,
    /// NCCL, `libnccl.so`.
    Nccl,
}

impl CudaLibrary {
    /// The file name `cudarc` looks for first.
    pub fn file_name(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "libcuda.so",
            CudaLibrary::Nvrtc => "libnvrtc.so",
            CudaLibrary::Nccl => "libnccl.so",
        }
    }

    /// Whether `cudarc` can load it (its own search, without panicking).
    pub fn is_present(self) -> bool {
        let probe = || unsafe {
            match self {
                CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLibrary::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                CudaLibrary::Nccl => sys::is_culib_present(),
            }
        };
        catch_unwind(probe).unwrap_or(false)
    }

    /// The start of the names of its files (versioned ones included:
    /// `libcuda.so` finds `libcuda.so.1`), as [`find_library_files`] takes
    /// it. For NCCL, the `libnccl.so.2` that Python wheels ship.
    pub fn file_prefix(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "libcuda.so",
            CudaLibrary::Nvrtc => "libnvrtc.so",
            CudaLibrary::Nccl => "libnccl.so.2",
        }
    }

    /// Copies of the library in the usual directories ([`library_dirs`]).
    pub fn find_files(self) -> Vec<PathBuf> {
        find_library_files(self.file_prefix())
    }

    /// Why the library cannot be loaded and how to fix it, given the copies
    /// of it that were `found` (see [`CudaLibrary::find_files`]).
    pub fn missing_message(self, found: &[PathBuf]) -> String {
        let lib = self.file_name();
        let what = match self {
            CudaLibrary::Driver => "the CUDA driver",
            CudaLibrary::Nvrtc => "NVRTC, the CUDA run-time compiler",
            CudaLibrary::Nccl => return nccl_missing_message(found),
        };
        let mut message = format!("{lib} ({what}) could not be loaded");
        match found.first() {
            Some(path) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                message.push_str(&format!(
                    ", but {} exists: add its directory to the library path \
                     (`export LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH`)",
                    path.display(),
                    dir.display(),
                ));
                if path.file_name().is_some_and(|f| f != lib) {
                    message.push_str(&format!(
                        "; if that is not enough, link it as {lib} in a directory on \
                         LD_LIBRARY_PATH (`ln -s {} DIR/{lib}`): cudarc looks for {lib} and a \
                         few versioned names",
                        path.display()
                    ));
                }
            }
            None => message.push_str(&match self {
                CudaLibrary::Driver => format!(
                    ": this machine has no NVIDIA driver, or its directory is not searched. \
                     Install the NVIDIA driver, or add the directory holding {lib} (e.g. \
                     /usr/lib/x86_64-linux-gnu or /usr/local/cuda/compat) to LD_LIBRARY_PATH"
                ),
                _ => ". Install the CUDA toolkit (or the PyPI wheel nvidia-cuda-nvrtc) and add \
                      its lib directory (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
                    .to_string(),
            }),
        }
        message
    }

    fn missing_error(self) -> CommError {
        engine_error(self.missing_message(&self.find_files()))
    }
}

/// The error text for a missing `libnccl.so`, given where `libnccl.so.2`
/// files were found (if any): the symlink that makes a wheel's NCCL loadable.
pub fn nccl_missing_message(found_so2: &[PathBuf]) -> String {
    let mut message =
        String::from("libnccl.so (NCCL) could not be loaded: cudarc looks for the name libnccl.so");
    match found_so2.first() {
        Some(path) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            message.push_str(&format!(
                ", but this machine has only {} (the PyPI wheel nvidia-nccl-cu13, which torch \
                 uses, ships only libnccl.so.2). Fix: \
                 `mkdir -p ~/.cache/mics/nccl && ln -sf {} ~/.cache/mics/nccl/libnccl.so && \
                 export LD_LIBRARY_PATH=$HOME/.cache/mics/nccl:{}:$LD_LIBRARY_PATH` \
                 (scripts/nccl-sanity does this)",
                path.display(),
                path.display(),
                dir.display()
            ));
        }
        None => message.push_str(
            ", and no libnccl.so.2 was found either. Install NCCL (Debian/Ubuntu: libnccl2 and \
             libnccl-dev; or `pip install nvidia-nccl-cu13`, then symlink its \
             nvidia/nccl/lib/libnccl.so.2 as libnccl.so in a directory on LD_LIBRARY_PATH)",
        ),
    }
    message
}

/// Where CUDA libraries are looked for, in order: `LD_LIBRARY_PATH`, the
/// system's directories, the CUDA toolkit's, and the `nvidia/*/lib`
/// directories of Python wheels (torch's NCCL, NVRTC, ...) under every
/// `site-packages` of `python3`.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        dirs.push(dir.into());
    }
    for site in python_sys_path() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut libs: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("lib")).collect();
            libs.sort();
            dirs.extend(libs);
        }
    }
    dirs
}

/// `sys.path` of `python3`, if there is one.
fn python_sys_path() -> Vec<PathBuf> {
    std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .stderr(std::process::Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Files whose name starts with `prefix` (e.g. `libnvrtc.so`, which finds
/// `libnvrtc.so.13` too) in the [`library_dirs`], in search order (names
/// sorted within a directory), each path once.
pub fn find_library_files(prefix: &str) -> Vec<PathBuf> {
    find_in(&library_dirs(), prefix)
}

/// [`find_library_files`] in `dirs`.
fn find_in(dirs: &[PathBuf], prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut here: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        here.sort();
        for path in here {
            if !found.contains(&path) {
                found.push(path);
            }
        }
    }
    found
}

/// Checks that `libs` can be loaded; the first missing one is an error that
/// names it and says how to fix it.
pub fn check_libraries(libs: &[CudaLibrary]) -> Result<(), CommError> {
    for &lib in libs {
        if !lib.is_present() {
            return Err(lib.missing_error());
        }
    }
    Ok(())
}

/// The libraries the NCCL engine needs: the driver and NCCL.
pub const ENGINE_LIBRARIES: [CudaLibrary; 2] = [CudaLibrary::Driver, CudaLibrary::Nccl];

/// A NCCL version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl NcclVersion {
    /// From `ncclGetVersion`'s code (`major*10000 + minor*100 + patch` since
    /// NCCL 2.9, `major*1000 + minor*100 + patch` before).
    pub fn from_code(code: u32) -> NcclVersion {
        if code >= 10000 {
            NcclVersion {
                major: code / 10000,
                minor: code / 100 % 100,
                patch: code % 100,
            }
        } else {
            NcclVersion {
                major: code / 1000,
                minor: code / 100 % 10,
                patch: code % 100,
            }
        }
    }

    /// Whether this is at least `major.minor.patch`.
    pub fn at_least(self, major: u32, minor: u32, patch: u32) -> bool {
        self >= NcclVersion {
            major,
            minor,
            patch,
        }
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version of the NCCL library that is loaded (`ncclGetVersion`).
pub fn nccl_version() -> Result<NcclVersion, CommError> {
    check_libraries(&[CudaLibrary::Nccl])?;
    guarded("ncclGetVersion", || {
        let code = nccl::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e, None))?;
        Ok(NcclVersion::from_code(code.max(0) as u32))
    })
}

/// Number of CUDA devices visible to this process.
pub fn device_count() -> Result<usize, CommError> {
    check_libraries(&[CudaLibrary::Driver])?;
    guarded("cuDeviceGetCount", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| cuda_error("cuInit/cuDeviceGetCount", e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_nccl_message_names_the_symlink_fix() {
        let so2 = PathBuf::from("/py/site-packages/nvidia/nccl/lib/libnccl.so.2");
        let message = nccl_missing_message(std::slice::from_ref(&so2));
        assert!(message.contains("libnccl.so.2"), "{message}");
        assert!(message.contains("ln -sf /py/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        assert!(message.contains("LD_LIBRARY_PATH"));
        let none = nccl_missing_message(&[]);
        assert!(none.contains("nvidia-nccl-cu13"), "{none}");
        assert_eq!(CudaLibrary::Nccl.missing_message(&[so2]), message);
    }

    #[test]
    fn missing_driver_and_nvrtc_messages_say_where_a_copy_lies() {
        let so13 = PathBuf::from("/py/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.13");
        let message = CudaLibrary::Nvrtc.missing_message(std::slice::from_ref(&so13));
        assert!(message.starts_with("libnvrtc.so (NVRTC"), "{message}");
        assert!(message.contains("LD_LIBRARY_PATH=/py/site-packages/nvidia/cuda_nvrtc/lib:"));
        assert!(message.contains("ln -s /py/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.13"));
        let none = CudaLibrary::Driver.missing_message(&[]);
        assert!(none.contains("no NVIDIA driver"), "{none}");
        assert!(none.contains("LD_LIBRARY_PATH"), "{none}");
    }

    #[test]
    fn the_finder_goes_by_prefix_in_search_order() {
        let root = std::env::temp_dir().join(format!("mics-libs-{}", std::process::id()));
        let (first, second) = (root.join("a"), root.join("b"));
        for (dir, names) in [
            (
                &first,
                &["libnccl.so.2.27.3", "libnccl.so.2", "libother.so"][..],
            ),
            (&second, &["libnccl.so.2"][..]),
        ] {
            std::fs::create_dir_all(dir).unwrap();
            for name in names {
                std::fs::write(dir.join(name), b"").unwrap();
            }
        }
        let dirs = [
            second.clone(),
            first.clone(),
            second.clone(),
            root.join("none"),
        ];
        let found = find_in(&dirs, "libnccl.so.2");
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            found,
            [
                second.join("libnccl.so.2"),
                first.join("libnccl.so.2"),
                first.join("libnccl.so.2.27.3")
            ]
        );
    }

    #[test]
    fn versions_decode_both_encodings() {
        let v = NcclVersion::from_code(23003);
        assert_eq!(v.to_string(), "2.30.3");
        assert!(v.at_least(2, 30, 3));
        assert!(!NcclVersion::from_code(22703).at_least(2, 30, 3));
        assert_eq!(NcclVersion::from_code(2804).to_string(), "2.8.4");
    }
}
