//! The training run: the engines, the per-rank loop, evaluation and
//! checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{AdamW, AdamWConfig};
use burn::tensor::backend::Backend;
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, ShardedOptimizer, shard_module};
use mics_bert::BertForMaskedLM;
use mics_comm::{Collectives, Communicator, MicsGroups, ReduceOp, ThreadsEngine, Topology};
use mics_datasets::{
    Corpus, DatasetMeta, GlobalBatchSampler, PrepareOptions, Split, TokenFile, TokenizerSpec,
    lm_batch, mlm_batch, open_meta,
};
use mics_gpt::Gpt2LMHeadModel;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointDir, CheckpointIndex, ParamInfo};
use crate::metrics::{MetricsWriter, Progress, StepMetrics, plot_loss, read_metrics};
use crate::model::{Batch, ModelSpec, TaskModel, initial_record, load_model, model_spec};
use crate::{EngineKind, ModelType, TrainConfig, TrainError, learning_rate};

/// The compute backend of `mics train`: NdArray on the CPU.
type Inner = NdArray;
/// What the model trains on.
type Train = Autodiff<Mics<Inner>>;

/// What a finished run reports (rank 0's view; also `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps done in total (including those before a resume).
    pub steps: u64,
    /// Step the run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Training loss of every step this run did, in order.
    pub losses: Vec<f64>,
    /// The last validation loss.
    pub val_loss: Option<f64>,
    /// Cross-entropy of the validation tokens under the training split's
    /// unigram distribution (add-one smoothing): the loss a model that
    /// ignores context reaches. Causal LM only.
    pub unigram_val_loss: Option<f64>,
    /// Tokens per second over the steps of this run (all ranks together).
    pub tokens_per_s: f64,
    /// Wall time of the training loop.
    pub train_seconds: f64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The metrics file.
    pub metrics: PathBuf,
    /// The loss-curve PNG, if drawn.
    pub loss_plot: Option<PathBuf>,
}

/// Everything the ranks share, prepared once per process.
struct RunContext {
    config: TrainConfig,
    meta: DatasetMeta,
    dataset: PathBuf,
    spec: ModelSpec,
    record: Vec<u8>,
    resume: Option<(PathBuf, CheckpointIndex)>,
}

/// Runs `config` to `config.train.steps` optimizer steps, from the
/// checkpoint `resume` (a checkpoint or run directory) when given. Returns
/// rank 0's summary; any rank's failure is an error naming the rank.
pub fn train(config: &TrainConfig, resume: Option<&Path>) -> Result<TrainSummary, TrainError> {
    config.validate()?;
    match config.parallel.engine {
        EngineKind::Threads => train_threads(config, resume),
        EngineKind::Mpi => train_mpi(config, resume),
        EngineKind::Nccl => train_nccl(config, resume),
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
    if let Some((dir, index)) = &resume {
        check_resume(config, &spec, dir, index)?;
    }
    let record = initial_record(&spec, config.init_dir()?.as_deref(), config.train.seed)?;
    Ok(RunContext {
        config: config.clone(),
        meta,
        dataset,
        spec,
        record,
        resume,
    })
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

/// A checkpoint continues only the run that wrote it: same topology, model
/// and global batch.
fn check_resume(
    config: &TrainConfig,
    spec: &ModelSpec,
    dir: &Path,
    index: &CheckpointIndex,
) -> Result<(), TrainError> {
    let p = &config.parallel;
    if index.world != p.world || index.partition_size != p.partition_size {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with world {} and partition size {}, this run has world {} and partition \
                 size {}: re-sharding is not supported (export it and start with --init-from)",
                index.world, index.partition_size, p.world, p.partition_size
            ),
        ));
    }
    if index.global_batch != config.global_batch() {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with a global batch of {} sequences, this run has {} (world × micro-batch \
                 × grad-accum): the sampler position would not match",
                index.global_batch,
                config.global_batch()
            ),
        ));
    }
    if index.seed != config.train.seed {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with seed {}, this run has seed {}",
                index.seed, config.train.seed
            ),
        ));
    }
    if &index.model != spec {
        return Err(TrainError::checkpoint(
            dir,
            "its model configuration differs from this run's",
        ));
    }
    if index.step > config.train.steps {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "already at step {}, beyond --steps {}",
                index.step, config.train.steps
            ),
        ));
    }
    Ok(())
}

fn train_threads(config: &TrainConfig, resume: Option<&Path>) -> Result<TrainSummary, TrainError> {
    let ctx = context(config, resume, true)?;
    let p = &config.parallel;
    let engine = ThreadsEngine::new(p.world)
        .ranks_per_node(config.ranks_per_node())
        .timeout(Duration::from_secs(p.timeout_s));
    let results = engine.run(|comm| run_rank(Arc::new(comm), &ctx))?;
    collect(results)
}

/// Rank 0's summary, or the most telling error: a rank's own error before
/// the "a peer failed" errors it caused elsewhere.
fn collect(
    results: Vec<Result<Result<Option<TrainSummary>, TrainError>, String>>,
) -> Result<TrainSummary, TrainError> {
    let mut summary = None;
    let mut errors = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok(Ok(Some(s))) => summary = Some(s),
            Ok(Ok(None)) => {}
            // `agree`'s "stopping: other rank(s) failed" is not a rank's own error.
            Ok(Err(err)) => {
                let echo = matches!(err, TrainError::Rank { .. });
                errors.push((rank, err.to_string(), echo))
            }
            Err(panic) => errors.push((rank, panic, false)),
        }
    }
    let own = |m: &String| !m.contains("peer") && !m.contains("another rank");
    if let Some((rank, message, _)) = errors
        .iter()
        .find(|(_, m, echo)| !echo && own(m))
        .or_else(|| errors.first())
        .cloned()
    {
        return Err(TrainError::Rank { rank, message });
    }
    summary.ok_or_else(|| TrainError::Engine("rank 0 returned no summary".into()))
}

#[cfg(feature = "mpi")]
fn train_mpi(config: &TrainConfig, resume: Option<&Path>) -> Result<TrainSummary, TrainError> {
    let p = &config.parallel;
    let comm = mics_comm::mpi::MpiEngine::new()
        .ranks_per_node(config.ranks_per_node())
        .timeout(Duration::from_secs(p.timeout_s))
        .init()?;
    if comm.size() != p.world {
        return Err(TrainError::Invalid {
            key: "parallel.world".into(),
            problem: format!(
                "{} but mpirun started {} processes (pass --world {} or change -np)",
                p.world,
                comm.size(),
                comm.size()
            ),
        });
    }
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let rank = comm.rank();
    // Rank 0 prepares the dataset; the others wait for it, then every rank
    // learns whether everyone could set up.
    let first = if rank == 0 {
        Some(context(config, resume, true))
    } else {
        None
    };
    comm.barrier().wait()?;
    let ctx = match first {
        Some(ctx) => ctx,
        None => context(config, resume, false),
    };
    let ctx = agree(&comm, ctx)?;
    let result = run_rank(comm.clone(), &ctx);
    match result {
        Ok(Some(summary)) => Ok(summary),
        // Ranks other than 0 report nothing: print their success quietly.
        Ok(None) => Err(TrainError::Engine(NOT_RANK_ZERO.into())),
        Err(err) => Err(err),
    }
}

/// What `train` returns on MPI ranks other than 0 after a successful run.
pub const NOT_RANK_ZERO: &str = "this process is not rank 0: rank 0 reports the run";

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: &TrainConfig, _: Option<&Path>) -> Result<TrainSummary, TrainError> {
    Err(TrainError::Engine(
        "this mics was built without MPI: rebuild with `cargo build --release --features mpi` \
         and launch with `mpirun -np N mics train --engine mpi ...`"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn train_nccl(config: &TrainConfig, resume: Option<&Path>) -> Result<TrainSummary, TrainError> {
    let ctx = context(config, resume, true)?;
    let p = &config.parallel;
    let devices: Vec<usize> = (0..p.world).collect();
    let engine = mics_comm::nccl::NcclEngine::new().timeout(Duration::from_secs(p.timeout_s));
    let results = engine.run(&devices, |comm| run_rank(Arc::new(comm), &ctx))?;
    collect(results)
}

#[cfg(not(feature = "cuda"))]
fn train_nccl(_: &TrainConfig, _: Option<&Path>) -> Result<TrainSummary, TrainError> {
    Err(TrainError::Engine(
        "this mics was built without CUDA: rebuild with `cargo build --release --features cuda`"
            .into(),
    ))
}

/// Every rank's `result`, agreed: if any rank failed, every rank returns an
/// error (the failing rank its own), so nobody waits in a collective for a
/// rank that has stopped.
fn agree<T>(comm: &Arc<dyn Communicator>, result: Result<T, TrainError>) -> Result<T, TrainError> {
    let failed = f32::from(u8::from(result.is_err()));
    let failures = comm.all_reduce(vec![failed], ReduceOp::Sum).wait()?;
    match result {
        Err(err) => Err(err),
        Ok(_) if failures[0] > 0.0 => Err(TrainError::Rank {
            rank: comm.rank(),
            message: format!("stopping: {} other rank(s) failed", failures[0]),
        }),
        Ok(value) => Ok(value),
    }
}

fn run_rank(
    comm: Arc<dyn Communicator>,
    ctx: &RunContext,
) -> Result<Option<TrainSummary>, TrainError> {
    match &ctx.spec {
        ModelSpec::Gpt2(c) => {
            let device = Default::default();
            let fresh = Gpt2LMHeadModel::<Train>::init(c, &device);
            rank_loop(comm, ctx, fresh)
        }
        ModelSpec::Bert(c) => {
            let device = Default::default();
            let fresh = BertForMaskedLM::<Train>::init(c, &device);
            rank_loop(comm, ctx, fresh)
        }
    }
}

/// The data one rank reads.
struct RankData {
    train: TokenFile,
    val: TokenFile,
    sampler: GlobalBatchSampler,
    val_sampler: GlobalBatchSampler,
}

/// The sampler seed of the validation batches (fixed per run seed, so
/// every evaluation scores the same samples).
const VAL_SEED_SALT: u64 = 0x7661_6c69_6461_7465;

fn window(kind: ModelType, seq_len: usize) -> usize {
    match kind {
        ModelType::Gpt2 => seq_len + 1,
        ModelType::Bert => seq_len - 2,
    }
}

fn open_data(ctx: &RunContext) -> Result<RankData, TrainError> {
    let c = &ctx.config;
    let window = window(ctx.spec.kind(), c.data.seq_len);
    let train = TokenFile::open(&ctx.dataset, Split::Train)?;
    let val = TokenFile::open(&ctx.dataset, Split::Val)?;
    let g = c.global_batch();
    let sampler = GlobalBatchSampler::new(train.len(), window, g, c.train.seed)?;
    let val_sampler = GlobalBatchSampler::new(val.len(), window, g, c.train.seed ^ VAL_SEED_SALT)?;
    Ok(RankData {
        train,
        val,
        sampler,
        val_sampler,
    })
}

/// The masked-LM loss scale of one global batch `all` (N·s / its selected
/// tokens, see [`Batch::Mlm`]); `None` for causal LM. Computed once per
/// global batch, not per micro-step.
fn mlm_scale(
    ctx: &RunContext,
    tokens: &TokenFile,
    all: impl FnOnce() -> Vec<usize>,
) -> Result<Option<f32>, TrainError> {
    if ctx.spec.kind() != ModelType::Bert {
        return Ok(None);
    }
    let c = &ctx.config;
    let (special, vocab, seed) = (&ctx.meta.special, ctx.meta.vocab_size, c.train.seed);
    let total = mlm_batch(tokens, &all(), c.data.seq_len, special, vocab, seed)?
        .masked
        .max(1);
    let ranks_micro = c.parallel.world * c.train.grad_accum;
    Ok(Some(ranks_micro as f32 / total as f32))
}

/// The batch of `windows` for the run's task (`scale` from [`mlm_scale`]).
fn make_batch(
    ctx: &RunContext,
    tokens: &TokenFile,
    windows: &[usize],
    scale: Option<f32>,
) -> Result<Batch, TrainError> {
    let c = &ctx.config;
    let seq = c.data.seq_len;
    Ok(match (ctx.spec.kind(), scale) {
        (ModelType::Bert, Some(scale)) => {
            let (special, vocab, seed) = (&ctx.meta.special, ctx.meta.vocab_size, c.train.seed);
            let batch = mlm_batch(tokens, windows, seq, special, vocab, seed)?;
            Batch::Mlm { batch, scale }
        }
        _ => Batch::Lm(lm_batch(tokens, windows, seq)),
    })
}

fn rank_loop<M>(
    comm: Arc<dyn Communicator>,
    ctx: &RunContext,
    fresh: M,
) -> Result<Option<TrainSummary>, TrainError>
where
    M: AutodiffModule<Train> + TaskModel<Train>,
    M::InnerModule: TaskModel<Mics<Inner>>,
{
    let c = &ctx.config;
    let p = &c.parallel;
    let rank = comm.rank();
    let world = comm.size();
    let device = Default::default();
    let topology = Topology::new(world, c.ranks_per_node(), p.partition_size).map_err(|e| {
        TrainError::Invalid {
            key: "parallel".into(),
            problem: e.to_string(),
        }
    })?;
    let groups = MicsGroups::new(comm.clone(), topology)?;
    let prefetch = if p.prefetch_depth == 0 {
        PrefetchConfig::disabled()
    } else {
        PrefetchConfig::new(p.prefetch_depth, 256 << 20)
    };
    let runtime = MicsRuntime::with_prefetch(groups, prefetch);

    // Set-up that can fail on one rank: agreed before any training collective.
    let setup = (|| {
        let model = load_model::<Train, M>(fresh, &ctx.record, &device)?;
        let data = open_data(ctx)?;
        let states = match &ctx.resume {
            Some((dir, index)) => Some(checkpoint::read_rank_file(dir, rank, &index.params)?),
            None => None,
        };
        Ok((model, data, states))
    })();
    let (model, data, states) = agree(&comm, setup)?;
    let mut model = shard_module(model, &runtime, ShardInit::Identical);
    let t = &c.train;
    let adamw = AdamWConfig::new()
        .with_beta_1(t.beta1)
        .with_beta_2(t.beta2)
        .with_epsilon(t.eps)
        .with_weight_decay(t.weight_decay as f32);
    let mut optim: ShardedOptimizer<Inner, AdamW> =
        ShardedOptimizer::adamw(&adamw, &runtime).with_grad_norm_tracking();
    if t.grad_clip > 0.0 {
        optim = optim.with_grad_clip_norm(t.grad_clip);
    }
    let (start, mut tokens_seen) = match (&ctx.resume, states) {
        (Some((dir, index)), Some(states)) => {
            let imported = optim.import_state(model, states).map_err(|e| {
                TrainError::checkpoint(dir.join(checkpoint::rank_file_name(rank)), e.to_string())
            });
            // On failure the module is gone: every rank stops here.
            model = agree(&comm, imported)?;
            (index.step, index.tokens_seen)
        }
        _ => (0, 0),
    };

    let leader = rank == 0;
    let metrics_path = c.metrics_path();
    let mut metrics = if leader {
        Some(MetricsWriter::open(&metrics_path, start)?)
    } else {
        None
    };
    let progress = leader.then(|| Progress::new(start, t.steps, t.log_every));
    let ckpt = CheckpointDir {
        root: c.output.dir.join("checkpoints"),
    };
    let tokens_per_step = (c.global_batch() * c.data.seq_len) as u64;
    let (n, s) = (world, t.grad_accum);
    let mut losses = Vec::new();
    let mut val_loss = None;
    let mut last_checkpoint = None;
    let started = Instant::now();
    for step in start..t.steps {
        let step_started = Instant::now();
        runtime.begin_step();
        // Dropout masks: a function of (seed, step, rank), see the crate docs.
        Train::seed(&device, mix(t.seed, step, rank as u64));
        let scale = mlm_scale(ctx, &data.train, || data.sampler.global_batch(step))?;
        let mut loss_sum = 0.0f32;
        for micro in 0..s {
            let windows = data.sampler.micro_batch(step, rank, n, s, micro)?;
            let batch = make_batch(ctx, &data.train, &windows, scale)?;
            let loss = model.loss(&batch, &device);
            loss_sum += loss.clone().into_scalar();
            optim.accumulate(&model, loss.backward());
        }
        let lr = learning_rate(t, step);
        model = optim.step(lr, model);
        let total = comm.all_reduce(vec![loss_sum], ReduceOp::Sum).wait()?;
        let loss = f64::from(total[0]) / (n * s) as f64;
        tokens_seen += tokens_per_step;
        losses.push(loss);
        let done = step + 1;
        let step_metrics = StepMetrics {
            step: done,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: optim.last_grad_norm().map(f64::from),
            tokens: Some(tokens_seen),
            tokens_per_s: Some(tokens_per_step as f64 / step_started.elapsed().as_secs_f64()),
            val_loss: None,
        };
        if let (Some(m), Some(progress)) = (metrics.as_mut(), &progress) {
            m.write(&step_metrics)?;
            let per_step = started.elapsed().as_secs_f64() / (done - start) as f64;
            progress.step(&step_metrics, per_step * (t.steps - done) as f64);
        }
        if !loss.is_finite() {
            return Err(TrainError::Invalid {
                key: "train.lr".into(),
                problem: format!("the loss is {loss} at step {done}: lower the learning rate"),
            });
        }
        let last = done == t.steps;
        if (t.eval_every > 0 && done % t.eval_every == 0) || last {
            let v = evaluate(ctx, &comm, &runtime, &model, &data)?;
            val_loss = Some(v);
            if let (Some(m), Some(progress)) = (metrics.as_mut(), &progress) {
                m.write(&StepMetrics {
                    step: done,
                    val_loss: Some(v),
                    ..Default::default()
                })?;
                progress.note(&format!("step {done}: validation loss {v:.4}"));
            }
        }
        if (t.checkpoint_every > 0 && done % t.checkpoint_every == 0) || last {
            let dir = save_checkpoint(ctx, &comm, &optim, &model, &ckpt, done, tokens_seen)?;
            last_checkpoint = Some(dir);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    if !leader {
        return Ok(None);
    }
    if let Some(progress) = &progress {
        progress.finish();
    }
    let history = read_metrics(&metrics_path)?;
    let plot = c.output.dir.join("loss.png");
    let title = format!(
        "{} on {} (N = {}, p = {})",
        match ctx.spec.kind() {
            ModelType::Gpt2 => "GPT-2",
            ModelType::Bert => "BERT MLM",
        },
        c.data.corpus,
        world,
        p.partition_size
    );
    let loss_plot = match plot_loss(&history, &title, &plot) {
        Ok(()) => Some(plot),
        Err(err) => {
            eprintln!("warning: {err}");
            None
        }
    };
    let unigram_val_loss = (ctx.spec.kind() == ModelType::Gpt2)
        .then(|| unigram_cross_entropy(&data.train, &data.val, ctx.meta.vocab_size));
    let done_steps = t.steps - start;
    let summary = TrainSummary {
        steps: t.steps,
        start_step: start,
        losses,
        val_loss,
        unigram_val_loss,
        tokens_per_s: (done_steps * tokens_per_step) as f64 / train_seconds.max(1e-9),
        train_seconds,
        checkpoint: last_checkpoint,
        metrics: metrics_path,
        loss_plot,
    };
    let path = c.output.dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("plain struct");
    mics_hub::checkpoint::write_atomic(&path, text.as_bytes())
        .map_err(|e| TrainError::io(&path, e))?;
    Ok(Some(summary))
}

/// SplitMix64 of the seed, step and rank: the backend seed of one step.
fn mix(seed: u64, step: u64, rank: u64) -> u64 {
    mics_datasets::rng::mix64(
        seed ^ mics_datasets::rng::mix64(step ^ mics_datasets::rng::mix64(rank)),
    )
}

/// Mean validation loss over `eval_batches` fixed global batches, on every rank.
fn evaluate<M>(
    ctx: &RunContext,
    comm: &Arc<dyn Communicator>,
    runtime: &Arc<MicsRuntime>,
    model: &M,
    data: &RankData,
) -> Result<f64, TrainError>
where
    M: AutodiffModule<Train>,
    M::InnerModule: TaskModel<Mics<Inner>>,
{
    let c = &ctx.config;
    let (rank, n, s) = (comm.rank(), comm.size(), c.train.grad_accum);
    let device = Default::default();
    let model = model.valid();
    let mut sum = 0.0f32;
    for batch_index in 0..c.train.eval_batches {
        runtime.begin_step();
        let scale = mlm_scale(ctx, &data.val, || {
            data.val_sampler.global_batch(batch_index)
        })?;
        for micro in 0..s {
            let windows = data
                .val_sampler
                .micro_batch(batch_index, rank, n, s, micro)?;
            let batch = make_batch(ctx, &data.val, &windows, scale)?;
            sum += model.loss(&batch, &device).into_scalar();
        }
    }
    let total = comm.all_reduce(vec![sum], ReduceOp::Sum).wait()?;
    Ok(f64::from(total[0]) / (n * s) as f64 / c.train.eval_batches.max(1) as f64)
}

/// Every rank writes its shard file, all agree, rank 0 commits.
fn save_checkpoint<M: AutodiffModule<Train>>(
    ctx: &RunContext,
    comm: &Arc<dyn Communicator>,
    optim: &ShardedOptimizer<Inner, AdamW>,
    model: &M,
    ckpt: &CheckpointDir,
    step: u64,
    tokens_seen: u64,
) -> Result<PathBuf, TrainError> {
    let rank = comm.rank();
    let begun = if rank == 0 { ckpt.begin(step) } else { Ok(()) };
    agree(comm, begun)?;
    let states = optim
        .export_state(model)
        .map_err(|e| TrainError::checkpoint(ckpt.partial(step), e.to_string()));
    let written = states.and_then(|states| {
        checkpoint::write_rank_file(&ckpt.partial(step), rank, &states)?;
        Ok(states
            .into_iter()
            .map(|s| ParamInfo {
                path: s.path,
                shape: s.shape,
            })
            .collect::<Vec<_>>())
    });
    let params = agree(comm, written)?;
    let committed = if rank == 0 {
        let c = &ctx.config;
        let index = CheckpointIndex {
            format_version: checkpoint::CHECKPOINT_FORMAT,
            step,
            world: comm.size(),
            partition_size: c.parallel.partition_size,
            ranks_per_node: c.ranks_per_node(),
            global_batch: c.global_batch(),
            seed: c.train.seed,
            tokens_seen,
            model: ctx.spec.clone(),
            dataset: std::path::absolute(&ctx.dataset).unwrap_or_else(|_| ctx.dataset.clone()),
            params,
            files: (0..comm.size()).map(checkpoint::rank_file_name).collect(),
            config: c.clone(),
        };
        ckpt.commit(
            &index,
            checkpoint::dataset_tokenizer(&ctx.dataset).as_deref(),
        )
    } else {
        Ok(ckpt.complete(step))
    };
    agree(comm, committed)
}

/// Cross-entropy (nats per token) of `val` under the unigram distribution
/// of `train` with add-one smoothing.
fn unigram_cross_entropy(train: &TokenFile, val: &TokenFile, vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab];
    let chunk = 1 << 20;
    let mut at = 0;
    while at < train.len() {
        let end = (at + chunk).min(train.len());
        for id in train.get(at..end) {
            counts[id as usize] += 1;
        }
        at = end;
    }
    let total = (train.len() + vocab) as f64;
    let ids = val.get(0..val.len());
    let nll: f64 = ids
        .iter()
        .map(|&id| -(((counts[id as usize] + 1) as f64) / total).ln())
        .sum();
    nll / ids.len().max(1) as f64
}
