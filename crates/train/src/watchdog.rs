//! Failure detection of in-process ranks: a hung rank found within
//! `parallel.failure_timeout_s`, not the collective timeout.
//!
//! Every rank advances a progress counter at the points of a step that
//! every rank passes (start, each micro-step, update, loss agreement,
//! checkpoint, evaluation). A monitor thread watches the counters of the
//! ranks of this process: a rank whose counter has not moved for
//! `failure_timeout_s` while another, unfinished rank is past it (so is
//! waiting for it in a collective) is hung. The run then cannot end
//! normally (the hung thread cannot be interrupted), so the monitor prints
//! one error line naming the rank and exits the process with status 1; the
//! last committed checkpoint is intact.
//!
//! The collective timeout (`parallel.timeout_s`) still bounds every single
//! collective, including the long legitimate waits a step does not have
//! (rank 0 preparing the dataset or committing a checkpoint while the
//! others wait). Under `mpirun` each process holds one rank, so this
//! monitor sees no peers: MPI ends the job when a rank's process dies, and
//! the collective timeout when one stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::TrainError;

struct Shared {
    progress: Vec<AtomicU64>,
    finished: Vec<AtomicBool>,
    stop: AtomicBool,
}

/// The monitor of a process's ranks; stops when dropped.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

/// One rank's progress counter (a no-op when no watchdog watches).
#[derive(Clone, Default)]
pub(crate) struct Beat {
    slot: Option<(Arc<Shared>, usize)>,
}

impl Beat {
    /// This rank passed another point of its step.
    pub(crate) fn advance(&self) {
        if let Some((shared, rank)) = &self.slot {
            shared.progress[*rank].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// This rank is done (finished, failed or stopped): nobody waits for it.
    pub(crate) fn finish(&self) {
        if let Some((shared, rank)) = &self.slot {
            shared.finished[*rank].store(true, Ordering::SeqCst);
        }
    }
}

impl Watchdog {
    /// Watches `ranks` in-process ranks with the failure-detection timeout
    /// `timeout_s` (0: no watchdog).
    pub(crate) fn start(ranks: usize, timeout_s: u64) -> Watchdog {
        let shared = Arc::new(Shared {
            progress: (0..ranks).map(|_| AtomicU64::new(0)).collect(),
            finished: (0..ranks).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
        });
        let monitor = (timeout_s > 0 && ranks > 1).then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mics-watchdog".into())
                .spawn(move || monitor(&shared, Duration::from_secs(timeout_s)))
                .expect("spawning the watchdog")
        });
        Watchdog { shared, monitor }
    }

    /// The counter of `rank`.
    pub(crate) fn beat(&self, rank: usize) -> Beat {
        Beat {
            slot: Some((self.shared.clone(), rank)),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.join();
        }
    }
}

fn monitor(shared: &Shared, timeout: Duration) {
    let ranks = shared.progress.len();
    let mut seen: Vec<(u64, Instant)> = (0..ranks).map(|_| (0, Instant::now())).collect();
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let current: Vec<u64> = shared
            .progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect();
        let finished: Vec<bool> = shared
            .finished
            .iter()
            .map(|f| f.load(Ordering::SeqCst))
            .collect();
        for r in 0..ranks {
            if current[r] != seen[r].0 {
                seen[r] = (current[r], now);
            }
        }
        if let Some(hung) = hung(&current, &finished, &seen, now, timeout) {
            let err = TrainError::Hung {
                rank: hung,
                seconds: timeout.as_secs(),
            };
            eprintln!("error: training failed: {err}");
            std::process::exit(1);
        }
    }
}

/// The rank that is hung: unfinished, unchanged for `timeout`, while an
/// unfinished rank is past it.
fn hung(
    current: &[u64],
    finished: &[bool],
    seen: &[(u64, Instant)],
    now: Instant,
    timeout: Duration,
) -> Option<usize> {
    let waiting = |r: usize| (0..current.len()).any(|q| !finished[q] && current[q] > current[r]);
    (0..current.len())
        .filter(|&r| !finished[r] && now.duration_since(seen[r].1) >= timeout)
        .filter(|&r| waiting(r))
        .min_by_key(|&r| current[r])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_behind_the_others_and_still_is_hung() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        let timeout = Duration::from_secs(5);
        let seen = [(5, t0), (6, t0), (6, t0)];
        // Rank 0 is behind and has not moved for 10 s.
        assert_eq!(
            hung(&[5, 6, 6], &[false; 3], &seen, later, timeout),
            Some(0)
        );
        // Everyone level: a long step, nobody waits for anybody.
        let level = [(6, t0), (6, t0), (6, t0)];
        assert_eq!(hung(&[6, 6, 6], &[false; 3], &level, later, timeout), None);
        // The ranks ahead have finished: rank 0 writes its summary alone.
        assert_eq!(
            hung(&[5, 6, 6], &[false, true, true], &seen, later, timeout),
            None
        );
        // Not yet past the timeout.
        assert_eq!(
            hung(
                &[5, 6, 6],
                &[false; 3],
                &seen,
                t0 + Duration::from_secs(4),
                timeout
            ),
            None
        );
    }
}
