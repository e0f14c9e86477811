//! Consolidated safetensors checkpoints with Hugging Face key names.
//!
//! [`Checkpoint`] reads a file and hands out float tensors by key, checking shape
//! and dtype and converting F16/BF16 to the model's float type; it remembers
//! which keys were read so that leftovers can be reported. [`CheckpointWriter`]
//! collects tensors and writes them atomically.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use half::{bf16, f16};
use safetensors::tensor::{Metadata, SafeTensors, TensorView};

/// The element types of safetensors files (re-exported from the `safetensors` crate).
pub use safetensors::tensor::Dtype;

use crate::HubError;

/// The largest safetensors header accepted (the limit of the `safetensors` crate).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The float dtypes a checkpoint may store parameters in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatDType {
    fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatDType::F32),
            Dtype::F16 => Some(FloatDType::F16),
            Dtype::BF16 => Some(FloatDType::BF16),
            _ => None,
        }
    }

    fn to_safetensors(self) -> Dtype {
        match self {
            FloatDType::F32 => Dtype::F32,
            FloatDType::F16 => Dtype::F16,
            FloatDType::BF16 => Dtype::BF16,
        }
    }

    /// Decodes little-endian bytes of this dtype into `f32` values (exactly).
    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            FloatDType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            FloatDType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            FloatDType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Encodes `f32` values as little-endian bytes of this dtype (rounding to nearest).
    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            FloatDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            FloatDType::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

impl fmt::Display for FloatDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FloatDType::F32 => "F32",
            FloatDType::F16 => "F16",
            FloatDType::BF16 => "BF16",
        };
        f.write_str(name)
    }
}

/// A safetensors file held in memory, its header parsed and validated.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    metadata: Metadata,
    used: RefCell<BTreeSet<String>>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.metadata.tensors().len())
            .finish()
    }
}

impl Checkpoint {
    /// Reads and validates the safetensors file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, HubError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| HubError::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Validates `bytes` as a safetensors file; `path` is only used in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, HubError> {
        let path = path.into();
        let corrupt = |reason: String| HubError::Corrupt {
            path: path.clone(),
            reason,
        };
        let Some(len_bytes) = bytes.get(..8) else {
            return Err(corrupt(format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            )));
        };
        let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES {
            return Err(HubError::HeaderTooLarge {
                path,
                size: header_len,
                limit: MAX_HEADER_BYTES,
            });
        }
        if header_len > bytes.len() as u64 - 8 {
            return Err(corrupt(format!(
                "header length {header_len} runs past the end of the {}-byte file",
                bytes.len()
            )));
        }
        let (n, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            let reason = match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    "the tensor data does not end where the file ends (truncated?)".to_string()
                }
                other => format!("{other:?}"),
            };
            corrupt(reason)
        })?;
        Ok(Checkpoint {
            path,
            bytes,
            data_start: 8 + n,
            metadata,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds a tensor named `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.metadata.info(key).is_some()
    }

    /// Every key in the file, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.metadata.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    /// The shape of tensor `key`, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.metadata.info(key).map(|i| i.shape.clone())
    }

    /// The float dtype of tensor `key`, if present and a float.
    pub fn dtype(&self, key: &str) -> Option<FloatDType> {
        self.metadata
            .info(key)
            .and_then(|i| FloatDType::from_safetensors(i.dtype))
    }

    /// The dtype most of the file's float parameters use (F32 for an empty file).
    pub fn float_dtype(&self) -> FloatDType {
        let mut counts: HashMap<&'static str, (usize, FloatDType)> = HashMap::new();
        for info in self.metadata.tensors().values() {
            if let Some(d) = FloatDType::from_safetensors(info.dtype) {
                let name = match d {
                    FloatDType::F32 => "f32",
                    FloatDType::F16 => "f16",
                    FloatDType::BF16 => "bf16",
                };
                counts.entry(name).or_insert((0, d)).0 += 1;
            }
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| d)
            .unwrap_or(FloatDType::F32)
    }

    /// Reads float tensor `key` as `f32` values, checking it has shape `expected`.
    pub fn read_f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>, HubError> {
        let info = self
            .metadata
            .info(key)
            .ok_or_else(|| HubError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
            })?;
        let Some(dtype) = FloatDType::from_safetensors(info.dtype) else {
            return Err(HubError::DType {
                path: self.path.clone(),
                key: key.to_string(),
                expected: "F32, F16 or BF16".into(),
                found: format!("{:?}", info.dtype),
            });
        };
        if info.shape != expected {
            return Err(HubError::Shape {
                path: self.path.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        // `read_metadata` validated that the offsets tile the data section exactly.
        let bytes = &self.bytes[self.data_start + start..self.data_start + end];
        self.used.borrow_mut().insert(key.to_string());
        Ok(dtype.decode(bytes))
    }

    /// Reads float tensor `key` of shape `shape` onto `device`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, HubError> {
        let values = self.read_f32(key, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// The keys no `read_f32`/`tensor` call has read yet, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.keys()
            .into_iter()
            .filter(|k| !used.contains(k))
            .collect()
    }
}

/// Collects named float tensors and writes them as one safetensors file.
#[derive(Debug)]
pub struct CheckpointWriter {
    dtype: FloatDType,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

impl CheckpointWriter {
    /// A writer storing every tensor as `dtype`.
    pub fn new(dtype: FloatDType) -> Self {
        CheckpointWriter {
            dtype,
            tensors: BTreeMap::new(),
        }
    }

    /// Adds `values` of `shape` under `key` (replacing an earlier tensor of that name).
    pub fn add_f32(&mut self, key: impl Into<String>, shape: &[usize], values: &[f32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        self.tensors.insert(
            key.into(),
            (
                self.dtype.to_safetensors(),
                shape.to_vec(),
                self.dtype.encode(values),
            ),
        );
    }

    /// Adds `tensor` under `key`.
    pub fn add<B: Backend, const D: usize>(
        &mut self,
        key: impl Into<String>,
        tensor: Tensor<B, D>,
    ) {
        let shape = tensor.dims();
        let data = tensor.into_data().convert::<f32>();
        let values: Vec<f32> = data.to_vec().expect("converted to f32");
        self.add_f32(key, &shape, &values);
    }

    /// Adds raw little-endian bytes of any safetensors dtype (buffers such as
    /// `position_ids`, or deliberately odd tensors in tests).
    pub fn add_raw(
        &mut self,
        key: impl Into<String>,
        dtype: Dtype,
        shape: &[usize],
        bytes: Vec<u8>,
    ) {
        self.tensors
            .insert(key.into(), (dtype, shape.to_vec(), bytes));
    }

    /// The keys added so far, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Removes tensor `key`, returning whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        self.tensors.remove(key).is_some()
    }

    /// Serialises the tensors (with `{"format": "pt"}` metadata, as `transformers` writes).
    pub fn to_bytes(&self) -> Result<Vec<u8>, HubError> {
        let mut views = Vec::with_capacity(self.tensors.len());
        for (key, (dtype, shape, bytes)) in &self.tensors {
            let view =
                TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| HubError::Corrupt {
                    path: PathBuf::from("<serialize>"),
                    reason: format!("tensor `{key}`: {e:?}"),
                })?;
            views.push((key.clone(), view));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(metadata)).map_err(|e| HubError::Corrupt {
            path: PathBuf::from("<serialize>"),
            reason: format!("{e:?}"),
        })
    }

    /// Writes the file atomically (a temporary file renamed into place).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), HubError> {
        let bytes = self.to_bytes()?;
        write_atomic(path.as_ref(), &bytes)
    }
}

/// The weights file of a Hugging Face model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes a Hugging Face model directory as `save_pretrained` does: creates
/// `dir` if needed, writes [`WEIGHTS_FILE`] with the tensors `add` puts into a
/// writer of `dtype`, then `config.json` from `config`.
pub fn save_pretrained<C: serde::Serialize>(
    dir: &Path,
    dtype: FloatDType,
    add: impl FnOnce(&mut CheckpointWriter),
    config: &C,
) -> Result<(), HubError> {
    std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    let mut writer = CheckpointWriter::new(dtype);
    add(&mut writer);
    writer.write(dir.join(WEIGHTS_FILE))?;
    crate::config::write_config(dir, config)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    use std::io::Write;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HubError::io(path, e)
    })
}
