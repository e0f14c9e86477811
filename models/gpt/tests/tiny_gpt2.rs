//! GPT-2 against the independent numpy reference of `fixtures/make_tiny_gpt2.py`,
//! in both Hugging Face layouts and in F32, F16 and BF16; save/load round trips;
//! the GPT-2 tokenizer; generation; training under Autodiff.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use mics_gpt::{GenerateOptions, Gpt2Config, Gpt2LMHeadModel, SaveOptions};
use mics_hub::{
    Checkpoint, CheckpointWriter, FloatDType, HubError, TextTokenizer, assets::asset_dir,
};
use mics_plain::Plain;
use mics_test_support::{assert_every_parameter_has_a_gradient, scratch};
use serde_json::Value;

/// The tag of this file's scratch directories.
const SCRATCH: &str = "gpt-test";

type B = NdArray<f32>;

const TOLERANCE: f32 = 1e-4;

fn fixture(variant: &str) -> PathBuf {
    asset_dir("tiny-gpt2")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(variant)
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_logits.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [1, n]), &Default::default())
}

/// Largest deviation of the model's logits from the reference summary `expected`.
fn compare(model: &Gpt2LMHeadModel<B>, ids: &[u32], columns: &[usize], expected: &Value) -> f32 {
    let vocab = model.config.vocab_size;
    let logits: Vec<f32> = model.forward(ids_tensor(ids)).into_data().to_vec().unwrap();
    let mut worst = 0.0f32;
    for (pos, row) in logits.chunks(vocab).enumerate() {
        for (c, &col) in columns.iter().enumerate() {
            let want = expected["columns"][pos][c].as_f64().unwrap() as f32;
            worst = worst.max((row[col] - want).abs());
        }
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max
            + row
                .iter()
                .map(|v| ((v - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
        worst = worst.max((lse - expected["logsumexp"][pos].as_f64().unwrap() as f32).abs());
        let argmax = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > row[b] { i } else { b });
        assert_eq!(
            argmax as u64,
            expected["argmax"][pos].as_u64().unwrap(),
            "argmax at {pos}"
        );
    }
    worst
}

#[test]
fn logits_match_numpy_reference_in_every_layout_and_dtype() {
    let reference = reference();
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let columns: Vec<usize> = reference["column_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let device = Default::default();
    for (variant, dtype, prefix, key) in [
        ("hub", FloatDType::F32, "", "f32"),
        ("save_pretrained", FloatDType::F32, "transformer.", "f32"),
        (
            "save_pretrained-f16",
            FloatDType::F16,
            "transformer.",
            "f16",
        ),
        ("hub-bf16", FloatDType::BF16, "", "bf16"),
    ] {
        let (model, report) = Gpt2LMHeadModel::<B>::load(fixture(variant), &device).unwrap();
        assert_eq!(report.dtype, dtype, "{variant}");
        assert_eq!(report.prefix, prefix, "{variant}");
        assert!(report.initialised.is_empty(), "{variant}: {report}");
        if prefix.is_empty() {
            // Only the causal-mask buffers are left over.
            assert_eq!(report.ignored.len(), 4, "{report}");
            assert!(
                report
                    .ignored
                    .iter()
                    .all(|k| k.ends_with(".attn.bias") || k.ends_with("attn.masked_bias"))
            );
        } else {
            assert!(report.ignored.is_empty(), "{report}");
        }
        let worst = compare(&model, &ids, &columns, &reference[key]);
        eprintln!("{variant}: max |logit - reference| = {worst:e}");
        assert!(worst < TOLERANCE, "{variant}: deviation {worst}");
    }
}

#[test]
fn save_load_round_trip_is_bit_exact_with_the_same_keys_shapes_and_dtypes() {
    let device = Default::default();
    for variant in ["hub", "save_pretrained-f16", "hub-bf16"] {
        let (model, report) = Gpt2LMHeadModel::<B>::load(fixture(variant), &device).unwrap();
        let out = scratch(SCRATCH, variant);
        model.save(&out, &SaveOptions::like(&report)).unwrap();
        let original = Checkpoint::open(fixture(variant).join("model.safetensors")).unwrap();
        let saved = Checkpoint::open(out.join("model.safetensors")).unwrap();
        // Every parameter written with its key, shape, dtype and exact value; only the
        // buffers and the tied lm_head are left out.
        let expected_keys: Vec<String> = original
            .keys()
            .into_iter()
            .filter(|k| {
                !k.ends_with(".attn.bias") && !k.ends_with("masked_bias") && k != "lm_head.weight"
            })
            .collect();
        assert_eq!(saved.keys(), expected_keys, "{variant}");
        for key in &expected_keys {
            let shape = original.shape(key).unwrap();
            assert_eq!(saved.shape(key).unwrap(), shape, "{key}");
            assert_eq!(saved.dtype(key), original.dtype(key), "{key}");
            let a = original.read_f32(key, &shape).unwrap();
            let b = saved.read_f32(key, &shape).unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{variant}: {key} changed"
            );
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "gpt2");
        assert_eq!(config["n_ctx"], 64, "unknown config fields are preserved");
        let (reloaded, _) = Gpt2LMHeadModel::<B>::load(&out, &device).unwrap();
        let ids = ids_tensor(&[1, 2, 3]);
        let a: Vec<f32> = model.forward(ids.clone()).into_data().to_vec().unwrap();
        let b: Vec<f32> = reloaded.forward(ids).into_data().to_vec().unwrap();
        assert_eq!(a, b);
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn untied_lm_head_is_rejected_naming_file_and_key() {
    let (model, _) = Gpt2LMHeadModel::<B>::load(fixture("hub"), &Default::default()).unwrap();
    let mut writer = CheckpointWriter::new(FloatDType::F32);
    model.write_tensors(&mut writer, "transformer.");
    let wte = model.transformer.wte.weight.val();
    writer.add("lm_head.weight", wte.add_scalar(1.0));
    let path = PathBuf::from("untied.safetensors");
    let ckpt = Checkpoint::from_bytes(&path, writer.to_bytes().unwrap()).unwrap();
    let err = Gpt2LMHeadModel::<B>::from_checkpoint(&ckpt, &model.config, &Default::default())
        .unwrap_err();
    assert!(
        matches!(&err, HubError::Value { key, .. } if key == "lm_head.weight"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("untied.safetensors") && message.contains("lm_head.weight"),
        "{message}"
    );
}

#[test]
fn gpt2_tokenizer_matches_reference_ids() {
    let dir = asset_dir("gpt2-tokenizer").unwrap_or_else(|e| panic!("{e}"));
    // Both spellings of the same files.
    for (vocab, merges) in [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")] {
        let tok = TextTokenizer::gpt2_bpe(dir.join(vocab), dir.join(merges)).unwrap();
        let text = "Hello world, the quick brown fox.";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, [15496, 995, 11, 262, 2068, 7586, 21831, 13]);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Python `tokenizers` 0.23.3 (ByteLevel, no prefix space) gives these ids.
        let hard = " Héllo  naïve\n🤗 world";
        let ids = tok.encode(hard, true).unwrap();
        assert_eq!(ids, [367, 2634, 18798, 220, 41492, 198, 8582, 97, 245, 995]);
        assert_eq!(tok.decode(&ids).unwrap(), hard);
    }
}

#[test]
fn generation_is_seeded_and_greedy_follows_the_argmax() {
    let device = Default::default();
    let (model, _) = Gpt2LMHeadModel::<B>::load(fixture("save_pretrained"), &device).unwrap();
    let prompt = [15496, 995];
    let greedy = GenerateOptions {
        max_new_tokens: 4,
        temperature: 0.0,
        top_k: None,
        seed: 0,
    };
    let out = model.generate(&prompt, &greedy, &device);
    let mut context = prompt.to_vec();
    for &token in &out {
        let logits: Vec<f32> = model
            .forward(ids_tensor(&context))
            .into_data()
            .to_vec()
            .unwrap();
        let last = &logits[(context.len() - 1) * 50257..];
        let argmax = last
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
        assert_eq!(token as usize, argmax);
        context.push(token);
    }
    let sampled = GenerateOptions {
        max_new_tokens: 5,
        temperature: 0.8,
        top_k: Some(40),
        seed: 7,
    };
    let a = model.generate(&prompt, &sampled, &device);
    assert_eq!(a, model.generate(&prompt, &sampled, &device));
    assert_eq!(a.len(), 5);
    // A prompt longer than n_positions (64) is cropped, not an error.
    let long = vec![11u32; 70];
    assert_eq!(model.generate(&long, &greedy, &device).len(), 4);
}

#[test]
fn one_backward_pass_gives_every_parameter_a_gradient() {
    // An autodiff backend whether or not Burn's `distributed` autodiff
    // feature is on in this build (crates/plain).
    type A = Autodiff<Plain<B>>;
    let device = Default::default();
    let model = Gpt2LMHeadModel::<A>::init(&Gpt2Config::tiny(50, 16, 2, 2), &device);
    let ids: Vec<i64> = (0..12).map(|i| (i * 7 % 50) as i64).collect();
    let input = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [2, 6]), &device);
    let logits = model.forward(input);
    let loss = burn::tensor::activation::log_softmax(logits, 2)
        .mean()
        .neg();
    let grads = loss.backward();
    let seen = assert_every_parameter_has_a_gradient(&model, &grads);
    assert_eq!(seen, model.num_params());
}

#[test]
fn generated_fixture_matches_the_committed_reference() {
    // The cached files come from the committed script: if the script changes, the
    // committed reference must be regenerated with it (`--reference`).
    let path = asset_dir("tiny-gpt2")
        .unwrap_or_else(|e| panic!("{e}"))
        .join("reference.json");
    let generated: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(
        generated == reference(),
        "rerun make_tiny_gpt2.py into $MICS_CACHE/tiny-gpt2"
    );
}
