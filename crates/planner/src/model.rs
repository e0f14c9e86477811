//! Transformer shapes: presets, Hugging Face `config.json` loading, parameter
//! counts per tensor, FLOPs per token and activation sizes.

use std::path::Path;

use serde_json::Value;

use crate::error::PlanError;

/// Which layout the parameters follow (Hugging Face `BertModel` or GPT-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Encoder with separate q/k/v projections, pooler and tied MLM head.
    Bert,
    /// Decoder with fused `c_attn`, final layer norm and tied LM head.
    Gpt,
}

/// The shape of a transformer, enough to count its parameters, FLOPs and
/// activations.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Preset name or the config file it came from.
    pub name: String,
    /// Parameter layout.
    pub architecture: Architecture,
    /// Transformer layers `L`.
    pub layers: u64,
    /// Hidden size `h`.
    pub hidden: u64,
    /// Attention heads `a`.
    pub heads: u64,
    /// Feed-forward (intermediate) size, usually `4h`.
    pub ffn: u64,
    /// Vocabulary size `V`.
    pub vocab: u64,
    /// Learned position embeddings (maximum sequence length).
    pub max_positions: u64,
    /// Sequence length used when the user gives none.
    pub default_seq: u64,
}

/// Names accepted by [`ModelSpec::preset`].
pub const MODEL_PRESETS: &[&str] = &[
    "gpt2-124m",
    "gpt2-350m",
    "gpt2-1.5b",
    "bert-base",
    "bert-large",
    "bert-10b",
    "bert-20b",
    "gpt-100b",
    "gpt-175b",
];

/// GPT-2 BPE vocabulary (Radford et al. 2019).
const GPT2_VOCAB: u64 = 50257;
/// BERT uncased WordPiece vocabulary (Devlin et al. 2018).
const BERT_VOCAB: u64 = 30522;

impl ModelSpec {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        architecture: Architecture,
        layers: u64,
        hidden: u64,
        heads: u64,
        vocab: u64,
        max_positions: u64,
        default_seq: u64,
    ) -> Self {
        Self {
            name: name.to_string(),
            architecture,
            layers,
            hidden,
            heads,
            ffn: 4 * hidden,
            vocab,
            max_positions,
            default_seq,
        }
    }

    /// A named preset (see [`MODEL_PRESETS`]).
    ///
    /// GPT-2 and BERT shapes are the published ones. `bert-10b` and `bert-20b`
    /// follow the shapes of the MiCS evaluation's BERT models (hidden 2560 x 127
    /// layers and hidden 5120 x 64 layers, so that 12·L·h² ≈ 10B and 20B).
    /// `gpt-100b` is hidden 10240 x 80 layers (12·L·h² ≈ 100.7B) and `gpt-175b`
    /// is GPT-3's 12288 x 96 (Brown et al. 2020), both at sequence 2048.
    pub fn preset(name: &str) -> Result<Self, PlanError> {
        use Architecture::{Bert, Gpt};
        let spec = match name {
            "gpt2-124m" => Self::new(name, Gpt, 12, 768, 12, GPT2_VOCAB, 1024, 1024),
            "gpt2-350m" => Self::new(name, Gpt, 24, 1024, 16, GPT2_VOCAB, 1024, 1024),
            "gpt2-1.5b" => Self::new(name, Gpt, 48, 1600, 25, GPT2_VOCAB, 1024, 1024),
            "bert-base" => Self::new(name, Bert, 12, 768, 12, BERT_VOCAB, 512, 512),
            "bert-large" => Self::new(name, Bert, 24, 1024, 16, BERT_VOCAB, 512, 512),
            "bert-10b" => Self::new(name, Bert, 127, 2560, 40, BERT_VOCAB, 512, 512),
            "bert-20b" => Self::new(name, Bert, 64, 5120, 40, BERT_VOCAB, 512, 512),
            "gpt-100b" => Self::new(name, Gpt, 80, 10240, 80, GPT2_VOCAB, 2048, 2048),
            "gpt-175b" => Self::new(name, Gpt, 96, 12288, 96, GPT2_VOCAB, 2048, 2048),
            _ => {
                return Err(PlanError::UnknownModel {
                    name: name.to_string(),
                    presets: MODEL_PRESETS.join(", "),
                });
            }
        };
        Ok(spec)
    }

    /// A preset name, or else a path to a Hugging Face `config.json`.
    pub fn resolve(name_or_path: &str) -> Result<Self, PlanError> {
        if MODEL_PRESETS.contains(&name_or_path) {
            return Self::preset(name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.is_file() || name_or_path.contains('/') || name_or_path.ends_with(".json") {
            return Self::from_hf_config(path);
        }
        Err(PlanError::UnknownModel {
            name: name_or_path.to_string(),
            presets: MODEL_PRESETS.join(", "),
        })
    }

    /// Reads a Hugging Face `config.json`: BERT keys (`hidden_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
    /// `vocab_size`, `max_position_embeddings`) or GPT-2 keys (`n_embd`,
    /// `n_layer`, `n_head`, `vocab_size`, `n_positions`, optional `n_inner`).
    pub fn from_hf_config(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|reason| PlanError::Io {
            path: path.to_path_buf(),
            reason,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|reason| PlanError::Json {
            path: path.to_path_buf(),
            reason,
        })?;
        let problem = |problem: String| PlanError::ModelConfig {
            path: path.to_path_buf(),
            problem,
        };
        let Some(object) = json.as_object() else {
            return Err(problem("expected a JSON object".to_string()));
        };
        let field = |key: &str| -> Result<Option<u64>, PlanError> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => match value.as_u64() {
                    Some(0) | None => Err(problem(format!(
                        "`{key}` must be a positive integer, found {value}"
                    ))),
                    Some(n) => Ok(Some(n)),
                },
            }
        };
        let required = |key: &str| -> Result<u64, PlanError> {
            field(key)?.ok_or_else(|| problem(format!("missing `{key}`")))
        };
        let name = path.display().to_string();
        let spec = if object.contains_key("n_embd") || object.contains_key("n_layer") {
            let hidden = required("n_embd")?;
            let positions = required("n_positions")?;
            Self {
                name,
                architecture: Architecture::Gpt,
                layers: required("n_layer")?,
                hidden,
                heads: required("n_head")?,
                ffn: field("n_inner")?.unwrap_or(4 * hidden),
                vocab: required("vocab_size")?,
                max_positions: positions,
                default_seq: positions,
            }
        } else if object.contains_key("hidden_size") || object.contains_key("num_hidden_layers") {
            let positions = required("max_position_embeddings")?;
            Self {
                name,
                architecture: Architecture::Bert,
                layers: required("num_hidden_layers")?,
                hidden: required("hidden_size")?,
                heads: required("num_attention_heads")?,
                ffn: required("intermediate_size")?,
                vocab: required("vocab_size")?,
                max_positions: positions,
                default_seq: positions,
            }
        } else {
            return Err(problem(
                "neither BERT keys (hidden_size, num_hidden_layers, ...) nor GPT-2 keys (n_embd, n_layer, ...) found"
                    .to_string(),
            ));
        };
        if spec.hidden % spec.heads != 0 {
            return Err(problem(format!(
                "hidden size {} is not divisible by {} heads",
                spec.hidden, spec.heads
            )));
        }
        Ok(spec)
    }

    /// Element counts of the parameter tensors of one transformer layer, in the
    /// Hugging Face layout (each is gathered by its own collective).
    pub fn layer_tensors(&self) -> Vec<u64> {
        let (h, f) = (self.hidden, self.ffn);
        match self.architecture {
            // query, key, value, attention output, 2 layer norms, intermediate, output.
            Architecture::Bert => vec![
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h,
                h,
                h * f,
                f,
                f * h,
                h,
                h,
                h,
            ],
            // ln_1, c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj.
            Architecture::Gpt => vec![h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * f, f, f * h, h],
        }
    }

    /// Element counts of the tensors outside the layers: embeddings, final or
    /// embedding layer norm, BERT's pooler and MLM transform. Output heads are
    /// tied to the word embeddings and add no tensor.
    pub fn other_tensors(&self) -> Vec<u64> {
        let (h, v, pos) = (self.hidden, self.vocab, self.max_positions);
        match self.architecture {
            Architecture::Bert => vec![v * h, pos * h, 2 * h, h, h, h * h, h, h * h, h, h, h, v],
            Architecture::Gpt => vec![v * h, pos * h, h, h],
        }
    }

    /// Parameters of one transformer layer.
    pub fn layer_params(&self) -> u64 {
        self.layer_tensors().iter().sum()
    }

    /// All parameters `Ψ`.
    pub fn params(&self) -> u64 {
        self.layers * self.layer_params() + self.other_tensors().iter().sum::<u64>()
    }

    /// Every parameter tensor of the model (layers, then the rest).
    pub fn all_tensors(&self) -> Vec<u64> {
        let layer = self.layer_tensors();
        let mut all = Vec::with_capacity(layer.len() * self.layers as usize + 12);
        for _ in 0..self.layers {
            all.extend_from_slice(&layer);
        }
        all.extend(self.other_tensors());
        all
    }

    /// The largest block of parameters that is gathered at once and kept while
    /// it is used: one layer, or the word embedding when that is larger.
    pub fn largest_gather_unit(&self) -> u64 {
        let biggest_other = self.other_tensors().into_iter().max().unwrap_or(0);
        self.layer_params().max(biggest_other)
    }

    /// Training FLOPs per token at sequence length `seq`: `6Ψ + 12·L·h·s`
    /// (forward and backward of every matmul, plus attention scores and their
    /// use), or `8Ψ + 16·L·h·s` when activation checkpointing recomputes the
    /// forward pass.
    pub fn flops_per_token(&self, seq: u64, recompute: bool) -> f64 {
        let psi = self.params() as f64;
        let attention = (self.layers * self.hidden * seq) as f64;
        if recompute {
            8.0 * psi + 16.0 * attention
        } else {
            6.0 * psi + 12.0 * attention
        }
    }

    /// Bytes of activations kept for backward by one layer without
    /// checkpointing, for micro-batch `b` at sequence `s`, in 16-bit precision:
    /// `s·b·h·(34 + 5·a·s/h)` (Korthikanti et al. 2022, "Reducing Activation
    /// Recomputation in Large Transformer Models", eq. 1 without tensor
    /// parallelism).
    pub fn layer_activation_bytes(&self, micro_batch: u64, seq: u64) -> f64 {
        let (s, b, h, a) = (
            seq as f64,
            micro_batch as f64,
            self.hidden as f64,
            self.heads as f64,
        );
        s * b * h * (34.0 + 5.0 * a * s / h)
    }

    /// Activation bytes per GPU for a micro-batch: every layer's activations,
    /// or with checkpointing each layer's 16-bit input plus one layer being
    /// recomputed; plus the fp32 logits of the output head (`4·b·s·V`).
    pub fn activation_bytes(&self, micro_batch: u64, seq: u64, checkpointing: bool) -> f64 {
        let layer = self.layer_activation_bytes(micro_batch, seq);
        let layers = self.layers as f64;
        let tokens = (micro_batch * seq) as f64;
        let kept = if checkpointing {
            layers * 2.0 * tokens * self.hidden as f64 + layer
        } else {
            layers * layer
        };
        kept + 4.0 * tokens * self.vocab as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_published_sizes() {
        // GPT-2 small has 124,439,808 parameters (Hugging Face `gpt2`).
        assert_eq!(
            ModelSpec::preset("gpt2-124m").unwrap().params(),
            124_439_808
        );
        // BERT-base uncased with pooler and MLM head: 110M.
        let bert = ModelSpec::preset("bert-base").unwrap().params() as f64;
        assert!((bert / 1e6 - 110.0).abs() < 1.0, "{bert}");
        for (name, billions) in [
            ("gpt2-1.5b", 1.56),
            ("bert-10b", 10.07),
            ("bert-20b", 20.3),
            ("gpt-100b", 101.2),
            ("gpt-175b", 174.6),
        ] {
            let got = ModelSpec::preset(name).unwrap().params() as f64 / 1e9;
            assert!((got - billions).abs() / billions < 0.01, "{name}: {got}");
        }
    }

    #[test]
    fn every_preset_resolves_and_unknown_names_are_refused() {
        for name in MODEL_PRESETS {
            assert_eq!(ModelSpec::resolve(name).unwrap().name, *name);
        }
        let err = ModelSpec::resolve("gpt-5").unwrap_err().to_string();
        assert!(err.contains("unknown model `gpt-5`"), "{err}");
    }
}
