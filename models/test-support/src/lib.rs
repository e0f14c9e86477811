//! What the tests share (a dev-dependency only): the lock that lets seeded
//! tests take turns on the backend's process-global generator, every
//! parameter's path, fresh scratch directories, the check that one backward
//! pass reaches every parameter, and the training tests' corpus: excerpts of
//! Shakespeare with a 257-token byte-level tokenizer.
//!
//! The tests run on `Autodiff<Plain<NdArray>>` (crates/plain); these helpers
//! are generic over the backend.

#![warn(missing_docs)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

/// NdArray's random generator is process-global: the tests that draw from it
/// (weight initialisation, dropout masks) hold this lock so that seeded runs
/// are reproducible when the tests of one binary share a process
/// (`cargo test`). One lock per test binary.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every float parameter's path (`transformer.h.0.attn.c_attn.weight`, ...),
/// in visiting order.
pub fn param_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<String> {
    struct Paths {
        stack: Vec<String>,
        found: Vec<String>,
    }
    impl<B: Backend> ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            self.found.push(self.stack.join("."));
        }
    }
    let mut paths = Paths {
        stack: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut paths);
    paths.found
}

/// A path under the temporary directory that does not exist yet:
/// `mics-{tag}-{name}-{pid}-{n}`, `n` counting the calls of this process.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mics-{tag}-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Checks that `grads` (one backward pass) hold a finite gradient with a
/// nonzero element for every float parameter of `module`, and returns the
/// number of parameter elements visited (compare with `num_params()`).
///
/// Panics, naming the parameter's shape, on a missing, non-finite or zero
/// gradient.
pub fn assert_every_parameter_has_a_gradient<A: AutodiffBackend, M: Module<A>>(
    module: &M,
    grads: &A::Gradients,
) -> usize {
    struct Check<'a, A: AutodiffBackend> {
        grads: &'a A::Gradients,
        seen: usize,
    }
    impl<A: AutodiffBackend> ModuleVisitor<A> for Check<'_, A> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            let grad = param
                .val()
                .grad(self.grads)
                .expect("a parameter has no gradient");
            let values: Vec<f32> = grad
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 values");
            assert!(
                values.iter().all(|v| v.is_finite()),
                "non-finite gradient for a parameter of shape {:?}",
                param.dims()
            );
            let norm: f32 = values.iter().map(|v| v.abs()).sum();
            assert!(
                norm > 0.0,
                "zero gradient for a parameter of shape {:?}",
                param.dims()
            );
            self.seen += param.val().shape().num_elements();
        }
    }
    let mut check = Check::<A> { grads, seen: 0 };
    module.visit(&mut check);
    check.seen
}

/// Bytes `range` of two Shakespeare plays from the test assets (Hamlet and
/// Macbeth; past 60 000 bytes is past the Gutenberg header), written to
/// `dir` (created) as two documents.
pub fn write_shakespeare(dir: &Path, range: Range<usize>) {
    let plays = mics_hub::assets::asset_dir("shakespeare")
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-assets)"));
    std::fs::create_dir_all(dir).unwrap();
    for play in ["hamlet_gut.txt", "macbeth_gut.txt"] {
        let text = std::fs::read(plays.join(play)).unwrap();
        let text = String::from_utf8_lossy(&text[range.clone()]).into_owned();
        std::fs::write(dir.join(play), text).unwrap();
    }
}

/// The training tests' corpus in `dir`: 4 KB of each play in `dir/texts`,
/// and `dir/bytes.json` ([`byte_tokenizer`]).
pub fn write_byte_corpus(dir: &Path) {
    write_shakespeare(&dir.join("texts"), 60_000..64_000);
    std::fs::write(dir.join("bytes.json"), byte_tokenizer()).unwrap();
}

/// A `tokenizer.json`: GPT-2's byte-level BPE cut down to its 256 byte
/// tokens (no merges) and `<|endoftext|>`. Its 257 ids, rather than GPT-2's
/// 50257, keep the embedding and the softmax small enough for tests of a
/// few seconds.
pub fn byte_tokenizer() -> String {
    let vocab = mics_hub::assets::asset_file("gpt2-tokenizer", "vocab.json")
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-assets)"));
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(vocab).unwrap()).unwrap();
    let mut bytes: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .filter(|(_, id)| id.as_u64().unwrap() < 256)
        .collect();
    assert_eq!(bytes.len(), 256);
    bytes.insert("<|endoftext|>".into(), 256.into());
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "vocab": bytes, "merges": []
        }
    })
    .to_string()
}

/// The byte range of tensor `name`'s data in a safetensors file's `bytes`,
/// read from its header (tests that corrupt one tensor on purpose).
pub fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let (a, b) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    8 + n + a..8 + n + b
}
