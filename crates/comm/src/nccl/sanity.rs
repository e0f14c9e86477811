//! The NCCL sanity suite, for a GPU machine: the NCCL version loaded, then
//! every collective of the NCCL engine on **one rank** (all-gather, deferred
//! all-gather, reduce-scatter and all-reduce with sum/mean/max, broadcast,
//! barrier, splits, empty and odd lengths up to 2^20+3, f32/bf16/f16, byte
//! counters, the torchrun-style rendezvous with `WORLD_SIZE=1`), each result
//! checked **bit for bit** against the crate's single-process reference
//! ([`concat()`], [`reduce_range`]: the inputs are small multiples of 1/4, exact
//! in every type, so sums and means of one or two ranks are exact). If NCCL
//! is 2.30.3 or newer it also runs **two ranks on the one GPU**
//! (`NCCL_MULTI_RANK_GPU_ENABLE=1`): the same collectives and a size mismatch
//! that must fail on both ranks; with [`Options::child_processes`], two
//! processes meeting over the TCP rendezvous and a rank that never arrives
//! (the other must fail within the timeout).
//!
//! `mics gpu-bench --nccl` and the `nccl_sanity` test binary of this crate
//! (`scripts/nccl-sanity`) run it; [`run`] returns a [`Report`] whose
//! [`Report::json_fields`] both print.

use std::time::{Duration, Instant};

use super::errors::engine_error;
use super::{
    ENGINE_LIBRARIES, NcclComm, NcclEngine, NcclVersion, check_libraries, device_count,
    nccl_version,
};
use crate::{
    Buffer, CollectiveKind, CommError, Communicator, DType, ReduceOp, Work, concat, reduce_range,
};

/// The variable that lets NCCL >= 2.30.3 put several ranks on one GPU.
pub const MULTI_RANK_GPU_ENV: &str = "NCCL_MULTI_RANK_GPU_ENABLE";

/// The first NCCL that runs several ranks on one GPU.
pub const MULTI_RANK_GPU_NCCL: NcclVersion = NcclVersion {
    major: 2,
    minor: 30,
    patch: 3,
};

/// The argument that makes the suite's executable a child process of the
/// two-process rendezvous check ([`child_mode`]).
pub const CHILD_ARG: &str = "--child";

/// The argument that makes the suite's executable run the never-arriving
/// rank check in a child process ([`child_mode`]).
pub const NEVER_ARRIVES_ARG: &str = "--never-arrives";

/// One named check and its outcome (the error says what differed, and on
/// which rank).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// `{ranks}rank/{what}/{dtype}/{len}`, e.g. `2rank/all_gather/bf16/1001`.
    pub name: String,
    /// `Ok` when it passed on every rank.
    pub result: Result<(), String>,
}

impl Check {
    fn new(name: impl Into<String>, result: Result<(), String>) -> Check {
        Check {
            name: name.into(),
            result,
        }
    }
}

/// How to run the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The name that prefixes progress lines on stderr.
    pub name: &'static str,
    /// Also run the checks that start this executable again as child
    /// processes (with [`CHILD_ARG`] or [`NEVER_ARRIVES_ARG`]; its `main`
    /// must hand those to [`child_mode`]): two processes meeting over the
    /// TCP rendezvous, and a rank that never arrives.
    pub child_processes: bool,
}

/// The two-rank part of the suite.
#[derive(Debug, Clone, PartialEq)]
pub enum TwoRanks {
    /// It ran: its checks and the time of a 16 MiB all-gather.
    Ran {
        /// Every check, merged over the two ranks.
        checks: Vec<Check>,
        /// Mean milliseconds of a 16 MiB f32 all-gather (after a warm-up).
        all_gather_16mib_ms: Option<f64>,
    },
    /// It did not run, and why.
    Skipped(String),
}

/// What the suite found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The NCCL that was loaded.
    pub nccl_version: NcclVersion,
    /// CUDA devices visible to this process.
    pub cuda_devices: usize,
    /// Every one-rank check.
    pub one_rank: Vec<Check>,
    /// Mean milliseconds of a 16 MiB f32 all-gather on one rank.
    pub one_rank_all_gather_16mib_ms: Option<f64>,
    /// The two-rank part.
    pub two_ranks: TwoRanks,
}

impl Report {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        let two = match &self.two_ranks {
            TwoRanks::Ran { checks, .. } => checks.as_slice(),
            TwoRanks::Skipped(_) => &[],
        };
        self.one_rank.iter().chain(two).all(|c| c.result.is_ok())
    }

    /// The report as the members of a JSON object (without the braces):
    /// `"ok"`, `"nccl_version"`, `"cuda_devices"`, `"one_rank"` and
    /// `"two_ranks"` (each `{"passed","failed","failures":[{"check","error"}]}`,
    /// or `{"skipped": why}`) and the all-gather times.
    pub fn json_fields(&self) -> String {
        let mut fields = vec![
            format!("\"ok\":{}", self.ok()),
            format!("\"nccl_version\":\"{}\"", self.nccl_version),
            format!("\"cuda_devices\":{}", self.cuda_devices),
            format!("\"one_rank\":{}", section_json(&self.one_rank)),
            format!(
                "\"one_rank_all_gather_16mib_ms\":{}",
                ms_json(self.one_rank_all_gather_16mib_ms)
            ),
        ];
        match &self.two_ranks {
            TwoRanks::Ran {
                checks,
                all_gather_16mib_ms,
            } => {
                fields.push(format!("\"two_ranks\":{}", section_json(checks)));
                fields.push(format!(
                    "\"two_ranks_all_gather_16mib_ms\":{}",
                    ms_json(*all_gather_16mib_ms)
                ));
            }
            TwoRanks::Skipped(why) => {
                fields.push(format!("\"two_ranks\":{{\"skipped\":{}}}", json_str(why)));
            }
        }
        fields.join(",")
    }
}

/// A string as a JSON string literal.
pub fn json_str(s: &str) -> String {
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

fn section_json(checks: &[Check]) -> String {
    let failures: Vec<String> = checks
        .iter()
        .filter_map(|c| {
            c.result.as_ref().err().map(|e| {
                format!(
                    "{{\"check\":{},\"error\":{}}}",
                    json_str(&c.name),
                    json_str(e)
                )
            })
        })
        .collect();
    format!(
        "{{\"passed\":{},\"failed\":{},\"failures\":[{}]}}",
        checks.len() - failures.len(),
        failures.len(),
        failures.join(",")
    )
}

fn ms_json(ms: Option<f64>) -> String {
    ms.map_or("null".into(), |v| format!("{v:.3}"))
}

/// Sets `NCCL_MULTI_RANK_GPU_ENABLE=1` unless it is set, so that NCCL
/// >= 2.30.3 runs two ranks on one GPU (older ones ignore it).
///
/// # Safety
///
/// Call it before this process starts other threads (it sets an environment
/// variable).
pub unsafe fn enable_multi_rank_gpu() {
    if std::env::var_os(MULTI_RANK_GPU_ENV).is_none() {
        // SAFETY: no other thread exists yet (the caller's contract).
        unsafe { std::env::set_var(MULTI_RANK_GPU_ENV, "1") };
    }
}

/// Runs the suite on GPU 0 (see the module docs). Fails if CUDA or NCCL
/// cannot be loaded or no device is visible; a failed check is a
/// [`Report`] that is not [`Report::ok`].
///
/// Call [`enable_multi_rank_gpu`] first for the two-rank part.
pub fn run(options: &Options) -> Result<Report, CommError> {
    let name = options.name;
    check_libraries(&ENGINE_LIBRARIES)?;
    let nccl_version = nccl_version()?;
    let cuda_devices = device_count()?;
    eprintln!("{name}: NCCL {nccl_version}, {cuda_devices} device(s)");
    if cuda_devices == 0 {
        return Err(engine_error("no CUDA device is visible"));
    }
    let mut one_rank = run_world(&[0], |comm| collectives(&comm));
    one_rank.push(rendezvous_one());
    eprintln!("{name}: 1 rank: {}", section_json(&one_rank));
    let one_rank_all_gather_16mib_ms = all_gather_ms(&[0]);
    let two_ranks = if nccl_version >= MULTI_RANK_GPU_NCCL {
        let mut checks = run_world(&[0, 0], |comm| {
            let mut checks = collectives(&comm);
            checks.extend(mismatch(&comm));
            checks
        });
        let all_gather_16mib_ms = all_gather_ms(&[0, 0]);
        if options.child_processes {
            checks.push(two_processes());
            // Last: it leaves an aborted communicator behind.
            checks.push(never_arrives_isolated());
        }
        eprintln!("{name}: 2 ranks: {}", section_json(&checks));
        TwoRanks::Ran {
            checks,
            all_gather_16mib_ms,
        }
    } else {
        TwoRanks::Skipped(format!(
            "NCCL {nccl_version} < {MULTI_RANK_GPU_NCCL} cannot run two ranks on one GPU"
        ))
    };
    Ok(Report {
        nccl_version,
        cuda_devices,
        one_rank,
        one_rank_all_gather_16mib_ms,
        two_ranks,
    })
}

/// The child-process side of the suite: `Some(exit status)` when `args`
/// (this process's arguments) hold [`CHILD_ARG`] or [`NEVER_ARRIVES_ARG`],
/// after running that part; `None` otherwise.
pub fn child_mode(args: impl IntoIterator<Item = String>) -> Option<i32> {
    let args: Vec<String> = args.into_iter().collect();
    let outcome = if args.iter().any(|a| a == CHILD_ARG) {
        child()
    } else if args.iter().any(|a| a == NEVER_ARRIVES_ARG) {
        never_arrives().result
    } else {
        return None;
    };
    Some(match outcome {
        Ok(()) => {
            println!("CHILD_OK");
            0
        }
        Err(e) => {
            println!("CHILD_FAILED {e}");
            1
        }
    })
}

// ---------------------------------------------------------------------------
// The checks

/// Input of `rank`: small multiples of 1/4, exact in bf16 and f16, so sums
/// and means of one or two ranks are exact in every engine.
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

/// Same type, length and bits; the error names the first difference.
fn compare(got: &Buffer, want: &Buffer) -> Result<(), String> {
    if got.dtype() != want.dtype() || got.len() != want.len() {
        return Err(format!(
            "got {} {} elements, want {} {}",
            got.len(),
            got.dtype(),
            want.len(),
            want.dtype()
        ));
    }
    if got == want {
        return Ok(());
    }
    let (g, w) = (floats(got), floats(want));
    let i = (0..g.len()).find(|&i| g[i] != w[i]).unwrap_or(0);
    Err(format!("element {i}: got {} want {}", g[i], w[i]))
}

fn outcome(work: Work, want: &Buffer) -> Result<(), String> {
    match work.wait() {
        Ok(got) => compare(&got, want),
        Err(e) => Err(e.to_string()),
    }
}

/// The lengths checked for a type: odd ones, and one past a power of two.
fn lengths(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::F32 => &[1, 7, 1000, 1001, (1 << 20) + 3],
        DType::Bf16 | DType::F16 => &[1, 7, 1001, (1 << 20) + 3],
    }
}

/// Every collective on `comm`, checked against the reference built from
/// every rank's inputs.
fn collectives(comm: &NcclComm) -> Vec<Check> {
    let (rank, p) = (comm.rank(), comm.size());
    let mut checks = Vec::new();
    let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
    for dtype in [DType::F32, DType::Bf16, DType::F16] {
        for &len in lengths(dtype) {
            let all: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len, 0)).collect();
            let refs: Vec<&Buffer> = all.iter().collect();
            let name = |what: &str| format!("{p}rank/{what}/{dtype}/{len}");

            let work = comm.all_gather_buffer(all[rank].clone());
            checks.push(Check::new(
                name("all_gather"),
                outcome(work, &concat(&refs)),
            ));

            for op in ops {
                let want = reduce_range(&refs, 0..len, op);
                let work = comm.all_reduce_buffer(all[rank].clone(), op);
                checks.push(Check::new(
                    name(&format!("all_reduce_{op:?}")),
                    outcome(work, &want),
                ));
            }

            // Reduce-scatter needs a multiple of p: use len·p elements.
            let long: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len * p, 1)).collect();
            let long_refs: Vec<&Buffer> = long.iter().collect();
            for op in ops {
                let want = reduce_range(&long_refs, rank * len..(rank + 1) * len, op);
                let work = comm.reduce_scatter_buffer(long[rank].clone(), op);
                checks.push(Check::new(
                    name(&format!("reduce_scatter_{op:?}")),
                    outcome(work, &want),
                ));
            }

            for root in [0, p - 1] {
                let work = comm.broadcast_buffer(all[rank].clone(), root);
                checks.push(Check::new(
                    name(&format!("broadcast_root{root}")),
                    outcome(work, &all[root]),
                ));
            }
        }
    }

    // Empty buffers.
    let empty = Buffer::F32(Vec::new());
    let work = comm.all_gather_buffer(empty.clone());
    checks.push(Check::new(
        format!("{p}rank/all_gather_empty"),
        outcome(work, &empty),
    ));

    // Deferred all-gather of an all-reduce, issued before either runs.
    let all: Vec<Buffer> = (0..p).map(|r| input(DType::F32, r, 5, 2)).collect();
    let refs: Vec<&Buffer> = all.iter().collect();
    let reduced = reduce_range(&refs, 0..5, ReduceOp::Sum);
    let first = comm.all_reduce_buffer(all[rank].clone(), ReduceOp::Sum);
    let chained = comm.all_gather_deferred(first);
    let want = concat(&vec![&reduced; p]);
    checks.push(Check::new(
        format!("{p}rank/all_gather_deferred"),
        outcome(chained, &want),
    ));

    checks.push(Check::new(
        format!("{p}rank/barrier"),
        comm.barrier().wait().map_err(|e| e.to_string()),
    ));

    // Byte counters: one all-gather of 4 KiB more must add (p-1)·4 KiB.
    let before = comm.stats();
    let gathered = comm.all_gather_buffer(Buffer::F32(vec![1.0; 1024])).wait();
    let after = comm.stats();
    let added = after.intra_node_bytes() + after.inter_node_bytes()
        - before.intra_node_bytes()
        - before.inter_node_bytes();
    let calls = after.calls(CollectiveKind::AllGather) - before.calls(CollectiveKind::AllGather);
    checks.push(Check::new(
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
    // Everyone in one group, ranks reversed by key.
    let reversed = comm.split_nccl(0, p - rank).map_err(|e| e.to_string());
    let reversed = reversed.and_then(|sub| {
        if sub.rank() != p - 1 - rank || sub.size() != p {
            return Err(format!("new rank {} of {}", sub.rank(), sub.size()));
        }
        let mine = Buffer::F32(vec![sub.rank() as f32]);
        let want = Buffer::F32((0..p).map(|r| r as f32).collect());
        outcome(sub.all_gather_buffer(mine), &want)
    });
    // One group per rank.
    let single = comm.split_nccl(rank, 0).map_err(|e| e.to_string());
    let single = single.and_then(|sub| {
        if sub.size() != 1 || sub.world_ranks() != [rank] {
            return Err(format!("group {:?}", sub.world_ranks()));
        }
        let mine = input(DType::Bf16, rank, 9, 3);
        outcome(sub.all_reduce_buffer(mine.clone(), ReduceOp::Sum), &mine)
    });
    vec![
        Check::new(format!("{p}rank/split_reversed"), reversed),
        Check::new(format!("{p}rank/split_singletons"), single),
    ]
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
    let want = Buffer::F32(vec![comm.size() as f32; 4]);
    let after = outcome(
        comm.all_reduce_buffer(Buffer::F32(vec![1.0; 4]), ReduceOp::Sum),
        &want,
    );
    vec![
        Check::new("2rank/mismatch_is_an_error", first),
        Check::new("2rank/works_after_mismatch", after),
    ]
}

/// Merges the ranks' checks: a check passes if it passed on every rank.
fn merge(per_rank: Vec<Result<Vec<Check>, String>>) -> Vec<Check> {
    let mut merged: Vec<Check> = Vec::new();
    for (rank, result) in per_rank.into_iter().enumerate() {
        let checks = match result {
            Ok(checks) => checks,
            Err(panic) => vec![Check::new(format!("rank{rank}_panicked"), Err(panic))],
        };
        for check in checks {
            let result = check.result.map_err(|e| format!("rank {rank}: {e}"));
            match merged.iter_mut().find(|c| c.name == check.name) {
                Some(slot) => {
                    if slot.result.is_ok() {
                        slot.result = result;
                    }
                }
                None => merged.push(Check::new(check.name, result)),
            }
        }
    }
    merged
}

fn run_world(devices: &[usize], f: impl Fn(NcclComm) -> Vec<Check> + Sync) -> Vec<Check> {
    let engine = NcclEngine::new().timeout(Duration::from_secs(60));
    match engine.run(devices, f) {
        Ok(per_rank) => merge(per_rank),
        Err(e) => vec![Check::new(
            format!("{}rank/init", devices.len()),
            Err(e.to_string()),
        )],
    }
}

/// Mean time of a 16 MiB f32 all-gather per rank (after one warm-up), for
/// information only.
fn all_gather_ms(devices: &[usize]) -> Option<f64> {
    let engine = NcclEngine::new().timeout(Duration::from_secs(60));
    let per_rank = engine
        .run(devices, |comm| {
            let x = Buffer::F32(vec![1.0; 4 << 20]);
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
            outcome(comm.all_reduce_buffer(x.clone(), ReduceOp::Sum), &x)
        });
    Check::new("1rank/rendezvous_env", result)
}

/// A child of the two-process check: joins over the torchrun variables the
/// parent set, and runs the collectives.
fn child() -> Result<(), String> {
    let comm = NcclEngine::new()
        .timeout(Duration::from_secs(60))
        .from_env()
        .map_err(|e| e.to_string())?;
    let failed: Vec<String> = collectives(&comm)
        .into_iter()
        .filter_map(|c| c.result.err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// A child process: its arguments and extra environment.
type ChildSpec<'a> = (Vec<&'a str>, Vec<(&'a str, String)>);

/// Runs this executable again with `args` and `envs` (one process per entry)
/// and waits up to `limit`: passes if every child prints `CHILD_OK`. A child
/// that hangs is killed, so a stuck NCCL cannot stall the summary.
fn in_children(name: &str, children: &[ChildSpec], limit: Duration) -> Check {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Check::new(name, Err(e.to_string())),
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
        Err(e) => return Check::new(name, Err(e.to_string())),
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
    Check::new(name, result)
}

/// Two processes on the one GPU meeting over the TCP rendezvous.
fn two_processes() -> Check {
    let port = free_port().to_string();
    let child = |rank: usize| {
        (
            vec![CHILD_ARG],
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
        &[(vec![NEVER_ARRIVES_ARG], vec![])],
        Duration::from_secs(60),
    )
}

/// Rank 1 never arrives: rank 0's collective must fail within the timeout,
/// not hang.
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
    Check::new("2rank/peer_never_arrives_fails_within_timeout", result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(two_ranks: TwoRanks) -> Report {
        Report {
            nccl_version: NcclVersion::from_code(22703),
            cuda_devices: 1,
            one_rank: vec![
                Check::new("1rank/barrier", Ok(())),
                Check::new("1rank/stats", Err("2 calls, \"0\" bytes".into())),
            ],
            one_rank_all_gather_16mib_ms: Some(1.25),
            two_ranks,
        }
    }

    #[test]
    fn the_report_is_json_with_every_failure_named() {
        let r = report(TwoRanks::Skipped("NCCL 2.27.3 < 2.30.3".into()));
        assert!(!r.ok());
        assert_eq!(
            r.json_fields(),
            "\"ok\":false,\"nccl_version\":\"2.27.3\",\"cuda_devices\":1,\
             \"one_rank\":{\"passed\":1,\"failed\":1,\"failures\":[{\"check\":\"1rank/stats\",\
             \"error\":\"2 calls, \\\"0\\\" bytes\"}]},\"one_rank_all_gather_16mib_ms\":1.250,\
             \"two_ranks\":{\"skipped\":\"NCCL 2.27.3 < 2.30.3\"}"
        );
        let ran = report(TwoRanks::Ran {
            checks: vec![Check::new("2rank/barrier", Ok(()))],
            all_gather_16mib_ms: None,
        });
        assert!(ran.json_fields().ends_with(
            "\"two_ranks\":{\"passed\":1,\"failed\":0,\"failures\":[]},\
             \"two_ranks_all_gather_16mib_ms\":null"
        ));
    }

    #[test]
    fn a_check_passes_only_if_it_passed_on_every_rank() {
        let merged = merge(vec![
            Ok(vec![
                Check::new("a", Ok(())),
                Check::new("b", Err("off".into())),
            ]),
            Ok(vec![
                Check::new("a", Err("bits".into())),
                Check::new("b", Ok(())),
            ]),
            Err("boom".into()),
        ]);
        assert_eq!(
            merged,
            [
                Check::new("a", Err("rank 1: bits".into())),
                Check::new("b", Err("rank 0: off".into())),
                Check::new("rank2_panicked", Err("rank 2: boom".into())),
            ]
        );
    }

    #[test]
    fn comparisons_are_bit_exact_and_name_the_first_difference() {
        let a = input(DType::Bf16, 1, 9, 0);
        assert_eq!(compare(&a, &a.clone()), Ok(()));
        let mut b = floats(&a);
        b[4] += 0.25;
        let b = Buffer::Bf16(b.into_iter().map(half::bf16::from_f32).collect());
        let err = compare(&b, &a).unwrap_err();
        assert!(err.starts_with("element 4: "), "{err}");
        let err = compare(&Buffer::F32(vec![0.0; 2]), &a).unwrap_err();
        assert_eq!(err, "got 2 f32 elements, want 9 bf16");
    }

    #[test]
    fn a_plain_run_is_not_a_child() {
        assert_eq!(child_mode(["nccl_sanity".to_string()]), None);
    }
}
