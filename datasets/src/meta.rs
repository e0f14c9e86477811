//! [`DatasetMeta`], the `meta.json` of a prepared dataset.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DatasetError;

/// The dataset format this crate writes and reads (`meta.json` `format_version`).
pub const FORMAT_VERSION: u32 = 1;

/// The file name of the metadata inside a dataset directory.
pub const META_FILE: &str = "meta.json";

/// The file name of the tokenizer copy inside a dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The on-disk type of the token ids in `train.bin` and `val.bin`: flat
/// little-endian integers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TokenDType {
    /// 2 bytes per token, for vocabularies of at most 65536 ids.
    U16,
    /// 4 bytes per token.
    U32,
}

impl TokenDType {
    /// The smallest type holding every id of a vocabulary of `vocab_size` ids:
    /// [`TokenDType::U16`] up to 65536 ids, else [`TokenDType::U32`].
    pub fn for_vocab(vocab_size: usize) -> TokenDType {
        if vocab_size <= 1 << 16 {
            TokenDType::U16
        } else {
            TokenDType::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenDType::U16 => 2,
            TokenDType::U32 => 4,
        }
    }
}

impl std::fmt::Display for TokenDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenDType::U16 => "u16",
            TokenDType::U32 => "u32",
        })
    }
}

/// The ids of the special tokens of a dataset's tokenizer, `None` where the
/// tokenizer has no such token.
///
/// Looked up by name: `eot` is `<|endoftext|>`, `cls` `[CLS]`, `sep` `[SEP]`, `mask`
/// `[MASK]`, `pad` `[PAD]`. GPT-2 has only `eot`; the BERT WordPiece tokenizer has
/// the other four.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    /// `<|endoftext|>` (GPT-2: 50256).
    pub eot: Option<u32>,
    /// `[CLS]` (BERT: 101).
    pub cls: Option<u32>,
    /// `[SEP]` (BERT: 102).
    pub sep: Option<u32>,
    /// `[MASK]` (BERT: 103).
    pub mask: Option<u32>,
    /// `[PAD]` (BERT: 0).
    pub pad: Option<u32>,
}

impl SpecialTokens {
    /// The token names looked up, in field order.
    pub const NAMES: [&'static str; 5] = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]"];

    /// Looks every special token up with `token_to_id`.
    pub fn lookup(token_to_id: impl Fn(&str) -> Option<u32>) -> SpecialTokens {
        let [eot, cls, sep, mask, pad] = Self::NAMES.map(token_to_id);
        SpecialTokens {
            eot,
            cls,
            sep,
            mask,
            pad,
        }
    }

    /// The document separator: `eot` if the tokenizer has it, else `sep`.
    pub fn separator(&self) -> Option<u32> {
        self.eot.or(self.sep)
    }

    /// The ids of all special tokens present (duplicates removed, sorted).
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.eot, self.cls, self.sep, self.mask, self.pad]
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether `id` is one of the special tokens.
    pub fn contains(&self, id: u32) -> bool {
        [self.eot, self.cls, self.sep, self.mask, self.pad].contains(&Some(id))
    }
}

/// The `meta.json` of a prepared dataset: what `train.bin` and `val.bin` hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DatasetMeta {
    /// The dataset format ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The tokenizer as given to `prepare`: `gpt2`, `bert` or its path. The
    /// dataset's own copy is `tokenizer.json` next to `meta.json`.
    pub tokenizer: String,
    /// Ids in the vocabulary (added tokens included); every token id is below it.
    pub vocab_size: usize,
    /// The on-disk type of the ids.
    pub dtype: TokenDType,
    /// Tokens in `train.bin`.
    pub train_tokens: u64,
    /// Tokens in `val.bin`.
    pub val_tokens: u64,
    /// Documents (plays, books, files) with at least one token.
    pub documents: usize,
    /// The corpus as given: `shakespeare`, `moby-dick` or its path.
    pub corpus: String,
    /// The special token ids of the tokenizer.
    pub special: SpecialTokens,
}

impl DatasetMeta {
    /// The number of tokens of `split`.
    pub fn tokens(&self, split: crate::Split) -> u64 {
        match split {
            crate::Split::Train => self.train_tokens,
            crate::Split::Val => self.val_tokens,
        }
    }
}

/// Reads and checks `dir/meta.json`.
///
/// Fails with [`DatasetError::MetaMissing`] when the file is absent, with
/// [`DatasetError::MetaInvalid`] when it does not parse or holds a dtype too small
/// for its vocabulary, and with [`DatasetError::FormatVersion`] when it was written
/// in another format.
pub fn open_meta(dir: &Path) -> Result<DatasetMeta, DatasetError> {
    let path = dir.join(META_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.is_dir() {
                DatasetError::MetaMissing {
                    dir: dir.to_path_buf(),
                }
            } else {
                DatasetError::Invalid(format!(
                    "dataset directory {} does not exist (run `mics data prepare`)",
                    dir.display()
                ))
            });
        }
        Err(e) => return Err(DatasetError::io(path, e)),
    };
    // Read the version first, so that a future format reports its version rather
    // than a missing field.
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DatasetError::MetaInvalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(DatasetError::FormatVersion {
                path,
                found: u32::try_from(v).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            });
        }
        None => {
            return Err(DatasetError::MetaInvalid {
                path,
                reason: "no integer `format_version`".into(),
            });
        }
    }
    let meta: DatasetMeta =
        serde_json::from_value(value).map_err(|e| DatasetError::MetaInvalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if meta.vocab_size == 0 {
        return Err(DatasetError::MetaInvalid {
            path,
            reason: "`vocab_size` is 0".into(),
        });
    }
    if TokenDType::for_vocab(meta.vocab_size).bytes() > meta.dtype.bytes() {
        return Err(DatasetError::MetaInvalid {
            path,
            reason: format!(
                "`dtype` {} cannot hold a vocabulary of `vocab_size` {} ids",
                meta.dtype, meta.vocab_size
            ),
        });
    }
    Ok(meta)
}
