//! Parity under `mpirun` with the MPI engine (scripts/test-mpi):
//! `Autodiff<Mics<NdArray>>` on 4 MPI processes laid out 2 per node equals
//! one process on the same global batches, which every rank computes for
//! itself. Every loss and every final parameter is compared (relative error
//! ≤ 1e-5), and the collectives of each step are counted.
//!
//! ```text
//! cargo build -p mics-backend --features mpi --example mpi_parity
//! mpirun -np 4 --oversubscribe target/debug/examples/mpi_parity
//! ```
//!
//! The last line, printed by rank 0, reads `mpi-parity: N passed, M failed`;
//! the status is non-zero when a check failed on any rank.

#[path = "../tests/common/mod.rs"]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tasks::{GptTask, MlpTask};
use common::*;
use mics_backend::PrefetchConfig;
use mics_comm::mpi::MpiEngine;
use mics_comm::{Collectives, Communicator, ReduceOp};

const TOL: f32 = 1e-5;
/// Ranks per node imposed on the MPI world: a partition group of 4 spans
/// two "nodes", so parameters are gathered hierarchically.
const RANKS_PER_NODE: usize = 2;
const WORLD: usize = 4;

fn cfg(p: usize, s: usize) -> Config {
    Config {
        n: WORLD,
        k: RANKS_PER_NODE,
        p,
        s,
        b: 2,
        steps: 5,
    }
}

/// Trains on the MPI world and compares with the local reference. Returns
/// the worst relative error, or the failure message.
fn check<T: Task>(
    task: &T,
    c: Config,
    prefetch: PrefetchConfig,
    world: &Arc<dyn Communicator>,
) -> Result<f32, String> {
    let reference = reference(task, c, None);
    let rank = rank_run(
        task,
        c,
        None,
        prefetch,
        |rt| mics_backend::ShardedOptimizer::adamw(&optimizer_config(), rt),
        world.clone(),
    );
    // The comparisons only panic; every collective of the run is done.
    catch_unwind(AssertUnwindSafe(|| {
        let ranks = [rank];
        let worst = assert_parity(&reference, &ranks, TOL);
        // Every model here is one gradient bucket at the default size.
        assert_collective_counts(&ranks, 1, c, false);
        if prefetch.depth > 0 {
            let k = ranks[0].counters;
            assert!(k.prefetch_hits > 0, "no prefetch hit: {k:?}");
        }
        worst
    }))
    .map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

fn main() {
    let started = Instant::now();
    let world = match MpiEngine::new()
        .ranks_per_node(RANKS_PER_NODE)
        .timeout(Duration::from_secs(300))
        .init()
    {
        Ok(world) => world,
        Err(err) => {
            eprintln!("mpi-parity: MPI init failed: {err}");
            std::process::exit(1);
        }
    };
    let world: Arc<dyn Communicator> = Arc::new(world);
    if world.size() != WORLD {
        eprintln!("mpi-parity: run with -np {WORLD}, not {}", world.size());
        std::process::exit(2);
    }
    let rank = world.rank();

    let mut results: Vec<(String, Result<f32, String>)> = Vec::new();
    let c = cfg(4, 2);
    results.push((
        format!("transformer {c:?}"),
        check(&GptTask, c, PrefetchConfig::disabled(), &world),
    ));
    let c = cfg(4, 3);
    results.push((
        format!("transformer {c:?} with prefetch"),
        check(&GptTask, c, PrefetchConfig::new(3, 1 << 20), &world),
    ));
    let c = cfg(2, 2);
    results.push((
        format!("mlp {c:?}"),
        check(&MlpTask, c, PrefetchConfig::disabled(), &world),
    ));

    for (name, r) in &results {
        if let Err(msg) = r {
            eprintln!("rank {rank}: FAIL {name}: {msg}");
        }
    }
    // A check passes if it passed on every rank; its error is the worst
    // over the ranks.
    let failed: Vec<f32> = results
        .iter()
        .map(|(_, r)| if r.is_ok() { 0.0 } else { 1.0 })
        .collect();
    let worst: Vec<f32> = results
        .iter()
        .map(|(_, r)| *r.as_ref().unwrap_or(&f32::INFINITY))
        .collect();
    let failed = world.all_reduce(failed, ReduceOp::Max).wait().unwrap();
    let worst = world.all_reduce(worst, ReduceOp::Max).wait().unwrap();
    let mut passed = 0;
    let mut fails = 0;
    for (i, (name, _)) in results.iter().enumerate() {
        if failed[i] == 0.0 {
            passed += 1;
            if rank == 0 {
                println!(
                    "mpi-parity: ok   {name}: worst relative error {:e}",
                    worst[i]
                );
            }
        } else {
            fails += 1;
            if rank == 0 {
                println!("mpi-parity: FAIL {name}");
            }
        }
    }
    if rank == 0 {
        println!(
            "mpi-parity: {WORLD} ranks, {RANKS_PER_NODE} per node, {:.1}s",
            started.elapsed().as_secs_f64()
        );
        println!("mpi-parity: {passed} passed, {fails} failed");
    }
    drop(world);
    std::process::exit(if fails == 0 { 0 } else { 1 });
}
