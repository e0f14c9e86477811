//! Llama against the independent numpy reference of `fixtures/make_tiny_llama.py`
//! (grouped-query attention, untied and tied LM heads, F32, F16 and BF16); the
//! hidden states and LM-head weight a fused loss would use; save/load round trips;
//! the errors for missing, misshapen and unexpected tensors and unsupported
//! configurations; training under Autodiff.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use mics_hub::{Checkpoint, CheckpointWriter, FloatDType, HubError, assets::asset_dir};
use mics_llama::{GenerateOptions, LlamaConfig, LlamaForCausalLM, SaveOptions};
use mics_plain::Plain;
use mics_test_support::{assert_every_parameter_has_a_gradient, scratch};
use serde_json::{Value, json};

/// The tag of this file's scratch directories.
const SCRATCH: &str = "llama-test";

type B = NdArray<f32>;
/// The autodiff backend of the training test: `Plain` keeps NdArray an
/// autodiff backend under Burn's `distributed` autodiff, which mics-backend
/// turns on in the workspace's builds (crates/plain).
type A = Autodiff<Plain<B>>;

const TOLERANCE: f32 = 1e-4;

fn fixture(variant: &str) -> PathBuf {
    asset_dir("tiny-llama")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(variant)
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_logits.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn reference_ids() -> Vec<u32> {
    reference()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn ids_tensor<X: Backend>(rows: &[&[u32]], device: &X::Device) -> Tensor<X, 2, Int> {
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&i| i as i64))
        .collect();
    let shape = [rows.len(), rows[0].len()];
    Tensor::from_data(TensorData::new(ids, shape), device)
}

fn logits(model: &LlamaForCausalLM<B>, ids: &[u32]) -> Vec<f32> {
    model
        .forward(ids_tensor::<B>(&[ids], &Default::default()))
        .into_data()
        .to_vec()
        .unwrap()
}

/// Largest deviation of the model's logits from the reference rows `expected`
/// (`[seq][vocab]`); the argmax of every row must agree.
fn compare(model: &LlamaForCausalLM<B>, ids: &[u32], expected: &Value) -> f32 {
    let vocab = model.config.vocab_size;
    let mut worst = 0.0f32;
    for (pos, row) in logits(model, ids).chunks(vocab).enumerate() {
        let want: Vec<f32> = expected[pos]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(want.len(), vocab);
        for (got, want) in row.iter().zip(&want) {
            worst = worst.max((got - want).abs());
        }
        let argmax = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(0, |b, (i, v)| if *v > r[b] { i } else { b })
        };
        assert_eq!(argmax(row), argmax(&want), "argmax at {pos}");
    }
    worst
}

#[test]
fn logits_match_numpy_reference_in_every_dtype_tied_and_untied() {
    let reference = reference();
    let ids = reference_ids();
    let device = Default::default();
    for (variant, dtype, key, buffers) in [
        ("untied", FloatDType::F32, "f32", 0),
        ("untied-f16", FloatDType::F16, "f16", 0),
        ("untied-bf16", FloatDType::BF16, "bf16", 2),
        ("tied", FloatDType::F32, "tied", 0),
    ] {
        let (model, report) = LlamaForCausalLM::<B>::load(fixture(variant), &device).unwrap();
        assert_eq!(report.dtype, dtype, "{variant}");
        assert_eq!(report.prefix, "model.", "{variant}");
        assert!(report.initialised.is_empty(), "{variant}: {report}");
        // Only the rotary inv_freq buffers of the BF16 file are left over.
        assert_eq!(report.ignored.len(), buffers, "{report}");
        assert!(
            report
                .ignored
                .iter()
                .all(|k| k.ends_with(".self_attn.rotary_emb.inv_freq"))
        );
        assert_eq!(model.lm_head.is_none(), variant == "tied");
        let worst = compare(&model, &ids, &reference[key]);
        eprintln!("{variant}: max |logit - reference| = {worst:e}");
        assert!(worst < TOLERANCE, "{variant}: deviation {worst}");
    }
}

#[test]
fn the_fixtures_exercise_grouped_query_attention_and_head_dim() {
    let device = Default::default();
    let (untied, _) = LlamaForCausalLM::<B>::load(fixture("untied"), &device).unwrap();
    let attn = &untied.model.layers[0].self_attn;
    assert_eq!((attn.num_heads, attn.num_key_value_heads), (4, 2));
    assert_eq!(attn.k_proj.weight.dims(), [32, 16]);
    let (tied, _) = LlamaForCausalLM::<B>::load(fixture("tied"), &device).unwrap();
    let attn = &tied.model.layers[0].self_attn;
    assert_eq!((attn.num_heads, attn.num_key_value_heads), (4, 1));
    assert_eq!(attn.head_dim, 16);
    assert_eq!(attn.q_proj.weight.dims(), [32, 64]);
    assert_eq!(tied.model.rotary_emb.theta, 500_000.0);
}

#[test]
fn forward_is_forward_hidden_times_lm_head_weight() {
    let device = Default::default();
    let ids = reference_ids();
    for variant in ["untied", "tied"] {
        let (model, _) = LlamaForCausalLM::<B>::load(fixture(variant), &device).unwrap();
        let weight = model.lm_head_weight();
        assert_eq!(weight.dims(), [101, 32], "{variant}");
        let hidden = model.forward_hidden(ids_tensor::<B>(&[&ids], &device));
        assert_eq!(hidden.dims(), [1, ids.len(), 32]);
        let manual: Vec<f32> = hidden
            .reshape([ids.len(), 32])
            .matmul(weight.transpose())
            .into_data()
            .to_vec()
            .unwrap();
        let direct = logits(&model, &ids);
        let worst = manual
            .iter()
            .zip(&direct)
            .fold(0.0f32, |w, (a, b)| w.max((a - b).abs()));
        assert!(worst < 1e-5, "{variant}: {worst}");
    }
}

#[test]
fn rows_of_a_batch_are_independent_and_attention_is_causal() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<B>::load(fixture("untied"), &device).unwrap();
    let a = reference_ids();
    let b: Vec<u32> = a.iter().rev().cloned().collect();
    let batch: Vec<f32> = model
        .forward(ids_tensor::<B>(&[&a, &b], &device))
        .into_data()
        .to_vec()
        .unwrap();
    let n = a.len() * 101;
    for (row, ids) in [(0, &a), (1, &b)] {
        let single = logits(&model, ids);
        let worst = batch[row * n..(row + 1) * n]
            .iter()
            .zip(&single)
            .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
        assert!(worst < 1e-5, "row {row}: {worst}");
    }
    // The logits of a prefix do not depend on the tokens after it.
    let prefix = logits(&model, &a[..5]);
    let full = logits(&model, &a);
    let worst = prefix
        .iter()
        .zip(&full[..prefix.len()])
        .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn save_load_round_trip_is_bit_exact_with_the_same_keys_shapes_and_dtypes() {
    let device = Default::default();
    for variant in ["untied", "untied-f16", "untied-bf16", "tied"] {
        let (model, report) = LlamaForCausalLM::<B>::load(fixture(variant), &device).unwrap();
        let out = scratch(SCRATCH, variant);
        model.save(&out, &SaveOptions::like(&report)).unwrap();
        let original = Checkpoint::open(fixture(variant).join("model.safetensors")).unwrap();
        let saved = Checkpoint::open(out.join("model.safetensors")).unwrap();
        // Every parameter written with its key, shape, dtype and exact value; only the
        // rotary buffers are left out (and the fixture's tied file has no lm_head).
        let expected_keys: Vec<String> = original
            .keys()
            .into_iter()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        assert_eq!(saved.keys(), expected_keys, "{variant}");
        assert_eq!(
            saved.contains("lm_head.weight"),
            variant != "tied",
            "{variant}"
        );
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
        let written: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(variant).join("config.json")).unwrap(),
        )
        .unwrap();
        // Every field of the original comes back with its value (numbers as numbers).
        for (field, value) in written.as_object().unwrap() {
            let back = &config[field];
            let same = match (value.as_f64(), back.as_f64()) {
                (Some(x), Some(y)) => x == y,
                _ => value == back,
            };
            assert!(same, "{variant}: {field} {value} became {back}");
        }
        assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
        let (reloaded, _) = LlamaForCausalLM::<B>::load(&out, &device).unwrap();
        let ids = [1, 2, 3, 50];
        assert_eq!(logits(&model, &ids), logits(&reloaded, &ids), "{variant}");
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn a_fresh_model_saves_and_loads_in_every_dtype() {
    let device = Default::default();
    let mut config = LlamaConfig::tiny(40, 16, 2, 4);
    config.num_key_value_heads = Some(2);
    config.tie_word_embeddings = true;
    let model = LlamaForCausalLM::<B>::init(&config, &device);
    let out = scratch(SCRATCH, "fresh");
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        model
            .save(&out, &SaveOptions::llama().with_dtype(dtype))
            .unwrap();
        let (loaded, report) = LlamaForCausalLM::<B>::load(&out, &device).unwrap();
        assert_eq!(report.dtype, dtype);
        assert_eq!(loaded.config, {
            let mut c = config.clone();
            c.extra
                .insert("architectures".into(), json!(["LlamaForCausalLM"]));
            c.extra.insert(
                "torch_dtype".into(),
                json!(match dtype {
                    FloatDType::F32 => "float32",
                    FloatDType::F16 => "float16",
                    FloatDType::BF16 => "bfloat16",
                }),
            );
            c
        });
        let (a, b) = (logits(&model, &[1, 2, 3]), logits(&loaded, &[1, 2, 3]));
        if dtype == FloatDType::F32 {
            assert_eq!(a, b);
        } else {
            let worst = a
                .iter()
                .zip(&b)
                .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
            assert!(worst < 1e-2, "{dtype}: {worst}");
        }
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn init_follows_hugging_face() {
    let device = Default::default();
    let mut config = LlamaConfig::tiny(40, 16, 2, 4);
    config.num_key_value_heads = Some(2);
    let model = LlamaForCausalLM::<B>::init(&config, &device);
    // embed + per layer (2 norms, q, k, v, o, gate, up, down) + norm + lm_head.
    let (d, kv, ff) = (16, 8, 64);
    let layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * ff;
    assert_eq!(model.num_params(), 40 * d + 2 * layer + d + 40 * d);
    let ones: Vec<f32> = model.model.layers[1]
        .post_attention_layernorm
        .weight
        .val()
        .into_data()
        .to_vec()
        .unwrap();
    assert!(ones.iter().all(|&v| v == 1.0));
    let w: Vec<f32> = model.model.layers[0]
        .mlp
        .up_proj
        .weight
        .val()
        .into_data()
        .to_vec()
        .unwrap();
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&std), "std {std}");
    assert!(model.model.layers[0].mlp.up_proj.bias.is_none());
    config.tie_word_embeddings = true;
    let tied = LlamaForCausalLM::<B>::init(&config, &device);
    assert!(tied.lm_head.is_none());
    assert_eq!(tied.num_params(), model.num_params() - 40 * d);
}

/// The untied fixture's tensors, for editing.
fn untied_writer() -> (LlamaForCausalLM<B>, CheckpointWriter) {
    let (model, _) = LlamaForCausalLM::<B>::load(fixture("untied"), &Default::default()).unwrap();
    let mut writer = CheckpointWriter::new(FloatDType::F32);
    model.write_tensors(&mut writer);
    (model, writer)
}

fn load_edited(
    writer: &CheckpointWriter,
    config: &LlamaConfig,
) -> Result<(LlamaForCausalLM<B>, mics_hub::LoadReport), HubError> {
    let path = PathBuf::from("edited.safetensors");
    let ckpt = Checkpoint::from_bytes(&path, writer.to_bytes().unwrap()).unwrap();
    LlamaForCausalLM::<B>::from_checkpoint(&ckpt, config, &Default::default())
}

fn assert_names(err: &HubError, key: &str) {
    let message = err.to_string();
    assert!(
        message.contains("edited.safetensors") && message.contains(key),
        "{message}"
    );
}

#[test]
fn missing_misshapen_and_unexpected_tensors_are_errors_naming_file_and_key() {
    let key = "model.layers.1.mlp.down_proj.weight";
    let (model, mut writer) = untied_writer();
    assert!(writer.remove(key));
    let err = load_edited(&writer, &model.config).unwrap_err();
    assert!(
        matches!(&err, HubError::MissingKey { key: k, expected, .. } if k == key && expected == &[32, 48]),
        "{err}"
    );
    assert_names(&err, key);

    // An untied model needs its lm_head.
    let (model, mut writer) = untied_writer();
    writer.remove("lm_head.weight");
    let err = load_edited(&writer, &model.config).unwrap_err();
    assert!(
        matches!(&err, HubError::MissingKey { key, .. } if key == "lm_head.weight"),
        "{err}"
    );

    // k_proj as wide as q_proj: a file for more key/value heads than config.json says.
    let key = "model.layers.0.self_attn.k_proj.weight";
    let (model, mut writer) = untied_writer();
    writer.add_f32(key, &[32, 32], &[0.0; 32 * 32]);
    let err = load_edited(&writer, &model.config).unwrap_err();
    assert!(
        matches!(&err, HubError::Shape { key: k, expected, found, .. }
            if k == key && expected == &[16, 32] && found == &[32, 32]),
        "{err}"
    );
    assert_names(&err, key);

    // A bias the configuration does not have would silently be dropped: refused.
    let key = "model.layers.0.self_attn.q_proj.bias";
    let (model, mut writer) = untied_writer();
    writer.add_f32(key, &[32], &[0.5; 32]);
    let err = load_edited(&writer, &model.config).unwrap_err();
    assert!(
        matches!(&err, HubError::Value { key: k, .. } if k == key),
        "{err}"
    );
    assert_names(&err, key);
    assert!(err.to_string().contains("unexpected"), "{err}");

    // Rotary buffers are not parameters: ignored and reported.
    let (model, mut writer) = untied_writer();
    let buffer = "model.layers.1.self_attn.rotary_emb.inv_freq";
    writer.add_f32(buffer, &[4], &[1.0, 0.1, 0.01, 0.001]);
    let (_, report) = load_edited(&writer, &model.config).unwrap();
    assert_eq!(report.ignored, [buffer]);
}

#[test]
fn a_tied_checkpoint_may_hold_lm_head_only_equal_to_the_embeddings() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<B>::load(fixture("tied"), &device).unwrap();
    let mut writer = CheckpointWriter::new(FloatDType::F32);
    model.write_tensors(&mut writer);
    let embed = model.model.embed_tokens.weight.val();
    writer.add("lm_head.weight", embed.clone());
    let (loaded, report) = load_edited(&writer, &model.config).unwrap();
    assert!(report.ignored.is_empty(), "{report}");
    assert!(loaded.lm_head.is_none());
    writer.add("lm_head.weight", embed.add_scalar(1.0));
    let err = load_edited(&writer, &model.config).unwrap_err();
    assert!(
        matches!(&err, HubError::Value { key, .. } if key == "lm_head.weight"),
        "{err}"
    );
    assert_names(&err, "lm_head.weight");
}

/// Loads the untied fixture with its `config.json` changed by `edit`.
fn load_with_config(name: &str, edit: impl FnOnce(&mut Value)) -> Result<(), HubError> {
    let dir = scratch(SCRATCH, name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("untied").join("config.json")).unwrap(),
    )
    .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture("untied").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let result = LlamaForCausalLM::<B>::load(&dir, &Default::default()).map(|_| ());
    std::fs::remove_dir_all(dir).unwrap();
    result
}

#[test]
fn unsupported_configurations_are_clear_errors_naming_config_json() {
    for (name, field, value, expected) in [
        ("act", "hidden_act", json!("gelu"), "hidden_act `gelu`"),
        (
            "scaling",
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
            "rope_scaling",
        ),
        ("attn-bias", "attention_bias", json!(true), "no biases"),
        ("mlp-bias", "mlp_bias", json!(true), "no biases"),
        ("dropout", "attention_dropout", json!(0.1), "no dropout"),
        (
            "kv-heads",
            "num_key_value_heads",
            json!(3),
            "not a multiple of num_key_value_heads 3",
        ),
        (
            "rope-parameters",
            "rope_parameters",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_parameters",
        ),
    ] {
        let err = load_with_config(name, |c| {
            c[field] = value;
        })
        .unwrap_err();
        assert!(matches!(err, HubError::Config { .. }), "{name}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("config.json") && message.contains(expected),
            "{name}: {message}"
        );
    }
    // Explicitly harmless values load.
    load_with_config("harmless", |c| {
        c["rope_scaling"] = Value::Null;
        c["attention_bias"] = json!(false);
        c["attention_dropout"] = json!(0);
    })
    .unwrap();
}

#[test]
fn config_defaults_and_transformers_5_rope_parameters() {
    let config = LlamaConfig::from_json(json!({
        "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2,
    }))
    .unwrap();
    config.validate().unwrap();
    assert_eq!(config.kv_heads(), 2);
    assert_eq!(config.head_dim(), 4);
    assert_eq!(config.rope_theta, 10_000.0);
    assert!(!config.tie_word_embeddings);
    assert_eq!(config.hidden_act, "silu");
    assert_eq!(config.rope_scaling, None);
    // transformers 5 keeps the RoPE base in `rope_parameters`.
    let config = LlamaConfig::from_json(json!({
        "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    }))
    .unwrap();
    config.validate().unwrap();
    assert_eq!(config.rope_theta, 500_000.0);
}

#[test]
fn generation_is_greedy_at_temperature_zero() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<B>::load(fixture("untied"), &device).unwrap();
    let prompt = [1, 17, 42];
    let greedy = GenerateOptions {
        max_new_tokens: 4,
        temperature: 0.0,
        top_k: None,
        seed: 0,
    };
    let out = model.generate(&prompt, &greedy, &device);
    assert_eq!(out.len(), 4);
    let mut context = prompt.to_vec();
    for &token in &out {
        let all = logits(&model, &context);
        let last = &all[(context.len() - 1) * 101..];
        let argmax = last
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
        assert_eq!(token as usize, argmax);
        context.push(token);
    }
}

#[test]
fn one_backward_pass_gives_every_parameter_a_finite_gradient() {
    let device = Default::default();
    for tied in [false, true] {
        let mut config = LlamaConfig::tiny(50, 16, 2, 4);
        config.num_key_value_heads = Some(2);
        config.tie_word_embeddings = tied;
        let model = LlamaForCausalLM::<A>::init(&config, &device);
        let ids: Vec<i64> = (0..12).map(|i| (i * 7 % 50) as i64).collect();
        let input = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [2, 6]), &device);
        let loss = burn::tensor::activation::log_softmax(model.forward(input), 2)
            .mean()
            .neg();
        let grads = loss.backward();
        let seen = assert_every_parameter_has_a_gradient(&model, &grads);
        assert_eq!(seen, model.num_params(), "tied {tied}");
    }
}

#[test]
fn generated_fixture_matches_the_committed_reference() {
    // The cached files come from the committed script: if the script changes, the
    // committed reference must be regenerated with it (`--reference`).
    let path = asset_dir("tiny-llama")
        .unwrap_or_else(|e| panic!("{e}"))
        .join("reference.json");
    let generated: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(
        generated == reference(),
        "rerun make_tiny_llama.py into $MICS_CACHE/tiny-llama"
    );
}
