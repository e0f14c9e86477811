//! Reading and writing Llama safetensors checkpoints with Hugging Face keys.

use std::path::Path;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use mics_hub::modules::{LoadReport, WeightLayout, load_embedding, save_linear};
use mics_hub::{
    Checkpoint, CheckpointWriter, FloatDType, HubError, SaveOptions, WEIGHTS_FILE, config,
    save_pretrained,
};

use crate::config::LlamaConfig;
use crate::model::{
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel, RmsNorm, rotary_emb,
};

/// `torch.nn.Linear` stores weights `[out, in]`.
const LINEAR: WeightLayout = WeightLayout::OutIn;
const LM_HEAD: &str = "lm_head.weight";
const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The key prefix of the base model (`LlamaModel`) in a `LlamaForCausalLM` file.
const PREFIX: &str = "model.";

/// Whether `key` is a buffer older transformers releases saved (`inv_freq` of the
/// rotary embeddings), not a parameter.
fn is_buffer(key: &str) -> bool {
    key.contains(".rotary_emb.")
}

/// Reads a bias-free dense layer `{prefix}.weight` stored `[d_out, d_in]`.
fn load_linear_no_bias<B: Backend>(
    ckpt: &Checkpoint,
    prefix: &str,
    [d_in, d_out]: [usize; 2],
    device: &B::Device,
) -> Result<Linear<B>, HubError> {
    let weight = ckpt.tensor::<B, 2>(&format!("{prefix}.weight"), [d_out, d_in], device)?;
    Ok(Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias: None,
    })
}

/// Reads an RMS norm `{prefix}.weight`.
fn load_rms_norm<B: Backend>(
    ckpt: &Checkpoint,
    prefix: &str,
    d: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, HubError> {
    Ok(RmsNorm {
        weight: Param::from_tensor(ckpt.tensor(&format!("{prefix}.weight"), [d], device)?),
        eps,
    })
}

impl LlamaConfig {
    /// Reads `config.json` in `dir` (either transformers spelling of `rope_theta`,
    /// see [`LlamaConfig::from_json`]) and validates it.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self, HubError> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let value: serde_json::Value = config::read_config(dir)?;
        let config = LlamaConfig::from_json(value).map_err(|e| HubError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|reason| HubError::Config { path, reason })?;
        Ok(config)
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Loads `config.json` and `model.safetensors` from `dir` (F32, F16 or BF16).
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<(Self, LoadReport), HubError> {
        let dir = dir.as_ref();
        let config = LlamaConfig::read(dir)?;
        let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
        Self::from_checkpoint(&ckpt, &config, device)
    }

    /// Reads the model from `ckpt`, with the keys of `LlamaForCausalLM`:
    /// `lm_head.weight` required when untied, absent or equal to
    /// `model.embed_tokens.weight` when tied; `rotary_emb.inv_freq` buffers ignored
    /// (listed in the report). Any other key the model does not read is an error,
    /// as is a missing key or a wrong shape.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &LlamaConfig,
        device: &B::Device,
    ) -> Result<(Self, LoadReport), HubError> {
        config.validate().map_err(|reason| HubError::Config {
            path: ckpt.path().to_path_buf(),
            reason,
        })?;
        let report = LoadReport::new(ckpt, PREFIX);
        let (d, ff, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.rms_norm_eps,
        );
        let hd = config.head_dim();
        let (q, kv) = (config.num_attention_heads * hd, config.kv_heads() * hd);
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = format!("{PREFIX}layers.{i}");
                let linear = |name: &str, shape| {
                    load_linear_no_bias(ckpt, &format!("{l}.{name}"), shape, device)
                };
                Ok(LlamaDecoderLayer {
                    input_layernorm: load_rms_norm(
                        ckpt,
                        &format!("{l}.input_layernorm"),
                        d,
                        eps,
                        device,
                    )?,
                    self_attn: LlamaAttention {
                        q_proj: linear("self_attn.q_proj", [d, q])?,
                        k_proj: linear("self_attn.k_proj", [d, kv])?,
                        v_proj: linear("self_attn.v_proj", [d, kv])?,
                        o_proj: linear("self_attn.o_proj", [q, d])?,
                        num_heads: config.num_attention_heads,
                        num_key_value_heads: config.kv_heads(),
                        head_dim: hd,
                    },
                    post_attention_layernorm: load_rms_norm(
                        ckpt,
                        &format!("{l}.post_attention_layernorm"),
                        d,
                        eps,
                        device,
                    )?,
                    mlp: LlamaMlp {
                        gate_proj: linear("mlp.gate_proj", [d, ff])?,
                        up_proj: linear("mlp.up_proj", [d, ff])?,
                        down_proj: linear("mlp.down_proj", [ff, d])?,
                    },
                })
            })
            .collect::<Result<_, HubError>>()?;
        let model = LlamaModel {
            embed_tokens: load_embedding(ckpt, EMBED_TOKENS, [config.vocab_size, d], device)?,
            layers,
            norm: load_rms_norm(ckpt, &format!("{PREFIX}norm"), d, eps, device)?,
            rotary_emb: rotary_emb(config),
        };
        let lm_head = if config.tie_word_embeddings {
            if ckpt.contains(LM_HEAD) {
                let shape = [config.vocab_size, d];
                if ckpt.read_f32(LM_HEAD, &shape)? != ckpt.read_f32(EMBED_TOKENS, &shape)? {
                    return Err(HubError::Value {
                        path: ckpt.path().to_path_buf(),
                        key: LM_HEAD.into(),
                        reason: format!(
                            "differs from `{EMBED_TOKENS}` although tie_word_embeddings is true"
                        ),
                    });
                }
            }
            None
        } else {
            Some(load_linear_no_bias(
                ckpt,
                "lm_head",
                [d, config.vocab_size],
                device,
            )?)
        };
        let report = report.finish(ckpt);
        if let Some(key) = report.ignored.iter().find(|k| !is_buffer(k)) {
            let others = report.ignored.iter().filter(|k| !is_buffer(k)).count() - 1;
            return Err(HubError::Value {
                path: ckpt.path().to_path_buf(),
                key: key.clone(),
                reason: format!(
                    "unexpected tensor: not a parameter of LlamaForCausalLM with this config.json \
                     ({others} more unexpected keys)"
                ),
            });
        }
        let model = LlamaForCausalLM {
            model,
            lm_head,
            config: config.clone(),
        };
        Ok((model, report))
    }

    /// Writes `model.safetensors` and `config.json` into `dir` (created if needed),
    /// as `LlamaForCausalLM.save_pretrained` does: a tied LM head is not written, and
    /// `config.json` names the architecture and the dtype (`torch_dtype`). Only
    /// `options.dtype` is read: the keys are always `save_pretrained`'s (`model.`).
    pub fn save(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<(), HubError> {
        let mut config = self.config.clone();
        config.extra.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        let torch_dtype = match options.dtype {
            FloatDType::F32 => "float32",
            FloatDType::F16 => "float16",
            FloatDType::BF16 => "bfloat16",
        };
        config
            .extra
            .insert("torch_dtype".into(), serde_json::json!(torch_dtype));
        save_pretrained(
            dir.as_ref(),
            options.dtype,
            |writer| self.write_tensors(writer),
            &config,
        )
    }

    /// Adds every parameter to `writer` under its Hugging Face key (`lm_head.weight`
    /// only when untied).
    pub fn write_tensors(&self, writer: &mut CheckpointWriter) {
        let m = &self.model;
        writer.add(EMBED_TOKENS, m.embed_tokens.weight.val());
        for (i, layer) in m.layers.iter().enumerate() {
            let l = format!("{PREFIX}layers.{i}");
            writer.add(
                format!("{l}.input_layernorm.weight"),
                layer.input_layernorm.weight.val(),
            );
            let attn = &layer.self_attn;
            for (name, linear) in [
                ("q_proj", &attn.q_proj),
                ("k_proj", &attn.k_proj),
                ("v_proj", &attn.v_proj),
                ("o_proj", &attn.o_proj),
            ] {
                save_linear(writer, &format!("{l}.self_attn.{name}"), linear, LINEAR);
            }
            writer.add(
                format!("{l}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.val(),
            );
            let mlp = &layer.mlp;
            for (name, linear) in [
                ("gate_proj", &mlp.gate_proj),
                ("up_proj", &mlp.up_proj),
                ("down_proj", &mlp.down_proj),
            ] {
                save_linear(writer, &format!("{l}.mlp.{name}"), linear, LINEAR);
            }
        }
        writer.add(format!("{PREFIX}norm.weight"), m.norm.weight.val());
        if let Some(head) = &self.lm_head {
            save_linear(writer, "lm_head", head, LINEAR);
        }
    }
}
