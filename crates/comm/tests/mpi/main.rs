//! The MPI engine's suite on OpenMPI, a test binary without libtest that
//! runs under `mpirun` (feature `mpi`); `scripts/test-mpi` builds and runs it:
//!
//! ```text
//! cargo test -p mics-comm --features mpi --test mpi --no-run   # prints the executable's path
//! MICS_RANKS_PER_NODE=2 mpirun -np 4 --oversubscribe -x MICS_RANKS_PER_NODE <that path>
//! ```
//!
//! Without an argument it runs the suite: every collective and element type,
//! odd lengths, every reduce operation, mismatches, deferred inputs, splits,
//! the MiCS groups of a hierarchical (N=4, k=2, p=4) and a two-hop
//! (N=4, k=2, p=2) topology, and byte counters. Each rank checks the MPI
//! results bit for bit against a naive single-process reference and against
//! the in-process threads engine run on the same inputs. Rank 0 prints
//! `mpi collectives: N passed, M failed`; the exit status is non-zero if any
//! check failed on any rank.
//!
//! With an argument it runs one failure scenario, which must end the job
//! with a non-zero status rather than hang: `exit-early` (a rank exits
//! without finalising), `hang` (a rank never arrives: the engine's timeout
//! aborts the job), `wait-timeout` (a `Work::wait` times out) and `panic`
//! (a rank panics while holding its communicator). `bench` times f32
//! all-gather, reduce-scatter and all-reduce of 1 and 16 MiB messages.
//!
//! Started outside `mpirun` (`cargo test --features mpi`) it says so and
//! passes without running anything; it lists no tests to `cargo nextest`.
//!
//! - `collectives.rs`: inputs, the naive reference, every collective per type;
//! - `semantics.rs`: non-blocking issue, deferred inputs, mismatches, splits,
//!   byte counters;
//! - `groups.rs`: the MiCS groups of two topologies;
//! - `scenarios.rs`: the failure scenarios and the bench.

mod collectives;
#[path = "../common/mod.rs"]
mod common;
mod groups;
mod scenarios;
mod semantics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use mics_comm::mpi::MpiEngine;
use mics_comm::{Collectives, Communicator};

/// Variables `mpirun` (OpenMPI, or a PMI/PMIx launcher) sets in each rank.
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "--list" {
        // `cargo nextest` asks for libtest's list: none here.
        return;
    }
    if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        eprintln!(
            "mpi: skipped: this suite runs under mpirun (scripts/test-mpi), e.g. \
             `MICS_RANKS_PER_NODE=2 mpirun -np 4 --oversubscribe -x MICS_RANKS_PER_NODE {}`",
            std::env::args().next().unwrap_or_default()
        );
        return;
    }
    std::process::exit(match mode.as_str() {
        "" | "suite" => suite(),
        "exit-early" => scenarios::exit_early(),
        "hang" => scenarios::hang(),
        "wait-timeout" => scenarios::wait_timeout(),
        "panic" => scenarios::panic_rank(),
        "bench" => scenarios::bench(),
        other => {
            eprintln!("mpi: unknown mode {other:?}");
            2
        }
    });
}

/// Pass/fail of every check on this rank, in a fixed order.
pub struct Checks {
    pub rank: usize,
    pub results: Vec<(String, bool)>,
}

impl Checks {
    pub fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl FnOnce() -> String) {
        let name = name.into();
        if !ok {
            eprintln!("rank {}: FAIL {name}: {}", self.rank, detail());
        }
        self.results.push((name, ok));
    }
}

fn suite() -> i32 {
    let started = Instant::now();
    let world = match MpiEngine::new().timeout(Duration::from_secs(120)).init() {
        Ok(world) => Arc::new(world),
        Err(err) => {
            eprintln!("mpi: MPI init failed: {err}");
            return 1;
        }
    };
    let rank = world.rank();
    let p = world.size();
    let mut c = Checks {
        rank,
        results: Vec::new(),
    };
    for len in [0, 1, 5, 13, 1027, 65_537] {
        collectives::check::<f32>(&world, &mut c, len);
        collectives::check::<bf16>(&world, &mut c, len);
        collectives::check::<f16>(&world, &mut c, len);
    }
    semantics::non_blocking(&world, &mut c);
    semantics::deferred(&world, &mut c);
    semantics::mismatches(&world, &mut c);
    semantics::splits(&world, &mut c);
    semantics::byte_counters(&world, &mut c);
    if p == 4 {
        groups::hierarchical_groups(&world, &mut c);
        groups::two_hop_groups(&world, &mut c);
    } else {
        c.check("the MiCS topology checks need -np 4", false, || {
            format!("run with 4 ranks, not {p}")
        });
    }

    // Summary: a check passes if it passed on every rank.
    let mine: Vec<f32> = c
        .results
        .iter()
        .map(|(_, ok)| if *ok { 1.0 } else { 0.0 })
        .collect();
    let n = mine.len();
    let (passed, failed) = match world.all_gather(mine).wait() {
        Ok(all) => {
            let mut failed = 0;
            for (i, (name, _)) in c.results.iter().enumerate() {
                let bad: Vec<usize> = (0..p).filter(|&r| all[r * n + i] != 1.0).collect();
                if !bad.is_empty() {
                    failed += 1;
                    if rank == 0 {
                        eprintln!("FAILED on ranks {bad:?}: {name}");
                    }
                }
            }
            (n - failed, failed)
        }
        Err(err) => {
            eprintln!("rank {rank}: gathering the results failed: {err}");
            (0, n.max(1))
        }
    };
    let nodes = world.nodes().to_vec();
    drop(world);
    if rank == 0 {
        println!(
            "mpi collectives: {p} ranks on nodes {nodes:?}, {:.1}s; {passed} passed, {failed} failed",
            started.elapsed().as_secs_f64()
        );
    }
    i32::from(failed > 0)
}
