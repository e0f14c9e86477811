//! What to prepare: [`Corpus`] and [`TokenizerSpec`].

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use mics_hub::TextTokenizer;
use mics_hub::assets::{asset_dir, asset_file};

use crate::DatasetError;

/// A text corpus: a list of documents, each a UTF-8 file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// The 42 plays of `$MICS_CACHE/shakespeare/*_gut.txt`, one document each, in
    /// file-name order.
    Shakespeare,
    /// `$MICS_CACHE/moby-dick/moby-dick.txt`, one document.
    MobyDick,
    /// A `.txt` file (one document), or a directory: every `*.txt` file below it,
    /// recursively, one document each, in path order.
    Path(PathBuf),
}

impl FromStr for Corpus {
    type Err = Infallible;

    /// `shakespeare`, `moby-dick`, or anything else as a path.
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(match s {
            "shakespeare" => Corpus::Shakespeare,
            "moby-dick" => Corpus::MobyDick,
            path => Corpus::Path(PathBuf::from(path)),
        })
    }
}

impl std::fmt::Display for Corpus {
    /// `shakespeare`, `moby-dick` or the path: the `corpus` of [`crate::DatasetMeta`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corpus::Shakespeare => f.write_str("shakespeare"),
            Corpus::MobyDick => f.write_str("moby-dick"),
            Corpus::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Corpus {
    /// The document files, in order.
    ///
    /// Fails with [`DatasetError::CorpusMissing`] for a path that does not exist,
    /// with [`DatasetError::Hub`] (naming `scripts/fetch-assets`) for a missing
    /// asset, and with [`DatasetError::EmptyCorpus`] when there is no document.
    pub fn documents(&self) -> Result<Vec<PathBuf>, DatasetError> {
        let files = match self {
            Corpus::Shakespeare => {
                let dir = asset_dir("shakespeare")?;
                let mut files = Vec::new();
                for entry in read_dir(&dir)? {
                    let play = entry
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().ends_with("_gut.txt"));
                    if play && entry.is_file() {
                        files.push(entry);
                    }
                }
                files.sort();
                files
            }
            Corpus::MobyDick => vec![asset_file("moby-dick", "moby-dick.txt")?],
            Corpus::Path(path) => {
                if path.is_file() {
                    vec![path.clone()]
                } else if path.is_dir() {
                    let mut files = Vec::new();
                    collect_txt(path, &mut files)?;
                    files.sort();
                    files
                } else {
                    return Err(DatasetError::CorpusMissing { path: path.clone() });
                }
            }
        };
        if files.is_empty() {
            return Err(DatasetError::EmptyCorpus {
                corpus: self.to_string(),
                reason: "no .txt files".into(),
            });
        }
        Ok(files)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    std::fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| DatasetError::io(dir, e))
}

fn collect_txt(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), DatasetError> {
    for path in read_dir(dir)? {
        if path.is_dir() {
            collect_txt(&path, files)?;
        } else if path.is_file() && path.extension().is_some_and(|e| e == "txt") {
            files.push(path);
        }
    }
    Ok(())
}

/// A tokenizer to prepare a corpus with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// GPT-2's byte-level BPE (`$MICS_CACHE/gpt2-tokenizer/vocab.json` and
    /// `merges.txt`), 50257 ids, `<|endoftext|>` = 50256.
    Gpt2,
    /// The BERT WordPiece tokenizer of all-MiniLM-L6-v2
    /// (`$MICS_CACHE/minilm/tokenizer.json`, padding and truncation off), 30522 ids.
    Bert,
    /// A `tokenizer.json`, or a directory holding `tokenizer.json` or GPT-2 BPE
    /// files (`vocab.json` + `merges.txt`).
    Path(PathBuf),
}

impl FromStr for TokenizerSpec {
    type Err = Infallible;

    /// `gpt2`, `bert`, or anything else as a path.
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(match s {
            "gpt2" => TokenizerSpec::Gpt2,
            "bert" => TokenizerSpec::Bert,
            path => TokenizerSpec::Path(PathBuf::from(path)),
        })
    }
}

impl std::fmt::Display for TokenizerSpec {
    /// `gpt2`, `bert` or the path: the `tokenizer` of [`crate::DatasetMeta`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSpec::Gpt2 => f.write_str("gpt2"),
            TokenizerSpec::Bert => f.write_str("bert"),
            TokenizerSpec::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl TokenizerSpec {
    /// Loads the tokenizer, padding and truncation off.
    ///
    /// With GPT-2 BPE files (`gpt2`, or a directory without `tokenizer.json`), an
    /// `<|endoftext|>` in the vocabulary is registered as a special token, as in
    /// Hugging Face's GPT-2 `tokenizer.json`: decoding skips it and the saved copy
    /// declares it.
    pub fn load(&self) -> Result<TextTokenizer, DatasetError> {
        let mut tokenizer = match self {
            TokenizerSpec::Gpt2 => TextTokenizer::from_dir(asset_dir("gpt2-tokenizer")?)?,
            TokenizerSpec::Bert => {
                TextTokenizer::from_tokenizer_json(asset_file("minilm", "tokenizer.json")?)?
            }
            TokenizerSpec::Path(path) if path.is_file() => {
                TextTokenizer::from_tokenizer_json(path)?
            }
            TokenizerSpec::Path(path) if path.is_dir() => TextTokenizer::from_dir(path)?,
            TokenizerSpec::Path(path) => {
                return Err(DatasetError::TokenizerMissing { path: path.clone() });
            }
        };
        // GPT-2 BPE files (not a tokenizer.json, which declares its own added
        // tokens): register <|endoftext|> as special.
        let bpe_files = match self {
            TokenizerSpec::Gpt2 => true,
            TokenizerSpec::Path(path) => path.is_dir() && !path.join("tokenizer.json").is_file(),
            TokenizerSpec::Bert => false,
        };
        if bpe_files && tokenizer.token_to_id("<|endoftext|>").is_some() {
            tokenizer
                .inner_mut()
                .add_special_tokens(&[tokenizers::AddedToken::from("<|endoftext|>", true)]);
        }
        Ok(tokenizer)
    }
}
