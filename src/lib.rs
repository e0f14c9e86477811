//! mics: MiCS sharded data-parallel training on Burn.
//!
//! This root crate re-exports the workspace's crates under short names, so a
//! user depends on one crate:
//!
//! - [`backend`]: `Mics<B>`, the sharding backend decorator, the one-call
//!   shard/gather API and the sharded optimizer;
//! - [`comm`]: the communicator trait, its engines and the MiCS topology;
//! - [`plain`]: `Plain<B>`, plain Burn made an autodiff backend in builds
//!   where Burn's distributed autodiff is on (references, baselines);
//! - [`planner`]: memory and step-time models of DDP, ZeRO and MiCS;
//! - [`hub`]: Hugging Face safetensors, `config.json` and tokenizers;
//! - [`bert`], [`gpt`], [`llama`]: the models, plain Burn modules;
//! - [`datasets`]: tokenized corpora, the global-batch sampler, LM and MLM batches;
//! - [`fused`]: fused linear + cross-entropy for large vocabularies (the LM
//!   head's loss and gradients in chunks of tokens);
//! - [`train`]: the trainer behind `mics train` and `mics export` (configs, the
//!   sharded training loop, sharded checkpoints, Hugging Face export).
//!
//! The `examples/` directory shows each of them at work:
//! `cargo run --example train_gpt -- --tiny`, `train_bert`, `custom_model` and
//! `load_checkpoint` (`scripts/run-examples` runs all four).

pub use mics_backend as backend;
pub use mics_bert as bert;
pub use mics_comm as comm;
pub use mics_datasets as datasets;
pub use mics_fused as fused;
pub use mics_gpt as gpt;
pub use mics_hub as hub;
pub use mics_llama as llama;
pub use mics_plain as plain;
pub use mics_planner as planner;
pub use mics_train as train;
