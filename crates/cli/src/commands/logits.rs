//! `mics logits` (being written).

/// Arguments of `mics logits`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `mics logits`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("mics logits is not implemented yet")
}
