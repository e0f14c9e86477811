//! Inputs (presets, config.json files, bad configurations), the memory model's
//! bookkeeping, the JSON shape and the plot.

use std::path::PathBuf;

use mics_planner::{
    Architecture, CLUSTER_PRESETS, ClusterSpec, JsonPlan, MODEL_PRESETS, ModelSpec, PlanError,
    Planner, Strategy, StrategyChoice, TrainConfig, plot_sweep, sweep,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mics-planner-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(gpus: u64) -> TrainConfig {
    TrainConfig {
        gpus,
        gpus_per_node: 8,
        seq: 512,
        micro_batch: 4,
        grad_accum: 2,
        checkpointing: true,
        prefetch_depth: 1,
    }
}

#[test]
fn every_model_preset_on_every_cluster_gives_a_plan() {
    for model in MODEL_PRESETS {
        for cluster in CLUSTER_PRESETS {
            let spec = ModelSpec::preset(model).unwrap();
            let cfg = TrainConfig {
                seq: spec.default_seq,
                micro_batch: 1,
                ..config(64)
            };
            let planner = Planner::new(spec, ClusterSpec::preset(cluster).unwrap(), cfg).unwrap();
            let plan = planner.plan(StrategyChoice::All).unwrap();
            // ddp, zero2, zero3 and MiCS at p = 1, 2, 4, 8, 16, 32, 64.
            assert_eq!(plan.rows.len(), 3 + 7, "{model} on {cluster}");
            for row in &plan.rows {
                assert!(row.step_time_s.is_finite() && row.step_time_s > 0.0);
                assert!(row.tflops_per_gpu > 0.0 && row.percent_of_peak < 100.0);
            }
        }
    }
}

#[test]
fn memory_model_shards_the_16_bytes_per_parameter_as_each_strategy_says() {
    let model = ModelSpec::preset("gpt2-1.5b").unwrap();
    let psi = model.params() as f64;
    let planner = Planner::new(model, ClusterSpec::preset("p4d").unwrap(), config(64)).unwrap();
    let states = |s: Strategy| {
        let m = planner.estimate(s).unwrap().memory;
        m.params + m.grads + m.optimizer
    };
    assert_eq!(states(Strategy::Ddp), 16.0 * psi);
    assert_eq!(states(Strategy::Zero3), 16.0 * psi / 64.0);
    assert_eq!(
        states(Strategy::Mics { partition_size: 8 }),
        16.0 * psi / 8.0
    );
    // ZeRO-2: replicated 16-bit parameters, sharded rest, one gradient bucket.
    let unit = planner.model().largest_gather_unit() as f64;
    assert_eq!(
        states(Strategy::Zero2),
        2.0 * psi + 14.0 * psi / 64.0 + 2.0 * unit
    );
}

#[test]
fn smaller_partitions_use_more_memory_and_the_smallest_that_fits_is_recommended() {
    let model = ModelSpec::preset("gpt-175b").unwrap();
    let cfg = TrainConfig {
        seq: 2048,
        micro_batch: 1,
        ..config(128)
    };
    let planner = Planner::new(model, ClusterSpec::preset("p4de").unwrap(), cfg).unwrap();
    let plan = planner.plan(StrategyChoice::Mics).unwrap();
    let memory: Vec<f64> = plan.rows.iter().map(|r| r.memory_gib).collect();
    assert!(memory.windows(2).all(|w| w[0] > w[1]), "{memory:?}");
    let p = plan.recommended_partition_size.unwrap();
    for row in &plan.rows {
        assert_eq!(
            row.fits,
            row.partition_size >= p,
            "p = {}",
            row.partition_size
        );
    }
    // 175B x 16 bytes = 2.8 TB: needs at least 2.8 TB / 78 GiB ≈ 34 GPUs.
    assert!(p >= 64, "{p}");
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let err = ModelSpec::resolve("gpt-6").unwrap_err().to_string();
    assert!(err.starts_with("unknown model `gpt-6`"), "{err}");
    let err = ClusterSpec::preset("tpu").unwrap_err().to_string();
    assert_eq!(
        err,
        "unknown cluster `tpu` (presets: p3dn, p4d, p4de, h100)"
    );
    let model = ModelSpec::preset("bert-base").unwrap();
    let cluster = ClusterSpec::preset("p4d").unwrap();
    let err = Planner::new(model.clone(), cluster.clone(), config(12))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a whole number of nodes"), "{err}");
    let long = TrainConfig {
        seq: 1024,
        ..config(8)
    };
    let err = Planner::new(model.clone(), cluster.clone(), long)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the 512 positions"), "{err}");
    let planner = Planner::new(model, cluster, config(16)).unwrap();
    let err = planner
        .estimate(Strategy::Mics { partition_size: 12 })
        .unwrap_err();
    assert!(matches!(err, PlanError::InvalidConfig(_)));
    assert!("zero4".parse::<StrategyChoice>().is_err());
    assert!(
        err.to_string()
            .contains("partition size 12 must divide 16 GPUs")
    );
}

#[test]
fn hugging_face_configs_load_and_malformed_ones_are_refused() {
    let dir = temp_dir("configs");
    let gpt2 = dir.join("gpt2.json");
    std::fs::write(
        &gpt2,
        r#"{"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
            "vocab_size": 50257, "n_positions": 1024, "n_inner": null}"#,
    )
    .unwrap();
    let spec = ModelSpec::resolve(gpt2.to_str().unwrap()).unwrap();
    assert_eq!(spec.architecture, Architecture::Gpt);
    assert_eq!(
        spec.params(),
        ModelSpec::preset("gpt2-124m").unwrap().params()
    );

    // all-MiniLM-L6-v2's config.json (the BERT the project tests with).
    let bert = dir.join("bert.json");
    std::fs::write(
        &bert,
        r#"{"architectures": ["BertModel"], "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522,
            "max_position_embeddings": 512, "type_vocab_size": 2}"#,
    )
    .unwrap();
    let spec = ModelSpec::resolve(bert.to_str().unwrap()).unwrap();
    assert_eq!(
        (spec.architecture, spec.layers, spec.ffn),
        (Architecture::Bert, 6, 1536)
    );

    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{\"hidden_size\": 384,").unwrap();
    let err = ModelSpec::resolve(broken.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("malformed model config"), "{err}");

    let missing = dir.join("missing.json");
    std::fs::write(&missing, r#"{"n_embd": 768, "n_layer": 12, "n_head": 12}"#).unwrap();
    let err = ModelSpec::resolve(missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("missing `n_positions`"), "{err}");

    let negative = dir.join("negative.json");
    std::fs::write(
        &negative,
        r#"{"n_embd": -1, "n_layer": 12, "n_head": 12, "vocab_size": 5, "n_positions": 8}"#,
    )
    .unwrap();
    let err = ModelSpec::resolve(negative.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`n_embd` must be a positive integer"), "{err}");

    let other = dir.join("t5.json");
    std::fs::write(&other, r#"{"d_model": 512}"#).unwrap();
    let err = ModelSpec::resolve(other.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither BERT keys"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn json_rows_have_exactly_the_documented_fields() {
    let planner = Planner::new(
        ModelSpec::preset("bert-large").unwrap(),
        ClusterSpec::preset("p3dn").unwrap(),
        config(32),
    )
    .unwrap();
    let plan = planner.plan(StrategyChoice::All).unwrap();
    let value = serde_json::to_value(JsonPlan::from(&plan)).unwrap();
    let object = value.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["recommended_partition_size", "rows"]);
    let rows = object["rows"].as_array().unwrap();
    assert_eq!(rows.len(), plan.rows.len());
    for row in rows {
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "fits",
                "memory_gib",
                "partition_size",
                "step_time_s",
                "strategy",
                "tflops_per_gpu"
            ]
        );
    }
    assert_eq!(rows[0]["strategy"], "ddp");
    assert_eq!(rows[2]["strategy"], "zero3");
    assert_eq!(rows[2]["partition_size"], 32);
    // BERT-large fits everywhere: the smallest partition is 1 (plain replicas).
    assert_eq!(object["recommended_partition_size"], 1);
}

#[test]
fn sweep_plot_is_a_png() {
    let model = ModelSpec::preset("bert-10b").unwrap();
    let cluster = ClusterSpec::preset("p3dn").unwrap();
    let points = sweep(&model, &cluster, &config(0), &[16, 32, 64, 128], None).unwrap();
    assert_eq!(points.len(), 4 * 4);
    let mics: Vec<_> = points.iter().filter(|p| p.strategy == "mics").collect();
    assert!(mics.iter().all(|p| p.partition_size == 8 && p.fits));
    assert_eq!(mics[0].efficiency, Some(1.0));
    let dir = temp_dir("plot");
    let path = dir.join("scaling.png");
    plot_sweep(&points, "bert-10b on p3dn", &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
    std::fs::remove_dir_all(dir).unwrap();
}
