use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use mics_gpt::{GenerateOptions, sample_next};
use rand::{SeedableRng, rngs::StdRng};

use crate::model::LlamaForCausalLM;

impl<B: Backend> LlamaForCausalLM<B> {
    /// Appends `options.max_new_tokens` sampled tokens to `prompt` and returns the
    /// new tokens (the sampler of `mics-gpt`: greedy at temperature 0, else top-k
    /// sampling, seeded). The context is cropped to the last `max_position_embeddings`
    /// tokens; an empty prompt gives no tokens. No KV cache: every step runs the
    /// whole context.
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
        let window = self.config.max_position_embeddings.max(1);
        let vocab = self.config.vocab_size;
        for _ in 0..options.max_new_tokens {
            let context = &tokens[tokens.len().saturating_sub(window)..];
            let ids: Vec<i64> = context.iter().map(|&t| t as i64).collect();
            let input =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, context.len()]), device);
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
