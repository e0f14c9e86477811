//! `mics train`: train GPT-2, BERT or Llama sharded with MiCS, from a TOML
//! config, on the CPU, wgpu or CUDA.

use std::path::PathBuf;

use std::io::Write;

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

/// Runs `mics train`. SIGINT or SIGTERM stops it cleanly after the
/// current step (a checkpoint, one line, exit status 130 or 143); a second
/// signal exits at once.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = TrainConfig::load(&args.config)?;
    config.apply(&args.overrides);
    // SAFETY: `mics` has started no thread yet (`main` parsed the flags, this
    // read the config).
    unsafe { mics_train::cores::share_cores(&config) };
    mics_train::install_stop_handlers()?;
    let summary = match train(&config, args.resume.as_deref()).context("training failed")? {
        RunOutcome::Leader(summary) => summary,
        // An MPI rank other than 0: it trained; rank 0 reports.
        RunOutcome::Follower { .. } => return Ok(()),
        // Rank 0 printed the line before the ranks left (mics-train's
        // `stop_line`), so a launcher that ends the job at a rank's exit
        // cannot cut it off.
        RunOutcome::Stopped { signal, .. } => {
            std::process::exit(128 + signal);
        }
    };
    // A closed stdout (`| head`) ends the output quietly.
    match report(&args, &summary) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Prints the summary.
fn report(args: &Args, summary: &mics_train::TrainSummary) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(summary)?)?;
        return Ok(());
    }
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    writeln!(
        out,
        "trained steps {}..{} in {:.1} s ({:.0} tokens/s): loss {:.4}",
        summary.start_step, summary.steps, summary.train_seconds, summary.tokens_per_s, last
    )?;
    if let Some(val) = summary.val_loss {
        match summary.unigram_val_loss {
            Some(unigram) => writeln!(
                out,
                "validation loss {val:.4} (unigram baseline {unigram:.4}: {:.1}% below)",
                100.0 * (1.0 - val / unigram)
            )?,
            None => writeln!(out, "validation loss {val:.4}")?,
        }
    }
    writeln!(out, "metrics    {}", summary.metrics.display())?;
    if let Some(plot) = &summary.loss_plot {
        writeln!(out, "loss curve {}", plot.display())?;
    }
    if let Some(checkpoint) = &summary.checkpoint {
        writeln!(out, "checkpoint {}", checkpoint.display())?;
    }
    Ok(())
}
