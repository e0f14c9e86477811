//! Tokenized training corpora for mics.
//!
//! - [`prepare`] tokenizes a [`Corpus`] (Shakespeare's plays, Moby-Dick, or your
//!   `.txt` files) with a [`TokenizerSpec`] (GPT-2 BPE, BERT WordPiece, or a
//!   `tokenizer.json`) into a dataset directory: `train.bin`, `val.bin` (flat
//!   little-endian `u16`/`u32` ids), `tokenizer.json` and `meta.json`
//!   ([`DatasetMeta`]). The command line's `mics data prepare` calls it.
//! - [`TokenFile`] memory-maps one split.
//! - [`GlobalBatchSampler`] decides which fixed windows of tokens every step
//!   trains on, the same for every world size, partition size and accumulation
//!   count with the same global batch; [`GlobalBatchSampler::micro_batch`] gives a
//!   rank's share of one micro-step.
//! - [`lm_batch`] and [`mlm_batch`] turn windows into causal-LM and BERT masked-LM
//!   batches (the masking depends only on the seed and the window).
//!
//! ```no_run
//! use mics_datasets::*;
//! # fn main() -> Result<(), DatasetError> {
//! let dir = std::path::Path::new("data/shakespeare-gpt2");
//! prepare(&PrepareOptions::new(Corpus::Shakespeare, TokenizerSpec::Gpt2, dir))?;
//! let train = TokenFile::open(dir, Split::Train)?;
//! let (seq_len, world, accum) = (128, 4, 2);
//! let sampler = GlobalBatchSampler::new(train.len(), seq_len + 1, 32, 0)?;
//! let windows = sampler.micro_batch(0, /* rank */ 1, world, accum, /* micro */ 0)?;
//! let batch = lm_batch(&train, &windows, seq_len); // 4 rows of 128 tokens
//! # Ok(()) }
//! ```
//!
//! Every error is a [`DatasetError`] whose message names the file, key or value at
//! fault.

#![warn(missing_docs)]

mod batch;
mod error;
mod meta;
mod prepare;
pub mod rng;
mod sampler;
mod spec;
mod tokens;

pub use batch::{IGNORE_INDEX, LmBatch, MLM_SELECT_FRACTION, MlmBatch, lm_batch, mlm_batch};
pub use error::DatasetError;
pub use meta::{
    DatasetMeta, FORMAT_VERSION, META_FILE, SpecialTokens, TOKENIZER_FILE, TokenDType, open_meta,
};
pub use prepare::{DEFAULT_VAL_FRACTION, PrepareOptions, prepare, val_tokens_of_document};
pub use sampler::GlobalBatchSampler;
pub use spec::{Corpus, TokenizerSpec};
pub use tokens::{Split, TokenFile};
