//! Failure scenarios, each of which must end the job with a non-zero status
//! rather than hang, and a small bench.

use std::time::{Duration, Instant};

use mics_comm::mpi::{MpiComm, MpiEngine};
use mics_comm::{Collectives, Communicator, ReduceOp};

fn init(timeout: Duration) -> MpiComm {
    MpiEngine::new().timeout(timeout).init().expect("MPI init")
}

pub fn exit_early() -> i32 {
    let world = init(Duration::from_secs(60));
    let _ = world.all_gather(vec![1.0f32; 4]).wait();
    if world.rank() == 1 {
        eprintln!("rank 1: exiting without finalising MPI");
        std::process::exit(3);
    }
    let result = world.barrier().wait();
    eprintln!("rank {}: barrier returned {result:?}", world.rank());
    0
}

pub fn hang() -> i32 {
    let world = init(Duration::from_secs(3));
    let _ = world.all_gather(vec![1.0f32; 4]).wait();
    if world.rank() == 1 {
        eprintln!("rank 1: never arriving at the barrier");
        std::thread::sleep(Duration::from_secs(120));
    }
    let result = world.barrier().wait();
    eprintln!("rank {}: barrier returned {result:?}", world.rank());
    0
}

pub fn wait_timeout() -> i32 {
    let world = init(Duration::from_secs(60));
    let _ = world.all_gather(vec![1.0f32; 4]).wait();
    if world.rank() == 1 {
        eprintln!("rank 1: never arriving at the barrier");
        std::thread::sleep(Duration::from_secs(120));
    }
    let result = world.barrier().wait_timeout(Duration::from_secs(2));
    eprintln!("rank {}: wait returned {result:?}", world.rank());
    std::thread::sleep(Duration::from_secs(30));
    0
}

pub fn panic_rank() -> i32 {
    let world = init(Duration::from_secs(60));
    let _ = world.all_gather(vec![1.0f32; 4]).wait();
    if world.rank() == 2 {
        panic!("rank 2 panics while holding its communicator");
    }
    let result = world.barrier().wait();
    eprintln!("rank {}: barrier returned {result:?}", world.rank());
    0
}

pub fn bench() -> i32 {
    let world = init(Duration::from_secs(120));
    let (rank, p) = (world.rank(), world.size());
    for mib in [1usize, 16] {
        let total = mib << 18; // f32 elements of the gathered message
        let reps = 5;
        let time = |f: &dyn Fn() -> bool| {
            let _ = world.barrier().wait();
            let t = Instant::now();
            let ok = (0..reps).all(|_| f());
            (t.elapsed().as_secs_f64() / reps as f64, ok)
        };
        let (ag, ok1) = time(&|| world.all_gather(vec![1.0f32; total / p]).wait().is_ok());
        let (rs, ok2) = time(&|| {
            world
                .reduce_scatter(vec![1.0f32; total], ReduceOp::Sum)
                .wait()
                .is_ok()
        });
        let (ar, ok3) = time(&|| {
            world
                .all_reduce(vec![1.0f32; total], ReduceOp::Sum)
                .wait()
                .is_ok()
        });
        if rank == 0 {
            let gbps = |s: f64| (mib as f64 / 1024.0) / s;
            println!(
                "{p} ranks, {mib} MiB: all_gather {:.1} ms ({:.2} GiB/s), reduce_scatter {:.1} ms \
                 ({:.2} GiB/s), all_reduce {:.1} ms ({:.2} GiB/s){}",
                ag * 1e3,
                gbps(ag),
                rs * 1e3,
                gbps(rs),
                ar * 1e3,
                gbps(ar),
                if ok1 && ok2 && ok3 { "" } else { " (errors)" }
            );
        }
    }
    0
}
