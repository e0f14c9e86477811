//! The checks that need more than one process or a fresh one: the
//! torchrun-style rendezvous (with a world of one in this process, and two
//! child processes meeting over TCP) and a rank that never arrives (in a
//! child, since it leaves an aborted communicator behind). Children are this
//! executable again, with [`CHILD_ARG`] or [`NEVER_ARRIVES_ARG`].

use std::time::{Duration, Instant};

use super::checks::{collectives, outcome};
use super::{CHILD_ARG, Check, NEVER_ARRIVES_ARG};
use crate::nccl::NcclEngine;
use crate::{Buffer, Communicator, ReduceOp};

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29517)
}

/// The torchrun-style start with a world of one.
pub(super) fn rendezvous_one() -> Check {
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
pub(super) fn child() -> Result<(), String> {
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
pub(super) fn in_children(name: &str, children: &[ChildSpec], limit: Duration) -> Check {
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
pub(super) fn two_processes() -> Check {
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
pub(super) fn never_arrives_isolated() -> Check {
    in_children(
        "2rank/peer_never_arrives_fails_within_timeout",
        &[(vec![NEVER_ARRIVES_ARG], vec![])],
        Duration::from_secs(60),
    )
}

/// Rank 1 never arrives: rank 0's collective must fail within the timeout,
/// not hang.
pub(super) fn never_arrives() -> Check {
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
