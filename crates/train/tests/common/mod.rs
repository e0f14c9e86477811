//! What the trainer's integration tests share: a few KB of Shakespeare
//! tokenized with a 257-id byte-level BPE (or BERT's WordPiece), tiny model
//! configs on it, and running a config to rank 0's summary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mics_datasets::{Corpus, PrepareOptions, TokenizerSpec};
use mics_train::{RunOutcome, TrainConfig, TrainError, TrainSummary};

/// Runs `config` (from `resume`) and returns rank 0's summary.
pub fn train(config: &TrainConfig, resume: Option<&Path>) -> Result<TrainSummary, TrainError> {
    match mics_train::train(config, resume)? {
        RunOutcome::Leader(summary) => Ok(*summary),
        RunOutcome::Follower { rank } => panic!("in-process runs lead, not rank {rank}"),
        RunOutcome::Stopped { signal, step, .. } => {
            panic!("stopped by signal {signal} after step {step}")
        }
    }
}

/// A fresh scratch directory, unique to this process and `tag`.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("mics-train-tests-{}", std::process::id()))
        .join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The corpus of `mics_test_support::write_byte_corpus`, written once per
/// test binary.
pub fn corpus() -> &'static Path {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = scratch("corpus");
        mics_test_support::write_byte_corpus(&dir);
        dir
    })
}

/// The corpus tokenized with `tokenizer` (`bytes` or `bert`), once per binary.
pub fn dataset(tokenizer: &str) -> &'static Path {
    static BYTES: OnceLock<PathBuf> = OnceLock::new();
    static BERT: OnceLock<PathBuf> = OnceLock::new();
    let cell = match tokenizer {
        "bytes" => &BYTES,
        "bert" => &BERT,
        other => panic!("no dataset for {other}"),
    };
    cell.get_or_init(|| {
        let dir = scratch(&format!("data-{tokenizer}"));
        let spec = tokenizer_spec(tokenizer).parse::<TokenizerSpec>().unwrap();
        let corpus = Corpus::Path(corpus().join("texts"));
        let mut options = PrepareOptions::new(corpus, spec, &dir);
        options.val_fraction = 0.2;
        mics_datasets::prepare(&options).unwrap();
        dir
    })
}

/// The `data.tokenizer` value of `tokenizer`.
pub fn tokenizer_spec(tokenizer: &str) -> String {
    match tokenizer {
        "bytes" => corpus().join("bytes.json").display().to_string(),
        other => other.to_string(),
    }
}

/// A run's shape: world N, partition size p, ranks per node k, micro-batch b,
/// accumulation s.
#[derive(Clone, Copy)]
pub struct Shape {
    pub world: usize,
    pub p: usize,
    pub k: Option<usize>,
    pub b: usize,
    pub s: usize,
}

pub const fn shape(world: usize, p: usize, k: Option<usize>, b: usize, s: usize) -> Shape {
    Shape { world, p, k, b, s }
}

/// A tiny model (2 layers, hidden 32, 2 heads, sequences of 16) of `kind`
/// (`gpt2`, `bert` or `llama`) on the test corpus, writing into `out`.
pub fn config(kind: &str, out: &Path, sh: Shape, steps: u64, extra_train: &str) -> TrainConfig {
    let tokenizer = if kind == "bert" { "bert" } else { "bytes" };
    let k =
        sh.k.map(|k| format!("ranks_per_node = {k}"))
            .unwrap_or_default();
    let text = format!(
        r#"
[model]
type = "{kind}"
layers = 2
hidden = 32
heads = 2

[data]
corpus = "{corpus}"
tokenizer = "{tokenizer_spec}"
dataset = "{dataset}"
seq_len = 16
val_fraction = 0.2

[train]
steps = {steps}
micro_batch = {b}
grad_accum = {s}
lr = 0.01
warmup_steps = 2
eval_batches = 2
log_every = 1000
{extra_train}

[parallel]
world = {world}
partition_size = {p}
{k}

[output]
dir = "{out}"
"#,
        corpus = corpus().join("texts").display(),
        tokenizer_spec = tokenizer_spec(tokenizer),
        dataset = dataset(tokenizer).display(),
        out = out.display(),
        b = sh.b,
        s = sh.s,
        world = sh.world,
        p = sh.p,
    );
    TrainConfig::parse(&text, Path::new("test.toml")).unwrap()
}
