//! In-process collective bandwidth next to a plain memcpy.
//!
//! For a message of `M` bytes (the gathered size for all-gather, each rank's
//! input for reduce-scatter) over `p` ranks, the ranks together write `p·M`
//! bytes (all-gather) or read `p·M` bytes (reduce-scatter). The baseline is one
//! `memcpy` of those `p·M` bytes into a preallocated buffer: the physical
//! limit of moving them through memory. Criterion's throughput is set to
//! `p·M` for all three, so their GiB/s compare directly.
//!
//! Run: `cargo bench -p mics-comm --bench collectives` (add `-- 64MiB` to filter).

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mics_comm::{Collectives, ReduceOp, ThreadComm, ThreadsEngine};

#[derive(Clone, Copy)]
enum Op {
    AllGather,
    ReduceScatter,
}

enum Command {
    /// Allocate and fill the input (not timed).
    Prepare(Op, usize),
    /// Run the collective on the prepared input (timed).
    Go,
}

/// Ranks 1..p run on persistent threads; the benchmark thread is rank 0.
struct Ranks {
    rank0: ThreadComm,
    commands: Vec<Sender<Command>>,
    done: Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

fn prepare(comm: &ThreadComm, op: Op, floats: usize) -> (Op, Vec<f32>) {
    let p = mics_comm::Communicator::size(comm);
    match op {
        Op::AllGather => (op, vec![1.0f32; floats / p]),
        Op::ReduceScatter => (op, vec![1.0f32; floats]),
    }
}

fn run_op(comm: &ThreadComm, (op, input): (Op, Vec<f32>)) {
    let out = match op {
        Op::AllGather => comm.all_gather(input).wait().unwrap(),
        Op::ReduceScatter => comm.reduce_scatter(input, ReduceOp::Sum).wait().unwrap(),
    };
    std::hint::black_box(out);
}

impl Ranks {
    fn new(p: usize) -> Ranks {
        let mut comms = ThreadsEngine::new(p).build().unwrap().into_iter();
        let rank0 = comms.next().unwrap();
        let (done_tx, done) = mpsc::channel();
        let mut commands = Vec::new();
        let mut threads = Vec::new();
        for comm in comms {
            let (tx, rx) = mpsc::channel::<Command>();
            let done_tx = done_tx.clone();
            commands.push(tx);
            threads.push(std::thread::spawn(move || {
                let mut input = None;
                for command in rx {
                    match command {
                        Command::Prepare(op, floats) => input = Some(prepare(&comm, op, floats)),
                        Command::Go => run_op(&comm, input.take().expect("prepared")),
                    }
                    done_tx.send(()).unwrap();
                }
            }));
        }
        Ranks {
            rank0,
            commands,
            done,
            threads,
        }
    }

    fn broadcast(&self, command: impl Fn() -> Command) {
        for tx in &self.commands {
            tx.send(command()).unwrap();
        }
    }

    fn wait_all(&self) {
        for _ in &self.commands {
            self.done.recv().unwrap();
        }
    }

    /// Total time of `iters` collectives, inputs prepared outside the timing.
    fn time(&self, op: Op, floats: usize, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            self.broadcast(|| Command::Prepare(op, floats));
            let input = prepare(&self.rank0, op, floats);
            self.wait_all();
            let start = Instant::now();
            self.broadcast(|| Command::Go);
            run_op(&self.rank0, input);
            self.wait_all();
            total += start.elapsed();
        }
        total
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.commands.clear();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn bandwidth(c: &mut Criterion) {
    for mib in [1usize, 16, 64] {
        let bytes = mib << 20;
        let floats = bytes / 4;
        let mut group = c.benchmark_group(format!("{mib}MiB"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        for p in [2usize, 4, 8] {
            let total = (p * bytes) as u64;
            group.throughput(Throughput::Bytes(total));
            let src = vec![1u8; p * bytes];
            let mut dst = vec![0u8; p * bytes];
            group.bench_function(BenchmarkId::new("memcpy", p), |b| {
                b.iter(|| {
                    dst.copy_from_slice(&src);
                    std::hint::black_box(&dst);
                })
            });
            let ranks = Ranks::new(p);
            group.bench_function(BenchmarkId::new("all_gather", p), |b| {
                b.iter_custom(|iters| ranks.time(Op::AllGather, floats, iters))
            });
            group.bench_function(BenchmarkId::new("reduce_scatter", p), |b| {
                b.iter_custom(|iters| ranks.time(Op::ReduceScatter, floats, iters))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bandwidth);
criterion_main!(benches);
