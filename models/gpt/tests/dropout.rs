//! Dropout as Hugging Face applies it (`embd_pdrop`, `attn_pdrop`, `resid_pdrop`):
//! active in training-mode forwards on an autodiff backend, seeded, identity in
//! `valid()` and when the probability is 0; the configuration fields' defaults and
//! `config.json` round trip; no change to the parameter list.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_gpt::{Gpt2Config, Gpt2LMHeadModel, SaveOptions};
use mics_hub::CheckpointWriter;
use mics_plain::Plain;
use mics_test_support::{param_paths, rng_lock, scratch};
use serde_json::{Value, json};

/// The tag of this file's scratch directories.
const SCRATCH: &str = "gpt-dropout";

// Plain<NdArray>: an autodiff backend (below) whether or not Burn's
// `distributed` autodiff feature is on in this build (crates/plain).
type B = Plain<NdArray<f32>>;
type A = Autodiff<B>;

fn tiny() -> Gpt2Config {
    Gpt2Config::tiny(50, 16, 2, 2)
}

fn ids<X: Backend>(device: &X::Device) -> Tensor<X, 2, Int> {
    let ids: Vec<i64> = (0..12).map(|i| (i * 7 % 50) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [2, 6]), device)
}

/// The training-mode (autodiff) logits and the `valid()` (inference) logits.
fn train_and_infer(model: &Gpt2LMHeadModel<A>) -> (Vec<f32>, Vec<f32>) {
    let device = Default::default();
    let train = model
        .forward(ids::<A>(&device))
        .into_data()
        .to_vec()
        .unwrap();
    let infer = model
        .valid()
        .forward(ids::<B>(&device))
        .into_data()
        .to_vec()
        .unwrap();
    (train, infer)
}

#[test]
fn training_forward_drops_out_and_is_seeded() {
    let _rng = rng_lock();
    let device = Default::default();
    let model = Gpt2LMHeadModel::<A>::init(&tiny().with_dropout(0.5), &device);
    // Fresh weights are initialised lazily, on first use, from the same generator as
    // the dropout masks: a first forward materialises them before seeding.
    model.forward(ids::<A>(&device));
    let run = |seed: u64| -> Vec<f32> {
        A::seed(&device, seed);
        model
            .forward(ids::<A>(&device))
            .into_data()
            .to_vec()
            .unwrap()
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b, "same seed, same dropout masks");
    assert_ne!(a, c, "another seed, other masks");
    let (train, infer) = train_and_infer(&model);
    assert_ne!(train, infer, "dropout is active in training mode");
    // Inference ignores dropout: it equals the inference of the same weights without it.
    let without = model.clone().with_dropout(0.0);
    assert_eq!(without.config.attn_pdrop, 0.0);
    assert_eq!(train_and_infer(&without).1, infer);
}

#[test]
fn each_probability_is_applied() {
    let _rng = rng_lock();
    let device = Default::default();
    let base = tiny();
    for (name, config) in [
        (
            "embd_pdrop",
            Gpt2Config {
                embd_pdrop: 0.5,
                ..base.clone()
            },
        ),
        (
            "attn_pdrop",
            Gpt2Config {
                attn_pdrop: 0.5,
                ..base.clone()
            },
        ),
        (
            "resid_pdrop",
            Gpt2Config {
                resid_pdrop: 0.5,
                ..base.clone()
            },
        ),
    ] {
        A::seed(&device, 1);
        let model = Gpt2LMHeadModel::<A>::init(&config, &device);
        let (train, infer) = train_and_infer(&model);
        assert_ne!(train, infer, "{name} has no effect");
    }
}

#[test]
fn zero_dropout_training_forward_equals_inference_exactly() {
    let _rng = rng_lock();
    let device = Default::default();
    let model = Gpt2LMHeadModel::<A>::init(&tiny(), &device);
    let (train, infer) = train_and_infer(&model);
    assert_eq!(train, infer);
    let (train, infer) = train_and_infer(&model.with_dropout(0.0));
    assert_eq!(train, infer);
}

#[test]
fn dropout_adds_no_parameters() {
    let _rng = rng_lock();
    let device = Default::default();
    let plain = Gpt2LMHeadModel::<B>::init(&tiny(), &device);
    let dropped = Gpt2LMHeadModel::<B>::init(&tiny().with_dropout(0.3), &device);
    let paths = param_paths::<B, _>(&dropped);
    assert_eq!(paths, param_paths::<B, _>(&plain));
    assert_eq!(dropped.num_params(), plain.num_params());
    assert!(paths.iter().all(|p| !p.contains("drop")), "{paths:?}");
    // As many parameter tensors as the checkpoint has keys.
    let mut writer = CheckpointWriter::new(mics_hub::FloatDType::F32);
    dropped.write_tensors(&mut writer, "transformer.");
    let dir = scratch(SCRATCH, "keys");
    std::fs::create_dir_all(&dir).unwrap();
    writer.write(dir.join("model.safetensors")).unwrap();
    let keys = mics_hub::Checkpoint::open(dir.join("model.safetensors"))
        .unwrap()
        .keys();
    assert_eq!(paths.len(), keys.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn absent_fields_take_the_hugging_face_defaults() {
    let config: Gpt2Config = serde_json::from_value(json!({
        "vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2,
    }))
    .unwrap();
    assert_eq!(
        (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop),
        (0.1, 0.1, 0.1)
    );
    assert!(config.extra.is_empty(), "{:?}", config.extra);
    assert!(config.validate().is_ok());
}

#[test]
fn fields_are_read_as_fields_not_extra() {
    let config: Gpt2Config = serde_json::from_value(json!({
        "vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2,
        "embd_pdrop": 0.2, "attn_pdrop": 0, "resid_pdrop": 0.3, "summary_first_dropout": 0.1,
    }))
    .unwrap();
    assert_eq!(
        (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop),
        (0.2, 0.0, 0.3)
    );
    let extra: Vec<&String> = config.extra.keys().collect();
    assert_eq!(extra, ["summary_first_dropout"]);
}

#[test]
fn with_dropout_sets_all_three_and_validate_checks_them() {
    let config = tiny();
    assert_eq!(
        (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop),
        (0.0, 0.0, 0.0)
    );
    let config = config.with_dropout(0.25);
    assert_eq!(
        (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop),
        (0.25, 0.25, 0.25)
    );
    for bad in [-0.1, 1.0, 1.5, f64::NAN] {
        let err = tiny().with_dropout(bad).validate().unwrap_err();
        assert!(err.contains("embd_pdrop"), "{err}");
    }
    let err = Gpt2Config {
        resid_pdrop: 1.0,
        ..tiny()
    }
    .validate()
    .unwrap_err();
    assert!(err.contains("resid_pdrop"), "{err}");
}

#[test]
fn config_json_round_trip_keeps_the_dropout_fields() {
    let config = tiny().with_dropout(0.25);
    let value = serde_json::to_value(&config).unwrap();
    for key in ["embd_pdrop", "attn_pdrop", "resid_pdrop"] {
        assert_eq!(value[key], 0.25, "{key}");
    }
    assert_eq!(serde_json::from_value::<Gpt2Config>(value).unwrap(), config);

    // Through save and load: written once each, read back into the model's layers.
    let _rng = rng_lock();
    let device = Default::default();
    let model = Gpt2LMHeadModel::<B>::init(&config, &device);
    let dir = scratch(SCRATCH, "save");
    model.save(&dir, &SaveOptions::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for key in ["embd_pdrop", "attn_pdrop", "resid_pdrop"] {
        assert_eq!(text.matches(&format!("\"{key}\"")).count(), 1, "{key}");
    }
    let saved: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(saved["attn_pdrop"], 0.25);
    let (loaded, _) = Gpt2LMHeadModel::<B>::load(&dir, &device).unwrap();
    assert_eq!(loaded.config.embd_pdrop, 0.25);
    assert!(loaded.config.extra.get("attn_pdrop").is_none());
    assert_eq!(loaded.transformer.drop.prob, 0.25);
    assert_eq!(loaded.transformer.h[1].attn.attn_dropout.prob, 0.25);
    assert_eq!(loaded.transformer.h[1].attn.resid_dropout.prob, 0.25);
    assert_eq!(loaded.transformer.h[1].mlp.dropout.prob, 0.25);
    std::fs::remove_dir_all(dir).unwrap();
}
