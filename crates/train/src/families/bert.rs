//! BERT (`mics-bert`, Hugging Face `BertForMaskedLM`): masked LM, the
//! decoder tied to the word embeddings plus its own bias.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use mics_bert::{BertConfig, BertForMaskedLM};
use mics_hub::{HubError, LoadReport};

use crate::ModelConfig;
use crate::family::{Head, ModelFamily};
use crate::memory::ModelDims;
use crate::task::TaskKind;

/// The BERT family.
pub struct Bert;

impl ModelFamily for Bert {
    const NAME: &'static str = "bert";
    const TASK: TaskKind = TaskKind::MaskedLm;
    type Config = BertConfig;
    type Model<B: Backend> = BertForMaskedLM<B>;

    fn sized(sizes: &ModelConfig, vocab_size: usize, positions: usize) -> BertConfig {
        let mut c = BertConfig::tiny(vocab_size, sizes.hidden, sizes.layers, sizes.heads);
        c.max_position_embeddings = positions;
        c
    }

    fn from_json(value: serde_json::Value) -> Result<BertConfig, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn with_dropout(config: BertConfig, p: f64) -> Result<BertConfig, String> {
        Ok(config.with_dropout(p))
    }

    fn validate(config: &BertConfig) -> Result<(), String> {
        config.validate().map(|_| ())
    }

    fn vocab_size(config: &BertConfig) -> usize {
        config.vocab_size
    }

    fn max_positions(config: &BertConfig) -> usize {
        config.max_position_embeddings
    }

    fn dims(c: &BertConfig) -> ModelDims {
        let (l, h, f) = (
            c.num_hidden_layers as f64,
            c.hidden_size as f64,
            c.intermediate_size as f64,
        );
        let (v, p, t) = (
            c.vocab_size as f64,
            c.max_position_embeddings as f64,
            c.type_vocab_size as f64,
        );
        // Per layer: q, k, v, o with biases, two layer norms, the MLP.
        let layer = 4.0 * (h * h + h) + 4.0 * h + (h * f + f) + (f * h + h);
        // Embeddings (+ layer norm), pooler, and the MLM head's transform,
        // layer norm and bias (its decoder is the tied word embedding).
        let other = (v + p + t) * h + 2.0 * h + (h * h + h) + (h * h + h) + 2.0 * h + v;
        ModelDims {
            layers: l,
            hidden: h,
            heads: c.num_attention_heads as f64,
            ffn: f,
            vocab: v,
            positions: p,
            params: l * layer + other,
            largest: (v * h).max(p * h).max(h * f),
        }
    }

    fn init<B: Backend>(config: &BertConfig, device: &B::Device) -> BertForMaskedLM<B> {
        BertForMaskedLM::init(config, device)
    }

    fn load<B: Backend>(
        dir: &Path,
        device: &B::Device,
    ) -> Result<(BertForMaskedLM<B>, LoadReport), HubError> {
        BertForMaskedLM::load(dir, device)
    }

    fn save<B: Backend>(model: &BertForMaskedLM<B>, dir: &Path) -> Result<(), HubError> {
        model.save(dir, &mics_bert::SaveOptions::bert_mlm())
    }

    fn head<B: Backend>(model: &BertForMaskedLM<B>, input_ids: Tensor<B, 2, Int>) -> Head<B> {
        let hidden = model.forward_hidden(input_ids, None);
        let [batch, seq, d] = hidden.dims();
        Head {
            hidden: hidden.reshape([batch * seq, d]),
            weight: model.lm_head_weight(),
            bias: Some(model.lm_head_bias()),
        }
    }

    fn logits<B: Backend>(
        model: &BertForMaskedLM<B>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        model.forward(input_ids, None)
    }
}
