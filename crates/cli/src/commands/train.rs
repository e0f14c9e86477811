//! `mics train`: train GPT-2 or BERT sharded with MiCS, from a TOML config.

use std::path::PathBuf;

use anyhow::Context;
use mics_train::{EngineKind, NOT_RANK_ZERO, Overrides, TrainConfig, TrainError, train};

/// Arguments of `mics train`; every flag overrides the config file's value.
#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML config (see `configs/`).
    #[arg(long)]
    pub config: PathBuf,
    /// Ranks N.
    #[arg(long)]
    pub world: Option<usize>,
    /// Partition size p (divides N).
    #[arg(long)]
    pub partition_size: Option<usize>,
    /// Ranks per node k (divides N).
    #[arg(long)]
    pub ranks_per_node: Option<usize>,
    /// Micro-steps accumulated per optimizer step s.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Sequences per rank per micro-step b.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Total optimizer steps (a resumed run continues up to this).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed of initialisation, sampling, masking and dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dropout probability (0 disables).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Evaluate every this many steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Write a sharded checkpoint every this many steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// The run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The metrics file (JSON lines; default `<out>/metrics.jsonl`).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// The token-shard directory (prepared there when missing).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Start from this Hugging Face-layout checkpoint directory.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Continue from a checkpoint (a `step-N` directory or a run directory).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// `threads` (in-process, default), `mpi` (under mpirun, built with
    /// `--features mpi`) or `nccl` (built with `--features cuda`).
    #[arg(long)]
    pub engine: Option<EngineKind>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `mics train`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = TrainConfig::load(&args.config)?;
    config.apply(&Overrides {
        world: args.world,
        partition_size: args.partition_size,
        ranks_per_node: args.ranks_per_node,
        grad_accum: args.grad_accum,
        micro_batch: args.micro_batch,
        steps: args.steps,
        seed: args.seed,
        dropout: args.dropout,
        out: args.out,
        metrics: args.metrics,
        engine: args.engine,
        init_from: args.init_from,
        lr: args.lr,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        dataset: args.dataset,
    });
    let summary = match train(&config, args.resume.as_deref()) {
        Ok(summary) => summary,
        // An MPI rank other than 0: it trained; rank 0 reports.
        Err(TrainError::Engine(message)) if message == NOT_RANK_ZERO => return Ok(()),
        Err(err) => return Err(err).context("training failed"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    println!(
        "trained steps {}..{} in {:.1} s ({:.0} tokens/s): loss {:.4}",
        summary.start_step, summary.steps, summary.train_seconds, summary.tokens_per_s, last
    );
    if let Some(val) = summary.val_loss {
        match summary.unigram_val_loss {
            Some(unigram) => println!(
                "validation loss {val:.4} (unigram baseline {unigram:.4}: {:.1}% below)",
                100.0 * (1.0 - val / unigram)
            ),
            None => println!("validation loss {val:.4}"),
        }
    }
    println!("metrics    {}", summary.metrics.display());
    if let Some(plot) = &summary.loss_plot {
        println!("loss curve {}", plot.display());
    }
    if let Some(checkpoint) = &summary.checkpoint {
        println!("checkpoint {}", checkpoint.display());
    }
    Ok(())
}
