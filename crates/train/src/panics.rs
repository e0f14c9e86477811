//! Rank panics as error lines: Burn's ops cannot return errors, so a
//! collective that fails inside one (a peer left, the group was poisoned)
//! panics in `mics-backend`. On a rank this is caught and becomes one
//! [`TrainError`]: [`TrainError::PeerLost`] when another rank's failure
//! caused it (reported by that rank), otherwise [`TrainError::Panicked`]
//! with the panic's message and place. The default hook's trace is not printed
//! for panics caught this way.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::sync::Once;

use crate::TrainError;

thread_local! {
    /// Set while a panic on this thread is caught and reported as an error.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// Where the last quiet panic of this thread happened.
    static PLACE: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let place = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                PLACE.with(|p| *p.borrow_mut() = place);
                return;
            }
            previous(info);
        }));
    });
}

/// Runs `f`, a panic of which is returned as its text and place instead of
/// printed.
pub(crate) fn quietly<R>(f: impl FnOnce() -> R) -> Result<R, (String, Option<String>)> {
    install_hook();
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        let place = PLACE.with(|p| p.borrow_mut().take());
        (crate::device::panic_text(&*payload), place)
    })
}

/// Runs rank `rank`'s `f`, a panic of which becomes an error (see the
/// module docs).
pub(crate) fn catch_rank<R>(
    rank: usize,
    f: impl FnOnce() -> Result<R, TrainError>,
) -> Result<R, TrainError> {
    match quietly(f) {
        Ok(result) => result,
        Err((text, place)) => Err(panic_error(rank, &text, place.as_deref())),
    }
}

/// A rank's panic as an error.
fn panic_error(rank: usize, text: &str, place: Option<&str>) -> TrainError {
    let text = text.replace('\n', " ");
    if caused_by_peer(&text) {
        return TrainError::PeerLost {
            rank,
            problem: text,
        };
    }
    TrainError::Rank {
        rank,
        error: Box::new(TrainError::Panicked {
            message: text,
            place: place.map(str::to_string),
        }),
    }
}

/// Whether a panic's text is a collective failing because another rank
/// left or failed first (`mics_comm::CommError::RankLeft`, `Poisoned`).
fn caused_by_peer(text: &str) -> bool {
    text.contains("left the group") || text.contains("the group failed earlier")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_failure_is_a_consequence_and_a_bug_is_not() {
        let err = catch_rank::<()>(1, || {
            panic!("mics: all-gather of parameter 3 failed: rank 0 left the group (dropped)")
        })
        .unwrap_err();
        assert!(matches!(err, TrainError::PeerLost { rank: 1, .. }), "{err}");
        let err = catch_rank::<()>(2, || panic!("index out of bounds")).unwrap_err();
        match err {
            TrainError::Rank { rank: 2, error } => {
                let message = error.to_string();
                assert!(message.contains("index out of bounds"), "{message}");
                assert!(message.contains("panics.rs:"), "{message}");
            }
            other => panic!("{other}"),
        }
    }
}
