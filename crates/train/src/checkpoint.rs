//! Sharded checkpoints: one safetensors file per rank (parameter shards and
//! optimizer states) plus `index.json`, written atomically.
//!
//! Every rank writes its file into `checkpoints/.step-NNNNNN.partial/`; once
//! all ranks report success, rank 0 writes `index.json` there, renames the
//! directory to `step-NNNNNN` and points `checkpoints/latest` at it. A run
//! killed at any moment leaves the previous checkpoint complete and `latest`
//! pointing at it. (Ranks on several machines need a shared file system.)
//! Committing also removes stale `.partial` directories of runs killed while
//! writing, and, with `train.checkpoint_keep = K`, all but the newest K
//! checkpoints.
//!
//! # Integrity (format 2)
//!
//! `index.json` records the length and xxh3-64 checksum of every file of
//! the checkpoint and the checksum of every tensor of every rank file; each
//! rank file records, in its safetensors metadata, the step, topology,
//! global batch, seed and tokens seen that `index.json` states. Loading
//! (resume, export) verifies the checksums of every file it reads (a
//! mismatch names the file and the first tensor that differs),
//! cross-checks the index against the rank files, and refuses non-finite
//! parameters or optimizer moments, naming the tensor. Format 1 checkpoints
//! (before checksums) still load: their rank files are cross-checked as far
//! as they record, and their values checked for non-finite numbers.
//!
//! # Re-sharding
//!
//! A checkpoint written at (N, p, k) resumes at any valid (N', p', k'):
//! partition group 0's files (ranks `0..p`) hold one full replica, so rank
//! r' of the new run reads the old shards that overlap its new shard
//! `r' mod p'`, for the parameters and the optimizer's moments alike
//! (decoded from Burn's records, [`crate::optim_state`]), and re-encodes
//! them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use mics_backend::ParamShardState;
use mics_comm::Sharding;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::family::ModelSpec;
use crate::integrity::{FileChecksums, first_non_finite, verify_file};
use crate::optim_state::ShardState;
use crate::{TrainConfig, TrainError};

/// `index.json`'s format version: 2 records checksums.
pub const CHECKPOINT_FORMAT: u32 = 2;
/// The oldest format this mics reads (1: no checksums).
pub const OLDEST_FORMAT: u32 = 1;
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
    /// Length and checksums of every file (format 2): the rank files with
    /// each of their tensors, and `tokenizer.json`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, FileChecksums>,
}

/// What every rank file states about the checkpoint, in its metadata, so
/// that `index.json` can be cross-checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RankMeta {
    pub step: u64,
    pub world: usize,
    pub partition_size: usize,
    pub ranks_per_node: usize,
    pub global_batch: usize,
    pub seed: u64,
    pub tokens_seen: u64,
}

impl RankMeta {
    /// The fields of `index`.
    pub(crate) fn of(index: &CheckpointIndex) -> RankMeta {
        RankMeta {
            step: index.step,
            world: index.world,
            partition_size: index.partition_size,
            ranks_per_node: index.ranks_per_node,
            global_batch: index.global_batch,
            seed: index.seed,
            tokens_seen: index.tokens_seen,
        }
    }

    fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("step", self.step),
            ("world", self.world as u64),
            ("partition_size", self.partition_size as u64),
            ("ranks_per_node", self.ranks_per_node as u64),
            ("global_batch", self.global_batch as u64),
            ("seed", self.seed),
            ("tokens_seen", self.tokens_seen),
        ]
    }
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

/// A checkpoint continues the run that wrote it: the same model and seed,
/// and the same global batch unless `allow_global_batch_change` (any
/// topology, device and precision: shards are f32 and are re-sharded).
pub(crate) fn check_resume(
    config: &TrainConfig,
    spec: &ModelSpec,
    dir: &Path,
    index: &CheckpointIndex,
) -> Result<(), TrainError> {
    if index.global_batch != config.global_batch() && !config.train.allow_global_batch_change {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with a global batch of {} sequences, this run has {} (world {} × \
                 micro_batch {} × grad_accum {}): the losses would not continue; choose \
                 train.micro_batch and train.grad_accum so that the product is {}, or pass \
                 --allow-global-batch-change",
                index.global_batch,
                config.global_batch(),
                config.parallel.world,
                config.train.micro_batch,
                config.train.grad_accum,
                index.global_batch,
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
    if index.config.train.optimizer != config.train.optimizer {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "saved with optimizer {:?}, this run has {:?}",
                index.config.train.optimizer, config.train.optimizer
            ),
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
    if !(OLDEST_FORMAT..=CHECKPOINT_FORMAT).contains(&index.format_version) {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "format version {} (this mics reads {OLDEST_FORMAT} to {CHECKPOINT_FORMAT})",
                index.format_version
            ),
        ));
    }
    if index.format_version >= 2 {
        for file in &index.files {
            if !index.checksums.contains_key(file) {
                return Err(TrainError::checkpoint(
                    &path,
                    format!("records no checksum for {file}"),
                ));
            }
        }
    }
    if index.partition_size == 0 || !index.world.is_multiple_of(index.partition_size) {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "partition size {} does not divide its world of {}",
                index.partition_size, index.world
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
    /// Checkpoints kept (`train.checkpoint_keep`; 0 keeps all).
    pub keep: usize,
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

    /// Rank 0, when writing the checkpoint of `step` failed anywhere: the
    /// partial directory goes, so a full disk is not left fuller.
    pub(crate) fn abandon(&self, step: u64) {
        let _ = std::fs::remove_dir_all(self.partial(step));
    }

    /// Rank 0, after every rank wrote its file: the tokenizer, the index,
    /// the rename, the `latest` pointer; then stale partial directories and
    /// checkpoints beyond `keep` go.
    pub(crate) fn commit(
        &self,
        index: &mut CheckpointIndex,
        tokenizer: Option<&Path>,
    ) -> Result<PathBuf, TrainError> {
        let partial = self.partial(index.step);
        if let Some(tokenizer) = tokenizer {
            let target = partial.join(TOKENIZER_FILE);
            let bytes = std::fs::read(tokenizer).map_err(|e| TrainError::io(tokenizer, e))?;
            write_file(&target, &bytes)?;
            index
                .checksums
                .insert(TOKENIZER_FILE.into(), FileChecksums::of_file(&bytes));
        }
        let text = serde_json::to_string_pretty(&*index).expect("plain struct");
        let index_path = partial.join(INDEX_FILE);
        mics_hub::checkpoint::write_atomic(&index_path, text.as_bytes())
            .map_err(TrainError::hub_io)?;
        crate::fault::before_commit(index.step);
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
        .map_err(TrainError::hub_io)?;
        self.tidy(index.step);
        Ok(complete)
    }

    /// Removes what runs killed mid-write left (`.step-N.partial`,
    /// `.step-N.old`) and, with `keep > 0`, the checkpoints older than the
    /// newest `keep`. Failures are ignored: the checkpoint is committed.
    fn tidy(&self, committed: u64) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut complete: Vec<(u64, PathBuf)> = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".step-") && (name.ends_with(".partial") || name.ends_with(".old"))
            {
                let _ = std::fs::remove_dir_all(&path);
            } else if let Some(step) = name
                .strip_prefix("step-")
                .and_then(|n| n.parse::<u64>().ok())
                && path.join(INDEX_FILE).is_file()
            {
                complete.push((step, path));
            }
        }
        if self.keep == 0 {
            return;
        }
        complete.sort();
        let excess = complete.len().saturating_sub(self.keep);
        for (step, path) in complete.into_iter().take(excess) {
            if step != committed {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Writes `bytes` to `path` (through a temporary file renamed into place);
/// an error names `path` once.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::fault::before_write(path)?;
    mics_hub::checkpoint::write_atomic(path, bytes).map_err(TrainError::hub_io)
}

/// Writes one rank's states as `dir/rank-NNNNN.safetensors`: `param.<path>`
/// (f32 shard) and `optim.<path>` (the optimizer state bytes, u8), with the
/// full shapes and `meta` in the metadata. Returns the file's checksums.
pub(crate) fn write_rank_file(
    dir: &Path,
    rank: usize,
    states: &[ParamShardState],
    meta: &RankMeta,
) -> Result<FileChecksums, TrainError> {
    let path = dir.join(rank_file_name(rank));
    let shard_bytes: Vec<Vec<u8>> = states.iter().map(|s| bytemuck_f32(&s.shard)).collect();
    let mut views = Vec::new();
    let mut metadata = HashMap::from([
        ("format".to_string(), "mics-shard".to_string()),
        ("rank".to_string(), rank.to_string()),
    ]);
    for (key, value) in meta.fields() {
        metadata.insert(key.to_string(), value.to_string());
    }
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
    let sums = FileChecksums::of_safetensors(&bytes).map_err(|e| TrainError::io(&path, e))?;
    write_file(&path, &bytes)?;
    Ok(sums)
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

/// One rank file, read, verified and decoded.
pub(crate) struct RankFile {
    pub path: PathBuf,
    /// Per parameter of the index, in order: the shard and the optimizer
    /// state's record bytes.
    pub params: Vec<(Vec<f32>, Option<Vec<u8>>)>,
}

/// Reads the file of `rank` of the checkpoint in `dir`: its checksums
/// verified against `index.json`, its metadata cross-checked against the
/// index (step, topology, shapes, shard lengths), its values checked to be
/// finite (parameters and optimizer moments).
pub(crate) fn load_rank_file(
    dir: &Path,
    index: &CheckpointIndex,
    rank: usize,
) -> Result<RankFile, TrainError> {
    let name = rank_file_name(rank);
    let path = dir.join(&name);
    let bytes = std::fs::read(&path)
        .map_err(|e| TrainError::checkpoint(&path, format!("cannot read: {e}")))?;
    if let Some(expected) = index.checksums.get(&name) {
        verify_file(&path, &bytes, expected)?;
    }
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        TrainError::checkpoint(&path, format!("not a valid safetensors file: {e:?}"))
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        TrainError::checkpoint(&path, format!("not a valid safetensors file: {e:?}"))
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    cross_check(dir, index, rank, &name, &meta)?;
    let kind = index.config.train.optimizer;
    let params = index
        .params
        .iter()
        .map(|param| {
            let key = format!("param.{}", param.path);
            let tensor = file
                .tensor(&key)
                .map_err(|_| TrainError::checkpoint(&path, format!("no tensor `{key}`")))?;
            let numel: usize = param.shape.iter().product();
            let len = Sharding::new(numel, index.partition_size).shard_len();
            if tensor.dtype() != Dtype::F32 || tensor.shape() != [len] {
                return Err(TrainError::checkpoint(
                    &path,
                    format!(
                        "`{key}` is {:?} {:?}, not the 1-D f32 shard of {len} values that shape \
                         {:?} over partition size {} has",
                        tensor.dtype(),
                        tensor.shape(),
                        param.shape,
                        index.partition_size
                    ),
                ));
            }
            if let Some(saved) = meta.get(&format!("shape.{}", param.path))
                && saved != &serde_json::to_string(&param.shape).expect("plain vec")
            {
                return Err(TrainError::checkpoint(
                    dir.join(INDEX_FILE),
                    format!(
                        "gives `{}` the shape {:?}, but {name} was written with {saved}",
                        param.path, param.shape
                    ),
                ));
            }
            let shard: Vec<f32> = tensor
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some((i, value)) = first_non_finite(&shard) {
                return Err(TrainError::NonFinite {
                    path: path.clone(),
                    tensor: key,
                    index: i,
                    value,
                });
            }
            let optim_key = format!("optim.{}", param.path);
            let optimizer = file.tensor(&optim_key).ok().map(|t| t.data().to_vec());
            if let Some(bytes) = &optimizer {
                let state = ShardState::decode(kind, bytes)
                    .map_err(|e| TrainError::checkpoint(&path, format!("`{optim_key}`: {e}")))?;
                for (moment, values) in state.vectors() {
                    if values.len() != len {
                        return Err(TrainError::checkpoint(
                            &path,
                            format!(
                                "`{optim_key}`: {moment} holds {} values, the shard {len}",
                                values.len()
                            ),
                        ));
                    }
                    if let Some((i, value)) = first_non_finite(values) {
                        return Err(TrainError::NonFinite {
                            path: path.clone(),
                            tensor: format!("{optim_key} ({moment})"),
                            index: i,
                            value,
                        });
                    }
                }
            }
            Ok((shard, optimizer))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expected: std::collections::BTreeSet<String> = index
        .params
        .iter()
        .map(|p| format!("param.{}", p.path))
        .collect();
    if let Some(extra) = file
        .names()
        .into_iter()
        .filter(|n| n.starts_with("param."))
        .find(|n| !expected.contains(*n))
    {
        return Err(TrainError::checkpoint(
            dir.join(INDEX_FILE),
            format!("does not list `{extra}`, which {name} holds"),
        ));
    }
    Ok(RankFile { path, params })
}

/// `index.json` against what rank file `name` says of itself.
fn cross_check(
    dir: &Path,
    index: &CheckpointIndex,
    rank: usize,
    name: &str,
    meta: &HashMap<String, String>,
) -> Result<(), TrainError> {
    let index_path = dir.join(INDEX_FILE);
    if let Some(saved) = meta.get("rank")
        && saved != &rank.to_string()
    {
        return Err(TrainError::checkpoint(
            dir.join(name),
            format!("was written by rank {saved}, not rank {rank}: rank files were swapped"),
        ));
    }
    for (key, value) in RankMeta::of(index).fields() {
        let saved = match meta.get(key) {
            Some(saved) => saved,
            // Format 1 rank files record no more than the rank and shapes.
            None if index.format_version < 2 => continue,
            None => {
                return Err(TrainError::checkpoint(
                    dir.join(name),
                    format!("records no `{key}` in its metadata"),
                ));
            }
        };
        if saved != &value.to_string() {
            return Err(TrainError::checkpoint(
                &index_path,
                format!(
                    "says {key} = {value}, but {name} was written with {key} = {saved}: the \
                     index was edited or belongs to another checkpoint"
                ),
            ));
        }
    }
    Ok(())
}

/// The states rank `rank` of a run of `world` ranks and partition size
/// `partition_size` starts from: its own file when the topology is the
/// checkpoint's, else its new shard of every parameter and moment cut from
/// the shards of partition group 0 that overlap it.
pub(crate) fn resume_states(
    dir: &Path,
    index: &CheckpointIndex,
    rank: usize,
    world: usize,
    partition_size: usize,
) -> Result<Vec<ParamShardState>, TrainError> {
    let state = |info: &ParamInfo, shard, optimizer| ParamShardState {
        path: info.path.clone(),
        shape: info.shape.clone(),
        shard,
        optimizer,
    };
    if world == index.world && partition_size == index.partition_size {
        let file = load_rank_file(dir, index, rank)?;
        return Ok(index
            .params
            .iter()
            .zip(file.params)
            .map(|(info, (shard, optimizer))| state(info, shard, optimizer))
            .collect());
    }
    let old_p = index.partition_size;
    let part = rank % partition_size;
    // The old ranks whose shards overlap this rank's new ones.
    let mut needed = std::collections::BTreeSet::new();
    for info in &index.params {
        let numel: usize = info.shape.iter().product();
        let (old, new) = (
            Sharding::new(numel, old_p),
            Sharding::new(numel, partition_size),
        );
        let range = new.range(part);
        for k in 0..old_p {
            let r = old.range(k);
            if r.start < range.end && range.start < r.end {
                needed.insert(k);
            }
        }
    }
    let files: HashMap<usize, RankFile> = needed
        .into_iter()
        .map(|k| load_rank_file(dir, index, k).map(|f| (k, f)))
        .collect::<Result<_, _>>()?;
    let kind = index.config.train.optimizer;
    index
        .params
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let numel: usize = info.shape.iter().product();
            let (old, new) = (
                Sharding::new(numel, old_p),
                Sharding::new(numel, partition_size),
            );
            let range = new.range(part);
            let len = new.shard_len();
            // The old shards overlapping `range`, as (old rank, its range).
            let pieces: Vec<(usize, std::ops::Range<usize>)> = (0..old_p)
                .map(|k| (k, old.range(k)))
                .filter(|(_, r)| r.start < range.end && range.start < r.end)
                .collect();
            let cut = |r: &std::ops::Range<usize>, values: &[f32]| -> Vec<f32> {
                let from = range.start.max(r.start) - r.start;
                let to = range.end.min(r.end) - r.start;
                values[from..to].to_vec()
            };
            let mut shard = Vec::with_capacity(len);
            let mut states = Vec::new();
            for (k, r) in &pieces {
                let (values, optimizer) = &files[k].params[i];
                shard.extend(cut(r, values));
                match optimizer {
                    Some(bytes) => {
                        let decoded = ShardState::decode(kind, bytes).map_err(|e| {
                            TrainError::checkpoint(
                                &files[k].path,
                                format!("`optim.{}`: {e}", info.path),
                            )
                        })?;
                        states.push(Some(decoded.map(|v| cut(r, v))));
                    }
                    None => states.push(None),
                }
            }
            shard.resize(len, 0.0);
            let optimizer = if states.iter().all(Option::is_none) {
                // No state yet (a parameter never stepped), or a shard of
                // padding only: the optimizer starts it afresh, as it would.
                None
            } else {
                let parts: Vec<ShardState> = states.into_iter().flatten().collect();
                let joined = ShardState::concat(&parts).map_err(|e| {
                    TrainError::checkpoint(dir, format!("`optim.{}`: {e}", info.path))
                })?;
                let padded = joined.map(|v| {
                    let mut v = v.to_vec();
                    v.resize(len, 0.0);
                    v
                });
                Some(
                    padded
                        .encode()
                        .map_err(|e| TrainError::checkpoint(dir, e))?,
                )
            };
            Ok(state(info, shard, optimizer))
        })
        .collect()
}

/// Gathers the full values of every parameter from the files of partition
/// group 0 (ranks `0..p`), verified: the concatenated shards, padding
/// dropped.
pub(crate) fn consolidate(
    dir: &Path,
    index: &CheckpointIndex,
) -> Result<Vec<(ParamInfo, Vec<f32>)>, TrainError> {
    let shards: Vec<RankFile> = (0..index.partition_size)
        .map(|rank| load_rank_file(dir, index, rank))
        .collect::<Result<_, _>>()?;
    index
        .params
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let numel: usize = info.shape.iter().product();
            let mut full = Vec::with_capacity(numel + index.partition_size);
            for rank in &shards {
                full.extend_from_slice(&rank.params[i].0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OptimizerKind;

    /// A checkpoint of synthetic AdamW states over `world` ranks of
    /// partition size `p`, for parameters of `sizes` elements, whose full
    /// values and moments are known.
    fn synthetic(dir: &Path, world: usize, p: usize, sizes: &[usize]) -> CheckpointIndex {
        let full = |param: usize, which: f32| -> Vec<f32> {
            (0..sizes[param])
                .map(|i| which * 1000.0 + param as f32 * 100.0 + i as f32)
                .collect()
        };
        let config = crate::TrainConfig::parse(
            "[model]\ntype = \"gpt2\"\n[data]\ncorpus = \"c\"\ntokenizer = \"t\"\nseq_len = 4\n\
             [train]\nsteps = 8\nmicro_batch = 1\nlr = 0.1\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let params: Vec<ParamInfo> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ParamInfo {
                path: format!("p{i}"),
                shape: vec![n],
            })
            .collect();
        let meta = RankMeta {
            step: 3,
            world,
            partition_size: p,
            ranks_per_node: world,
            global_batch: world,
            seed: 1,
            tokens_seen: 12,
        };
        let mut checksums = BTreeMap::new();
        for rank in 0..world {
            let part = rank % p;
            let states: Vec<ParamShardState> = params
                .iter()
                .enumerate()
                .map(|(i, info)| {
                    let sharding = Sharding::new(sizes[i], p);
                    let state = ShardState::AdamW {
                        time: 3,
                        moment_1: sharding.shard_of(&full(i, 1.0), part),
                        moment_2: sharding.shard_of(&full(i, 2.0), part),
                        max_moment_2: None,
                    };
                    ParamShardState {
                        path: info.path.clone(),
                        shape: info.shape.clone(),
                        shard: sharding.shard_of(&full(i, 0.0), part),
                        optimizer: Some(state.encode().unwrap()),
                    }
                })
                .collect();
            let sums = write_rank_file(dir, rank, &states, &meta).unwrap();
            checksums.insert(rank_file_name(rank), sums);
        }
        CheckpointIndex {
            format_version: CHECKPOINT_FORMAT,
            step: 3,
            world,
            partition_size: p,
            ranks_per_node: world,
            global_batch: world,
            seed: 1,
            tokens_seen: 12,
            model: ModelSpec {
                kind: crate::ModelType::Gpt2,
                config: serde_json::json!({}),
            },
            dataset: PathBuf::new(),
            params,
            files: (0..world).map(rank_file_name).collect(),
            loss_scale: None,
            config,
            checksums,
        }
    }

    /// Re-sharding cuts exactly the old shards: every new rank's shards,
    /// concatenated over a new partition group, are the full values and
    /// moments, padding zero, for sizes that divide and do not divide.
    #[test]
    fn re_sharded_states_are_the_full_values_cut_anew() {
        let dir = std::env::temp_dir().join(format!("mics-reshard-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sizes = [10, 1, 7, 16];
        let index = synthetic(&dir, 4, 2, &sizes);
        for (world, p) in [(2, 1), (8, 4), (4, 4), (3, 3), (6, 2)] {
            let ranks: Vec<Vec<ParamShardState>> = (0..world)
                .map(|r| resume_states(&dir, &index, r, world, p).unwrap())
                .collect();
            for (i, &n) in sizes.iter().enumerate() {
                let len = n.div_ceil(p);
                let mut values = Vec::new();
                let mut m1 = Vec::new();
                let mut m2 = Vec::new();
                for rank in &ranks[..p] {
                    let s = &rank[i];
                    assert_eq!(s.shard.len(), len, "N={world} p={p} p{i}");
                    values.extend_from_slice(&s.shard);
                    match s
                        .optimizer
                        .as_ref()
                        .map(|b| ShardState::decode(OptimizerKind::Adamw, b).unwrap())
                    {
                        Some(ShardState::AdamW {
                            time,
                            moment_1,
                            moment_2,
                            ..
                        }) => {
                            assert_eq!(time, 3);
                            m1.extend(moment_1);
                            m2.extend(moment_2);
                        }
                        // An all-padding shard starts its state afresh.
                        None => {
                            assert!(s.shard.iter().all(|&v| v == 0.0));
                            m1.extend(vec![0.0; len]);
                            m2.extend(vec![0.0; len]);
                        }
                        Some(other) => panic!("{other:?}"),
                    }
                }
                let expect = |which: f32| -> Vec<f32> {
                    let mut v: Vec<f32> = (0..n)
                        .map(|k| which * 1000.0 + i as f32 * 100.0 + k as f32)
                        .collect();
                    v.resize(len * p, 0.0);
                    v
                };
                assert_eq!(values, expect(0.0), "N={world} p={p} p{i} values");
                assert_eq!(m1, expect(1.0), "N={world} p={p} p{i} moment 1");
                assert_eq!(m2, expect(2.0), "N={world} p={p} p{i} moment 2");
                // Every replica holds the same shards.
                for rank in p..world {
                    assert_eq!(ranks[rank][i], ranks[rank % p][i]);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A NaN in an optimizer moment is refused at load, naming the tensor
    /// and the moment (checksums recorded as written: it is not corruption).
    #[test]
    fn a_non_finite_moment_is_named_at_load() {
        let dir = std::env::temp_dir().join(format!("mics-nan-moment-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut index = synthetic(&dir, 2, 2, &[6, 4]);
        let mut states = resume_states(&dir, &index, 0, 2, 2).unwrap();
        let moment = ShardState::AdamW {
            time: 3,
            moment_1: vec![0.0; 2],
            moment_2: vec![1.0, f32::INFINITY],
            max_moment_2: None,
        };
        states[1].optimizer = Some(moment.encode().unwrap());
        let sums = write_rank_file(&dir, 0, &states, &RankMeta::of(&index)).unwrap();
        index.checksums.insert(rank_file_name(0), sums);
        match load_rank_file(&dir, &index, 0).err() {
            Some(TrainError::NonFinite {
                tensor,
                index,
                value,
                ..
            }) => {
                assert_eq!(tensor, "optim.p1 (moment_2)");
                assert_eq!((index, value), (1, f32::INFINITY));
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
