//! `mics collectives` (being written).

/// Arguments of `mics collectives`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `mics collectives`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("mics collectives is not implemented yet")
}
