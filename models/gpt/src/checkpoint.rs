//! Reading and writing GPT-2 safetensors checkpoints with Hugging Face keys.

use std::path::Path;

use burn::tensor::backend::Backend;
use mics_hub::modules::{
    LoadReport, WeightLayout, load_embedding, load_layer_norm, load_linear, save_layer_norm,
    save_linear,
};
use mics_hub::{
    Checkpoint, CheckpointWriter, HubError, SaveOptions, WEIGHTS_FILE, config, save_pretrained,
};

use crate::config::Gpt2Config;
use crate::model::{Gpt2Attention, Gpt2Block, Gpt2LMHeadModel, Gpt2Mlp, Gpt2Model, dropout};

/// GPT-2's `Conv1D` stores weights `[in, out]`.
const CONV1D: WeightLayout = WeightLayout::InOut;
const LM_HEAD: &str = "lm_head.weight";

impl<B: Backend> Gpt2LMHeadModel<B> {
    /// Loads `config.json` and `model.safetensors` from `dir`, in either layout.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<(Self, LoadReport), HubError> {
        let dir = dir.as_ref();
        let config: Gpt2Config = config::read_config(dir)?;
        config.validate().map_err(|reason| HubError::Config {
            path: dir.join("config.json"),
            reason,
        })?;
        let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
        Self::from_checkpoint(&ckpt, &config, device)
    }

    /// Reads the model from `ckpt`: keys with or without the `transformer.` prefix;
    /// causal-mask buffers (`attn.bias`, `attn.masked_bias`) ignored; `lm_head.weight`
    /// absent or equal to `wte`.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &Gpt2Config,
        device: &B::Device,
    ) -> Result<(Self, LoadReport), HubError> {
        let activation = config.validate().map_err(|reason| HubError::Config {
            path: ckpt.path().to_path_buf(),
            reason,
        })?;
        let p = if ckpt.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let report = LoadReport::new(ckpt, p);
        let d = config.n_embd;
        let ff = config.inner();
        let eps = config.layer_norm_epsilon;
        let h = (0..config.n_layer)
            .map(|i| {
                let l = format!("{p}h.{i}");
                Ok(Gpt2Block {
                    ln_1: load_layer_norm(ckpt, &format!("{l}.ln_1"), d, eps, device)?,
                    attn: Gpt2Attention {
                        c_attn: load_linear(
                            ckpt,
                            &format!("{l}.attn.c_attn"),
                            [d, 3 * d],
                            CONV1D,
                            device,
                        )?,
                        c_proj: load_linear(
                            ckpt,
                            &format!("{l}.attn.c_proj"),
                            [d, d],
                            CONV1D,
                            device,
                        )?,
                        n_head: config.n_head,
                        attn_dropout: dropout(config.attn_pdrop),
                        resid_dropout: dropout(config.resid_pdrop),
                    },
                    ln_2: load_layer_norm(ckpt, &format!("{l}.ln_2"), d, eps, device)?,
                    mlp: Gpt2Mlp {
                        c_fc: load_linear(ckpt, &format!("{l}.mlp.c_fc"), [d, ff], CONV1D, device)?,
                        c_proj: load_linear(
                            ckpt,
                            &format!("{l}.mlp.c_proj"),
                            [ff, d],
                            CONV1D,
                            device,
                        )?,
                        activation,
                        dropout: dropout(config.resid_pdrop),
                    },
                })
            })
            .collect::<Result<_, HubError>>()?;
        let wte_key = format!("{p}wte.weight");
        let transformer = Gpt2Model {
            wte: load_embedding(ckpt, &wte_key, [config.vocab_size, d], device)?,
            wpe: load_embedding(
                ckpt,
                &format!("{p}wpe.weight"),
                [config.n_positions, d],
                device,
            )?,
            h,
            ln_f: load_layer_norm(ckpt, &format!("{p}ln_f"), d, eps, device)?,
            drop: dropout(config.embd_pdrop),
        };
        if ckpt.contains(LM_HEAD) {
            let shape = [config.vocab_size, d];
            if ckpt.read_f32(LM_HEAD, &shape)? != ckpt.read_f32(&wte_key, &shape)? {
                return Err(HubError::Value {
                    path: ckpt.path().to_path_buf(),
                    key: LM_HEAD.into(),
                    reason: format!(
                        "differs from `{wte_key}`; mics ties the LM head to the token embeddings"
                    ),
                });
            }
        }
        let model = Gpt2LMHeadModel {
            transformer,
            config: config.clone(),
        };
        Ok((model, report.finish(ckpt)))
    }

    /// Writes `model.safetensors` and `config.json` into `dir` (created if needed).
    ///
    /// The tied LM head is not written (as `save_pretrained` does), nor are the
    /// causal-mask buffers, which are not parameters.
    pub fn save(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<(), HubError> {
        let mut config = self.config.clone();
        config.extra.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        save_pretrained(
            dir.as_ref(),
            options.dtype,
            |writer| self.write_tensors(writer, &options.prefix),
            &config,
        )
    }

    /// Adds every parameter to `writer` under its Hugging Face key.
    pub fn write_tensors(&self, writer: &mut CheckpointWriter, prefix: &str) {
        let p = prefix;
        let t = &self.transformer;
        writer.add(format!("{p}wte.weight"), t.wte.weight.val());
        writer.add(format!("{p}wpe.weight"), t.wpe.weight.val());
        for (i, block) in t.h.iter().enumerate() {
            let l = format!("{p}h.{i}");
            save_layer_norm(writer, &format!("{l}.ln_1"), &block.ln_1);
            save_linear(
                writer,
                &format!("{l}.attn.c_attn"),
                &block.attn.c_attn,
                CONV1D,
            );
            save_linear(
                writer,
                &format!("{l}.attn.c_proj"),
                &block.attn.c_proj,
                CONV1D,
            );
            save_layer_norm(writer, &format!("{l}.ln_2"), &block.ln_2);
            save_linear(writer, &format!("{l}.mlp.c_fc"), &block.mlp.c_fc, CONV1D);
            save_linear(
                writer,
                &format!("{l}.mlp.c_proj"),
                &block.mlp.c_proj,
                CONV1D,
            );
        }
        save_layer_norm(writer, &format!("{p}ln_f"), &t.ln_f);
    }
}
