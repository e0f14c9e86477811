//! `mics data`: tokenized datasets for `mics train`.

use std::path::PathBuf;
use std::time::Instant;

use mics_datasets::{Corpus, DEFAULT_VAL_FRACTION, PrepareOptions, TokenizerSpec, prepare};

/// Arguments of `mics data`.
#[derive(clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The subcommands of `mics data`.
#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Tokenize a corpus into a dataset directory: train.bin and val.bin (flat
    /// little-endian u16/u32 token ids), tokenizer.json and meta.json.
    Prepare(PrepareArgs),
}

/// Arguments of `mics data prepare`.
#[derive(clap::Args)]
pub struct PrepareArgs {
    /// `shakespeare` (42 plays), `moby-dick`, a .txt file, or a directory (every
    /// *.txt below it, one document each).
    #[arg(long)]
    pub corpus: Corpus,
    /// `gpt2` (byte-level BPE), `bert` (MiniLM WordPiece), a tokenizer.json, or a
    /// directory holding tokenizer.json or vocab.json + merges.txt.
    #[arg(long)]
    pub tokenizer: TokenizerSpec,
    /// The dataset directory (created; a dataset there is replaced once the new
    /// one is complete).
    #[arg(long)]
    pub out: PathBuf,
    /// The fraction of each document's tokens, from its end, that goes to val.bin.
    #[arg(long, default_value_t = DEFAULT_VAL_FRACTION)]
    pub val_fraction: f64,
}

/// Runs `mics data ...`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Prepare(args) => println!("{}", prepare_dataset(args)?),
    }
    Ok(())
}

/// Prepares the dataset; returns the one-line summary.
fn prepare_dataset(args: PrepareArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    let options = PrepareOptions {
        corpus: args.corpus,
        tokenizer: args.tokenizer,
        out: args.out,
        val_fraction: args.val_fraction,
        progress: true,
    };
    let meta = prepare(&options)?;
    Ok(format!(
        "prepared {}: {} train + {} val tokens from {} documents of {}, tokenizer {} (vocabulary {}, {}), in {:.1} s",
        options.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.documents,
        meta.corpus,
        meta.tokenizer,
        meta.vocab_size,
        meta.dtype,
        started.elapsed().as_secs_f64()
    ))
}
