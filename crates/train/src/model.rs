//! The two model families as training tasks: how a batch becomes a loss,
//! how a model is built, and how its initial values reach every rank.

use std::path::Path;

use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_bert::{BertConfig, BertForMaskedLM};
use mics_datasets::{DatasetMeta, IGNORE_INDEX, LmBatch, MlmBatch};
use mics_gpt::{Gpt2Config, Gpt2LMHeadModel};
use serde::{Deserialize, Serialize};

use crate::{ModelType, TrainConfig, TrainError};

/// The architecture and sizes of the trained model, as its Hugging Face
/// `config.json` says (stored in checkpoint indexes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "config", rename_all = "lowercase")]
pub enum ModelSpec {
    /// A GPT-2 language model.
    Gpt2(Gpt2Config),
    /// A BERT masked language model.
    Bert(BertConfig),
}

impl ModelSpec {
    /// The model family.
    pub fn kind(&self) -> ModelType {
        match self {
            ModelSpec::Gpt2(_) => ModelType::Gpt2,
            ModelSpec::Bert(_) => ModelType::Bert,
        }
    }

    /// Vocabulary size of the embedding matrix.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelSpec::Gpt2(c) => c.vocab_size,
            ModelSpec::Bert(c) => c.vocab_size,
        }
    }

    /// Longest sequence the position embeddings cover.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelSpec::Gpt2(c) => c.n_positions,
            ModelSpec::Bert(c) => c.max_position_embeddings,
        }
    }
}

/// A training batch of either task.
pub(crate) enum Batch {
    /// Next-token prediction: the loss is the mean over all tokens.
    Lm(LmBatch),
    /// Masked LM: the loss is the sum over selected tokens times `scale`
    /// (N·s / selected tokens in the whole global batch), so that after the
    /// optimizer's 1/(N·s) the gradient is that of the mean over the global
    /// batch's selected tokens, whatever the split over ranks.
    Mlm { batch: MlmBatch, scale: f32 },
}

/// A model that turns a [`Batch`] into a scalar loss. The models crate knows
/// nothing of training; this is the glue.
pub(crate) trait TaskModel<B: Backend>: Module<B> {
    fn loss(&self, batch: &Batch, device: &B::Device) -> Tensor<B, 1>;
}

fn ids<B: Backend>(ids: &[u32], batch: usize, seq: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), device)
}

/// Negative log-likelihood of `targets` under `logits` (`[batch, seq, vocab]`),
/// one value per position (`[batch · seq]`).
fn token_nll<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let n = batch * seq;
    log_softmax(logits.reshape([n, vocab]), 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg()
}

impl<B: Backend> TaskModel<B> for Gpt2LMHeadModel<B> {
    fn loss(&self, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        let Batch::Lm(b) = batch else {
            unreachable!("GPT-2 trains on causal-LM batches")
        };
        let logits = self.forward(ids(&b.inputs, b.batch, b.seq_len, device));
        let targets =
            ids::<B>(&b.targets, b.batch, b.seq_len, device).reshape([b.batch * b.seq_len]);
        token_nll(logits, targets).mean()
    }
}

impl<B: Backend> TaskModel<B> for BertForMaskedLM<B> {
    fn loss(&self, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        let Batch::Mlm { batch: b, scale } = batch else {
            unreachable!("BERT trains on masked-LM batches")
        };
        let n = b.batch * b.seq_len;
        let logits = self.forward(ids(&b.input_ids, b.batch, b.seq_len, device), None);
        // Unselected positions look up id 0 and are weighted 0.
        let targets: Vec<i64> = b
            .labels
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0 } else { l })
            .collect();
        let weights: Vec<f32> = b
            .labels
            .iter()
            .map(|&l| f32::from(u8::from(l != IGNORE_INDEX)))
            .collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
        let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [n]), device);
        (token_nll(logits, targets) * weights).sum() * *scale
    }
}

/// The model of a run: from `init_from` (its `config.json`) or from the
/// config's sizes with the dataset's vocabulary; dropout from the config.
pub(crate) fn model_spec(
    config: &TrainConfig,
    meta: &DatasetMeta,
) -> Result<ModelSpec, TrainError> {
    let m = &config.model;
    let seq = config.data.seq_len;
    let spec = match config.init_dir()? {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
            let bad = |e: serde_json::Error| TrainError::Invalid {
                key: "model.init_from".into(),
                problem: format!("{}: {e}", dir.join("config.json").display()),
            };
            match m.kind {
                ModelType::Gpt2 => ModelSpec::Gpt2(
                    serde_json::from_str::<Gpt2Config>(&text)
                        .map_err(bad)?
                        .with_dropout(m.dropout),
                ),
                ModelType::Bert => ModelSpec::Bert(
                    serde_json::from_str::<BertConfig>(&text)
                        .map_err(bad)?
                        .with_dropout(m.dropout),
                ),
            }
        }
        None => {
            let positions = m.max_positions.unwrap_or(seq);
            match m.kind {
                ModelType::Gpt2 => {
                    let mut c = Gpt2Config::tiny(meta.vocab_size, m.hidden, m.layers, m.heads);
                    c.n_positions = positions;
                    ModelSpec::Gpt2(c.with_dropout(m.dropout))
                }
                ModelType::Bert => {
                    let mut c = BertConfig::tiny(meta.vocab_size, m.hidden, m.layers, m.heads);
                    c.max_position_embeddings = positions;
                    ModelSpec::Bert(c.with_dropout(m.dropout))
                }
            }
        }
    };
    let problem = match &spec {
        ModelSpec::Gpt2(c) => c.validate().err(),
        ModelSpec::Bert(c) => c.validate().err(),
    };
    if let Some(problem) = problem {
        return Err(TrainError::Invalid {
            key: "model".into(),
            problem,
        });
    }
    if meta.vocab_size > spec.vocab_size() {
        return Err(TrainError::Invalid {
            key: "data.tokenizer".into(),
            problem: format!(
                "the dataset's tokenizer has {} ids but the model's vocabulary only {}",
                meta.vocab_size,
                spec.vocab_size()
            ),
        });
    }
    if seq > spec.max_positions() {
        return Err(TrainError::Invalid {
            key: "data.seq_len".into(),
            problem: format!(
                "{seq} is longer than the model's {} positions",
                spec.max_positions()
            ),
        });
    }
    Ok(spec)
}

/// The initial parameters as Burn record bytes, built once on the calling
/// thread (the backend's random generator is process-wide, so building on
/// every rank thread at once would not be reproducible) and loaded by every
/// rank: from `init_from`, or a fresh initialisation seeded with `seed`.
pub(crate) fn initial_record(
    spec: &ModelSpec,
    init_from: Option<&Path>,
    seed: u64,
) -> Result<Vec<u8>, TrainError> {
    type Cpu = burn::backend::NdArray;
    let device = Default::default();
    Cpu::seed(&device, seed);
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = match spec {
        ModelSpec::Gpt2(c) => {
            let model = match init_from {
                Some(dir) => Gpt2LMHeadModel::<Cpu>::load(dir, &device)?.0,
                None => Gpt2LMHeadModel::<Cpu>::init(c, &device),
            };
            Recorder::<Cpu>::record(&recorder, model.into_record(), ())
        }
        ModelSpec::Bert(c) => {
            let model = match init_from {
                Some(dir) => BertForMaskedLM::<Cpu>::load(dir, &device)?.0,
                None => BertForMaskedLM::<Cpu>::init(c, &device),
            };
            Recorder::<Cpu>::record(&recorder, model.into_record(), ())
        }
    };
    bytes.map_err(|e| TrainError::Engine(format!("cannot serialise the initial model: {e}")))
}

/// Builds a model of `spec` on `B` holding the values of `record`.
pub(crate) fn load_model<B: Backend, M: Module<B>>(
    fresh: M,
    record: &[u8],
    device: &B::Device,
) -> Result<M, TrainError> {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let record = Recorder::<B>::load(&recorder, record.to_vec(), device)
        .map_err(|e| TrainError::Engine(format!("cannot load the initial model: {e}")))?;
    Ok(fresh.load_record(record))
}
