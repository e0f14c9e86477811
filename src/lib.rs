//! mics: MiCS sharded data-parallel training on Burn.
//!
//! This root crate re-exports the workspace's crates under short names, so a
//! user depends on one crate:
//!
//! - [`backend`]: `Mics<B>`, the sharding backend decorator, the one-call
//!   shard/gather API and the sharded optimizer;
//! - [`comm`]: the communicator trait, its engines and the MiCS topology;
//! - [`planner`]: memory and step-time models of DDP, ZeRO and MiCS;
//! - [`hub`]: Hugging Face safetensors, `config.json` and tokenizers;
//! - [`bert`], [`gpt`]: the models, plain Burn modules.

pub use mics_backend as backend;
pub use mics_bert as bert;
pub use mics_comm as comm;
pub use mics_gpt as gpt;
pub use mics_hub as hub;
pub use mics_planner as planner;
