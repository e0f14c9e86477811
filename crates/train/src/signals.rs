//! Clean stops on SIGINT and SIGTERM (Ctrl-C, a scheduler's pre-emption,
//! `mpirun` forwarding either to every rank).
//!
//! [`install_stop_handlers`] makes the first signal only a request: every
//! rank finishes its current step, the ranks agree on stopping (the request
//! travels in the all-reduce of each step's loss, so they stop after the
//! same step even when the signal reached them at different moments), write
//! a checkpoint unless `--no-checkpoint-on-signal`, and [`train`](crate::train)
//! returns [`RunOutcome::Stopped`](crate::RunOutcome::Stopped); `mics train`
//! prints one line and exits with 128 + the signal (130, 143). A second
//! signal exits at once with that status.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::TrainError;

/// SIGINT.
pub const SIGINT: i32 = 2;
/// SIGTERM.
pub const SIGTERM: i32 = 15;

/// The first stop signal received (0: none).
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Installs the SIGINT and SIGTERM handlers of a clean stop (see the module
/// docs) and clears any earlier request.
pub fn install_stop_handlers() -> Result<(), TrainError> {
    REQUESTED.store(0, Ordering::SeqCst);
    for signal in [SIGINT, SIGTERM] {
        // SAFETY: the handler only swaps an atomic and, on a second signal,
        // calls `_exit`: both async-signal-safe.
        let registered = unsafe {
            signal_hook::low_level::register(signal, move || {
                if REQUESTED.swap(signal, Ordering::SeqCst) != 0 {
                    signal_hook::low_level::exit(128 + signal);
                }
            })
        };
        registered
            .map_err(|e| TrainError::Engine(format!("cannot handle signal {signal}: {e}")))?;
    }
    Ok(())
}

/// The stop signal received, if any.
pub fn stop_requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Asks the run to stop after its current step, as `signal` would
/// (for embedding the trainer without signal handlers).
pub fn request_stop(signal: i32) {
    REQUESTED.store(signal, Ordering::SeqCst);
}

/// The name of a stop signal.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
