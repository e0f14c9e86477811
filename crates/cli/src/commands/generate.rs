//! `mics generate`: sample text from a GPT-2 checkpoint.

use std::path::PathBuf;

use anyhow::bail;
use mics_gpt::{GenerateOptions, Gpt2LMHeadModel};
use mics_hub::TextTokenizer;

use super::logits::{Cpu, check_model_type};

/// Arguments of `mics generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory holding `config.json` (`model_type` "gpt2") and `model.safetensors`,
    /// and the tokenizer unless `--tokenizer` is given.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 always picks the most likely token.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler (random when absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory with the GPT-2 tokenizer (`vocab.json` + `merges.txt`, or
    /// `encoder.json` + `vocab.bpe`, or `tokenizer.json`); defaults to `--model`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Prints the prompt followed by the generated continuation.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!(
            "--temperature must be a finite number >= 0, not {}",
            args.temperature
        );
    }
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    check_model_type(&args.model, &["gpt2"])?;
    let tokenizer = TextTokenizer::from_dir(args.tokenizer.as_ref().unwrap_or(&args.model))?;
    let device = Default::default();
    let (model, _) = Gpt2LMHeadModel::<Cpu>::load(&args.model, &device)?;
    let prompt = tokenizer.encode(&args.prompt, false)?;
    if prompt.is_empty() {
        bail!("--prompt is empty");
    }
    if let Some(bad) = prompt
        .iter()
        .find(|&&id| id as usize >= model.config.vocab_size)
    {
        bail!(
            "the tokenizer gives id {bad}, outside the model's vocabulary of {} tokens",
            model.config.vocab_size
        );
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed,
    };
    let new = model.generate(&prompt, &options, &device);
    let mut all = prompt;
    all.extend(new);
    println!("{}", tokenizer.decode(&all)?);
    Ok(())
}
