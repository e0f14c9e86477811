//! Dropout as Hugging Face applies it (`hidden_dropout_prob` after the embeddings and
//! the two output dense layers, `attention_probs_dropout_prob` on the attention
//! probabilities): active in training-mode forwards on an autodiff backend, seeded,
//! identity in `valid()` and when the probability is 0; the configuration fields'
//! defaults and `config.json` round trip; no change to the parameter list.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_bert::{BertConfig, BertForMaskedLM, BertModel, SaveOptions};
use mics_hub::FloatDType;
use mics_plain::Plain;
use mics_test_support::{param_paths, rng_lock, scratch};
use serde_json::{Value, json};

/// The tag of this file's scratch directories.
const SCRATCH: &str = "bert-dropout";

// Plain<NdArray>: an autodiff backend (below) whether or not Burn's
// `distributed` autodiff feature is on in this build (crates/plain).
type B = Plain<NdArray<f32>>;
type A = Autodiff<B>;

fn tiny() -> BertConfig {
    BertConfig::tiny(40, 16, 2, 4)
}

fn ids<X: Backend>(device: &X::Device) -> (Tensor<X, 2, Int>, Tensor<X, 2, Int>) {
    let ids = TensorData::new(vec![2i64, 5, 9, 13, 0, 7, 39, 1], [2, 4]);
    let mask = TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 0], [2, 4]);
    (
        Tensor::from_data(ids, device),
        Tensor::from_data(mask, device),
    )
}

/// Masked-LM logits followed by the pooled output.
fn outputs<X: Backend>(model: &BertForMaskedLM<X>) -> Vec<f32> {
    let (ids, mask) = ids::<X>(&Default::default());
    let mut out: Vec<f32> = model
        .forward(ids.clone(), Some(mask.clone()))
        .into_data()
        .to_vec()
        .unwrap();
    let pooled = model.bert.forward(ids, Some(mask), None).pooled;
    out.extend(pooled.into_data().to_vec::<f32>().unwrap());
    out
}

/// The training-mode (autodiff) outputs and the `valid()` (inference) outputs.
fn train_and_infer(model: &BertForMaskedLM<A>) -> (Vec<f32>, Vec<f32>) {
    (outputs(model), outputs(&model.valid()))
}

#[test]
fn training_forward_drops_out_and_is_seeded() {
    let _rng = rng_lock();
    let device = Default::default();
    let model = BertForMaskedLM::<A>::init(&tiny().with_dropout(0.5), &device);
    // Fresh weights are initialised lazily, on first use, from the same generator as
    // the dropout masks: a first forward materialises them before seeding.
    outputs(&model);
    let run = |seed: u64| -> Vec<f32> {
        A::seed(&device, seed);
        outputs(&model)
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b, "same seed, same dropout masks");
    assert_ne!(a, c, "another seed, other masks");
    let (train, infer) = train_and_infer(&model);
    assert_ne!(train, infer, "dropout is active in training mode");
    // Inference ignores dropout: it equals the inference of the same weights without it.
    let without = model.clone().with_dropout(0.0);
    assert_eq!(without.bert.config.hidden_dropout_prob, 0.0);
    assert_eq!(train_and_infer(&without).1, infer);
}

#[test]
fn each_probability_is_applied() {
    let _rng = rng_lock();
    let device = Default::default();
    for (name, config) in [
        (
            "hidden_dropout_prob",
            BertConfig {
                hidden_dropout_prob: 0.5,
                ..tiny()
            },
        ),
        (
            "attention_probs_dropout_prob",
            BertConfig {
                attention_probs_dropout_prob: 0.5,
                ..tiny()
            },
        ),
    ] {
        A::seed(&device, 1);
        let model = BertForMaskedLM::<A>::init(&config, &device);
        let (train, infer) = train_and_infer(&model);
        assert_ne!(train, infer, "{name} has no effect");
    }
}

#[test]
fn zero_dropout_training_forward_equals_inference_exactly() {
    let _rng = rng_lock();
    let device = Default::default();
    let model = BertForMaskedLM::<A>::init(&tiny(), &device);
    let (train, infer) = train_and_infer(&model);
    assert_eq!(train, infer);
    let (train, infer) = train_and_infer(&model.with_dropout(0.0));
    assert_eq!(train, infer);
}

#[test]
fn dropout_adds_no_parameters() {
    let _rng = rng_lock();
    let device = Default::default();
    let plain = BertModel::<B>::init(&tiny(), &device);
    let dropped = BertModel::<B>::init(&tiny().with_dropout(0.3), &device);
    let paths = param_paths::<B, _>(&dropped);
    assert_eq!(paths, param_paths::<B, _>(&plain));
    assert_eq!(dropped.num_params(), plain.num_params());
    assert!(paths.iter().all(|p| !p.contains("drop")), "{paths:?}");
    // As many parameter tensors as the checkpoint has keys.
    let dir = scratch(SCRATCH, "keys");
    dropped
        .save(&dir, &SaveOptions::new("", FloatDType::F32))
        .unwrap();
    let keys = mics_hub::Checkpoint::open(dir.join("model.safetensors"))
        .unwrap()
        .keys();
    assert_eq!(paths.len(), keys.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn absent_fields_take_the_hugging_face_defaults() {
    let config: BertConfig = serde_json::from_value(json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
    }))
    .unwrap();
    assert_eq!(
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob
        ),
        (0.1, 0.1)
    );
    assert!(config.extra.is_empty(), "{:?}", config.extra);
    assert!(config.validate().is_ok());
}

#[test]
fn fields_are_read_as_fields_not_extra() {
    let config: BertConfig = serde_json::from_value(json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0,
        "classifier_dropout": null,
    }))
    .unwrap();
    assert_eq!(
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob
        ),
        (0.2, 0.0)
    );
    let extra: Vec<&String> = config.extra.keys().collect();
    assert_eq!(extra, ["classifier_dropout"]);
}

#[test]
fn with_dropout_sets_both_and_validate_checks_them() {
    let config = tiny();
    assert_eq!(
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob
        ),
        (0.0, 0.0)
    );
    let config = config.with_dropout(0.25);
    assert_eq!(
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob
        ),
        (0.25, 0.25)
    );
    for bad in [-0.1, 1.0, 1.5, f64::NAN] {
        let err = tiny().with_dropout(bad).validate().unwrap_err();
        assert!(err.contains("hidden_dropout_prob"), "{err}");
    }
    let err = BertConfig {
        attention_probs_dropout_prob: 1.0,
        ..tiny()
    }
    .validate()
    .unwrap_err();
    assert!(err.contains("attention_probs_dropout_prob"), "{err}");
}

#[test]
fn config_json_round_trip_keeps_the_dropout_fields() {
    let config = tiny().with_dropout(0.25);
    let value = serde_json::to_value(&config).unwrap();
    for key in ["hidden_dropout_prob", "attention_probs_dropout_prob"] {
        assert_eq!(value[key], 0.25, "{key}");
    }
    assert_eq!(serde_json::from_value::<BertConfig>(value).unwrap(), config);

    // Through save and load: written once each, read back into the model's layers.
    let _rng = rng_lock();
    let device = Default::default();
    let model = BertForMaskedLM::<B>::init(&config, &device);
    let dir = scratch(SCRATCH, "save");
    model.save(&dir, &SaveOptions::bert_mlm()).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for key in ["hidden_dropout_prob", "attention_probs_dropout_prob"] {
        assert_eq!(text.matches(&format!("\"{key}\"")).count(), 1, "{key}");
    }
    let saved: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(saved["attention_probs_dropout_prob"], 0.25);
    let (loaded, _) = BertForMaskedLM::<B>::load(&dir, &device).unwrap();
    let bert = &loaded.bert;
    assert_eq!(bert.config.hidden_dropout_prob, 0.25);
    assert!(bert.config.extra.get("hidden_dropout_prob").is_none());
    assert_eq!(bert.embeddings.dropout.prob, 0.25);
    let layer = &bert.layers[1];
    assert_eq!(layer.attention.probs_dropout.prob, 0.25);
    assert_eq!(layer.attention.output_dropout.prob, 0.25);
    assert_eq!(layer.output_dropout.prob, 0.25);
    std::fs::remove_dir_all(dir).unwrap();
}
