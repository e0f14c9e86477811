//! Sharded checkpoints: one safetensors file per rank (parameter shards and
//! optimizer states) plus `index.json`, written atomically.
//!
//! Every rank writes its file into `checkpoints/.step-NNNNNN.partial/`; once
//! all ranks report success, rank 0 writes `index.json` there, renames the
//! directory to `step-NNNNNN` and points `checkpoints/latest` at it. A run
//! killed at any moment leaves the previous checkpoint complete and `latest`
//! pointing at it. (Ranks on several machines need a shared file system.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mics_backend::ParamShardState;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::family::ModelSpec;
use crate::{TrainConfig, TrainError};

/// `index.json`'s format version.
pub const CHECKPOINT_FORMAT: u32 = 1;
const INDEX_FILE: &str = "index.json";
const LATEST_FILE: &str = "latest";
/// The tokenizer copied next to the index, so a checkpoint exports alone.
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";

/// A parameter of the checkpointed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Module path.
    pub path: String,
    /// Full shape.
    pub shape: Vec<usize>,
}

/// `index.json`: what a sharded checkpoint holds and how to continue from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointIndex {
    /// [`CHECKPOINT_FORMAT`].
    pub format_version: u32,
    /// Optimizer steps done; the run continues with the global batch of this step.
    pub step: u64,
    /// World size N that wrote it.
    pub world: usize,
    /// Partition size p that wrote it (shard length depends on it).
    pub partition_size: usize,
    /// Ranks per node k.
    pub ranks_per_node: usize,
    /// N·b·s: the sampler's position is `step` global batches of this size.
    pub global_batch: usize,
    /// Seed of the sampler, masking and dropout (which are functions of
    /// (seed, step, sample), so no generator state needs saving).
    pub seed: u64,
    /// Tokens trained on up to `step`.
    pub tokens_seen: u64,
    /// The model architecture.
    pub model: ModelSpec,
    /// The token shards the run trained on.
    pub dataset: PathBuf,
    /// Parameters in module order.
    pub params: Vec<ParamInfo>,
    /// One file per rank, in rank order.
    pub files: Vec<String>,
    /// The dynamic loss scale (fp16 training), restored on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<SavedLossScale>,
    /// The full configuration of the run that wrote it.
    pub config: TrainConfig,
}

/// The state of dynamic loss scaling, in `index.json` (the same on every
/// rank).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SavedLossScale {
    /// The current scale.
    pub scale: f32,
    /// Good steps in a row since it last changed.
    pub good_steps: u32,
    /// Steps skipped on overflow so far.
    pub skipped_steps: u64,
}

impl From<mics_backend::LossScaleState> for SavedLossScale {
    fn from(s: mics_backend::LossScaleState) -> Self {
        SavedLossScale {
            scale: s.scale,
            good_steps: s.good_steps,
            skipped_steps: s.skipped_steps,
        }
    }
}

impl From<SavedLossScale> for mics_backend::LossScaleState {
    fn from(s: SavedLossScale) -> Self {
        mics_backend::LossScaleState {
            scale: s.scale,
            good_steps: s.good_steps,
            skipped_steps: s.skipped_steps,
        }
    }
}

/// A checkpoint continues only the run that wrote it: same topology, model
/// and global batch (any device and precision: shards are f32).
pub(crate) fn check_resume(
    config: &TrainConfig,
    spec: &ModelSpec,
    dir: &Path,
    index: &CheckpointIndex,
) -> Result<(), TrainError> {
    let p = &config.parallel;
    if index.world != p.world || index.partition_size != p.partition_size {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with world {} and partition size {}, this run has world {} and partition \
                 size {}: re-sharding is not supported (export it and start with --init-from)",
                index.world, index.partition_size, p.world, p.partition_size
            ),
        ));
    }
    if index.global_batch != config.global_batch() {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with a global batch of {} sequences, this run has {} (world × micro-batch \
                 × grad-accum): the sampler position would not match",
                index.global_batch,
                config.global_batch()
            ),
        ));
    }
    if index.seed != config.train.seed {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with seed {}, this run has seed {}",
                index.seed, config.train.seed
            ),
        ));
    }
    if &index.model != spec {
        return Err(TrainError::checkpoint(
            dir,
            "its model configuration differs from this run's",
        ));
    }
    if index.step > config.train.steps {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "already at step {}, beyond --steps {}",
                index.step, config.train.steps
            ),
        ));
    }
    Ok(())
}

/// `rank-00003.safetensors`.
pub(crate) fn rank_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

fn step_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The checkpoint directory of `path`: `path` itself when it holds
/// `index.json`, else the one `path/latest` or `path/checkpoints/latest`
/// names.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(INDEX_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(TrainError::checkpoint(path, "does not exist"));
    }
    for root in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = root.join(LATEST_FILE);
        if let Ok(name) = std::fs::read_to_string(&latest) {
            let dir = root.join(name.trim());
            if dir.join(INDEX_FILE).is_file() {
                return Ok(dir);
            }
            return Err(TrainError::checkpoint(
                &latest,
                format!("names `{}`, which has no {INDEX_FILE}", name.trim()),
            ));
        }
    }
    Err(TrainError::checkpoint(
        path,
        format!("no {INDEX_FILE} here, nor a checkpoints/{LATEST_FILE} pointer"),
    ))
}

/// Reads and checks `dir/index.json`.
pub(crate) fn read_index(dir: &Path) -> Result<CheckpointIndex, TrainError> {
    let path = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TrainError::checkpoint(&path, format!("cannot read: {e}")))?;
    let index: CheckpointIndex = serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(&path, format!("not a valid index: {e}")))?;
    if index.format_version != CHECKPOINT_FORMAT {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "format version {} (this mics reads {CHECKPOINT_FORMAT})",
                index.format_version
            ),
        ));
    }
    if index.files.len() != index.world {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "{} rank files listed for a world of {}",
                index.files.len(),
                index.world
            ),
        ));
    }
    Ok(index)
}

/// Where a run's checkpoints go.
pub(crate) struct CheckpointDir {
    pub root: PathBuf,
}

impl CheckpointDir {
    pub(crate) fn partial(&self, step: u64) -> PathBuf {
        self.root.join(format!(".{}.partial", step_name(step)))
    }

    pub(crate) fn complete(&self, step: u64) -> PathBuf {
        self.root.join(step_name(step))
    }

    /// Rank 0, before any rank writes: an empty partial directory.
    pub(crate) fn begin(&self, step: u64) -> Result<(), TrainError> {
        let partial = self.partial(step);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
        }
        std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))
    }

    /// Rank 0, after every rank wrote its file: the index, the rename, the
    /// `latest` pointer.
    pub(crate) fn commit(
        &self,
        index: &CheckpointIndex,
        tokenizer: Option<&Path>,
    ) -> Result<PathBuf, TrainError> {
        let partial = self.partial(index.step);
        if let Some(tokenizer) = tokenizer {
            std::fs::copy(tokenizer, partial.join(TOKENIZER_FILE))
                .map_err(|e| TrainError::io(tokenizer, e))?;
        }
        let text = serde_json::to_string_pretty(index).expect("plain struct");
        let index_path = partial.join(INDEX_FILE);
        mics_hub::checkpoint::write_atomic(&index_path, text.as_bytes())
            .map_err(|e| TrainError::io(&index_path, e))?;
        fault_point(index.step);
        let complete = self.complete(index.step);
        if complete.exists() {
            // Written before by a run that was then resumed from earlier.
            let old = self.root.join(format!(".{}.old", step_name(index.step)));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&complete, &old).map_err(|e| TrainError::io(&complete, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        std::fs::rename(&partial, &complete).map_err(|e| TrainError::io(&complete, e))?;
        let latest = self.root.join(LATEST_FILE);
        mics_hub::checkpoint::write_atomic(
            &latest,
            format!("{}\n", step_name(index.step)).as_bytes(),
        )
        .map_err(|e| TrainError::io(&latest, e))?;
        Ok(complete)
    }
}

/// Test hook: `MICS_FAULT_INJECT=abort-before-commit:STEP` aborts the process
/// after the checkpoint of STEP is fully written but before it is renamed
/// into place, as a crash or `kill -9` there would.
fn fault_point(step: u64) {
    if let Ok(spec) = std::env::var("MICS_FAULT_INJECT")
        && spec
            .strip_prefix("abort-before-commit:")
            .and_then(|s| s.parse().ok())
            == Some(step)
    {
        eprintln!(
            "mics: MICS_FAULT_INJECT: aborting before committing the checkpoint of step {step}"
        );
        std::process::abort();
    }
}

/// Writes one rank's states as `dir/rank-NNNNN.safetensors`: `param.<path>`
/// (f32 shard) and `optim.<path>` (the optimizer state bytes, u8), with the
/// full shapes in the metadata.
pub(crate) fn write_rank_file(
    dir: &Path,
    rank: usize,
    states: &[ParamShardState],
) -> Result<(), TrainError> {
    let path = dir.join(rank_file_name(rank));
    let shard_bytes: Vec<Vec<u8>> = states.iter().map(|s| bytemuck_f32(&s.shard)).collect();
    let mut views = Vec::new();
    let mut metadata = HashMap::from([
        ("format".to_string(), "mics-shard".to_string()),
        ("rank".to_string(), rank.to_string()),
    ]);
    for (state, bytes) in states.iter().zip(&shard_bytes) {
        let view = TensorView::new(Dtype::F32, vec![state.shard.len()], bytes)
            .map_err(|e| TrainError::io(&path, format!("{e:?}")))?;
        views.push((format!("param.{}", state.path), view));
        if let Some(optim) = &state.optimizer {
            let view = TensorView::new(Dtype::U8, vec![optim.len()], optim)
                .map_err(|e| TrainError::io(&path, format!("{e:?}")))?;
            views.push((format!("optim.{}", state.path), view));
        }
        metadata.insert(
            format!("shape.{}", state.path),
            serde_json::to_string(&state.shape).expect("plain vec"),
        );
    }
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| TrainError::io(&path, format!("{e:?}")))?;
    let bytes = sorted_header(bytes);
    mics_hub::checkpoint::write_atomic(&path, &bytes).map_err(|e| TrainError::io(&path, e))
}

/// `safetensors::serialize` writes the metadata map in `HashMap` order,
/// which changes from one process to the next: the header rewritten with
/// sorted keys (the same length, so the data offsets stand), so that the
/// same states always give the same bytes (a resumed run's checkpoints are
/// byte-identical to an uninterrupted run's).
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    use std::collections::BTreeMap;
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(Ok(mut header)) = bytes
        .get(8..8 + n)
        .map(serde_json::from_slice::<BTreeMap<String, serde_json::Value>>)
    else {
        return bytes;
    };
    if let Some(meta) = header.get_mut("__metadata__") {
        let Ok(sorted) = serde_json::from_value::<BTreeMap<String, String>>(meta.take()) else {
            return bytes;
        };
        *meta = serde_json::to_value(sorted).expect("strings");
    }
    let mut text = serde_json::to_vec(&header).expect("plain JSON");
    if text.len() <= n {
        text.resize(n, b' ');
        bytes[8..8 + n].copy_from_slice(&text);
    }
    bytes
}

fn bytemuck_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Reads one rank's file back, for `params` in order.
pub(crate) fn read_rank_file(
    dir: &Path,
    rank: usize,
    params: &[ParamInfo],
) -> Result<Vec<ParamShardState>, TrainError> {
    let path = dir.join(rank_file_name(rank));
    let bytes = std::fs::read(&path)
        .map_err(|e| TrainError::checkpoint(&path, format!("cannot read: {e}")))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        TrainError::checkpoint(&path, format!("not a valid safetensors file: {e:?}"))
    })?;
    params
        .iter()
        .map(|param| {
            let key = format!("param.{}", param.path);
            let tensor = file
                .tensor(&key)
                .map_err(|_| TrainError::checkpoint(&path, format!("no tensor `{key}`")))?;
            if tensor.dtype() != Dtype::F32 || tensor.shape().len() != 1 {
                return Err(TrainError::checkpoint(
                    &path,
                    format!(
                        "`{key}` is {:?} {:?}, not a 1-D f32 shard",
                        tensor.dtype(),
                        tensor.shape()
                    ),
                ));
            }
            let shard = tensor
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let optimizer = file
                .tensor(&format!("optim.{}", param.path))
                .ok()
                .map(|t| t.data().to_vec());
            Ok(ParamShardState {
                path: param.path.clone(),
                shape: param.shape.clone(),
                shard,
                optimizer,
            })
        })
        .collect()
}

/// Gathers the full values of every parameter from the files of partition
/// group 0 (ranks `0..p`): the concatenated shards, padding dropped.
pub(crate) fn consolidate(
    dir: &Path,
    index: &CheckpointIndex,
) -> Result<Vec<(ParamInfo, Vec<f32>)>, TrainError> {
    let shards: Vec<Vec<ParamShardState>> = (0..index.partition_size)
        .map(|rank| read_rank_file(dir, rank, &index.params))
        .collect::<Result<_, _>>()?;
    index
        .params
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let numel: usize = info.shape.iter().product();
            let mut full = Vec::with_capacity(numel + index.partition_size);
            for rank in &shards {
                full.extend_from_slice(&rank[i].shard);
            }
            if full.len() < numel {
                return Err(TrainError::checkpoint(
                    dir,
                    format!(
                        "parameter `{}`: shards hold {} values, its shape {:?} needs {numel}",
                        info.path,
                        full.len(),
                        info.shape
                    ),
                ));
            }
            full.truncate(numel);
            Ok((info.clone(), full))
        })
        .collect()
}

/// The tokenizer to copy into checkpoints: the dataset's own copy.
pub(crate) fn dataset_tokenizer(dataset: &Path) -> Option<PathBuf> {
    let path = dataset.join(mics_datasets::TOKENIZER_FILE);
    path.is_file().then_some(path)
}
