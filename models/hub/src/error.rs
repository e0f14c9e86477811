use std::path::PathBuf;

/// Everything that can go wrong while reading or writing Hugging Face files.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A cached asset directory or file is absent.
    #[error(
        "missing asset {path}: run scripts/fetch-assets (it fills $MICS_CACHE, default ~/.cache/mics)"
    )]
    MissingAsset {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// An operating-system error while reading or writing a file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The safetensors header declares a size above the accepted limit.
    #[error("{path}: safetensors header of {size} bytes is larger than the limit of {limit} bytes")]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The declared header size.
        size: u64,
        /// The largest header accepted.
        limit: u64,
    },
    /// The file is truncated or its header cannot be parsed.
    #[error("{path}: corrupt or truncated safetensors file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("{path}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key looked for.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A tensor has a shape other than the model's.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype that cannot be read as a float parameter.
    #[error("{path}: tensor `{key}` has dtype {found}, expected {expected}")]
    DType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The accepted dtypes.
        expected: String,
        /// The dtype in the file.
        found: String,
    },
    /// A tensor is well formed but its values contradict the model (e.g. an untied
    /// `lm_head.weight`).
    #[error("{path}: tensor `{key}`: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A `config.json` that cannot be read as the model's configuration.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tokenizer file that cannot be loaded, or text that cannot be encoded.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file (or directory) of the tokenizer.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            error,
        }
    }
}
