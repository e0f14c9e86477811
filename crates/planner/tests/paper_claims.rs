//! The planner against MiCS's published results (Zhang et al., "MiCS:
//! Near-linear Scaling for Training Gigantic Model on Public Cloud", VLDB 2023,
//! arXiv 2205.00119, and the authors' Amazon Science blog post).
//!
//! Every test uses the presets as they are (hardware values sourced in
//! `src/cluster.rs`: nominal NVLink and EFA bandwidths at 80% efficiency,
//! NCCL's own ring latencies, 60% of peak on A100 and 50% on V100 while
//! computing). Workload choices the paper does not state (micro-batch,
//! accumulation) are stated next to each test. Where the model does not
//! reproduce a claim, the test says so and asserts what the model predicts
//! instead, so that the gap stays visible; nothing was tuned to make a claim
//! pass.

use mics_planner::{
    ClusterSpec, Collective, Estimate, Group, ModelSpec, Planner, Strategy, StrategyChoice,
    TrainConfig, hierarchical_all_gather, ring,
};

fn planner(model: &str, cluster: &str, gpus: u64, micro_batch: u64) -> Planner {
    let model = ModelSpec::preset(model).unwrap();
    let cluster = ClusterSpec::preset(cluster).unwrap();
    let config = TrainConfig {
        gpus,
        gpus_per_node: cluster.gpus_per_node,
        seq: model.default_seq,
        micro_batch,
        grad_accum: 1,
        checkpointing: true,
        prefetch_depth: 1,
    };
    Planner::new(model, cluster, config).unwrap()
}

fn zero3(p: &Planner) -> Estimate {
    p.estimate(Strategy::Zero3).unwrap()
}

fn mics(p: &Planner, partition_size: u64) -> Estimate {
    p.estimate(Strategy::Mics { partition_size }).unwrap()
}

fn smallest_fitting_p(p: &Planner) -> u64 {
    p.plan(StrategyChoice::Mics)
        .unwrap()
        .recommended_partition_size
        .expect("some partition size fits")
}

/// Section 3 of the paper: with p = 4 ranks on nodes of k = 2 GPUs, the
/// hierarchical all-gather sends (p-k)/p = 1/2 of the message across nodes
/// per node, where the flat ring sends (p-1)/p = 3/4.
#[test]
fn hierarchical_all_gather_cuts_cross_node_volume_from_3_4_to_1_2() {
    let cluster = ClusterSpec {
        gpus_per_node: 2,
        ..ClusterSpec::preset("p3dn").unwrap()
    };
    let message = 64e6;
    let flat = ring(
        &cluster,
        Collective::AllGather,
        Group {
            size: 4,
            ranks_per_node: 2,
            concurrent_per_node: 1,
        },
        message,
    );
    let hierarchical = hierarchical_all_gather(&cluster, 4, message);
    // Bytes per GPU averaged over the node; times k = 2 for the node.
    let flat_factor = flat.inter_bytes * 2.0 / message;
    let hier_factor = hierarchical.inter_bytes * 2.0 / message;
    assert!((flat_factor - 0.75).abs() < 1e-12, "flat: {flat_factor}");
    assert!(
        (hier_factor - 0.5).abs() < 1e-12,
        "hierarchical: {hier_factor}"
    );
    assert!(hierarchical.serial_time_s() < flat.serial_time_s());
}

/// Claim: the 100B model on 64 p4d.24xlarge (512 A100-40GB, 400 Gbps) runs at
/// over 170 TFLOPS per GPU (54.5% of peak) with 99.4% weak-scaling efficiency
/// from 128 to 512 GPUs.
///
/// Workload: sequence 2048, activation checkpointing, micro-batch 2 per GPU,
/// no accumulation, MiCS at the smallest partition that fits on A100-40GB
/// (the paper's scale-aware rule; the model picks p = 128, 16 nodes). The model
/// predicts about 182 TFLOPS (58.5% of peak) at 128 and 512 GPUs, efficiency
/// 1.00: the per-micro-step gathers stay inside p, only the once-per-step
/// all-reduce grows with N, and it hides behind backward.
#[test]
fn gpt_100b_on_p4d_mics_scales_near_linearly_above_half_of_peak() {
    let small = planner("gpt-100b", "p4d", 128, 2);
    let p = smallest_fitting_p(&small);
    assert_eq!(p, 128, "scale-aware rule on A100-40GB");
    let large = planner("gpt-100b", "p4d", 512, 2);
    let (at_128, at_512) = (mics(&small, p), mics(&large, p));
    assert!(at_128.fits && at_512.fits);
    let efficiency = at_512.tflops_per_gpu / at_128.tflops_per_gpu;
    assert!(efficiency >= 0.97, "MiCS weak scaling {efficiency:.3}");
    assert!(
        at_512.percent_of_peak > 50.0,
        "MiCS at 512 GPUs: {:.1}% of peak",
        at_512.percent_of_peak
    );
    assert!(
        at_512.tflops_per_gpu > 156.0,
        "{:.1}",
        at_512.tflops_per_gpu
    );
}

/// Claim: on the same cluster ZeRO-3's weak-scaling efficiency from 128 to 512
/// GPUs is 72% and it saturates at 62 TFLOPS per GPU (19.9% of peak).
///
/// The model reproduces this at micro-batch 1 (predicted: efficiency 0.71,
/// 22.5% of peak at 512 GPUs). ZeRO-3 gathers every parameter twice and
/// reduce-scatters it once per micro-step over all N ranks; the ring's
/// bandwidth term is constant in N (each node sends ~3 x 2Ψ = 600 GB per
/// micro-step, 15 s at 40 GB/s), but each of the ~2900 per-tensor collectives
/// pays (N-1) hop latencies, which grows from 2.3 s to 9.2 s per micro-step
/// between 128 and 512 GPUs.
///
/// Not reproduced: the same micro-batch 1 does not give MiCS's numbers (MiCS
/// is then network-bound too: 35% of peak, efficiency 0.97, see the next
/// test), and at micro-batch 2, where MiCS matches the paper, the model gives
/// ZeRO-3 0.80 efficiency and 45% of peak. The alpha-beta model has no term
/// for what the paper measured beyond latency and bandwidth (cloud network
/// congestion at 64 nodes, DeepSpeed 0.5.6's per-parameter hooks and partial
/// prefetch overlap), so it predicts a smaller MiCS/ZeRO-3 gap at 512 GPUs
/// (1.3x at micro-batch 2) than the paper's 170/62 = 2.7x.
#[test]
fn gpt_100b_on_p4d_zero3_weak_scaling_and_saturation() {
    let (small, large) = (
        planner("gpt-100b", "p4d", 128, 1),
        planner("gpt-100b", "p4d", 512, 1),
    );
    let (at_128, at_512) = (zero3(&small), zero3(&large));
    assert!(at_128.fits && at_512.fits);
    let efficiency = at_512.tflops_per_gpu / at_128.tflops_per_gpu;
    assert!(
        (0.6..=0.8).contains(&efficiency),
        "ZeRO-3 weak scaling {efficiency:.3}"
    );
    assert!(
        (15.0..=25.0).contains(&at_512.percent_of_peak),
        "ZeRO-3 at 512 GPUs: {:.1}% of peak",
        at_512.percent_of_peak
    );
}

/// The gap of the two previous tests, at one micro-batch for both strategies.
/// The paper's 512-GPU ratio is 170/62 = 2.7x; the model predicts 1.2x-1.5x
/// (micro-batch 2) and says MiCS is still network-bound at micro-batch 1.
/// Should a later model close the gap, this test fails and the docs must be
/// updated with the new figures.
#[test]
fn gpt_100b_same_micro_batch_gap_is_smaller_than_published() {
    let one = planner("gpt-100b", "p4d", 512, 1);
    let two = planner("gpt-100b", "p4d", 512, 2);
    let mics_one = mics(&one, smallest_fitting_p(&one));
    assert!(
        mics_one.percent_of_peak < 45.0,
        "MiCS at micro-batch 1: {:.1}%",
        mics_one.percent_of_peak
    );
    let ratio = mics(&two, 128).tflops_per_gpu / zero3(&two).tflops_per_gpu;
    assert!(
        (1.2..=1.5).contains(&ratio),
        "MiCS/ZeRO-3 at micro-batch 2: {ratio:.2}"
    );
    let zero3_peak = zero3(&two).percent_of_peak;
    assert!(
        zero3_peak > 35.0,
        "ZeRO-3 at micro-batch 2: {zero3_peak:.1}%"
    );
}

/// Claim: up to 2.82x the throughput of DeepSpeed ZeRO-3 for BERT models on
/// p3dn.24xlarge (V100-32GB, 100 Gbps).
///
/// Workload: BERT-10B and BERT-20B shapes, sequence 512, micro-batch 8,
/// checkpointing, no accumulation, 16 to 128 GPUs, MiCS at the smallest
/// partition that fits (p = 8 for 10B, one node; p = 16 for 20B, two nodes).
/// The model predicts MiCS ahead at every size and the advantage larger at 128
/// GPUs than at 16 (ZeRO-3's per-tensor collectives pay latency over more hops
/// while MiCS's gathers stay in p): BERT-10B 1.14x at 16 GPUs to 1.96x at 128,
/// BERT-20B only 1.11x-1.17x (with p = 16 its gathers cross the 100 Gbps
/// network too, and the replication all-reduce of a 2.5 GB shard per GPU is
/// paid every step without accumulation). The best ratio, 1.96x, is inside the
/// paper's "up to 2.82x" but below its top.
#[test]
fn bert_10b_20b_on_p3dn_mics_over_zero3_within_published_range() {
    let mut best: f64 = 0.0;
    for model in ["bert-10b", "bert-20b"] {
        let mut ratios = Vec::new();
        for gpus in [16, 32, 64, 128] {
            let plan = planner(model, "p3dn", gpus, 8);
            let p = smallest_fitting_p(&plan);
            let (m, z) = (mics(&plan, p), zero3(&plan));
            assert!(m.fits && z.fits);
            let ratio = m.tflops_per_gpu / z.tflops_per_gpu;
            eprintln!("{model} {gpus} GPUs p={p}: MiCS/ZeRO-3 = {ratio:.2}");
            assert!(ratio > 1.0, "{model} at {gpus}: {ratio:.2}");
            ratios.push(ratio);
            best = best.max(ratio);
        }
        assert!(ratios[3] > ratios[0], "{model}: {ratios:?}");
    }
    assert!(
        (1.5..=2.82).contains(&best),
        "best MiCS/ZeRO-3 ratio {best:.2}"
    );
}

/// Claim: the 175B model at sequence 2048 on 16 p4de.24xlarge (128
/// A100-80GB) runs at 169 TFLOPS per GPU, 54.2% of peak.
///
/// Workload: micro-batch 2, checkpointing, MiCS at the smallest partition
/// that fits on A100-80GB (p = 64). The prediction must land within 15% of
/// 169 TFLOPS; the model gives 185 TFLOPS (59.4%), 9.6% above.
#[test]
fn gpt_175b_on_16_p4de_near_169_tflops() {
    let plan = planner("gpt-175b", "p4de", 128, 2);
    let p = smallest_fitting_p(&plan);
    let m = mics(&plan, p);
    assert!(m.fits);
    let off = (m.tflops_per_gpu - 169.0).abs() / 169.0;
    assert!(
        off <= 0.15,
        "p = {p}: {:.1} TFLOPS ({:.1}% of peak)",
        m.tflops_per_gpu,
        m.percent_of_peak
    );
}
