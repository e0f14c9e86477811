//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use mics_datasets::{DatasetMeta, FORMAT_VERSION, SpecialTokens, TokenDType};

/// A fresh, empty temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mics-datasets-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a dataset by hand: `train` ids as train.bin, `val` as val.bin.
pub fn write_dataset(
    dir: &Path,
    train: &[u32],
    val: &[u32],
    vocab_size: usize,
    special: SpecialTokens,
) -> DatasetMeta {
    let dtype = TokenDType::for_vocab(vocab_size);
    let encode = |ids: &[u32]| -> Vec<u8> {
        ids.iter()
            .flat_map(|&id| match dtype {
                TokenDType::U16 => (id as u16).to_le_bytes().to_vec(),
                TokenDType::U32 => id.to_le_bytes().to_vec(),
            })
            .collect()
    };
    std::fs::write(dir.join("train.bin"), encode(train)).unwrap();
    std::fs::write(dir.join("val.bin"), encode(val)).unwrap();
    let meta = DatasetMeta {
        format_version: FORMAT_VERSION,
        tokenizer: "test".into(),
        vocab_size,
        dtype,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        documents: 1,
        corpus: "test".into(),
        special,
    };
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_string_pretty(&meta).unwrap(),
    )
    .unwrap();
    meta
}

/// A word-level `tokenizer.json` of `size` ids: `w0`..`w{size-3}`, `[UNK]`,
/// `<|endoftext|>` (the last id), split on whitespace.
pub fn word_level_tokenizer(path: &Path, size: usize) {
    let mut vocab = serde_json::Map::new();
    for i in 0..size - 2 {
        vocab.insert(format!("w{i}"), (i as u64).into());
    }
    vocab.insert("[UNK]".into(), ((size - 2) as u64).into());
    vocab.insert("<|endoftext|>".into(), ((size - 1) as u64).into());
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}
