//! `mics logits`: the logits of a token sequence (GPT-2, Llama: next token;
//! BERT: masked LM), on any device.
//!
//! Also holds what the three model commands share: the `model_type` check.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::{Int, Tensor, TensorData};
use mics_train::{BackendTask, Device, ModelFamily, ModelType, Precision, TrainBackend};

/// Verifies the checksums `mics export` recorded in `dir/model.safetensors`
/// (unless `skip`): a corrupt tensor is an error naming the file and it.
pub(crate) fn verify(dir: &Path, skip: bool) -> anyhow::Result<()> {
    if !skip {
        mics_train::verify_model(dir)?;
    }
    Ok(())
}

/// Reads `model_type` from `dir/config.json` and checks it is one of `accepted`.
pub(crate) fn check_model_type(dir: &Path, accepted: &[&str]) -> anyhow::Result<String> {
    let model_type = mics_hub::config::model_type(dir)?;
    if !accepted.contains(&model_type.as_str()) {
        bail!(
            "{}: model_type {model_type:?} is not supported here (expected {})",
            dir.join("config.json").display(),
            accepted.join(" or ")
        );
    }
    Ok(model_type)
}

/// Arguments of `mics logits`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory holding `config.json` (`model_type` "gpt2" or "bert") and
    /// `model.safetensors`.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. `5,17,88`.
    #[arg(long)]
    pub ids: String,
    /// `cpu` (default), `wgpu`, `cuda` or `cuda:INDEX`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Skip verifying the checksums `mics export` records in `model.safetensors`.
    #[arg(long)]
    pub no_verify: bool,
}

/// Parses `5,17,88` into ids.
fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    let ids = text
        .split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<u32>()
                .with_context(|| format!("--ids: {part:?} is not a token id"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids: no ids given");
    }
    Ok(ids)
}

/// Prints `{"ids": [...], "logits": [[...], ...]}`, one row of vocabulary logits per
/// position.
pub fn run(args: Args) -> anyhow::Result<()> {
    println!("{}", logits(&args)?);
    Ok(())
}

/// The output object of `mics logits`.
fn logits(args: &Args) -> anyhow::Result<serde_json::Value> {
    let ids = parse_ids(&args.ids)?;
    let model_type = check_model_type(&args.model, &["gpt2", "bert", "llama"])?;
    verify(&args.model, args.no_verify)?;
    let kind: ModelType = serde_json::from_value(serde_json::Value::String(model_type))?;
    struct Logits<'a> {
        kind: ModelType,
        dir: &'a Path,
        ids: &'a [u32],
    }
    impl BackendTask for Logits<'_> {
        type Output = anyhow::Result<(Vec<f32>, usize)>;
        fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
            mics_train::with_family!(self.kind, |F| logits_of::<F, B>(
                self.dir, self.ids, &device
            ))
        }
    }
    let task = Logits {
        kind,
        dir: &args.model,
        ids: &ids,
    };
    let (values, vocab) = mics_train::with_backend(args.device, Precision::Fp32, task)??;
    let rows: Vec<&[f32]> = values.chunks(vocab).collect();
    Ok(serde_json::json!({ "ids": ids, "logits": rows }))
}

/// The logits of `ids` under the model of family `F` in `dir`, on `B`, and
/// the vocabulary size.
fn logits_of<F: ModelFamily, B: TrainBackend>(
    dir: &Path,
    ids: &[u32],
    device: &B::Device,
) -> anyhow::Result<(Vec<f32>, usize)> {
    let config = mics_hub::config::read_config::<serde_json::Value>(dir)?;
    let config = F::from_json(config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("config.json").display()))?;
    let (vocab, positions) = (F::vocab_size(&config), F::max_positions(&config));
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("--ids: id {bad} is outside the vocabulary of {vocab} tokens");
    }
    if ids.len() > positions {
        bail!(
            "--ids: {} ids are more than the model's {positions} positions",
            ids.len()
        );
    }
    let (model, report) = F::load::<B>(dir, device)?;
    if !report.initialised.is_empty() {
        eprintln!(
            "warning: not in the checkpoint, randomly initialised: {}",
            report.initialised.join(", ")
        );
    }
    let values: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(values, [1, ids.len()]), device);
    let values: Vec<f32> = F::logits(&model, input)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("reading the logits")?;
    Ok((values, vocab))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mics_hub::assets::asset_dir;

    fn tiny(variant: &str) -> PathBuf {
        asset_dir("tiny-gpt2")
            .unwrap_or_else(|e| panic!("{e}"))
            .join(variant)
    }

    fn run_on(model: PathBuf, ids: &str) -> anyhow::Result<serde_json::Value> {
        logits(&Args {
            model,
            ids: ids.into(),
            device: Device::Cpu,
            no_verify: false,
        })
    }

    #[test]
    fn parses_ids() {
        assert_eq!(parse_ids("5,17,88").unwrap(), [5, 17, 88]);
        assert_eq!(parse_ids(" 5, 17").unwrap(), [5, 17]);
        for bad in ["", "5,,6", "x", "-1", "5;6"] {
            assert!(parse_ids(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn gpt2_layouts_give_the_same_logits() {
        let hub = run_on(tiny("hub"), "15496,995,11").unwrap();
        let saved = run_on(tiny("save_pretrained"), "15496,995,11").unwrap();
        assert_eq!(hub, saved);
        assert_eq!(hub["ids"], serde_json::json!([15496, 995, 11]));
        let rows = hub["logits"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].as_array().unwrap().len(), 50257);
    }

    #[test]
    fn bert_gives_masked_lm_logits() {
        let dir = asset_dir("minilm").unwrap_or_else(|e| panic!("{e}"));
        let out = run_on(dir, "101,2023,102").unwrap();
        let rows = out["logits"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].as_array().unwrap().len(), 30522);
    }

    #[test]
    fn bad_input_is_a_one_line_error() {
        for (model, ids, expected) in [
            (tiny("hub"), "50257", "outside the vocabulary"),
            (
                tiny("hub"),
                &"1,".repeat(65)[..129],
                "more than the model's 64 positions",
            ),
            (tiny("hub"), "1,b", "\"b\" is not a token id"),
            (
                PathBuf::from("/nonexistent"),
                "1",
                "/nonexistent/config.json",
            ),
        ] {
            let err = format!("{:#}", run_on(model, ids).unwrap_err());
            assert!(err.contains(expected) && !err.contains('\n'), "{err}");
        }
    }
}
