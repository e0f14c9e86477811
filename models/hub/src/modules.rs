//! Burn `nn` modules read from and written to Hugging Face keys.
//!
//! Hugging Face stores `nn.Linear` weights `[out, in]` (BERT) and GPT-2's `Conv1D`
//! weights `[in, out]`; Burn's [`Linear`] holds `[in, out]`. [`WeightLayout`] says
//! which one a file uses. Layer norms are `weight`/`bias`, or the legacy
//! `gamma`/`beta` of old BERT files.

use std::fmt;
use std::path::PathBuf;

use burn::module::{Initializer, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Tensor, backend::Backend};

use crate::{Checkpoint, CheckpointWriter, FloatDType, HubError};

/// How a checkpoint stores a dense layer's weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`, as `torch.nn.Linear` (BERT).
    OutIn,
    /// `[in, out]`, as GPT-2's `Conv1D` (and Burn's `Linear`).
    InOut,
}

/// The initialiser Hugging Face uses for fresh weights: N(0, `std`).
pub fn hf_initializer(std: f64) -> Initializer {
    Initializer::Normal { mean: 0.0, std }
}

/// Reads a dense layer `{prefix}.weight` / `{prefix}.bias`.
pub fn load_linear<B: Backend>(
    ckpt: &Checkpoint,
    prefix: &str,
    [d_in, d_out]: [usize; 2],
    layout: WeightLayout,
    device: &B::Device,
) -> Result<Linear<B>, HubError> {
    let key = format!("{prefix}.weight");
    let weight = match layout {
        WeightLayout::OutIn => ckpt
            .tensor::<B, 2>(&key, [d_out, d_in], device)?
            .transpose(),
        WeightLayout::InOut => ckpt.tensor::<B, 2>(&key, [d_in, d_out], device)?,
    };
    let bias = ckpt.tensor::<B, 1>(&format!("{prefix}.bias"), [d_out], device)?;
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias: Some(Param::from_tensor(bias)),
    })
}

/// A fresh dense layer: weights N(0, `std`), bias zero (as Hugging Face initialises).
pub fn init_linear<B: Backend>(
    [d_in, d_out]: [usize; 2],
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    let mut linear = LinearConfig::new(d_in, d_out)
        .with_initializer(hf_initializer(std))
        .init(device);
    linear.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    linear
}

/// Writes a dense layer under `{prefix}.weight` / `{prefix}.bias`.
pub fn save_linear<B: Backend>(
    writer: &mut CheckpointWriter,
    prefix: &str,
    linear: &Linear<B>,
    layout: WeightLayout,
) {
    let weight = linear.weight.val();
    let weight = match layout {
        WeightLayout::OutIn => weight.transpose(),
        WeightLayout::InOut => weight,
    };
    writer.add(format!("{prefix}.weight"), weight);
    if let Some(bias) = &linear.bias {
        writer.add(format!("{prefix}.bias"), bias.val());
    }
}

/// Reads a layer norm `{prefix}.weight`/`.bias` (or legacy `.gamma`/`.beta`).
pub fn load_layer_norm<B: Backend>(
    ckpt: &Checkpoint,
    prefix: &str,
    d: usize,
    epsilon: f64,
    device: &B::Device,
) -> Result<LayerNorm<B>, HubError> {
    let legacy =
        !ckpt.contains(&format!("{prefix}.weight")) && ckpt.contains(&format!("{prefix}.gamma"));
    let (w, b) = if legacy {
        ("gamma", "beta")
    } else {
        ("weight", "bias")
    };
    let mut norm = LayerNormConfig::new(d).with_epsilon(epsilon).init(device);
    norm.gamma = Param::from_tensor(ckpt.tensor(&format!("{prefix}.{w}"), [d], device)?);
    norm.beta = Some(Param::from_tensor(ckpt.tensor(
        &format!("{prefix}.{b}"),
        [d],
        device,
    )?));
    Ok(norm)
}

/// A fresh layer norm (scale one, shift zero).
pub fn init_layer_norm<B: Backend>(d: usize, epsilon: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(epsilon).init(device)
}

/// Writes a layer norm under `{prefix}.weight` / `{prefix}.bias`.
pub fn save_layer_norm<B: Backend>(
    writer: &mut CheckpointWriter,
    prefix: &str,
    norm: &LayerNorm<B>,
) {
    writer.add(format!("{prefix}.weight"), norm.gamma.val());
    if let Some(beta) = &norm.beta {
        writer.add(format!("{prefix}.bias"), beta.val());
    }
}

/// Reads an embedding table stored under `key`.
pub fn load_embedding<B: Backend>(
    ckpt: &Checkpoint,
    key: &str,
    [n, d]: [usize; 2],
    device: &B::Device,
) -> Result<Embedding<B>, HubError> {
    let mut embedding = EmbeddingConfig::new(1, d).init(device);
    embedding.weight = Param::from_tensor(ckpt.tensor(key, [n, d], device)?);
    Ok(embedding)
}

/// A fresh embedding table, N(0, `std`).
pub fn init_embedding<B: Backend>(
    [n, d]: [usize; 2],
    std: f64,
    device: &B::Device,
) -> Embedding<B> {
    EmbeddingConfig::new(n, d)
        .with_initializer(hf_initializer(std))
        .init(device)
}

/// What loading a checkpoint found: its layout, dtype, the model parts it lacked
/// (freshly initialised) and the keys it held that the model does not use.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// The file read.
    pub path: PathBuf,
    /// The key prefix of the base model in the file (`""`, `"bert."`, `"transformer."`).
    pub prefix: String,
    /// The dtype of the file's parameters.
    pub dtype: FloatDType,
    /// Model parts absent from the file and initialised as Hugging Face would.
    pub initialised: Vec<String>,
    /// Keys in the file that the model ignored (buffers such as `attn.bias`).
    pub ignored: Vec<String>,
}

impl LoadReport {
    /// A report for `ckpt` with the given prefix and nothing initialised yet; call
    /// [`finish`](Self::finish) once every tensor has been read.
    pub fn new(ckpt: &Checkpoint, prefix: &str) -> Self {
        LoadReport {
            path: ckpt.path().to_path_buf(),
            prefix: prefix.to_string(),
            dtype: ckpt.float_dtype(),
            initialised: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// Records the keys of `ckpt` left unread.
    pub fn finish(mut self, ckpt: &Checkpoint) -> Self {
        self.ignored = ckpt.unused_keys();
        self
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded {} ({}, prefix {:?})",
            self.path.display(),
            self.dtype,
            self.prefix
        )?;
        if !self.initialised.is_empty() {
            write!(
                f,
                "; not in the file, initialised: {}",
                self.initialised.join(", ")
            )?;
        }
        if !self.ignored.is_empty() {
            write!(
                f,
                "; ignored {} keys: {}",
                self.ignored.len(),
                abbreviate(&self.ignored)
            )?;
        }
        Ok(())
    }
}

/// How to write a checkpoint: the key prefix of the base model and the dtype of
/// every tensor. One type for every model; each has a constructor for what its
/// `save_pretrained` writes.
///
/// The prefix is the one a loader reports ([`LoadReport::prefix`]): GPT-2
/// `"transformer."` (`save_pretrained` output) or `""` (the original Hub
/// files); BERT `""` (a `BertModel` file) or `"bert."` (a `BertForMaskedLM`
/// file). Llama always writes `LlamaForCausalLM.save_pretrained`'s keys
/// (`model.`) and does not read it.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    /// The key prefix of the base model.
    pub prefix: String,
    /// The dtype of every tensor.
    pub dtype: FloatDType,
}

impl SaveOptions {
    /// Keys under `prefix`, every tensor in `dtype`.
    pub fn new(prefix: impl Into<String>, dtype: FloatDType) -> Self {
        SaveOptions {
            prefix: prefix.into(),
            dtype,
        }
    }

    /// The layout and dtype a checkpoint was loaded with, so that it is written
    /// back with the same keys and dtypes.
    pub fn like(report: &LoadReport) -> Self {
        SaveOptions {
            prefix: report.prefix.clone(),
            dtype: report.dtype,
        }
    }

    /// What GPT-2's `save_pretrained` writes: the `transformer.` prefix, F32.
    pub fn gpt2() -> Self {
        SaveOptions {
            prefix: "transformer.".into(),
            dtype: FloatDType::F32,
        }
    }

    /// What `BertForMaskedLM.save_pretrained` writes: the `bert.` prefix, F32.
    pub fn bert_mlm() -> Self {
        SaveOptions {
            prefix: "bert.".into(),
            dtype: FloatDType::F32,
        }
    }

    /// What `LlamaForCausalLM.save_pretrained` writes: the `model.` prefix,
    /// F32.
    pub fn llama() -> Self {
        SaveOptions {
            prefix: "model.".into(),
            dtype: FloatDType::F32,
        }
    }

    /// The same options with every tensor in `dtype`.
    pub fn with_dtype(mut self, dtype: FloatDType) -> Self {
        self.dtype = dtype;
        self
    }
}

impl Default for SaveOptions {
    /// [`SaveOptions::gpt2`], what `mics_gpt::SaveOptions::default()` has always
    /// meant (Llama, which ignores the prefix, writes F32 with it too).
    fn default() -> Self {
        SaveOptions::gpt2()
    }
}

fn abbreviate(keys: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(", ... ({} more)", keys.len() - SHOWN));
    }
    text
}

/// `layer` applied to `[batch, seq, d_in]` as one `[batch * seq, d_in]` matrix
/// product (one large GEMM instead of a batch of small ones).
pub fn dense<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, seq, d_in] = x.dims();
    let y = layer.forward(x.reshape([batch * seq, d_in]));
    let d_out = y.dims()[1];
    y.reshape([batch, seq, d_out])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_options_per_model_and_like_a_loaded_file() {
        assert_eq!(
            SaveOptions::gpt2(),
            SaveOptions::new("transformer.", FloatDType::F32)
        );
        assert_eq!(SaveOptions::default(), SaveOptions::gpt2());
        assert_eq!(SaveOptions::bert_mlm().prefix, "bert.");
        assert_eq!(
            SaveOptions::llama().with_dtype(FloatDType::BF16),
            SaveOptions::new("model.", FloatDType::BF16)
        );
        let report = LoadReport {
            path: PathBuf::from("model.safetensors"),
            prefix: "bert.".into(),
            dtype: FloatDType::F16,
            initialised: Vec::new(),
            ignored: Vec::new(),
        };
        assert_eq!(
            SaveOptions::like(&report),
            SaveOptions::new("bert.", FloatDType::F16)
        );
    }
}
