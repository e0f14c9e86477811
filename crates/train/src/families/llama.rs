//! Llama (`mics-llama`, Hugging Face `LlamaForCausalLM`): causal LM, RMSNorm,
//! rotary positions, SwiGLU, no biases, no dropout.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use mics_hub::{HubError, LoadReport};
use mics_llama::{LlamaConfig, LlamaForCausalLM};

use crate::ModelConfig;
use crate::family::{Head, ModelFamily};
use crate::memory::ModelDims;
use crate::task::TaskKind;

/// The Llama family.
pub struct Llama;

impl ModelFamily for Llama {
    const NAME: &'static str = "llama";
    const TASK: TaskKind = TaskKind::CausalLm;
    type Config = LlamaConfig;
    type Model<B: Backend> = LlamaForCausalLM<B>;

    fn sized(sizes: &ModelConfig, vocab_size: usize, positions: usize) -> LlamaConfig {
        let mut c = LlamaConfig::tiny(vocab_size, sizes.hidden, sizes.layers, sizes.heads);
        c.max_position_embeddings = positions;
        // Small models trained from scratch share the embedding with the
        // head, as GPT-2 does: the vocabulary dominates their size.
        c.tie_word_embeddings = true;
        c
    }

    fn from_json(value: serde_json::Value) -> Result<LlamaConfig, String> {
        LlamaConfig::from_json(value).map_err(|e| e.to_string())
    }

    fn with_dropout(config: LlamaConfig, p: f64) -> Result<LlamaConfig, String> {
        if p > 0.0 {
            return Err(format!(
                "{p}: Llama applies no dropout (set model.dropout = 0)"
            ));
        }
        Ok(config)
    }

    fn validate(config: &LlamaConfig) -> Result<(), String> {
        config.validate()
    }

    fn vocab_size(config: &LlamaConfig) -> usize {
        config.vocab_size
    }

    fn max_positions(config: &LlamaConfig) -> usize {
        config.max_position_embeddings
    }

    fn dims(c: &LlamaConfig) -> ModelDims {
        let (l, h, f) = (
            c.num_hidden_layers as f64,
            c.hidden_size as f64,
            c.intermediate_size as f64,
        );
        let v = c.vocab_size as f64;
        let (q, kv) = (
            (c.num_attention_heads * c.head_dim()) as f64,
            (c.kv_heads() * c.head_dim()) as f64,
        );
        let attn_bias = if c.attention_bias {
            q + 2.0 * kv + h
        } else {
            0.0
        };
        let mlp_bias = if c.mlp_bias { 2.0 * f + h } else { 0.0 };
        // Per layer: q, k, v, o; gate, up, down; two RMS norms.
        let layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * f + 2.0 * h + attn_bias + mlp_bias;
        let head = if c.tie_word_embeddings { 0.0 } else { v * h };
        ModelDims {
            layers: l,
            hidden: h,
            heads: c.num_attention_heads as f64,
            ffn: f,
            vocab: v,
            positions: 0.0,
            params: v * h + l * layer + h + head,
            largest: (v * h).max(h * f).max(h * q),
        }
    }

    fn init<B: Backend>(config: &LlamaConfig, device: &B::Device) -> LlamaForCausalLM<B> {
        LlamaForCausalLM::init(config, device)
    }

    fn load<B: Backend>(
        dir: &Path,
        device: &B::Device,
    ) -> Result<(LlamaForCausalLM<B>, LoadReport), HubError> {
        LlamaForCausalLM::load(dir, device)
    }

    fn save<B: Backend>(model: &LlamaForCausalLM<B>, dir: &Path) -> Result<(), HubError> {
        model.save(dir, &mics_llama::SaveOptions::llama())
    }

    fn head<B: Backend>(model: &LlamaForCausalLM<B>, input_ids: Tensor<B, 2, Int>) -> Head<B> {
        let hidden = model.forward_hidden(input_ids);
        let [batch, seq, d] = hidden.dims();
        Head {
            hidden: hidden.reshape([batch * seq, d]),
            weight: model.lm_head_weight(),
            bias: None,
        }
    }

    fn logits<B: Backend>(
        model: &LlamaForCausalLM<B>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        model.forward(input_ids)
    }
}
