//! [`TokenFile`]: the memory-mapped token ids of one split.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DatasetError, DatasetMeta, TokenDType, open_meta};

/// One split of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train.bin`.
    Train,
    /// `val.bin`.
    Val,
}

impl Split {
    /// The file name of the split inside a dataset directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.bin",
            Split::Val => "val.bin",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// The token ids of one split of a prepared dataset, memory-mapped (read-only).
pub struct TokenFile {
    path: PathBuf,
    meta: DatasetMeta,
    /// `None` for an empty file (which cannot be mapped).
    map: Option<Mmap>,
    len: usize,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("dtype", &self.meta.dtype)
            .finish()
    }
}

impl TokenFile {
    /// Maps `dir/train.bin` or `dir/val.bin` after reading `dir/meta.json`
    /// ([`open_meta`]).
    ///
    /// Fails when the file's size is not a whole number of tokens
    /// ([`DatasetError::BadLength`]) or another number than `meta.json` says
    /// ([`DatasetError::TokenCount`]). Ids are not checked here (see
    /// [`TokenFile::validate`]).
    pub fn open(dir: &Path, split: Split) -> Result<TokenFile, DatasetError> {
        let meta = open_meta(dir)?;
        let path = dir.join(split.file_name());
        let file = File::open(&path).map_err(|e| DatasetError::io(&path, e))?;
        let bytes = file
            .metadata()
            .map_err(|e| DatasetError::io(&path, e))?
            .len();
        let token_bytes = meta.dtype.bytes();
        if bytes % token_bytes as u64 != 0 {
            return Err(DatasetError::BadLength {
                path,
                bytes,
                token_bytes,
            });
        }
        let tokens = bytes / token_bytes as u64;
        if tokens != meta.tokens(split) {
            return Err(DatasetError::TokenCount {
                path,
                found: tokens,
                expected: meta.tokens(split),
            });
        }
        let len = usize::try_from(tokens).map_err(|_| {
            DatasetError::Invalid(format!(
                "{} has {tokens} tokens, more than this machine can address",
                path.display()
            ))
        })?;
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is opened read-only; datasets are replaced by
            // renaming new files into place, never modified in place, so the
            // mapped file does not change while it is mapped.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| DatasetError::io(&path, e))?)
        };
        Ok(TokenFile {
            path,
            meta,
            map,
            len,
        })
    }

    /// The dataset's metadata.
    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }

    /// The mapped file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the split holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ids of the tokens in `range`.
    ///
    /// # Panics
    ///
    /// When `range` is not inside `0..len()`.
    pub fn get(&self, range: Range<usize>) -> Vec<u32> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "tokens {range:?} out of range: {} holds {} tokens",
            self.path.display(),
            self.len
        );
        let Some(map) = &self.map else {
            return Vec::new();
        };
        let b = self.meta.dtype.bytes();
        let bytes = &map[range.start * b..range.end * b];
        match self.meta.dtype {
            TokenDType::U16 => bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            TokenDType::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }

    /// Checks that every id is below the vocabulary size (reads the whole file).
    ///
    /// Fails with [`DatasetError::TokenOutOfRange`] naming the first bad id and its
    /// position.
    pub fn validate(&self) -> Result<(), DatasetError> {
        const CHUNK: usize = 1 << 20;
        let mut start = 0;
        while start < self.len {
            let end = (start + CHUNK).min(self.len);
            self.check_ids(start, &self.get(start..end))?;
            start = end;
        }
        Ok(())
    }

    /// Fails if an id of `ids`, read from position `start`, is out of the vocabulary.
    pub(crate) fn check_ids(&self, start: usize, ids: &[u32]) -> Result<(), DatasetError> {
        let vocab_size = self.meta.vocab_size;
        match ids.iter().position(|&id| id as usize >= vocab_size) {
            None => Ok(()),
            Some(i) => Err(DatasetError::TokenOutOfRange {
                path: self.path.clone(),
                vocab_size,
                token: ids[i],
                position: (start + i) as u64,
            }),
        }
    }
}
