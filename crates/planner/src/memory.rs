//! Memory per GPU of each strategy under mixed precision.
//!
//! Model states take the usual 2 + 2 + 12 bytes per parameter: 16-bit
//! parameters, 16-bit gradients, and the fp32 master copy with AdamW's two
//! moments. DDP replicates all three; ZeRO-2 shards gradients and optimizer
//! state over all `N` ranks; ZeRO-3 shards everything over `N`; MiCS shards
//! everything over its partition group of `p`.

use crate::model::ModelSpec;
use crate::plan::{Strategy, TrainConfig};

/// Bytes per parameter of each model state.
pub const PARAM_BYTES: f64 = 2.0;
/// 16-bit gradient.
pub const GRAD_BYTES: f64 = 2.0;
/// fp32 master parameter + AdamW first and second moments.
pub const OPTIMIZER_BYTES: f64 = 12.0;

/// Where the memory of one GPU goes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryBreakdown {
    /// 16-bit parameters this GPU stores (its shard, or all of them).
    pub params: f64,
    /// 16-bit gradients this GPU stores, plus the reduction bucket.
    pub grads: f64,
    /// fp32 master parameters and AdamW moments.
    pub optimizer: f64,
    /// Gathered parameters alive at once (the unit in use, the prefetched
    /// ones) and the full gradient of the unit being reduced.
    pub gather_buffers: f64,
    /// Activations of one micro-batch.
    pub activations: f64,
}

impl MemoryBreakdown {
    /// Sum of the parts, bytes.
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer + self.gather_buffers + self.activations
    }

    /// Sum of the parts, GiB.
    pub fn total_gib(&self) -> f64 {
        self.total() / (1u64 << 30) as f64
    }
}

/// Memory of one GPU for `strategy`.
///
/// Sharded strategies keep `1 + prefetch_depth` gathered units (a unit is one
/// transformer layer, or the word embedding when it is larger) plus one unit of
/// full 16-bit gradients before its reduce-scatter. ZeRO-2 keeps one unit of
/// full gradients as its reduction bucket.
pub fn memory(model: &ModelSpec, config: &TrainConfig, strategy: Strategy) -> MemoryBreakdown {
    let psi = model.params() as f64;
    let unit = model.largest_gather_unit() as f64;
    let activations = model.activation_bytes(config.micro_batch, config.seq, config.checkpointing);
    let shards = strategy.partition_size(config.gpus) as f64;
    let gathered = (1.0 + config.prefetch_depth as f64) * unit * PARAM_BYTES + unit * GRAD_BYTES;
    let (params, grads, optimizer, gather_buffers) = match strategy {
        Strategy::Ddp => (
            psi * PARAM_BYTES,
            psi * GRAD_BYTES,
            psi * OPTIMIZER_BYTES,
            0.0,
        ),
        Strategy::Zero2 => (
            psi * PARAM_BYTES,
            psi * GRAD_BYTES / shards + unit * GRAD_BYTES,
            psi * OPTIMIZER_BYTES / shards,
            0.0,
        ),
        // A partition of one is a plain replica: nothing to gather.
        Strategy::Mics { partition_size: 1 } => (
            psi * PARAM_BYTES,
            psi * GRAD_BYTES,
            psi * OPTIMIZER_BYTES,
            0.0,
        ),
        Strategy::Zero3 | Strategy::Mics { .. } => (
            psi * PARAM_BYTES / shards,
            psi * GRAD_BYTES / shards,
            psi * OPTIMIZER_BYTES / shards,
            gathered,
        ),
    };
    MemoryBreakdown {
        params,
        grads,
        optimizer,
        gather_buffers,
        activations,
    }
}
