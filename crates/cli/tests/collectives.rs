//! `mics collectives` end to end: the README's main command on small sizes.

use std::process::Command;

fn mics(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mics"))
        .args(args)
        .output()
        .expect("running the mics binary")
}

#[test]
fn collectives_match_the_reference_on_a_hierarchical_topology() {
    let out = mics(&[
        "collectives",
        "--world",
        "8",
        "--ranks-per-node",
        "2",
        "--partition-size",
        "4",
        "--shard-len",
        "1001",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("all results match the single-threaded reference"),
        "{stdout}"
    );
    // One line per rank in the table.
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        8
    );
}

#[test]
fn an_invalid_topology_is_a_one_line_error_and_a_non_zero_exit() {
    let out = mics(&[
        "collectives",
        "--world",
        "8",
        "--ranks-per-node",
        "4",
        "--partition-size",
        "3",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("partition size (3) must divide the world size (8)"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
