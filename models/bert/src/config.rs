use serde::{Deserialize, Serialize};

/// A BERT configuration with the field names of Hugging Face's `config.json`.
///
/// Fields mics does not use are kept in `extra` and written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Size of the word-piece vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu`, `gelu_new`, `relu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Standard deviation of freshly initialised weights.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Dropout probability on the embeddings' output and on the outputs of the
    /// attention-output and feed-forward-output dense layers, before their residual
    /// additions (0.1 when absent, as Hugging Face).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout probability on the attention probabilities (0.1 when absent).
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Always `bert`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init() -> f64 {
    0.02
}
fn default_model_type() -> String {
    "bert".into()
}
/// Hugging Face's `BertConfig` default for both dropout probabilities.
fn default_dropout() -> f64 {
    0.1
}

/// A dropout probability must lie in `[0, 1)` (1 would zero everything and scale by
/// infinity).
fn check_probability(name: &str, p: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{name} {p} is not a probability in [0, 1)"))
    }
}

impl BertConfig {
    /// A small configuration for tests: the given sizes, no dropout, everything else
    /// default.
    pub fn tiny(vocab_size: usize, hidden_size: usize, layers: usize, heads: usize) -> Self {
        BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden_size,
            hidden_act: default_act(),
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            initializer_range: 0.02,
            pad_token_id: 0,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            model_type: default_model_type(),
            extra: Default::default(),
        }
    }

    /// The same configuration with `hidden_dropout_prob` and
    /// `attention_probs_dropout_prob` both set to `p` (checked by
    /// [`BertConfig::validate`], which wants `0 <= p < 1`).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.hidden_dropout_prob = p;
        self.attention_probs_dropout_prob = p;
        self
    }

    /// Checks the sizes are consistent, the dropout probabilities lie in `[0, 1)` and
    /// the activation is known.
    pub fn validate(&self) -> Result<Activation, String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        check_probability("hidden_dropout_prob", self.hidden_dropout_prob)?;
        check_probability(
            "attention_probs_dropout_prob",
            self.attention_probs_dropout_prob,
        )?;
        Activation::from_hf(&self.hidden_act)
    }
}

/// The feed-forward activations Hugging Face BERT configurations name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses a `hidden_act` / `activation_function` value.
    pub fn from_hf(name: &str) -> Result<Self, String> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!("unsupported activation `{other}`")),
        }
    }

    /// Applies the activation.
    pub fn apply<B: burn::tensor::backend::Backend, const D: usize>(
        self,
        x: burn::tensor::Tensor<B, D>,
    ) -> burn::tensor::Tensor<B, D> {
        use burn::tensor::activation;
        match self {
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Relu => activation::relu(x),
        }
    }
}
