//! The time model: the collectives each strategy issues per step, how they
//! overlap with compute, and the resulting step time and throughput.

use crate::cluster::ClusterSpec;
use crate::collective::{Collective, CommCost, Group, hierarchical_all_gather, ring};
use crate::error::PlanError;
use crate::memory::{MemoryBreakdown, PARAM_BYTES, memory};
use crate::model::ModelSpec;

/// A data-parallel strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every rank holds all model states; one gradient all-reduce over `N` per step.
    Ddp,
    /// Gradients and optimizer state sharded over `N`, parameters replicated.
    Zero2,
    /// Everything sharded over `N`; gathers and reduce-scatters over `N`.
    Zero3,
    /// Everything sharded over a partition group of `partition_size` ranks.
    Mics {
        /// `p`, the ranks that together hold one replica of the model states.
        partition_size: u64,
    },
}

impl Strategy {
    /// Short name: `ddp`, `zero2`, `zero3` or `mics`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Ddp => "ddp",
            Strategy::Zero2 => "zero2",
            Strategy::Zero3 => "zero3",
            Strategy::Mics { .. } => "mics",
        }
    }

    /// Ranks that share one replica of the model states: 1 for DDP, `N` for
    /// ZeRO-2 and ZeRO-3, `p` for MiCS.
    pub fn partition_size(&self, gpus: u64) -> u64 {
        match self {
            Strategy::Ddp => 1,
            Strategy::Zero2 | Strategy::Zero3 => gpus,
            Strategy::Mics { partition_size } => *partition_size,
        }
    }
}

/// Which strategies a plan covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyChoice {
    /// DDP, ZeRO-2, ZeRO-3 and MiCS at every valid partition size.
    All,
    /// DDP only.
    Ddp,
    /// ZeRO-2 only.
    Zero2,
    /// ZeRO-3 only.
    Zero3,
    /// MiCS at every valid partition size.
    Mics,
}

impl std::str::FromStr for StrategyChoice {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "all" => Ok(Self::All),
            "ddp" => Ok(Self::Ddp),
            "zero2" => Ok(Self::Zero2),
            "zero3" => Ok(Self::Zero3),
            "mics" => Ok(Self::Mics),
            _ => Err(PlanError::InvalidConfig(format!(
                "unknown strategy `{s}` (expected all, ddp, zero2, zero3 or mics)"
            ))),
        }
    }
}

/// One training configuration on one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainConfig {
    /// World size `N`.
    pub gpus: u64,
    /// GPUs per node `k`.
    pub gpus_per_node: u64,
    /// Sequence length `s`.
    pub seq: u64,
    /// Micro-batch per GPU `b`.
    pub micro_batch: u64,
    /// Micro-steps per optimizer step (gradient accumulation).
    pub grad_accum: u64,
    /// Whether activation checkpointing recomputes each layer's forward.
    pub checkpointing: bool,
    /// Units gathered ahead of use (0: gather on demand, no overlap).
    pub prefetch_depth: u64,
}

/// DDP and ZeRO-2 reduce gradients in buckets of this many bytes (PyTorch
/// DDP's default `bucket_cap_mb = 25`).
pub const REDUCE_BUCKET_BYTES: f64 = 25.0 * 1024.0 * 1024.0;

/// Bytes of memory traffic per locally updated parameter in the AdamW step:
/// read and write the fp32 master, `m` and `v` (24), read the 16-bit gradient
/// and write the 16-bit parameter (4).
pub const OPTIMIZER_STEP_BYTES: f64 = 28.0;

/// The prediction for one strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The strategy.
    pub strategy: Strategy,
    /// Ranks sharing one replica (see [`Strategy::partition_size`]).
    pub partition_size: u64,
    /// Where memory goes.
    pub memory: MemoryBreakdown,
    /// Total memory per GPU, GiB.
    pub memory_gib: f64,
    /// Whether it fits in the GPU's memory less the reserve.
    pub fits: bool,
    /// Seconds per optimizer step.
    pub step_time_s: f64,
    /// Seconds of pure compute per step.
    pub compute_time_s: f64,
    /// Executed TFLOPS per GPU (with recomputation when checkpointing).
    pub tflops_per_gpu: f64,
    /// `tflops_per_gpu` as a percentage of the GPU's peak.
    pub percent_of_peak: f64,
    /// Bytes each GPU sends inside its node per step.
    pub intra_node_bytes: f64,
    /// Bytes each GPU sends to other nodes per step (node average).
    pub inter_node_bytes: f64,
}

/// A plan: every requested strategy, and the recommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One row per strategy and MiCS partition size.
    pub rows: Vec<Estimate>,
    /// Smallest MiCS partition size that fits (the paper's scale-aware rule).
    pub recommended_partition_size: Option<u64>,
    /// MiCS partition size with the highest predicted throughput that fits.
    pub best_throughput_partition_size: Option<u64>,
}

/// A model on a cluster with a training configuration, validated.
#[derive(Debug, Clone)]
pub struct Planner {
    model: ModelSpec,
    cluster: ClusterSpec,
    config: TrainConfig,
    element_bytes: f64,
}

impl Planner {
    /// Checks the configuration; `config.gpus_per_node` overrides the preset's.
    pub fn new(
        model: ModelSpec,
        cluster: ClusterSpec,
        config: TrainConfig,
    ) -> Result<Self, PlanError> {
        let bad = |m: String| Err(PlanError::InvalidConfig(m));
        if config.gpus == 0 {
            return bad("--gpus must be at least 1".into());
        }
        if config.gpus_per_node == 0 {
            return bad("--gpus-per-node must be at least 1".into());
        }
        if !config.gpus.is_multiple_of(config.gpus_per_node) {
            return bad(format!(
                "{} GPUs is not a whole number of nodes of {} GPUs (--gpus must be divisible by --gpus-per-node; for part of a node, set --gpus-per-node to the GPUs used)",
                config.gpus, config.gpus_per_node
            ));
        }
        if config.seq == 0 || config.micro_batch == 0 || config.grad_accum == 0 {
            return bad("--seq, --micro-batch and --grad-accum must be at least 1".into());
        }
        if config.seq > model.max_positions {
            return bad(format!(
                "sequence {} exceeds the {} positions of model {}",
                config.seq, model.max_positions, model.name
            ));
        }
        let cluster = ClusterSpec {
            gpus_per_node: config.gpus_per_node,
            ..cluster
        };
        Ok(Self {
            model,
            cluster,
            config,
            element_bytes: PARAM_BYTES,
        })
    }

    /// Bytes per element of the parameters and gradients that the collectives
    /// move (default [`PARAM_BYTES`], 16-bit mixed precision; 4 for an fp32
    /// run such as the CPU calibration). The memory model is unaffected.
    pub fn with_element_bytes(mut self, bytes: f64) -> Self {
        self.element_bytes = bytes;
        self
    }

    /// The model.
    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    /// The cluster, with the configured GPUs per node.
    pub fn cluster(&self) -> &ClusterSpec {
        &self.cluster
    }

    /// The training configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Partition sizes MiCS can use: divisors `p` of `N` that either divide
    /// `k` (the group sits inside a node) or are multiples of `k` (the group is
    /// whole nodes, gathered hierarchically).
    pub fn valid_partition_sizes(&self) -> Vec<u64> {
        let (n, k) = (self.config.gpus, self.config.gpus_per_node);
        (1..=n)
            .filter(|p| n % p == 0 && (k % p == 0 || p % k == 0))
            .collect()
    }

    /// Every requested strategy, and the recommended MiCS partition size
    /// (computed over every valid size, even when MiCS rows are not requested).
    pub fn plan(&self, choice: StrategyChoice) -> Result<Plan, PlanError> {
        let mut strategies = Vec::new();
        if matches!(choice, StrategyChoice::All | StrategyChoice::Ddp) {
            strategies.push(Strategy::Ddp);
        }
        if matches!(choice, StrategyChoice::All | StrategyChoice::Zero2) {
            strategies.push(Strategy::Zero2);
        }
        if matches!(choice, StrategyChoice::All | StrategyChoice::Zero3) {
            strategies.push(Strategy::Zero3);
        }
        let mut rows = strategies
            .into_iter()
            .map(|s| self.estimate(s))
            .collect::<Result<Vec<_>, _>>()?;
        // The recommendation looks at every partition size, whatever is shown.
        let mics_rows = self
            .valid_partition_sizes()
            .into_iter()
            .map(|p| self.estimate(Strategy::Mics { partition_size: p }))
            .collect::<Result<Vec<_>, _>>()?;
        let fitting = || mics_rows.iter().filter(|r| r.fits);
        let recommended_partition_size = fitting().map(|r| r.partition_size).min();
        let best_throughput_partition_size = fitting()
            .max_by(|a, b| a.tflops_per_gpu.total_cmp(&b.tflops_per_gpu))
            .map(|r| r.partition_size);
        if matches!(choice, StrategyChoice::All | StrategyChoice::Mics) {
            rows.extend(mics_rows);
        }
        Ok(Plan {
            rows,
            recommended_partition_size,
            best_throughput_partition_size,
        })
    }

    fn all_ranks(&self) -> Group {
        Group {
            size: self.config.gpus,
            ranks_per_node: self.config.gpus.min(self.config.gpus_per_node),
            concurrent_per_node: 1,
        }
    }

    /// Cost of one collective of each tensor (`scale` times its 16-bit size).
    fn per_tensor(&self, tensors: &[u64], scale: f64, cost: impl Fn(f64) -> CommCost) -> CommCost {
        tensors
            .iter()
            .map(|&numel| cost(numel as f64 * self.element_bytes * scale))
            .fold(CommCost::default(), |a, b| a + b)
    }

    /// Cost of bucketed collectives over `total` bytes.
    fn bucketed(&self, total: f64, cost: impl Fn(f64) -> CommCost) -> (CommCost, CommCost) {
        let buckets = (total / REDUCE_BUCKET_BYTES).ceil().max(1.0);
        let bucket = cost(total / buckets);
        (bucket.scaled(buckets), bucket)
    }

    /// Predicts memory and step time of `strategy`.
    pub fn estimate(&self, strategy: Strategy) -> Result<Estimate, PlanError> {
        let (model, cluster, config) = (&self.model, &self.cluster, &self.config);
        let (n, k) = (config.gpus, config.gpus_per_node);
        if let Strategy::Mics { partition_size: p } = strategy
            && !self.valid_partition_sizes().contains(&p)
        {
            return Err(PlanError::InvalidConfig(format!(
                "partition size {p} must divide {n} GPUs and either divide or be a multiple of {k} GPUs per node"
            )));
        }

        let tokens = (config.micro_batch * config.seq) as f64;
        let flops_per_token = model.flops_per_token(config.seq, config.checkpointing);
        let compute = tokens * flops_per_token / cluster.sustained_flops();
        let forward = compute
            * if config.checkpointing {
                0.25
            } else {
                1.0 / 3.0
            };
        let backward = compute - forward;
        let prefetch = config.prefetch_depth > 0;

        let tensors = model.all_tensors();
        let layer = model.layer_tensors();
        let psi_bytes = model.params() as f64 * self.element_bytes;

        // Per micro-step: gathers in forward, gathers in backward, reductions in
        // backward; per step: reductions of the last micro-step, exposed work
        // after it.
        let mut micro = MicroStep::default();
        let mut boundary_reduce = CommCost::default();
        let mut boundary_tail = 0.0;
        let mut after_step = CommCost::default();
        match strategy {
            Strategy::Ddp => {
                let (all, bucket) = self.bucketed(psi_bytes, |m| {
                    ring(cluster, Collective::AllReduce, self.all_ranks(), m)
                });
                boundary_reduce = all;
                boundary_tail = bucket.serial_time_s();
            }
            Strategy::Zero2 => {
                let (all, bucket) = self.bucketed(psi_bytes, |m| {
                    ring(cluster, Collective::ReduceScatter, self.all_ranks(), m)
                });
                micro.reduce = all;
                micro.reduce_tail = bucket.serial_time_s();
                after_step = self
                    .bucketed(psi_bytes, |m| {
                        ring(cluster, Collective::AllGather, self.all_ranks(), m)
                    })
                    .0;
            }
            Strategy::Zero3 => {
                let gather = |m| ring(cluster, Collective::AllGather, self.all_ranks(), m);
                let reduce = |m| ring(cluster, Collective::ReduceScatter, self.all_ranks(), m);
                micro.gather = self.per_tensor(&tensors, 1.0, gather);
                micro.gather_head = self.per_tensor(&layer, 1.0, gather).serial_time_s();
                micro.reduce = self.per_tensor(&tensors, 1.0, reduce);
                micro.reduce_tail = self.per_tensor(&layer, 1.0, reduce).serial_time_s();
            }
            Strategy::Mics { partition_size: p } => {
                let partition = Group {
                    size: p,
                    ranks_per_node: p.min(k),
                    concurrent_per_node: 1,
                };
                let gather = |m| {
                    if p > k {
                        hierarchical_all_gather(cluster, p, m)
                    } else {
                        ring(cluster, Collective::AllGather, partition, m)
                    }
                };
                let reduce = |m| ring(cluster, Collective::ReduceScatter, partition, m);
                micro.gather = self.per_tensor(&tensors, 1.0, gather);
                micro.gather_head = self.per_tensor(&layer, 1.0, gather).serial_time_s();
                micro.reduce = self.per_tensor(&tensors, 1.0, reduce);
                micro.reduce_tail = self.per_tensor(&layer, 1.0, reduce).serial_time_s();
                let replication = Group {
                    size: n / p,
                    ranks_per_node: if p >= k { 1 } else { k / p },
                    concurrent_per_node: p.min(k),
                };
                // Each rank all-reduces its accumulated 1/p shard of every
                // gradient once per step, coalesced into buckets like DDP's.
                let (all, bucket) = self.bucketed(psi_bytes / p as f64, |m| {
                    ring(cluster, Collective::AllReduce, replication, m)
                });
                boundary_reduce = all;
                boundary_tail = bucket.serial_time_s();
            }
        }

        let forward_phase = micro.phase(forward, micro.gather, CommCost::default(), 0.0, prefetch);
        let backward_phase = micro.phase(
            backward,
            micro.gather,
            micro.reduce,
            micro.reduce_tail,
            prefetch,
        );
        let last_backward = micro.phase(
            backward,
            micro.gather,
            micro.reduce + boundary_reduce,
            micro.reduce_tail.max(boundary_tail),
            prefetch,
        );
        let shards = strategy.partition_size(n) as f64;
        let local_params = match strategy {
            Strategy::Ddp => model.params() as f64,
            _ => model.params() as f64 / shards,
        };
        let optimizer = local_params * OPTIMIZER_STEP_BYTES / (cluster.hbm_gbps * 1e9);
        let s = config.grad_accum as f64;
        let step_time_s = s * forward_phase
            + (s - 1.0) * backward_phase
            + last_backward
            + optimizer
            + after_step.serial_time_s();

        let traffic =
            (micro.gather.scaled(2.0) + micro.reduce).scaled(s) + boundary_reduce + after_step;
        let memory = memory(model, config, strategy);
        let memory_gib = memory.total_gib();
        let fits = memory_gib <= cluster.gpu_memory_gib - cluster.reserved_gib;
        let tflops_per_gpu = s * tokens * flops_per_token / step_time_s / 1e12;
        Ok(Estimate {
            strategy,
            partition_size: strategy.partition_size(n),
            memory,
            memory_gib,
            fits,
            step_time_s,
            compute_time_s: s * compute,
            tflops_per_gpu,
            percent_of_peak: 100.0 * tflops_per_gpu / cluster.peak_tflops,
            intra_node_bytes: traffic.intra_bytes,
            inter_node_bytes: traffic.inter_bytes,
        })
    }
}

/// The collectives of one micro-step.
#[derive(Debug, Default, Clone, Copy)]
struct MicroStep {
    /// All parameter gathers of one pass (forward, and again in backward).
    gather: CommCost,
    /// The first unit's gathers, which nothing can hide.
    gather_head: f64,
    /// Gradient reductions of the backward pass.
    reduce: CommCost,
    /// The last unit's reduction, which nothing can hide.
    reduce_tail: f64,
}

impl MicroStep {
    /// Time of a pass of `compute` seconds that needs `gather` and issues
    /// `reduce`. With prefetch the gathers run ahead of compute: the pass
    /// takes the first unit's gather, then the longer of compute and the
    /// communication (NVLink and network links each busy on their own), then
    /// the last reduction. Without prefetch every gather waits in line.
    fn phase(
        &self,
        compute: f64,
        gather: CommCost,
        reduce: CommCost,
        tail: f64,
        prefetch: bool,
    ) -> f64 {
        let head = if gather.serial_time_s() > 0.0 {
            self.gather_head
        } else {
            0.0
        };
        if prefetch {
            let comm = (gather + reduce).concurrent_time_s();
            head + compute.max(comm - head) + tail
        } else {
            gather.serial_time_s() + compute.max(reduce.concurrent_time_s()) + tail
        }
    }
}
