//! `mics embed`: sentence embeddings from a BERT checkpoint.

use std::path::PathBuf;

use anyhow::{Context, bail};
use mics_bert::{BertModel, pad_batch};
use mics_hub::TextTokenizer;

use super::logits::{Cpu, check_model_type};

/// Arguments of `mics embed`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory holding `config.json` (`model_type` "bert"), `model.safetensors`
    /// and `tokenizer.json`.
    #[arg(long)]
    pub model: PathBuf,
    /// The texts to embed.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

/// Prints one JSON object per text, one per line:
/// `{"text": ..., "ids": [...], "embedding": [...]}`, the embedding being the mean of
/// the last hidden states over the tokens, L2-normalised.
pub fn run(args: Args) -> anyhow::Result<()> {
    check_model_type(&args.model, &["bert"])?;
    let device = Default::default();
    let (model, _) = BertModel::<Cpu>::load(&args.model, &device)?;
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    let limit = model.config.max_position_embeddings;
    let ids = args
        .texts
        .iter()
        .map(|text| {
            let ids = tokenizer.encode(text, true)?;
            if ids.len() > limit {
                bail!(
                    "text {text:?} is {} tokens long, more than the model's {limit} positions",
                    ids.len()
                );
            }
            Ok(ids)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let hidden = model.config.hidden_size;
    let (input, mask) = pad_batch::<Cpu>(&ids, model.config.pad_token_id, &device);
    let embeddings: Vec<f32> = model
        .sentence_embeddings(input, mask)
        .into_data()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("reading the embeddings")?;
    for ((text, ids), embedding) in args.texts.iter().zip(&ids).zip(embeddings.chunks(hidden)) {
        let line = serde_json::json!({ "text": text, "ids": ids, "embedding": embedding });
        println!("{line}");
    }
    Ok(())
}
