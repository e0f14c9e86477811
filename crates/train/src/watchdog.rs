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
//! Under `mpirun` each process holds one rank: there the counters travel
//! through small files in `<output.dir>/.heartbeats/` (the ranks share
//! the output directory, as they do for checkpoints), written by each
//! process's monitor every 250 ms and read by all of them, so a process
//! that stops (SIGSTOP, a hung node) or a rank thread that hangs is named
//! by the others within the failure timeout too.
//!
//! The collective timeout (`parallel.timeout_s`) still bounds every single
//! collective, including the long legitimate waits a step does not have
//! (rank 0 preparing the dataset or committing a checkpoint while the
//! others wait).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::TrainError;

struct Shared {
    progress: Vec<AtomicU64>,
    finished: Vec<AtomicBool>,
    stop: AtomicBool,
}

/// Where the ranks of other processes publish their counters.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
struct Files {
    dir: std::path::PathBuf,
    /// This process's rank (its counter is slot 0 of `Shared`).
    rank: usize,
    world: usize,
    /// Agreed by the ranks at start, so that files of an earlier run in the
    /// same directory are not taken for this one's.
    generation: u64,
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

    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    /// Watches the `world` ranks of a multi-process job through files in
    /// `dir` (this process runs `rank`); its one counter is [`beat`]`(0)`.
    ///
    /// [`beat`]: Watchdog::beat
    pub(crate) fn start_files(
        dir: std::path::PathBuf,
        rank: usize,
        world: usize,
        generation: u64,
        timeout_s: u64,
    ) -> Watchdog {
        let shared = Arc::new(Shared {
            progress: vec![AtomicU64::new(0)],
            finished: vec![AtomicBool::new(false)],
            stop: AtomicBool::new(false),
        });
        let files = Files {
            dir,
            rank,
            world,
            generation,
        };
        let monitor = (timeout_s > 0 && world > 1).then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mics-watchdog".into())
                .spawn(move || monitor_files(&shared, &files, Duration::from_secs(timeout_s)))
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

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl Files {
    fn path(&self, rank: usize) -> std::path::PathBuf {
        self.dir.join(format!("rank-{rank:05}"))
    }

    /// Publishes this rank's counter.
    fn write(&self, progress: u64, finished: bool) {
        let path = self.path(self.rank);
        let tmp = self.dir.join(format!(".rank-{:05}.tmp", self.rank));
        let text = format!("{} {progress} {}\n", self.generation, u8::from(finished));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// Every rank's (counter, finished); a rank whose file is missing or of
    /// another run counts as not started.
    fn read(&self) -> (Vec<u64>, Vec<bool>) {
        (0..self.world)
            .map(|r| {
                std::fs::read_to_string(self.path(r))
                    .ok()
                    .and_then(|text| {
                        let mut parts = text.split_whitespace();
                        let generation: u64 = parts.next()?.parse().ok()?;
                        let progress: u64 = parts.next()?.parse().ok()?;
                        let finished = parts.next()? == "1";
                        (generation == self.generation).then_some((progress, finished))
                    })
                    .unwrap_or((0, false))
            })
            .unzip()
    }
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn monitor_files(shared: &Shared, files: &Files, timeout: Duration) {
    let _ = std::fs::create_dir_all(&files.dir);
    let mut seen: Vec<(u64, Instant)> = (0..files.world).map(|_| (0, Instant::now())).collect();
    loop {
        let stopping = shared.stop.load(Ordering::SeqCst);
        let finished = stopping || shared.finished[0].load(Ordering::SeqCst);
        files.write(shared.progress[0].load(Ordering::SeqCst), finished);
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        let (current, done) = files.read();
        for r in 0..files.world {
            if current[r] != seen[r].0 {
                seen[r] = (current[r], now);
            }
        }
        if let Some(rank) = hung(&current, &done, &seen, now, timeout) {
            let err = TrainError::Hung {
                rank,
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
    fn heartbeat_files_of_another_run_count_as_not_started() {
        let dir = std::env::temp_dir().join(format!("mics-beats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = |rank, generation| Files {
            dir: dir.clone(),
            rank,
            world: 3,
            generation,
        };
        files(0, 7).write(12, false);
        files(1, 7).write(9, true);
        files(2, 6).write(40, false);
        assert_eq!(
            files(0, 7).read(),
            (vec![12, 9, 0], vec![false, true, false])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

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
