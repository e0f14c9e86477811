use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::tensor::{Int, Tensor, TensorData, activation, backend::Backend};

use crate::config::{Activation, BertConfig};
use mics_hub::modules::{dense, init_embedding, init_layer_norm, init_linear};

/// Added to the attention scores of padded keys (what the original BERT uses; it is
/// representable in half precision and makes their weight exactly zero).
const MASKED_SCORE: f32 = -10_000.0;

/// A dropout layer of probability `p` (a constant module: no parameters, active only
/// on autodiff backends).
pub(crate) fn dropout(p: f64) -> Dropout {
    DropoutConfig::new(p).init()
}

/// Word, position and token-type embeddings followed by a layer norm and dropout
/// (`embeddings.*`).
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// `embeddings.word_embeddings`, `[vocab_size, hidden]`.
    pub word_embeddings: Embedding<B>,
    /// `embeddings.position_embeddings`, `[max_position_embeddings, hidden]`.
    pub position_embeddings: Embedding<B>,
    /// `embeddings.token_type_embeddings`, `[type_vocab_size, hidden]`.
    pub token_type_embeddings: Embedding<B>,
    /// `embeddings.LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    /// `embeddings.dropout`: after the layer norm (`hidden_dropout_prob`).
    pub dropout: Dropout,
}

impl<B: Backend> BertEmbeddings<B> {
    /// `[batch, seq]` ids and token types to `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [_, seq] = input_ids.dims();
        let positions =
            Tensor::<B, 1, Int>::arange(0..seq as i64, &input_ids.device()).unsqueeze::<2>();
        let x = self.word_embeddings.forward(input_ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(token_type_ids);
        self.dropout.forward(self.layer_norm.forward(x))
    }
}

/// Multi-head self-attention with its output projection, residual and layer norm
/// (`attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`).
#[derive(Module, Debug)]
pub struct BertAttention<B: Backend> {
    /// `attention.self.query`.
    pub query: Linear<B>,
    /// `attention.self.key`.
    pub key: Linear<B>,
    /// `attention.self.value`.
    pub value: Linear<B>,
    /// `attention.output.dense`.
    pub output: Linear<B>,
    /// `attention.output.LayerNorm`.
    pub output_norm: LayerNorm<B>,
    /// Number of heads.
    pub n_heads: usize,
    /// `attention.self.dropout`: on the attention probabilities
    /// (`attention_probs_dropout_prob`).
    pub probs_dropout: Dropout,
    /// `attention.output.dropout`: on the output of `attention.output.dense`, before
    /// the residual addition (`hidden_dropout_prob`).
    pub output_dropout: Dropout,
}

impl<B: Backend> BertAttention<B> {
    /// `x`: `[batch, seq, hidden]`; `score_bias`: `[batch, 1, 1, seq]`, added to the
    /// attention scores (0 for real tokens, a large negative number for padding).
    pub fn forward(&self, x: Tensor<B, 3>, score_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.n_heads;
        let heads = |t: Tensor<B, 3>| {
            t.reshape([batch, seq, self.n_heads, head_dim])
                .swap_dims(1, 2)
        };
        let q = heads(dense(&self.query, x.clone()));
        let k = heads(dense(&self.key, x.clone()));
        let v = heads(dense(&self.value, x.clone()));
        let mut scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar((head_dim as f64).sqrt());
        if let Some(bias) = score_bias {
            scores = scores + bias;
        }
        let probs = self.probs_dropout.forward(activation::softmax(scores, 3));
        let context = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden]);
        let out = self.output_dropout.forward(dense(&self.output, context));
        self.output_norm.forward(out + x)
    }
}

/// One encoder layer (`encoder.layer.N.*`).
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// `attention.*`.
    pub attention: BertAttention<B>,
    /// `intermediate.dense`.
    pub intermediate: Linear<B>,
    /// `output.dense`.
    pub output: Linear<B>,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm<B>,
    /// The feed-forward activation.
    #[module(skip)]
    pub activation: Activation,
    /// `output.dropout`: on the output of `output.dense`, before the residual
    /// addition (`hidden_dropout_prob`).
    pub output_dropout: Dropout,
}

impl<B: Backend> BertLayer<B> {
    /// `[batch, seq, hidden]` to `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, score_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let x = self.attention.forward(x, score_bias);
        let h = self.activation.apply(dense(&self.intermediate, x.clone()));
        let out = self.output_dropout.forward(dense(&self.output, h));
        self.output_norm.forward(out + x)
    }
}

/// What [`BertModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct BertOutput<B: Backend> {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `tanh(pooler(first token))`, `[batch, hidden]`.
    pub pooled: Tensor<B, 2>,
}

/// Hugging Face `BertModel`: embeddings, encoder and pooler.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    /// `embeddings.*`.
    pub embeddings: BertEmbeddings<B>,
    /// `encoder.layer.N.*`.
    pub layers: Vec<BertLayer<B>>,
    /// `pooler.dense`.
    pub pooler: Linear<B>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: BertConfig,
}

impl<B: Backend> BertModel<B> {
    /// A freshly initialised model (weights N(0, `initializer_range`), as Hugging Face).
    ///
    /// Panics if `config` is inconsistent; [`BertConfig::validate`] checks it first.
    pub fn init(config: &BertConfig, device: &B::Device) -> Self {
        let activation = config.validate().expect("invalid BertConfig");
        let d = config.hidden_size;
        let std = config.initializer_range;
        let eps = config.layer_norm_eps;
        let embeddings = BertEmbeddings {
            word_embeddings: init_embedding([config.vocab_size, d], std, device),
            position_embeddings: init_embedding([config.max_position_embeddings, d], std, device),
            token_type_embeddings: init_embedding([config.type_vocab_size, d], std, device),
            layer_norm: init_layer_norm(d, eps, device),
            dropout: dropout(config.hidden_dropout_prob),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    query: init_linear([d, d], std, device),
                    key: init_linear([d, d], std, device),
                    value: init_linear([d, d], std, device),
                    output: init_linear([d, d], std, device),
                    output_norm: init_layer_norm(d, eps, device),
                    n_heads: config.num_attention_heads,
                    probs_dropout: dropout(config.attention_probs_dropout_prob),
                    output_dropout: dropout(config.hidden_dropout_prob),
                },
                intermediate: init_linear([d, config.intermediate_size], std, device),
                output: init_linear([config.intermediate_size, d], std, device),
                output_norm: init_layer_norm(d, eps, device),
                activation,
                output_dropout: dropout(config.hidden_dropout_prob),
            })
            .collect();
        BertModel {
            embeddings,
            layers,
            pooler: init_linear([d, d], std, device),
            config: config.clone(),
        }
    }

    /// The same model with `hidden_dropout_prob` and `attention_probs_dropout_prob`
    /// both set to `p`, in its configuration and its dropout layers (the weights are
    /// untouched).
    ///
    /// Dropout is active only on autodiff backends (training); `valid()` and
    /// inference backends ignore it. Panics unless `0 <= p < 1`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.config = self.config.with_dropout(p);
        self.config.validate().expect("invalid dropout probability");
        self.embeddings.dropout = dropout(p);
        for layer in &mut self.layers {
            layer.attention.probs_dropout = dropout(p);
            layer.attention.output_dropout = dropout(p);
            layer.output_dropout = dropout(p);
        }
        self
    }

    /// Runs the encoder on `[batch, seq]` ids.
    ///
    /// `attention_mask` is 1 for real tokens and 0 for padding (all ones when
    /// `None`); `token_type_ids` default to zeros.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
    ) -> BertOutput<B> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let token_type_ids = token_type_ids.unwrap_or_else(|| Tensor::zeros([batch, seq], &device));
        let score_bias = attention_mask.map(|mask| {
            (mask.float() - 1.0)
                .mul_scalar(-MASKED_SCORE)
                .reshape([batch, 1, 1, seq])
        });
        let mut x = self.embeddings.forward(input_ids, token_type_ids);
        for layer in &self.layers {
            x = layer.forward(x, score_bias.clone());
        }
        let hidden = self.config.hidden_size;
        let first = x
            .clone()
            .slice([0..batch, 0..1, 0..hidden])
            .reshape([batch, hidden]);
        let pooled = activation::tanh(self.pooler.forward(first));
        BertOutput {
            last_hidden_state: x,
            pooled,
        }
    }

    /// Mean-pooled, L2-normalised sentence embeddings `[batch, hidden]` (what
    /// sentence-transformers computes for all-MiniLM-L6-v2).
    pub fn sentence_embeddings(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let out = self.forward(input_ids, Some(attention_mask.clone()), None);
        l2_normalize(mean_pool(out.last_hidden_state, attention_mask))
    }
}

/// The masked-LM head (`cls.predictions.*`): dense + activation + layer norm, then
/// the decoder tied to the word embeddings plus its own bias.
#[derive(Module, Debug)]
pub struct BertLmHead<B: Backend> {
    /// `cls.predictions.transform.dense`.
    pub dense: Linear<B>,
    /// `cls.predictions.transform.LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    /// `cls.predictions.bias`, `[vocab_size]`.
    pub bias: Param<Tensor<B, 1>>,
    /// The transform's activation.
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> BertLmHead<B> {
    /// A fresh head (dense N(0, std), layer norm identity, bias zero).
    pub fn init(config: &BertConfig, device: &B::Device) -> Self {
        let activation = config.validate().expect("invalid BertConfig");
        let d = config.hidden_size;
        BertLmHead {
            dense: init_linear([d, d], config.initializer_range, device),
            layer_norm: init_layer_norm(d, config.layer_norm_eps, device),
            bias: Param::from_tensor(Tensor::zeros([config.vocab_size], device)),
            activation,
        }
    }

    /// The transform (dense, activation, layer norm) of `[batch, seq, hidden]`
    /// hidden states: what the decoder projects.
    pub fn transform(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layer_norm
            .forward(self.activation.apply(dense(&self.dense, hidden)))
    }

    /// `[batch, seq, hidden]` hidden states to `[batch, seq, vocab]` logits, the
    /// decoder being `word_embeddings` (`[vocab, hidden]`).
    pub fn forward(&self, hidden: Tensor<B, 3>, word_embeddings: Tensor<B, 2>) -> Tensor<B, 3> {
        let [batch, seq, d] = hidden.dims();
        let h = self.transform(hidden);
        let vocab = word_embeddings.dims()[0];
        let logits = h
            .reshape([batch * seq, d])
            .matmul(word_embeddings.transpose())
            + self.bias.val().unsqueeze::<2>();
        logits.reshape([batch, seq, vocab])
    }
}

/// Hugging Face `BertForMaskedLM`: [`BertModel`] (`bert.*`) and [`BertLmHead`] (`cls.*`).
#[derive(Module, Debug)]
pub struct BertForMaskedLM<B: Backend> {
    /// `bert.*`.
    pub bert: BertModel<B>,
    /// `cls.predictions.*`.
    pub head: BertLmHead<B>,
}

impl<B: Backend> BertForMaskedLM<B> {
    /// A freshly initialised model.
    pub fn init(config: &BertConfig, device: &B::Device) -> Self {
        BertForMaskedLM {
            bert: BertModel::init(config, device),
            head: BertLmHead::init(config, device),
        }
    }

    /// The same model with its encoder's dropout set to `p`
    /// ([`BertModel::with_dropout`]; the masked-LM head has no dropout, as in Hugging
    /// Face). Panics unless `0 <= p < 1`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.bert = self.bert.with_dropout(p);
        self
    }

    /// What the decoder projects: the head's transform of the encoder's
    /// last hidden states, `[batch, seq, hidden]`. With
    /// [`lm_head_weight`](Self::lm_head_weight) and
    /// [`lm_head_bias`](Self::lm_head_bias), what a fused head + loss needs
    /// instead of the full logits.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let out = self.bert.forward(input_ids, attention_mask, None);
        self.head.transform(out.last_hidden_state)
    }

    /// The decoder's weight, `[vocab, hidden]`: the word embeddings, tied.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        self.bert.embeddings.word_embeddings.weight.val()
    }

    /// The decoder's bias, `[vocab]` (`cls.predictions.bias`).
    pub fn lm_head_bias(&self) -> Tensor<B, 1> {
        self.head.bias.val()
    }

    /// Masked-LM logits `[batch, seq, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let out = self.bert.forward(input_ids, attention_mask, None);
        self.head.forward(
            out.last_hidden_state,
            self.bert.embeddings.word_embeddings.weight.val(),
        )
    }
}

/// Mean of `hidden` (`[batch, seq, d]`) over the positions where `mask` is 1.
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, _, d] = hidden.dims();
    let mask = mask.float().unsqueeze_dim::<3>(2);
    let summed = (hidden * mask.clone()).sum_dim(1).reshape([batch, d]);
    let counts = mask.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    summed / counts
}

/// Each row divided by its L2 norm (norms below 1e-12 are taken as 1e-12).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Right-pads token sequences with `pad_id` into `[batch, longest]` ids and a
/// 1/0 attention mask.
pub fn pad_batch<B: Backend>(
    sequences: &[Vec<u32>],
    pad_id: u32,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let batch = sequences.len();
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![pad_id as i64; batch * longest];
    let mut mask = vec![0i64; batch * longest];
    for (row, seq) in sequences.iter().enumerate() {
        for (col, &id) in seq.iter().enumerate() {
            ids[row * longest + col] = id as i64;
            mask[row * longest + col] = 1;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [batch, longest]), device),
        Tensor::from_data(TensorData::new(mask, [batch, longest]), device),
    )
}
