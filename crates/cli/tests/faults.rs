//! The faults of issue 14 ("What was seen") through the `mics` binary, one
//! test (or a few) per bullet: corrupt exports, oversized configs, ENOSPC
//! (injected with `MICS_FAULT_INJECT`, and for real on a small tmpfs when
//! the tests run as root), a peer's failure, a broken pipe, signals, stale
//! partial checkpoints, `checkpoint_keep` and a hung rank. The library's
//! side (corrupt checkpoints, edited indexes, NaNs, settings, re-sharding)
//! is `crates/train/tests/faults.rs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mics_test_support::tensor_range;

fn mics() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mics"));
    cmd.env_remove("MICS_FAULT_INJECT");
    cmd
}

fn run(args: &[&str], fault: Option<&str>) -> Output {
    let mut cmd = mics();
    cmd.args(args);
    if let Some(fault) = fault {
        cmd.env("MICS_FAULT_INJECT", fault);
    }
    cmd.output().expect("running the mics binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// The `error: ...` lines of stderr: exactly one, no panic trace; returns it.
fn one_error_line(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("thread '"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "not one error line:\n{stderr}");
    errors[0].to_string()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("mics-cli-faults-{}", std::process::id()))
        .join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The corpus of `mics_test_support::write_byte_corpus` (~8 KB of
/// Shakespeare and `bytes.json`, 257 ids), written once per test binary.
fn corpus() -> &'static Path {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = scratch("corpus");
        mics_test_support::write_byte_corpus(&dir);
        dir
    })
}

/// A tiny GPT-2 config training into `dir/run` (world 2, p = 2), written
/// to `dir/train.toml`; `tokenizer` is `bytes` (257 ids) or `gpt2`.
fn write_config(dir: &Path, steps: u64, tokenizer: &str, extra: &str) -> PathBuf {
    let tokenizer = match tokenizer {
        "bytes" => corpus().join("bytes.json").display().to_string(),
        other => other.to_string(),
    };
    let text = format!(
        r#"[model]
type = "gpt2"
layers = 2
hidden = 32
heads = 2

[data]
corpus = "{corpus}"
tokenizer = "{tokenizer}"
dataset = "{dataset}"
seq_len = 16
val_fraction = 0.2

[train]
steps = {steps}
micro_batch = 2
lr = 0.01
eval_batches = 1
log_every = 1000
{extra}

[parallel]
world = 2
partition_size = 2

[output]
dir = "{out}"
metrics = "{metrics}"
"#,
        corpus = corpus().join("texts").display(),
        dataset = dir.join("data").display(),
        out = dir.join("run").display(),
        metrics = dir.join("metrics.jsonl").display(),
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train_args(config: &Path) -> Vec<String> {
    vec![
        "train".into(),
        "--config".into(),
        config.display().to_string(),
    ]
}

fn s(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// ---- Corruption: flipped bytes in an exported model.safetensors ----

#[test]
fn flipped_bytes_in_an_export_fail_logits_and_generate_and_no_verify_skips() {
    let dir = scratch("export");
    let config = write_config(&dir, 2, "bytes", "");
    assert_success(&run(&s(&train_args(&config)), None));
    let hf = dir.join("hf");
    let exported = run(
        &[
            "export",
            "--checkpoint",
            dir.join("run").to_str().unwrap(),
            "--out",
            hf.to_str().unwrap(),
        ],
        None,
    );
    assert_success(&exported);
    let logits = |extra: &[&str]| {
        let mut args = vec!["logits", "--model", hf.to_str().unwrap(), "--ids", "1,2,3"];
        args.extend_from_slice(extra);
        run(&args, None)
    };
    let clean = logits(&[]);
    assert_success(&clean);
    let model = hf.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let tensor = "transformer.wte.weight";
    let range = tensor_range(&bytes, tensor);
    for b in &mut bytes[range.start + 400..range.start + 404] {
        *b ^= 0x5a;
    }
    std::fs::write(&model, bytes).unwrap();
    let line = one_error_line(&logits(&[]));
    assert!(
        line.contains("model.safetensors") && line.contains(tensor),
        "{line}"
    );
    let line = one_error_line(&run(
        &[
            "generate",
            "--model",
            hf.to_str().unwrap(),
            "--prompt",
            "To be",
            "--max-new-tokens",
            "2",
        ],
        None,
    ));
    assert!(line.contains(tensor), "{line}");
    // --no-verify: the flipped logits, exit 0.
    let skipped = logits(&["--no-verify"]);
    assert_success(&skipped);
    assert_ne!(skipped.stdout, clean.stdout);
}

// ---- Oversized configs abort ----

#[test]
fn oversized_configs_end_in_one_error_line_naming_the_key_not_sigabrt() {
    let dir = scratch("oversized");
    let config = write_config(&dir, 2, "bytes", "");
    for (flag, value, key) in [
        ("--micro-batch", "1000000000000", "train.micro_batch"),
        ("--hidden", "1000000000", "model.hidden"),
        ("--seq-len", "100000000", "data.seq_len"),
        ("--layers", "100000", "model.layers"),
    ] {
        let started = Instant::now();
        let mut args = train_args(&config);
        args.extend([flag.to_string(), value.to_string()]);
        let output = run(&s(&args), None);
        let line = one_error_line(&output);
        assert!(
            line.contains(key) && line.contains("needs about"),
            "{flag}: {line}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{flag}: {:?}",
            started.elapsed()
        );
    }
}

// ---- Wrong file named (ENOSPC) ----

#[test]
fn enospc_copying_the_tokenizer_names_the_destination_and_removes_the_partial() {
    let dir = scratch("enospc-tokenizer");
    let config = write_config(&dir, 2, "bytes", "");
    let output = run(&s(&train_args(&config)), Some("enospc:tokenizer.json"));
    let line = one_error_line(&output);
    let partial = dir.join("run/checkpoints/.step-000002.partial");
    assert!(
        line.contains(&partial.join("tokenizer.json").display().to_string()),
        "{line}"
    );
    assert!(line.contains("No space left"), "{line}");
    assert!(
        !line.contains(&dir.join("data").display().to_string()),
        "names the source: {line}"
    );
    assert!(!partial.exists(), "the partial checkpoint was left behind");
}

#[test]
fn enospc_writing_a_rank_file_names_it_once() {
    let dir = scratch("enospc-rank");
    let config = write_config(&dir, 2, "bytes", "");
    let output = run(
        &s(&train_args(&config)),
        Some("enospc:rank-00001.safetensors"),
    );
    let line = one_error_line(&output);
    let file = dir.join("run/checkpoints/.step-000002.partial/rank-00001.safetensors");
    assert_eq!(
        line.matches(&file.display().to_string()).count(),
        1,
        "{line}"
    );
    assert!(!file.parent().unwrap().exists());
}

/// A tmpfs of `bytes` mounted at `at`, unmounted when dropped; `None`
/// (with a message) where mounting is not possible.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs(at.to_path_buf())),
            _ => {
                eprintln!(
                    "skipped: cannot mount a tmpfs at {} (needs root); the ENOSPC paths are \
                     covered by MICS_FAULT_INJECT above",
                    at.display()
                );
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A real full disk: a tmpfs that holds the rank files but not the GPT-2
/// tokenizer (1.3 MB), then one that does not hold the rank files.
#[test]
fn a_full_tmpfs_names_the_destination_and_keeps_nothing_partial() {
    let dir = scratch("tmpfs");
    let config = write_config(&dir, 2, "gpt2", "");
    // The sizes of a checkpoint of this config, on an ordinary disk.
    let probe = dir.join("probe");
    let mut args = train_args(&config);
    args.extend(["--out".into(), probe.display().to_string()]);
    assert_success(&run(&s(&args), None));
    let ckpt = probe.join("checkpoints/step-000002");
    let size = |name: &str| std::fs::metadata(ckpt.join(name)).unwrap().len();
    let ranks = size("rank-00000.safetensors") + size("rank-00001.safetensors");
    let tokenizer = size("tokenizer.json");
    assert!(tokenizer > 1_000_000, "{tokenizer}");

    for (label, bytes, culprit) in [
        ("tokenizer", ranks + tokenizer / 2, "tokenizer.json"),
        ("rank file", ranks / 4, "rank-0000"),
    ] {
        let mount = dir.join(format!("full-{}", label.replace(' ', "-")));
        let Some(_tmpfs) = Tmpfs::mount(&mount, bytes.div_ceil(4096) * 4096) else {
            return;
        };
        let mut args = train_args(&config);
        args.extend(["--out".into(), mount.join("run").display().to_string()]);
        let line = one_error_line(&run(&s(&args), None));
        let partial = mount.join("run/checkpoints/.step-000002.partial");
        assert!(
            line.contains(&partial.display().to_string()) && line.contains(culprit),
            "{label}: {line}"
        );
        assert!(line.contains("No space left"), "{label}: {line}");
        assert!(
            !partial.exists(),
            "{label}: the partial checkpoint was left"
        );
    }
}

// ---- A peer's failure shows as a panic ----

#[test]
fn a_failed_metrics_write_on_rank_0_is_one_error_line_without_a_panic_trace() {
    let dir = scratch("metrics");
    let config = write_config(&dir, 4, "bytes", "");
    let output = run(&s(&train_args(&config)), Some("metrics-write:2"));
    let line = one_error_line(&output);
    assert!(
        line.contains("rank 0") && line.contains("metrics.jsonl"),
        "{line}"
    );
}

// ---- Broken pipe ----

#[test]
fn a_broken_pipe_ends_mics_logits_quietly() {
    let model = mics_hub::assets::asset_dir("tiny-gpt2")
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-assets)"))
        .join("hub");
    // Three rows of 50257 logits: far more than a pipe buffers.
    let mut child = mics()
        .args([
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "1,2,3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // `head -c 10` has what it wanted and closes the pipe (dropped above).
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.trim().is_empty(), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        let status = output.status;
        assert!(
            status.success() || status.code() == Some(141) || status.signal() == Some(13),
            "{status:?}"
        );
    }
}

// ---- Signals and disk use ----

/// Waits for `child` up to `limit`; kills it (and fails) past that.
fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `mics train` with `fault` and waits until it has written
/// `lines` metrics lines.
fn start(config: &Path, extra: &[&str], fault: &str, metrics: &Path, lines: usize) -> Child {
    let mut cmd = mics();
    cmd.args(s(&train_args(config)))
        .args(extra)
        .env("MICS_FAULT_INJECT", fault)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    loop {
        let done = std::fs::read_to_string(metrics)
            .map(|t| t.lines().count() >= lines)
            .unwrap_or(false);
        if done {
            return child;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("ended before training: {status:?}\n{err}");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The child's stderr without the line of the dataset's preparation.
fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err.lines()
        .filter(|l| !l.starts_with("preparing "))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn losses(output: &Output) -> Vec<f64> {
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)));
    summary["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn sigterm_stops_every_rank_after_its_step_with_a_checkpoint_and_status_143() {
    let dir = scratch("sigterm");
    let steps = 24;
    let config = write_config(&dir, steps, "bytes", "min_lr = 0.01");
    let metrics = dir.join("metrics.jsonl");
    let mut child = start(&config, &[], "slow-steps:150", &metrics, 2);
    signal(&child, "TERM");
    let status = wait(&mut child, Duration::from_secs(60));
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(143), "{status:?}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let step: u64 = lines[0]
        .strip_prefix("stopped by SIGTERM after step ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!((2..steps).contains(&step), "{stderr}");
    let checkpoints = dir.join("run/checkpoints");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{step:06}"));
    assert!(lines[0].contains(&format!("step-{step:06}")), "{stderr}");

    // Resuming continues exactly where the uninterrupted run would be.
    let mut args = train_args(&config);
    args.extend(["--resume".into(), dir.join("run").display().to_string()]);
    args.push("--json".into());
    let resumed = run(&s(&args), None);
    assert_success(&resumed);
    let mut args = train_args(&config);
    args.extend([
        "--out".into(),
        dir.join("whole").display().to_string(),
        "--metrics".into(),
        dir.join("whole.jsonl").display().to_string(),
        "--json".into(),
    ]);
    let whole = run(&s(&args), None);
    assert_success(&whole);
    assert_eq!(losses(&resumed)[..], losses(&whole)[step as usize..]);
}

#[test]
fn a_second_sigint_exits_at_once_without_a_checkpoint() {
    let dir = scratch("sigint-twice");
    let config = write_config(&dir, 20, "bytes", "");
    let metrics = dir.join("metrics.jsonl");
    // Steps of 3 s: the first signal waits for the step, the second not.
    let mut child = start(&config, &[], "slow-steps:3000", &metrics, 1);
    signal(&child, "INT");
    std::thread::sleep(Duration::from_millis(300));
    let second = Instant::now();
    signal(&child, "INT");
    let status = wait(&mut child, Duration::from_secs(30));
    assert!(
        second.elapsed() < Duration::from_millis(2000),
        "{:?}",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!dir.join("run/checkpoints/latest").exists());
}

#[test]
fn no_checkpoint_on_signal_stops_without_writing_one() {
    let dir = scratch("no-checkpoint");
    let config = write_config(&dir, 20, "bytes", "");
    let metrics = dir.join("metrics.jsonl");
    let mut child = start(
        &config,
        &["--no-checkpoint-on-signal"],
        "slow-steps:150",
        &metrics,
        1,
    );
    signal(&child, "INT");
    let status = wait(&mut child, Duration::from_secs(60));
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.starts_with("stopped by SIGINT after step ") && stderr.contains("without"),
        "{stderr}"
    );
    assert!(!dir.join("run/checkpoints/latest").exists());
}

#[test]
fn stale_partial_directories_go_when_the_next_checkpoint_commits() {
    let dir = scratch("stale");
    let config = write_config(&dir, 4, "bytes", "checkpoint_every = 2");
    let killed = run(&s(&train_args(&config)), Some("abort-before-commit:4"));
    assert!(!killed.status.success());
    let checkpoints = dir.join("run/checkpoints");
    assert!(checkpoints.join(".step-000004.partial").is_dir());
    // Resumed with another schedule: the next commit is step 3, not 4.
    let mut args = train_args(&config);
    args.extend([
        "--resume".into(),
        dir.join("run").display().to_string(),
        "--steps".into(),
        "3".into(),
        "--checkpoint-every".into(),
        "3".into(),
    ]);
    assert_success(&run(&s(&args), None));
    assert!(checkpoints.join("step-000003/index.json").is_file());
    assert!(!checkpoints.join(".step-000004.partial").exists());
}

#[test]
fn checkpoint_keep_keeps_the_newest() {
    let dir = scratch("keep");
    let config = write_config(&dir, 5, "bytes", "checkpoint_every = 1");
    let mut args = train_args(&config);
    args.extend(["--checkpoint-keep".into(), "2".into()]);
    assert_success(&run(&s(&args), None));
    let mut names: Vec<String> = std::fs::read_dir(dir.join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000004", "step-000005"]);
}

#[test]
fn a_hung_rank_is_named_within_the_failure_timeout_not_the_collective_one() {
    let dir = scratch("hung");
    let config = write_config(&dir, 6, "bytes", "");
    let started = Instant::now();
    let mut args = train_args(&config);
    // The collective timeout stays 300 s.
    args.extend(["--failure-timeout-s".into(), "2".into()]);
    let output = run(&s(&args), Some("hang:1:3"));
    let took = started.elapsed();
    let line = one_error_line(&output);
    assert!(
        line.contains("rank 1") && line.contains("failure_timeout_s"),
        "{line}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
}
