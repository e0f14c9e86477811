//! `mics plan` (being written).

/// Arguments of `mics plan`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `mics plan`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("mics plan is not implemented yet")
}
