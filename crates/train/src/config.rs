//! The run configuration: a TOML file (`configs/*.toml`) whose every key can
//! be overridden from the command line ([`Overrides`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Everything a training run needs to know. Unknown keys are errors, so a
/// misspelt key never silently falls back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model: its type and sizes, or a checkpoint to start from.
    pub model: ModelConfig,
    /// The corpus, its tokenizer and the sequence length.
    pub data: DataConfig,
    /// Optimisation: steps, batch, learning-rate schedule, evaluation.
    pub train: OptimConfig,
    /// World size, partition size, topology and engine.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Where the run writes its checkpoints, metrics and plots.
    #[serde(default)]
    pub output: OutputConfig,
}

/// Which model family is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// GPT-2 (causal language modelling).
    Gpt2,
    /// BERT (masked language modelling).
    Bert,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `gpt2` or `bert`.
    #[serde(rename = "type")]
    pub kind: ModelType,
    /// A Hugging Face-layout directory (`config.json` + `model.safetensors`)
    /// to start from, or `asset:NAME` for an asset of `scripts/fetch-assets`
    /// (e.g. `asset:minilm`); the size keys below are then ignored.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Blocks (GPT-2 `n_layer`, BERT `num_hidden_layers`).
    #[serde(default = "default_layers")]
    pub layers: usize,
    /// Hidden width (`n_embd` / `hidden_size`).
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub heads: usize,
    /// Longest sequence the position embeddings cover (default: the
    /// sequence length).
    #[serde(default)]
    pub max_positions: Option<usize>,
    /// Dropout probability everywhere Hugging Face applies it (0 disables).
    #[serde(default)]
    pub dropout: f64,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `shakespeare`, `moby-dick`, or a text file / directory of `.txt`.
    pub corpus: String,
    /// `gpt2`, `bert` (the MiniLM WordPiece) or a `tokenizer.json` path.
    pub tokenizer: String,
    /// Where the token shards live; prepared there from `corpus` when absent
    /// (default: `<output.dir>/data`).
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of every document kept for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Total optimizer steps (a resumed run continues up to this).
    pub steps: u64,
    /// Sequences per rank per micro-step.
    pub micro_batch: usize,
    /// Micro-steps accumulated per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Seed of the initialisation, the sampler and the masking.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW beta 1.
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    /// AdamW beta 2.
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// Clip the global gradient norm to this (0 disables).
    #[serde(default = "default_clip")]
    pub grad_clip: f32,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Global batches evaluated each time.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: u64,
    /// Write a sharded checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Print a log line every this many steps when stderr is not a terminal.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

/// Which communication engine runs the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One thread per rank in this process (the default).
    #[default]
    Threads,
    /// One process per rank under `mpirun` (cargo feature `mpi`).
    Mpi,
    /// NCCL between the GPUs of this machine (cargo feature `cuda`).
    Nccl,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "threads" => Ok(EngineKind::Threads),
            "mpi" => Ok(EngineKind::Mpi),
            "nccl" => Ok(EngineKind::Nccl),
            other => Err(format!(
                "unknown engine `{other}` (expected threads, mpi or nccl)"
            )),
        }
    }
}

/// `[parallel]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Ranks N (with MPI: the number of processes, checked).
    #[serde(default = "one")]
    pub world: usize,
    /// Partition size p: ranks sharing one replica of the model states.
    #[serde(default = "one")]
    pub partition_size: usize,
    /// Ranks per node k (default: all ranks on one node).
    #[serde(default)]
    pub ranks_per_node: Option<usize>,
    /// The communication engine.
    #[serde(default)]
    pub engine: EngineKind,
    /// Parameters gathered ahead of use (0 turns prefetch off).
    #[serde(default = "default_prefetch_depth")]
    pub prefetch_depth: usize,
    /// Collective timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            world: 1,
            partition_size: 1,
            ranks_per_node: None,
            engine: EngineKind::Threads,
            prefetch_depth: default_prefetch_depth(),
            timeout_s: default_timeout(),
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The run directory: `checkpoints/`, `metrics.jsonl`, `loss.png`, `summary.json`.
    #[serde(default = "default_out")]
    pub dir: PathBuf,
    /// Metrics file (default `<dir>/metrics.jsonl`).
    #[serde(default)]
    pub metrics: Option<PathBuf>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: default_out(),
            metrics: None,
        }
    }
}

fn one() -> usize {
    1
}
fn default_layers() -> usize {
    2
}
fn default_hidden() -> usize {
    64
}
fn default_heads() -> usize {
    2
}
fn default_val_fraction() -> f64 {
    0.05
}
fn default_seed() -> u64 {
    42
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}
fn default_clip() -> f32 {
    1.0
}
fn default_eval_batches() -> u64 {
    2
}
fn default_log_every() -> u64 {
    10
}
fn default_prefetch_depth() -> usize {
    2
}
fn default_timeout() -> u64 {
    300
}
fn default_out() -> PathBuf {
    PathBuf::from("runs/latest")
}

/// Command-line values that replace the config file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--world`.
    pub world: Option<usize>,
    /// `--partition-size`.
    pub partition_size: Option<usize>,
    /// `--ranks-per-node`.
    pub ranks_per_node: Option<usize>,
    /// `--grad-accum`.
    pub grad_accum: Option<usize>,
    /// `--micro-batch`.
    pub micro_batch: Option<usize>,
    /// `--steps`.
    pub steps: Option<u64>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--dropout`.
    pub dropout: Option<f64>,
    /// `--out`.
    pub out: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<PathBuf>,
    /// `--engine`.
    pub engine: Option<EngineKind>,
    /// `--init-from`.
    pub init_from: Option<PathBuf>,
    /// `--lr`.
    pub lr: Option<f64>,
    /// `--eval-every`.
    pub eval_every: Option<u64>,
    /// `--checkpoint-every`.
    pub checkpoint_every: Option<u64>,
    /// `--dataset`.
    pub dataset: Option<PathBuf>,
}

impl TrainConfig {
    /// Reads and checks a TOML config file. Errors name the file, the line
    /// and the key.
    pub fn load(path: &Path) -> Result<TrainConfig, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|err| TrainError::Config {
            path: path.to_path_buf(),
            problem: format!("cannot read it: {err}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<TrainConfig, TrainError> {
        toml::from_str::<TrainConfig>(text).map_err(|err| {
            let line = err
                .span()
                // Lines before the span's start, plus its own (a key at the
                // start of a line follows a newline that `lines()` would
                // not count).
                .map(|span| {
                    let start = span.start.min(text.len());
                    text.as_bytes()[..start]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1
                });
            let message = err.message().replace('\n', " ");
            TrainError::Config {
                path: path.to_path_buf(),
                problem: match line {
                    Some(line) => format!("line {line}: {message}"),
                    None => message,
                },
            }
        })
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        let p = &mut self.parallel;
        set(&mut p.world, o.world);
        set(&mut p.partition_size, o.partition_size);
        if o.ranks_per_node.is_some() {
            p.ranks_per_node = o.ranks_per_node;
        }
        set(&mut p.engine, o.engine);
        let t = &mut self.train;
        set(&mut t.grad_accum, o.grad_accum);
        set(&mut t.micro_batch, o.micro_batch);
        set(&mut t.steps, o.steps);
        set(&mut t.seed, o.seed);
        set(&mut t.lr, o.lr);
        set(&mut t.eval_every, o.eval_every);
        set(&mut t.checkpoint_every, o.checkpoint_every);
        set(&mut self.model.dropout, o.dropout);
        if o.init_from.is_some() {
            self.model.init_from = o.init_from.clone();
        }
        set(&mut self.output.dir, o.out.clone());
        if o.metrics.is_some() {
            self.output.metrics = o.metrics.clone();
        }
        if o.dataset.is_some() {
            self.data.dataset = o.dataset.clone();
        }
    }

    /// Checks the values that do not depend on files: sizes, divisibility,
    /// ranges. The message names the key and the value.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, problem: String| {
            Err(TrainError::Invalid {
                key: key.to_string(),
                problem,
            })
        };
        let p = &self.parallel;
        if p.world == 0 {
            return bad("parallel.world", "must be at least 1".into());
        }
        if p.partition_size == 0 || !p.world.is_multiple_of(p.partition_size) {
            return bad(
                "parallel.partition_size",
                format!(
                    "{} does not divide the world size {}",
                    p.partition_size, p.world
                ),
            );
        }
        if let Some(k) = p.ranks_per_node
            && (k == 0 || !p.world.is_multiple_of(k))
        {
            return bad(
                "parallel.ranks_per_node",
                format!("{k} does not divide the world size {}", p.world),
            );
        }
        let t = &self.train;
        for (key, value) in [
            ("train.steps", t.steps as usize),
            ("train.micro_batch", t.micro_batch),
            ("train.grad_accum", t.grad_accum),
            ("data.seq_len", self.data.seq_len),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", format!("{} is not a positive number", t.lr));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return bad(
                "model.dropout",
                format!("{} is not in [0, 1)", self.model.dropout),
            );
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) || self.data.val_fraction == 0.0 {
            return bad(
                "data.val_fraction",
                format!("{} is not in (0, 1)", self.data.val_fraction),
            );
        }
        if self.model.kind == ModelType::Bert && self.data.seq_len < 3 {
            return bad(
                "data.seq_len",
                "BERT sequences need room for [CLS] and [SEP]: at least 3".into(),
            );
        }
        if self.model.init_from.is_none()
            && !self.model.hidden.is_multiple_of(self.model.heads.max(1))
        {
            return bad(
                "model.hidden",
                format!(
                    "{} is not divisible by model.heads = {}",
                    self.model.hidden, self.model.heads
                ),
            );
        }
        Ok(())
    }

    /// The directory of `model.init_from`, with `asset:NAME` resolved in the
    /// asset cache.
    pub fn init_dir(&self) -> Result<Option<PathBuf>, TrainError> {
        let Some(path) = &self.model.init_from else {
            return Ok(None);
        };
        let dir = match path.to_str().and_then(|p| p.strip_prefix("asset:")) {
            Some(name) => mics_hub::assets::asset_dir(name)?,
            None => path.clone(),
        };
        if !dir.join("config.json").is_file() {
            return Err(TrainError::Invalid {
                key: "model.init_from".into(),
                problem: format!("{} has no config.json", dir.display()),
            });
        }
        Ok(Some(dir))
    }

    /// Sequences per optimizer step over all ranks: N · b · s.
    pub fn global_batch(&self) -> usize {
        self.parallel.world * self.train.micro_batch * self.train.grad_accum
    }

    /// Ranks per node, defaulting to the whole world on one node.
    pub fn ranks_per_node(&self) -> usize {
        self.parallel.ranks_per_node.unwrap_or(self.parallel.world)
    }

    /// The metrics file.
    pub fn metrics_path(&self) -> PathBuf {
        self.output
            .metrics
            .clone()
            .unwrap_or_else(|| self.output.dir.join("metrics.jsonl"))
    }

    /// The token-shard directory.
    pub fn dataset_dir(&self) -> PathBuf {
        self.data
            .dataset
            .clone()
            .unwrap_or_else(|| self.output.dir.join("data"))
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}
