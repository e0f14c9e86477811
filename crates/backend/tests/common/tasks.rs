//! The models of the parity tests, shared with `examples/mpi_parity.rs`:
//! an MLP and a small transformer built from `burn::nn`.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::Task;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    l1: Linear<B>,
    ln: LayerNorm<B>,
    l2: Linear<B>,
    act: Gelu,
}

pub struct MlpTask;

const IN: usize = 7;
const HIDDEN: usize = 13;
const OUT: usize = 5;

fn sample_data<B: Backend>(
    samples: Range<usize>,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = samples.len();
    let x: Vec<f32> = samples
        .clone()
        .flat_map(|s| (0..IN).map(move |i| ((s * IN + i) as f32 * 0.37).cos()))
        .collect();
    let y: Vec<f32> = samples
        .flat_map(|s| (0..OUT).map(move |i| ((s * 3 + i) as f32 * 0.11).sin()))
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [n, IN]), device),
        Tensor::from_data(TensorData::new(y, [n, OUT]), device),
    )
}

impl Task for MlpTask {
    type Model<B: AutodiffBackend> = Mlp<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            l1: LinearConfig::new(IN, HIDDEN).init(device),
            ln: LayerNormConfig::new(HIDDEN).init(device),
            l2: LinearConfig::new(HIDDEN, OUT).init(device),
            act: Gelu::new(),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &Mlp<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let (x, y) = sample_data::<B>(samples, device);
        let h = m.act.forward(m.ln.forward(m.l1.forward(x)));
        let out = m.l2.forward(h);
        (out - y).powi_scalar(2).mean()
    }
}

/// Embedding (tied with the output projection), a learned position table
/// used through views, causal self-attention, layer norms and an MLP.
#[derive(Module, Debug)]
pub struct TinyGpt<B: Backend> {
    embed: Embedding<B>,
    pos: Param<Tensor<B, 2>>,
    ln1: LayerNorm<B>,
    attn: MultiHeadAttention<B>,
    ln2: LayerNorm<B>,
    fc: Linear<B>,
    proj: Linear<B>,
    ln_f: LayerNorm<B>,
    act: Gelu,
}

pub struct GptTask;

const VOCAB: usize = 13;
const D_MODEL: usize = 10;
const SEQ: usize = 5;
const FF: usize = 19;

fn tokens(sample: usize) -> Vec<i64> {
    (0..=SEQ)
        .map(|t| ((sample * 7 + t * t * 3 + t) % VOCAB) as i64)
        .collect()
}

impl Task for GptTask {
    type Model<B: AutodiffBackend> = TinyGpt<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> TinyGpt<B> {
        TinyGpt {
            embed: EmbeddingConfig::new(VOCAB, D_MODEL).init(device),
            pos: Param::from_tensor(Tensor::zeros([SEQ, D_MODEL], device)),
            ln1: LayerNormConfig::new(D_MODEL).init(device),
            attn: MultiHeadAttentionConfig::new(D_MODEL, 2)
                .with_dropout(0.0)
                .init(device),
            ln2: LayerNormConfig::new(D_MODEL).init(device),
            fc: LinearConfig::new(D_MODEL, FF).init(device),
            proj: LinearConfig::new(FF, D_MODEL).init(device),
            ln_f: LayerNormConfig::new(D_MODEL).init(device),
            act: Gelu::new(),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &TinyGpt<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let b = samples.len();
        let all: Vec<Vec<i64>> = samples.map(tokens).collect();
        let input: Vec<i64> = all.iter().flat_map(|t| t[..SEQ].to_vec()).collect();
        let target: Vec<i64> = all.iter().flat_map(|t| t[1..].to_vec()).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [b, SEQ]), device);
        let target = Tensor::<B, 2, Int>::from_data(TensorData::new(target, [b, SEQ]), device);

        let x = m.embed.forward(input) + m.pos.val().unsqueeze::<3>();
        let mask = generate_autoregressive_mask::<B>(b, SEQ, device);
        let a = m
            .attn
            .forward(MhaInput::self_attn(m.ln1.forward(x.clone())).mask_attn(mask));
        let x = x + a.context;
        let h = m
            .proj
            .forward(m.act.forward(m.fc.forward(m.ln2.forward(x.clone()))));
        let x = m.ln_f.forward(x + h);
        // Tied weights: the embedding table is used again as the output projection.
        let logits = x.matmul(m.embed.weight.val().transpose().unsqueeze::<3>());
        let logp = log_softmax(logits, 2);
        let picked = logp.gather(2, target.unsqueeze_dim::<3>(2));
        picked.mean().neg()
    }
}

// embed, pos, ln1 (2), attn q/k/v/o (8), ln2 (2), fc (2), proj (2), ln_f (2)
pub const GPT_PARAMS: usize = 20;
