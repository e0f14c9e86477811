//! The NCCL sanity suite ([`mics_comm::nccl::sanity`]) as a test binary for a
//! GPU machine (feature `cuda`, no libtest harness); `scripts/nccl-sanity`
//! builds and runs it:
//!
//! ```text
//! scripts/nccl-sanity --build      # cargo test --release --no-run, copied to target/device/nccl-sanity
//! scripts/nccl-sanity              # on the GPU machine
//! ```
//!
//! The last line of output is one JSON summary; the exit status is 0 only if
//! every check passed. With `--strict` (what the script passes) a machine
//! without CUDA, NCCL or a device is a failure; without it (`cargo test
//! --features cuda` on a CPU machine) the suite says it skipped and passes.
//! It re-runs itself as the child processes of the multi-process checks
//! (`--child`, `--never-arrives`). It lists no tests to `cargo nextest`,
//! which runs only libtest-style binaries.

use std::time::Instant;

use mics_comm::nccl::sanity::{self, Options, json_str};

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    if let Some(code) = sanity::child_mode(std::env::args()) {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // `cargo nextest` asks for libtest's list: none here.
        return 0;
    }
    let strict = args.iter().any(|a| a == "--strict");
    // SAFETY: no other thread has been started yet.
    unsafe { sanity::enable_multi_rank_gpu() };
    let start = Instant::now();
    let options = Options {
        name: "nccl-sanity",
        child_processes: true,
    };
    match sanity::run(&options) {
        Ok(report) => {
            println!(
                "{{\"tool\":\"nccl-sanity\",{},\"wall_s\":{:.1}}}",
                report.json_fields(),
                start.elapsed().as_secs_f64()
            );
            // Threads of a failed or aborted communicator may still sit in
            // NCCL: exit without waiting for them.
            if report.ok() { 0 } else { 1 }
        }
        Err(e) if strict => {
            eprintln!("nccl-sanity: {e}");
            println!(
                "{{\"tool\":\"nccl-sanity\",\"ok\":false,\"error\":{}}}",
                json_str(&e.to_string())
            );
            1
        }
        Err(e) => {
            eprintln!("nccl-sanity: skipped, no GPU to check (--strict makes this a failure): {e}");
            println!(
                "{{\"tool\":\"nccl-sanity\",\"skipped\":{}}}",
                json_str(&e.to_string())
            );
            0
        }
    }
}
