//! One module per subcommand: each has its `Args` and a `run` function.

pub mod calibrate;
pub mod collectives;
pub mod data;
pub mod embed;
pub mod export;
pub mod generate;
pub mod gpu_bench;
pub mod logits;
pub mod plan;
pub mod train;
