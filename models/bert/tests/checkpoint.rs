//! BERT checkpoints: layouts with and without the `bert.` prefix and optional parts,
//! bit-exact save/load round trips in F32/F16/BF16, and every malformed-file error.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Int, Tensor, TensorData};
use mics_bert::{BertConfig, BertForMaskedLM, BertModel, SaveOptions};
use mics_hub::checkpoint::Dtype;
use mics_hub::{Checkpoint, CheckpointWriter, FloatDType, HubError, LoadReport};
use mics_plain::Plain;
use mics_test_support::{assert_every_parameter_has_a_gradient, scratch};

/// The tag of this file's scratch directories.
const SCRATCH: &str = "bert-test";

type B = NdArray<f32>;

fn config() -> BertConfig {
    BertConfig::tiny(40, 16, 2, 4)
}

fn ids() -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = vec![2, 5, 9, 13, 0, 7, 39, 1];
    Tensor::from_data(TensorData::new(ids, [2, 4]), &Default::default())
}

fn mlm_logits(model: &BertForMaskedLM<B>) -> Vec<f32> {
    model.forward(ids(), None).into_data().to_vec().unwrap()
}

/// All parameters of a module as bit patterns, in visiting order.
fn param_bits<M: Module<B>>(module: &M) -> Vec<Vec<u32>> {
    struct Collect(Vec<Vec<u32>>);
    impl ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v: Vec<f32> = param.val().into_data().to_vec().unwrap();
            self.0.push(v.iter().map(|x| x.to_bits()).collect());
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

/// A masked-LM checkpoint (prefix `bert.`) as a writer, for tests to edit.
fn writer(model: &BertForMaskedLM<B>, dtype: FloatDType) -> CheckpointWriter {
    let dir = scratch(SCRATCH, &format!("writer-{dtype}"));
    model
        .save(&dir, &SaveOptions::bert_mlm().with_dtype(dtype))
        .unwrap();
    let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let mut w = CheckpointWriter::new(dtype);
    for key in ckpt.keys() {
        let shape = ckpt.shape(&key).unwrap();
        w.add_f32(key.clone(), &shape, &ckpt.read_f32(&key, &shape).unwrap());
    }
    std::fs::remove_dir_all(dir).unwrap();
    w
}

fn load_bytes(name: &str, bytes: Vec<u8>) -> Result<(BertForMaskedLM<B>, LoadReport), HubError> {
    let dir = scratch(SCRATCH, name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&config()).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let result = BertForMaskedLM::<B>::load(&dir, &Default::default());
    std::fs::remove_dir_all(dir).unwrap();
    result
}

#[test]
fn round_trip_is_bit_exact_in_every_dtype() {
    let device = Default::default();
    let model = BertForMaskedLM::<B>::init(&config(), &device);
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        // First save rounds to the dtype; from then on save -> load is the identity.
        let first = scratch(SCRATCH, &format!("first-{dtype}"));
        model
            .save(&first, &SaveOptions::bert_mlm().with_dtype(dtype))
            .unwrap();
        let (loaded, report) = BertForMaskedLM::<B>::load(&first, &device).unwrap();
        assert_eq!(report.dtype, dtype);
        assert_eq!(report.prefix, "bert.");
        assert!(
            report.initialised.is_empty() && report.ignored.is_empty(),
            "{report}"
        );
        let second = scratch(SCRATCH, &format!("second-{dtype}"));
        loaded.save(&second, &SaveOptions::like(&report)).unwrap();
        let (again, _) = BertForMaskedLM::<B>::load(&second, &device).unwrap();
        assert_eq!(param_bits(&loaded), param_bits(&again), "{dtype}");
        assert_eq!(mlm_logits(&loaded), mlm_logits(&again));
        // Same bytes on disk, and the same keys, shapes and dtypes as a
        // transformers BertForMaskedLM file.
        let a = std::fs::read(first.join("model.safetensors")).unwrap();
        let b = std::fs::read(second.join("model.safetensors")).unwrap();
        assert!(a == b, "{dtype}: files differ");
        let ckpt = Checkpoint::open(second.join("model.safetensors")).unwrap();
        assert_eq!(
            ckpt.shape("bert.encoder.layer.1.intermediate.dense.weight")
                .unwrap(),
            [64, 16]
        );
        assert_eq!(ckpt.dtype("cls.predictions.bias"), Some(dtype));
        assert_eq!(ckpt.keys().len(), 5 + 2 * 16 + 2 + 5);
        if dtype == FloatDType::F32 {
            assert_eq!(param_bits(&model), param_bits(&loaded));
        }
        std::fs::remove_dir_all(first).unwrap();
        std::fs::remove_dir_all(second).unwrap();
    }
}

#[test]
fn base_model_file_without_prefix_pooler_or_head_loads_and_reports() {
    let device = Default::default();
    let model = BertForMaskedLM::<B>::init(&config(), &device);
    let mut w = CheckpointWriter::new(FloatDType::F32);
    model.bert.write_tensors(&mut w, "");
    w.remove("pooler.dense.weight");
    w.remove("pooler.dense.bias");
    // An old-style buffer, ignored and reported.
    w.add_raw(
        "embeddings.position_ids",
        Dtype::I64,
        &[1, 64],
        vec![0; 8 * 64],
    );
    let (loaded, report) = load_bytes("no-prefix", w.to_bytes().unwrap()).unwrap();
    assert_eq!(report.prefix, "");
    assert_eq!(report.initialised.len(), 2, "{report}");
    assert!(report.initialised[0].contains("pooler"), "{report}");
    assert!(
        report.initialised[1].contains("cls.predictions"),
        "{report}"
    );
    assert_eq!(report.ignored, ["embeddings.position_ids"]);
    let text = report.to_string();
    assert!(
        text.contains("pooler") && text.contains("masked-LM head"),
        "{text}"
    );
    // The encoder came from the file; the missing parts are initialised, not zero.
    assert_eq!(
        param_bits(&model.bert.layers[1]),
        param_bits(&loaded.bert.layers[1])
    );
    let pooler: Vec<f32> = loaded
        .bert
        .pooler
        .weight
        .val()
        .into_data()
        .to_vec()
        .unwrap();
    assert!(pooler.iter().any(|v| *v != 0.0));
    let dense: Vec<f32> = loaded.head.dense.weight.val().into_data().to_vec().unwrap();
    assert!(dense.iter().any(|v| *v != 0.0));
    // The base model loads the same file through BertModel as well.
    let dir = scratch(SCRATCH, "base");
    loaded.bert.save(&dir, &SaveOptions::like(&report)).unwrap();
    let (base, report) = BertModel::<B>::load(&dir, &device).unwrap();
    assert!(
        report.initialised.is_empty() && report.ignored.is_empty(),
        "{report}"
    );
    assert_eq!(param_bits(&base), param_bits(&loaded.bert));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn legacy_layer_norm_names_load() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let mut w = writer(&model, FloatDType::F32);
    let ckpt = Checkpoint::from_bytes("x", w.to_bytes().unwrap()).unwrap();
    for key in ckpt.keys().into_iter().filter(|k| k.contains("LayerNorm")) {
        let values = ckpt.read_f32(&key, &ckpt.shape(&key).unwrap()).unwrap();
        w.remove(&key);
        let legacy = key.replace(".weight", ".gamma").replace(".bias", ".beta");
        w.add_f32(legacy, &[16], &values);
    }
    let (loaded, report) = load_bytes("legacy", w.to_bytes().unwrap()).unwrap();
    assert!(
        report.ignored.is_empty() && report.initialised.is_empty(),
        "{report}"
    );
    assert_eq!(param_bits(&loaded), param_bits(&model));
}

fn expect_error(name: &str, bytes: Vec<u8>) -> String {
    let err = load_bytes(name, bytes).map(|_| ()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("model.safetensors"),
        "no file named: {message}"
    );
    message
}

#[test]
fn missing_key_names_file_key_and_shape() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let mut w = writer(&model, FloatDType::F32);
    w.remove("bert.encoder.layer.1.attention.self.key.weight");
    let message = expect_error("missing", w.to_bytes().unwrap());
    assert!(
        message.contains("missing tensor `bert.encoder.layer.1.attention.self.key.weight`"),
        "{message}"
    );
    assert!(message.contains("[16, 16]"), "{message}");
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let mut w = writer(&model, FloatDType::F32);
    w.add_f32(
        "bert.encoder.layer.0.intermediate.dense.weight",
        &[16, 64],
        &[0.5; 1024],
    );
    let message = expect_error("shape", w.to_bytes().unwrap());
    assert!(
        message.contains(
            "`bert.encoder.layer.0.intermediate.dense.weight` has shape [16, 64], expected [64, 16]"
        ),
        "{message}"
    );
}

#[test]
fn wrong_dtype_names_found_dtype() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let mut w = writer(&model, FloatDType::F32);
    w.add_raw(
        "bert.embeddings.LayerNorm.weight",
        Dtype::I32,
        &[16],
        vec![0; 64],
    );
    let message = expect_error("dtype", w.to_bytes().unwrap());
    assert!(
        message.contains(
            "`bert.embeddings.LayerNorm.weight` has dtype I32, expected F32, F16 or BF16"
        ),
        "{message}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let bytes = writer(&model, FloatDType::F32).to_bytes().unwrap();
    // Cut in the data, in the header, and before the header length.
    let message = expect_error("trunc-data", bytes[..bytes.len() - 10].to_vec());
    assert!(message.contains("truncated"), "{message}");
    let message = expect_error("trunc-header", bytes[..100].to_vec());
    assert!(
        message.contains("corrupt") && message.contains("past the end"),
        "{message}"
    );
    let message = expect_error("trunc-len", bytes[..5].to_vec());
    assert!(message.contains("corrupt"), "{message}");
    // A header that is not JSON.
    let mut garbage = bytes.clone();
    garbage[8..20].copy_from_slice(b"not json!!!!");
    let message = expect_error("garbage", garbage);
    assert!(message.contains("corrupt"), "{message}");
    // Offsets that do not match the shapes.
    let mut w = CheckpointWriter::new(FloatDType::F32);
    w.add_f32("a", &[2], &[1.0, 2.0]);
    let good = w.to_bytes().unwrap();
    let text = String::from_utf8_lossy(&good).replace("[0,8]", "[0,4]");
    let message = expect_error("offsets", text.into_bytes());
    assert!(message.contains("corrupt"), "{message}");
}

#[test]
fn header_too_large_is_an_error_not_an_allocation() {
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = load_bytes("huge", bytes).map(|_| ()).unwrap_err();
    assert!(matches!(err, HubError::HeaderTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("larger than the limit"), "{err}");
}

#[test]
fn untied_decoder_is_rejected() {
    let model = BertForMaskedLM::<B>::init(&config(), &Default::default());
    let mut w = writer(&model, FloatDType::F32);
    w.add_f32("cls.predictions.decoder.weight", &[40, 16], &[0.25; 640]);
    let message = expect_error("untied", w.to_bytes().unwrap());
    assert!(
        message.contains("cls.predictions.decoder.weight"),
        "{message}"
    );
    // A tied copy (what older transformers versions write) is accepted.
    let mut w = writer(&model, FloatDType::F32);
    w.add(
        "cls.predictions.decoder.weight",
        model.bert.embeddings.word_embeddings.weight.val(),
    );
    load_bytes("tied", w.to_bytes().unwrap()).unwrap();
}

#[test]
fn missing_config_and_bad_config_are_errors() {
    let dir = scratch(SCRATCH, "config");
    std::fs::create_dir_all(&dir).unwrap();
    let err = BertModel::<B>::load(&dir, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"vocab_size": 10}"#).unwrap();
    let err = BertModel::<B>::load(&dir, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn padding_does_not_change_real_positions() {
    let device = Default::default();
    let model = BertModel::<B>::init(&config(), &device);
    let one: Vec<f32> = model
        .sentence_embeddings(
            Tensor::from_data(TensorData::new(vec![2i64, 5, 9], [1, 3]), &device),
            Tensor::ones([1, 3], &device),
        )
        .into_data()
        .to_vec()
        .unwrap();
    let padded: Vec<f32> = model
        .sentence_embeddings(
            Tensor::from_data(TensorData::new(vec![2i64, 5, 9, 0, 0], [1, 5]), &device),
            Tensor::from_data(TensorData::new(vec![1i64, 1, 1, 0, 0], [1, 5]), &device),
        )
        .into_data()
        .to_vec()
        .unwrap();
    let diff = one
        .iter()
        .zip(&padded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-6, "{diff}");
    let norm: f32 = one.iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn one_backward_pass_gives_every_parameter_a_gradient() {
    // An autodiff backend whether or not Burn's `distributed` autodiff
    // feature is on in this build (crates/plain).
    type A = Autodiff<Plain<B>>;
    let device = Default::default();
    let model = BertForMaskedLM::<A>::init(&config(), &device);
    let input = Tensor::<A, 2, Int>::from_data(
        TensorData::new(vec![2i64, 5, 9, 13, 0, 7, 39, 1], [2, 4]),
        &device,
    );
    let mask = Tensor::<A, 2, Int>::from_data(
        TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 0], [2, 4]),
        &device,
    );
    let mlm = model.forward(input.clone(), Some(mask.clone()));
    let out = model.bert.forward(input, Some(mask), None);
    // MLM loss plus a pooler term, so that every parameter takes part.
    let loss = burn::tensor::activation::log_softmax(mlm, 2).mean().neg()
        + out.pooled.powi_scalar(2).mean();
    let grads = loss.backward();
    let seen = assert_every_parameter_has_a_gradient(&model, &grads);
    assert_eq!(seen, model.num_params());
}
