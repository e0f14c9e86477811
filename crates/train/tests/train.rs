//! The trainer end to end on a tiny GPT-2 / BERT / Llama and a few KB of
//! Shakespeare: parity of (N, p, k, s) against one process (losses and every
//! exported parameter, AdamW and SGD), exact resume (resuming on another
//! topology: `faults.rs`),
//! untouched unused parameters, and export.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Shape, config, scratch, shape, train};
use mics_train::{Device, TrainSummary, export, read_metrics};
use safetensors::SafeTensors;

fn relative_error(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// The largest relative difference of the step losses and the final
/// validation loss of `run` against `reference`; fails above 1e-4.
fn compare(label: &str, reference: &TrainSummary, run: &TrainSummary) -> f64 {
    assert_eq!(reference.losses.len(), run.losses.len(), "{label}");
    let mut worst = 0.0f64;
    for (step, (a, b)) in reference.losses.iter().zip(&run.losses).enumerate() {
        let e = relative_error(*a, *b);
        assert!(
            e <= 1e-4,
            "{label}: step {} loss {b} vs {a} (relative {e:e})",
            step + 1
        );
        worst = worst.max(e);
    }
    let (a, b) = (reference.val_loss.unwrap(), run.val_loss.unwrap());
    let e = relative_error(a, b);
    assert!(e <= 1e-4, "{label}: validation loss {b} vs {a} ({e:e})");
    worst = worst.max(e);
    eprintln!("{label}: max relative error {worst:e}");
    worst
}

#[test]
fn gpt2_losses_match_one_process_for_every_partitioning() {
    let dir = scratch("parity-gpt2");
    let steps = 20;
    // The same global batch of 8 sequences each step.
    let runs = [
        ("N=1 b=4 s=2", shape(1, 1, None, 4, 2)),
        ("N=4 p=2 b=1 s=2", shape(4, 2, None, 1, 2)),
        ("N=4 k=2 p=4 b=2 s=1", shape(4, 4, Some(2), 2, 1)),
    ];
    let summaries: Vec<TrainSummary> = runs
        .iter()
        .enumerate()
        .map(|(i, (_, sh))| {
            let out = dir.join(format!("run{i}"));
            train(&config("gpt2", &out, *sh, steps, ""), None).unwrap()
        })
        .collect();
    let reference = &summaries[0];
    assert_eq!(reference.losses.len(), steps as usize);
    let (first, last) = (reference.losses[0], *reference.losses.last().unwrap());
    assert!(
        last < first - 1.0,
        "the model does not learn: loss {first} -> {last}"
    );
    assert!(reference.val_loss.unwrap() < first - 1.0);
    let mut worst = 0.0f64;
    for ((label, _), summary) in runs.iter().zip(&summaries).skip(1) {
        worst = worst.max(compare(label, reference, summary));
    }
    eprintln!("gpt2 parity over {steps} steps: max relative error {worst:e}");
    // Every exported tensor of N = 1 and N = 4, p = 2, s = 2. AdamW
    // normalises each update to about ±lr whatever the gradient's size, so
    // a gradient near zero whose float summation order differs between
    // topologies can move its element by up to 2·lr the other way: the
    // tolerance is looser than the losses' (SGD, below, is held to 1e-5).
    let worst = compare_exports(&dir, &dir.join("run0"), &dir.join("run1"), 1e-3);
    eprintln!("gpt2 exported parameters, N=4 p=2 s=2 vs N=1: max relative error {worst:e}");
}

/// Exports two runs and compares every tensor of the two exports (max
/// |Δ| / max |value| per tensor); returns the worst.
fn compare_exports(dir: &Path, a: &Path, b: &Path, tol: f64) -> f64 {
    let (ea, eb) = (dir.join("export-a"), dir.join("export-b"));
    export(a, &ea, Device::Cpu).unwrap();
    export(b, &eb, Device::Cpu).unwrap();
    let (ta, tb) = (tensors(&ea), tensors(&eb));
    assert_eq!(
        ta.keys().collect::<std::collections::BTreeSet<_>>(),
        tb.keys().collect(),
        "the exports hold different tensors"
    );
    let mut worst = 0.0f64;
    for (key, x) in &ta {
        let y = &tb[key];
        assert_eq!(x.len(), y.len(), "{key}");
        let scale = x
            .iter()
            .fold(0f64, |m, v| m.max(f64::from(v.abs())))
            .max(1e-12);
        let diff = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        let e = diff / scale;
        assert!(e <= tol, "{key}: relative error {e:e}");
        worst = worst.max(e);
    }
    worst
}

/// Every f32 tensor of a `model.safetensors` (integer buffers such as
/// BERT's `position_ids` left out).
fn tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, view)| view.dtype() == safetensors::Dtype::F32)
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect()
}

/// SGD's update is the gradient times the learning rate, so a gradient
/// scaled wrongly (by the world size, the accumulation steps, the loss
/// scale) shows in the parameters at once; AdamW normalises it away.
#[test]
fn sgd_training_matches_one_process() {
    let dir = scratch("parity-sgd");
    let steps = 8;
    let sgd = |name: &str, sh: Shape| {
        let mut c = config("gpt2", &dir.join(name), sh, steps, "optimizer = \"sgd\"");
        c.train.momentum = 0.9;
        c.train.lr = 0.5;
        c.train.min_lr = 0.05;
        train(&c, None).unwrap()
    };
    let one = sgd("one", shape(1, 1, None, 4, 2));
    let four = sgd("four", shape(4, 2, None, 1, 2));
    let (first, last) = (one.losses[0], *one.losses.last().unwrap());
    assert!(last < first, "SGD does not learn: {first} -> {last}");
    compare("sgd N=4 p=2 s=2", &one, &four);
    let worst = compare_exports(&dir, &dir.join("one"), &dir.join("four"), 1e-5);
    eprintln!("sgd exported parameters: max relative error {worst:e}");
}

#[test]
fn llama_losses_and_parameters_match_one_process() {
    let dir = scratch("parity-llama");
    let steps = 10;
    let one = train(
        &config(
            "llama",
            &dir.join("one"),
            shape(1, 1, None, 4, 1),
            steps,
            "",
        ),
        None,
    )
    .unwrap();
    let two = train(
        &config(
            "llama",
            &dir.join("two"),
            shape(4, 2, None, 1, 1),
            steps,
            "",
        ),
        None,
    )
    .unwrap();
    let (first, last) = (one.losses[0], *one.losses.last().unwrap());
    assert!(
        last < first - 0.5,
        "the Llama model does not learn: {first} -> {last}"
    );
    compare("llama N=4 p=2", &one, &two);
    // AdamW: see the GPT-2 parity test for the tolerance.
    let worst = compare_exports(&dir, &dir.join("one"), &dir.join("two"), 1e-3);
    eprintln!("llama exported parameters: max relative error {worst:e}");
}

#[test]
fn bert_mlm_losses_match_one_process() {
    let dir = scratch("parity-bert");
    let steps = 5;
    let one = train(
        &config("bert", &dir.join("one"), shape(1, 1, None, 4, 1), steps, ""),
        None,
    )
    .unwrap();
    let two = train(
        &config("bert", &dir.join("two"), shape(2, 2, None, 2, 1), steps, ""),
        None,
    )
    .unwrap();
    assert_eq!(one.losses.len(), steps as usize);
    assert!(one.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let worst = compare("bert N=2 p=2", &one, &two);
    eprintln!("bert parity over {steps} steps: max relative error {worst:e}");
}

/// Metrics lines as JSON objects without the timing field.
fn metrics_without_timing(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = scratch("resume");
    let sh = shape(2, 2, None, 2, 2);
    // A constant learning rate after warm-up: the cosine decay runs to
    // train.steps, so a run told `steps = 10` decays faster than one of 20
    // (resuming within one schedule is the next test).
    let extra = "checkpoint_every = 10\neval_every = 5\nmin_lr = 0.01";
    let whole_dir = dir.join("whole");
    let whole = train(&config("gpt2", &whole_dir, sh, 20, extra), None).unwrap();
    assert_eq!(whole.losses.len(), 20);

    let split_dir = dir.join("split");
    let first = train(&config("gpt2", &split_dir, sh, 10, extra), None).unwrap();
    assert_eq!(first.losses[..], whole.losses[..10]);
    let second = train(&config("gpt2", &split_dir, sh, 20, extra), Some(&split_dir)).unwrap();
    assert_eq!(second.start_step, 10);
    assert_eq!(second.steps, 20);
    // `==` on f64: bit for bit.
    assert_eq!(second.losses[..], whole.losses[10..]);
    assert_eq!(second.val_loss, whole.val_loss);

    let (a, b) = (
        metrics_without_timing(&whole.metrics),
        metrics_without_timing(&second.metrics),
    );
    assert_eq!(a.len(), 20 + 4, "20 steps and 4 evaluations");
    assert_eq!(a, b);
    // The parsed metrics agree with the summary (to the last bit or so:
    // serde_json's default float parsing is not always correctly rounded).
    let parsed: Vec<f64> = read_metrics(&second.metrics)
        .unwrap()
        .iter()
        .filter_map(|m| m.loss)
        .collect();
    assert_eq!(parsed.len(), 20);
    for (a, b) in parsed[10..].iter().zip(&second.losses) {
        assert!(relative_error(*a, *b) < 1e-15, "{a} vs {b}");
    }

    let (ca, cb) = (whole.checkpoint.unwrap(), second.checkpoint.unwrap());
    assert!(ca.ends_with("step-000020") && cb.ends_with("step-000020"));
    for rank in 0..2 {
        let name = format!("rank-{rank:05}.safetensors");
        let (fa, fb) = (
            std::fs::read(ca.join(&name)).unwrap(),
            std::fs::read(cb.join(&name)).unwrap(),
        );
        assert!(fa == fb, "{name} differs between the two runs");
    }
}

#[test]
fn resuming_from_a_mid_run_checkpoint_continues_the_schedule() {
    let dir = scratch("resume-cosine");
    let sh = shape(2, 2, None, 2, 2);
    let extra = "checkpoint_every = 10";
    let whole = train(&config("gpt2", &dir.join("whole"), sh, 20, extra), None).unwrap();
    let middle = dir.join("whole/checkpoints/step-000010");
    let rest_dir = dir.join("rest");
    let rest = train(&config("gpt2", &rest_dir, sh, 20, extra), Some(&middle)).unwrap();
    assert_eq!(rest.start_step, 10);
    assert_eq!(rest.losses[..], whole.losses[10..]);
    assert_eq!(rest.val_loss, whole.val_loss);
    for rank in 0..2 {
        let name = format!("rank-{rank:05}.safetensors");
        let (fa, fb) = (
            std::fs::read(whole.checkpoint.as_ref().unwrap().join(&name)).unwrap(),
            std::fs::read(rest.checkpoint.as_ref().unwrap().join(&name)).unwrap(),
        );
        assert!(fa == fb, "{name} differs between the two runs");
    }
}

/// Every float parameter of a module by its module path.
struct Collect<B: Backend> {
    path: Vec<String>,
    values: HashMap<String, Vec<f32>>,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param.val().into_data().to_vec::<f32>().unwrap();
        self.values.insert(self.path.join("."), values);
    }
}

/// `param.<path>` shards of one rank file.
fn rank_shards(file: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let path = name.strip_prefix("param.")?.to_string();
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Some((path, values))
        })
        .collect()
}

#[test]
fn export_writes_the_concatenated_shards_in_hugging_face_layout() {
    let dir = scratch("export");
    let out = dir.join("run");
    let (world, p) = (4, 2);
    let summary = train(
        &config("gpt2", &out, shape(world, p, None, 1, 1), 3, ""),
        None,
    )
    .unwrap();
    let ckpt = summary.checkpoint.unwrap();
    let exported = dir.join("hf");
    assert_eq!(export(&out, &exported, Device::Cpu).unwrap(), ckpt);
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(exported.join(file).is_file(), "{file}");
    }

    let device = Default::default();
    let (model, _) = mics_gpt::Gpt2LMHeadModel::<NdArray>::load(&exported, &device).unwrap();
    let mut collect = Collect::<NdArray> {
        path: Vec::new(),
        values: HashMap::new(),
        _b: std::marker::PhantomData,
    };
    model.visit(&mut collect);
    let loaded = collect.values;

    let ranks: Vec<HashMap<String, Vec<f32>>> = (0..world)
        .map(|r| rank_shards(&ckpt.join(format!("rank-{r:05}.safetensors"))))
        .collect();
    assert_eq!(ranks[0].len(), loaded.len(), "parameters in the rank files");
    for (path, values) in &loaded {
        // Partition group 0 holds a full replica; group 1 the same shards.
        let mut full = Vec::new();
        for r in 0..p {
            let shard = ranks[r]
                .get(path)
                .unwrap_or_else(|| panic!("rank {r}: no {path}"));
            assert_eq!(shard, &ranks[r + p][path], "{path}: replicas differ");
            full.extend_from_slice(shard);
        }
        assert!(
            full.len() >= values.len() && full.len() < values.len() + p,
            "{path}"
        );
        full.truncate(values.len());
        assert!(
            &full == values,
            "{path}: exported values differ from the shards"
        );
    }
}

/// MiniLM's pooler is not used by the masked-LM head: training leaves it
/// bit for bit as the Hugging Face file has it (no weight decay, no
/// leftover momentum), while the encoder does change.
#[test]
fn bert_mlm_training_leaves_the_unused_pooler_untouched() {
    let dir = scratch("pooler");
    let minilm = mics_hub::assets::asset_dir("minilm")
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-assets)"));
    let out = dir.join("run");
    let mut c = config(
        "bert",
        &out,
        shape(2, 2, None, 1, 1),
        2,
        "weight_decay = 0.1",
    );
    c.model.init_from = Some(minilm.clone());
    train(&c, None).unwrap();
    let exported = dir.join("hf");
    export(&out, &exported, Device::Cpu).unwrap();
    let after = tensors(&exported);
    let before = tensors(&minilm);
    for key in ["pooler.dense.weight", "pooler.dense.bias"] {
        let trained = after
            .get(&format!("bert.{key}"))
            .or_else(|| after.get(key))
            .unwrap_or_else(|| panic!("no {key} in the export"));
        assert!(trained == &before[key], "{key} changed in training");
    }
    let word = "embeddings.word_embeddings.weight";
    assert!(
        after[&format!("bert.{word}")] != before[word],
        "the encoder did not train"
    );
    // A MiniLM checkpoint and export: 350 MB not worth keeping.
    let _ = std::fs::remove_dir_all(&dir);
}
