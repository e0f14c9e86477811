//! `mics train`, `mics export` and `mics generate` through the binary: a run
//! killed while committing a checkpoint, bad inputs, export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn mics(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mics"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("MICS_FAULT_INJECT")
        .output()
        .expect("running the mics binary")
}

fn mics_with_fault(args: &[&str], fault: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mics"))
        .args(args)
        .env("MICS_FAULT_INJECT", fault)
        .output()
        .expect("running the mics binary")
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

/// A fresh scratch directory, unique to this process and `tag`.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("mics-cli-train-{}", std::process::id()))
        .join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two documents of ~6 KB of Shakespeare, written once per test binary.
fn corpus() -> &'static Path {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = scratch("corpus");
        mics_test_support::write_shakespeare(&dir, 60_000..66_000);
        dir
    })
}

/// A tiny GPT-2 config (2 layers, hidden 32, sequences of 16) training on
/// the test corpus into `dir/run`, written to `dir/train.toml`.
fn write_config(dir: &Path, world: usize, p: usize, steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        r#"[model]
type = "gpt2"
layers = 2
hidden = 32
heads = 2

[data]
corpus = "{corpus}"
tokenizer = "gpt2"
seq_len = 16
val_fraction = 0.2

[train]
steps = {steps}
micro_batch = 2
grad_accum = 1
lr = 0.01
eval_batches = 1
{extra}

[parallel]
world = {world}
partition_size = {p}

[output]
dir = "{out}"
"#,
        corpus = corpus().display(),
        out = dir.join("run").display(),
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
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

/// A failure with one `error: ...` line on stderr that contains every one of
/// `needles`, and no panic.
fn assert_one_error_line(output: &Output, needles: &[&str]) {
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "no `{needle}` in: {stderr}");
    }
}

#[test]
fn a_run_killed_while_committing_a_checkpoint_resumes_from_the_previous_one() {
    let dir = scratch("killed");
    let config = write_config(&dir, 2, 2, 10, "checkpoint_every = 5");
    let cfg = config.to_str().unwrap();
    let run = dir.join("run");

    let killed = mics_with_fault(&["train", "--config", cfg], "abort-before-commit:10");
    assert!(!killed.status.success(), "the fault did not fire");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(killed.status.signal(), Some(6), "not SIGABRT: {killed:?}");
    }
    assert!(text(&killed.stderr).contains("MICS_FAULT_INJECT"));
    let checkpoints = run.join("checkpoints");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-000005");
    assert!(!checkpoints.join("step-000010").exists());
    assert!(checkpoints.join("step-000005/index.json").is_file());

    let resumed = mics(
        &[
            "train",
            "--config",
            cfg,
            "--resume",
            run.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_success(&resumed);
    let resumed_losses = losses(&resumed);
    assert_eq!(resumed_losses.len(), 5);
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-000010");
    assert!(!checkpoints.join(".step-000010.partial").exists());

    let whole = mics(
        &[
            "train",
            "--config",
            cfg,
            "--out",
            dir.join("whole").to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_success(&whole);
    let whole_losses = losses(&whole);
    assert_eq!(whole_losses.len(), 10);
    assert_eq!(resumed_losses[..], whole_losses[5..]);
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = scratch("no-config");
    let path = dir.join("nope.toml");
    let output = mics(&["train", "--config", path.to_str().unwrap()], &[]);
    assert_one_error_line(&output, &["nope.toml", "cannot read"]);
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let dir = scratch("unknown-key");
    let config = write_config(&dir, 1, 1, 2, "lrr = 1");
    let line = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("lrr"))
        .unwrap()
        + 1;
    let output = mics(&["train", "--config", config.to_str().unwrap()], &[]);
    assert_one_error_line(&output, &["lrr", &format!("line {line}:"), "train.toml"]);
}

#[test]
fn a_missing_required_key_is_named() {
    let dir = scratch("missing-key");
    let config = write_config(&dir, 1, 1, 2, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("steps"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, text).unwrap();
    let output = mics(&["train", "--config", config.to_str().unwrap()], &[]);
    assert_one_error_line(&output, &["steps", "missing"]);
}

#[test]
fn an_unknown_model_type_is_named() {
    let dir = scratch("gpt5");
    let config = write_config(&dir, 1, 1, 2, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("type = \"gpt2\"", "type = \"gpt5\"");
    std::fs::write(&config, text).unwrap();
    let output = mics(&["train", "--config", config.to_str().unwrap()], &[]);
    assert_one_error_line(&output, &["gpt5", "line 2:"]);
}

#[test]
fn a_missing_corpus_is_named() {
    let dir = scratch("no-corpus");
    let config = write_config(&dir, 1, 1, 2, "");
    let missing = dir.join("no/such/corpus");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("corpus = \"{}\"", corpus().display()),
        &format!("corpus = \"{}\"", missing.display()),
    );
    std::fs::write(&config, text).unwrap();
    let output = mics(&["train", "--config", config.to_str().unwrap()], &[]);
    assert_one_error_line(&output, &["no/such/corpus"]);
}

#[test]
fn a_partition_size_that_does_not_divide_the_world_is_refused() {
    let dir = scratch("bad-p");
    let config = write_config(&dir, 1, 1, 2, "");
    let output = mics(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--world",
            "6",
            "--partition-size",
            "4",
        ],
        &[],
    );
    assert_one_error_line(&output, &["parallel.partition_size", "4", "6"]);
}

/// A finished 2-step run on 2 ranks in `dir/run`; returns its config and
/// checkpoint directory.
fn trained_run(dir: &Path) -> (PathBuf, PathBuf) {
    let config = write_config(dir, 2, 2, 2, "");
    let output = mics(&["train", "--config", config.to_str().unwrap()], &[]);
    assert_success(&output);
    (config, dir.join("run/checkpoints/step-000002"))
}

#[test]
fn resuming_from_a_truncated_rank_file_names_the_file() {
    let dir = scratch("truncated");
    let (config, ckpt) = trained_run(&dir);
    let file = ckpt.join("rank-00001.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let output = mics(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--steps",
            "4",
            "--resume",
            dir.join("run").to_str().unwrap(),
        ],
        &[],
    );
    assert_one_error_line(&output, &["rank-00001.safetensors"]);
}

#[test]
fn resuming_from_a_corrupt_index_names_the_file() {
    let dir = scratch("bad-index");
    let (config, ckpt) = trained_run(&dir);
    std::fs::write(ckpt.join("index.json"), "{ \"step\": ").unwrap();
    let output = mics(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--steps",
            "4",
            "--resume",
            ckpt.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_error_line(&output, &["index.json", "not a valid index"]);
}

#[test]
fn the_mpi_engine_without_the_feature_says_how_to_rebuild() {
    if cfg!(feature = "mpi") {
        return;
    }
    let dir = scratch("mpi");
    let config = write_config(&dir, 1, 1, 2, "");
    let output = mics(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--engine",
            "mpi",
        ],
        &[],
    );
    assert_one_error_line(
        &output,
        &["needs the `mpi` cargo feature", "--features mpi"],
    );
}

#[test]
fn a_device_whose_feature_was_not_built_says_how_to_rebuild() {
    let dir = scratch("device");
    let config = write_config(&dir, 1, 1, 2, "");
    for (device, feature, built) in [
        ("wgpu", "wgpu", cfg!(feature = "wgpu")),
        ("cuda", "cuda", cfg!(feature = "cuda")),
        ("cuda:1", "cuda", cfg!(feature = "cuda")),
    ] {
        if built {
            continue;
        }
        let output = mics(
            &[
                "train",
                "--config",
                config.to_str().unwrap(),
                "--device",
                device,
            ],
            &[],
        );
        let needle = format!("needs the `{feature}` cargo feature");
        assert_one_error_line(&output, &["--device", &needle]);
    }
    let output = mics(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--device",
            "tpu",
        ],
        &[],
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("unknown device `tpu`"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn an_exported_run_generates_text() {
    let dir = scratch("export");
    let (_, ckpt) = trained_run(&dir);
    let exported = dir.join("hf");
    let output = mics(
        &[
            "export",
            "--checkpoint",
            dir.join("run").to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ],
        &[],
    );
    assert_success(&output);
    assert!(text(&output.stdout).contains(&ckpt.display().to_string()));
    let output = mics(
        &[
            "generate",
            "--model",
            exported.to_str().unwrap(),
            "--prompt",
            "To be, or not",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        &[],
    );
    assert_success(&output);
    assert!(text(&output.stdout).starts_with("To be, or not"));
}
