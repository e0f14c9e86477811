//! Sharing the machine's cores among the ranks that run on it.
//!
//! On the CPU each rank computes with NdArray, whose matmul runs on
//! `matrixmultiply`'s own threads (one per physical core, process-wide) and
//! whose other ops, like the fused LM head's rows, run on Rayon's pool
//! (one thread per core). Ranks that share a machine each asking for every
//! core oversubscribe it: at N = 2 on 2 cores, 4 GEMM threads and 2 ranks
//! contend for 2 cores, and the workers yield and wait instead of computing.
//! Each rank gets `cores / ranks` threads instead:
//!
//! - the threads engine runs each rank inside a Rayon pool of its own
//!   (`rank_pool`);
//! - `matrixmultiply` reads its thread count once, from `MATMUL_NUM_THREADS`,
//!   so `mics train` sets that variable before any thread starts
//!   ([`share_cores`]), and `RAYON_NUM_THREADS` for MPI ranks, which are
//!   processes. A variable the user set is left alone.
//!
//! Measured on the main job (`configs/gpt2-shakespeare.toml`), N = 2,
//! p = 2, on 2 cores: a step took 560 ms with every rank on every core and
//! 460 ms with one thread per rank. `matrixmultiply` splits a product's
//! output among its threads, so results do not depend on the thread count.

use crate::config::{Device, EngineKind, TrainConfig};

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// How many of the run's ranks share this machine's cores: the world for
/// the threads engine, the launcher's count of local ranks under `mpirun`
/// (`OMPI_COMM_WORLD_LOCAL_SIZE`, `MPI_LOCALNRANKS`), 1 otherwise (a GPU
/// rank computes on its device).
pub fn ranks_on_this_machine(
    config: &TrainConfig,
    lookup: impl Fn(&str) -> Option<String>,
) -> usize {
    if config.train.device != Device::Cpu {
        return 1;
    }
    match config.parallel.engine {
        EngineKind::Threads => config.parallel.world.max(1),
        EngineKind::Mpi => ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
            .iter()
            .find_map(|name| lookup(name)?.trim().parse::<usize>().ok())
            .unwrap_or(1)
            .max(1),
        EngineKind::Nccl => 1,
    }
}

/// The threads each of `ranks` ranks computes with on `cores` cores: an
/// equal share, at least 1.
pub fn threads_per_rank(cores: usize, ranks: usize) -> usize {
    (cores / ranks.max(1)).max(1)
}

/// Gives each rank of `config` that runs on this machine its share of the
/// cores, through `MATMUL_NUM_THREADS` (and `RAYON_NUM_THREADS` for MPI
/// ranks), unless the user set them or the rank is alone. Returns the
/// threads per rank when it set anything.
///
/// # Safety
///
/// It sets environment variables: no other thread may be running (call it
/// first thing in `main`, before the run starts any).
pub unsafe fn share_cores(config: &TrainConfig) -> Option<usize> {
    let ranks = ranks_on_this_machine(config, |name| std::env::var(name).ok());
    if ranks <= 1 {
        return None;
    }
    let threads = threads_per_rank(cores(), ranks).to_string();
    let mut vars = vec!["MATMUL_NUM_THREADS"];
    if config.parallel.engine == EngineKind::Mpi {
        vars.push("RAYON_NUM_THREADS");
    }
    let mut set = false;
    for var in vars {
        if std::env::var_os(var).is_none() {
            // SAFETY: the caller guarantees no other thread runs.
            unsafe { std::env::set_var(var, &threads) };
            set = true;
        }
    }
    set.then(|| threads_per_rank(cores(), ranks))
}

/// The Rayon pool a rank of the threads engine computes in, when the world
/// shares the cores (`None` at world 1: Rayon's global pool).
pub(crate) fn rank_pool(config: &TrainConfig) -> Option<rayon::ThreadPool> {
    let ranks = ranks_on_this_machine(config, |_| None);
    if ranks <= 1 || config.parallel.engine != EngineKind::Threads {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads_per_rank(cores(), ranks))
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_gets_an_equal_share_and_at_least_one_thread() {
        assert_eq!(threads_per_rank(2, 1), 2);
        assert_eq!(threads_per_rank(2, 2), 1);
        assert_eq!(threads_per_rank(16, 4), 4);
        assert_eq!(threads_per_rank(16, 3), 5);
        assert_eq!(threads_per_rank(2, 8), 1);
        assert_eq!(threads_per_rank(4, 0), 4);
    }

    #[test]
    fn the_ranks_on_this_machine_depend_on_the_engine_and_device() {
        let mut config = TrainConfig::parse(
            "[model]\ntype = \"gpt2\"\n[data]\ncorpus = \"c\"\ntokenizer = \"t\"\n\
             seq_len = 64\n[train]\nsteps = 1\nmicro_batch = 1\nlr = 0.1\n\
             [parallel]\nworld = 4\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(ranks_on_this_machine(&config, |_| None), 4);
        config.parallel.engine = EngineKind::Mpi;
        assert_eq!(ranks_on_this_machine(&config, |_| None), 1);
        let local = |name: &str| (name == "OMPI_COMM_WORLD_LOCAL_SIZE").then(|| "2".to_string());
        assert_eq!(ranks_on_this_machine(&config, local), 2);
        let mpich = |name: &str| (name == "MPI_LOCALNRANKS").then(|| "3".to_string());
        assert_eq!(ranks_on_this_machine(&config, mpich), 3);
        config.parallel.engine = EngineKind::Threads;
        config.train.device = Device::Wgpu;
        assert_eq!(ranks_on_this_machine(&config, |_| None), 1);
    }
}
