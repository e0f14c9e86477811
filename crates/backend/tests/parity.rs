//! Parity: `Autodiff<Mics<NdArray>>` over N ranks equals one process on the
//! same global batches, for an MLP and a small transformer.

mod common;

use burn::optim::SgdConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use common::tasks::{GPT_PARAMS, GptTask, MlpTask, TinyGpt};
use common::*;
use mics_backend::{PrefetchConfig, ShardedOptimizer};
use mics_comm::CollectiveKind;

const TOL: f32 = 1e-5;

/// With the default bucket size every model here is one gradient bucket:
/// one reduce-scatter per micro-step, one replication all-reduce per step.
fn check<T: Task>(task: &T, c: Config, clip: Option<f32>, prefetch: PrefetchConfig) {
    let reference = reference(task, c, clip);
    let ranks = distributed(task, c, clip, prefetch);
    let worst = assert_parity(&reference, &ranks, TOL);
    assert_collective_counts(&ranks, 1, c, clip.is_some());
    eprintln!("{c:?}: worst relative error {worst:e}");
}

fn cfg(n: usize, k: usize, p: usize, s: usize) -> Config {
    Config {
        n,
        k,
        p,
        s,
        b: 2,
        steps: 5,
    }
}

#[test]
fn mlp_parity_all_configurations() {
    for (n, k, p, s) in [
        (1, 1, 1, 1),
        (2, 2, 2, 1),
        (4, 4, 2, 2),
        (4, 4, 4, 1),
        (4, 2, 4, 3),
        (8, 2, 4, 2),
    ] {
        check(&MlpTask, cfg(n, k, p, s), None, PrefetchConfig::disabled());
    }
}

#[test]
fn transformer_parity_all_configurations() {
    for (n, k, p, s) in [
        (1, 1, 1, 1),
        (2, 2, 2, 1),
        (4, 4, 2, 2),
        (4, 4, 4, 1),
        (4, 2, 4, 3),
        (8, 2, 4, 2),
    ] {
        check(&GptTask, cfg(n, k, p, s), None, PrefetchConfig::disabled());
    }
}

#[test]
fn global_norm_clipping_matches_reference() {
    // A threshold below the gradient norm, so clipping is active every step.
    check(
        &GptTask,
        cfg(4, 2, 4, 2),
        Some(0.05),
        PrefetchConfig::disabled(),
    );
    check(
        &MlpTask,
        cfg(4, 4, 2, 2),
        Some(0.05),
        PrefetchConfig::disabled(),
    );
}

#[test]
fn prefetch_gives_the_same_result_and_hits() {
    let c = cfg(4, 2, 4, 2);
    let reference = reference(&GptTask, c, None);
    let ranks = distributed(&GptTask, c, None, PrefetchConfig::new(3, 1 << 20));
    let worst = assert_parity(&reference, &ranks, TOL);
    assert_collective_counts(&ranks, 1, c, false);
    for rank in &ranks {
        let k = rank.counters;
        assert!(k.prefetch_hits > 0, "{k:?}");
        assert!(k.prefetch_hits > 4 * k.prefetch_misses, "{k:?}");
    }
    eprintln!(
        "prefetch: worst relative error {worst:e}, counters {:?}",
        ranks[0].counters
    );
}

#[test]
fn sgd_with_momentum_parity() {
    let sgd = || {
        SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .with_weight_decay(Some(WeightDecayConfig::new(0.01)))
    };
    for (n, k, p, s) in [(4, 2, 4, 3), (8, 2, 4, 2)] {
        let c = cfg(n, k, p, s);
        let reference = reference_with(&GptTask, c, None, sgd().init::<Ref, TinyGpt<Ref>>());
        let ranks = distributed_with(&GptTask, c, None, PrefetchConfig::disabled(), |rt| {
            // One bucket per parameter.
            ShardedOptimizer::sgd(&sgd(), rt).with_bucket_bytes(0)
        });
        let worst = assert_parity(&reference, &ranks, TOL);
        assert_collective_counts(&ranks, GPT_PARAMS, c, false);
        eprintln!("sgd {c:?}: worst relative error {worst:e}");
    }
}

/// Prefetched gathers started together share one all-gather of their
/// concatenated shards: fewer collectives than parameter gathers, and the
/// training is bit-identical to on-demand gathers (pure data movement).
#[test]
fn coalesced_prefetch_is_bit_identical_and_issues_fewer_collectives() {
    // Hierarchical gathers (p > k) and flat ones.
    for c in [cfg(4, 2, 4, 2), cfg(4, 4, 2, 2)] {
        let on_demand = distributed(&GptTask, c, None, PrefetchConfig::disabled());
        let prefetched = distributed(&GptTask, c, None, PrefetchConfig::new(4, 1 << 20));
        for (a, b) in on_demand.iter().zip(&prefetched) {
            assert_eq!(a.run.losses, b.run.losses);
            assert_eq!(a.run.params, b.run.params);
            let (ka, kb) = (a.counters, b.counters);
            assert_eq!(ka.gathers, ka.gather_collectives, "{ka:?}");
            assert_eq!(ka.gathers, kb.gathers, "{kb:?}");
            assert!(kb.prefetch_hits > 0, "{kb:?}");
            assert!(kb.gather_collectives < kb.gathers, "{kb:?}");
            if c.p <= c.k {
                // A flat gather is one collective of the partition group,
                // counted by the engine too.
                let stats = b.partition_stats.last().unwrap();
                assert_eq!(
                    stats.calls(CollectiveKind::AllGather),
                    kb.gather_collectives,
                    "{kb:?}"
                );
            }
        }
        let k = prefetched[0].counters;
        eprintln!(
            "{c:?} coalesced prefetch: {} parameter gathers in {} all-gathers",
            k.gathers, k.gather_collectives
        );
    }
}
