//! [`DatasetError`]: everything that can go wrong, each message naming the file,
//! key or value at fault.

use std::path::PathBuf;

use mics_hub::HubError;

/// Everything that can go wrong while preparing, opening or sampling a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The corpus path given does not exist.
    #[error("corpus path {path} does not exist")]
    CorpusMissing {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The corpus holds no document, or no text in any of them.
    #[error("corpus {corpus} is empty: {reason}")]
    EmptyCorpus {
        /// The corpus, as given (`shakespeare`, `moby-dick` or a path).
        corpus: String,
        /// What was found.
        reason: String,
    },
    /// A corpus file is not UTF-8 text.
    #[error("corpus file {path} is not valid UTF-8 (byte {offset})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The offset of the first invalid byte.
        offset: usize,
    },
    /// The tokenizer path given does not exist.
    #[error("tokenizer path {path} does not exist")]
    TokenizerMissing {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The tokenizer has no end-of-text or `[SEP]` token to separate documents.
    #[error("tokenizer {tokenizer} has neither <|endoftext|> nor [SEP] to separate documents")]
    NoSeparator {
        /// The tokenizer, as given.
        tokenizer: String,
    },
    /// Loading a tokenizer or an asset, or tokenizing, failed (the message names
    /// the file).
    #[error(transparent)]
    Hub(#[from] HubError),
    /// An operating-system error on a file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The dataset directory has no `meta.json`.
    #[error("dataset {dir}: meta.json missing (run `mics data prepare`)")]
    MetaMissing {
        /// The dataset directory.
        dir: PathBuf,
    },
    /// `meta.json` cannot be parsed or holds inconsistent values.
    #[error("{path}: invalid dataset metadata: {reason}")]
    MetaInvalid {
        /// The `meta.json` file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The dataset was written in a format version this crate does not read.
    #[error(
        "{path}: dataset format version {found}, this build reads version {supported} (re-run `mics data prepare`)"
    )]
    FormatVersion {
        /// The `meta.json` file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this crate reads and writes.
        supported: u32,
    },
    /// A token file's size is not a whole number of tokens.
    #[error("{} has {bytes} bytes, not a multiple of {token_bytes}", path.display())]
    BadLength {
        /// The token file.
        path: PathBuf,
        /// Its size in bytes.
        bytes: u64,
        /// The bytes per token of the dataset's dtype.
        token_bytes: usize,
    },
    /// A token file holds another number of tokens than `meta.json` says.
    #[error("{} holds {found} tokens but meta.json says {expected} (re-run `mics data prepare`)", path.display())]
    TokenCount {
        /// The token file.
        path: PathBuf,
        /// The number of tokens in the file.
        found: u64,
        /// The number in `meta.json`.
        expected: u64,
    },
    /// A token id is outside the vocabulary.
    #[error("vocabulary {vocab_size} ids but token {token} in {} at position {position}", path.display())]
    TokenOutOfRange {
        /// The token file (or the tokenizer, while preparing).
        path: PathBuf,
        /// The vocabulary size.
        vocab_size: usize,
        /// The offending id.
        token: u32,
        /// Its position in the file.
        position: u64,
    },
    /// A special token a batch builder needs is not in the dataset's tokenizer.
    #[error(
        "{purpose} needs the {token} token but the dataset's tokenizer has none (meta.json special.{key} is null)"
    )]
    MissingSpecial {
        /// What needs it (e.g. "masked LM").
        purpose: &'static str,
        /// The token (`[MASK]`).
        token: &'static str,
        /// The key in [`crate::SpecialTokens`] (`mask`).
        key: &'static str,
    },
    /// The corpus is too small for one window of the requested size.
    #[error(
        "{num_tokens} tokens make no window of {window} tokens (corpus too small, or window too large)"
    )]
    TooSmall {
        /// Tokens in the split.
        num_tokens: usize,
        /// The window size asked for.
        window: usize,
    },
    /// An argument is out of its range; the message names it and its value.
    #[error("{0}")]
    Invalid(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            error,
        }
    }
}
