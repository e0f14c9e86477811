//! `mics export`: a sharded checkpoint to one Hugging Face-layout directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::checkpoint::{self, CheckpointIndex, TOKENIZER_FILE};
use crate::device::{BackendTask, TrainBackend, with_backend};
use crate::family::ModelFamily;
use crate::{Device, ModelType, Precision, TrainError, with_family};

/// Writes `model.safetensors` + `config.json` (+ `tokenizer.json`) of the
/// checkpoint `checkpoint` (a checkpoint or run directory) into `out`, in the
/// layout Hugging Face `transformers` and `mics embed`/`logits`/`generate`
/// load, then loads the written model on `device` and checks that one
/// forward pass gives finite logits. Returns the checkpoint directory used.
pub fn export(checkpoint: &Path, out: &Path, device: Device) -> Result<PathBuf, TrainError> {
    let dir = checkpoint::resolve_checkpoint(checkpoint)?;
    let index = checkpoint::read_index(&dir)?;
    with_family!(index.model.kind, |F| export_family::<F>(&dir, &index, out))?;
    let tokenizer = dir.join(TOKENIZER_FILE);
    if tokenizer.is_file() {
        let target = out.join(TOKENIZER_FILE);
        std::fs::copy(&tokenizer, &target).map_err(|e| TrainError::io(&target, e))?;
    }
    struct Check<'a> {
        kind: ModelType,
        out: &'a Path,
    }
    impl BackendTask for Check<'_> {
        type Output = Result<(), TrainError>;
        fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
            with_family!(self.kind, |F| check_on::<F, B>(self.out, &device))
        }
    }
    let check = Check {
        kind: index.model.kind,
        out,
    };
    with_backend(device, Precision::Fp32, check)??;
    Ok(dir)
}

/// Loads the exported model on `device` and runs it on a few tokens: the
/// logits must be finite.
fn check_on<F: ModelFamily, B: TrainBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(), TrainError> {
    let (model, _) = F::load::<B>(dir, device)?;
    let ids: Vec<i64> = (0..8).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 8]), device);
    let logits = F::logits(&model, input).into_data().convert::<f32>();
    let values = logits.as_slice::<f32>().unwrap_or(&[]);
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(TrainError::checkpoint(
            dir,
            format!("the exported model gives a non-finite logit ({bad}) on its first tokens"),
        ));
    }
    Ok(())
}

fn export_family<F: ModelFamily>(
    dir: &Path,
    index: &CheckpointIndex,
    out: &Path,
) -> Result<(), TrainError> {
    let values: HashMap<String, Vec<f32>> = checkpoint::consolidate(dir, index)?
        .into_iter()
        .map(|(info, values)| (info.path, values))
        .collect();
    let config = index
        .model
        .config::<F>()
        .map_err(|problem| TrainError::checkpoint(dir, format!("model: {problem}")))?;
    let device = Default::default();
    let model = fill(F::init::<NdArray>(&config, &device), values, dir)?;
    F::save(&model, out)?;
    // The tensors' checksums in the file's metadata: `mics logits`,
    // `generate` and `embed` verify them.
    crate::integrity::add_checksums(&out.join("model.safetensors"))
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
