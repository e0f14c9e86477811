//! Scale planner for MiCS: predicts memory per GPU and step time of DDP,
//! ZeRO-2, ZeRO-3 and MiCS for a transformer on a GPU cluster, from an analytic
//! model (see `docs/planner.md` for the equations and their limits).
//!
//! ```
//! use mics_planner::{ClusterSpec, ModelSpec, Planner, StrategyChoice, TrainConfig};
//!
//! let planner = Planner::new(
//!     ModelSpec::preset("gpt-100b")?,
//!     ClusterSpec::preset("p4d")?,
//!     TrainConfig {
//!         gpus: 512,
//!         gpus_per_node: 8,
//!         seq: 2048,
//!         micro_batch: 2,
//!         grad_accum: 4,
//!         checkpointing: true,
//!         prefetch_depth: 1,
//!     },
//! )?;
//! let plan = planner.plan(StrategyChoice::All)?;
//! assert!(plan.recommended_partition_size.is_some());
//! # Ok::<(), mics_planner::PlanError>(())
//! ```

#![warn(missing_docs)]

mod calibrate;
mod cluster;
mod collective;
mod error;
mod memory;
mod model;
mod plan;
mod report;
mod sweep;

pub use calibrate::{CollectiveProbe, CommFit, SharedThroughput, fit_collectives, machine_cluster};
pub use cluster::{CLUSTER_PRESETS, ClusterSpec};
pub use collective::{Collective, CommCost, Group, hierarchical_all_gather, ring};
pub use error::PlanError;
pub use memory::{GRAD_BYTES, MemoryBreakdown, OPTIMIZER_BYTES, PARAM_BYTES, memory};
pub use model::{Architecture, MODEL_PRESETS, ModelSpec};
pub use plan::{
    Estimate, OPTIMIZER_STEP_BYTES, Plan, Planner, REDUCE_BUCKET_BYTES, Strategy, StrategyChoice,
    TrainConfig,
};
pub use report::{JsonPlan, JsonRow, render_table};
pub use sweep::{PLOT_FONT, SweepPoint, plot_sweep, sweep};
