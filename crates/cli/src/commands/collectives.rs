//! `mics collectives`: runs every collective on the in-process engine over a
//! MiCS topology, checks each result against a single-threaded reference,
//! and prints time and bytes per collective.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use mics_comm::{
    Collectives, CommStats, Communicator, MicsGroups, ReduceOp, ThreadsEngine, Topology,
};

/// Arguments of `mics collectives`.
#[derive(clap::Args)]
pub struct Args {
    /// World size N (one thread per rank).
    #[arg(long, default_value_t = 8)]
    world: usize,
    /// Ranks per node k, imposed on the in-process engine.
    #[arg(long, default_value_t = 2)]
    ranks_per_node: usize,
    /// Partition size p.
    #[arg(long, default_value_t = 4)]
    partition_size: usize,
    /// Size of each rank's shard, in f32 elements.
    #[arg(long, default_value_t = 1 << 20)]
    shard_len: usize,
}

/// What rank `r` contributes: distinct, non-trivial values.
fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 31 + i) % 1013) as f32 * 0.25 - 100.0)
        .collect()
}

struct RankReport {
    gather_ms: f64,
    reduce_scatter_ms: f64,
    all_reduce_ms: f64,
    stats: CommStats,
    errors: Vec<String>,
}

/// Runs `mics collectives`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let topology = Topology::new(args.world, args.ranks_per_node, args.partition_size)
        .context("invalid topology")?;
    println!(
        "mics collectives: {topology}, shard of {} f32 per rank",
        args.shard_len
    );
    let len = args.shard_len;
    let p = topology.partition_size();
    let reports = ThreadsEngine::new(args.world)
        .ranks_per_node(args.ranks_per_node)
        .run(|world| -> anyhow::Result<RankReport> {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let groups = MicsGroups::new(world, topology)?;
            let mut errors = Vec::new();

            // Gather the partition's shards (hierarchically when p > k).
            let start = Instant::now();
            let gathered = groups.all_gather_partition(values(rank, len)).wait()?;
            let gather_ms = start.elapsed().as_secs_f64() * 1e3;
            let first = rank / p * p;
            let expected: Vec<f32> = (first..first + p).flat_map(|r| values(r, len)).collect();
            if gathered != expected {
                errors.push(format!(
                    "rank {rank}: partition all-gather differs from the reference"
                ));
            }

            // Reduce-scatter full "gradients" inside the partition group.
            let start = Instant::now();
            let shard = groups
                .partition()
                .reduce_scatter(values(rank, len * p), ReduceOp::Sum)
                .wait()?;
            let reduce_scatter_ms = start.elapsed().as_secs_f64() * 1e3;
            let local = rank - first;
            let ranks: Vec<Vec<f32>> = (first..first + p).map(|r| values(r, len * p)).collect();
            let expected: Vec<f32> = (local * len..(local + 1) * len)
                .map(|i| ranks.iter().fold(0.0, |acc, v| acc + v[i]))
                .collect();
            if shard != expected {
                errors.push(format!(
                    "rank {rank}: partition reduce-scatter differs from the reference"
                ));
            }

            // All-reduce the shard across the replication group.
            let start = Instant::now();
            let synced = groups
                .replication()
                .all_reduce(shard, ReduceOp::Mean)
                .wait()?;
            let all_reduce_ms = start.elapsed().as_secs_f64() * 1e3;
            let replicas = groups.replication().world_ranks().to_vec();
            let shards: Vec<Vec<f32>> = replicas
                .iter()
                .map(|&r| {
                    let g = r / p * p;
                    let ranks: Vec<Vec<f32>> = (g..g + p).map(|q| values(q, len * p)).collect();
                    (local * len..(local + 1) * len)
                        .map(|i| ranks.iter().fold(0.0, |acc, v| acc + v[i]))
                        .collect()
                })
                .collect();
            let expected: Vec<f32> = (0..len)
                .map(|i| shards.iter().fold(0.0, |acc, s| acc + s[i]) / shards.len() as f32)
                .collect();
            if synced != expected {
                errors.push(format!(
                    "rank {rank}: replication all-reduce differs from the reference"
                ));
            }
            groups.world().barrier().wait()?;

            let mut stats = groups.partition().stats();
            for comm in [
                groups.replication(),
                groups.intra_node(),
                groups.inter_node(),
            ] {
                stats += &comm.stats();
            }
            Ok(RankReport {
                gather_ms,
                reduce_scatter_ms,
                all_reduce_ms,
                stats,
                errors,
            })
        })?;

    let mut failures = Vec::new();
    println!("rank  gather_ms  reduce_scatter_ms  all_reduce_ms  intra_node_MiB  inter_node_MiB");
    for (rank, report) in reports.into_iter().enumerate() {
        let report = match report {
            Ok(Ok(report)) => report,
            Ok(Err(err)) => bail!("rank {rank}: {err:#}"),
            Err(panic) => bail!("rank {rank} panicked: {panic}"),
        };
        println!(
            "{rank:>4}  {:>9.2}  {:>17.2}  {:>13.2}  {:>14.2}  {:>14.2}",
            report.gather_ms,
            report.reduce_scatter_ms,
            report.all_reduce_ms,
            report.stats.intra_node_bytes() as f64 / (1 << 20) as f64,
            report.stats.inter_node_bytes() as f64 / (1 << 20) as f64,
        );
        failures.extend(report.errors);
    }
    if !failures.is_empty() {
        bail!(
            "{} results differ from the reference: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    println!("all results match the single-threaded reference");
    Ok(())
}
