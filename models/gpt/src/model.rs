use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::tensor::{Int, Tensor, TensorData, activation, backend::Backend};
use mics_hub::modules::{dense, init_embedding, init_layer_norm, init_linear};

use crate::config::{Activation, Gpt2Config};

/// Added to the attention scores of future positions: their weight becomes exactly
/// zero, and the value is representable in half precision.
const MASKED_SCORE: f32 = -10_000.0;

/// A dropout layer of probability `p` (a constant module: no parameters, active only
/// on autodiff backends).
pub(crate) fn dropout(p: f64) -> Dropout {
    DropoutConfig::new(p).init()
}

/// Causal self-attention (`attn.c_attn`, `attn.c_proj`).
#[derive(Module, Debug)]
pub struct Gpt2Attention<B: Backend> {
    /// `attn.c_attn`: query, key and value in one `[n_embd, 3 * n_embd]` projection.
    pub c_attn: Linear<B>,
    /// `attn.c_proj`.
    pub c_proj: Linear<B>,
    /// Number of heads.
    pub n_head: usize,
    /// `attn.attn_dropout`: on the attention probabilities (`attn_pdrop`).
    pub attn_dropout: Dropout,
    /// `attn.resid_dropout`: on the output of `c_proj` (`resid_pdrop`).
    pub resid_dropout: Dropout,
}

impl<B: Backend> Gpt2Attention<B> {
    /// `[batch, seq, n_embd]` to `[batch, seq, n_embd]`; `causal_bias` is `[seq, seq]`.
    pub fn forward(&self, x: Tensor<B, 3>, causal_bias: Tensor<B, 2>) -> Tensor<B, 3> {
        let [batch, seq, d] = x.dims();
        let head_dim = d / self.n_head;
        let qkv = dense(&self.c_attn, x);
        let heads = |i: usize| {
            qkv.clone()
                .slice([0..batch, 0..seq, i * d..(i + 1) * d])
                .reshape([batch, seq, self.n_head, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar((head_dim as f64).sqrt())
            + causal_bias.unsqueeze::<4>();
        let probs = self.attn_dropout.forward(activation::softmax(scores, 3));
        let context = probs.matmul(v).swap_dims(1, 2).reshape([batch, seq, d]);
        self.resid_dropout.forward(dense(&self.c_proj, context))
    }
}

/// The feed-forward part of a block (`mlp.c_fc`, `mlp.c_proj`).
#[derive(Module, Debug)]
pub struct Gpt2Mlp<B: Backend> {
    /// `mlp.c_fc`.
    pub c_fc: Linear<B>,
    /// `mlp.c_proj`.
    pub c_proj: Linear<B>,
    /// The activation between them.
    #[module(skip)]
    pub activation: Activation,
    /// `mlp.dropout`: on the output of `c_proj` (`resid_pdrop`).
    pub dropout: Dropout,
}

impl<B: Backend> Gpt2Mlp<B> {
    /// `[batch, seq, n_embd]` to `[batch, seq, n_embd]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.dropout.forward(
            self.c_proj
                .forward(self.activation.apply(dense(&self.c_fc, x))),
        )
    }
}

/// One pre-norm block (`h.N.*`).
#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend> {
    /// `ln_1`.
    pub ln_1: LayerNorm<B>,
    /// `attn.*`.
    pub attn: Gpt2Attention<B>,
    /// `ln_2`.
    pub ln_2: LayerNorm<B>,
    /// `mlp.*`.
    pub mlp: Gpt2Mlp<B>,
}

impl<B: Backend> Gpt2Block<B> {
    /// `x + attn(ln_1(x))`, then `+ mlp(ln_2(.))`.
    pub fn forward(&self, x: Tensor<B, 3>, causal_bias: Tensor<B, 2>) -> Tensor<B, 3> {
        let x = x.clone() + self.attn.forward(self.ln_1.forward(x), causal_bias);
        x.clone() + self.mlp.forward(self.ln_2.forward(x))
    }
}

/// Hugging Face `GPT2Model`: embeddings, blocks and the final layer norm.
#[derive(Module, Debug)]
pub struct Gpt2Model<B: Backend> {
    /// `wte`, `[vocab_size, n_embd]`.
    pub wte: Embedding<B>,
    /// `wpe`, `[n_positions, n_embd]`.
    pub wpe: Embedding<B>,
    /// `h.N`.
    pub h: Vec<Gpt2Block<B>>,
    /// `ln_f`.
    pub ln_f: LayerNorm<B>,
    /// `drop`: on the sum of token and position embeddings (`embd_pdrop`).
    pub drop: Dropout,
}

impl<B: Backend> Gpt2Model<B> {
    /// `[batch, seq]` ids to `[batch, seq, n_embd]` hidden states.
    ///
    /// Panics if `seq` exceeds the `n_positions` of the position embeddings.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let n_positions = self.wpe.weight.dims()[0];
        assert!(
            seq <= n_positions,
            "sequence of {seq} tokens is longer than n_positions {n_positions}"
        );
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).unsqueeze::<2>();
        let mut x = self
            .drop
            .forward(self.wte.forward(input_ids) + self.wpe.forward(positions));
        let bias = causal_bias::<B>(seq, &device);
        for block in &self.h {
            x = block.forward(x, bias.clone());
        }
        self.ln_f.forward(x)
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

/// Hugging Face `GPT2LMHeadModel`: [`Gpt2Model`] (`transformer.*`) and an LM head
/// tied to `wte`.
#[derive(Module, Debug)]
pub struct Gpt2LMHeadModel<B: Backend> {
    /// `transformer.*`.
    pub transformer: Gpt2Model<B>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: Gpt2Config,
}

impl<B: Backend> Gpt2LMHeadModel<B> {
    /// A freshly initialised model (weights N(0, `initializer_range`), as Hugging Face).
    ///
    /// Panics if `config` is inconsistent; [`Gpt2Config::validate`] checks it first.
    pub fn init(config: &Gpt2Config, device: &B::Device) -> Self {
        let activation = config.validate().expect("invalid Gpt2Config");
        let d = config.n_embd;
        let std = config.initializer_range;
        let eps = config.layer_norm_epsilon;
        let h = (0..config.n_layer)
            .map(|_| Gpt2Block {
                ln_1: init_layer_norm(d, eps, device),
                attn: Gpt2Attention {
                    c_attn: init_linear([d, 3 * d], std, device),
                    c_proj: init_linear([d, d], std, device),
                    n_head: config.n_head,
                    attn_dropout: dropout(config.attn_pdrop),
                    resid_dropout: dropout(config.resid_pdrop),
                },
                ln_2: init_layer_norm(d, eps, device),
                mlp: Gpt2Mlp {
                    c_fc: init_linear([d, config.inner()], std, device),
                    c_proj: init_linear([config.inner(), d], std, device),
                    activation,
                    dropout: dropout(config.resid_pdrop),
                },
            })
            .collect();
        Gpt2LMHeadModel {
            transformer: Gpt2Model {
                wte: init_embedding([config.vocab_size, d], std, device),
                wpe: init_embedding([config.n_positions, d], 0.01, device),
                h,
                ln_f: init_layer_norm(d, eps, device),
                drop: dropout(config.embd_pdrop),
            },
            config: config.clone(),
        }
    }

    /// The same model with `embd_pdrop`, `attn_pdrop` and `resid_pdrop` all set to `p`,
    /// in its configuration and its dropout layers (the weights are untouched).
    ///
    /// Dropout is active only on autodiff backends (training); `valid()` and
    /// inference backends ignore it. Panics unless `0 <= p < 1`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.config = self.config.with_dropout(p);
        self.config.validate().expect("invalid dropout probability");
        let t = &mut self.transformer;
        t.drop = dropout(p);
        for block in &mut t.h {
            block.attn.attn_dropout = dropout(p);
            block.attn.resid_dropout = dropout(p);
            block.mlp.dropout = dropout(p);
        }
        self
    }

    /// The hidden states the LM head projects: `[batch, seq, n_embd]`, after
    /// `ln_f`. With [`lm_head_weight`](Self::lm_head_weight), what a fused
    /// head + loss needs instead of the full logits.
    pub fn forward_hidden(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.transformer.forward(input_ids)
    }

    /// The LM head's weight, `[vocab_size, n_embd]`: `wte`, tied.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        self.transformer.wte.weight.val()
    }

    /// Next-token logits `[batch, seq, vocab_size]` of `[batch, seq]` ids.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let hidden = self.forward_hidden(input_ids);
        let [batch, seq, d] = hidden.dims();
        let wte = self.lm_head_weight();
        let vocab = wte.dims()[0];
        hidden
            .reshape([batch * seq, d])
            .matmul(wte.transpose())
            .reshape([batch, seq, vocab])
    }
}
