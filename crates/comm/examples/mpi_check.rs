//! Checks the MPI engine on OpenMPI; `scripts/test-mpi` runs it.
//!
//! ```text
//! cargo build -p mics-comm --features mpi --example mpi_check
//! MICS_RANKS_PER_NODE=2 mpirun -np 4 --oversubscribe target/debug/examples/mpi_check
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

#[cfg(feature = "mpi")]
fn main() {
    std::process::exit(check::main());
}

#[cfg(not(feature = "mpi"))]
fn main() {
    eprintln!("mpi_check needs the MPI engine: build it with `--features mpi` (scripts/test-mpi)");
    std::process::exit(2);
}

#[cfg(feature = "mpi")]
mod check {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use half::{bf16, f16};
    use mics_comm::mpi::{MpiComm, MpiEngine};
    use mics_comm::{
        Buffer, CollectiveKind, Collectives, CommError, Communicator, Element, Fingerprint,
        MicsGroups, ReduceOp, Sharding, ThreadsEngine, Topology, Work, all_gather_unpadded,
        reduce_scatter_padded,
    };

    /// Pass/fail of every check on this rank, in a fixed order.
    struct Checks {
        rank: usize,
        results: Vec<(String, bool)>,
    }

    impl Checks {
        fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl FnOnce() -> String) {
            let name = name.into();
            if !ok {
                eprintln!("rank {}: FAIL {name}: {}", self.rank, detail());
            }
            self.results.push((name, ok));
        }
    }

    pub fn main() -> i32 {
        let mode = std::env::args().nth(1).unwrap_or_default();
        match mode.as_str() {
            "" | "suite" => suite(),
            "exit-early" => exit_early(),
            "hang" => hang(),
            "wait-timeout" => wait_timeout(),
            "panic" => panic_rank(),
            "bench" => bench(),
            other => {
                eprintln!("mpi_check: unknown mode {other:?}");
                2
            }
        }
    }

    fn suite() -> i32 {
        let started = Instant::now();
        let world = match MpiEngine::new().timeout(Duration::from_secs(120)).init() {
            Ok(world) => Arc::new(world),
            Err(err) => {
                eprintln!("mpi_check: MPI init failed: {err}");
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
            collectives::<f32>(&world, &mut c, len);
            collectives::<bf16>(&world, &mut c, len);
            collectives::<f16>(&world, &mut c, len);
        }
        non_blocking(&world, &mut c);
        deferred(&world, &mut c);
        mismatches(&world, &mut c);
        splits(&world, &mut c);
        byte_counters(&world, &mut c);
        if p == 4 {
            hierarchical_groups(&world, &mut c);
            two_hop_groups(&world, &mut c);
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

    // ---------------------------------------------------------------------
    // Inputs and the naive reference.

    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Values in [-4, 4) with full mantissas, so that the order of a sum
    /// shows in its rounding.
    fn input<E: Element>(seed: u64, rank: usize, len: usize) -> Vec<E> {
        (0..len)
            .map(|i| {
                let h =
                    splitmix(seed ^ ((rank as u64) << 48) ^ (i as u64).wrapping_mul(0x1000_0001));
                E::from_f32(((h >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0)
            })
            .collect()
    }

    /// Element-wise reduction written out plainly: widen to f32, combine in
    /// rank order, divide for the mean, round once.
    fn reference<E: Element>(inputs: &[Vec<E>], op: ReduceOp) -> Vec<E> {
        let p = inputs.len();
        (0..inputs[0].len())
            .map(|i| {
                let mut acc = inputs[0][i].to_f32();
                for input in &inputs[1..] {
                    let v = input[i].to_f32();
                    acc = match op {
                        ReduceOp::Sum | ReduceOp::Mean => acc + v,
                        ReduceOp::Max => acc.max(v),
                    };
                }
                if op == ReduceOp::Mean {
                    acc /= p as f32;
                }
                E::from_f32(acc)
            })
            .collect()
    }

    fn same_bits<E: Element>(a: &[E], b: &[E]) -> bool {
        a.len() == b.len() && bytemuck::cast_slice::<E, u8>(a) == bytemuck::cast_slice::<E, u8>(b)
    }

    fn describe<E: Element>(got: &Result<Vec<E>, CommError>, want: &[E]) -> String {
        match got {
            Err(err) => format!("error: {err}"),
            Ok(got) if got.len() != want.len() => {
                format!("{} elements, expected {}", got.len(), want.len())
            }
            Ok(got) => {
                let i = (0..got.len())
                    .find(|&i| bytemuck::bytes_of(&got[i]) != bytemuck::bytes_of(&want[i]))
                    .unwrap_or(0);
                format!(
                    "element {i}: got {:?}, expected {:?}",
                    got.get(i),
                    want.get(i)
                )
            }
        }
    }

    const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

    /// Results of one rank for one round of collectives.
    struct Round<E> {
        gathered: Vec<E>,
        scattered: Vec<Vec<E>>,
        reduced: Vec<Vec<E>>,
        broadcast: Vec<E>,
    }

    /// Issues every collective at once (they queue in order), then waits in
    /// reverse order.
    fn round<E: Element, C: Communicator + ?Sized>(
        comm: &C,
        len: usize,
        seed: u64,
        root: usize,
    ) -> Result<Round<E>, CommError> {
        let (rank, p) = (comm.rank(), comm.size());
        let gathered = comm.all_gather(input::<E>(seed, rank, len));
        let scattered: Vec<Work<Vec<E>>> = OPS
            .iter()
            .map(|&op| comm.reduce_scatter(input::<E>(seed + 1, rank, len * p), op))
            .collect();
        let reduced: Vec<Work<Vec<E>>> = OPS
            .iter()
            .map(|&op| comm.all_reduce(input::<E>(seed + 2, rank, len), op))
            .collect();
        let mine = if rank == root {
            input::<E>(seed + 3, rank, len)
        } else {
            vec![E::from_f32(0.0); len]
        };
        let broadcast = comm.broadcast(mine, root);
        let broadcast = broadcast.wait()?;
        let mut reduced_out = Vec::new();
        for w in reduced.into_iter().rev() {
            reduced_out.push(w.wait()?);
        }
        reduced_out.reverse();
        let mut scattered_out = Vec::new();
        for w in scattered.into_iter().rev() {
            scattered_out.push(w.wait()?);
        }
        scattered_out.reverse();
        Ok(Round {
            gathered: gathered.wait()?,
            scattered: scattered_out,
            reduced: reduced_out,
            broadcast,
        })
    }

    fn collectives<E: Element>(world: &Arc<MpiComm>, c: &mut Checks, len: usize) {
        let (rank, p) = (world.rank(), world.size());
        let seed = 1000 * len as u64 + E::DTYPE.size() as u64 + E::DTYPE.to_string().len() as u64;
        let root = len % p;
        let name = |what: &str| format!("{} len {len}: {what}", E::DTYPE);
        let got = round::<E, _>(world.as_ref(), len, seed, root);
        let threads = ThreadsEngine::new(p)
            .ranks_per_node(
                world
                    .nodes()
                    .iter()
                    .filter(|&&n| n == world.nodes()[0])
                    .count(),
            )
            .run(|comm| round::<E, _>(&comm, len, seed, root))
            .ok()
            .and_then(|mut all| all.swap_remove(rank).ok())
            .and_then(Result::ok);
        let got = match got {
            Ok(got) => got,
            Err(err) => {
                c.check(name("a round of collectives"), false, || format!("{err}"));
                return;
            }
        };
        let Some(threads) = threads else {
            c.check(name("threads engine round"), false, || "failed".into());
            return;
        };

        let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed, r, len)).collect();
        let want: Vec<E> = all.concat();
        c.check(
            name("all_gather == reference == threads engine"),
            same_bits(&got.gathered, &want) && same_bits(&got.gathered, &threads.gathered),
            || describe(&Ok(got.gathered.clone()), &want),
        );
        let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed + 1, r, len * p)).collect();
        for (i, op) in OPS.iter().enumerate() {
            let want = reference(&all, *op)[rank * len..(rank + 1) * len].to_vec();
            c.check(
                name(&format!(
                    "reduce_scatter {op:?} == reference == threads engine"
                )),
                same_bits(&got.scattered[i], &want)
                    && same_bits(&got.scattered[i], &threads.scattered[i]),
                || describe(&Ok(got.scattered[i].clone()), &want),
            );
        }
        let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed + 2, r, len)).collect();
        for (i, op) in OPS.iter().enumerate() {
            let want = reference(&all, *op);
            c.check(
                name(&format!("all_reduce {op:?} == reference == threads engine")),
                same_bits(&got.reduced[i], &want)
                    && same_bits(&got.reduced[i], &threads.reduced[i]),
                || describe(&Ok(got.reduced[i].clone()), &want),
            );
        }
        let want = input::<E>(seed + 3, root, len);
        c.check(
            name(&format!("broadcast from {root} == root's input")),
            same_bits(&got.broadcast, &want) && same_bits(&got.broadcast, &threads.broadcast),
            || describe(&Ok(got.broadcast.clone()), &want),
        );
    }

    // ---------------------------------------------------------------------

    fn non_blocking(world: &Arc<MpiComm>, c: &mut Checks) {
        let (rank, p) = (world.rank(), world.size());
        let synced = world.barrier().wait();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let t = Instant::now();
        let mut work = world.all_gather(vec![rank as f32; 1 << 16]);
        let issued = t.elapsed();
        let ready_at_once = work.is_ready();
        let result = work.wait();
        let ok = synced.is_ok()
            && result
                .as_ref()
                .is_ok_and(|v| v.len() == p << 16 && v[(p - 1) << 16] == (p - 1) as f32)
            && (rank == 1 || (issued < Duration::from_millis(100) && !ready_at_once));
        c.check(
            "issuing a collective returns at once; it completes when the late rank arrives",
            ok,
            || {
                format!(
                    "issue took {issued:?}, ready at once: {ready_at_once}, result ok: {}",
                    result.is_ok()
                )
            },
        );
    }

    fn deferred(world: &Arc<MpiComm>, c: &mut Checks) {
        let (rank, p) = (world.rank(), world.size());
        // Chained on an earlier collective of another communicator.
        let dup = world.split_mpi(0, rank).expect("split");
        let first = world.all_gather_buffer(Buffer::F32(vec![rank as f32; 3]));
        let second = dup.all_gather_deferred(first);
        let want: Vec<f32> = (0..p)
            .flat_map(|_| (0..p).flat_map(|r| [r as f32; 3]))
            .collect();
        let got = second.wait();
        c.check(
            "all_gather_deferred on a collective issued earlier",
            got.as_ref().is_ok_and(|b| *b == Buffer::F32(want.clone())),
            || format!("{got:?}"),
        );

        // A failed input fails the collective on every rank and poisons the
        // communicator on every rank.
        let input = if rank == 1 {
            Work::failed(CommError::InvalidArgument("boom".into()))
        } else {
            Work::ready(Ok(Buffer::F32(vec![1.0; 2])))
        };
        let got = dup.all_gather_deferred(input).wait();
        let ok = match &got {
            Err(CommError::InvalidArgument(m)) => rank == 1 && m == "boom",
            Err(CommError::Engine { message, .. }) => rank != 1 && message.contains("rank 1"),
            _ => false,
        };
        c.check(
            "a failed deferred input fails the gather on every rank",
            ok,
            || format!("{got:?}"),
        );
        let later = dup.barrier().wait();
        c.check(
            "after a failed input the communicator is poisoned on every rank",
            matches!(later, Err(CommError::Poisoned(_))),
            || format!("{later:?}"),
        );
        let world_ok = world.barrier().wait();
        c.check(
            "the poisoned communicator does not affect the world",
            world_ok.is_ok(),
            || format!("{world_ok:?}"),
        );
    }

    fn mismatches(world: &Arc<MpiComm>, c: &mut Checks) {
        let (rank, p) = (world.rank(), world.size());
        let comm = world.split_mpi(0, rank).expect("split");
        let is_mismatch = |r: &Result<Vec<f32>, CommError>, at: usize| matches!(r, Err(CommError::Mismatch { rank, .. }) if *rank == at);
        let last = p - 1;

        let len = if rank == last { 4 } else { 3 };
        let got = comm.all_gather(vec![0.0f32; len]).wait();
        c.check(
            "all_gather with a different length on one rank: Mismatch on every rank",
            is_mismatch(&got, last),
            || format!("{got:?}"),
        );

        let got = if rank == 1 {
            comm.all_gather(vec![bf16::ZERO; 3])
                .wait()
                .map(|_| Vec::new())
        } else {
            comm.all_gather(vec![0.0f32; 3]).wait()
        };
        c.check(
            "all_gather of bf16 on one rank and f32 elsewhere: Mismatch on every rank",
            is_mismatch(&got, 1),
            || format!("{got:?}"),
        );

        let op = if rank == last {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        let got = comm.all_reduce(vec![1.0f32; 5], op).wait();
        c.check(
            "all_reduce with another op on one rank: Mismatch on every rank",
            is_mismatch(&got, last),
            || format!("{got:?}"),
        );

        // Equal lengths, other pieces: only the fingerprint tells them apart.
        let (a, b) = ([7u64, 3], [9u64, 3]);
        let tag = if rank == last {
            Fingerprint::of_pieces([b, a])
        } else {
            Fingerprint::of_pieces([a, b])
        };
        let got = comm.all_gather_with(vec![0.0f32; 6], tag).wait();
        c.check(
            "all_gather of a buffer packed in another order on one rank: Mismatch on every rank",
            is_mismatch(&got, last),
            || format!("{got:?}"),
        );
        let got = comm
            .reduce_scatter_with(vec![1.0f32; 2 * p], ReduceOp::Sum, tag)
            .wait();
        c.check(
            "reduce_scatter of a bucket packed in another order on one rank: Mismatch on every rank",
            is_mismatch(&got, last),
            || format!("{got:?}"),
        );
        let got = comm
            .all_reduce_with(vec![1.0f32; 6], ReduceOp::Sum, tag)
            .wait();
        c.check(
            "all_reduce of a bucket packed in another order on one rank: Mismatch on every rank",
            is_mismatch(&got, last),
            || format!("{got:?}"),
        );
        let same = Fingerprint::of_pieces([a, b]);
        let got = comm.all_gather_with(vec![1.0f32; 6], same).wait();
        c.check(
            "all_gather with matching fingerprints succeeds",
            got.as_ref().is_ok_and(|v| v.len() == 6 * p),
            || format!("{got:?}"),
        );

        let root = usize::from(rank == 1);
        let got = comm.broadcast(vec![1.0f32; 5], root).wait();
        c.check(
            "broadcast with another root on one rank: Mismatch on every rank",
            is_mismatch(&got, 1),
            || format!("{got:?}"),
        );

        let got = if rank == 0 {
            comm.barrier().wait().map(|_| Vec::new())
        } else {
            comm.all_gather(vec![1.0f32; 2]).wait()
        };
        c.check(
            "barrier on rank 0, all_gather elsewhere: Mismatch on every rank",
            is_mismatch(&got, 1),
            || format!("{got:?}"),
        );

        let got = comm
            .reduce_scatter(vec![1.0f32; p + 1], ReduceOp::Sum)
            .wait();
        c.check(
            "reduce_scatter of a length not divisible by p: InvalidArgument on every rank",
            matches!(got, Err(CommError::InvalidArgument(_))),
            || format!("{got:?}"),
        );
        let got = comm.broadcast(vec![1.0f32; 2], p).wait();
        c.check(
            "broadcast from a root outside the group: InvalidArgument on every rank",
            matches!(got, Err(CommError::InvalidArgument(_))),
            || format!("{got:?}"),
        );

        let got = comm.all_gather(vec![rank as f32]).wait();
        let want: Vec<f32> = (0..p).map(|r| r as f32).collect();
        c.check(
            "after mismatches the communicator still works",
            got.as_ref().is_ok_and(|v| *v == want),
            || format!("{got:?}"),
        );
    }

    fn splits(world: &Arc<MpiComm>, c: &mut Checks) {
        let (rank, p) = (world.rank(), world.size());
        // Odd and even ranks, ordered by descending world rank; colors far
        // beyond a C int.
        let color = usize::MAX - rank % 2;
        let sub = world.split(color, p - rank);
        let mut members: Vec<usize> = (0..p).filter(|r| r % 2 == rank % 2).collect();
        members.reverse();
        match sub {
            Ok(sub) => {
                let want_nodes: Vec<usize> = members.iter().map(|&r| world.nodes()[r]).collect();
                c.check(
                    "split by (color, key): membership, order, world ranks and nodes",
                    sub.size() == members.len()
                        && sub.world_ranks() == members
                        && members[sub.rank()] == rank
                        && sub.nodes() == want_nodes,
                    || format!("{sub:?}, expected members {members:?}"),
                );
                let got = sub.all_gather(vec![rank as f32]).wait();
                let want: Vec<f32> = members.iter().map(|&r| r as f32).collect();
                c.check(
                    "all_gather on a split group follows the key order",
                    got.as_ref().is_ok_and(|v| *v == want),
                    || format!("{got:?}, expected {want:?}"),
                );
                let got = sub.all_reduce(vec![rank as f32], ReduceOp::Sum).wait();
                let want = members.iter().sum::<usize>() as f32;
                c.check(
                    "all_reduce on a split group",
                    got.as_ref().is_ok_and(|v| *v == [want]),
                    || format!("{got:?}"),
                );
            }
            Err(err) => c.check("split", false, || format!("{err}")),
        }
        // Singleton groups.
        match world.split(rank, 0) {
            Ok(single) => {
                let got = single.all_reduce(vec![2.5f32, -1.0], ReduceOp::Mean).wait();
                c.check(
                    "a group of one rank",
                    single.size() == 1 && got.as_ref().is_ok_and(|v| *v == [2.5, -1.0]),
                    || format!("{got:?}"),
                );
            }
            Err(err) => c.check("split into singletons", false, || format!("{err}")),
        }
    }

    /// Byte counters against the ring formulas, on a fresh communicator.
    fn byte_counters(world: &Arc<MpiComm>, c: &mut Checks) {
        let (rank, p) = (world.rank(), world.size());
        let comm = world.split_mpi(0, rank).expect("split");
        let nodes = comm.nodes().to_vec();
        let crosses = nodes[rank] != nodes[(rank + 1) % p];
        let p64 = p as u64;
        let len = 96 * p; // divisible by p
        let m = (len * 4) as u64;
        let root = 1 % p;
        let ok = comm.all_gather(vec![1.0f32; len]).wait().is_ok()
            && comm
                .reduce_scatter(vec![1.0f32; len], ReduceOp::Sum)
                .wait()
                .is_ok()
            && comm
                .all_reduce(vec![1.0f32; len], ReduceOp::Sum)
                .wait()
                .is_ok()
            && comm.broadcast(vec![1.0f32; len], root).wait().is_ok()
            && comm.barrier().wait().is_ok();
        let stats = comm.stats();
        let expected = [
            (CollectiveKind::AllGather, (p64 - 1) * m),
            (CollectiveKind::ReduceScatter, (p64 - 1) * m / p64),
            (CollectiveKind::AllReduce, 2 * (p64 - 1) * m / p64),
            (
                CollectiveKind::Broadcast,
                if rank == (root + p - 1) % p { 0 } else { m },
            ),
            (CollectiveKind::Barrier, 0),
        ];
        for (kind, bytes) in expected {
            let k = stats.kind(kind);
            let (intra, inter) = if crosses { (0, bytes) } else { (bytes, 0) };
            c.check(
                format!("byte counters of {kind} follow the ring formula"),
                ok && k.calls == 1 && k.intra_node_bytes == intra && k.inter_node_bytes == inter,
                || format!("{k:?}, expected {intra} intra and {inter} inter bytes"),
            );
        }
    }

    /// Sum over each node of one number per rank.
    fn per_node(world: &Arc<MpiComm>, value: u64) -> Option<Vec<u64>> {
        let all = world.all_gather(vec![value as f32]).wait().ok()?;
        let nodes = world.nodes();
        let n_nodes = nodes.iter().max().map_or(0, |m| m + 1);
        let mut sums = vec![0u64; n_nodes];
        for (r, v) in all.iter().enumerate() {
            sums[nodes[r]] += *v as u64;
        }
        Some(sums)
    }

    /// (N=4, k=2, p=4): the partition group spans both nodes.
    fn hierarchical_groups(world: &Arc<MpiComm>, c: &mut Checks) {
        let rank = world.rank();
        let topology = Topology::new(4, 2, 4).expect("valid topology");
        let groups = match MicsGroups::new(world.clone(), topology) {
            Ok(groups) => groups,
            Err(err) => {
                c.check(
                    "MicsGroups for N=4 k=2 p=4 (set MICS_RANKS_PER_NODE=2)",
                    false,
                    || format!("{err}"),
                );
                return;
            }
        };
        c.check(
            "N=4 k=2 p=4: partition, replication, intra- and inter-node groups",
            groups.partition().world_ranks() == topology.partition_group(rank)
                && groups.replication().world_ranks() == topology.replication_group(rank)
                && groups.intra_node().world_ranks() == topology.intra_node_group(rank)
                && groups.inter_node().world_ranks() == topology.inter_node_group(rank),
            || format!("{groups:?}"),
        );

        // Hierarchical gather == flat gather == reference, bit for bit.
        let shard_len = 1023;
        for seed in [7u64, 8] {
            let mine = input::<bf16>(seed, rank, shard_len);
            let flat = groups.partition().all_gather(mine.clone()).wait();
            let hier = groups.all_gather_partition(mine).wait();
            let want: Vec<bf16> = (0..4)
                .flat_map(|r| input::<bf16>(seed, r, shard_len))
                .collect();
            c.check(
                format!("hierarchical all_gather (bf16, seed {seed}) == flat == reference"),
                hier.as_ref().is_ok_and(|h| same_bits(h, &want))
                    && flat.as_ref().is_ok_and(|f| same_bits(f, &want)),
                || describe(&hier, &want),
            );
        }

        // Bytes across nodes, per node: flat 3/4 of M, hierarchical 1/2.
        let shard_len = 1024;
        let m = (4 * shard_len * 4) as u64;
        let before = groups.partition().stats().inter_node_bytes();
        let flat_ok = groups
            .partition()
            .all_gather(vec![1.0f32; shard_len])
            .wait()
            .is_ok();
        let flat = groups.partition().stats().inter_node_bytes() - before;
        let hier_stats = || {
            let mut s = groups.inter_node().stats();
            s += &groups.intra_node().stats();
            s.inter_node_bytes()
        };
        let before = hier_stats();
        let hier_ok = groups
            .all_gather_partition(vec![1.0f32; shard_len])
            .wait()
            .is_ok();
        let hier = hier_stats() - before;
        let flat_nodes = per_node(world, flat);
        let hier_nodes = per_node(world, hier);
        c.check(
            "flat all_gather sends (p-1)/p = 3/4 of M across nodes, per node",
            flat_ok && flat_nodes.as_deref() == Some(&[3 * m / 4, 3 * m / 4][..]),
            || format!("{flat_nodes:?}, expected {} per node", 3 * m / 4),
        );
        c.check(
            "hierarchical all_gather sends (p-k)/p = 1/2 of M across nodes, per node",
            hier_ok && hier_nodes.as_deref() == Some(&[m / 2, m / 2][..]),
            || format!("{hier_nodes:?}, expected {} per node", m / 2),
        );

        // Uneven shards: numel not divisible by p, padding never leaks.
        let numel = 1001;
        let sharding = Sharding::new(numel, 4);
        let grads: Vec<Vec<f32>> = (0..4).map(|r| input::<f32>(11, r, numel)).collect();
        let shard = reduce_scatter_padded(
            groups.partition().as_ref(),
            grads[rank].clone(),
            sharding,
            ReduceOp::Sum,
        )
        .wait();
        let full = match shard {
            Ok(shard) => all_gather_unpadded(groups.partition().as_ref(), shard, sharding).wait(),
            Err(err) => Err(err),
        };
        let want = reference(&grads, ReduceOp::Sum);
        c.check(
            "uneven shards: reduce_scatter_padded then all_gather_unpadded == reference",
            full.as_ref().is_ok_and(|f| same_bits(f, &want)),
            || describe(&full, &want),
        );
    }

    /// (N=4, k=2, p=2): two-hop gradient sync, partition inside a node,
    /// replication across nodes.
    fn two_hop_groups(world: &Arc<MpiComm>, c: &mut Checks) {
        let rank = world.rank();
        let topology = Topology::new(4, 2, 2).expect("valid topology");
        let groups = match MicsGroups::new(world.clone(), topology) {
            Ok(groups) => groups,
            Err(err) => {
                c.check("MicsGroups for N=4 k=2 p=2", false, || format!("{err}"));
                return;
            }
        };
        let (p, r) = (2usize, 2usize);
        let len = 2 * 257;
        let grads: Vec<Vec<f32>> = (0..4).map(|q| input::<f32>(21, q, len)).collect();
        let shard = groups
            .partition()
            .reduce_scatter(grads[rank].clone(), ReduceOp::Sum);
        let synced = match shard.wait() {
            Ok(shard) => groups
                .replication()
                .all_reduce(shard, ReduceOp::Mean)
                .wait(),
            Err(err) => Err(err),
        };
        // Reference: sum inside each partition group in rank order, then the
        // mean over the replication group in its rank order.
        let part_sums: Vec<Vec<f32>> = (0..r)
            .map(|g| reference(&grads[g * p..(g + 1) * p], ReduceOp::Sum))
            .collect();
        let full = reference(&part_sums, ReduceOp::Mean);
        let chunk = len / p;
        let local = rank % p;
        let want = full[local * chunk..(local + 1) * chunk].to_vec();
        c.check(
            "two-hop sync (N=4 k=2 p=2): partition reduce_scatter, replication all_reduce == reference",
            synced.as_ref().is_ok_and(|s| same_bits(s, &want)),
            || describe(&synced, &want),
        );
        let m = (len * 4) as u64;
        let part = groups
            .partition()
            .stats()
            .kind(CollectiveKind::ReduceScatter);
        let repl = groups.replication().stats().kind(CollectiveKind::AllReduce);
        let shard_bytes = m / p as u64;
        c.check(
            "two-hop bytes: reduce_scatter (p-1)/p·M inside the node, all_reduce 2(r-1)/r of the shard across nodes",
            part.intra_node_bytes == (p as u64 - 1) * m / p as u64
                && part.inter_node_bytes == 0
                && repl.inter_node_bytes == 2 * (r as u64 - 1) * shard_bytes / r as u64
                && repl.intra_node_bytes == 0,
            || format!("partition {part:?}, replication {repl:?}"),
        );
    }

    // ---------------------------------------------------------------------
    // Failure scenarios: each must end the job with a non-zero status.

    fn init(timeout: Duration) -> MpiComm {
        MpiEngine::new().timeout(timeout).init().expect("MPI init")
    }

    fn exit_early() -> i32 {
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

    fn hang() -> i32 {
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

    fn wait_timeout() -> i32 {
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

    fn panic_rank() -> i32 {
        let world = init(Duration::from_secs(60));
        let _ = world.all_gather(vec![1.0f32; 4]).wait();
        if world.rank() == 2 {
            panic!("rank 2 panics while holding its communicator");
        }
        let result = world.barrier().wait();
        eprintln!("rank {}: barrier returned {result:?}", world.rank());
        0
    }

    fn bench() -> i32 {
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
}
