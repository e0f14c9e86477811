use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

use crate::model::Gpt2LMHeadModel;

/// How [`Gpt2LMHeadModel::generate`] picks tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to append.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Seed of the sampler, for reproducible output.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: None,
            seed: 0,
        }
    }
}

/// Picks the next token from one row of logits.
///
/// Greedy (the first maximum) when `temperature <= 0`; otherwise samples from
/// `softmax(logits / temperature)` restricted to the `top_k` largest logits.
pub fn sample_next(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    rng: &mut impl Rng,
) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if temperature <= 0.0 || top_k == Some(1) {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(top_k.unwrap_or(logits.len()).max(1));
    let max = logits[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (&i, w) in order.iter().zip(&weights) {
        draw -= w;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

impl<B: Backend> Gpt2LMHeadModel<B> {
    /// Appends `options.max_new_tokens` sampled tokens to `prompt` and returns the
    /// new tokens. The context is cropped to the last `n_positions` tokens; an empty
    /// prompt gives no tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        device: &B::Device,
    ) -> Vec<u32> {
        if prompt.is_empty() {
            return Vec::new();
        }
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut tokens = prompt.to_vec();
        let window = self.config.n_positions;
        for _ in 0..options.max_new_tokens {
            let context = &tokens[tokens.len().saturating_sub(window)..];
            let ids: Vec<i64> = context.iter().map(|&t| t as i64).collect();
            let input =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, context.len()]), device);
            let vocab = self.config.vocab_size;
            let last =
                self.forward(input)
                    .slice([0..1, context.len() - 1..context.len(), 0..vocab]);
            let row: Vec<f32> = last
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 logits");
            tokens.push(sample_next(
                &row,
                options.temperature,
                options.top_k,
                &mut rng,
            ));
        }
        tokens.split_off(prompt.len())
    }
}
