//! `mics gpu-bench` without a GPU: the same training loop on the CPU (NdArray,
//! tiny GPT-2) for both backends, and the clear error of a CUDA run on a
//! machine without CUDA (or of a binary built without it).

use std::process::Command;

use serde_json::Value;

fn mics(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mics"))
        .args(args)
        .output()
        .expect("running the mics binary")
}

fn cpu_run(backend: &str) -> Value {
    let out = mics(&[
        "gpu-bench",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--backend",
        backend,
        "--warmup",
        "1",
        "--steps",
        "2",
        "--micro-batch",
        "2",
        "--seq",
        "16",
        "--peak-tflops",
        "1",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("valid JSON")
}

const KEYS: [&str; 24] = [
    "bench",
    "part",
    "backend",
    "backend_name",
    "device",
    "dtype",
    "model",
    "seq",
    "micro_batch",
    "tokens_per_step",
    "params",
    "flops_per_token",
    "warmup_steps",
    "timed_steps",
    "step_s_mean",
    "step_s_median",
    "tokens_per_s",
    "achieved_tflops",
    "mfu",
    "losses",
    "loss_first",
    "loss_last",
    "loss_finite",
    "peak_device_used_gib",
];

fn check(report: &Value, backend: &str) {
    for key in KEYS {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["part"], backend);
    assert_eq!(report["backend"], backend);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["model"], "tiny");
    assert_eq!(report["tokens_per_step"], 32);
    assert_eq!(report["timed_steps"], 2);
    assert_eq!(report["warmup_steps"], 1);
    assert_eq!(report["loss_finite"], true);
    let losses = report["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    // A fresh model on a vocabulary of 256: about ln(256) = 5.5.
    let first = report["loss_first"].as_f64().unwrap();
    assert!((4.5..6.5).contains(&first), "{report}");
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    // 6 N + 12 L T d with N = params - n_positions * d.
    let n = report["params"].as_f64().unwrap() - 32.0 * 64.0;
    let flops = 6.0 * n + 12.0 * 2.0 * 16.0 * 64.0;
    assert_eq!(report["flops_per_token"].as_f64().unwrap(), flops);
    assert!(report["mfu"].as_f64().unwrap() > 0.0);
    // No device memory on the CPU.
    assert!(report["peak_device_used_gib"].is_null());
}

#[test]
fn plain_burn_trains_the_tiny_model_on_the_cpu() {
    let report = cpu_run("burn");
    check(&report, "burn");
    assert_eq!(report["dtype"], "f32");
}

#[test]
fn mics_at_world_one_trains_the_tiny_model_on_the_cpu_like_plain_burn() {
    let mics = cpu_run("mics");
    check(&mics, "mics");
    assert_eq!(mics["mics"]["world"], 1);
    assert!(mics["mics"]["gathers_per_step"].as_u64().unwrap() > 0);
    // Same seed, same batches, same AdamW: the first loss is the same model's.
    let burn = cpu_run("burn");
    let (a, b) = (
        mics["loss_first"].as_f64().unwrap(),
        burn["loss_first"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-3, "mics {a} vs burn {b}");
}

/// A CUDA run where CUDA cannot start (no driver here, or a binary built
/// without `--features cuda`) is one clear error line and exit status 1, and
/// with `--json` one JSON line carrying the error.
#[test]
fn cuda_without_cuda_is_a_clear_error() {
    let out = mics(&[
        "gpu-bench",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // A machine with a working GPU: the real benchmark ran.
        let report: Value = serde_json::from_str(stdout.trim()).expect("valid JSON");
        assert_eq!(report["device"], "cuda");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    let line = error_lines[0];
    if cfg!(feature = "cuda") {
        assert!(
            line.contains("libcuda.so")
                || line.contains("libnvrtc.so")
                || line.contains("CUDA_PATH")
                || line.contains("no CUDA device"),
            "{line}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    } else {
        assert!(line.contains("rebuild with"), "{line}");
    }
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(report["part"], "burn");
    assert!(report["error"].as_str().unwrap().len() > 20, "{report}");
}

#[test]
fn the_nccl_check_without_cuda_is_a_clear_error() {
    let out = mics(&["gpu-bench", "--nccl", "--json"]);
    if out.status.success() {
        return; // a GPU machine
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(report["part"], "nccl");
    let error = report["error"].as_str().unwrap();
    if cfg!(feature = "cuda") {
        assert!(
            error.contains("libcuda.so") || error.contains("libnccl.so"),
            "{error}"
        );
    } else {
        assert!(error.contains("rebuild with"), "{error}");
    }
}
