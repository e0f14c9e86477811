//! One rank's training: set-up, the training step, checkpoints, and the
//! loop that strings them together.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use mics_backend::{Mics, MicsRuntime, PrefetchConfig, ShardInit, shard_module};
use mics_comm::{Collectives, Communicator, MicsGroups, ReduceOp, Topology};
use mics_datasets::{GlobalBatchSampler, Split, TokenFile};
use mics_fused::CrossEntropyOptions;

use crate::checkpoint::{
    self, CheckpointDir, CheckpointIndex, ParamInfo, RankMeta, SavedLossScale,
};
use crate::family::ModelFamily;
use crate::integrity::FileChecksums;
use crate::launch::{RunContext, agree};
use crate::optim::Optim;
use crate::summary::Report;
use crate::task::Task;
use crate::watchdog::Beat;
use crate::{
    Device, Precision, StepMetrics, TrainBackend, TrainError, TrainSummary, learning_rate,
};

/// What a model trains on: autodiff over the MiCS decorator over `B`.
pub(crate) type Train<B> = Autodiff<Mics<B>>;

/// The sampler seed of the validation batches (fixed per run seed, so
/// every evaluation scores the same samples).
const VAL_SEED_SALT: u64 = 0x7661_6c69_6461_7465;

/// The data one rank reads.
pub(crate) struct RankData {
    pub train: TokenFile,
    pub val: TokenFile,
    pub sampler: GlobalBatchSampler,
    pub val_sampler: GlobalBatchSampler,
}

impl RankData {
    fn open(ctx: &RunContext, window: usize) -> Result<RankData, TrainError> {
        let c = &ctx.config;
        let train = TokenFile::open(&ctx.dataset, Split::Train)?;
        let val = TokenFile::open(&ctx.dataset, Split::Val)?;
        let g = c.global_batch();
        let sampler = GlobalBatchSampler::new(train.len(), window, g, c.train.seed)?;
        let val_sampler =
            GlobalBatchSampler::new(val.len(), window, g, c.train.seed ^ VAL_SEED_SALT)?;
        Ok(RankData {
            train,
            val,
            sampler,
            val_sampler,
        })
    }
}

/// One rank's trainer of a model of family `F` on backend `B`: its share of
/// the sharded model and optimizer, its data and its groups.
pub struct Trainer<'a, B: TrainBackend, F: ModelFamily> {
    pub(crate) ctx: &'a RunContext,
    pub(crate) comm: Arc<dyn Communicator>,
    pub(crate) runtime: Arc<MicsRuntime>,
    pub(crate) device: B::Device,
    /// Taken out for the optimizer step, which returns the updated module.
    model: Option<F::Model<Train<B>>>,
    optim: Optim<B>,
    pub(crate) data: RankData,
    pub(crate) task: Task,
    pub(crate) head: CrossEntropyOptions,
    tokens_seen: u64,
    /// This rank's progress, for the in-process failure detection.
    pub(crate) beat: Beat,
    /// The stop signal every rank agreed on at the last step, if any.
    pub(crate) stop: Option<i32>,
}

impl<'a, B, F> Trainer<'a, B, F>
where
    B: TrainBackend,
    F: ModelFamily,
    F::Model<Train<B>>: AutodiffModule<Train<B>, InnerModule = F::Model<Mics<B>>>,
{
    /// Sets up this rank: groups and runtime, the model from the run's
    /// initial values, sharded, the optimizer, the data, and the resume
    /// point. Every rank agrees on the set-up before any training
    /// collective. Returns the trainer and the step it starts at.
    pub(crate) fn new(
        comm: Arc<dyn Communicator>,
        ctx: &'a RunContext,
        device: B::Device,
        beat: Beat,
    ) -> Result<(Self, u64), TrainError> {
        let c = &ctx.config;
        let p = &c.parallel;
        let rank = comm.rank();
        let topology =
            Topology::new(comm.size(), c.ranks_per_node(), p.partition_size).map_err(|e| {
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
        let wire = match c.train.precision {
            Precision::Fp32 => mics_backend::Precision::FP32,
            Precision::Bf16 => mics_backend::Precision::BF16,
            Precision::Fp16 => mics_backend::Precision::FP16,
        };
        let runtime = MicsRuntime::with_precision(groups, prefetch, wire);
        runtime.set_reduce_in_backward(p.reduce_in_backward);
        if rank == 0 && c.train.device == Device::Cpu && c.train.precision != Precision::Fp32 {
            eprintln!(
                "precision {}: NdArray has no half-precision tensors, so the CPU computes in f32; \
                 parameter gathers and gradient reductions travel in {}",
                c.train.precision, c.train.precision
            );
        }
        let task = Task::new(
            F::TASK,
            c.data.seq_len,
            ctx.meta.special,
            ctx.meta.vocab_size,
            c.train.seed,
            comm.size(),
            c.train.grad_accum,
        );

        // Set-up that can fail on one rank: agreed before any training collective.
        let setup = (|| {
            let config = ctx
                .spec
                .config::<F>()
                .map_err(|problem| TrainError::Invalid {
                    key: "model".into(),
                    problem,
                })?;
            let fresh = F::init::<Train<B>>(&config, &device);
            let model = crate::device::load_record::<Train<B>, _>(fresh, &ctx.record, &device)?;
            let data = RankData::open(ctx, task.window())?;
            let states = match &ctx.resume {
                Some((dir, index)) => Some(checkpoint::resume_states(
                    dir,
                    index,
                    rank,
                    comm.size(),
                    p.partition_size,
                )?),
                None => None,
            };
            Ok((model, data, states))
        })();
        let (model, data, states) = agree(&comm, setup)?;
        let mut model = shard_module(model, &runtime, ShardInit::Identical);
        let bucket_bytes = p.bucket_mb << 20;
        let mut optim = Optim::<B>::new(&c.train, c.train.precision, bucket_bytes, &runtime);
        let (start, tokens_seen) = match (&ctx.resume, states) {
            (Some((dir, index)), Some(states)) => {
                let imported = optim.import_state(model, states).map_err(|e| {
                    let file =
                        if index.world == comm.size() && index.partition_size == p.partition_size {
                            dir.join(checkpoint::rank_file_name(rank))
                        } else {
                            dir.to_path_buf()
                        };
                    TrainError::checkpoint(file, e.to_string())
                });
                // On failure the module is gone: every rank stops here.
                model = agree(&comm, imported)?;
                if let Some(saved) = index.loss_scale {
                    optim.restore_loss_scale(saved.into());
                }
                (index.step, index.tokens_seen)
            }
            _ => (0, 0),
        };
        let trainer = Trainer {
            ctx,
            comm,
            runtime,
            device,
            model: Some(model),
            optim,
            data,
            task,
            head: CrossEntropyOptions::default()
                .with_chunk_tokens(crate::memory::head_chunk_tokens(ctx.config.train.device)),
            tokens_seen,
            beat,
            stop: None,
        };
        Ok((trainer, start))
    }

    /// The model (between steps).
    pub(crate) fn model(&self) -> &F::Model<Train<B>> {
        self.model
            .as_ref()
            .expect("the model is back after every step")
    }

    /// One optimizer step (0-based `step`): every micro-step's forward,
    /// backward and gradient reduce-scatter, then the replication all-reduce
    /// and the update. Returns the step's metrics, the same on every rank.
    pub(crate) fn train_step(&mut self, step: u64) -> Result<StepMetrics, TrainError> {
        let started = Instant::now();
        let c = &self.ctx.config;
        let (rank, n, s) = (self.comm.rank(), self.comm.size(), c.train.grad_accum);
        crate::fault::step_start(rank, step + 1);
        self.beat.advance();
        self.runtime.begin_step();
        // Dropout masks: a function of (seed, step, rank), see the crate docs.
        Train::<B>::seed(&self.device, mix(c.train.seed, step, rank as u64));
        let sampler = &self.data.sampler;
        let scale = self
            .task
            .global_scale(&self.data.train, || sampler.global_batch(step))?;
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        let mut loss_sum = 0.0f32;
        for micro in 0..s {
            let windows = sampler.micro_batch(step, rank, n, s, micro)?;
            let batch = self.task.batch(&self.data.train, &windows, scale)?;
            let head = F::head(&model, batch.inputs(&self.device));
            let loss = batch.loss(head, &self.head, &self.device);
            // The fused loss is f32 whatever the compute dtype: read it whole.
            loss_sum += loss.clone().into_data().iter::<f32>().sum::<f32>();
            let scaled = loss * self.optim.loss_scale();
            self.optim.accumulate(&model, scaled.backward());
            self.beat.advance();
        }
        let lr = learning_rate(&c.train, step);
        self.model = Some(self.optim.step(lr, model));
        self.beat.advance();
        // The loss, and whether any rank was asked to stop (SIGINT, SIGTERM):
        // every rank learns both from the same all-reduce, so all stop after
        // the same step.
        let signal = crate::signals::stop_requested();
        let flags = [crate::signals::SIGINT, crate::signals::SIGTERM]
            .map(|s| f32::from(u8::from(signal == Some(s))));
        let total = self
            .comm
            .all_reduce(vec![loss_sum, flags[0], flags[1]], ReduceOp::Sum)
            .wait()?;
        self.beat.advance();
        self.stop = if total[2] > 0.0 {
            Some(crate::signals::SIGTERM)
        } else if total[1] > 0.0 {
            Some(crate::signals::SIGINT)
        } else {
            None
        };
        let loss = f64::from(total[0]) / (n * s) as f64;
        let done = step + 1;
        if !loss.is_finite() && !self.optim.last_step_skipped() {
            return Err(TrainError::Diverged { step: done, loss });
        }
        let tokens = (c.global_batch() * c.data.seq_len) as u64;
        self.tokens_seen += tokens;
        Ok(StepMetrics {
            step: done,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: self.optim.last_grad_norm().map(f64::from),
            tokens: Some(self.tokens_seen),
            tokens_per_s: Some(tokens as f64 / started.elapsed().as_secs_f64()),
            val_loss: None,
        })
    }

    /// Every rank writes its shard file, all agree and share their files'
    /// checksums, rank 0 commits. On any failure the partial checkpoint is
    /// removed.
    pub(crate) fn save_checkpoint(&self, step: u64) -> Result<PathBuf, TrainError> {
        let ckpt = CheckpointDir {
            root: self.ctx.config.output.dir.join("checkpoints"),
            keep: self.ctx.config.train.checkpoint_keep,
        };
        let saved = self.write_checkpoint(&ckpt, step);
        if saved.is_err() && self.comm.rank() == 0 {
            ckpt.abandon(step);
        }
        saved
    }

    fn write_checkpoint(&self, ckpt: &CheckpointDir, step: u64) -> Result<PathBuf, TrainError> {
        let ctx = self.ctx;
        let c = &ctx.config;
        let comm = &self.comm;
        let rank = comm.rank();
        self.beat.advance();
        let begun = if rank == 0 { ckpt.begin(step) } else { Ok(()) };
        agree(comm, begun)?;
        let meta = RankMeta {
            step,
            world: comm.size(),
            partition_size: c.parallel.partition_size,
            ranks_per_node: c.ranks_per_node(),
            global_batch: c.global_batch(),
            seed: c.train.seed,
            tokens_seen: self.tokens_seen,
        };
        let states = self
            .optim
            .export_state(self.model())
            .map_err(|e| TrainError::checkpoint(ckpt.partial(step), e.to_string()));
        let written = states.and_then(|states| {
            let sums = checkpoint::write_rank_file(&ckpt.partial(step), rank, &states, &meta)?;
            let params = states
                .into_iter()
                .map(|s| ParamInfo {
                    path: s.path,
                    shape: s.shape,
                })
                .collect::<Vec<_>>();
            Ok((params, sums))
        });
        let (params, sums) = agree(comm, written)?;
        self.beat.advance();
        // Every rank's checksums, for rank 0's index.
        let names: Vec<String> = params
            .iter()
            .flat_map(|p| [format!("param.{}", p.path), format!("optim.{}", p.path)])
            .collect();
        let gathered = comm.all_gather(sums.pack(&names)).wait()?;
        let per_rank = gathered.len() / comm.size();
        let committed = if rank == 0 {
            let files: Vec<String> = (0..comm.size()).map(checkpoint::rank_file_name).collect();
            let checksums = files
                .iter()
                .zip(gathered.chunks(per_rank))
                .map(|(file, packed)| (file.clone(), FileChecksums::unpack(packed, &names)))
                .collect();
            let mut index = CheckpointIndex {
                format_version: checkpoint::CHECKPOINT_FORMAT,
                step,
                world: comm.size(),
                partition_size: c.parallel.partition_size,
                ranks_per_node: c.ranks_per_node(),
                global_batch: c.global_batch(),
                seed: c.train.seed,
                tokens_seen: self.tokens_seen,
                model: ctx.spec.clone(),
                dataset: std::path::absolute(&ctx.dataset).unwrap_or_else(|_| ctx.dataset.clone()),
                params,
                files,
                loss_scale: (c.train.precision == Precision::Fp16)
                    .then(|| SavedLossScale::from(self.optim.loss_scale_state())),
                config: c.clone(),
                checksums,
            };
            ckpt.commit(
                &mut index,
                checkpoint::dataset_tokenizer(&ctx.dataset).as_deref(),
            )
        } else {
            Ok(ckpt.complete(step))
        };
        let done = agree(comm, committed);
        self.beat.advance();
        done
    }
}

/// SplitMix64 of the seed, step and rank: the backend seed of one step.
fn mix(seed: u64, step: u64, rank: u64) -> u64 {
    mics_datasets::rng::mix64(
        seed ^ mics_datasets::rng::mix64(step ^ mics_datasets::rng::mix64(rank)),
    )
}

/// The one line a stopped run prints (rank 0).
fn stop_line(ctx: &RunContext, signal: i32, step: u64, checkpoint: Option<&Path>) -> String {
    let name = crate::signals::signal_name(signal);
    match checkpoint {
        Some(dir) => format!(
            "stopped by {name} after step {step}: checkpoint {} (continue with --resume {})",
            dir.display(),
            ctx.config.output.dir.display()
        ),
        None => format!(
            "stopped by {name} after step {step} without a checkpoint (--no-checkpoint-on-signal)"
        ),
    }
}

/// How one rank's run ended.
pub(crate) enum RankEnd {
    /// It trained to `train.steps`; rank 0 has the summary.
    Finished(Option<TrainSummary>),
    /// Every rank agreed to stop on `signal` after `step`.
    Stopped {
        signal: i32,
        step: u64,
        checkpoint: Option<PathBuf>,
    },
}

/// One rank's run: set up, train to `train.steps`, evaluating and
/// checkpointing on schedule, or until a stop signal. Rank 0 returns the
/// summary.
pub(crate) fn run_rank<B, F>(
    comm: Arc<dyn Communicator>,
    ctx: &RunContext,
    device: B::Device,
    beat: Beat,
) -> Result<RankEnd, TrainError>
where
    B: TrainBackend,
    F: ModelFamily,
    F::Model<Train<B>>: AutodiffModule<Train<B>, InnerModule = F::Model<Mics<B>>>,
{
    let t = &ctx.config.train;
    let (mut trainer, start) = Trainer::<B, F>::new(comm, ctx, device, beat)?;
    let mut report = Report::open(ctx, trainer.comm.rank(), start)?;
    for step in start..t.steps {
        let metrics = trainer.train_step(step)?;
        report.step(&metrics)?;
        let done = step + 1;
        if let Some(signal) = trainer.stop {
            let checkpoint = if t.checkpoint_on_signal {
                Some(trainer.save_checkpoint(done)?)
            } else {
                None
            };
            // Rank 0 reports before any rank leaves: under mpirun the first
            // rank to exit ends the job, which could cut rank 0 off.
            if trainer.comm.rank() == 0 {
                eprintln!("{}", stop_line(ctx, signal, done, checkpoint.as_deref()));
            }
            trainer.comm.barrier().wait()?;
            return Ok(RankEnd::Stopped {
                signal,
                step: done,
                checkpoint,
            });
        }
        let last = done == t.steps;
        if (t.eval_every > 0 && done.is_multiple_of(t.eval_every)) || last {
            report.evaluation(done, trainer.evaluate()?)?;
            trainer.beat.advance();
        }
        if (t.checkpoint_every > 0 && done.is_multiple_of(t.checkpoint_every)) || last {
            report.checkpoint(trainer.save_checkpoint(done)?);
        }
    }
    report
        .finish(&trainer.data, trainer.runtime.counters())
        .map(RankEnd::Finished)
}
