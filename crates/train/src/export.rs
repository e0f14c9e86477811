//! `mics export`: a sharded checkpoint to one Hugging Face-layout directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use mics_bert::BertForMaskedLM;
use mics_gpt::Gpt2LMHeadModel;

use crate::TrainError;
use crate::checkpoint::{self, TOKENIZER_FILE};
use crate::model::ModelSpec;

/// Writes `model.safetensors` + `config.json` (+ `tokenizer.json`) of the
/// checkpoint `checkpoint` (a checkpoint or run directory) into `out`, in the
/// layout Hugging Face `transformers` and `mics embed`/`logits`/`generate`
/// load. Returns the checkpoint directory used.
pub fn export(checkpoint: &Path, out: &Path) -> Result<PathBuf, TrainError> {
    let dir = checkpoint::resolve_checkpoint(checkpoint)?;
    let index = checkpoint::read_index(&dir)?;
    let values: HashMap<String, Vec<f32>> = checkpoint::consolidate(&dir, &index)?
        .into_iter()
        .map(|(info, values)| (info.path, values))
        .collect();
    let device = Default::default();
    type Cpu = NdArray;
    match &index.model {
        ModelSpec::Gpt2(c) => {
            let model = fill(Gpt2LMHeadModel::<Cpu>::init(c, &device), values, &dir)?;
            model.save(out, &mics_gpt::SaveOptions::default())?;
        }
        ModelSpec::Bert(c) => {
            let model = fill(BertForMaskedLM::<Cpu>::init(c, &device), values, &dir)?;
            model.save(
                out,
                &mics_bert::SaveOptions {
                    prefix: "bert.".into(),
                    dtype: mics_hub::FloatDType::F32,
                },
            )?;
        }
    }
    let tokenizer = dir.join(TOKENIZER_FILE);
    if tokenizer.is_file() {
        let target = out.join(TOKENIZER_FILE);
        std::fs::copy(&tokenizer, &target).map_err(|e| TrainError::io(&target, e))?;
    }
    Ok(dir)
}

/// `model` with every parameter replaced by the value of its module path.
fn fill<B: Backend, M: Module<B>>(
    model: M,
    values: HashMap<String, Vec<f32>>,
    dir: &Path,
) -> Result<M, TrainError> {
    let mut filler = Filler::<B> {
        path: Vec::new(),
        values,
        missing: Vec::new(),
        device: Default::default(),
    };
    let model = model.map(&mut filler);
    if let Some(path) = filler.missing.first() {
        return Err(TrainError::checkpoint(
            dir,
            format!("has no values for parameter `{path}` of the model"),
        ));
    }
    if let Some(path) = filler.values.keys().min() {
        return Err(TrainError::checkpoint(
            dir,
            format!("holds parameter `{path}`, which the model does not have"),
        ));
    }
    Ok(model)
}

struct Filler<B: Backend> {
    path: Vec<String>,
    values: HashMap<String, Vec<f32>>,
    missing: Vec<String>,
    device: B::Device,
}

impl<B: Backend> ModuleMapper<B> for Filler<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let path = self.path.join(".");
        let Some(values) = self.values.remove(&path) else {
            self.missing.push(path);
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.shape();
        let tensor = Tensor::from_data(TensorData::new(values, shape), &self.device);
        Param::from_mapped_value(id, tensor, mapper)
    }
}
