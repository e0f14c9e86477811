//! Tokenizers: `tokenizer.json` (WordPiece for BERT) and GPT-2 byte-level BPE.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::HubError;

/// A loaded tokenizer, with padding and truncation off unless switched on.
pub struct TextTokenizer {
    inner: Tokenizer,
    source: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`, switching off the padding and truncation it may
    /// configure (all-MiniLM-L6-v2's pads and truncates to 128).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self, HubError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(HubError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| HubError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| HubError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(TextTokenizer {
            inner,
            source: path.to_path_buf(),
        })
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` (or `encoder.json`) and
    /// `merges.txt` (or `vocab.bpe`).
    pub fn gpt2_bpe(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self, HubError> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        for path in [vocab, merges] {
            if !path.is_file() {
                return Err(HubError::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
        }
        let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| HubError::Tokenizer {
                path: vocab.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(TextTokenizer {
            inner,
            source: vocab.to_path_buf(),
        })
    }

    /// Loads the tokenizer found in `dir`: `tokenizer.json` if present, else GPT-2
    /// BPE files (`vocab.json` + `merges.txt`, or `encoder.json` + `vocab.bpe`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, HubError> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(json);
        }
        for (vocab, merges) in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")] {
            let (vocab, merges) = (dir.join(vocab), dir.join(merges));
            if vocab.is_file() && merges.is_file() {
                return Self::gpt2_bpe(vocab, merges);
            }
        }
        Err(HubError::Tokenizer {
            path: dir.to_path_buf(),
            reason: "no tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe"
                .into(),
        })
    }

    /// Token ids of `text`, with the special tokens (`[CLS]`, `[SEP]`) when
    /// `add_special_tokens` is set and the tokenizer defines them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, HubError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, HubError> {
        self.inner.decode(ids, true).map_err(|e| self.error(e))
    }

    /// The number of tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token`, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The `tokenizers` tokenizer inside, to switch padding or truncation on.
    pub fn inner_mut(&mut self) -> &mut Tokenizer {
        &mut self.inner
    }

    fn error(&self, e: tokenizers::Error) -> HubError {
        HubError::Tokenizer {
            path: self.source.clone(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_tokenizer_files_is_an_error() {
        let err = TextTokenizer::from_dir(std::env::temp_dir().join("mics-no-tokenizer-here"))
            .unwrap_err();
        assert!(err.to_string().contains("mics-no-tokenizer-here"), "{err}");
        let err = TextTokenizer::gpt2_bpe("/nonexistent/vocab.json", "/nonexistent/merges.txt")
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vocab.json"), "{err}");
    }
}
