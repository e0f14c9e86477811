//! The NCCL sanity suite, for a GPU machine: the NCCL version loaded, then
//! every collective of the NCCL engine on **one rank** (all-gather, deferred
//! all-gather, reduce-scatter and all-reduce with sum/mean/max, broadcast,
//! barrier, splits, empty and odd lengths up to 2^20+3, f32/bf16/f16, byte
//! counters, the torchrun-style rendezvous with `WORLD_SIZE=1`), each result
//! checked **bit for bit** against the crate's single-process reference
//! ([`crate::concat()`], [`crate::reduce_range`]: the inputs are small multiples of 1/4, exact
//! in every type, so sums and means of one or two ranks are exact). If NCCL
//! is 2.30.3 or newer it also runs **two ranks on the one GPU**
//! (`NCCL_MULTI_RANK_GPU_ENABLE=1`): the same collectives and a size mismatch
//! that must fail on both ranks; with [`Options::child_processes`], two
//! processes meeting over the TCP rendezvous and a rank that never arrives
//! (the other must fail within the timeout).
//!
//! `mics gpu-bench --nccl` and the `nccl_sanity` test binary of this crate
//! (`scripts/nccl-sanity`) run it; [`run`] returns a [`Report`] whose
//! [`Report::json_fields`] both print. The checks themselves are in
//! `sanity/checks.rs`, those that need other processes in
//! `sanity/processes.rs`.

mod checks;
mod processes;

use checks::{all_gather_ms, collectives, mismatch, run_world};
use processes::{child, never_arrives, never_arrives_isolated, rendezvous_one, two_processes};

use super::errors::engine_error;
use super::{ENGINE_LIBRARIES, NcclVersion, check_libraries, device_count, nccl_version};
use crate::CommError;

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
    fn a_plain_run_is_not_a_child() {
        assert_eq!(child_mode(["nccl_sanity".to_string()]), None);
    }
}
