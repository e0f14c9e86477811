//! `mics generate` (being written).

/// Arguments of `mics generate`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `mics generate`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("mics generate is not implemented yet")
}
