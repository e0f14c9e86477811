use serde::{Deserialize, Serialize};

/// A Llama configuration with the field names of Hugging Face's `config.json`
/// (`LlamaConfig`).
///
/// Fields mics does not use are kept in `extra` and written back on save. Llama has
/// no dropout outside attention, and mics none at all: `attention_dropout` must be 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Size of the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `num_attention_heads`
    /// when absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `hidden_size / num_attention_heads` when absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the model was trained for (rotary embeddings have no table,
    /// so longer sequences run, as in Hugging Face).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMS-norm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (`linear`, `dynamic`, `llama3`, `yarn`, ...); only null (plain
    /// RoPE) is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the LM head shares the token embeddings' weights.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections; must be false (mics' have none).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections; must be false.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on the attention probabilities; must be 0.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Standard deviation of freshly initialised weights.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Always `llama`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Every other field of the file, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "silu".into()
}
/// Hugging Face's `LlamaConfig` default.
fn default_max_positions() -> usize {
    2048
}
/// Hugging Face's `LlamaConfig` default.
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_init() -> f64 {
    0.02
}
fn default_model_type() -> String {
    "llama".into()
}

impl LlamaConfig {
    /// A small configuration for tests: the given sizes (as many key/value heads as
    /// query heads, MLP width `4 * hidden_size`, 64 positions), everything else default.
    pub fn tiny(vocab_size: usize, hidden_size: usize, layers: usize, heads: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: 4 * hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: default_act(),
            max_position_embeddings: 64,
            rms_norm_eps: default_eps(),
            rope_theta: default_rope_theta(),
            rope_scaling: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            attention_dropout: 0.0,
            initializer_range: default_init(),
            model_type: default_model_type(),
            extra: Default::default(),
        }
    }

    /// The number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        match self.head_dim {
            Some(d) => d,
            None if self.num_attention_heads > 0 => self.hidden_size / self.num_attention_heads,
            None => 0,
        }
    }

    /// Checks the sizes are consistent and every field asks for what mics implements:
    /// SiLU, no biases, no attention dropout, plain RoPE.
    pub fn validate(&self) -> Result<(), String> {
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return Err("vocab_size, hidden_size and intermediate_size must be positive".into());
        }
        if heads == 0 || kv == 0 {
            return Err("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads} (and no head_dim)",
                self.hidden_size
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be positive and even (rotary embeddings rotate pairs)"
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "unsupported hidden_act `{}`: mics-llama implements `silu` only",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(format!(
                "attention_bias {} / mlp_bias {}: mics-llama's projections have no biases",
                self.attention_bias, self.mlp_bias
            ));
        }
        if self.attention_dropout != 0.0 {
            return Err(format!(
                "attention_dropout {}: mics-llama has no dropout (0 or absent)",
                self.attention_dropout
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            return Err(format!(
                "unsupported rope_scaling {scaling}: mics-llama implements plain RoPE only (null)"
            ));
        }
        if let Some(parameters) = self.extra.get("rope_parameters") {
            // transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}`;
            // `from_json` has moved its `rope_theta` to the top level.
            let kind = parameters.get("rope_type").and_then(|t| t.as_str());
            if !matches!(kind, None | Some("default")) {
                return Err(format!(
                    "unsupported rope_parameters {parameters}: mics-llama implements plain RoPE only (rope_type `default`)"
                ));
            }
            if let Some(theta) = parameters.get("rope_theta").and_then(|t| t.as_f64())
                && theta != self.rope_theta
            {
                return Err(format!(
                    "rope_parameters.rope_theta {theta} differs from rope_theta {}",
                    self.rope_theta
                ));
            }
        }
        let positive = self.rope_theta > 0.0 && self.rms_norm_eps >= 0.0;
        if !positive {
            return Err(format!(
                "rope_theta {} must be positive and rms_norm_eps {} not negative",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        Ok(())
    }

    /// Reads a configuration from parsed `config.json` contents. A transformers 5
    /// file may give the RoPE base only as `rope_parameters.rope_theta`; it is then
    /// used as `rope_theta`.
    pub fn from_json(mut value: serde_json::Value) -> Result<Self, serde_json::Error> {
        if let Some(object) = value.as_object_mut()
            && !object.contains_key("rope_theta")
            && let Some(theta) = object
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .cloned()
        {
            object.insert("rope_theta".into(), theta);
        }
        serde_json::from_value(value)
    }
}
