//! The global-batch sampler: the same samples on every topology.

use std::collections::BTreeSet;

use mics_datasets::GlobalBatchSampler;
use proptest::prelude::*;

/// The global batch of `step` assembled from every rank's micro-batches, in rank
/// then micro-step order.
fn assembled(sampler: &GlobalBatchSampler, step: u64, world: usize, accum: usize) -> Vec<usize> {
    let mut all = Vec::new();
    for rank in 0..world {
        for micro in 0..accum {
            all.extend(
                sampler
                    .micro_batch(step, rank, world, accum, micro)
                    .unwrap(),
            );
        }
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_factorisation_of_the_global_batch_trains_on_the_same_samples(
        (n1, s1, b1) in (1usize..9, 1usize..5, 1usize..5),
        perm in 0usize..3,
        windows in 1usize..400,
        window in 1usize..64,
        step in 0u64..200,
        seed in any::<u64>(),
    ) {
        let g = n1 * s1 * b1;
        let sampler = GlobalBatchSampler::new(windows * window + window / 2, window, g, seed).unwrap();
        prop_assert_eq!(sampler.num_windows(), windows);
        let global = sampler.global_batch(step);
        prop_assert_eq!(global.len(), g);
        prop_assert!(global.iter().all(|&w| w < windows));
        // Each rank's micro-batches are disjoint slices whose concatenation is the
        // global batch.
        prop_assert_eq!(&assembled(&sampler, step, n1, s1), &global);
        for rank in 0..n1 {
            for micro in 0..s1 {
                let mb = sampler.micro_batch(step, rank, n1, s1, micro).unwrap();
                let start = (rank * s1 + micro) * b1;
                prop_assert_eq!(&mb[..], &global[start..start + b1]);
            }
        }
        // Another factorisation of G: the same set of samples.
        let (n2, s2) = [(g, 1), (1, g), (1, 1)][perm];
        let other = assembled(&sampler, step, n2, s2);
        prop_assert_eq!(&other, &global);
        // Within one epoch a global batch never repeats a window.
        let first = step as u128 * g as u128;
        if first / windows as u128 == (first + g as u128 - 1) / windows as u128 {
            prop_assert_eq!(global.iter().collect::<BTreeSet<_>>().len(), g);
        }
    }

    #[test]
    fn epochs_are_permutations_covering_every_window_once(
        windows in 1usize..300,
        g in 1usize..40,
        seed in any::<u64>(),
    ) {
        let sampler = GlobalBatchSampler::new(windows * 3, 3, g, seed).unwrap();
        let steps = (3 * windows).div_ceil(g) as u64;
        let samples: Vec<usize> = (0..steps).flat_map(|t| sampler.global_batch(t)).collect();
        for (epoch, chunk) in samples.chunks_exact(windows).take(3).enumerate() {
            let mut sorted = chunk.to_vec();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..windows).collect::<Vec<_>>());
            prop_assert_eq!(chunk, &sampler.epoch_permutation(epoch as u64)[..]);
        }
    }
}

#[test]
fn batches_are_deterministic_in_the_seed() {
    let a = GlobalBatchSampler::new(1_000_000, 129, 16, 7).unwrap();
    let b = GlobalBatchSampler::new(1_000_000, 129, 16, 7).unwrap();
    let c = GlobalBatchSampler::new(1_000_000, 129, 16, 8).unwrap();
    for step in [0, 1, 2, 1000, 99, 0] {
        assert_eq!(a.global_batch(step), b.global_batch(step));
        assert_ne!(a.global_batch(step), c.global_batch(step));
    }
    assert_ne!(a.epoch_permutation(0), a.epoch_permutation(1));
    // Pinned: the permutation never changes with crate versions.
    let small = GlobalBatchSampler::new(10, 1, 4, 42).unwrap();
    assert_eq!(small.epoch_permutation(0), [6, 9, 7, 8, 4, 0, 5, 3, 1, 2]);
    // Step 2 spans the end of epoch 0 and the start of epoch 1.
    let next = small.epoch_permutation(1);
    assert_eq!(small.global_batch(2), [1, 2, next[0], next[1]]);
}

#[test]
fn a_tail_shorter_than_a_window_is_never_sampled() {
    let sampler = GlobalBatchSampler::new(1000, 300, 5, 0).unwrap();
    assert_eq!(sampler.num_windows(), 3);
    assert_eq!(sampler.window_range(2), 600..900);
    let samples: Vec<usize> = (0..30).flat_map(|t| sampler.global_batch(t)).collect();
    assert!(samples.iter().all(|&w| w < 3));
    assert!((sampler.epoch(3) - 5.0).abs() < 1e-12);
}
