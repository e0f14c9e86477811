//! A Llama-style decoder as a plain Burn module, with the Hugging Face
//! `LlamaForCausalLM` parameter layout (`model.embed_tokens`,
//! `model.layers.N.{input_layernorm,self_attn.{q,k,v,o}_proj,post_attention_layernorm,
//! mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`; `nn.Linear` weights stored
//! `[out, in]`, no biases).
//!
//! - [`LlamaConfig`]: the fields of a Hugging Face `config.json`; grouped-query
//!   attention (`num_key_value_heads`), `head_dim`, `rope_theta`,
//!   `tie_word_embeddings`. SiLU, no biases and plain RoPE only: anything else is a
//!   clear error.
//! - [`LlamaForCausalLM`]: pre-norm causal transformer with RMS norms, rotary
//!   position embeddings and a gated SiLU MLP; [`forward`](LlamaForCausalLM::forward)
//!   gives logits, [`forward_hidden`](LlamaForCausalLM::forward_hidden) and
//!   [`lm_head_weight`](LlamaForCausalLM::lm_head_weight) the two operands of the LM
//!   head, for a fused head and loss.
//! - [`LlamaForCausalLM::load`] reads `config.json` and `model.safetensors` (F32,
//!   F16, BF16); [`LlamaForCausalLM::save`] writes what `from_pretrained` reads.
//! - [`LlamaForCausalLM::generate`] samples continuations with `mics-gpt`'s sampler.
//!
//! The model is generic over the backend and knows nothing of sharding.

#![warn(missing_docs)]

mod checkpoint;
mod config;
mod generate;
mod model;

pub use config::LlamaConfig;
pub use mics_gpt::{GenerateOptions, sample_next};
pub use mics_hub::SaveOptions;
pub use model::{
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel,
    LlamaRotaryEmbedding, RmsNorm, apply_rotary_pos_emb, repeat_kv, rotate_half,
};
