//! `mics train`: train GPT-2, BERT or Llama sharded with MiCS, from a TOML
//! config, on the CPU, wgpu or CUDA.

use std::path::PathBuf;

use anyhow::Context;
use mics_train::{Overrides, RunOutcome, TrainConfig, train};

/// Arguments of `mics train`; every flag overrides the config file's value.
#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML config (see `configs/`).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from a checkpoint (a `step-N` directory or a run directory).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Runs `mics train`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = TrainConfig::load(&args.config)?;
    config.apply(&args.overrides);
    let summary = match train(&config, args.resume.as_deref()).context("training failed")? {
        RunOutcome::Leader(summary) => summary,
        // An MPI rank other than 0: it trained; rank 0 reports.
        RunOutcome::Follower { .. } => return Ok(()),
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
