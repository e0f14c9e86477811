//! `mics export`: a sharded training checkpoint to a Hugging Face-layout directory.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `mics export`.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint (`.../checkpoints/step-N`) or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where `model.safetensors`, `config.json` and `tokenizer.json` go.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `mics export`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = mics_train::export(&args.checkpoint, &args.out).context("export failed")?;
    println!(
        "exported {} to {} (model.safetensors, config.json, tokenizer.json)",
        dir.display(),
        args.out.display()
    );
    Ok(())
}
