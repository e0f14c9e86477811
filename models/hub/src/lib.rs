//! Hugging Face interop for mics models: safetensors checkpoints read and written
//! with Hugging Face key names, `config.json` files, tokenizers, and the lookup of the
//! test assets that `scripts/fetch-assets` caches.
//!
//! Every fallible function returns a [`HubError`] that names the file involved and,
//! for tensors, the key and the expected and found shape or dtype.

#![warn(missing_docs)]

pub mod assets;
pub mod checkpoint;
pub mod config;
mod error;
pub mod modules;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, CheckpointWriter, FloatDType, WEIGHTS_FILE, save_pretrained};
pub use error::HubError;
pub use modules::{LoadReport, SaveOptions, WeightLayout};
pub use tokenizer::TextTokenizer;
