//! NCCL sanity check for a GPU machine; `scripts/nccl-sanity` runs it.
//!
//! ```text
//! cargo build --release -p mics-comm --features cuda --example nccl-sanity
//! scripts/nccl-sanity target/release/examples/nccl-sanity
//! ```
//!
//! It prints the NCCL version it loaded (`ncclGetVersion`), then runs every
//! collective of the NCCL engine on **1 rank** (all-gather, deferred
//! all-gather, reduce-scatter and all-reduce with sum/mean/max, broadcast,
//! barrier, split, empty and odd lengths, f32/bf16/f16, byte counters, the
//! torchrun-style rendezvous with `WORLD_SIZE=1`) and checks each result
//! against the crate's single-process reference. If the NCCL found is 2.30.3
//! or newer, it also runs **2 ranks on the one GPU**
//! (`NCCL_MULTI_RANK_GPU_ENABLE=1`): the same collectives, a size mismatch
//! that must fail on both ranks, splits, two processes meeting over the TCP
//! rendezvous, and a rank that never arrives (the other must fail within the
//! timeout). The last line of output is one JSON summary; the exit status is
//! 0 only if every check passed.

#[cfg(feature = "cuda")]
fn main() {
    std::process::exit(sanity::main());
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("nccl-sanity needs the NCCL engine: build it with `--features cuda`");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
mod sanity {
    use std::time::{Duration, Instant};

    use mics_comm::nccl::{self, ENGINE_LIBRARIES, NcclComm, NcclEngine, NcclVersion};
    use mics_comm::{
        Buffer, CollectiveKind, CommError, Communicator, DType, ReduceOp, Work, concat,
        reduce_range,
    };

    type Check = (String, Result<(), String>);

    /// A child process: its arguments and extra environment.
    type ChildSpec<'a> = (Vec<&'a str>, Vec<(&'a str, String)>);

    /// Input of `rank`: small multiples of 1/4, exact in bf16 and f16, so
    /// sums and means of one or two ranks are exact in every engine.
    fn input(dtype: DType, rank: usize, len: usize, salt: usize) -> Buffer {
        let values: Vec<f32> = (0..len)
            .map(|i| ((rank * 7 + i * 3 + salt * 5) % 13) as f32 - 6.0 + 0.25 * rank as f32)
            .collect();
        match dtype {
            DType::F32 => Buffer::F32(values),
            DType::Bf16 => Buffer::Bf16(values.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => Buffer::F16(values.into_iter().map(half::f16::from_f32).collect()),
        }
    }

    fn floats(buffer: &Buffer) -> Vec<f32> {
        match buffer {
            Buffer::F32(v) => v.clone(),
            Buffer::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Buffer::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Same type and length; values equal within `tol` relative (0: bit-exact).
    fn compare(got: &Buffer, want: &Buffer, tol: f32) -> Result<(), String> {
        if got.dtype() != want.dtype() || got.len() != want.len() {
            return Err(format!(
                "got {} {} elements, want {} {}",
                got.len(),
                got.dtype(),
                want.len(),
                want.dtype()
            ));
        }
        if tol == 0.0 {
            return if got == want {
                Ok(())
            } else {
                let (g, w) = (floats(got), floats(want));
                let i = (0..g.len()).find(|&i| g[i] != w[i]).unwrap_or(0);
                Err(format!("element {i}: got {} want {}", g[i], w[i]))
            };
        }
        for (i, (g, w)) in floats(got).iter().zip(floats(want)).enumerate() {
            if (g - w).abs() > tol * w.abs().max(1.0) {
                return Err(format!("element {i}: got {g} want {w}"));
            }
        }
        Ok(())
    }

    fn outcome(work: Work, want: &Buffer, tol: f32) -> Result<(), String> {
        match work.wait() {
            Ok(got) => compare(&got, want, tol),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Every collective on `comm`, checked against the reference built from
    /// every rank's inputs.
    fn collectives(comm: &NcclComm) -> Vec<Check> {
        let (rank, p) = (comm.rank(), comm.size());
        let mut checks = Vec::new();
        let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
        for dtype in [DType::F32, DType::Bf16, DType::F16] {
            let lens: &[usize] = if dtype == DType::F32 {
                &[1, 7, 1000, (1 << 20) + 3]
            } else {
                &[1, 7, 1001]
            };
            for &len in lens {
                let all: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len, 0)).collect();
                let refs: Vec<&Buffer> = all.iter().collect();
                let name = |what: &str| format!("{p}rank/{what}/{dtype}/{len}");

                let work = comm.all_gather_buffer(all[rank].clone());
                checks.push((name("all_gather"), outcome(work, &concat(&refs), 0.0)));

                for op in ops {
                    let want = reduce_range(&refs, 0..len, op);
                    let work = comm.all_reduce_buffer(all[rank].clone(), op);
                    let tol = if op == ReduceOp::Max { 0.0 } else { 1e-6 };
                    checks.push((
                        name(&format!("all_reduce_{op:?}")),
                        outcome(work, &want, tol),
                    ));
                }

                // Reduce-scatter needs a multiple of p: use len·p elements.
                let long: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len * p, 1)).collect();
                let long_refs: Vec<&Buffer> = long.iter().collect();
                for op in ops {
                    let want = reduce_range(&long_refs, rank * len..(rank + 1) * len, op);
                    let work = comm.reduce_scatter_buffer(long[rank].clone(), op);
                    let tol = if op == ReduceOp::Max { 0.0 } else { 1e-6 };
                    checks.push((
                        name(&format!("reduce_scatter_{op:?}")),
                        outcome(work, &want, tol),
                    ));
                }

                for root in [0, p - 1] {
                    let work = comm.broadcast_buffer(all[rank].clone(), root);
                    checks.push((
                        name(&format!("broadcast_root{root}")),
                        outcome(work, &all[root], 0.0),
                    ));
                }
            }
        }

        // Empty buffers.
        let empty = Buffer::F32(Vec::new());
        let work = comm.all_gather_buffer(empty.clone());
        checks.push((
            format!("{p}rank/all_gather_empty"),
            outcome(work, &empty, 0.0),
        ));

        // Deferred all-gather of an all-reduce, issued before either runs.
        let all: Vec<Buffer> = (0..p).map(|r| input(DType::F32, r, 5, 2)).collect();
        let refs: Vec<&Buffer> = all.iter().collect();
        let reduced = reduce_range(&refs, 0..5, ReduceOp::Sum);
        let first = comm.all_reduce_buffer(all[rank].clone(), ReduceOp::Sum);
        let chained = comm.all_gather_deferred(first);
        let want = concat(&vec![&reduced; p]);
        checks.push((
            format!("{p}rank/all_gather_deferred"),
            outcome(chained, &want, 1e-6),
        ));

        checks.push((
            format!("{p}rank/barrier"),
            comm.barrier().wait().map_err(|e| e.to_string()),
        ));

        // Byte counters: one all-gather of 4 KiB more must add (p-1)·4 KiB.
        let before = comm.stats();
        let work = comm.all_gather_buffer(Buffer::F32(vec![1.0; 1024]));
        let gathered = work.wait();
        let after = comm.stats();
        let added = after.intra_node_bytes() + after.inter_node_bytes()
            - before.intra_node_bytes()
            - before.inter_node_bytes();
        let calls =
            after.calls(CollectiveKind::AllGather) - before.calls(CollectiveKind::AllGather);
        checks.push((
            format!("{p}rank/stats"),
            match gathered {
                Err(e) => Err(e.to_string()),
                Ok(_) if calls == 1 && added == 4096 * (p as u64 - 1) => Ok(()),
                Ok(_) => Err(format!("{calls} calls, {added} bytes")),
            },
        ));

        checks.extend(splits(comm));
        checks
    }

    fn splits(comm: &NcclComm) -> Vec<Check> {
        let (rank, p) = (comm.rank(), comm.size());
        let mut checks = Vec::new();
        // Everyone in one group, ranks reversed by key.
        let reversed = comm.split_nccl(0, p - rank).map_err(|e| e.to_string());
        checks.push((
            format!("{p}rank/split_reversed"),
            reversed.and_then(|sub| {
                if sub.rank() != p - 1 - rank || sub.size() != p {
                    return Err(format!("new rank {} of {}", sub.rank(), sub.size()));
                }
                let mine = Buffer::F32(vec![sub.rank() as f32]);
                let want = Buffer::F32((0..p).map(|r| r as f32).collect());
                outcome(sub.all_gather_buffer(mine), &want, 0.0)
            }),
        ));
        // One group per rank.
        let single = comm.split_nccl(rank, 0).map_err(|e| e.to_string());
        checks.push((
            format!("{p}rank/split_singletons"),
            single.and_then(|sub| {
                if sub.size() != 1 || sub.world_ranks() != [rank] {
                    return Err(format!("group {:?}", sub.world_ranks()));
                }
                let mine = input(DType::Bf16, rank, 9, 3);
                outcome(
                    sub.all_reduce_buffer(mine.clone(), ReduceOp::Sum),
                    &mine,
                    0.0,
                )
            }),
        ));
        checks
    }

    /// Two ranks: a length mismatch is an error on both, and the next
    /// collective still works.
    fn mismatch(comm: &NcclComm) -> Vec<Check> {
        let len = 3 + comm.rank();
        let got = comm.all_gather_buffer(Buffer::F32(vec![1.0; len])).wait();
        let first = match got {
            Err(CommError::Mismatch { .. }) => Ok(()),
            other => Err(format!("expected a mismatch error, got {other:?}")),
        };
        let after = comm
            .all_reduce_buffer(Buffer::F32(vec![1.0; 4]), ReduceOp::Sum)
            .wait()
            .map_err(|e| e.to_string())
            .and_then(|b| compare(&b, &Buffer::F32(vec![comm.size() as f32; 4]), 0.0));
        vec![
            ("2rank/mismatch_is_an_error".into(), first),
            ("2rank/works_after_mismatch".into(), after),
        ]
    }

    /// Merges the ranks' checks: a check passes if it passed on every rank.
    fn merge(per_rank: Vec<Result<Vec<Check>, String>>) -> Vec<Check> {
        let mut merged: Vec<Check> = Vec::new();
        for (rank, result) in per_rank.into_iter().enumerate() {
            match result {
                Err(panic) => merged.push((format!("rank{rank}_panicked"), Err(panic))),
                Ok(checks) => {
                    for (name, result) in checks {
                        match merged.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, slot)) => {
                                if slot.is_ok()
                                    && let Err(e) = result
                                {
                                    *slot = Err(format!("rank {rank}: {e}"));
                                }
                            }
                            None => {
                                merged.push((name, result.map_err(|e| format!("rank {rank}: {e}"))))
                            }
                        }
                    }
                }
            }
        }
        merged
    }

    fn run_world(devices: &[usize], f: impl Fn(NcclComm) -> Vec<Check> + Sync) -> Vec<Check> {
        let engine = NcclEngine::new().timeout(Duration::from_secs(60));
        match engine.run(devices, f) {
            Ok(per_rank) => merge(per_rank),
            Err(e) => vec![(format!("{}rank/init", devices.len()), Err(e.to_string()))],
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(29517)
    }

    /// The torchrun-style start with a world of one.
    fn rendezvous_one() -> Check {
        let master = format!("127.0.0.1:{}", free_port());
        let result = NcclEngine::new()
            .timeout(Duration::from_secs(30))
            .rendezvous(&master, 0, 1, 0)
            .map_err(|e| e.to_string())
            .and_then(|comm| {
                let x = Buffer::F32(vec![2.5; 3]);
                outcome(comm.all_reduce_buffer(x.clone(), ReduceOp::Sum), &x, 0.0)
            });
        ("1rank/rendezvous_env".into(), result)
    }

    /// Child process of the two-process test: `--child` with the torchrun
    /// variables set by the parent.
    fn child() -> i32 {
        let result = NcclEngine::new()
            .timeout(Duration::from_secs(60))
            .from_env()
            .map_err(|e| e.to_string())
            .and_then(|comm| {
                let checks = collectives(&comm);
                let failed: Vec<String> = checks
                    .into_iter()
                    .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e}")))
                    .collect();
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed.join("; "))
                }
            });
        match result {
            Ok(()) => {
                println!("CHILD_OK");
                0
            }
            Err(e) => {
                println!("CHILD_FAILED {e}");
                1
            }
        }
    }

    /// Runs this binary again with `args` and `envs` (one process per entry)
    /// and waits up to `limit`: passes if every child prints `CHILD_OK`. A
    /// child that hangs is killed, so a stuck NCCL cannot stall the summary.
    fn in_children(name: &str, children: &[ChildSpec], limit: Duration) -> Check {
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return (name.into(), Err(e.to_string())),
        };
        let spawned: Result<Vec<_>, _> = children
            .iter()
            .map(|(args, envs)| {
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(args);
                for (k, v) in envs {
                    cmd.env(k, v);
                }
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
            })
            .collect();
        let spawned = match spawned {
            Ok(c) => c,
            Err(e) => return (name.into(), Err(e.to_string())),
        };
        let deadline = Instant::now() + limit;
        let mut failures = Vec::new();
        for (i, mut child) in spawned.into_iter().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => {
                        let _ = child.kill();
                        failures.push(format!("process {i} did not finish within {limit:?}"));
                        break;
                    }
                }
            }
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                use std::io::Read;
                let _ = stdout.read_to_string(&mut out);
            }
            let _ = child.wait();
            if !out.contains("CHILD_OK") {
                failures.push(format!("process {i}: {}", out.trim()));
            }
        }
        let result = if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        };
        (name.into(), result)
    }

    /// Two processes on the one GPU meeting over the TCP rendezvous.
    fn two_processes() -> Check {
        let port = free_port().to_string();
        let child = |rank: usize| {
            (
                vec!["--child"],
                vec![
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".to_string()),
                    ("LOCAL_RANK", "0".to_string()),
                    ("MASTER_ADDR", "127.0.0.1".to_string()),
                    ("MASTER_PORT", port.clone()),
                ],
            )
        };
        in_children(
            "2proc/tcp_rendezvous",
            &[child(0), child(1)],
            Duration::from_secs(150),
        )
    }

    /// [`never_arrives`] in a child process.
    fn never_arrives_isolated() -> Check {
        in_children(
            "2rank/peer_never_arrives_fails_within_timeout",
            &[(vec!["--never-arrives"], vec![])],
            Duration::from_secs(60),
        )
    }

    /// Rank 1 never arrives: rank 0's collective must fail within the
    /// timeout, not hang.
    fn never_arrives() -> Check {
        let timeout = Duration::from_secs(3);
        let engine = NcclEngine::new().timeout(timeout);
        let start = Instant::now();
        let result = engine.run(&[0, 0], |comm| {
            if comm.rank() == 0 {
                let got = comm
                    .all_reduce_buffer(Buffer::F32(vec![1.0; 8]), ReduceOp::Sum)
                    .wait();
                let elapsed = start.elapsed();
                // Keep the communicator alive until rank 0 has given up.
                match got {
                    Err(_) if elapsed < timeout * 4 => Ok(()),
                    Err(e) => Err(format!("failed only after {elapsed:?}: {e}")),
                    Ok(_) => Err("completed without its peer".to_string()),
                }
            } else {
                std::thread::sleep(timeout * 2);
                Ok(())
            }
        });
        let result = match result {
            Ok(per_rank) => per_rank
                .into_iter()
                .map(|r| r.and_then(|x| x))
                .collect::<Result<Vec<()>, String>>()
                .map(|_| ()),
            Err(e) => Err(e.to_string()),
        };
        (
            "2rank/peer_never_arrives_fails_within_timeout".into(),
            result,
        )
    }

    fn child_never_arrives() -> i32 {
        match never_arrives().1 {
            Ok(()) => {
                println!("CHILD_OK");
                0
            }
            Err(e) => {
                println!("CHILD_FAILED {e}");
                1
            }
        }
    }

    /// One collective's time (after a warm-up), for information only.
    fn timing(devices: &[usize]) -> Option<f64> {
        let engine = NcclEngine::new().timeout(Duration::from_secs(60));
        let per_rank = engine
            .run(devices, |comm| {
                let x = Buffer::F32(vec![1.0; 4 << 20]); // 16 MiB
                comm.all_gather_buffer(x.clone()).wait().ok()?;
                let t = Instant::now();
                for _ in 0..5 {
                    comm.all_gather_buffer(x.clone()).wait().ok()?;
                }
                Some(t.elapsed().as_secs_f64() / 5.0 * 1e3)
            })
            .ok()?;
        per_rank.into_iter().next()?.ok()?
    }

    fn json_str(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn section(checks: &[Check]) -> String {
        let passed = checks.iter().filter(|(_, r)| r.is_ok()).count();
        let failed: Vec<String> = checks
            .iter()
            .filter_map(|(n, r)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{{\"check\":{},\"error\":{}}}", json_str(n), json_str(e)))
            })
            .collect();
        format!(
            "{{\"passed\":{passed},\"failed\":{},\"failures\":[{}]}}",
            failed.len(),
            failed.join(",")
        )
    }

    fn opt_ms(ms: Option<f64>) -> String {
        ms.map_or("null".into(), |v| format!("{v:.3}"))
    }

    pub fn main() -> i32 {
        // Lets NCCL >= 2.30.3 put two ranks on one GPU (older ones ignore
        // it). SAFETY: set before any other thread exists.
        if std::env::var_os("NCCL_MULTI_RANK_GPU_ENABLE").is_none() {
            unsafe { std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1") };
        }
        if std::env::args().any(|a| a == "--child") {
            return child();
        }
        if std::env::args().any(|a| a == "--never-arrives") {
            return child_never_arrives();
        }
        let start = Instant::now();
        let mut fields: Vec<String> = vec!["\"tool\":\"nccl-sanity\"".into()];
        if let Err(e) = nccl::check_libraries(&ENGINE_LIBRARIES) {
            eprintln!("nccl-sanity: {e}");
            fields.push("\"ok\":false".into());
            fields.push(format!("\"error\":{}", json_str(&e.to_string())));
            println!("{{{}}}", fields.join(","));
            return 1;
        }
        let version = match nccl::nccl_version() {
            Ok(v) => v,
            Err(e) => {
                println!(
                    "{{\"tool\":\"nccl-sanity\",\"ok\":false,\"error\":{}}}",
                    json_str(&e.to_string())
                );
                return 1;
            }
        };
        eprintln!("nccl-sanity: NCCL {version}");
        fields.push(format!("\"nccl_version\":\"{version}\""));
        match nccl::device_count() {
            Ok(n) => fields.push(format!("\"cuda_devices\":{n}")),
            Err(e) => {
                fields.push("\"ok\":false".into());
                fields.push(format!("\"error\":{}", json_str(&e.to_string())));
                println!("{{{}}}", fields.join(","));
                return 1;
            }
        }

        let mut one = run_world(&[0], |comm| collectives(&comm));
        one.push(rendezvous_one());
        eprintln!("nccl-sanity: 1 rank: {}", section(&one));
        let mut all_ok = one.iter().all(|(_, r)| r.is_ok());
        fields.push(format!("\"one_rank\":{}", section(&one)));
        fields.push(format!(
            "\"one_rank_all_gather_16mib_ms\":{}",
            opt_ms(timing(&[0]))
        ));

        let multi = NcclVersion {
            major: 2,
            minor: 30,
            patch: 3,
        };
        if version >= multi {
            let mut two = run_world(&[0, 0], |comm| {
                let mut checks = collectives(&comm);
                checks.extend(mismatch(&comm));
                checks
            });
            let two_ms = timing(&[0, 0]);
            two.push(two_processes());
            // Last: it leaves an aborted communicator behind.
            two.push(never_arrives_isolated());
            eprintln!("nccl-sanity: 2 ranks: {}", section(&two));
            all_ok &= two.iter().all(|(_, r)| r.is_ok());
            fields.push(format!("\"two_ranks\":{}", section(&two)));
            fields.push(format!(
                "\"two_ranks_all_gather_16mib_ms\":{}",
                opt_ms(two_ms)
            ));
        } else {
            fields.push(format!(
                "\"two_ranks\":{}",
                json_str(&format!(
                    "skipped: NCCL {version} < 2.30.3 has no multi-rank-per-GPU support"
                ))
            ));
        }
        fields.insert(1, format!("\"ok\":{all_ok}"));
        fields.push(format!("\"wall_s\":{:.1}", start.elapsed().as_secs_f64()));
        println!("{{{}}}", fields.join(","));
        // Threads of a failed or aborted communicator may still sit in NCCL.
        if all_ok { 0 } else { 1 }
    }
}
