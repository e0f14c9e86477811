//! `mics embed` (being written).

/// Arguments of `mics embed`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `mics embed`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("mics embed is not implemented yet")
}
