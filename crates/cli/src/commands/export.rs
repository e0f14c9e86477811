//! `mics export`: a sharded training checkpoint to a Hugging Face-layout directory.

use std::path::PathBuf;

use anyhow::Context;
use mics_train::Device;

/// Arguments of `mics export`.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint (`.../checkpoints/step-N`) or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where `model.safetensors`, `config.json` and `tokenizer.json` go.
    #[arg(long)]
    pub out: PathBuf,
    /// The device the exported model is checked on: loaded there and run
    /// on one sequence, whose logits must be finite (`cpu` by default).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Runs `mics export`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let dir =
        mics_train::export(&args.checkpoint, &args.out, args.device).context("export failed")?;
    println!(
        "exported {} to {} (model.safetensors, config.json, tokenizer.json)",
        dir.display(),
        args.out.display()
    );
    Ok(())
}
