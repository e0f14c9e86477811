//! `mics data prepare` end to end.

use std::path::PathBuf;
use std::process::Command;

fn mics(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mics"))
        .args(args)
        .output()
        .expect("running the mics binary")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mics-cli-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn prepare_writes_a_dataset_and_prints_one_line() {
    let dir = temp_dir("ok");
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(
        corpus.join("a.txt"),
        "Hello world, the quick brown fox. ".repeat(20),
    )
    .unwrap();
    std::fs::write(corpus.join("b.txt"), "To be, or not to be. ".repeat(20)).unwrap();
    let out = dir.join("data");
    let output = mics(&[
        "data",
        "prepare",
        "--corpus",
        corpus.to_str().unwrap(),
        "--tokenizer",
        "gpt2",
        "--out",
        out.to_str().unwrap(),
        "--val-fraction",
        "0.1",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let meta = mics_datasets::open_meta(&out).unwrap();
    assert_eq!(meta.documents, 2);
    assert_eq!(meta.vocab_size, 50257);
    assert!(
        stdout.contains(&format!(
            "{} train + {} val tokens",
            meta.train_tokens, meta.val_tokens
        )),
        "{stdout}"
    );
    assert!(stdout.contains("vocabulary 50257, u16"), "{stdout}");
    for file in ["train.bin", "val.bin", "tokenizer.json", "meta.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_corpus_is_a_one_line_error_and_a_non_zero_exit() {
    let dir = temp_dir("missing");
    let missing = dir.join("no/such/corpus");
    let output = mics(&[
        "data",
        "prepare",
        "--corpus",
        missing.to_str().unwrap(),
        "--tokenizer",
        "gpt2",
        "--out",
        dir.join("data").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("corpus path {} does not exist", missing.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.join("data").join("meta.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
