//! The Llama decoder, following Hugging Face transformers'
//! `src/transformers/models/llama/modeling_llama.py` (`LlamaRMSNorm`,
//! `LlamaRotaryEmbedding` with `rotate_half`/`apply_rotary_pos_emb`, `repeat_kv`,
//! `LlamaAttention`, `LlamaMLP`, `LlamaDecoderLayer`, `LlamaModel`,
//! `LlamaForCausalLM`), without the KV cache, attention masks for padding,
//! `pretraining_tp` slicing and RoPE scaling. Field names are the checkpoint keys.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData, activation, backend::Backend};
use mics_hub::modules::{dense, hf_initializer, init_embedding};

use crate::config::LlamaConfig;

/// Added to the attention scores of future positions: their weight becomes exactly
/// zero, and the value is representable in half precision.
const MASKED_SCORE: f32 = -10_000.0;

/// `LlamaRMSNorm`: `x / sqrt(mean(x²) + eps) * weight` over the last dimension, no
/// bias and no mean subtraction.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `weight`, `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// `rms_norm_eps`.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A fresh norm of width `d` (weight one).
    pub fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            eps,
        }
    }

    /// Normalises the last dimension of `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mean_square = x.clone().powi_scalar(2).mean_dim(2);
        let inv_rms = mean_square.add_scalar(self.eps).sqrt().recip();
        x * inv_rms * self.weight.val().unsqueeze::<3>()
    }
}

/// `LlamaRotaryEmbedding` without scaling: position `p` rotates the pairs
/// `(x[i], x[i + head_dim / 2])` of a head by `p * rope_theta^(-2i / head_dim)`.
/// Holds no parameters (Hugging Face's `inv_freq` is a non-persistent buffer).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaRotaryEmbedding {
    /// Width of one head.
    pub head_dim: usize,
    /// `rope_theta`, the base of the frequencies.
    pub theta: f64,
}

impl LlamaRotaryEmbedding {
    /// `cos` and `sin` of the angles of positions `0..seq`, `[seq, head_dim]` each,
    /// the `head_dim / 2` frequencies repeated twice (Hugging Face's
    /// `cat((freqs, freqs), -1)`). Computed in `f64`, stored in the float type.
    pub fn cos_sin<B: Backend>(
        &self,
        seq: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| self.theta.powf(-((2 * i) as f64) / self.head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(seq * self.head_dim);
        let mut sin = Vec::with_capacity(seq * self.head_dim);
        for p in 0..seq {
            for i in 0..self.head_dim {
                let angle = p as f64 * inv_freq[i % half];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [seq, self.head_dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// `rotate_half`: `[x1, x2]` (the two halves of the last dimension) to `[-x2, x1]`.
pub fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// `apply_rotary_pos_emb` for one of q and k: `x * cos + rotate_half(x) * sin`, with
/// `x` `[batch, heads, seq, head_dim]` and `cos`, `sin` `[seq, head_dim]`.
pub fn apply_rotary_pos_emb<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    x.clone() * cos.unsqueeze::<4>() + rotate_half(x) * sin.unsqueeze::<4>()
}

/// `repeat_kv`: `[batch, kv_heads, seq, head_dim]` to `[batch, kv_heads * n_rep, seq,
/// head_dim]`, query head `h` reading key/value head `h / n_rep`.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [batch, kv_heads, seq, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, n_rep)
        .reshape([batch, kv_heads * n_rep, seq, head_dim])
}

/// Causal self-attention with grouped-query heads (`self_attn.{q,k,v,o}_proj`, no
/// biases), rotary embeddings on q and k.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    /// `q_proj`: `hidden_size` to `num_attention_heads * head_dim`.
    pub q_proj: Linear<B>,
    /// `k_proj`: `hidden_size` to `num_key_value_heads * head_dim`.
    pub k_proj: Linear<B>,
    /// `v_proj`: `hidden_size` to `num_key_value_heads * head_dim`.
    pub v_proj: Linear<B>,
    /// `o_proj`: `num_attention_heads * head_dim` to `hidden_size`.
    pub o_proj: Linear<B>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (a divisor of `num_heads`).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl<B: Backend> LlamaAttention<B> {
    /// `[batch, seq, hidden]` to `[batch, seq, hidden]`; `cos`, `sin` are
    /// `[seq, head_dim]` and `causal_bias` `[seq, seq]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        causal_bias: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let hd = self.head_dim;
        let heads = |proj: &Linear<B>, n: usize| {
            dense(proj, x.clone())
                .reshape([batch, seq, n, hd])
                .swap_dims(1, 2)
        };
        let q = heads(&self.q_proj, self.num_heads);
        let k = heads(&self.k_proj, self.num_key_value_heads);
        let v = heads(&self.v_proj, self.num_key_value_heads);
        let q = apply_rotary_pos_emb(q, cos.clone(), sin.clone());
        let k = apply_rotary_pos_emb(k, cos, sin);
        let n_rep = self.num_heads / self.num_key_value_heads;
        let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt())
            + causal_bias.unsqueeze::<4>();
        let probs = activation::softmax(scores, 3);
        let context = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * hd]);
        dense(&self.o_proj, context)
    }
}

/// The gated feed-forward part of a layer (`mlp.{gate,up,down}_proj`, no biases).
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    /// `gate_proj`: `hidden_size` to `intermediate_size`.
    pub gate_proj: Linear<B>,
    /// `up_proj`: `hidden_size` to `intermediate_size`.
    pub up_proj: Linear<B>,
    /// `down_proj`: `intermediate_size` to `hidden_size`.
    pub down_proj: Linear<B>,
}

impl<B: Backend> LlamaMlp<B> {
    /// `down_proj(silu(gate_proj(x)) * up_proj(x))`, `[batch, seq, hidden]` to
    /// `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = activation::silu(dense(&self.gate_proj, x.clone()));
        dense(&self.down_proj, gate * dense(&self.up_proj, x))
    }
}

/// One pre-norm decoder layer (`model.layers.N.*`).
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm<B>,
    /// `self_attn.*`.
    pub self_attn: LlamaAttention<B>,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm<B>,
    /// `mlp.*`.
    pub mlp: LlamaMlp<B>,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    /// `x + self_attn(input_layernorm(x))`, then `+ mlp(post_attention_layernorm(.))`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        causal_bias: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let attn = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            cos,
            sin,
            causal_bias,
        );
        let x = x + attn;
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}

/// Hugging Face `LlamaModel`: token embeddings, decoder layers and the final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `embed_tokens`, `[vocab_size, hidden_size]`.
    pub embed_tokens: Embedding<B>,
    /// `layers.N`.
    pub layers: Vec<LlamaDecoderLayer<B>>,
    /// `norm`.
    pub norm: RmsNorm<B>,
    /// `rotary_emb` (no parameters).
    #[module(skip)]
    pub rotary_emb: LlamaRotaryEmbedding,
}

impl<B: Backend> LlamaModel<B> {
    /// `[batch, seq]` ids to `[batch, seq, hidden_size]` hidden states, after the
    /// final norm. Positions count from 0 in every row.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let (cos, sin) = self.rotary_emb.cos_sin::<B>(seq, &device);
        let bias = causal_bias::<B>(seq, &device);
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, cos.clone(), sin.clone(), bias.clone());
        }
        self.norm.forward(x)
    }
}

/// `[seq, seq]`: 0 where a query may attend (key position <= query position),
/// [`MASKED_SCORE`] above the diagonal.
fn causal_bias<B: Backend>(seq: usize, device: &B::Device) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..seq * seq)
        .map(|i| if i % seq > i / seq { MASKED_SCORE } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(values, [seq, seq]), device)
}

/// Hugging Face `LlamaForCausalLM`: [`LlamaModel`] (`model.*`) and `lm_head`, which
/// is absent (`None`) when tied to `model.embed_tokens` (`tie_word_embeddings`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// `model.*`.
    pub model: LlamaModel<B>,
    /// `lm_head`: `hidden_size` to `vocab_size`, no bias; `None` when tied.
    pub lm_head: Option<Linear<B>>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
}

/// A dense layer without bias, weights N(0, `std`) (drawn on first use).
pub(crate) fn init_linear_no_bias<B: Backend>(
    [d_in, d_out]: [usize; 2],
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(hf_initializer(std))
        .init(device)
}

/// The rotary embedding `config` describes.
pub(crate) fn rotary_emb(config: &LlamaConfig) -> LlamaRotaryEmbedding {
    LlamaRotaryEmbedding {
        head_dim: config.head_dim(),
        theta: config.rope_theta,
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// A freshly initialised model, as Hugging Face's `_init_weights`: linear and
    /// embedding weights N(0, `initializer_range`), norm weights one.
    ///
    /// Panics if `config` is invalid; [`LlamaConfig::validate`] checks it first.
    pub fn init(config: &LlamaConfig, device: &B::Device) -> Self {
        config.validate().expect("invalid LlamaConfig");
        let (d, ff, std, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.initializer_range,
            config.rms_norm_eps,
        );
        let hd = config.head_dim();
        let (q, kv) = (config.num_attention_heads * hd, config.kv_heads() * hd);
        let layers = (0..config.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                input_layernorm: RmsNorm::new(d, eps, device),
                self_attn: LlamaAttention {
                    q_proj: init_linear_no_bias([d, q], std, device),
                    k_proj: init_linear_no_bias([d, kv], std, device),
                    v_proj: init_linear_no_bias([d, kv], std, device),
                    o_proj: init_linear_no_bias([q, d], std, device),
                    num_heads: config.num_attention_heads,
                    num_key_value_heads: config.kv_heads(),
                    head_dim: hd,
                },
                post_attention_layernorm: RmsNorm::new(d, eps, device),
                mlp: LlamaMlp {
                    gate_proj: init_linear_no_bias([d, ff], std, device),
                    up_proj: init_linear_no_bias([d, ff], std, device),
                    down_proj: init_linear_no_bias([ff, d], std, device),
                },
            })
            .collect();
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: init_embedding([config.vocab_size, d], std, device),
                layers,
                norm: RmsNorm::new(d, eps, device),
                rotary_emb: rotary_emb(config),
            },
            lm_head: (!config.tie_word_embeddings)
                .then(|| init_linear_no_bias([d, config.vocab_size], std, device)),
            config: config.clone(),
        }
    }

    /// The final-normed hidden states `[batch, seq, hidden_size]` of `[batch, seq]`
    /// ids (what `lm_head` is applied to).
    pub fn forward_hidden(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.forward(input_ids)
    }

    /// The LM head's weight `[vocab_size, hidden_size]` (Hugging Face's layout):
    /// `model.embed_tokens.weight` when tied, else `lm_head.weight`. Logits are
    /// `forward_hidden(ids) @ lm_head_weight()ᵀ`.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.model.embed_tokens.weight.val(),
        }
    }

    /// Next-token logits `[batch, seq, vocab_size]` of `[batch, seq]` ids.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let hidden = self.forward_hidden(input_ids);
        match &self.lm_head {
            Some(head) => dense(head, hidden),
            None => {
                let [batch, seq, d] = hidden.dims();
                let weight = self.model.embed_tokens.weight.val();
                let vocab = weight.dims()[0];
                hidden
                    .reshape([batch * seq, d])
                    .matmul(weight.transpose())
                    .reshape([batch, seq, vocab])
            }
        }
    }
}
