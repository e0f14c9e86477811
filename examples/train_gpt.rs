//! Train a small GPT-2 on Shakespeare's plays with MiCS, through the
//! `mics_train` library (what `mics train` runs).
//!
//! The run configuration is built in code: a GPT-2 with the GPT-2 BPE
//! vocabulary, trained on N in-process ranks (one thread each) whose model
//! states are sharded over partition groups of p ranks. The trainer prepares
//! the token shards on first use, trains with AdamW (warm-up + cosine decay),
//! evaluates on the validation split and writes a sharded checkpoint, the
//! metrics (JSON lines), a loss plot and a summary.
//!
//! ```sh
//! scripts/fetch-assets                                 # once: the plays and the GPT-2 tokenizer
//! cargo run --example train_gpt -- --tiny              # 1 layer, hidden 32, 5 steps, N = 2, p = 2 (seconds)
//! cargo run --release --example train_gpt              # 4 layers, hidden 128, 300 steps, N = 4, p = 2
//! cargo run --example train_gpt -- --tiny --out runs/gpt   # write the run there
//! ```
//!
//! `MICS_EXAMPLE_TINY=1` selects the tiny settings like `--tiny`. Without
//! `--out` the run goes to `$TMPDIR/mics-examples/train_gpt`; its checkpoint
//! can be exported and sampled with the `load_checkpoint` example.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mics::train::TrainConfig;

const USAGE: &str = "usage: train_gpt [--tiny] [--out DIR]";

struct Args {
    tiny: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut tiny = std::env::var("MICS_EXAMPLE_TINY").is_ok_and(|v| v == "1");
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tiny" => tiny = true,
            "--out" => out = Some(PathBuf::from(args.next().context(USAGE)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    let out = out.unwrap_or_else(|| std::env::temp_dir().join("mics-examples/train_gpt"));
    Ok(Args { tiny, out })
}

/// The run, written as the TOML of `mics train --config` (the same keys as
/// `configs/gpt2-shakespeare.toml`): tiny for CI, or a small model that
/// learns something in minutes with `--release`.
fn config(tiny: bool, out: PathBuf) -> Result<TrainConfig> {
    #[rustfmt::skip]
    let (layers, hidden, heads, seq_len, steps, micro_batch, grad_accum, world, p) =
        if tiny { (1, 32, 2, 16, 5, 2, 1, 2, 2) } else { (4, 128, 4, 64, 300, 4, 2, 4, 2) };
    let (lr, min_lr, warmup, eval_every, eval_batches, log_every) = if tiny {
        ("1e-2", "1e-3", 0, 0, 1, 1)
    } else {
        ("3e-3", "3e-4", 20, 100, 4, 20)
    };
    let text = format!(
        r#"
[model]
type = "gpt2"
layers = {layers}
hidden = {hidden}
heads = {heads}
dropout = 0.0

[data]
corpus = "shakespeare"
tokenizer = "gpt2"
seq_len = {seq_len}

[train]
steps = {steps}
micro_batch = {micro_batch}
grad_accum = {grad_accum}
seed = 42
lr = {lr}
min_lr = {min_lr}
warmup_steps = {warmup}
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
eval_every = {eval_every}
eval_batches = {eval_batches}
log_every = {log_every}

[parallel]
world = {world}
partition_size = {p}
engine = "threads"
"#
    );
    let mut config = TrainConfig::parse(&text, Path::new("(train_gpt example)"))?;
    config.output.dir = out;
    Ok(config)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let config = config(args.tiny, args.out)?;
    let (m, p) = (&config.model, &config.parallel);
    println!(
        "GPT-2 (layers {}, hidden {}, heads {}) on Shakespeare: seq_len {}, {} steps, \
         world N = {}, partition size p = {}, global batch {} sequences{}",
        m.layers,
        m.hidden,
        m.heads,
        config.data.seq_len,
        config.train.steps,
        p.world,
        p.partition_size,
        config.global_batch(),
        if args.tiny { " (tiny)" } else { "" }
    );
    println!("run directory: {}", config.output.dir.display());

    let summary = mics::train::train(&config, None).context("training failed")?;

    for (step, loss) in summary.losses.iter().enumerate() {
        println!(
            "step {:>4}  loss {loss:.4}",
            summary.start_step + step as u64 + 1
        );
    }
    if let Some(val) = summary.val_loss {
        print!("validation loss {val:.4}");
        if let Some(unigram) = summary.unigram_val_loss {
            print!(" (a unigram model scores {unigram:.4})");
        }
        println!();
    }
    println!(
        "{:.0} tokens/s over {:.1} s",
        summary.tokens_per_s, summary.train_seconds
    );
    let (first, last) = (summary.losses.first(), summary.losses.last());
    if let (Some(first), Some(last)) = (first, last)
        && (last >= first || last.is_nan())
    {
        bail!("the training loss did not go down: {first:.4} -> {last:.4}");
    }
    let checkpoint = summary.checkpoint.context("the run wrote no checkpoint")?;
    println!("sharded checkpoint: {}", checkpoint.display());
    println!("metrics: {}", summary.metrics.display());
    if let Some(plot) = summary.loss_plot {
        println!("loss plot: {}", plot.display());
    }
    println!(
        "next: cargo run --example load_checkpoint -- {}",
        checkpoint.display()
    );
    Ok(())
}
