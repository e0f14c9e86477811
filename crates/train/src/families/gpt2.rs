//! GPT-2 (`mics-gpt`, Hugging Face `GPT2LMHeadModel`): causal LM, the head
//! tied to `wte`.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use mics_gpt::{Gpt2Config, Gpt2LMHeadModel};
use mics_hub::{HubError, LoadReport};

use crate::ModelConfig;
use crate::family::{Head, ModelFamily};
use crate::memory::ModelDims;
use crate::task::TaskKind;

/// The GPT-2 family.
pub struct Gpt2;

impl ModelFamily for Gpt2 {
    const NAME: &'static str = "gpt2";
    const TASK: TaskKind = TaskKind::CausalLm;
    type Config = Gpt2Config;
    type Model<B: Backend> = Gpt2LMHeadModel<B>;

    fn sized(sizes: &ModelConfig, vocab_size: usize, positions: usize) -> Gpt2Config {
        let mut c = Gpt2Config::tiny(vocab_size, sizes.hidden, sizes.layers, sizes.heads);
        c.n_positions = positions;
        c
    }

    fn from_json(value: serde_json::Value) -> Result<Gpt2Config, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn with_dropout(config: Gpt2Config, p: f64) -> Result<Gpt2Config, String> {
        Ok(config.with_dropout(p))
    }

    fn validate(config: &Gpt2Config) -> Result<(), String> {
        config.validate().map(|_| ())
    }

    fn vocab_size(config: &Gpt2Config) -> usize {
        config.vocab_size
    }

    fn max_positions(config: &Gpt2Config) -> usize {
        config.n_positions
    }

    fn dims(c: &Gpt2Config) -> ModelDims {
        let (l, h, f) = (c.n_layer as f64, c.n_embd as f64, c.inner() as f64);
        let (v, p) = (c.vocab_size as f64, c.n_positions as f64);
        // Per block: two layer norms, c_attn, c_proj, c_fc and the MLP's
        // c_proj, with biases; the LM head is tied to the token embedding.
        let block = 4.0 * h + (3.0 * h * h + 3.0 * h) + (h * h + h) + (h * f + f) + (f * h + h);
        ModelDims {
            layers: l,
            hidden: h,
            heads: c.n_head as f64,
            ffn: f,
            vocab: v,
            positions: p,
            params: v * h + p * h + l * block + 2.0 * h,
            largest: (v * h).max(p * h).max(3.0 * h * h).max(h * f),
        }
    }

    fn init<B: Backend>(config: &Gpt2Config, device: &B::Device) -> Gpt2LMHeadModel<B> {
        Gpt2LMHeadModel::init(config, device)
    }

    fn load<B: Backend>(
        dir: &Path,
        device: &B::Device,
    ) -> Result<(Gpt2LMHeadModel<B>, LoadReport), HubError> {
        Gpt2LMHeadModel::load(dir, device)
    }

    fn save<B: Backend>(model: &Gpt2LMHeadModel<B>, dir: &Path) -> Result<(), HubError> {
        model.save(dir, &mics_gpt::SaveOptions::gpt2())
    }

    fn head<B: Backend>(model: &Gpt2LMHeadModel<B>, input_ids: Tensor<B, 2, Int>) -> Head<B> {
        let hidden = model.forward_hidden(input_ids);
        let [batch, seq, d] = hidden.dims();
        Head {
            hidden: hidden.reshape([batch * seq, d]),
            weight: model.lm_head_weight(),
            bias: None,
        }
    }

    fn logits<B: Backend>(
        model: &Gpt2LMHeadModel<B>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        model.forward(input_ids)
    }
}
