use serde::{Deserialize, Serialize};

/// A GPT-2 configuration with the field names of Hugging Face's `config.json`.
///
/// Fields mics does not use are kept in `extra` and written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Size of the BPE vocabulary.
    pub vocab_size: usize,
    /// Longest sequence the position embeddings cover.
    pub n_positions: usize,
    /// Width of the hidden states.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Width of the MLP (`4 * n_embd` when absent or null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_inner: Option<usize>,
    /// MLP activation (`gelu_new` for GPT-2).
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Standard deviation of freshly initialised weights.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Dropout probability on the sum of token and position embeddings (0.1 when
    /// absent, as Hugging Face).
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    /// Dropout probability on the attention probabilities (0.1 when absent).
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    /// Dropout probability on the outputs of `attn.c_proj` and `mlp.c_proj`, before
    /// the residual additions (0.1 when absent).
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    /// Always `gpt2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init() -> f64 {
    0.02
}
fn default_model_type() -> String {
    "gpt2".into()
}
/// Hugging Face's `GPT2Config` default for `embd_pdrop`, `attn_pdrop` and `resid_pdrop`.
fn default_pdrop() -> f64 {
    0.1
}

impl Gpt2Config {
    /// A small configuration for tests: the given sizes, no dropout, everything else
    /// default.
    pub fn tiny(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        Gpt2Config {
            vocab_size,
            n_positions: 32,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: default_act(),
            layer_norm_epsilon: default_eps(),
            initializer_range: default_init(),
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            resid_pdrop: 0.0,
            model_type: default_model_type(),
            extra: Default::default(),
        }
    }

    /// The same configuration with `embd_pdrop`, `attn_pdrop` and `resid_pdrop` all
    /// set to `p` (checked by [`Gpt2Config::validate`], which wants `0 <= p < 1`).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.embd_pdrop = p;
        self.attn_pdrop = p;
        self.resid_pdrop = p;
        self
    }

    /// The MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks the sizes are consistent, the dropout probabilities lie in `[0, 1)` and
    /// the activation is supported.
    pub fn validate(&self) -> Result<Activation, String> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        for (name, p) in [
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
            ("resid_pdrop", self.resid_pdrop),
        ] {
            check_probability(name, p)?;
        }
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            other => Err(format!("unsupported activation_function `{other}`")),
        }
    }
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

/// The MLP activations GPT-2 configurations name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Tanh-approximated GELU (`gelu_new`), GPT-2's.
    GeluTanh,
    /// Exact GELU.
    Gelu,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply<B: burn::tensor::backend::Backend, const D: usize>(
        self,
        x: burn::tensor::Tensor<B, D>,
    ) -> burn::tensor::Tensor<B, D> {
        use burn::tensor::activation;
        match self {
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Gelu => activation::gelu(x),
            Activation::Relu => activation::relu(x),
        }
    }
}
