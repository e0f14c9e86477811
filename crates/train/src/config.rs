//! The run configuration: a TOML file (`configs/*.toml`) whose every key can
//! be overridden from the command line ([`Overrides`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ModelType, TrainError};

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

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `gpt2`, `bert` or `llama`.
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
    /// Keep only the newest this many checkpoints (0, the default: keep
    /// all), as Hugging Face's `save_total_limit`.
    #[serde(default)]
    pub checkpoint_keep: usize,
    /// On SIGINT or SIGTERM, write a checkpoint after the current step
    /// before stopping (the default; `--no-checkpoint-on-signal` skips it).
    #[serde(default = "yes")]
    pub checkpoint_on_signal: bool,
    /// Resume a checkpoint with another global batch (N·b·s) than it was
    /// written with: the sampler then draws batches of the new size from
    /// the saved step on, so the losses no longer continue the saved run's.
    #[serde(default)]
    pub allow_global_batch_change: bool,
    /// Print a log line every this many steps when stderr is not a terminal.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// The compute device: `cpu` (NdArray, the default), `wgpu` (Burn's
    /// wgpu backend: a GPU through Vulkan/Metal/DX12, or Mesa's lavapipe on
    /// the CPU), `cuda` or `cuda:INDEX` (Burn's CUDA backend). `wgpu` and
    /// `cuda` need a build with the cargo feature of that name.
    #[serde(default)]
    pub device: Device,
    /// The training precision: `fp32` (default), `bf16` or `fp16`. Shards,
    /// gradients' accumulation and optimizer moments stay f32 (master
    /// copies); parameters are all-gathered and gradients reduced in this
    /// type, and on a device backend forward and backward compute in it.
    /// NdArray has no half-precision tensors: on `cpu` compute stays f32.
    #[serde(default)]
    pub precision: Precision,
    /// fp16's first loss scale (dynamic loss scaling: a step whose gradients
    /// overflow is skipped and the scale halved; 2000 good steps in a row
    /// double it). Default 65536, as PyTorch's `GradScaler` and DeepSpeed;
    /// gradients travel in f16, so the first steps of a run may overflow at
    /// it and be skipped (their log line shows `grad_norm inf`). A power of
    /// two scales exactly.
    #[serde(default = "default_initial_loss_scale")]
    pub initial_loss_scale: f32,
    /// The optimizer: `adamw` (default) or `sgd`.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// SGD momentum (`optimizer = "sgd"`; 0 disables).
    #[serde(default)]
    pub momentum: f64,
}

/// A compute device (`train.device`, `--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    /// NdArray on the CPU.
    #[default]
    Cpu,
    /// Burn's wgpu backend (CubeCL), its default adapter.
    Wgpu,
    /// Burn's CUDA backend (CubeCL), GPU `index`.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "wgpu" => Ok(Device::Wgpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{other}` (expected cpu, wgpu, cuda or cuda:INDEX)")
                }),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Device, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Wgpu => f.write_str("wgpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The training precision (`train.precision`, `--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    Fp32,
    /// bfloat16 compute and collectives, f32 master weights and moments.
    Bf16,
    /// IEEE half compute and collectives, f32 master weights and moments,
    /// dynamic loss scaling.
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// The optimizer (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay), Burn's rule.
    #[default]
    Adamw,
    /// SGD with optional momentum and weight decay, Burn's rule.
    Sgd,
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
    /// Partition size p: ranks sharing one replica of the model states; in
    /// TOML an integer or `"auto"` ([`ParallelConfig::AUTO`]): the smallest
    /// p whose estimated memory per rank fits the memory budget, chosen at
    /// launch.
    #[serde(
        default = "one",
        deserialize_with = "partition_from_toml",
        serialize_with = "partition_to_toml"
    )]
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
    /// Collective timeout in seconds: how long any one collective waits for
    /// every rank (long: it covers rank 0 preparing the dataset or
    /// committing a checkpoint while the others wait).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Failure-detection timeout in seconds (shorter): an in-process rank
    /// that makes no progress for this long while the others wait for it
    /// is declared hung and the run ends with an error naming it.
    #[serde(default = "default_failure_timeout")]
    pub failure_timeout_s: u64,
    /// Memory one rank may use, e.g. `"6GiB"`, `"512MB"` or bytes (default:
    /// the machine's available memory divided among the ranks that share
    /// it). Configs whose estimate exceeds it are refused before anything
    /// large is allocated; `partition_size = "auto"` picks p by it.
    #[serde(default)]
    pub memory_budget: Option<String>,
    /// Reduce-scatter gradients during backward, as soon as each is complete
    /// (the default), or only once backward has returned (for measuring the
    /// overlap; the results are the same).
    #[serde(default = "yes")]
    pub reduce_in_backward: bool,
    /// Gradient bucket size in MiB: gradients are reduce-scattered a bucket
    /// at a time, as each fills during backward (0: one parameter a bucket).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: usize,
    /// An artificial latency added to every collective of the threads
    /// engine, in microseconds, as a network would (benchmarks only).
    #[serde(default)]
    pub latency_us: u64,
    /// Set when the world size came from the command line (`--world`): a
    /// launcher (`mpirun`) then must agree with it; otherwise the
    /// launcher's size is taken.
    #[serde(skip)]
    pub world_from_flag: bool,
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
            failure_timeout_s: default_failure_timeout(),
            memory_budget: None,
            reduce_in_backward: true,
            bucket_mb: default_bucket_mb(),
            latency_us: 0,
            world_from_flag: false,
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
fn yes() -> bool {
    true
}
fn default_bucket_mb() -> usize {
    32
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
fn default_initial_loss_scale() -> f32 {
    65536.0
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
fn default_failure_timeout() -> u64 {
    60
}

impl ParallelConfig {
    /// `partition_size = "auto"` before launch resolves it.
    pub const AUTO: usize = 0;
}

fn partition_from_toml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(usize),
        Text(String),
    }
    match Value::deserialize(d)? {
        Value::Number(p) => Ok(p),
        Value::Text(t) => parse_partition_size(&t).map_err(serde::de::Error::custom),
    }
}

fn partition_to_toml<S: serde::Serializer>(p: &usize, s: S) -> Result<S::Ok, S::Error> {
    if *p == ParallelConfig::AUTO {
        s.serialize_str("auto")
    } else {
        s.serialize_u64(*p as u64)
    }
}

/// `auto` or a partition size.
fn parse_partition_size(text: &str) -> Result<usize, String> {
    match text {
        "auto" => Ok(ParallelConfig::AUTO),
        other => other
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("`{other}` is neither a partition size nor `auto`")),
    }
}
fn default_out() -> PathBuf {
    PathBuf::from("runs/latest")
}

/// Command-line values that replace the config file's: one flag per key
/// (`mics train --help` lists them).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct Overrides {
    /// Ranks N (`parallel.world`; under mpirun, the launcher's by default).
    #[arg(long)]
    pub world: Option<usize>,
    /// Partition size p, dividing N, or `auto`: the smallest p that fits
    /// the memory budget (`parallel.partition_size`).
    #[arg(long, value_parser = parse_partition_size)]
    pub partition_size: Option<usize>,
    /// Memory one rank may use, e.g. `6GiB` (`parallel.memory_budget`;
    /// default: available memory / ranks on this machine).
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Collective timeout in seconds (`parallel.timeout_s`).
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Failure-detection timeout in seconds (`parallel.failure_timeout_s`).
    #[arg(long)]
    pub failure_timeout_s: Option<u64>,
    /// Ranks per node k, dividing N (`parallel.ranks_per_node`).
    #[arg(long)]
    pub ranks_per_node: Option<usize>,
    /// Micro-steps accumulated per optimizer step s (`train.grad_accum`).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Sequences per rank per micro-step b (`train.micro_batch`).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Total optimizer steps; a resumed run continues up to this (`train.steps`).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed of initialisation, sampling, masking and dropout (`train.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dropout probability, 0 disables (`model.dropout`).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Blocks of a model trained from scratch (`model.layers`).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden width of a model trained from scratch (`model.hidden`).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Attention heads of a model trained from scratch (`model.heads`).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Tokens per training sequence (`data.seq_len`).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// The run directory (`output.dir`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The metrics file, JSON lines (`output.metrics`; default `<out>/metrics.jsonl`).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// `threads` (in-process, default), `mpi` (under mpirun, built with
    /// `--features mpi`) or `nccl` (built with `--features cuda`) (`parallel.engine`).
    #[arg(long)]
    pub engine: Option<EngineKind>,
    /// Start from this Hugging Face-layout checkpoint directory, or
    /// `asset:NAME` (`model.init_from`).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Peak learning rate (`train.lr`).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Steps of linear warm-up, at most `train.steps` (`train.warmup_steps`).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Evaluate every this many steps (`train.eval_every`).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Write a sharded checkpoint every this many steps (`train.checkpoint_every`).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Keep only the newest K checkpoints, 0 keeps all (`train.checkpoint_keep`).
    #[arg(long)]
    pub checkpoint_keep: Option<usize>,
    /// On SIGINT/SIGTERM stop after the current step without writing a
    /// checkpoint (`train.checkpoint_on_signal = false`).
    #[arg(long)]
    pub no_checkpoint_on_signal: bool,
    /// Resume a checkpoint with another global batch (world × micro-batch ×
    /// grad-accum) than it was saved with: the batches from the saved step
    /// on are drawn at the new size, so the losses no longer continue the
    /// saved run's (`train.allow_global_batch_change`).
    #[arg(long)]
    pub allow_global_batch_change: bool,
    /// The token-shard directory, prepared there when missing (`data.dataset`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// `cpu`, `wgpu`, `cuda` or `cuda:INDEX` (`train.device`).
    #[arg(long)]
    pub device: Option<Device>,
    /// `fp32`, `bf16` or `fp16` (`train.precision`).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Reduce gradients only after backward, not during it (`parallel.reduce_in_backward = false`).
    #[arg(long)]
    pub no_overlap: bool,
    /// Artificial latency per collective of the threads engine, µs (`parallel.latency_us`).
    #[arg(long)]
    pub latency_us: Option<u64>,
    /// Gradient bucket size in MiB (`parallel.bucket_mb`).
    #[arg(long)]
    pub bucket_mb: Option<usize>,
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
        p.world_from_flag |= o.world.is_some();
        if o.no_overlap {
            p.reduce_in_backward = false;
        }
        set(&mut p.latency_us, o.latency_us);
        set(&mut p.bucket_mb, o.bucket_mb);
        set(&mut p.partition_size, o.partition_size);
        set(&mut p.timeout_s, o.timeout_s);
        set(&mut p.failure_timeout_s, o.failure_timeout_s);
        if o.memory_budget.is_some() {
            p.memory_budget = o.memory_budget.clone();
        }
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
        set(&mut t.warmup_steps, o.warmup_steps);
        set(&mut t.eval_every, o.eval_every);
        set(&mut t.checkpoint_every, o.checkpoint_every);
        set(&mut t.checkpoint_keep, o.checkpoint_keep);
        if o.no_checkpoint_on_signal {
            t.checkpoint_on_signal = false;
        }
        if o.allow_global_batch_change {
            t.allow_global_batch_change = true;
        }
        set(&mut t.device, o.device);
        set(&mut t.precision, o.precision);
        set(&mut self.model.dropout, o.dropout);
        set(&mut self.model.layers, o.layers);
        set(&mut self.model.hidden, o.hidden);
        set(&mut self.model.heads, o.heads);
        set(&mut self.data.seq_len, o.seq_len);
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
        if p.partition_size != ParallelConfig::AUTO && !p.world.is_multiple_of(p.partition_size) {
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
        if !(t.min_lr.is_finite() && (0.0..=t.lr).contains(&t.min_lr)) {
            return bad(
                "train.min_lr",
                format!("{} is not in [0, train.lr = {}]", t.min_lr, t.lr),
            );
        }
        if t.warmup_steps > t.steps {
            return bad(
                "train.warmup_steps",
                format!("{} is more than train.steps = {}", t.warmup_steps, t.steps),
            );
        }
        for (key, value) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return bad(key, format!("{value} is not in [0, 1)"));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", format!("{} is not a positive number", t.eps));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(
                "train.weight_decay",
                format!("{} is not a number >= 0", t.weight_decay),
            );
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return bad(
                "train.grad_clip",
                format!("{} is not a number >= 0 (0 disables clipping)", t.grad_clip),
            );
        }
        if !(t.initial_loss_scale.is_finite() && t.initial_loss_scale >= 1.0) {
            return bad(
                "train.initial_loss_scale",
                format!("{} is not a number >= 1", t.initial_loss_scale),
            );
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            return bad("train.momentum", format!("{} is not in [0, 1)", t.momentum));
        }
        if p.timeout_s == 0 {
            return bad("parallel.timeout_s", "must be at least 1 second".into());
        }
        if p.failure_timeout_s == 0 || p.failure_timeout_s > p.timeout_s {
            return bad(
                "parallel.failure_timeout_s",
                format!(
                    "{} is not in [1, parallel.timeout_s = {}] seconds",
                    p.failure_timeout_s, p.timeout_s
                ),
            );
        }
        if let Some(budget) = &p.memory_budget {
            crate::memory::parse_bytes(budget).map_err(|problem| TrainError::Invalid {
                key: "parallel.memory_budget".into(),
                problem,
            })?;
        }
        if p.world
            .checked_mul(t.micro_batch)
            .and_then(|g| g.checked_mul(t.grad_accum))
            .and_then(|g| g.checked_mul(self.data.seq_len))
            .is_none()
        {
            return bad(
                "train.micro_batch",
                format!(
                    "world {} × micro_batch {} × grad_accum {} × seq_len {} tokens per step \
                     overflows",
                    p.world, t.micro_batch, t.grad_accum, self.data.seq_len
                ),
            );
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
