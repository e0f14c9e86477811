//! What a run reports: rank 0's metrics file, progress display, loss plot
//! and summary, and the unigram baseline the validation loss is read
//! against.

use std::path::PathBuf;
use std::time::Instant;

use mics_backend::Counters;
use mics_datasets::TokenFile;
use serde::{Deserialize, Serialize};

use crate::launch::RunContext;
use crate::metrics::{MetricsWriter, Progress, plot_loss, read_metrics};
use crate::task::TaskKind;
use crate::trainer::RankData;
use crate::{StepMetrics, TrainError};

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
    /// The device and precision trained on (`cpu`, `wgpu`, `cuda:0`; `fp32`, ...).
    #[serde(default)]
    pub device: String,
    /// The precision trained in.
    #[serde(default)]
    pub precision: String,
    /// Rank 0's most full (unsharded) gradient bytes held at once: the whole
    /// model's when gradients are reduced after backward, a few buckets'
    /// when during it.
    #[serde(default)]
    pub peak_grad_bytes: u64,
    /// Rank 0's most gathered parameter bytes alive at once.
    #[serde(default)]
    pub peak_gathered_bytes: u64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The metrics file.
    pub metrics: PathBuf,
    /// The loss-curve PNG, if drawn.
    pub loss_plot: Option<PathBuf>,
}

/// Rank 0's reporting through a run (the other ranks report nothing).
pub(crate) struct Report<'a> {
    ctx: &'a RunContext,
    leader: bool,
    start: u64,
    metrics: Option<MetricsWriter>,
    progress: Option<Progress>,
    losses: Vec<f64>,
    val_loss: Option<f64>,
    checkpoint: Option<PathBuf>,
    started: Instant,
}

impl<'a> Report<'a> {
    pub(crate) fn open(
        ctx: &'a RunContext,
        rank: usize,
        start: u64,
    ) -> Result<Report<'a>, TrainError> {
        let leader = rank == 0;
        let t = &ctx.config.train;
        let metrics = if leader {
            Some(MetricsWriter::open(&ctx.config.metrics_path(), start)?)
        } else {
            None
        };
        Ok(Report {
            ctx,
            leader,
            start,
            metrics,
            progress: leader.then(|| Progress::new(start, t.steps, t.log_every)),
            losses: Vec::new(),
            val_loss: None,
            checkpoint: None,
            started: Instant::now(),
        })
    }

    /// A training step's metrics.
    pub(crate) fn step(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        self.losses.push(m.loss.unwrap_or(f64::NAN));
        if let (Some(writer), Some(progress)) = (self.metrics.as_mut(), &self.progress) {
            writer.write(m)?;
            let done = m.step - self.start;
            let per_step = self.started.elapsed().as_secs_f64() / done.max(1) as f64;
            let total = self.ctx.config.train.steps;
            progress.step(m, per_step * total.saturating_sub(m.step) as f64);
        }
        Ok(())
    }

    /// An evaluation after `step` steps.
    pub(crate) fn evaluation(&mut self, step: u64, val_loss: f64) -> Result<(), TrainError> {
        self.val_loss = Some(val_loss);
        if let (Some(writer), Some(progress)) = (self.metrics.as_mut(), &self.progress) {
            writer.write(&StepMetrics {
                step,
                val_loss: Some(val_loss),
                ..Default::default()
            })?;
            progress.note(&format!("step {step}: validation loss {val_loss:.4}"));
        }
        Ok(())
    }

    /// A checkpoint written.
    pub(crate) fn checkpoint(&mut self, dir: PathBuf) {
        self.checkpoint = Some(dir);
    }

    /// The end of the run: rank 0 draws the loss curve and writes
    /// `summary.json`, and returns the summary.
    pub(crate) fn finish(
        self,
        data: &RankData,
        counters: Counters,
    ) -> Result<Option<TrainSummary>, TrainError> {
        let train_seconds = self.started.elapsed().as_secs_f64();
        if !self.leader {
            return Ok(None);
        }
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        let ctx = self.ctx;
        let c = &ctx.config;
        let metrics_path = c.metrics_path();
        let history = read_metrics(&metrics_path)?;
        let plot = c.output.dir.join("loss.png");
        let title = format!(
            "{} on {} (N = {}, p = {})",
            ctx.spec.kind, c.data.corpus, c.parallel.world, c.parallel.partition_size
        );
        let loss_plot = match plot_loss(&history, &title, &plot) {
            Ok(()) => Some(plot),
            Err(err) => {
                eprintln!("warning: {err}");
                None
            }
        };
        let unigram_val_loss = (ctx.spec.kind.task() == TaskKind::CausalLm)
            .then(|| unigram_cross_entropy(&data.train, &data.val, ctx.meta.vocab_size));
        let done_steps = c.train.steps - self.start;
        let tokens_per_step = (c.global_batch() * c.data.seq_len) as u64;
        let summary = TrainSummary {
            steps: c.train.steps,
            start_step: self.start,
            losses: self.losses,
            val_loss: self.val_loss,
            unigram_val_loss,
            tokens_per_s: (done_steps * tokens_per_step) as f64 / train_seconds.max(1e-9),
            train_seconds,
            device: c.train.device.to_string(),
            precision: c.train.precision.to_string(),
            peak_grad_bytes: counters.peak_live_grad_bytes,
            peak_gathered_bytes: counters.peak_live_gathered_bytes,
            checkpoint: self.checkpoint,
            metrics: metrics_path,
            loss_plot,
        };
        let path = c.output.dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).expect("plain struct");
        mics_hub::checkpoint::write_atomic(&path, text.as_bytes())
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Some(summary))
    }
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
