//! `mics embed`: sentence embeddings from a BERT checkpoint, on any device.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mics_bert::{BertModel, pad_batch};
use mics_hub::TextTokenizer;
use mics_train::{BackendTask, Device, Precision, TrainBackend};

use super::logits::check_model_type;

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
    /// `cpu` (default), `wgpu`, `cuda` or `cuda:INDEX`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Skip verifying the checksums `mics export` records in `model.safetensors`.
    #[arg(long)]
    pub no_verify: bool,
}

/// Prints one JSON object per text, one per line:
/// `{"text": ..., "ids": [...], "embedding": [...]}`, the embedding being the mean of
/// the last hidden states over the tokens, L2-normalised.
pub fn run(args: Args) -> anyhow::Result<()> {
    for line in embed(&args)? {
        println!("{line}");
    }
    Ok(())
}

/// The output lines of `mics embed`.
fn embed(args: &Args) -> anyhow::Result<Vec<serde_json::Value>> {
    check_model_type(&args.model, &["bert"])?;
    super::logits::verify(&args.model, args.no_verify)?;
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    let ids = args
        .texts
        .iter()
        .map(|text| Ok(tokenizer.encode(text, true)?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    struct Embed<'a> {
        dir: &'a Path,
        texts: &'a [String],
        ids: &'a [Vec<u32>],
    }
    impl BackendTask for Embed<'_> {
        type Output = anyhow::Result<(Vec<f32>, usize)>;
        fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
            let (model, _) = BertModel::<B>::load(self.dir, &device)?;
            let limit = model.config.max_position_embeddings;
            for (text, ids) in self.texts.iter().zip(self.ids) {
                if ids.len() > limit {
                    bail!(
                        "text {text:?} is {} tokens long, more than the model's {limit} positions",
                        ids.len()
                    );
                }
            }
            let (input, mask) = pad_batch::<B>(self.ids, model.config.pad_token_id, &device);
            let embeddings: Vec<f32> = model
                .sentence_embeddings(input, mask)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .context("reading the embeddings")?;
            Ok((embeddings, model.config.hidden_size))
        }
    }
    let task = Embed {
        dir: &args.model,
        texts: &args.texts,
        ids: &ids,
    };
    let (embeddings, hidden) = mics_train::with_backend(args.device, Precision::Fp32, task)??;
    Ok(args
        .texts
        .iter()
        .zip(&ids)
        .zip(embeddings.chunks(hidden))
        .map(|((text, ids), embedding)| {
            serde_json::json!({ "text": text, "ids": ids, "embedding": embedding })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mics_hub::assets::asset_dir;

    fn args(model: PathBuf, texts: &[&str]) -> Args {
        Args {
            model,
            texts: texts.iter().map(|t| t.to_string()).collect(),
            device: Device::Cpu,
            no_verify: false,
        }
    }

    #[test]
    fn embeds_minilm_as_json_lines() {
        let dir = asset_dir("minilm").unwrap_or_else(|e| panic!("{e}"));
        let lines = embed(&args(
            dir,
            &["The weather is lovely today.", "It's so sunny outside!"],
        ))
        .unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["text"], "The weather is lovely today.");
        assert_eq!(
            lines[0]["ids"],
            serde_json::json!([101, 1996, 4633, 2003, 8403, 2651, 1012, 102])
        );
        let vector = |i: usize| -> Vec<f64> {
            lines[i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (a, b) = (vector(0), vector(1));
        assert_eq!(a.len(), 384);
        let cosine: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((cosine - 0.6660).abs() < 1e-3, "{cosine}");
    }

    #[test]
    fn rejects_a_gpt2_model() {
        let dir = asset_dir("tiny-gpt2")
            .unwrap_or_else(|e| panic!("{e}"))
            .join("hub");
        let err = embed(&args(dir, &["hi"])).unwrap_err();
        assert!(
            format!("{err:#}").contains("model_type \"gpt2\""),
            "{err:#}"
        );
    }
}
