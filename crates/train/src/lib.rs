//! The mics trainer: what `mics train` and `mics export` run.
//!
//! A run is described by a [`TrainConfig`] (a TOML file plus command-line
//! [`Overrides`]). [`train`] prepares the token shards when they are missing
//! (`mics-datasets`), builds the initial model once (from a seed or a Hugging
//! Face checkpoint), starts one rank per thread (or joins `mpirun`'s
//! processes), and on every rank shards the model with `mics-backend`, trains
//! it with AdamW (warm-up + cosine decay, global-norm clipping) on that
//! rank's share of each global batch, evaluates on the validation split, and
//! writes sharded, checksummed checkpoints from which `--resume` continues
//! bit for bit (or on another topology, re-sharded).
//! Rank 0 writes the metrics (JSON lines), the loss curve (PNG) and a summary.
//! [`export`] turns a sharded checkpoint into a Hugging Face-layout
//! directory that `mics embed`, `mics logits` and `mics generate` load.
//!
//! # The run directory
//!
//! ```text
//! <output.dir>/
//! ├── data/                     token shards (unless data.dataset points elsewhere)
//! ├── metrics.jsonl             one line per step, plus one per evaluation
//! ├── loss.png                  training and validation loss against steps
//! ├── summary.json              final losses, throughput, unigram baseline
//! └── checkpoints/
//!     ├── latest                name of the newest complete checkpoint
//!     └── step-000100/
//!         ├── index.json        step, topology, sampler position, model config,
//!         │                     checksums of every file and tensor
//!         ├── tokenizer.json
//!         └── rank-00000.safetensors ...   shard + optimizer state per rank
//! ```
//!
//! # Checkpoints that survive anything
//!
//! - **Integrity.** `index.json` (format 2) records the xxh3-64 checksum of
//!   every file of the checkpoint and of every tensor of every rank file;
//!   every rank file records the step, topology, global batch, seed and
//!   tokens seen in its metadata. Resuming and exporting verify the
//!   checksums of the files they read: a flipped byte is one
//!   [`TrainError::Corrupt`] naming the file and the tensor. `index.json` is
//!   cross-checked against the rank files (an edited step is refused), and
//!   a NaN or infinity in a loaded parameter or AdamW/SGD moment is a
//!   [`TrainError::NonFinite`] naming the tensor, at load. Format 1
//!   checkpoints (written before checksums) still load, checked as far as
//!   they record. [`export`] writes the checksum of every tensor into the
//!   exported `model.safetensors`'s metadata (`mics.checksum.<tensor>`), which
//!   [`verify_model`] (and `mics logits|generate|embed`, unless
//!   `--no-verify`) checks.
//! - **Resume on any topology.** A checkpoint written at (N, p, k) resumes
//!   at any valid (N', p', k'): each new rank cuts its shard of every
//!   parameter and optimizer moment from partition group 0's files. The
//!   global batch N·b·s stays the checkpoint's: when N changes,
//!   `train.grad_accum` becomes what keeps it (a line says so), and the
//!   losses continue those of the run that wrote it (to float tolerance:
//!   another N sums in another order). Another global batch needs
//!   `--allow-global-batch-change` (`train.allow_global_batch_change`).
//! - **Atomic commits, bounded disk.** Ranks write into
//!   `.step-N.partial/`, which rank 0 renames once every rank succeeded; any
//!   failure (a full disk: the error names the file being written) removes
//!   it. Each commit removes stale `.partial` directories of killed runs,
//!   and `train.checkpoint_keep = K` keeps only the newest K checkpoints.
//! - **Clean stops.** With [`install_stop_handlers`] (as `mics train`
//!   does), SIGINT or SIGTERM (also as forwarded by `mpirun` to every rank)
//!   lets every rank finish its step; the ranks agree through the step's
//!   loss all-reduce, write a checkpoint (unless
//!   `train.checkpoint_on_signal = false`, `--no-checkpoint-on-signal`), and
//!   [`train`] returns [`RunOutcome::Stopped`]; `mics train` prints one line
//!   and exits 130 (SIGINT) or 143 (SIGTERM). A second signal exits at once.
//! - **Sizes checked before they allocate.** Before the model is built, the
//!   memory one rank needs is estimated from the config ([`memory`]:
//!   parameter, gradient and moment shards, gathered parameters, the
//!   activations of one micro-batch, the LM head's 256-token logits chunk,
//!   set-up) and compared with `parallel.memory_budget` (`--memory-budget`;
//!   default the machine's `MemAvailable` divided among the ranks sharing
//!   it): too large is one [`TrainError::TooLarge`] naming the key that
//!   matters most and the estimate. `parallel.partition_size = "auto"`
//!   (`--partition-size auto`) picks the smallest p that fits, printed at
//!   start.
//! - **Failures as one line.** A rank's error stops every rank; the others
//!   report [`TrainError::PeerFailed`] or, when a collective inside a Burn op
//!   failed because of it, [`TrainError::PeerLost`], never a panic trace,
//!   and the launcher reports the first rank's own error.
//!   `parallel.timeout_s` (default 300 s) bounds every collective, including
//!   long legitimate waits (rank 0 preparing the dataset or committing a
//!   checkpoint); `parallel.failure_timeout_s` (default 60 s, at most
//!   `timeout_s`) is the failure detection of in-process ranks: one that
//!   makes no progress for that long while the others wait for it is named
//!   as hung ([`TrainError::Hung`]) and the process exits 1. Under `mpirun`
//!   a dead process ends the job through MPI, a stopped one through the
//!   collective timeout.
//! - **Fault injection.** `MICS_FAULT_INJECT` (comma-separated) drives the
//!   tests: `abort-before-commit:STEP`, `enospc:FILE`, `metrics-write:STEP`,
//!   `hang:RANK:STEP`, `slow-steps:MS`.
//!
//! # Reproducibility
//!
//! The global batch of step t depends only on the seed, t and N·b·s, so
//! runs with different (N, p, k, s) and the same global batch see the same
//! samples and, without dropout, reach the same losses to float tolerance.
//! Resuming on the same topology restores the shards and AdamW moments
//! exactly and continues the sampler at the saved step: the losses after a
//! resume are bit-identical to an uninterrupted run. Dropout masks come from `Mics`' per-thread random
//! generator, reseeded from (seed, step, rank) at every step, so they too are
//! the same run after run and after a resume, whatever the thread timing.

#![warn(missing_docs)]

mod checkpoint;
mod config;
pub mod cores;
mod device;
mod eval;
mod export;
pub mod families;
mod family;
mod fault;
mod integrity;
mod launch;
pub mod memory;
mod metrics;
mod optim;
mod optim_state;
mod panics;
mod schedule;
mod signals;
mod summary;
mod task;
mod trainer;
mod watchdog;

use std::path::{Path, PathBuf};

pub use checkpoint::{CHECKPOINT_FORMAT, CheckpointIndex, OLDEST_FORMAT, resolve_checkpoint};
pub use config::{
    DataConfig, Device, EngineKind, ModelConfig, OptimConfig, OptimizerKind, OutputConfig,
    Overrides, ParallelConfig, Precision, TrainConfig,
};
pub use device::{BackendTask, TrainBackend, param_values, with_backend};
pub use export::export;
pub use family::{Head, ModelFamily, ModelSpec, ModelType};
pub use integrity::{CHECKSUM_ALGORITHM, FileChecksums, ModelCheck, verify_model};
pub use metrics::{StepMetrics, read_metrics};
pub use schedule::learning_rate;
pub use signals::{
    SIGINT, SIGTERM, install_stop_handlers, request_stop, signal_name, stop_requested,
};
pub use summary::TrainSummary;
pub use task::{Batch, Task, TaskKind};

/// How a run ended on this process: rank 0 reports the run, the other ranks
/// of an MPI job only that they finished their part.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// This process ran rank 0 (or every rank, in-process): the run's summary.
    Leader(Box<TrainSummary>),
    /// This process ran another rank, which finished; rank 0 reports.
    Follower {
        /// The rank this process ran.
        rank: usize,
    },
    /// Every rank stopped on SIGINT or SIGTERM after the same step. Rank 0
    /// printed one line to stderr (the signal, the step, the checkpoint and
    /// how to resume) before any rank returned.
    Stopped {
        /// The signal ([`SIGINT`], [`SIGTERM`]).
        signal: i32,
        /// Steps done.
        step: u64,
        /// The checkpoint written at that step (none with
        /// `--no-checkpoint-on-signal`).
        checkpoint: Option<PathBuf>,
        /// Whether this process ran rank 0 (which reports).
        leader: bool,
    },
}

/// Runs `config` to `config.train.steps` optimizer steps, from the checkpoint
/// `resume` (a checkpoint or run directory) when given, on the configured
/// device, engine and precision. Any rank's failure is an error naming the
/// rank.
pub fn train(config: &TrainConfig, resume: Option<&Path>) -> Result<RunOutcome, TrainError> {
    // Under mpirun the launcher decides the world size unless --world said
    // otherwise: take it before the settings are checked against it (the
    // engine confirms it once MPI is up, and refuses a conflicting --world).
    let mut config = config.clone();
    if config.parallel.engine == EngineKind::Mpi
        && !config.parallel.world_from_flag
        && let Some(n) = launch::launcher_world_size(|name| std::env::var(name).ok())
    {
        config.parallel.world = n;
    }
    let config = &config;
    config.validate()?;
    // A device this build lacks, or a type it has not: an error before any work.
    struct Nothing;
    impl BackendTask for Nothing {
        type Output = ();
        fn run<B: TrainBackend>(self, _: B::Device) {}
    }
    with_backend(config.train.device, config.train.precision, Nothing)?;
    launch::launch(config, resume)
}

/// Everything that can stop a run, each naming the file, key, value or rank
/// at fault. One line each.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config file cannot be read or parsed.
    #[error("config {}: {problem}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line when known.
        problem: String,
    },
    /// A config value is out of range or inconsistent.
    #[error("invalid {key}: {problem}")]
    Invalid {
        /// The key, e.g. `parallel.partition_size`.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// The corpus, the dataset or the tokenizer.
    #[error("data: {0}")]
    Data(mics_datasets::DatasetError),
    /// A model checkpoint (`--init-from`, export).
    #[error("model: {0}")]
    Model(mics_hub::HubError),
    /// A sharded checkpoint is missing, corrupt or does not match the run.
    #[error("checkpoint {}: {problem}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A file of a checkpoint or an exported model does not match the
    /// checksum recorded when it was written.
    #[error("{}: {}{problem}", path.display(), tensor.as_ref().map(|t| format!("tensor `{t}`: ")).unwrap_or_default())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The first tensor whose data differs, when one does.
        tensor: Option<String>,
        /// What differs.
        problem: String,
    },
    /// A loaded parameter or optimizer state holds NaN or infinity.
    #[error(
        "{}: tensor `{tensor}` holds a non-finite value ({value}) at element {index}: the \
         checkpoint's values are unusable (resume from an earlier checkpoint)",
        path.display()
    )]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor (`param.<path>` or `optim.<path>.<moment>`).
        tensor: String,
        /// The first bad element.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// The run cannot fit the memory it may use: the estimate, before
    /// anything large is allocated.
    #[error(
        "{key} = {value}: a rank needs about {} ({detail}) but may use {} ({budget_source})",
        human_bytes(*needed),
        human_bytes(*budget)
    )]
    TooLarge {
        /// The key whose value the size depends on most.
        key: String,
        /// Its value.
        value: String,
        /// Estimated bytes per rank.
        needed: f64,
        /// Bytes a rank may use.
        budget: f64,
        /// Where the estimate goes.
        detail: String,
        /// Where the budget comes from.
        budget_source: String,
    },
    /// A rank made no progress while the others waited for it, for longer
    /// than the failure-detection timeout.
    #[error(
        "rank {rank} made no progress for {seconds} s while the other ranks waited for it \
         (parallel.failure_timeout_s = {seconds}): it is hung; the run stops (the last \
         checkpoint is intact)"
    )]
    Hung {
        /// The rank that stopped progressing.
        rank: usize,
        /// The failure-detection timeout.
        seconds: u64,
    },
    /// A collective failed or timed out.
    #[error("communication: {0}")]
    Comm(mics_comm::CommError),
    /// Writing outputs (metrics, plots, checkpoints).
    #[error("{}: {problem}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        problem: String,
    },
    /// A rank failed: its own error, reported by the launcher for the run
    /// ([`TrainError::root`] is the error itself).
    #[error("rank {rank}: {error}")]
    Rank {
        /// The rank that failed first.
        rank: usize,
        /// Its error.
        error: Box<TrainError>,
    },
    /// A rank panicked (a bug, or a backend's failure with no error path).
    #[error("panicked{}: {message}", place.as_ref().map(|p| format!(" at {p}")).unwrap_or_default())]
    Panicked {
        /// The panic's message.
        message: String,
        /// Where, when known.
        place: Option<String>,
    },
    /// A collective failed on this rank because another rank left or
    /// failed first (that rank reports its own error).
    #[error("rank {rank} stopped: {problem}")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The collective's failure.
        problem: String,
    },
    /// This rank stopped because other ranks failed (their errors are
    /// reported by those ranks).
    #[error("rank {rank} stopped: {failed} other rank(s) failed")]
    PeerFailed {
        /// This rank.
        rank: usize,
        /// How many ranks reported a failure.
        failed: usize,
    },
    /// The engine cannot start, or lost a rank.
    #[error("engine: {0}")]
    Engine(String),
    /// The training loss became infinite or NaN.
    #[error(
        "train.lr: the training loss is {loss} at step {step}: the run diverged (lower the \
         learning rate, raise warm-up or clipping, or check the data)"
    )]
    Diverged {
        /// The step (1-based) whose loss is not finite.
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// The compute device is not available.
    #[error("device {device}: {problem}")]
    Device {
        /// The device asked for (`--device`).
        device: String,
        /// Why it cannot be used.
        problem: String,
    },
    /// This build lacks a cargo feature the run needs.
    #[error(
        "{what} needs the `{feature}` cargo feature: rebuild with `cargo build --release --features {feature}`"
    )]
    FeatureMissing {
        /// What was asked for.
        what: String,
        /// The feature.
        feature: &'static str,
    },
}

// Plain `From`s rather than thiserror's `#[from]`, which would also make the
// wrapped error the `source()`: printed with its causes (`{:#}` in `mics`),
// the message would then repeat itself.
impl From<mics_datasets::DatasetError> for TrainError {
    fn from(err: mics_datasets::DatasetError) -> TrainError {
        TrainError::Data(err)
    }
}

impl From<mics_hub::HubError> for TrainError {
    fn from(err: mics_hub::HubError) -> TrainError {
        TrainError::Model(err)
    }
}

impl From<mics_comm::CommError> for TrainError {
    fn from(err: mics_comm::CommError) -> TrainError {
        TrainError::Comm(err)
    }
}

/// `bytes` as `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if !bytes.is_finite() {
        return format!("{bytes} B");
    }
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else if value >= 1e4 {
        format!("{value:.3e} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl TrainError {
    /// The error itself, without the [`TrainError::Rank`] that says which
    /// rank reported it.
    pub fn root(&self) -> &TrainError {
        match self {
            TrainError::Rank { error, .. } => error.root(),
            other => other,
        }
    }

    /// The error of an I/O failure of `mics-hub` on `path`, naming the path
    /// once.
    pub(crate) fn hub_io(err: mics_hub::HubError) -> TrainError {
        match err {
            mics_hub::HubError::Io { path, error } => TrainError::Io {
                path,
                problem: error.to_string(),
            },
            other => TrainError::Model(other),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> TrainError {
        TrainError::Io {
            path: path.into(),
            problem: err.to_string(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, problem: impl Into<String>) -> TrainError {
        TrainError::Checkpoint {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
