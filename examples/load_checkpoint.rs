//! From a sharded training checkpoint to generated text: export the
//! checkpoint to a Hugging Face-layout directory, load it as a plain
//! `Gpt2LMHeadModel` on a Burn backend (`--device cpu|wgpu|cuda`), and
//! continue a prompt greedily.
//!
//! A sharded checkpoint (`<run>/checkpoints/step-N/`) holds one safetensors
//! file per rank (its parameter shards and AdamW moments) and an index.
//! [`mics::train::export`] consolidates the shards into `model.safetensors` +
//! `config.json` + `tokenizer.json`, the layout `transformers` loads too.
//!
//! ```sh
//! cargo run --example load_checkpoint -- --tiny               # trains a tiny GPT-2 first (5 steps)
//! cargo run --example load_checkpoint -- RUN_OR_CHECKPOINT    # e.g. what the train_gpt example wrote
//! cargo run --example load_checkpoint -- RUN --prompt "KING HENRY:" --tokens 40
//! ```
//!
//! Without a checkpoint argument the example first trains a tiny GPT-2 on
//! Shakespeare for a few steps with `mics_train::train` (needs
//! `scripts/fetch-assets`). `MICS_EXAMPLE_TINY=1` selects the tiny settings
//! like `--tiny`. Everything is written under `--out DIR` (default
//! `$TMPDIR/mics-examples/load_checkpoint`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mics::gpt::{GenerateOptions, Gpt2LMHeadModel};
use mics::hub::TextTokenizer;
use mics::train::{BackendTask, Device, Precision, RunOutcome, TrainBackend, TrainConfig};

/// Export a sharded checkpoint to the Hugging Face layout, load it as a plain
/// GPT-2 and continue a prompt greedily.
#[derive(Parser)]
struct Args {
    /// A checkpoint (`.../checkpoints/step-N`) or run directory; without
    /// one, a tiny GPT-2 is trained first.
    checkpoint: Option<PathBuf>,
    /// Tiny settings (a 5-step model, 8 tokens): seconds, for CI.
    #[arg(long, env = "MICS_EXAMPLE_TINY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    tiny: bool,
    /// Where the run and the export go.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("mics-examples/load_checkpoint"))]
    out: PathBuf,
    /// The text to continue.
    #[arg(long, default_value = "ROMEO:\nBut soft, what light")]
    prompt: String,
    /// Tokens to generate (8 with --tiny, else 32).
    #[arg(long)]
    tokens: Option<usize>,
    /// Where to load the exported model and generate: `cpu`, `wgpu`, `cuda`.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// Trains a small GPT-2 on Shakespeare into `dir` (`configs/gpt2-shakespeare.toml`,
/// made small) and returns its last checkpoint.
fn train_first(dir: &Path, tiny: bool) -> Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/gpt2-shakespeare.toml");
    let mut config = TrainConfig::load(&path)?;
    let (m, d, t) = (&mut config.model, &mut config.data, &mut config.train);
    (m.layers, m.hidden, m.heads, m.max_positions) = if tiny {
        (1, 32, 2, Some(64))
    } else {
        (2, 64, 2, Some(64))
    };
    d.seq_len = if tiny { 16 } else { 64 };
    (t.steps, t.micro_batch, t.grad_accum, t.seed) = (if tiny { 5 } else { 100 }, 2, 1, 1);
    (t.lr, t.min_lr, t.warmup_steps) = (1e-2, 1e-3, 0);
    (t.eval_every, t.eval_batches, t.checkpoint_every) = (0, 1, 0);
    t.log_every = if tiny { 1 } else { 10 };
    config.output.dir = dir.to_path_buf();
    println!(
        "no checkpoint given: training a GPT-2 ({} layer(s), hidden {}) for {} steps on N = 2 \
         ranks, p = 2, into {}",
        config.model.layers,
        config.model.hidden,
        config.train.steps,
        dir.display()
    );
    let RunOutcome::Leader(summary) =
        mics::train::train(&config, None).context("training the GPT-2 failed")?
    else {
        bail!("an in-process run leads");
    };
    let losses: Vec<String> = summary.losses.iter().map(|l| format!("{l:.3}")).collect();
    println!("training losses: {}", losses.join(" "));
    summary.checkpoint.context("the run wrote no checkpoint")
}

/// Loads the exported GPT-2 on the chosen backend and continues the prompt.
struct Generate<'a> {
    exported: &'a Path,
    prompt: &'a [u32],
    options: GenerateOptions,
}

impl BackendTask for Generate<'_> {
    type Output = Result<Vec<u32>>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        // A plain Burn module: nothing of the sharding is left.
        let (model, report) =
            Gpt2LMHeadModel::<B>::load(self.exported, &device).with_context(|| {
                format!(
                    "cannot load {} as GPT-2 (this example generates with GPT-2 checkpoints only)",
                    self.exported.display()
                )
            })?;
        let c = &model.config;
        println!(
            "loaded Gpt2LMHeadModel: n_layer {}, n_embd {}, vocabulary {}, {} positions \
             (key prefix `{}`, {:?})",
            c.n_layer, c.n_embd, c.vocab_size, c.n_positions, report.prefix, report.dtype
        );
        Ok(model.generate(self.prompt, &self.options, &device))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let checkpoint = match &args.checkpoint {
        Some(path) => path.clone(),
        None => train_first(&args.out.join("run"), args.tiny)?,
    };

    // Sharded checkpoint -> Hugging Face layout.
    let exported = args.out.join("hf");
    let used = mics::train::export(&checkpoint, &exported, args.device)
        .with_context(|| format!("cannot export {}", checkpoint.display()))?;
    println!("exported {} -> {}", used.display(), exported.display());
    let mut files: Vec<String> = std::fs::read_dir(&exported)
        .with_context(|| format!("cannot list {}", exported.display()))?
        .filter_map(|e| e.ok())
        .map(|e| {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!("{} ({size} B)", e.file_name().to_string_lossy())
        })
        .collect();
    files.sort();
    println!("  {}", files.join(", "));

    let tokenizer = TextTokenizer::from_dir(&exported)
        .with_context(|| format!("no tokenizer in {}", exported.display()))?;
    let prompt = tokenizer
        .encode(&args.prompt, false)
        .context("cannot tokenize the prompt")?;
    let options = GenerateOptions {
        max_new_tokens: args.tokens.unwrap_or(if args.tiny { 8 } else { 32 }),
        temperature: 0.0, // greedy
        top_k: None,
        seed: 0,
    };
    let max_new_tokens = options.max_new_tokens;
    let task = Generate {
        exported: &exported,
        prompt: &prompt,
        options,
    };
    let new = mics::train::with_backend(args.device, Precision::Fp32, task)??;
    let text = tokenizer
        .decode(&new)
        .context("cannot decode the generated tokens")?;
    println!("prompt ({} tokens): {:?}", prompt.len(), args.prompt);
    println!("greedy continuation ({} tokens): {text:?}", new.len());
    println!("token ids: {new:?}");
    if new.len() != max_new_tokens {
        bail!("generated {} tokens instead of {max_new_tokens}", new.len());
    }
    Ok(())
}
