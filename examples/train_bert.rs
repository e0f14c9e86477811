//! Fine-tune a pre-trained BERT (all-MiniLM-L6-v2) with masked language
//! modelling on Moby-Dick, sharded with MiCS, through the `mics_train`
//! library (what `mics train` runs).
//!
//! The run starts from the Hugging Face checkpoint in the asset cache
//! (`model.init_from`): its `config.json` sets the architecture, its weights
//! the initial parameters; the MLM head, which a sentence-transformers file
//! does not carry, is initialised as Hugging Face would. The text is
//! tokenized with MiniLM's own WordPiece vocabulary and masked as in BERT
//! (15% of the tokens, 80/10/10).
//!
//! ```sh
//! scripts/fetch-assets                                  # once: MiniLM and Moby-Dick
//! cargo run --example train_bert -- --tiny              # 3 steps, seq_len 32, N = 2, p = 2
//! cargo run --release --example train_bert              # 100 steps, seq_len 128, N = 2, p = 2
//! cargo run --example train_bert -- --tiny --out runs/bert
//! ```
//!
//! The run is `configs/bert-mlm.toml`; every `mics train` flag overrides it
//! (`--device wgpu` with `--features wgpu`). `MICS_EXAMPLE_TINY=1` selects
//! the tiny settings like `--tiny`. Without `--out` the run goes to
//! `$TMPDIR/mics-examples/train_bert`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mics::train::{Overrides, RunOutcome, TrainConfig};

/// Fine-tune MiniLM with masked LM on Moby-Dick with MiCS (`configs/bert-mlm.toml`).
#[derive(Parser)]
struct Args {
    /// Tiny settings (3 steps, seq_len 32): seconds, for CI.
    #[arg(long, env = "MICS_EXAMPLE_TINY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    tiny: bool,
    /// Every `mics train` flag (`--device wgpu`, `--world 4`, `--out DIR`, ...).
    #[command(flatten)]
    overrides: Overrides,
}

/// The shipped config (MiniLM from the asset cache, `init_from = "asset:minilm"`),
/// made tiny for `--tiny`, with the command line's overrides on top.
fn config(args: &Args) -> Result<TrainConfig> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/bert-mlm.toml");
    let mut config = TrainConfig::load(&path)?;
    config.output.dir = std::env::temp_dir().join("mics-examples/train_bert");
    if args.tiny {
        let (d, t) = (&mut config.data, &mut config.train);
        d.seq_len = 32;
        (t.steps, t.micro_batch, t.grad_accum, t.warmup_steps) = (3, 2, 1, 0);
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
    let minilm = config
        .init_dir()?
        .context("the config starts from no checkpoint")?;
    let p = &config.parallel;
    println!(
        "BERT MLM fine-tuning from {} on Moby-Dick: seq_len {}, {} steps, world N = {}, \
         partition size p = {}, global batch {} sequences{}",
        minilm.display(),
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
            "step {:>4}  MLM loss {loss:.4}",
            summary.start_step + step as u64 + 1
        );
    }
    if let Some(val) = summary.val_loss {
        println!("validation MLM loss {val:.4}");
    }
    if let Some(bad) = summary.losses.iter().find(|l| !l.is_finite()) {
        bail!("the training loss is {bad}");
    }
    println!(
        "{:.0} tokens/s over {:.1} s",
        summary.tokens_per_s, summary.train_seconds
    );
    let checkpoint = summary.checkpoint.context("the run wrote no checkpoint")?;
    println!("sharded checkpoint: {}", checkpoint.display());
    println!("metrics: {}", summary.metrics.display());
    println!(
        "export it: cargo run --bin mics -- export --checkpoint {} --out <dir>",
        checkpoint.display()
    );
    Ok(())
}
