//! The NCCL engine: collectives between GPUs through `cudarc`'s NCCL bindings
//! (cargo feature `cuda`).
//!
//! CUDA and NCCL are loaded **at run time** (`cudarc`'s dynamic loading), so
//! this module builds on machines without CUDA. A missing `libcuda.so`,
//! `libnvrtc.so` or `libnccl.so` is one [`CommError::Engine`] naming the
//! library and the fix, never a panic ([`check_libraries`]). The PyPI wheel
//! `nvidia-nccl-cu13` (the NCCL that torch uses) ships only `libnccl.so.2`,
//! while `cudarc` looks for `libnccl.so`: the error says where the `.so.2`
//! is and which symlink makes it loadable (`scripts/nccl-sanity` sets it up).
//!
//! # How it runs
//!
//! Each [`NcclComm`] owns one NCCL communicator, one CUDA stream and one
//! worker thread, exactly as a [`crate::ThreadComm`] owns a worker: the
//! collectives of a communicator run on its worker **in issue order**, so the
//! caller gets a [`Work`] at once and computes while the collective runs. On
//! the worker a collective of host [`Buffer`]s
//!
//! 1. exchanges a small descriptor (kind, element type, length, reduce op,
//!    root, split colour and key, input status: eight `u64`s) with an NCCL
//!    all-gather, so that ranks passing different sizes, types or roots all
//!    get [`CommError::Mismatch`] and no data collective runs on mismatched
//!    buffers (never corruption; the check can be turned off with
//!    [`NcclEngine::check_arguments`] where the caller guarantees it);
//! 2. copies the input to the device on the communicator's stream, enqueues
//!    the NCCL collective there, and polls an event until it completes, a
//!    NCCL asynchronous error shows up, a waiter gave up on the group, or the
//!    timeout passes; in the last three cases the NCCL communicator is
//!    **aborted** and the group poisoned, so nothing hangs;
//! 3. copies the result back into a host [`Buffer`].
//!
//! The device-buffer path (issue 7: Burn CUDA tensors, no host round trip)
//! plugs in at step 2: [`NcclComm::stream`] is the stream the collectives run
//! on, and the worker's enqueue-and-poll step takes raw device pointers.
//!
//! Barrier is the descriptor exchange alone. Split exchanges the colours and
//! keys, then the lowest new rank of each new group creates its NCCL unique
//! id and every rank all-gathers the ids over the parent communicator; each
//! rank then initialises its new communicator (own id, own stream, own
//! worker). As with MPI, collectives of *different* communicators must be
//! issued in the same relative order on every rank.
//!
//! # Results
//!
//! All-gather and broadcast move bytes and are bit-identical to the threads
//! engine; so is Max. Sum and Mean use NCCL's `ncclSum` and `ncclAvg`, whose
//! reduction order (ring or tree, chosen by NCCL) differs from the threads
//! engine's rank order and which round bf16/f16 partial sums at each step:
//! with more than two ranks results agree **to rounding, not bit-exactly**.
//!
//! # Starting ranks
//!
//! - one process driving several ranks (one or several GPUs; the unique id is
//!   shared in memory): [`NcclEngine::local`] and [`NcclEngine::run`];
//! - one process per rank, torchrun style: [`NcclEngine::from_env`] reads
//!   `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (and `LOCAL_RANK` for
//!   the device); rank 0 listens on `MASTER_PORT` and sends the 128-byte
//!   `ncclUniqueId` to every other rank;
//! - under `mpirun` (features `cuda` and `mpi`): [`NcclEngine`]`::from_mpi`
//!   broadcasts the id over an MPI communicator;
//! - any other launcher: rank 0 creates a
//!   [`UniqueId`], the launcher sends its [`UniqueId::as_bytes`] to every
//!   rank, and each calls [`NcclEngine::init_rank`].
//!
//! Byte accounting follows the ring model ([`crate::ring_bytes`]); the node
//! of each rank is found by exchanging a hash of the host name at start-up.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use crate::communicator::{Input, OpDesc, WireDesc, check_matching, validate_local};
use crate::stats::ring_bytes;
use crate::work::AbortFn;
use crate::{Buffer, CollectiveKind, CommError, CommStats, Communicator, DType, ReduceOp, Work};

/// Default time a collective waits for the other ranks (as the threads engine).
pub const DEFAULT_TIMEOUT: Duration = crate::threads::DEFAULT_TIMEOUT;

const ENGINE: &str = "nccl";

fn engine_error(message: impl Into<String>) -> CommError {
    CommError::Engine {
        engine: ENGINE,
        message: message.into(),
    }
}

fn cuda_error(what: &str, err: DriverError) -> CommError {
    engine_error(format!("CUDA {what} failed: {err:?}"))
}

fn nccl_error(what: &str, err: NcclError, comm: Option<sys::ncclComm_t>) -> CommError {
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

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `f`, turning a panic inside `cudarc` (its dynamic loader panics on a
/// missing library or symbol) into an engine error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(engine_error(format!(
            "{what}: cudarc panicked: {}. Check that the CUDA driver (libcuda.so) and NCCL \
             (libnccl.so) are recent enough and on LD_LIBRARY_PATH",
            panic_text(payload.as_ref())
        ))),
    }
}

// ---------------------------------------------------------------------------
// Libraries

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

    fn missing_error(self) -> CommError {
        let lib = self.file_name();
        let message = match self {
            CudaLibrary::Driver => format!(
                "{lib} (the CUDA driver) could not be loaded: this machine has no NVIDIA driver, \
                 or its directory is not searched. Install the NVIDIA driver, or add the \
                 directory holding {lib} (e.g. /usr/lib/x86_64-linux-gnu or \
                 /usr/local/cuda/compat) to LD_LIBRARY_PATH"
            ),
            CudaLibrary::Nvrtc => format!(
                "{lib} (NVRTC, the CUDA run-time compiler) could not be loaded. Install the CUDA \
                 toolkit (or the PyPI wheel nvidia-cuda-nvrtc) and add its lib directory (e.g. \
                 /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
            ),
            CudaLibrary::Nccl => nccl_missing_message(&find_files("libnccl.so.2")),
        };
        engine_error(message)
    }
}

/// The error text for a missing `libnccl.so`, given where `libnccl.so.2`
/// files were found (if any).
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

/// Files named `name` in the usual library directories, `LD_LIBRARY_PATH`
/// and Python's `site-packages/nvidia/*/lib`.
fn find_files(name: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
    ] {
        dirs.push(dir.into());
    }
    // Python wheels: nvidia/nccl/lib under each site-packages directory.
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .stderr(std::process::Stdio::null())
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let nvidia = Path::new(line).join("nvidia");
            if let Ok(entries) = std::fs::read_dir(&nvidia) {
                for entry in entries.flatten() {
                    dirs.push(entry.path().join("lib"));
                }
            }
        }
    }
    let mut found: Vec<PathBuf> = dirs
        .into_iter()
        .map(|d| d.join(name))
        .filter(|p| p.exists())
        .collect();
    found.dedup();
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

/// A 128-byte `ncclUniqueId`: created by one rank, sent to every rank of the
/// new communicator by the launcher.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}..)", &self.0[..8])
    }
}

impl UniqueId {
    /// A new id (`ncclGetUniqueId`; it opens the bootstrap socket of the new
    /// communicator on this process).
    pub fn new() -> Result<UniqueId, CommError> {
        check_libraries(&[CudaLibrary::Nccl])?;
        guarded("ncclGetUniqueId", || {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e, None))?;
            Ok(UniqueId(id.internal.map(|c| c as u8)))
        })
    }

    /// An id received from the rank that created it.
    pub fn from_bytes(bytes: [u8; 128]) -> UniqueId {
        UniqueId(bytes)
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    fn to_sys(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

// ---------------------------------------------------------------------------
// Engine

/// Builder of NCCL communicators.
#[derive(Debug, Clone)]
pub struct NcclEngine {
    timeout: Duration,
    check_arguments: bool,
}

impl Default for NcclEngine {
    fn default() -> Self {
        NcclEngine::new()
    }
}

/// What a new communicator's worker needs to initialise it.
struct InitSpec {
    id: UniqueId,
    rank: usize,
    size: usize,
    device: usize,
    world_ranks: Vec<usize>,
    /// Known nodes (from the parent of a split), or found by exchanging
    /// host-name hashes.
    nodes: Option<Vec<usize>>,
}

impl NcclEngine {
    /// An engine with [`DEFAULT_TIMEOUT`] and argument checks on.
    pub fn new() -> NcclEngine {
        NcclEngine {
            timeout: DEFAULT_TIMEOUT,
            check_arguments: true,
        }
    }

    /// How long a collective (and communicator set-up) waits for the other
    /// ranks before it fails and the NCCL communicator is aborted.
    pub fn timeout(mut self, timeout: Duration) -> NcclEngine {
        self.timeout = timeout;
        self
    }

    /// Whether every collective first exchanges a descriptor of its arguments
    /// so that mismatches are errors on every rank (default: on). Turning it
    /// off halves the latency of small collectives, but mismatched lengths
    /// then corrupt memory or hang until the timeout.
    pub fn check_arguments(mut self, check: bool) -> NcclEngine {
        self.check_arguments = check;
        self
    }

    /// One process driving `devices.len()` ranks: rank `i` runs on CUDA device
    /// `devices[i]`. Several ranks may name the same device where NCCL allows
    /// it (NCCL ≥ 2.30.3 with `NCCL_MULTI_RANK_GPU_ENABLE=1`). The unique id
    /// is shared in memory; each rank's communicator is initialised on its own
    /// worker thread.
    pub fn local(&self, devices: &[usize]) -> Result<Vec<NcclComm>, CommError> {
        if devices.is_empty() {
            return Err(CommError::InvalidArgument(
                "nccl engine: a world needs at least one rank".into(),
            ));
        }
        check_libraries(&ENGINE_LIBRARIES)?;
        let id = UniqueId::new()?;
        let size = devices.len();
        let pending: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, &device)| {
                NcclComm::start(
                    self,
                    InitSpec {
                        id,
                        rank,
                        size,
                        device,
                        world_ranks: (0..size).collect(),
                        nodes: Some(vec![0; size]),
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        pending.into_iter().map(|p| p.finish()).collect()
    }

    /// Runs `f` on one thread per rank with that rank's communicator
    /// ([`NcclEngine::local`]) and returns each rank's result, or its panic
    /// message.
    pub fn run<R, F>(&self, devices: &[usize], f: F) -> Result<Vec<Result<R, String>>, CommError>
    where
        R: Send,
        F: Fn(NcclComm) -> R + Sync,
    {
        let comms = self.local(devices)?;
        let f = &f;
        Ok(std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let rank = comm.rank;
                    std::thread::Builder::new()
                        .name(format!("mics-nccl-rank-{rank}"))
                        .spawn_scoped(scope, move || f(comm))
                        .expect("spawning a rank thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|p| panic_text(p.as_ref())))
                .collect()
        }))
    }

    /// Rank `rank` of `size` on CUDA device `device`, joining the
    /// communicator of `id` (created by one rank with [`UniqueId::new`] and
    /// sent to all by any launcher, e.g. an MPI broadcast of its bytes).
    /// Blocks until every rank has joined, or the timeout.
    pub fn init_rank(
        &self,
        id: UniqueId,
        rank: usize,
        size: usize,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        if rank >= size {
            return Err(CommError::InvalidArgument(format!(
                "nccl engine: rank {rank} in a world of {size}"
            )));
        }
        check_libraries(&ENGINE_LIBRARIES)?;
        NcclComm::start(
            self,
            InitSpec {
                id,
                rank,
                size,
                device,
                world_ranks: (0..size).collect(),
                nodes: None,
            },
        )?
        .finish()
    }

    /// Torchrun-style start: `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and
    /// `MASTER_PORT` from the environment; the device is `LOCAL_RANK` if set,
    /// else `RANK` modulo the number of visible devices. See
    /// [`NcclEngine::rendezvous`].
    pub fn from_env(&self) -> Result<NcclComm, CommError> {
        fn var(name: &str) -> Result<String, CommError> {
            std::env::var(name).map_err(|_| {
                CommError::InvalidArgument(format!(
                    "nccl engine: environment variable {name} is not set (launch with torchrun, \
                     or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
                ))
            })
        }
        fn number(name: &str, value: &str) -> Result<usize, CommError> {
            value.trim().parse().map_err(|_| {
                CommError::InvalidArgument(format!("nccl engine: {name}={value:?} is not a number"))
            })
        }
        let rank = number("RANK", &var("RANK")?)?;
        let world = number("WORLD_SIZE", &var("WORLD_SIZE")?)?;
        let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = number("MASTER_PORT", &var("MASTER_PORT")?)?;
        let device = match std::env::var("LOCAL_RANK") {
            Ok(local) => number("LOCAL_RANK", &local)?,
            Err(_) => rank % device_count()?.max(1),
        };
        self.rendezvous(&format!("{addr}:{port}"), rank, world, device)
    }

    /// Multi-process start over TCP: rank 0 creates the unique id, listens on
    /// the port of `master` (`host:port`) and sends the id to each of the
    /// other `world - 1` ranks, which connect (retrying until the timeout).
    pub fn rendezvous(
        &self,
        master: &str,
        rank: usize,
        world: usize,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        if rank >= world {
            return Err(CommError::InvalidArgument(format!(
                "nccl engine: rank {rank} in a world of {world}"
            )));
        }
        check_libraries(&ENGINE_LIBRARIES)?;
        let id = if rank == 0 {
            let id = UniqueId::new()?;
            serve_id(master, world, id, self.timeout)?;
            id
        } else {
            fetch_id(master, rank, world, self.timeout)?
        };
        self.init_rank(id, rank, world, device)
    }
}

#[cfg(feature = "mpi")]
impl NcclEngine {
    /// Multi-process start through MPI (features `cuda` and `mpi`): rank 0 of
    /// `comm` creates the unique id and broadcasts it over MPI; every rank of
    /// `comm` then joins the NCCL communicator with the same rank and size,
    /// on CUDA device `device` (e.g. `OMPI_COMM_WORLD_LOCAL_RANK`). MPI must
    /// be initialised by the caller. Collective over `comm`: if rank 0 cannot
    /// create the id, every rank gets an error instead of hanging.
    pub fn from_mpi<C: ::mpi::traits::Communicator>(
        &self,
        comm: &C,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        use ::mpi::traits::Root;
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        let local = check_libraries(&ENGINE_LIBRARIES);
        // 128 id bytes, then 1 if rank 0 created the id.
        let mut message = [0u8; 129];
        let mut root_error = None;
        if rank == 0 {
            match local.clone().and_then(|_| UniqueId::new()) {
                Ok(id) => {
                    message[..128].copy_from_slice(id.as_bytes());
                    message[128] = 1;
                }
                Err(err) => root_error = Some(err),
            }
        }
        comm.process_at_rank(0).broadcast_into(&mut message[..]);
        if let Some(err) = root_error {
            return Err(err);
        }
        local?;
        if message[128] != 1 {
            return Err(engine_error(
                "rank 0 could not create the NCCL unique id (see its error)",
            ));
        }
        let id: [u8; 128] = message[..128].try_into().expect("128 bytes");
        self.init_rank(UniqueId(id), rank, size, device)
    }
}

const HELLO: &[u8; 8] = b"MICSNCCL";

fn io_error(what: &str, master: &str, err: std::io::Error) -> CommError {
    engine_error(format!("rendezvous with {master}: {what}: {err}"))
}

/// Rank 0: accepts `world - 1` connections and sends each the id.
fn serve_id(master: &str, world: usize, id: UniqueId, timeout: Duration) -> Result<(), CommError> {
    if world == 1 {
        return Ok(());
    }
    let port = master
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| CommError::InvalidArgument(format!("bad master address {master:?}")))?;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| io_error(&format!("rank 0 cannot listen on port {port}"), master, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_error("listen", master, e))?;
    let deadline = Instant::now() + timeout;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut hello = [0u8; 24];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
                    continue; // Not one of ours: ignore it.
                }
                let peer_rank = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
                let peer_world = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
                if peer_world != world as u64 || peer_rank == 0 || peer_rank >= world as u64 {
                    return Err(CommError::InvalidArgument(format!(
                        "rendezvous on {master}: a rank says it is rank {peer_rank} of \
                         {peer_world}, but rank 0 has WORLD_SIZE={world}"
                    )));
                }
                stream
                    .write_all(id.as_bytes())
                    .map_err(|e| io_error("sending the NCCL id", master, e))?;
                served[peer_rank as usize] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    return Err(engine_error(format!(
                        "rendezvous on {master}: ranks {missing:?} did not connect within \
                         {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_error("accept", master, e)),
        }
    }
    Ok(())
}

/// Ranks > 0: connects to rank 0 (retrying) and receives the id.
fn fetch_id(
    master: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<UniqueId, CommError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> std::io::Result<UniqueId> {
            let addr = master.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
            })?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(timeout))?;
            let mut hello = [0u8; 24];
            hello[..8].copy_from_slice(HELLO);
            hello[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
            hello[16..24].copy_from_slice(&(world as u64).to_le_bytes());
            stream.write_all(&hello)?;
            let mut id = [0u8; 128];
            stream.read_exact(&mut id)?;
            Ok(UniqueId(id))
        })();
        match attempt {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() >= deadline => {
                return Err(io_error(
                    &format!("rank {rank} got no NCCL id from rank 0 within {timeout:?}"),
                    master,
                    e,
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------
// Worker

/// The raw NCCL communicator, used only on its worker thread.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; it is owned and used by one worker thread.
unsafe impl Send for RawComm {}

/// State shared by a communicator's handle, its worker and its waiters.
#[derive(Default)]
struct Shared {
    /// The failure that poisoned the group on this rank.
    failure: Mutex<Option<CommError>>,
    /// Set by a waiter that gave up: the worker aborts the NCCL communicator.
    abort: AtomicBool,
}

impl Shared {
    fn failure(&self) -> Option<CommError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn poison(&self, err: CommError) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(err);
        }
    }
}

/// A collective, as its worker runs it.
enum RawOp {
    AllGather,
    ReduceScatter(sys::ncclRedOp_t),
    AllReduce(sys::ncclRedOp_t),
    Broadcast(c_int),
}

struct Worker {
    comm: Option<RawComm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
    shared: Arc<Shared>,
}

fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl Worker {
    fn raw(&self) -> Result<sys::ncclComm_t, CommError> {
        match &self.comm {
            Some(c) => Ok(c.0),
            None => Err(self
                .shared
                .failure()
                .map(|e| e.poisoned())
                .unwrap_or_else(|| engine_error("the NCCL communicator was aborted"))),
        }
    }

    /// Aborts the NCCL communicator (after a timeout or an asynchronous
    /// error) and poisons the group.
    fn abort(&mut self, err: CommError) -> CommError {
        if let Some(comm) = self.comm.take() {
            // SAFETY: the communicator is valid and no longer used after this.
            let _ = unsafe { nccl::comm_abort(comm.0) };
        }
        self.shared.poison(err.clone());
        err
    }

    /// Enqueues one NCCL collective on the stream, on raw device pointers.
    /// `count` is per NCCL's convention: the send count for all-gather, the
    /// receive count for reduce-scatter, the element count otherwise.
    ///
    /// # Safety
    /// `send` and `recv` are device buffers large enough for `op` and `count`
    /// that stay alive until the stream has passed this collective.
    unsafe fn enqueue(
        &self,
        op: &RawOp,
        send: u64,
        recv: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        let comm = self.raw()?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let (send, recv) = (send as *const c_void, recv as *mut c_void);
        let result = unsafe {
            match *op {
                RawOp::AllGather => nccl::all_gather(send, recv, count, dtype, comm, stream),
                RawOp::ReduceScatter(r) => {
                    nccl::reduce_scatter(send, recv, count, dtype, r, comm, stream)
                }
                RawOp::AllReduce(r) => nccl::all_reduce(send, recv, count, dtype, r, comm, stream),
                RawOp::Broadcast(root) => {
                    nccl::broadcast(send, recv, count, dtype, root, comm, stream)
                }
            }
        };
        result
            .map(|_| ())
            .map_err(|e| nccl_error("enqueueing a collective", e, Some(comm)))
    }

    /// Polls until the stream's work so far is done; on a timeout, an NCCL
    /// asynchronous error or a waiter's abort, aborts the communicator.
    fn wait_stream(&mut self, kind: CollectiveKind, seq: u64) -> Result<(), CommError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| cuda_error("cuEventRecord", e))?;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let err = cuda_error(&format!("{kind} #{seq}"), e);
                    return Err(self.abort(err));
                }
            }
            let comm = self.raw()?;
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is valid (not aborted yet).
            let _ = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                let err = nccl_error(&format!("{kind} #{seq}"), NcclError(state), Some(comm));
                return Err(self.abort(err));
            }
            if self.shared.abort.load(Ordering::Acquire) {
                let err = self.shared.failure().unwrap_or_else(|| {
                    engine_error(format!("{kind} #{seq} was abandoned by its waiter"))
                });
                return Err(self.abort(err));
            }
            if Instant::now() >= deadline {
                let err = engine_error(format!(
                    "{kind} #{seq} on rank {} of {} did not complete within {:?}: a peer rank \
                     never arrived, died or issued collectives in another order; the NCCL \
                     communicator was aborted",
                    self.rank, self.size, self.timeout
                ));
                return Err(self.abort(err));
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(if spins < 2000 { 20 } else { 500 }));
            }
        }
    }

    /// One collective on host bytes: copy in, run, wait, copy out.
    #[allow(clippy::too_many_arguments)]
    fn host_collective(
        &mut self,
        kind: CollectiveKind,
        seq: u64,
        op: RawOp,
        send: &[u8],
        recv: &mut [u8],
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        let stream = self.stream.clone();
        let dev_send = stream
            .clone_htod(send)
            .map_err(|e| cuda_error("copy to device", e))?;
        // SAFETY: fully written by the collective before it is read.
        let mut dev_recv =
            unsafe { stream.alloc::<u8>(recv.len()) }.map_err(|e| cuda_error("cuMemAlloc", e))?;
        {
            let (send_ptr, _s) = dev_send.device_ptr(&stream);
            let (recv_ptr, _r) = dev_recv.device_ptr_mut(&stream);
            // SAFETY: both buffers live until after wait_stream below.
            unsafe { self.enqueue(&op, send_ptr, recv_ptr, count, dtype)? };
        }
        self.wait_stream(kind, seq)?;
        stream
            .memcpy_dtoh(&dev_recv, recv)
            .map_err(|e| cuda_error("copy to host", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("cuStreamSynchronize", e))?;
        Ok(())
    }

    /// All-gathers `mine` (u64s) from every rank.
    fn exchange_u64(
        &mut self,
        kind: CollectiveKind,
        seq: u64,
        mine: &[u64],
    ) -> Result<Vec<u64>, CommError> {
        let mut all = vec![0u64; mine.len() * self.size];
        self.host_collective(
            kind,
            seq,
            RawOp::AllGather,
            bytemuck::cast_slice(mine),
            bytemuck::cast_slice_mut(&mut all),
            mine.len(),
            sys::ncclDataType_t::ncclUint64,
        )?;
        Ok(all)
    }
}

const STATUS_OK: u64 = WireDesc::STATUS_OK;
const STATUS_INPUT_FAILED: u64 = WireDesc::STATUS_INPUT_FAILED;

/// The descriptors of every rank, with split colours/keys and input status.
struct Exchanged {
    descs: Vec<OpDesc>,
    colors: Vec<usize>,
    keys: Vec<usize>,
    status: Vec<u64>,
}

/// Runs the descriptor exchange (or, unchecked, trusts this rank's own).
fn exchange_descs(
    w: &mut Worker,
    check: bool,
    seq: u64,
    desc: &OpDesc,
    color: usize,
    key: usize,
    status: u64,
) -> Result<Exchanged, CommError> {
    let words = if check || matches!(desc.kind, CollectiveKind::Split | CollectiveKind::Barrier) {
        w.exchange_u64(
            desc.kind,
            seq,
            &WireDesc::new(*desc, status, color, key).encode(),
        )?
    } else {
        WireDesc::new(*desc, status, color, key)
            .encode()
            .repeat(w.size)
    };
    let mut out = Exchanged {
        descs: Vec::with_capacity(w.size),
        colors: Vec::with_capacity(w.size),
        keys: Vec::with_capacity(w.size),
        status: Vec::with_capacity(w.size),
    };
    for chunk in words.chunks(WireDesc::WORDS) {
        let wire = WireDesc::decode(chunk);
        out.descs.push(wire.desc);
        out.colors.push(wire.color);
        out.keys.push(wire.key);
        out.status.push(wire.status);
    }
    Ok(out)
}

/// Runs one data collective of host buffers on the worker.
fn run_collective(
    w: &mut Worker,
    check: bool,
    seq: u64,
    mut desc: OpDesc,
    input: Result<Option<Buffer>, CommError>,
) -> Result<Buffer, CommError> {
    if let Some(err) = w.shared.failure() {
        return Err(err.poisoned());
    }
    let (data, status, own_error) = match input {
        Ok(data) => (data, STATUS_OK, None),
        Err(err) => (None, STATUS_INPUT_FAILED, Some(err)),
    };
    if let Some(buffer) = &data {
        desc.dtype = Some(buffer.dtype());
        desc.len = buffer.len();
    }
    if !check && let Some(err) = own_error {
        // Unchecked: no descriptor travels, so the peers learn of it only by
        // their timeout.
        w.shared.poison(err.clone());
        return Err(err);
    }
    let ex = match exchange_descs(w, check, seq, &desc, 0, 0, status) {
        Ok(ex) => ex,
        Err(err) => return Err(own_error.unwrap_or(err)),
    };
    if let Some(failed) = ex.status.iter().position(|&s| s != STATUS_OK) {
        // A deferred input failed on some rank: every rank fails and the
        // group is poisoned, as in the threads engine.
        let err = own_error.unwrap_or_else(|| {
            engine_error(format!(
                "{} #{seq}: the input of rank {failed} failed before the collective",
                desc.kind
            ))
        });
        w.shared.poison(err.clone());
        return Err(err);
    }
    check_matching(seq, &ex.descs)?;
    validate_local(&desc, w.size)?;
    let p = w.size;
    let Some(input) = data else {
        // Barrier: the descriptor exchange was the meeting.
        return Ok(Buffer::F32(Vec::new()));
    };
    let dtype = input.dtype();
    let len = input.len();
    let (op, out_len, count) = match desc.kind {
        CollectiveKind::AllGather => (RawOp::AllGather, len * p, len),
        CollectiveKind::ReduceScatter => (
            RawOp::ReduceScatter(nccl_op(desc.op.unwrap_or(ReduceOp::Sum))),
            len / p,
            len / p,
        ),
        CollectiveKind::AllReduce => (
            RawOp::AllReduce(nccl_op(desc.op.unwrap_or(ReduceOp::Sum))),
            len,
            len,
        ),
        CollectiveKind::Broadcast => (RawOp::Broadcast(desc.root.unwrap_or(0) as c_int), len, len),
        CollectiveKind::Barrier | CollectiveKind::Split => {
            return Ok(Buffer::F32(Vec::new()));
        }
    };
    let mut out = Buffer::zeros(dtype, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    w.host_collective(
        desc.kind,
        seq,
        op,
        input.as_bytes(),
        out.as_bytes_mut(),
        count,
        nccl_dtype(dtype),
    )?;
    Ok(out)
}

/// Where this rank goes in a split: its new group's id, rank and members.
struct SplitPlan {
    id: UniqueId,
    rank: usize,
    members: Vec<usize>,
}

fn run_split(w: &mut Worker, seq: u64, color: usize, key: usize) -> Result<SplitPlan, CommError> {
    if let Some(err) = w.shared.failure() {
        return Err(err.poisoned());
    }
    let desc = OpDesc::new(CollectiveKind::Split, None);
    let ex = exchange_descs(w, true, seq, &desc, color, key, STATUS_OK)?;
    check_matching(seq, &ex.descs)?;
    let mut members: Vec<usize> = (0..w.size).filter(|&r| ex.colors[r] == color).collect();
    members.sort_by_key(|&r| (ex.keys[r], r));
    let new_rank = members
        .iter()
        .position(|&r| r == w.rank)
        .expect("a rank is a member of its own colour");
    // The new group's rank 0 creates its id; all ids travel over the parent.
    let mine = if new_rank == 0 {
        *UniqueId::new()?.as_bytes()
    } else {
        [0u8; 128]
    };
    let mut all = vec![0u8; 128 * w.size];
    w.host_collective(
        CollectiveKind::Split,
        seq,
        RawOp::AllGather,
        &mine,
        &mut all,
        128,
        sys::ncclDataType_t::ncclUint8,
    )?;
    let leader = members[0];
    let id: [u8; 128] = all[leader * 128..(leader + 1) * 128]
        .try_into()
        .expect("128 bytes");
    Ok(SplitPlan {
        id: UniqueId(id),
        rank: new_rank,
        members,
    })
}

fn host_hash() -> u64 {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    // FNV-1a: the same on every process of the same host.
    name.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Numbers nodes by first appearance of each host hash.
fn nodes_from_hashes(hashes: &[u64]) -> Vec<usize> {
    let mut seen: Vec<u64> = Vec::new();
    hashes
        .iter()
        .map(|h| match seen.iter().position(|s| s == h) {
            Some(i) => i,
            None => {
                seen.push(*h);
                seen.len() - 1
            }
        })
        .collect()
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Issue side of a communicator: sequence numbers and the worker's queue,
/// under one lock so that sequence order is queue order.
struct Issuer {
    next_seq: u64,
    jobs: Option<Sender<Job>>,
}

/// One rank's communicator in the NCCL engine.
pub struct NcclComm {
    rank: usize,
    size: usize,
    device: usize,
    world_ranks: Vec<usize>,
    nodes: Vec<usize>,
    timeout: Duration,
    check: bool,
    stream: Arc<CudaStream>,
    issuer: Mutex<Issuer>,
    stats: Arc<Mutex<CommStats>>,
    shared: Arc<Shared>,
    label: u64,
}

static NEXT_COMM_LABEL: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device)
            .field("world_ranks", &self.world_ranks)
            .finish()
    }
}

/// What an initialised worker hands back: its stream and the ranks' nodes.
type Ready = (Arc<CudaStream>, Vec<usize>);

/// A communicator whose worker is initialising NCCL.
struct Pending {
    rx: mpsc::Receiver<Result<Ready, CommError>>,
    tx: Sender<Job>,
    spec_rank: usize,
    spec_size: usize,
    device: usize,
    world_ranks: Vec<usize>,
    engine: NcclEngine,
    shared: Arc<Shared>,
}

impl Pending {
    fn finish(self) -> Result<NcclComm, CommError> {
        let timeout = self.engine.timeout;
        let (stream, nodes) = match self.rx.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(engine_error(format!(
                    "initialising rank {} of {} on device {} did not finish within {timeout:?}: \
                     not every rank joined the communicator",
                    self.spec_rank, self.spec_size, self.device
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(engine_error("the communicator's worker thread died"));
            }
        };
        Ok(NcclComm {
            rank: self.spec_rank,
            size: self.spec_size,
            device: self.device,
            world_ranks: self.world_ranks,
            nodes,
            timeout,
            check: self.engine.check_arguments,
            stream,
            issuer: Mutex::new(Issuer {
                next_seq: 0,
                jobs: Some(self.tx),
            }),
            stats: Arc::new(Mutex::new(CommStats::default())),
            shared: self.shared,
            label: NEXT_COMM_LABEL.fetch_add(1, Ordering::Relaxed),
        })
    }
}

/// Initialises the CUDA context, stream and NCCL communicator (on the worker).
fn init_worker(
    spec: &InitSpec,
    timeout: Duration,
    shared: &Arc<Shared>,
) -> Result<(Worker, Vec<usize>), CommError> {
    let (size, rank) = (spec.size, spec.rank);
    let (stream, comm) = guarded("initialising CUDA and NCCL", || {
        let ctx = CudaContext::new(spec.device)
            .map_err(|e| cuda_error(&format!("opening device {}", spec.device), e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("cuStreamCreate", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL on success.
        unsafe { nccl::comm_init_rank(&mut comm, size as c_int, spec.id.to_sys(), rank as c_int) }
            .map_err(|e| {
                nccl_error(
                    &format!(
                        "ncclCommInitRank (rank {rank} of {size}, device {})",
                        spec.device
                    ),
                    e,
                    None,
                )
            })?;
        Ok((stream, comm))
    })?;
    let mut worker = Worker {
        comm: Some(RawComm(comm)),
        stream,
        rank,
        size,
        timeout,
        shared: shared.clone(),
    };
    let nodes = match &spec.nodes {
        Some(nodes) => nodes.clone(),
        None => {
            let hashes = worker.exchange_u64(CollectiveKind::Barrier, 0, &[host_hash()])?;
            nodes_from_hashes(&hashes)
        }
    };
    Ok((worker, nodes))
}

impl NcclComm {
    /// Spawns the worker, which initialises the communicator.
    fn start(engine: &NcclEngine, spec: InitSpec) -> Result<Pending, CommError> {
        let (init_tx, init_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let timeout = engine.timeout;
        let world_ranks = spec.world_ranks.clone();
        let (rank, size, device) = (spec.rank, spec.size, spec.device);
        let worker_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("mics-nccl-{}", world_ranks[rank]))
            .spawn(move || {
                let mut worker = match init_worker(&spec, timeout, &worker_shared) {
                    Ok((worker, nodes)) => {
                        let _ = init_tx.send(Ok((worker.stream.clone(), nodes)));
                        worker
                    }
                    Err(err) => {
                        let _ = init_tx.send(Err(err));
                        return;
                    }
                };
                for job in job_rx {
                    job(&mut worker);
                }
                // The handle is gone and every queued collective has run.
                if let Some(comm) = worker.comm.take() {
                    // SAFETY: valid communicator, not used after this.
                    unsafe {
                        if worker.shared.failure().is_some() {
                            let _ = nccl::comm_abort(comm.0);
                        } else {
                            let _ = worker.stream.synchronize();
                            let _ = nccl::comm_destroy(comm.0);
                        }
                    }
                }
            })
            .map_err(|e| engine_error(format!("spawning a worker thread: {e}")))?;
        Ok(Pending {
            rx: init_rx,
            tx: job_tx,
            spec_rank: rank,
            spec_size: size,
            device,
            world_ranks,
            engine: engine.clone(),
            shared,
        })
    }

    /// The CUDA device this rank runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The CUDA stream this communicator's collectives run on, in issue
    /// order (for ordering device work against them with events).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    fn abort_fn(&self) -> AbortFn {
        let shared = self.shared.clone();
        Arc::new(move |err| {
            shared.poison(err);
            shared.abort.store(true, Ordering::Release);
        })
    }

    fn send_job(&self, make: impl FnOnce(u64) -> Job) -> Result<u64, CommError> {
        let mut issuer = self.issuer.lock().unwrap_or_else(|e| e.into_inner());
        let seq = issuer.next_seq;
        issuer.next_seq += 1;
        let job = make(seq);
        match &issuer.jobs {
            Some(jobs) if jobs.send(job).is_ok() => Ok(seq),
            _ => Err(engine_error("the communicator's worker thread is gone")),
        }
    }

    /// Queues a collective on the worker and returns its handle.
    fn submit(&self, desc: OpDesc, input: Input) -> Work {
        let stats = self.stats.clone();
        let check = self.check;
        let nodes = self.nodes.clone();
        let rank = self.rank;
        let (timeout, label, abort) = (self.timeout, self.label, self.abort_fn());
        let mut handle = None;
        let sent = self.send_job(|seq| {
            let describe = format!("{} #{seq} on rank {rank} of nccl group {label}", desc.kind);
            let (work, done) = Work::pending(timeout, describe, Some(abort));
            handle = Some(work);
            Box::new(move |w: &mut Worker| {
                let data = match input {
                    Input::None => Ok(None),
                    Input::Ready(buffer) => Ok(Some(buffer)),
                    Input::Later(pending) => pending.wait().map(Some),
                };
                let input_bytes = data
                    .as_ref()
                    .ok()
                    .and_then(|d| d.as_ref())
                    .map_or(0, |b| b.byte_len() as u64);
                let sent = ring_bytes(desc.kind, input_bytes, &nodes, rank, desc.root.unwrap_or(0));
                stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(desc.kind, sent);
                done.complete(run_collective(w, check, seq, desc, data));
            })
        });
        match (sent, handle) {
            (Ok(_), Some(work)) => work,
            (Err(err), _) => Work::failed(err),
            (Ok(_), None) => Work::failed(engine_error("internal: no handle")),
        }
    }

    /// [`Communicator::split`], returning the concrete type.
    pub fn split_nccl(&self, color: usize, key: usize) -> Result<NcclComm, CommError> {
        let (tx, rx) = mpsc::channel();
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(CollectiveKind::Split, Default::default());
        self.send_job(|seq| {
            Box::new(move |w: &mut Worker| {
                let _ = tx.send(run_split(w, seq, color, key));
            })
        })?;
        let plan = match rx.recv_timeout(self.timeout * 2) {
            Ok(plan) => plan?,
            Err(_) => {
                return Err(engine_error(format!(
                    "split on rank {} did not complete within {:?}",
                    self.rank,
                    self.timeout * 2
                )));
            }
        };
        let engine = NcclEngine {
            timeout: self.timeout,
            check_arguments: self.check,
        };
        NcclComm::start(
            &engine,
            InitSpec {
                id: plan.id,
                rank: plan.rank,
                size: plan.members.len(),
                device: self.device,
                world_ranks: plan.members.iter().map(|&r| self.world_ranks[r]).collect(),
                nodes: Some(plan.members.iter().map(|&r| self.nodes[r]).collect()),
            },
        )?
        .finish()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }

    fn nodes(&self) -> &[usize] {
        &self.nodes
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    crate::communicator::queued_collectives!();

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        Ok(Arc::new(self.split_nccl(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Closing the queue lets the worker run what is queued (each bounded
        // by the timeout), then destroy the NCCL communicator (abort it if
        // the group failed). The worker is not joined: ncclCommDestroy waits
        // for the other ranks of the node, and dropping must never hang.
        if let Ok(mut issuer) = self.issuer.lock() {
            issuer.jobs = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cuda_is_a_clear_error_not_a_panic() {
        if CudaLibrary::Driver.is_present() && CudaLibrary::Nccl.is_present() {
            eprintln!("CUDA and NCCL are installed here: nothing to check");
            return;
        }
        let err = NcclEngine::new()
            .local(&[0])
            .expect_err("no CUDA or no NCCL: the engine cannot start");
        let CommError::Engine { engine, message } = &err else {
            panic!("expected an engine error, got {err:?}");
        };
        assert_eq!(*engine, "nccl");
        let named = if CudaLibrary::Driver.is_present() {
            "libnccl.so"
        } else {
            "libcuda.so"
        };
        assert!(message.contains(named), "{message}");
        assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
        // The other constructors fail the same way.
        assert!(
            NcclEngine::new()
                .init_rank(UniqueId([0; 128]), 0, 1, 0)
                .is_err()
        );
        assert!(
            NcclEngine::new()
                .rendezvous("127.0.0.1:1", 0, 1, 0)
                .is_err()
        );
    }

    #[test]
    fn missing_nccl_message_names_the_symlink_fix() {
        let so2 = PathBuf::from("/py/site-packages/nvidia/nccl/lib/libnccl.so.2");
        let message = nccl_missing_message(std::slice::from_ref(&so2));
        assert!(message.contains("libnccl.so.2"), "{message}");
        assert!(message.contains("ln -sf /py/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        assert!(message.contains("LD_LIBRARY_PATH"));
        let none = nccl_missing_message(&[]);
        assert!(none.contains("nvidia-nccl-cu13"), "{none}");
    }

    #[test]
    fn versions_decode_both_encodings() {
        let v = NcclVersion::from_code(23003);
        assert_eq!(v.to_string(), "2.30.3");
        assert!(v.at_least(2, 30, 3));
        assert!(!NcclVersion::from_code(22703).at_least(2, 30, 3));
        assert_eq!(NcclVersion::from_code(2804).to_string(), "2.8.4");
    }

    #[test]
    fn nodes_are_numbered_by_first_host() {
        assert_eq!(nodes_from_hashes(&[7, 7, 3, 3, 7]), [0, 0, 1, 1, 0]);
    }

    #[test]
    fn rendezvous_sends_the_id_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let master = format!("127.0.0.1:{port}");
        let id = UniqueId([42; 128]);
        let timeout = Duration::from_secs(20);
        let server = {
            let master = master.clone();
            std::thread::spawn(move || serve_id(&master, 3, id, timeout))
        };
        let clients: Vec<_> = (1..3)
            .map(|rank| {
                let master = master.clone();
                std::thread::spawn(move || fetch_id(&master, rank, 3, timeout))
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), id);
        }
        server.join().unwrap().unwrap();
    }
}
