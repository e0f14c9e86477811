//! What the engines' communicators share: the default timeout, the issue side
//! of a worker queue (sequence numbers handed out in queue order), running one
//! thread per rank, panic payloads as text, and the numbering of nodes.
//!
//! Every engine runs a communicator's collectives on a worker (a thread per
//! communicator for threads and NCCL, one communication thread per process for
//! MPI) in the order they were issued; [`Issuer`] is the caller's end of that
//! queue.

use std::any::Any;
use std::sync::mpsc::Sender;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Default time a collective waits for the other ranks, in every engine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The text of a panic payload (`&str` or `String`; other payloads are named
/// as such).
pub fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// The worker's queue is closed, or its receiving end is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerGone;

struct IssueState<J> {
    next_seq: u64,
    jobs: Option<Sender<J>>,
}

/// Issue side of a communicator: sequence numbers and the worker's queue,
/// under one lock so that sequence order is queue order.
pub(crate) struct Issuer<J> {
    state: Mutex<IssueState<J>>,
}

impl<J> Issuer<J> {
    /// An issuer that numbers jobs from 0 and sends them to `jobs`.
    pub(crate) fn new(jobs: Sender<J>) -> Self {
        Issuer {
            state: Mutex::new(IssueState {
                next_seq: 0,
                jobs: Some(jobs),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, IssueState<J>> {
        // Every update is a single assignment: a panic elsewhere while the
        // lock was held leaves the state consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next sequence number and queues the job `make` builds for
    /// it, both under the lock. The number is used up even when the queue is
    /// closed (then [`WorkerGone`]).
    pub(crate) fn issue(&self, make: impl FnOnce(u64) -> J) -> Result<u64, WorkerGone> {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        let job = make(seq);
        match &state.jobs {
            Some(jobs) if jobs.send(job).is_ok() => Ok(seq),
            _ => Err(WorkerGone),
        }
    }

    /// Closes the queue: the worker runs what is queued, then stops.
    pub(crate) fn close(&self) {
        self.lock().jobs = None;
    }
}

/// Runs `f` on one scoped thread per communicator, named `name(rank)`, and
/// returns each rank's result, or its panic text.
///
/// Panics if a thread cannot be spawned.
pub(crate) fn run_ranks<C, R, F>(
    comms: Vec<C>,
    name: impl Fn(usize) -> String,
    f: &F,
) -> Vec<Result<R, String>>
where
    C: Send,
    R: Send,
    F: Fn(C) -> R + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                std::thread::Builder::new()
                    .name(name(rank))
                    .spawn_scoped(scope, move || f(comm))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|p| panic_text(p.as_ref())))
            .collect()
    })
}

/// Numbers nodes by the first appearance of each rank's node key (a host
/// hash, the lowest world rank of the node): rank 0's node is node 0. (The
/// threads engine is told its layout.)
#[cfg(any(feature = "mpi", feature = "cuda", test))]
pub(crate) fn nodes_by_first_appearance(keys: &[u64]) -> Vec<usize> {
    let mut seen: Vec<u64> = Vec::new();
    keys.iter()
        .map(|k| match seen.iter().position(|s| s == k) {
            Some(i) => i,
            None => {
                seen.push(*k);
                seen.len() - 1
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_by_first_host() {
        assert_eq!(nodes_by_first_appearance(&[7, 7, 3, 3, 7]), [0, 0, 1, 1, 0]);
    }

    #[test]
    fn sequence_numbers_follow_queue_order_and_survive_a_closed_queue() {
        let (tx, rx) = std::sync::mpsc::channel();
        let issuer = Issuer::new(tx);
        assert_eq!(issuer.issue(|seq| seq * 10), Ok(0));
        assert_eq!(issuer.issue(|seq| seq * 10), Ok(1));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 10]);
        issuer.close();
        assert_eq!(issuer.issue(|seq| seq), Err(WorkerGone));
        drop(rx);
    }

    #[test]
    fn panics_become_text() {
        let results = run_ranks(
            vec![0, 1, 2],
            |r| format!("t{r}"),
            &|rank: i32| match rank {
                1 => panic!("rank {rank} fails"),
                2 => std::panic::panic_any(7u8),
                _ => rank,
            },
        );
        assert_eq!(results[0], Ok(0));
        assert_eq!(results[1], Err("rank 1 fails".to_string()));
        assert_eq!(
            results[2],
            Err("panic with a non-string payload".to_string())
        );
    }
}
