//! Fault injection for the tests: `MICS_FAULT_INJECT`, a comma-separated
//! list of
//!
//! - `abort-before-commit:STEP`: abort the process after the checkpoint of
//!   STEP is fully written but before it is renamed into place, as a crash
//!   or `kill -9` there would;
//! - `enospc:FILE`: writing a checkpoint file named FILE (e.g.
//!   `tokenizer.json`, `rank-00001.safetensors`) fails with ENOSPC, as on a
//!   full disk;
//! - `metrics-write:STEP`: rank 0's metrics line of STEP fails to write;
//! - `hang:RANK:STEP`: rank RANK stops (sleeps for ever) when it starts
//!   step STEP (1-based), as a hung rank would;
//! - `slow-steps:MS`: every step takes MS milliseconds longer (to send
//!   signals mid-run).
//!
//! Unset, none of these points does anything.

use std::path::Path;
use std::time::Duration;

use crate::TrainError;

fn specs() -> Vec<String> {
    std::env::var("MICS_FAULT_INJECT")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default()
}

/// The argument of `name:ARG` in `MICS_FAULT_INJECT`.
fn arg(name: &str) -> Option<String> {
    specs()
        .into_iter()
        .find_map(|s| s.strip_prefix(&format!("{name}:")).map(str::to_string))
}

/// `abort-before-commit:STEP`.
pub(crate) fn before_commit(step: u64) {
    if arg("abort-before-commit").and_then(|s| s.parse().ok()) == Some(step) {
        eprintln!(
            "mics: MICS_FAULT_INJECT: aborting before committing the checkpoint of step {step}"
        );
        std::process::abort();
    }
}

/// `enospc:FILE`.
pub(crate) fn before_write(path: &Path) -> Result<(), TrainError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    if name.is_some() && arg("enospc") == name {
        return Err(TrainError::io(path, std::io::Error::from_raw_os_error(28)));
    }
    Ok(())
}

/// `metrics-write:STEP`.
pub(crate) fn metrics_write(path: &Path, step: u64) -> Result<(), TrainError> {
    if arg("metrics-write").and_then(|s| s.parse().ok()) == Some(step) {
        return Err(TrainError::io(
            path,
            "MICS_FAULT_INJECT: the metrics line could not be written",
        ));
    }
    Ok(())
}

/// `hang:RANK:STEP` and `slow-steps:MS`, at the start of `step` (1-based).
pub(crate) fn step_start(rank: usize, step: u64) {
    if let Some(ms) = arg("slow-steps").and_then(|s| s.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some((r, s)) = arg("hang").and_then(|a| {
        let (r, s) = a.split_once(':')?;
        Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?))
    }) && r == rank
        && s == step
    {
        eprintln!("mics: MICS_FAULT_INJECT: rank {rank} hangs at step {step}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
