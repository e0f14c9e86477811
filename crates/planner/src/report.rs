//! Plans as a text table for people and as JSON for programs.

use std::fmt::Write;

use serde::Serialize;

use crate::plan::{Plan, Planner};

/// One row of `mics plan --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonRow {
    /// `ddp`, `zero2`, `zero3` or `mics`.
    pub strategy: String,
    /// Ranks sharing one replica of the model states.
    pub partition_size: u64,
    /// Memory per GPU, GiB.
    pub memory_gib: f64,
    /// Whether it fits.
    pub fits: bool,
    /// Seconds per optimizer step.
    pub step_time_s: f64,
    /// Executed TFLOPS per GPU.
    pub tflops_per_gpu: f64,
}

/// The object `mics plan --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonPlan {
    /// One row per strategy and MiCS partition size.
    pub rows: Vec<JsonRow>,
    /// Smallest MiCS partition size that fits, or null.
    pub recommended_partition_size: Option<u64>,
}

impl From<&Plan> for JsonPlan {
    fn from(plan: &Plan) -> Self {
        Self {
            rows: plan
                .rows
                .iter()
                .map(|r| JsonRow {
                    strategy: r.strategy.name().to_string(),
                    partition_size: r.partition_size,
                    memory_gib: r.memory_gib,
                    fits: r.fits,
                    step_time_s: r.step_time_s,
                    tflops_per_gpu: r.tflops_per_gpu,
                })
                .collect(),
            recommended_partition_size: plan.recommended_partition_size,
        }
    }
}

/// The plan as a table with a header that restates the inputs and a
/// recommendation below.
pub fn render_table(planner: &Planner, plan: &Plan) -> String {
    let (model, cluster, config) = (planner.model(), planner.cluster(), planner.config());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {} ({:.2}B parameters, {} layers, hidden {}), seq {}, micro-batch {}, grad-accum {}, checkpointing {}",
        model.name,
        model.params() as f64 / 1e9,
        model.layers,
        model.hidden,
        config.seq,
        config.micro_batch,
        config.grad_accum,
        if config.checkpointing { "on" } else { "off" },
    );
    let _ = writeln!(
        out,
        "cluster {}: {}; {} GPUs in {} node(s) of {}; usable memory {:.1} GiB per GPU; peak {} TFLOPS",
        cluster.name,
        cluster.description,
        config.gpus,
        config.gpus / config.gpus_per_node,
        config.gpus_per_node,
        cluster.gpu_memory_gib - cluster.reserved_gib,
        cluster.peak_tflops,
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<9}{:>6}{:>10}{:>6}{:>11}{:>12}{:>8}{:>14}{:>14}",
        "strategy",
        "p",
        "mem GiB",
        "fits",
        "step s",
        "TFLOPS/GPU",
        "% peak",
        "intra GB/step",
        "inter GB/step"
    );
    for r in &plan.rows {
        let _ = writeln!(
            out,
            "{:<9}{:>6}{:>10.1}{:>6}{:>11.3}{:>12.1}{:>8.1}{:>14.2}{:>14.2}",
            r.strategy.name(),
            r.partition_size,
            r.memory_gib,
            if r.fits { "yes" } else { "no" },
            r.step_time_s,
            r.tflops_per_gpu,
            r.percent_of_peak,
            r.intra_node_bytes / 1e9,
            r.inter_node_bytes / 1e9,
        );
    }
    let _ = writeln!(out);
    match (
        plan.recommended_partition_size,
        plan.best_throughput_partition_size,
    ) {
        (None, _) => {
            let _ = writeln!(
                out,
                "no MiCS partition size fits in memory: lower --micro-batch, enable checkpointing, or add GPUs"
            );
        }
        (Some(small), Some(best)) if small != best => {
            let _ = writeln!(
                out,
                "recommended: MiCS p = {small} (smallest partition that fits); p = {best} has the highest predicted throughput"
            );
        }
        (Some(small), _) => {
            let _ = writeln!(
                out,
                "recommended: MiCS p = {small} (smallest partition that fits, also the fastest)"
            );
        }
    }
    out
}
