//! From a sharded training checkpoint to generated text: export the
//! checkpoint to a Hugging Face-layout directory, load it as a plain
//! `Gpt2LMHeadModel` on Burn's CPU backend, and continue a prompt greedily.
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
use burn::backend::NdArray;
use mics::gpt::{GenerateOptions, Gpt2LMHeadModel};
use mics::hub::TextTokenizer;
use mics::train::TrainConfig;

const USAGE: &str = "usage: load_checkpoint [CHECKPOINT_OR_RUN_DIR] [--tiny] [--out DIR] \
                     [--prompt TEXT] [--tokens N]";

struct Args {
    checkpoint: Option<PathBuf>,
    tiny: bool,
    out: PathBuf,
    prompt: String,
    tokens: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut tiny = std::env::var("MICS_EXAMPLE_TINY").is_ok_and(|v| v == "1");
    let (mut checkpoint, mut out, mut prompt, mut tokens) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tiny" => tiny = true,
            "--out" => out = Some(PathBuf::from(args.next().context(USAGE)?)),
            "--prompt" => prompt = Some(args.next().context(USAGE)?),
            "--tokens" => tokens = Some(args.next().context(USAGE)?.parse().context(USAGE)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown argument `{other}`\n{USAGE}"),
            path if checkpoint.is_none() => checkpoint = Some(PathBuf::from(path)),
            extra => bail!("unexpected argument `{extra}`\n{USAGE}"),
        }
    }
    Ok(Args {
        checkpoint,
        tiny,
        out: out.unwrap_or_else(|| std::env::temp_dir().join("mics-examples/load_checkpoint")),
        prompt: prompt.unwrap_or_else(|| "ROMEO:\nBut soft, what light".into()),
        tokens,
    })
}

/// Trains a small GPT-2 on Shakespeare into `dir` and returns its last
/// checkpoint.
fn train_first(dir: &Path, tiny: bool) -> Result<PathBuf> {
    let (layers, hidden, steps) = if tiny { (1, 32, 5) } else { (2, 64, 100) };
    let text = format!(
        r#"
[model]
type = "gpt2"
layers = {layers}
hidden = {hidden}
heads = 2
max_positions = 64

[data]
corpus = "shakespeare"
tokenizer = "gpt2"
seq_len = {seq_len}

[train]
steps = {steps}
micro_batch = 2
seed = 1
lr = 1e-2
min_lr = 1e-3
beta2 = 0.95
eval_batches = 1
log_every = {log_every}

[parallel]
world = 2
partition_size = 2
"#,
        seq_len = if tiny { 16 } else { 64 },
        log_every = if tiny { 1 } else { 10 },
    );
    let mut config = TrainConfig::parse(&text, Path::new("(load_checkpoint example)"))?;
    config.output.dir = dir.to_path_buf();
    println!(
        "no checkpoint given: training a GPT-2 ({layers} layer(s), hidden {hidden}) for {steps} \
         steps on N = 2 ranks, p = 2, into {}",
        dir.display()
    );
    let summary = mics::train::train(&config, None).context("training the GPT-2 failed")?;
    let losses: Vec<String> = summary.losses.iter().map(|l| format!("{l:.3}")).collect();
    println!("training losses: {}", losses.join(" "));
    summary.checkpoint.context("the run wrote no checkpoint")
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let checkpoint = match &args.checkpoint {
        Some(path) => path.clone(),
        None => train_first(&args.out.join("run"), args.tiny)?,
    };

    // Sharded checkpoint -> Hugging Face layout.
    let exported = args.out.join("hf");
    let used = mics::train::export(&checkpoint, &exported)
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

    // A plain Burn module on NdArray: nothing of the sharding is left.
    let device = Default::default();
    let (model, report) =
        Gpt2LMHeadModel::<NdArray>::load(&exported, &device).with_context(|| {
            format!(
                "cannot load {} as GPT-2 (this example generates with GPT-2 checkpoints only)",
                exported.display()
            )
        })?;
    let c = &model.config;
    println!(
        "loaded Gpt2LMHeadModel: n_layer {}, n_embd {}, vocabulary {}, {} positions \
         (key prefix `{}`, {:?})",
        c.n_layer, c.n_embd, c.vocab_size, c.n_positions, report.prefix, report.dtype
    );

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
    let new = model.generate(&prompt, &options, &device);
    let text = tokenizer
        .decode(&new)
        .context("cannot decode the generated tokens")?;
    println!("prompt ({} tokens): {:?}", prompt.len(), args.prompt);
    println!("greedy continuation ({} tokens): {text:?}", new.len());
    println!("token ids: {new:?}");
    if new.len() != options.max_new_tokens {
        bail!(
            "generated {} tokens instead of {}",
            new.len(),
            options.max_new_tokens
        );
    }
    Ok(())
}
