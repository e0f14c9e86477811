//! `mics generate`: sample text from a GPT-2 or Llama checkpoint, on any
//! device.

use std::path::{Path, PathBuf};

use anyhow::bail;
use mics_gpt::{GenerateOptions, Gpt2LMHeadModel};
use mics_hub::TextTokenizer;
use mics_llama::LlamaForCausalLM;
use mics_train::{BackendTask, Device, Precision, TrainBackend};

use super::logits::check_model_type;

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
    /// Directory with the tokenizer (`tokenizer.json`, or GPT-2's
    /// `vocab.json` + `merges.txt` / `encoder.json` + `vocab.bpe`); defaults to `--model`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `cpu` (default), `wgpu`, `cuda` or `cuda:INDEX`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Skip verifying the checksums `mics export` records in `model.safetensors`.
    #[arg(long)]
    pub no_verify: bool,
}

/// Prints the prompt followed by the generated continuation.
pub fn run(args: Args) -> anyhow::Result<()> {
    println!("{}", generate(&args)?);
    Ok(())
}

/// The prompt and its continuation.
fn generate(args: &Args) -> anyhow::Result<String> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!(
            "--temperature must be a finite number >= 0, not {}",
            args.temperature
        );
    }
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    let model_type = check_model_type(&args.model, &["gpt2", "llama"])?;
    super::logits::verify(&args.model, args.no_verify)?;
    let tokenizer = TextTokenizer::from_dir(args.tokenizer.as_ref().unwrap_or(&args.model))?;
    let prompt = tokenizer.encode(&args.prompt, false)?;
    if prompt.is_empty() {
        bail!("--prompt is empty");
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
    struct Generate<'a> {
        llama: bool,
        dir: &'a Path,
        prompt: &'a [u32],
        options: GenerateOptions,
    }
    impl BackendTask for Generate<'_> {
        type Output = anyhow::Result<Vec<u32>>;
        fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
            let (vocab, new) = if self.llama {
                let (model, _) = LlamaForCausalLM::<B>::load(self.dir, &device)?;
                let vocab = model.config.vocab_size;
                check_vocab(self.prompt, vocab)?;
                (vocab, model.generate(self.prompt, &self.options, &device))
            } else {
                let (model, _) = Gpt2LMHeadModel::<B>::load(self.dir, &device)?;
                let vocab = model.config.vocab_size;
                check_vocab(self.prompt, vocab)?;
                (vocab, model.generate(self.prompt, &self.options, &device))
            };
            debug_assert!(new.iter().all(|&id| (id as usize) < vocab));
            Ok(new)
        }
    }
    let task = Generate {
        llama: model_type == "llama",
        dir: &args.model,
        prompt: &prompt,
        options,
    };
    let new = mics_train::with_backend(args.device, Precision::Fp32, task)??;
    let mut all = prompt;
    all.extend(new);
    Ok(tokenizer.decode(&all)?)
}

/// Every prompt id must be in the model's vocabulary.
fn check_vocab(prompt: &[u32], vocab: usize) -> anyhow::Result<()> {
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        bail!("the tokenizer gives id {bad}, outside the model's vocabulary of {vocab} tokens");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mics_hub::assets::asset_dir;

    fn args(variant: &str) -> Args {
        Args {
            model: asset_dir("tiny-gpt2")
                .unwrap_or_else(|e| panic!("{e}"))
                .join(variant),
            prompt: "Hello world".into(),
            max_new_tokens: 6,
            temperature: 0.8,
            top_k: Some(40),
            seed: Some(3),
            tokenizer: None,
            device: Device::Cpu,
            no_verify: false,
        }
    }

    #[test]
    fn seeded_generation_is_reproducible_and_continues_the_prompt() {
        let a = generate(&args("save_pretrained")).unwrap();
        assert!(
            a.starts_with("Hello world") && a.len() > "Hello world".len(),
            "{a}"
        );
        assert_eq!(a, generate(&args("save_pretrained")).unwrap());
        // The Hub layout holds the same weights.
        assert_eq!(a, generate(&args("hub")).unwrap());
    }

    #[test]
    fn tokenizer_can_come_from_elsewhere() {
        let mut with = args("hub");
        with.tokenizer = Some(asset_dir("gpt2-tokenizer").unwrap());
        assert_eq!(generate(&with).unwrap(), generate(&args("hub")).unwrap());
    }

    #[test]
    fn bad_options_are_errors() {
        let mut a = args("hub");
        a.temperature = -1.0;
        assert!(format!("{:#}", generate(&a).unwrap_err()).contains("--temperature"));
        let mut a = args("hub");
        a.top_k = Some(0);
        assert!(format!("{:#}", generate(&a).unwrap_err()).contains("--top-k"));
        let mut a = args("hub");
        a.prompt.clear();
        assert!(format!("{:#}", generate(&a).unwrap_err()).contains("--prompt is empty"));
        let mut a = args("hub");
        a.model = asset_dir("minilm").unwrap();
        assert!(format!("{:#}", generate(&a).unwrap_err()).contains("model_type"));
    }
}
