//! Model families: what the trainer needs of a model, as one trait.
//!
//! A family (GPT-2, BERT, Llama) is added by implementing [`ModelFamily`] in
//! one file of `families/` and naming it once in [`ModelType`] and
//! [`with_family!`](crate::with_family): how to build the model from the
//! run's sizes or a Hugging Face `config.json`, load and save Hugging Face
//! safetensors, and what its LM head projects for the task's loss. The
//! models themselves are plain Burn modules that know nothing of training.

use std::fmt::Debug;
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use mics_hub::{HubError, LoadReport};
use serde::{Deserialize, Serialize};

use crate::ModelConfig;
use crate::memory::ModelDims;
use crate::task::TaskKind;

/// The model families `mics train` knows (`model.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// GPT-2 (causal language modelling), Hugging Face `GPT2LMHeadModel`.
    Gpt2,
    /// BERT (masked language modelling), Hugging Face `BertForMaskedLM`.
    Bert,
    /// A Llama-style decoder (causal language modelling), Hugging Face
    /// `LlamaForCausalLM`.
    Llama,
}

impl ModelType {
    /// Every family, for messages.
    pub const ALL: [ModelType; 3] = [ModelType::Gpt2, ModelType::Bert, ModelType::Llama];

    /// The name in configs, checkpoints and `config.json` (`model_type`).
    pub fn name(self) -> &'static str {
        crate::with_family!(self, |F| F::NAME)
    }

    /// What this family is trained on.
    pub fn task(self) -> TaskKind {
        crate::with_family!(self, |F| F::TASK)
    }
}

impl std::fmt::Display for ModelType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs `$body` with the type `$F` bound to the [`ModelFamily`] of the
/// [`ModelType`] `$kind`: the one place that lists every family.
#[macro_export]
macro_rules! with_family {
    ($kind:expr, |$F:ident| $body:expr) => {
        match $kind {
            $crate::ModelType::Gpt2 => {
                type $F = $crate::families::Gpt2;
                $body
            }
            $crate::ModelType::Bert => {
                type $F = $crate::families::Bert;
                $body
            }
            $crate::ModelType::Llama => {
                type $F = $crate::families::Llama;
                $body
            }
        }
    };
}

/// What the LM head of a model projects, for the fused head + loss: the
/// hidden states `[tokens, hidden]` and the head's weight `[vocab, hidden]`
/// (and bias `[vocab]`, BERT's decoder has one).
pub struct Head<B: Backend> {
    /// The hidden states of every token, `[tokens, hidden]`.
    pub hidden: Tensor<B, 2>,
    /// The projection onto the vocabulary, `[vocab, hidden]`.
    pub weight: Tensor<B, 2>,
    /// The decoder's bias, `[vocab]`, if it has one.
    pub bias: Option<Tensor<B, 1>>,
}

/// A model family the trainer can train, export and serve.
pub trait ModelFamily: 'static {
    /// The name in configs and checkpoints (`model.type`), which is also the
    /// Hugging Face `model_type`.
    const NAME: &'static str;
    /// What the family is trained on.
    const TASK: TaskKind;
    /// The architecture and sizes, as its Hugging Face `config.json` says.
    type Config: Clone + Debug + PartialEq + Serialize + Send + Sync + 'static;
    /// The model, a plain Burn module.
    type Model<B: Backend>: Module<B> + Send + 'static;

    /// A configuration from the run's sizes (`[model]`), the dataset's
    /// vocabulary and the longest sequence.
    fn sized(sizes: &ModelConfig, vocab_size: usize, positions: usize) -> Self::Config;
    /// The configuration of a Hugging Face `config.json` (as a JSON value).
    fn from_json(value: serde_json::Value) -> Result<Self::Config, String>;
    /// The same configuration with dropout probability `p` wherever the
    /// family applies dropout; an error if the family has none and `p > 0`.
    fn with_dropout(config: Self::Config, p: f64) -> Result<Self::Config, String>;
    /// Checks the configuration's consistency.
    fn validate(config: &Self::Config) -> Result<(), String>;
    /// The size of the vocabulary.
    fn vocab_size(config: &Self::Config) -> usize;
    /// The longest sequence the model takes.
    fn max_positions(config: &Self::Config) -> usize;
    /// The sizes the memory estimate needs, parameters counted from the
    /// configuration alone (nothing is allocated).
    fn dims(config: &Self::Config) -> ModelDims;

    /// A freshly initialised model.
    fn init<B: Backend>(config: &Self::Config, device: &B::Device) -> Self::Model<B>;
    /// The model of a Hugging Face-layout directory (`config.json` +
    /// `model.safetensors`), and what the load found (parameters missing
    /// from the file and initialised, keys ignored).
    fn load<B: Backend>(
        dir: &Path,
        device: &B::Device,
    ) -> Result<(Self::Model<B>, LoadReport), HubError>;
    /// Writes the model in the Hugging Face layout `transformers` reads.
    fn save<B: Backend>(model: &Self::Model<B>, dir: &Path) -> Result<(), HubError>;

    /// What the LM head projects for the `[batch, seq]` input ids.
    fn head<B: Backend>(model: &Self::Model<B>, input_ids: Tensor<B, 2, Int>) -> Head<B>;
    /// The full logits `[batch, seq, vocab]` (for `mics logits` and
    /// `generate`; training uses [`head`](Self::head) and the fused loss).
    fn logits<B: Backend>(model: &Self::Model<B>, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;
}

/// A model's architecture: its family and its configuration as JSON (what
/// checkpoint indexes store: `{"type": "gpt2", "config": {...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The family.
    #[serde(rename = "type")]
    pub kind: ModelType,
    /// Its configuration, in the family's `config.json` spelling.
    pub config: serde_json::Value,
}

impl ModelSpec {
    /// The spec of a family's configuration.
    pub fn of<F: ModelFamily>(kind: ModelType, config: &F::Config) -> ModelSpec {
        debug_assert_eq!(kind.name(), F::NAME);
        ModelSpec {
            kind,
            config: serde_json::to_value(config).expect("configs serialise to JSON"),
        }
    }

    /// The configuration, typed for family `F` (which must be its family).
    pub fn config<F: ModelFamily>(&self) -> Result<F::Config, String> {
        if self.kind.name() != F::NAME {
            return Err(format!("a {} model is not a {}", self.kind, F::NAME));
        }
        F::from_json(self.config.clone())
    }

    /// Size of the vocabulary.
    pub fn vocab_size(&self) -> Result<usize, String> {
        crate::with_family!(self.kind, |F| self.config::<F>().map(|c| F::vocab_size(&c)))
    }

    /// The sizes the memory estimate needs.
    pub fn dims(&self) -> Result<ModelDims, String> {
        crate::with_family!(self.kind, |F| self.config::<F>().map(|c| F::dims(&c)))
    }

    /// Longest sequence the model takes.
    pub fn max_positions(&self) -> Result<usize, String> {
        crate::with_family!(self.kind, |F| self
            .config::<F>()
            .map(|c| F::max_positions(&c)))
    }
}
