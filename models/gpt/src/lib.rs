//! GPT-2 as a plain Burn module, with the Hugging Face `GPT2LMHeadModel` parameter
//! layout (`wte`, `wpe`, `h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}`,
//! `ln_f`; Conv1D weights stored `[in, out]`).
//!
//! - [`Gpt2Config`]: the fields of a Hugging Face `config.json`.
//! - [`Gpt2LMHeadModel`]: pre-norm causal transformer whose LM head is tied to the
//!   token embeddings.
//! - [`Gpt2LMHeadModel::load`] reads both layouts found in the wild (the original Hub
//!   files, and `save_pretrained` output with the `transformer.` prefix);
//!   [`Gpt2LMHeadModel::save`] writes them back.
//! - [`Gpt2LMHeadModel::generate`] samples continuations (temperature, top-k, seed).
//!
//! The model is generic over the backend and knows nothing of sharding.

#![warn(missing_docs)]

mod checkpoint;
mod config;
mod generate;
mod model;

pub use config::Gpt2Config;
pub use generate::{GenerateOptions, sample_next};
pub use mics_hub::SaveOptions;
pub use model::{Gpt2Attention, Gpt2Block, Gpt2LMHeadModel, Gpt2Mlp, Gpt2Model};
