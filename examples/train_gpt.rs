//! Train a small GPT-2 on Shakespeare's plays with MiCS, through the
//! `mics_train` library (what `mics train` runs).
//!
//! The run configuration is the shipped config: a GPT-2 with the GPT-2 BPE
//! vocabulary, trained on N in-process ranks (one thread each) whose model
//! states are sharded over partition groups of p ranks. The trainer prepares
//! the token shards on first use, trains with AdamW (warm-up + cosine decay),
//! evaluates on the validation split and writes a sharded checkpoint, the
//! metrics (JSON lines), a loss plot and a summary.
//!
//! ```sh
//! scripts/fetch-assets                                 # once: the plays and the GPT-2 tokenizer
//! cargo run --example train_gpt -- --tiny              # 1 layer, hidden 32, 5 steps, N = 2, p = 2 (seconds)
//! cargo run --release --example train_gpt              # 4 layers, hidden 128, 300 steps, N = 2, p = 2
//! cargo run --example train_gpt -- --tiny --out runs/gpt   # write the run there
//! cargo run --features wgpu --example train_gpt -- --tiny --device wgpu
//! ```
//!
//! The run is `configs/gpt2-shakespeare.toml`; every `mics train` flag
//! overrides it. `MICS_EXAMPLE_TINY=1` selects the tiny settings like
//! `--tiny`. Without `--out` the run goes to
//! `$TMPDIR/mics-examples/train_gpt`; its checkpoint can be exported and
//! sampled with the `load_checkpoint` example.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mics::train::{Overrides, RunOutcome, TrainConfig};

/// Train a small GPT-2 on Shakespeare with MiCS (`configs/gpt2-shakespeare.toml`).
#[derive(Parser)]
struct Args {
    /// Tiny settings (1 layer, hidden 32, 5 steps): seconds, for CI.
    #[arg(long, env = "MICS_EXAMPLE_TINY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    tiny: bool,
    /// Every `mics train` flag (`--device wgpu`, `--world 4`, `--out DIR`, ...).
    #[command(flatten)]
    overrides: Overrides,
}

/// The shipped config, made tiny for `--tiny`, with the command line's
/// overrides on top.
fn config(args: &Args) -> Result<TrainConfig> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/gpt2-shakespeare.toml");
    let mut config = TrainConfig::load(&path)?;
    config.output.dir = std::env::temp_dir().join("mics-examples/train_gpt");
    if args.tiny {
        let (m, d, t) = (&mut config.model, &mut config.data, &mut config.train);
        (m.layers, m.hidden, m.heads) = (1, 32, 2);
        d.seq_len = 16;
        (t.steps, t.micro_batch, t.grad_accum) = (5, 2, 1);
        (t.lr, t.min_lr, t.warmup_steps) = (1e-2, 1e-3, 0);
        (
            t.eval_every,
            t.eval_batches,
            t.checkpoint_every,
            t.log_every,
        ) = (0, 1, 0, 1);
    }
    config.apply(&args.overrides);
    Ok(config)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = config(&args)?;
    let (m, p) = (&config.model, &config.parallel);
    println!(
        "GPT-2 (layers {}, hidden {}, heads {}) on Shakespeare: seq_len {}, {} steps, \
         world N = {}, partition size p = {}, global batch {} sequences{}",
        m.layers,
        m.hidden,
        m.heads,
        config.data.seq_len,
        config.train.steps,
        p.world,
        p.partition_size,
        config.global_batch(),
        if args.tiny { " (tiny)" } else { "" }
    );
    println!(
        "run directory: {} (device {}, precision {})",
        config.output.dir.display(),
        config.train.device,
        config.train.precision
    );

    let RunOutcome::Leader(summary) =
        mics::train::train(&config, None).context("training failed")?
    else {
        return Ok(()); // an MPI rank other than 0
    };

    for (step, loss) in summary.losses.iter().enumerate() {
        println!(
            "step {:>4}  loss {loss:.4}",
            summary.start_step + step as u64 + 1
        );
    }
    if let Some(val) = summary.val_loss {
        print!("validation loss {val:.4}");
        if let Some(unigram) = summary.unigram_val_loss {
            print!(" (a unigram model scores {unigram:.4})");
        }
        println!();
    }
    println!(
        "{:.0} tokens/s over {:.1} s",
        summary.tokens_per_s, summary.train_seconds
    );
    let (first, last) = (summary.losses.first(), summary.losses.last());
    if let (Some(first), Some(last)) = (first, last)
        && (last >= first || last.is_nan())
    {
        bail!("the training loss did not go down: {first:.4} -> {last:.4}");
    }
    let checkpoint = summary.checkpoint.context("the run wrote no checkpoint")?;
    println!("sharded checkpoint: {}", checkpoint.display());
    println!("metrics: {}", summary.metrics.display());
    if let Some(plot) = summary.loss_plot {
        println!("loss plot: {}", plot.display());
    }
    println!(
        "next: cargo run --example load_checkpoint -- {}",
        checkpoint.display()
    );
    Ok(())
}
