//! Launching a run: what every rank shares (the dataset, the model's
//! specification and initial values, the resume point), the engines that
//! start the ranks (in-process threads, MPI processes, NCCL), and the
//! agreement between ranks that turns one rank's failure into an error on
//! every rank instead of a hang.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::backend::NdArray;
use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use mics_comm::{Collectives, CommError, Communicator, ReduceOp, ThreadsEngine};
use mics_datasets::{Corpus, DatasetMeta, PrepareOptions, TokenizerSpec, open_meta};

use crate::checkpoint::{self, CheckpointIndex};
use crate::device::{BackendTask, TrainBackend, probe, with_backend};
use crate::family::{ModelFamily, ModelSpec};
use crate::panics::catch_rank;
use crate::trainer::RankEnd;
use crate::watchdog::{Beat, Watchdog};
use crate::{EngineKind, ModelType, RunOutcome, TrainConfig, TrainError, trainer, with_family};

/// Everything the ranks share, prepared once per process.
pub(crate) struct RunContext {
    pub config: TrainConfig,
    pub meta: DatasetMeta,
    pub dataset: PathBuf,
    pub spec: ModelSpec,
    /// The initial parameters as Burn record bytes (see [`initial_record`]).
    pub record: Vec<u8>,
    pub resume: Option<(PathBuf, CheckpointIndex)>,
}

pub(crate) fn launch(
    config: &TrainConfig,
    resume: Option<&Path>,
) -> Result<RunOutcome, TrainError> {
    match config.parallel.engine {
        EngineKind::Threads => threads(config, resume),
        EngineKind::Mpi => mpi(config, resume),
        EngineKind::Nccl => nccl(config, resume),
    }
}

/// Prepares (or opens) the dataset, reads the resume point and builds the
/// initial model. `prepare` is false on the MPI ranks other than 0, which
/// wait for rank 0's dataset.
fn context(
    config: &TrainConfig,
    resume: Option<&Path>,
    prepare: bool,
) -> Result<RunContext, TrainError> {
    let resume = match resume {
        Some(path) => {
            let dir = checkpoint::resolve_checkpoint(path)?;
            let index = checkpoint::read_index(&dir)?;
            Some((dir, index))
        }
        None => None,
    };
    let dataset = match &resume {
        // The run continues on the data it started on.
        Some((_, index)) if config.data.dataset.is_none() => index.dataset.clone(),
        _ => config.dataset_dir(),
    };
    let meta = if prepare {
        ensure_dataset(config, &dataset)?
    } else {
        open_meta(&dataset)?
    };
    let spec = model_spec(config, &meta)?;
    // Sizes checked before anything large is allocated; `auto` resolved.
    let dims = spec.dims().map_err(|problem| TrainError::Invalid {
        key: "model".into(),
        problem,
    })?;
    let (mut config, auto) = crate::memory::fit(config, dims, crate::memory::available_memory())?;
    if let (Some(line), true) = (auto, prepare) {
        eprintln!("{line}");
    }
    if let Some((dir, index)) = &resume {
        let note;
        (config, note) = keep_global_batch(&config, index);
        checkpoint::check_resume(&config, &spec, dir, index)?;
        if prepare {
            if let Some(note) = note {
                eprintln!("{note}");
            }
            let p = &config.parallel;
            if (index.world, index.partition_size) != (p.world, p.partition_size) {
                eprintln!(
                    "resuming step {} of {}, written at N = {}, p = {}, k = {}: re-sharded to \
                     N = {}, p = {}, k = {}",
                    index.step,
                    dir.display(),
                    index.world,
                    index.partition_size,
                    index.ranks_per_node,
                    p.world,
                    p.partition_size,
                    config.ranks_per_node()
                );
            }
        }
    }
    let record = initial_record(&spec, config.init_dir()?.as_deref(), config.train.seed)?;
    Ok(RunContext {
        config,
        meta,
        dataset,
        spec,
        record,
        resume,
    })
}

/// The config that resumes `index` with its global batch: when the world
/// size changed, `train.grad_accum` becomes what keeps N·b·s (when N·b
/// divides it), with a line saying so; with
/// `train.allow_global_batch_change`, the config's own global batch, and a
/// line saying what that changes. Otherwise unchanged (`check_resume`
/// refuses a different global batch).
pub(crate) fn keep_global_batch(
    config: &TrainConfig,
    index: &CheckpointIndex,
) -> (TrainConfig, Option<String>) {
    let mut config = config.clone();
    let (saved, now) = (index.global_batch, config.global_batch());
    if saved == now {
        return (config, None);
    }
    if config.train.allow_global_batch_change {
        let note = format!(
            "global batch {saved} -> {now} sequences from step {} (--allow-global-batch-change): \
             each step from here on draws {now} sequences, so the losses no longer continue the \
             saved run's; the learning-rate schedule and the step count are unchanged",
            index.step
        );
        return (config, Some(note));
    }
    let per_step = config.parallel.world * config.train.micro_batch;
    if config.parallel.world != index.world && per_step > 0 && saved.is_multiple_of(per_step) {
        let before = config.train.grad_accum;
        config.train.grad_accum = saved / per_step;
        let note = format!(
            "train.grad_accum {before} -> {} keeps the checkpoint's global batch of {saved} \
             sequences at world {} (micro_batch {})",
            config.train.grad_accum, config.parallel.world, config.train.micro_batch
        );
        return (config, Some(note));
    }
    (config, None)
}

/// Opens the dataset, preparing it from the corpus when it is not there.
/// An existing dataset must come from the configured corpus and tokenizer.
fn ensure_dataset(config: &TrainConfig, dir: &Path) -> Result<DatasetMeta, TrainError> {
    let corpus = match config.data.corpus.parse::<Corpus>() {
        Ok(corpus) => corpus,
        Err(never) => match never {},
    };
    let tokenizer = match config.data.tokenizer.parse::<TokenizerSpec>() {
        Ok(tokenizer) => tokenizer,
        Err(never) => match never {},
    };
    if dir.join(mics_datasets::META_FILE).is_file() {
        let meta = open_meta(dir)?;
        let wanted = PrepareOptions::new(corpus, tokenizer, dir);
        let (c, t) = (wanted.corpus.to_string(), wanted.tokenizer.to_string());
        if meta.corpus != c || meta.tokenizer != t {
            return Err(TrainError::Invalid {
                key: "data.dataset".into(),
                problem: format!(
                    "{} holds `{}` tokenized with `{}`, but the config asks for `{c}` with `{t}`: \
                     point data.dataset elsewhere or remove it",
                    dir.display(),
                    meta.corpus,
                    meta.tokenizer
                ),
            });
        }
        return Ok(meta);
    }
    // A missing corpus is an error, not a "preparing" line and then an error.
    corpus.documents()?;
    eprintln!(
        "preparing {} with the {} tokenizer into {}",
        config.data.corpus,
        config.data.tokenizer,
        dir.display()
    );
    let mut options = PrepareOptions::new(corpus, tokenizer, dir);
    options.val_fraction = config.data.val_fraction;
    options.progress = true;
    Ok(mics_datasets::prepare(&options)?)
}

/// The model of a run: from `init_from` (its `config.json`) or from the
/// config's sizes with the dataset's vocabulary; dropout from the config.
pub(crate) fn model_spec(
    config: &TrainConfig,
    meta: &DatasetMeta,
) -> Result<ModelSpec, TrainError> {
    let kind = config.model.kind;
    let spec = with_family!(kind, |F| family_spec::<F>(kind, config, meta))?;
    let vocab = spec.vocab_size().map_err(|problem| TrainError::Invalid {
        key: "model".into(),
        problem,
    })?;
    if meta.vocab_size > vocab {
        return Err(TrainError::Invalid {
            key: "data.tokenizer".into(),
            problem: format!(
                "the dataset's tokenizer has {} ids but the model's vocabulary only {vocab}",
                meta.vocab_size
            ),
        });
    }
    let positions = spec
        .max_positions()
        .map_err(|problem| TrainError::Invalid {
            key: "model".into(),
            problem,
        })?;
    let seq = config.data.seq_len;
    if seq > positions {
        return Err(TrainError::Invalid {
            key: "data.seq_len".into(),
            problem: format!("{seq} is longer than the model's {positions} positions"),
        });
    }
    Ok(spec)
}

fn family_spec<F: ModelFamily>(
    kind: ModelType,
    config: &TrainConfig,
    meta: &DatasetMeta,
) -> Result<ModelSpec, TrainError> {
    let m = &config.model;
    let invalid = |key: &str, problem: String| TrainError::Invalid {
        key: key.into(),
        problem,
    };
    let base = match config.init_dir()? {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| invalid("model.init_from", format!("{}: {e}", path.display())))?;
            F::from_json(value)
                .map_err(|e| invalid("model.init_from", format!("{}: {e}", path.display())))?
        }
        None => F::sized(
            m,
            meta.vocab_size,
            m.max_positions.unwrap_or(config.data.seq_len),
        ),
    };
    let family_config =
        F::with_dropout(base, m.dropout).map_err(|e| invalid("model.dropout", e))?;
    F::validate(&family_config).map_err(|e| invalid("model", e))?;
    Ok(ModelSpec::of::<F>(kind, &family_config))
}

/// The initial parameters as Burn record bytes, built once on the calling
/// thread (the backend's random generator is process-wide, so building on
/// every rank thread at once would not be reproducible) and loaded by every
/// rank: from `init_from`, or a fresh initialisation seeded with `seed`.
fn initial_record(
    spec: &ModelSpec,
    init_from: Option<&Path>,
    seed: u64,
) -> Result<Vec<u8>, TrainError> {
    fn record<F: ModelFamily>(
        spec: &ModelSpec,
        init_from: Option<&Path>,
        seed: u64,
    ) -> Result<Vec<u8>, TrainError> {
        type Cpu = NdArray;
        let device = Default::default();
        Cpu::seed(&device, seed);
        let model = match init_from {
            Some(dir) => F::load::<Cpu>(dir, &device)?.0,
            None => {
                let config = spec.config::<F>().map_err(|problem| TrainError::Invalid {
                    key: "model".into(),
                    problem,
                })?;
                F::init::<Cpu>(&config, &device)
            }
        };
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        Recorder::<Cpu>::record(&recorder, model.into_record(), ())
            .map_err(|e| TrainError::Engine(format!("cannot serialise the initial model: {e}")))
    }
    with_family!(spec.kind, |F| record::<F>(spec, init_from, seed))
}

fn threads(config: &TrainConfig, resume: Option<&Path>) -> Result<RunOutcome, TrainError> {
    let ctx = context(config, resume, true)?;
    let p = &config.parallel;
    let engine = ThreadsEngine::new(p.world)
        .ranks_per_node(config.ranks_per_node())
        .timeout(Duration::from_secs(p.timeout_s))
        .latency(Duration::from_micros(p.latency_us));
    let watchdog = Watchdog::start(p.world, p.failure_timeout_s);
    // Ranks sharing the cores compute in pools of their share (crate::cores).
    let pools: Vec<_> = (0..p.world)
        .map(|_| crate::cores::rank_pool(config))
        .collect();
    let results = engine.run(|comm| {
        let rank = comm.rank();
        let beat = watchdog.beat(rank);
        // Caught on the thread that runs it: the quiet panic hook is per thread.
        let body = || catch_rank(rank, || run_rank(Arc::new(comm), &ctx, beat.clone()));
        let result = match &pools[rank] {
            Some(pool) => pool.install(body),
            None => body(),
        };
        beat.finish();
        result
    })?;
    drop(watchdog);
    collect(results)
}

/// A rank's end as this process's outcome.
fn outcome(end: RankEnd, rank: usize) -> RunOutcome {
    match end {
        RankEnd::Finished(Some(summary)) => RunOutcome::Leader(Box::new(summary)),
        RankEnd::Finished(None) => RunOutcome::Follower { rank },
        RankEnd::Stopped {
            signal,
            step,
            checkpoint,
        } => RunOutcome::Stopped {
            signal,
            step,
            checkpoint,
            leader: rank == 0,
        },
    }
}

/// Rank 0's outcome, or the most telling error: a rank's own error before
/// the errors it caused on the others (a peer that stopped, a group that a
/// failed rank left).
fn collect(
    results: Vec<Result<Result<RankEnd, TrainError>, String>>,
) -> Result<RunOutcome, TrainError> {
    let mut leader = None;
    // (rank, error, caused by another rank's failure)
    let mut errors: Vec<(usize, TrainError, bool)> = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok(Ok(end)) if rank == 0 => leader = Some(outcome(end, 0)),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                let consequence = is_consequence(&err);
                errors.push((rank, err, consequence));
            }
            Err(panic) => errors.push((
                rank,
                TrainError::Panicked {
                    message: panic,
                    place: None,
                },
                false,
            )),
        }
    }
    let first_own = errors.iter().position(|(_, _, consequence)| !consequence);
    if let Some(i) = first_own.or((!errors.is_empty()).then_some(0)) {
        let (rank, error, _) = errors.swap_remove(i);
        return Err(TrainError::Rank {
            rank,
            error: Box::new(error),
        });
    }
    match leader {
        Some(RunOutcome::Follower { .. }) | None => {
            Err(TrainError::Engine("rank 0 returned no summary".into()))
        }
        Some(outcome) => Ok(outcome),
    }
}

/// Whether `err` is the echo of another rank's failure rather than this
/// rank's own.
fn is_consequence(err: &TrainError) -> bool {
    fn comm(err: &CommError) -> bool {
        match err {
            CommError::RankLeft { .. } => true,
            CommError::Poisoned(cause) => comm(cause),
            _ => false,
        }
    }
    match err {
        TrainError::PeerFailed { .. } | TrainError::PeerLost { .. } => true,
        TrainError::Comm(e) => comm(e),
        _ => false,
    }
}

#[cfg(feature = "mpi")]
fn mpi(config: &TrainConfig, resume: Option<&Path>) -> Result<RunOutcome, TrainError> {
    let p = &config.parallel;
    if !under_mpi_launcher(|name| std::env::var_os(name).is_some()) {
        return Err(TrainError::Invalid {
            key: "parallel.engine".into(),
            problem: "`mpi` runs one rank per process under mpirun (`mpirun -np N mics train \
                      --engine mpi ...`), and this process was not started by mpirun: use \
                      `threads` to run the ranks in this process"
                .into(),
        });
    }
    let mut engine = mics_comm::mpi::MpiEngine::new().timeout(Duration::from_secs(p.timeout_s));
    if let Some(k) = p.ranks_per_node {
        engine = engine.ranks_per_node(k);
    }
    let comm = engine.init()?;
    let mut config = config.clone();
    if p.ranks_per_node.is_none() {
        // The nodes MPI reports: the ranks on this rank's node.
        let node = comm.nodes()[comm.rank()];
        let k = comm.nodes().iter().filter(|&&n| n == node).count();
        config.parallel.ranks_per_node = Some(k);
    }
    // The launcher decides the world size unless --world said otherwise.
    if comm.size() != p.world {
        if p.world_from_flag {
            return Err(TrainError::Invalid {
                key: "parallel.world".into(),
                problem: format!(
                    "--world {} but mpirun started {} processes (drop --world or change -np)",
                    p.world,
                    comm.size(),
                ),
            });
        }
        config.parallel.world = comm.size();
        config.validate()?;
    }
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let rank = comm.rank();
    // Rank 0 prepares the dataset; the others wait for it, then every rank
    // learns whether everyone could set up.
    let first = if rank == 0 {
        Some(context(&config, resume, true))
    } else {
        None
    };
    comm.barrier().wait()?;
    let ctx = match first {
        Some(ctx) => ctx,
        None => context(&config, resume, false),
    };
    let ctx = agree(&comm, ctx)?;
    // `partition_size = "auto"` is chosen from each node's memory: every
    // rank must have chosen rank 0's p.
    let chosen = ctx.config.parallel.partition_size;
    let first = comm.broadcast(vec![chosen as f32], 0).wait()?[0] as usize;
    let same = if first == chosen {
        Ok(())
    } else {
        Err(TrainError::Invalid {
            key: "parallel.partition_size".into(),
            problem: format!(
                "`auto` chose p = {first} on rank 0 but p = {chosen} on rank {rank} (their \
                 nodes' available memory differs): set the partition size"
            ),
        })
    };
    agree(&comm, same)?;
    // Failure detection across processes: a generation agreed from rank 0's
    // clock (two 16-bit halves, exact in f32) tells this run's heartbeat
    // files from an earlier run's.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u32)
        .unwrap_or(0);
    let halves = vec![(clock & 0xffff) as f32, (clock >> 16) as f32];
    let halves = comm.broadcast(halves, 0).wait()?;
    let generation = halves[0] as u64 | ((halves[1] as u64) << 16);
    let watchdog = Watchdog::start_files(
        ctx.config.output.dir.join(".heartbeats"),
        rank,
        comm.size(),
        generation,
        ctx.config.parallel.failure_timeout_s,
    );
    let beat = watchdog.beat(0);
    let end = catch_rank(rank, || run_rank(comm.clone(), &ctx, beat.clone()));
    beat.finish();
    drop(watchdog);
    Ok(outcome(end?, rank))
}

#[cfg(not(feature = "mpi"))]
fn mpi(_: &TrainConfig, _: Option<&Path>) -> Result<RunOutcome, TrainError> {
    Err(TrainError::FeatureMissing {
        what: "--engine mpi (launched with `mpirun -np N mics train --engine mpi ...`)".into(),
        feature: "mpi",
    })
}

/// The world size an MPI launcher announces in the environment (Open MPI's
/// `OMPI_COMM_WORLD_SIZE`, MPICH's and Slurm's `PMI_SIZE`), as
/// `lookup(variable)` reads it.
pub(crate) fn launcher_world_size(lookup: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|name| lookup(name)?.trim().parse().ok())
        .filter(|&n| n > 0)
}

#[cfg_attr(not(any(feature = "mpi", test)), allow(dead_code))]
/// Whether this process was started by an MPI launcher (Open MPI, MPICH,
/// PMIx, Slurm's PMI), as `lookup(variable)` says of the environment.
pub(crate) fn under_mpi_launcher(lookup: impl Fn(&str) -> bool) -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_RANK",
        "PMI_SIZE",
        "PMI_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|name| lookup(name))
}

#[cfg(feature = "cuda")]
fn nccl(config: &TrainConfig, resume: Option<&Path>) -> Result<RunOutcome, TrainError> {
    let ctx = context(config, resume, true)?;
    let p = &config.parallel;
    let devices: Vec<usize> = (0..p.world).collect();
    let engine = mics_comm::nccl::NcclEngine::new().timeout(Duration::from_secs(p.timeout_s));
    let watchdog = Watchdog::start(p.world, p.failure_timeout_s);
    let results = engine.run(&devices, |comm| {
        let rank = comm.rank();
        let beat = watchdog.beat(rank);
        let result = catch_rank(rank, || run_rank(Arc::new(comm), &ctx, beat.clone()));
        beat.finish();
        result
    })?;
    drop(watchdog);
    collect(results)
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: &TrainConfig, _: Option<&Path>) -> Result<RunOutcome, TrainError> {
    Err(TrainError::FeatureMissing {
        what: "--engine nccl".into(),
        feature: "cuda",
    })
}

/// Every rank's `result`, agreed: if any rank failed, every rank returns an
/// error (the failing rank its own, the others [`TrainError::PeerFailed`]),
/// so nobody waits in a collective for a rank that has stopped.
pub(crate) fn agree<T>(
    comm: &Arc<dyn Communicator>,
    result: Result<T, TrainError>,
) -> Result<T, TrainError> {
    let failed = f32::from(u8::from(result.is_err()));
    let failures = comm.all_reduce(vec![failed], ReduceOp::Sum).wait()?;
    match result {
        Err(err) => Err(err),
        Ok(_) if failures[0] > 0.0 => Err(TrainError::PeerFailed {
            rank: comm.rank(),
            failed: failures[0] as usize,
        }),
        Ok(value) => Ok(value),
    }
}

/// One rank: on the configured device and precision, the model's family.
fn run_rank(
    comm: Arc<dyn Communicator>,
    ctx: &RunContext,
    beat: Beat,
) -> Result<RankEnd, TrainError> {
    struct Rank<'a> {
        comm: Arc<dyn Communicator>,
        ctx: &'a RunContext,
        beat: Beat,
    }
    impl BackendTask for Rank<'_> {
        type Output = Result<RankEnd, TrainError>;
        fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
            let probed = probe::<B>(self.ctx.config.train.device, &device);
            let probed = agree(&self.comm, probed);
            probed?;
            with_family!(self.ctx.spec.kind, |F| trainer::run_rank::<B, F>(
                self.comm, self.ctx, device, self.beat
            ))
        }
    }
    let t = &ctx.config.train;
    with_backend(t.device, t.precision, Rank { comm, ctx, beat })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpirun_is_recognised_by_its_environment() {
        assert!(!under_mpi_launcher(|_| false));
        assert!(under_mpi_launcher(|name| name == "OMPI_COMM_WORLD_SIZE"));
        assert!(under_mpi_launcher(|name| name == "PMI_SIZE"));
    }

    #[test]
    fn the_launchers_world_size_is_read_from_its_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(launcher_world_size(env(&[])), None);
        assert_eq!(
            launcher_world_size(env(&[("OMPI_COMM_WORLD_SIZE", "4")])),
            Some(4)
        );
        assert_eq!(launcher_world_size(env(&[("PMI_SIZE", "8")])), Some(8));
        assert_eq!(
            launcher_world_size(env(&[("OMPI_COMM_WORLD_SIZE", "x")])),
            None
        );
        assert_eq!(launcher_world_size(env(&[("PMI_SIZE", "0")])), None);
    }
}
