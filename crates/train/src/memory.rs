//! Sizes checked before they allocate: the memory a run needs per rank,
//! estimated from the config alone, against the memory it may use.
//!
//! The estimate, in f64 (no size overflows it), of one rank of the CPU
//! trainer (everything f32):
//!
//! - the run's initial parameters, built once per process (the model and
//!   its record bytes, 8 bytes a parameter), shared by the process's ranks;
//! - set-up: every rank builds the full model and loads the initial values
//!   into it before sharding (8 bytes a parameter);
//! - training: its shard of the parameters (4/p bytes a parameter), of the
//!   accumulated gradient (4/p) and of the optimizer's moments (8/p for
//!   AdamW, 4/p for SGD with momentum); the full gradients waiting to be
//!   reduce-scattered (the bucket, twice, or the whole model when reduced
//!   after backward); the gathered parameters alive at once (the one in use
//!   and those prefetched); the activations of one micro-batch (per layer
//!   68·b·s·h bytes and 10·a·b·s² for the attention scores, the
//!   Korthikanti et al. count in f32); and the fused LM head's logits of
//!   one chunk ([`head_chunk_tokens`]: on the CPU one `[1024, vocab]` f32
//!   buffer, NdArray's one-pass head; on a device three `[256, vocab]`
//!   buffers, the generic implementation's; fewer tokens when the
//!   micro-batch has fewer).
//!
//! A rank needs the process's share plus the larger of set-up and
//! training. The budget is `parallel.memory_budget`, by default the
//! machine's available memory (`MemAvailable`) divided among the ranks that
//! share it (every rank of the in-process engines; the ranks per node under
//! `mpirun`). On a GPU device the estimate is the same, compared with
//! `--memory-budget` when given (the device's memory per rank); without
//! it only the initial parameters, which live on the host, are checked
//! against the host's memory, and `partition_size = "auto"` needs it.

use crate::{
    Device, EngineKind, OptimizerKind, ParallelConfig, TrainConfig, TrainError, human_bytes,
};

/// Tokens per chunk of the trainer's fused LM head + cross-entropy on
/// `device`. On the CPU (NdArray's host path, one `[chunk, vocab]` buffer)
/// 1024: each chunk packs the whole weight again for its products, and on
/// the main job (`V = 50257`) the head took 270 ms a step at 1024 tokens
/// against 290 ms at 512 and 320 ms at 256, for 80 MB more peak RSS. On a
/// device (the generic implementation, a few `[chunk, vocab]` tensors at
/// once) `mics_fused`'s default, 256.
pub fn head_chunk_tokens(device: Device) -> usize {
    match device {
        Device::Cpu => 1024,
        Device::Wgpu | Device::Cuda(_) => mics_fused::CrossEntropyOptions::DEFAULT_CHUNK_TOKENS,
    }
}

/// The `[chunk, vocab]` f32 buffers the head holds at once on `device`.
fn head_buffers(device: Device) -> f64 {
    match device {
        Device::Cpu => 1.0,
        Device::Wgpu | Device::Cuda(_) => 3.0,
    }
}

/// A model's sizes, as the estimate needs them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDims {
    /// Transformer blocks.
    pub layers: f64,
    /// Hidden width.
    pub hidden: f64,
    /// Attention heads.
    pub heads: f64,
    /// Feed-forward width.
    pub ffn: f64,
    /// Vocabulary.
    pub vocab: f64,
    /// Rows of the learned position table (0 for rotary positions).
    pub positions: f64,
    /// Parameters, counted as the family lays them out.
    pub params: f64,
    /// Elements of the largest parameter (what one gather holds).
    pub largest: f64,
}

/// Everything the estimate depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryInputs {
    /// The model.
    pub dims: ModelDims,
    /// Sequence length s.
    pub seq: f64,
    /// Micro-batch b.
    pub micro_batch: f64,
    /// Partition size p.
    pub partition_size: f64,
    /// f32 values of optimizer state per parameter (AdamW 2, SGD with
    /// momentum 1).
    pub moments: f64,
    /// Parameters gathered ahead of use.
    pub prefetch_depth: f64,
    /// Gradient bucket bytes (`None`: gradients reduced after backward).
    pub bucket_bytes: Option<f64>,
    /// Ranks sharing one copy of the initial parameters (in-process ranks).
    pub ranks_sharing_record: f64,
    /// Tokens per chunk of the fused LM head ([`head_chunk_tokens`]).
    pub head_chunk_tokens: f64,
    /// `[chunk, vocab]` f32 buffers the head holds at once.
    pub head_buffers: f64,
}

/// Where one rank's memory goes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// This rank's share of the process's initial parameters.
    pub initial: f64,
    /// Set-up: the full model built and loaded before sharding.
    pub setup: f64,
    /// Parameter, gradient and optimizer-state shards.
    pub states: f64,
    /// Full gradients waiting for their reduce-scatter.
    pub gradients: f64,
    /// Gathered parameters alive at once.
    pub gathered: f64,
    /// Activations of one micro-batch.
    pub activations: f64,
    /// The LM head's logits of one chunk.
    pub logits: f64,
}

impl MemoryEstimate {
    /// Bytes one rank needs at its peak.
    pub fn total(&self) -> f64 {
        let training =
            self.states + self.gradients + self.gathered + self.activations + self.logits;
        self.initial + self.setup.max(training)
    }

    /// The parts, for messages.
    pub fn describe(&self) -> String {
        format!(
            "activations of one micro-batch {}, logits {}, parameter and optimizer shards {}, \
             gradients {}, gathered parameters {}, set-up {}, initial model {}",
            human_bytes(self.activations),
            human_bytes(self.logits),
            human_bytes(self.states),
            human_bytes(self.gradients),
            human_bytes(self.gathered),
            human_bytes(self.setup),
            human_bytes(self.initial)
        )
    }
}

/// The estimate of one rank (see the module docs).
pub fn estimate(m: &MemoryInputs) -> MemoryEstimate {
    const F32: f64 = 4.0;
    let d = &m.dims;
    let p = m.partition_size.max(1.0);
    let full = d.params * F32;
    let gradients = match m.bucket_bytes {
        Some(bucket) => (2.0 * bucket).min(full),
        None => full,
    };
    let gathered = if p > 1.0 {
        (1.0 + m.prefetch_depth) * d.largest * F32
    } else {
        0.0
    };
    let (b, s) = (m.micro_batch, m.seq);
    let activations = d.layers * (68.0 * b * s * d.hidden + 10.0 * d.heads * b * s * s)
        + 4.0 * b * s * d.hidden * F32;
    let logits = m.head_buffers * m.head_chunk_tokens.min(b * s) * d.vocab * F32;
    MemoryEstimate {
        initial: 2.0 * full / m.ranks_sharing_record.max(1.0),
        setup: 2.0 * full,
        states: full * (2.0 + m.moments) / p,
        gradients,
        gathered,
        activations,
        logits,
    }
}

/// Parses `6GiB`, `6G`, `512MB`, `1.5 GiB` or a number of bytes. K, M, G
/// and T alone or with `iB` are powers of 1024; with `B`, of 1000.
pub fn parse_bytes(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 6GiB, 512MB, 1073741824)"))?;
    let unit = unit.trim();
    let scale = match unit {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024f64,
        "M" | "MiB" => 1024f64.powi(2),
        "G" | "GiB" => 1024f64.powi(3),
        "T" | "TiB" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes > 0.0) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<f64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let mut parts = rest.split_whitespace();
        let value: f64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value * 1024.0),
            Some(_) => None,
        }
    })
}

/// The memory budget of one rank and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Bytes one rank may use.
    pub bytes: f64,
    /// How it was found, for messages.
    pub source: String,
}

/// The budget of one rank: `parallel.memory_budget`, or `available` bytes
/// (the machine's `MemAvailable`) divided among `ranks` ranks; `None`
/// when neither is known.
pub fn budget(configured: Option<&str>, available: Option<f64>, ranks: usize) -> Option<Budget> {
    if let Some(text) = configured {
        let bytes = parse_bytes(text).ok()?;
        return Some(Budget {
            bytes,
            source: format!("parallel.memory_budget = {text}"),
        });
    }
    let available = available?;
    Some(Budget {
        bytes: available / ranks.max(1) as f64,
        source: format!(
            "the machine's available memory {} over {ranks} rank(s); --memory-budget sets it",
            human_bytes(available)
        ),
    })
}

/// The ranks that share this machine's memory.
fn ranks_on_machine(config: &TrainConfig) -> usize {
    match config.parallel.engine {
        EngineKind::Mpi => config.ranks_per_node(),
        EngineKind::Threads | EngineKind::Nccl => config.parallel.world,
    }
}

/// The inputs of `config` for a model of `dims`, at partition size `p`.
pub fn inputs(config: &TrainConfig, dims: ModelDims, p: usize) -> MemoryInputs {
    let t = &config.train;
    let moments = match t.optimizer {
        OptimizerKind::Adamw => 2.0,
        OptimizerKind::Sgd if t.momentum > 0.0 => 1.0,
        OptimizerKind::Sgd => 0.0,
    };
    MemoryInputs {
        dims,
        seq: config.data.seq_len as f64,
        micro_batch: t.micro_batch as f64,
        partition_size: p as f64,
        moments,
        prefetch_depth: config.parallel.prefetch_depth as f64,
        bucket_bytes: config
            .parallel
            .reduce_in_backward
            .then_some((config.parallel.bucket_mb as f64) * 1024.0 * 1024.0),
        ranks_sharing_record: match config.parallel.engine {
            EngineKind::Mpi => 1.0,
            EngineKind::Threads | EngineKind::Nccl => config.parallel.world as f64,
        },
        head_chunk_tokens: head_chunk_tokens(t.device) as f64,
        head_buffers: head_buffers(t.device),
    }
}

/// The partition sizes `config`'s world and ranks per node allow, smallest
/// first.
fn valid_partition_sizes(config: &TrainConfig) -> Vec<usize> {
    let (n, k) = (config.parallel.world, config.ranks_per_node());
    (1..=n)
        .filter(|&p| mics_comm::Topology::new(n, k, p).is_ok())
        .collect()
}

/// The key whose value the estimate depends on most: the one whose
/// smallest value would shrink it most (from a checkpoint's model, its
/// sizes are not keys: `model.init_from`).
fn culprit(config: &TrainConfig, dims: ModelDims, p: usize) -> (String, String) {
    let base = estimate(&inputs(config, dims, p)).total();
    let m = &config.model;
    let from_sizes = m.init_from.is_none();
    let mut candidates: Vec<(&str, String, MemoryInputs)> = Vec::new();
    let i = inputs(config, dims, p);
    let resized = |layers: f64, hidden: f64, positions: f64| {
        let mut d = dims;
        let params_per_layer_share = if dims.layers > 0.0 {
            (dims.params - dims.vocab * dims.hidden - dims.positions * dims.hidden).max(0.0)
                / dims.layers
        } else {
            0.0
        };
        let scale = hidden / dims.hidden.max(1.0);
        d.layers = layers;
        d.hidden = hidden;
        d.ffn = dims.ffn * scale;
        d.positions = positions;
        d.params =
            layers * params_per_layer_share * scale * scale + (dims.vocab + positions) * hidden;
        d.largest = (dims.largest * scale * scale).max(dims.vocab * hidden);
        d
    };
    let mut b1 = i;
    b1.micro_batch = 1.0;
    candidates.push((
        "train.micro_batch",
        config.train.micro_batch.to_string(),
        b1,
    ));
    let mut s1 = i;
    s1.seq = 1.0;
    if from_sizes && m.max_positions.is_none() && dims.positions > 0.0 {
        s1.dims = resized(dims.layers, dims.hidden, 1.0);
    }
    candidates.push(("data.seq_len", config.data.seq_len.to_string(), s1));
    if from_sizes {
        let mut l1 = i;
        l1.dims = resized(1.0, dims.hidden, dims.positions);
        candidates.push(("model.layers", m.layers.to_string(), l1));
        let mut h1 = i;
        h1.dims = resized(dims.layers, dims.heads.max(1.0), dims.positions);
        candidates.push(("model.hidden", m.hidden.to_string(), h1));
        let mut a1 = i;
        a1.dims.heads = 1.0;
        candidates.push(("model.heads", m.heads.to_string(), a1));
        if let Some(positions) = m.max_positions {
            let mut p1 = i;
            p1.dims = resized(dims.layers, dims.hidden, config.data.seq_len as f64);
            candidates.push(("model.max_positions", positions.to_string(), p1));
        }
    } else {
        // The model's own sizes: only a smaller model helps.
        let mut tiny = i;
        tiny.dims = resized(1.0, dims.heads.max(1.0), dims.positions.min(1.0));
        let name = m
            .init_from
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        candidates.push(("model.init_from", name, tiny));
    }
    candidates
        .into_iter()
        .map(|(key, value, i)| (base - estimate(&i).total(), key, value))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, key, value)| (key.to_string(), value))
        .unwrap_or_else(|| {
            (
                "train.micro_batch".into(),
                config.train.micro_batch.to_string(),
            )
        })
}

/// Checks that `config` fits its memory budget (the machine's available
/// memory, `available`, when no budget is configured) and resolves
/// `partition_size = "auto"` to the smallest p that fits. Returns the
/// config to run and, for `auto`, a line to print.
pub fn fit(
    config: &TrainConfig,
    dims: ModelDims,
    available: Option<f64>,
) -> Result<(TrainConfig, Option<String>), TrainError> {
    let mut config = config.clone();
    let ranks = ranks_on_machine(&config);
    let budget = budget(config.parallel.memory_budget.as_deref(), available, ranks);
    if config.parallel.partition_size == ParallelConfig::AUTO {
        if config.train.device != Device::Cpu && config.parallel.memory_budget.is_none() {
            return Err(TrainError::Invalid {
                key: "parallel.partition_size".into(),
                problem: format!(
                    "`auto` on {} needs the device's memory per rank as --memory-budget \
                     (parallel.memory_budget)",
                    config.train.device
                ),
            });
        }
        let sizes = valid_partition_sizes(&config);
        let Some(budget) = budget else {
            return Err(TrainError::Invalid {
                key: "parallel.partition_size".into(),
                problem: "`auto` needs a memory budget: this machine reports no MemAvailable, \
                          so pass --memory-budget"
                    .into(),
            });
        };
        let needs: Vec<(usize, f64)> = sizes
            .iter()
            .map(|&p| (p, estimate(&inputs(&config, dims, p)).total()))
            .collect();
        match needs.iter().find(|(_, need)| *need <= budget.bytes) {
            Some(&(p, need)) => {
                config.parallel.partition_size = p;
                let line = format!(
                    "partition size auto: p = {p} of {} (a rank needs about {} of its {} budget, \
                     {})",
                    config.parallel.world,
                    human_bytes(need),
                    human_bytes(budget.bytes),
                    budget.source
                );
                return Ok((config, Some(line)));
            }
            None => {
                let p = *sizes.last().expect("p = N is always valid");
                return Err(too_large(&config, dims, p, &budget));
            }
        }
    }
    if let Some(budget) = budget {
        let p = config.parallel.partition_size;
        let e = estimate(&inputs(&config, dims, p));
        // On a GPU without a budget given, the default budget is the host's
        // memory, which holds only the initial parameters: the rest lives
        // on the device, whose memory this estimate is not told.
        let host_only =
            config.train.device != Device::Cpu && config.parallel.memory_budget.is_none();
        let need = if host_only { e.initial } else { e.total() };
        if need > budget.bytes {
            return Err(too_large_with(&config, dims, p, &budget, Some(need)));
        }
    }
    Ok((config, None))
}

fn too_large(config: &TrainConfig, dims: ModelDims, p: usize, budget: &Budget) -> TrainError {
    too_large_with(config, dims, p, budget, None)
}

/// [`too_large`] with the bytes that did not fit, when not the total.
fn too_large_with(
    config: &TrainConfig,
    dims: ModelDims,
    p: usize,
    budget: &Budget,
    needed: Option<f64>,
) -> TrainError {
    let e = estimate(&inputs(config, dims, p));
    let (key, value) = culprit(config, dims, p);
    let budget_source = budget.source.clone();
    TrainError::TooLarge {
        key,
        value,
        needed: needed.unwrap_or(e.total()),
        budget: budget.bytes,
        detail: format!("at partition size {p}: {}", e.describe()),
        budget_source,
    }
}

/// The machine's available memory (`/proc/meminfo`), if it reports it.
pub fn available_memory() -> Option<f64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> ModelDims {
        ModelDims {
            layers: 12.0,
            hidden: 768.0,
            heads: 12.0,
            ffn: 3072.0,
            vocab: 50257.0,
            positions: 1024.0,
            params: 124_439_808.0,
            largest: 50257.0 * 768.0,
        }
    }

    fn gpt2_inputs(p: f64) -> MemoryInputs {
        MemoryInputs {
            dims: dims(),
            seq: 1024.0,
            micro_batch: 1.0,
            partition_size: p,
            moments: 2.0,
            prefetch_depth: 2.0,
            bucket_bytes: Some(32.0 * 1024.0 * 1024.0),
            ranks_sharing_record: 1.0,
            head_chunk_tokens: 1024.0,
            head_buffers: 1.0,
        }
    }

    #[test]
    fn gpt2_124m_needs_what_its_parts_add_to() {
        let e = estimate(&gpt2_inputs(1.0));
        let psi = 124_439_808.0;
        assert_eq!(e.states, 16.0 * psi);
        assert_eq!(e.gradients, 64.0 * 1024.0 * 1024.0);
        assert_eq!(e.gathered, 0.0);
        // 12 layers of 68·s·h + 10·a·s² bytes, plus the embeddings' output.
        let per_layer = 68.0 * 1024.0 * 768.0 + 10.0 * 12.0 * 1024.0 * 1024.0;
        assert_eq!(e.activations, 12.0 * per_layer + 16.0 * 1024.0 * 768.0);
        assert_eq!(e.logits, 1024.0 * 50257.0 * 4.0);
        assert_eq!(e.initial, 8.0 * psi);
        // About 4.7 GiB in all.
        let gib = e.total() / (1u64 << 30) as f64;
        assert!((4.0..5.5).contains(&gib), "{gib}");
        // Sharding over 4 divides the states and adds the gathers.
        let e4 = estimate(&gpt2_inputs(4.0));
        assert_eq!(e4.states, 4.0 * psi);
        assert_eq!(e4.gathered, 3.0 * 50257.0 * 768.0 * 4.0);
        assert!(e4.total() < e.total());
    }

    #[test]
    fn absurd_sizes_estimate_without_overflow() {
        let mut i = gpt2_inputs(1.0);
        i.micro_batch = 1e12;
        let e = estimate(&i);
        assert!(e.total().is_finite() && e.total() > 1e20);
    }

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_bytes("6GiB").unwrap(), 6.0 * 1024f64.powi(3));
        assert_eq!(parse_bytes("6G").unwrap(), 6.0 * 1024f64.powi(3));
        assert_eq!(parse_bytes("512MB").unwrap(), 512e6);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 1.5 * 1024f64.powi(3));
        assert_eq!(parse_bytes("1073741824").unwrap(), 1073741824.0);
        for bad in ["", "lots", "6XB", "-1G", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\n\
                    MemAvailable:   21000000 kB\nBuffers:  1 kB\n";
        assert_eq!(mem_available(text), Some(21_000_000.0 * 1024.0));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
    }

    fn config(device: &str, micro_batch: usize, extra: &str) -> TrainConfig {
        TrainConfig::parse(
            &format!(
                "[model]\ntype = \"gpt2\"\n[data]\ncorpus = \"c\"\ntokenizer = \"t\"\n\
                 seq_len = 1024\n[train]\nsteps = 1\nmicro_batch = {micro_batch}\nlr = 0.1\n\
                 device = \"{device}\"\n[parallel]\nworld = 4\n{extra}"
            ),
            std::path::Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn a_cpu_run_is_held_to_its_budget_and_a_gpu_run_to_the_host_part_unless_told() {
        let available = Some(64.0 * 1024f64.powi(3));
        // GPT-2 124M at b = 100000: activations of petabytes, far over
        // 16 GiB a rank; b = 1 would fit, s = 1 would not.
        let err = fit(&config("cpu", 100_000, ""), dims(), available).unwrap_err();
        match err {
            TrainError::TooLarge { key, .. } => assert_eq!(key, "train.micro_batch"),
            other => panic!("{other}"),
        }
        // On a GPU the activations are the device's: the host holds the
        // initial parameters only.
        assert!(fit(&config("cuda", 100_000, ""), dims(), available).is_ok());
        // Told the device's memory, the whole estimate counts again.
        let told = config("cuda", 100_000, "memory_budget = \"80GiB\"");
        assert!(matches!(
            fit(&told, dims(), available),
            Err(TrainError::TooLarge { .. })
        ));
        // `auto` on a GPU needs to be told.
        let auto = config("cuda", 1, "partition_size = \"auto\"");
        assert!(matches!(
            fit(&auto, dims(), available),
            Err(TrainError::Invalid { .. })
        ));
        // On the CPU, `auto` takes the smallest p that fits: at b = 1 each
        // rank needs about 4.7 GiB at p = 1, 2.7 GiB at p = 2.
        let auto = config(
            "cpu",
            1,
            "partition_size = \"auto\"\nmemory_budget = \"4GiB\"",
        );
        let (chosen, line) = fit(&auto, dims(), available).unwrap();
        assert_eq!(chosen.parallel.partition_size, 2, "{line:?}");
    }

    #[test]
    fn the_default_budget_divides_available_memory_among_ranks() {
        let b = budget(None, Some(16e9), 4).unwrap();
        assert_eq!(b.bytes, 4e9);
        assert!(b.source.contains("4 rank"), "{}", b.source);
        let b = budget(Some("2GiB"), Some(16e9), 4).unwrap();
        assert_eq!(b.bytes, 2.0 * 1024f64.powi(3));
        assert!(budget(None, None, 4).is_none());
    }
}
