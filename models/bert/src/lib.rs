//! BERT as a plain Burn module, with the Hugging Face `BertModel` and
//! `BertForMaskedLM` parameter layout.
//!
//! - [`BertConfig`]: the fields of a Hugging Face `config.json`.
//! - [`BertModel`]: embeddings, encoder layers and pooler; [`BertForMaskedLM`] adds
//!   the masked-LM head whose decoder is tied to the word embeddings.
//! - [`BertModel::load`] / [`BertForMaskedLM::load`] read safetensors files with or
//!   without the `bert.` prefix; `save` writes them back with the same keys.
//! - [`mean_pool`] and [`l2_normalize`]: sentence embeddings as sentence-transformers
//!   computes them.
//!
//! The models are generic over the backend and know nothing of sharding.

#![warn(missing_docs)]

mod checkpoint;
mod config;
mod model;

pub use config::{Activation, BertConfig};
pub use mics_hub::SaveOptions;
pub use model::{
    BertAttention, BertEmbeddings, BertForMaskedLM, BertLayer, BertLmHead, BertModel, BertOutput,
    l2_normalize, mean_pool, pad_batch,
};
