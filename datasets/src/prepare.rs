//! [`prepare`]: tokenize a corpus into a dataset directory.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::meta::{FORMAT_VERSION, META_FILE, TOKENIZER_FILE};
use crate::{Corpus, DatasetError, DatasetMeta, SpecialTokens, Split, TokenDType, TokenizerSpec};

/// The default fraction of every document's tokens that goes to the validation split.
pub const DEFAULT_VAL_FRACTION: f64 = 0.05;

/// What [`prepare`] tokenizes, with what, and where it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    /// The text to tokenize.
    pub corpus: Corpus,
    /// The tokenizer to use (a copy is saved with the dataset).
    pub tokenizer: TokenizerSpec,
    /// The dataset directory (created if needed; a dataset already there is
    /// replaced only once the new one is complete).
    pub out: PathBuf,
    /// The fraction of each document's tokens, taken from its end, that goes to
    /// the validation split; in `[0, 1)`, default [`DEFAULT_VAL_FRACTION`].
    pub val_fraction: f64,
    /// Show a progress bar over the documents (only when stderr is a terminal).
    pub progress: bool,
}

impl PrepareOptions {
    /// Options with the default validation fraction and no progress bar.
    pub fn new(corpus: Corpus, tokenizer: TokenizerSpec, out: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            corpus,
            tokenizer,
            out: out.into(),
            val_fraction: DEFAULT_VAL_FRACTION,
            progress: false,
        }
    }
}

/// The number of a document's `len` tokens that go to the validation split: the
/// nearest whole number to `len * val_fraction`, but at least one when
/// `val_fraction > 0` and at most `len - 1` (every document of two tokens or more
/// feeds both splits; a one-token document goes to train).
pub fn val_tokens_of_document(len: usize, val_fraction: f64) -> usize {
    if len < 2 || val_fraction <= 0.0 {
        return 0;
    }
    ((len as f64 * val_fraction).round() as usize).clamp(1, len - 1)
}

/// Tokenizes `options.corpus` with `options.tokenizer` into `options.out`.
///
/// Writes four files (each first to a temporary file in `out/`, then renamed):
///
/// - `train.bin`, `val.bin`: the token ids, flat little-endian `u16` when the
///   vocabulary has at most 65536 ids, else `u32` ([`TokenDType`]);
/// - `tokenizer.json`: the tokenizer used, serialised by the `tokenizers` crate, so
///   that the dataset is self-contained;
/// - `meta.json`: the [`DatasetMeta`] returned.
///
/// Each document (a play, the book, a file) is tokenized whole, without special
/// tokens. **Split**: the last `val_fraction` of each document's tokens (see
/// [`val_tokens_of_document`]) go to `val.bin`, the rest to `train.bin`, so that
/// both splits see every document; in each split, every document's part is
/// followed by the separator: `<|endoftext|>` if the tokenizer has it (GPT-2:
/// 50256), else `[SEP]` (BERT: 102). Documents without tokens are skipped.
///
/// A dataset already in `out/` stays untouched until the new files are complete;
/// then its `meta.json` is removed first and the new one renamed into place last,
/// so a reader never sees a `meta.json` that does not describe the token files.
pub fn prepare(options: &PrepareOptions) -> Result<DatasetMeta, DatasetError> {
    let f = options.val_fraction;
    if !(0.0..1.0).contains(&f) {
        return Err(DatasetError::Invalid(format!(
            "validation fraction {f} is not in [0, 1)"
        )));
    }
    let files = options.corpus.documents()?;
    let mut tokenizer = options.tokenizer.load()?;
    let vocab_size = tokenizer.vocab_size();
    let special = SpecialTokens::lookup(|t| tokenizer.token_to_id(t));
    let separator = special
        .separator()
        .ok_or_else(|| DatasetError::NoSeparator {
            tokenizer: options.tokenizer.to_string(),
        })?;
    let dtype = TokenDType::for_vocab(vocab_size);

    let out = &options.out;
    if out.exists() && !out.is_dir() {
        return Err(DatasetError::Invalid(format!(
            "output {} exists and is not a directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| DatasetError::io(out, e))?;
    let mut staged = Staged::new(out);
    let mut train = TokenWriter::create(staged.add(Split::Train.file_name()), dtype)?;
    let mut val = TokenWriter::create(staged.add(Split::Val.file_name()), dtype)?;

    let bar = if options.progress && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(files.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} documents, {elapsed} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Documents are tokenized in parallel, a group of one per thread at a time,
    // and written in order.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    let mut documents = 0;
    for group in files.chunks(threads) {
        let encoded: Vec<Result<Vec<u32>, DatasetError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .iter()
                .map(|file| scope.spawn(|| encode_document(&tokenizer, file, vocab_size)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        for (file, ids) in group.iter().zip(encoded) {
            let ids = ids?;
            if !ids.is_empty() {
                documents += 1;
                let cut = ids.len() - val_tokens_of_document(ids.len(), f);
                for (writer, part) in [(&mut train, &ids[..cut]), (&mut val, &ids[cut..])] {
                    if !part.is_empty() {
                        writer.write(part)?;
                        writer.write(&[separator])?;
                    }
                }
            }
            bar.set_message(
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if documents == 0 {
        return Err(DatasetError::EmptyCorpus {
            corpus: options.corpus.to_string(),
            reason: format!("no tokens in its {} file(s)", files.len()),
        });
    }
    let train_tokens = train.finish()?;
    let val_tokens = val.finish()?;

    let tokenizer_path = staged.add(TOKENIZER_FILE);
    tokenizer
        .inner_mut()
        .save(&tokenizer_path, false)
        .map_err(|e| DatasetError::io(&tokenizer_path, std::io::Error::other(e.to_string())))?;

    let meta = DatasetMeta {
        format_version: FORMAT_VERSION,
        tokenizer: options.tokenizer.to_string(),
        vocab_size,
        dtype,
        train_tokens,
        val_tokens,
        documents,
        corpus: options.corpus.to_string(),
        special,
    };
    let meta_path = staged.add(META_FILE);
    let json = serde_json::to_string_pretty(&meta).expect("DatasetMeta serialises");
    write_synced(&meta_path, format!("{json}\n").as_bytes())?;
    staged.commit()?;
    Ok(meta)
}

/// The ids of one document, checked against the vocabulary.
fn encode_document(
    tokenizer: &mics_hub::TextTokenizer,
    file: &Path,
    vocab_size: usize,
) -> Result<Vec<u32>, DatasetError> {
    let text = read_text(file)?;
    let ids = tokenizer.encode(&text, false)?;
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        None => Ok(ids),
        Some(position) => Err(DatasetError::TokenOutOfRange {
            path: file.to_path_buf(),
            vocab_size,
            token: ids[position],
            position: position as u64,
        }),
    }
}

/// A corpus file as text, without a leading byte-order mark.
fn read_text(path: &Path) -> Result<String, DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DatasetError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    let mut file = File::create(path).map_err(|e| DatasetError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| DatasetError::io(path, e))
}

/// Streams token ids to a file in the dataset's dtype.
struct TokenWriter {
    path: PathBuf,
    out: BufWriter<File>,
    dtype: TokenDType,
    tokens: u64,
}

impl TokenWriter {
    fn create(path: PathBuf, dtype: TokenDType) -> Result<Self, DatasetError> {
        let file = File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
        Ok(TokenWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            dtype,
            tokens: 0,
        })
    }

    fn write(&mut self, ids: &[u32]) -> Result<(), DatasetError> {
        let result = match self.dtype {
            TokenDType::U16 => ids
                .iter()
                .try_for_each(|&id| self.out.write_all(&(id as u16).to_le_bytes())),
            TokenDType::U32 => ids
                .iter()
                .try_for_each(|&id| self.out.write_all(&id.to_le_bytes())),
        };
        result.map_err(|e| DatasetError::io(&self.path, e))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Flushes and syncs; returns the number of tokens written.
    fn finish(self) -> Result<u64, DatasetError> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| DatasetError::io(&self.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| DatasetError::io(&self.path, e))?;
        Ok(self.tokens)
    }
}

/// Temporary files in the output directory, renamed to their final names by
/// [`Staged::commit`] and removed if dropped before.
struct Staged {
    dir: PathBuf,
    files: Vec<(PathBuf, &'static str)>,
}

impl Staged {
    fn new(dir: &Path) -> Self {
        Staged {
            dir: dir.to_path_buf(),
            files: Vec::new(),
        }
    }

    /// A temporary path in the output directory for the final file `name`.
    fn add(&mut self, name: &'static str) -> PathBuf {
        let path = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        self.files.push((path.clone(), name));
        path
    }

    /// Removes the old `meta.json`, then renames every file into place,
    /// `meta.json` last.
    fn commit(mut self) -> Result<(), DatasetError> {
        let meta = self.dir.join(META_FILE);
        match std::fs::remove_file(&meta) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatasetError::io(meta, e)),
        }
        self.files.sort_by_key(|(_, name)| *name == META_FILE);
        while !self.files.is_empty() {
            let (temp, name) = &self.files[0];
            let target = self.dir.join(name);
            std::fs::rename(temp, &target).map_err(|e| DatasetError::io(&target, e))?;
            self.files.remove(0);
        }
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (temp, _) in &self.files {
            let _ = std::fs::remove_file(temp);
        }
    }
}
