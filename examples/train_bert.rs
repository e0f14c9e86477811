//! Fine-tune a pre-trained BERT (all-MiniLM-L6-v2) with masked language
//! modelling on Moby-Dick, sharded with MiCS, through the `mics_train`
//! library (what `mics train` runs).
//!
//! The run starts from the Hugging Face checkpoint in the asset cache
//! (`model.init_from`): its `config.json` sets the architecture, its weights
//! the initial parameters; the MLM head, which a sentence-transformers file
//! does not carry, is initialised as Hugging Face would. The text is
//! tokenized with MiniLM's own WordPiece vocabulary and masked as in BERT
//! (15% of the tokens, 80/10/10).
//!
//! ```sh
//! scripts/fetch-assets                                  # once: MiniLM and Moby-Dick
//! cargo run --example train_bert -- --tiny              # 3 steps, seq_len 32, N = 2, p = 2
//! cargo run --release --example train_bert              # 100 steps, seq_len 128, N = 4, p = 2
//! cargo run --example train_bert -- --tiny --out runs/bert
//! ```
//!
//! `MICS_EXAMPLE_TINY=1` selects the tiny settings like `--tiny`. Without
//! `--out` the run goes to `$TMPDIR/mics-examples/train_bert`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mics::train::TrainConfig;

const USAGE: &str = "usage: train_bert [--tiny] [--out DIR]";

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
    let out = out.unwrap_or_else(|| std::env::temp_dir().join("mics-examples/train_bert"));
    Ok(Args { tiny, out })
}

/// The run, written as the TOML of `mics train --config` (the same keys as
/// `configs/bert-mlm.toml`). The model's sizes come from the checkpoint's
/// `config.json`.
fn config(tiny: bool, minilm: PathBuf, out: PathBuf) -> Result<TrainConfig> {
    #[rustfmt::skip]
    let (steps, seq_len, micro_batch, world, p, warmup, eval_every, eval_batches, log_every) =
        if tiny { (3, 32, 2, 2, 2, 0, 0, 1, 1) } else { (100, 128, 4, 4, 2, 10, 50, 4, 10) };
    let text = format!(
        r#"
[model]
type = "bert"
dropout = 0.1

[data]
corpus = "moby-dick"
tokenizer = "bert"
seq_len = {seq_len}

[train]
steps = {steps}
micro_batch = {micro_batch}
grad_accum = 1
seed = 7
lr = 1e-4
min_lr = 1e-5
warmup_steps = {warmup}
weight_decay = 0.01
grad_clip = 1.0
eval_every = {eval_every}
eval_batches = {eval_batches}
log_every = {log_every}

[parallel]
world = {world}
partition_size = {p}
"#
    );
    let mut config = TrainConfig::parse(&text, Path::new("(train_bert example)"))?;
    config.model.init_from = Some(minilm);
    config.output.dir = out;
    Ok(config)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let minilm = mics::hub::assets::asset_dir("minilm")
        .context("the MiniLM checkpoint is not in the asset cache")?;
    let config = config(args.tiny, minilm.clone(), args.out)?;
    let p = &config.parallel;
    println!(
        "BERT MLM fine-tuning from {} on Moby-Dick: seq_len {}, {} steps, world N = {}, \
         partition size p = {}, global batch {} sequences{}",
        minilm.display(),
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
            "step {:>4}  MLM loss {loss:.4}",
            summary.start_step + step as u64 + 1
        );
    }
    if let Some(val) = summary.val_loss {
        println!("validation MLM loss {val:.4}");
    }
    if let Some(bad) = summary.losses.iter().find(|l| !l.is_finite()) {
        bail!("the training loss is {bad}");
    }
    println!(
        "{:.0} tokens/s over {:.1} s",
        summary.tokens_per_s, summary.train_seconds
    );
    let checkpoint = summary.checkpoint.context("the run wrote no checkpoint")?;
    println!("sharded checkpoint: {}", checkpoint.display());
    println!("metrics: {}", summary.metrics.display());
    println!(
        "export it: cargo run --bin mics -- export --checkpoint {} --out <dir>",
        checkpoint.display()
    );
    Ok(())
}
