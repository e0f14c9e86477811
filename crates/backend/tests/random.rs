//! `Mics::seed` seeds a generator owned by the calling thread: in-process
//! ranks (threads) draw the same dropout masks from the same seed whatever
//! the interleaving, and different seeds give different masks.

use std::sync::{Arc, Barrier};

use burn::backend::{Autodiff, NdArray};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use mics_backend::Mics;

type B = Autodiff<Mics<NdArray>>;

const DRAWS: usize = 16;

/// One thread's masks: seed, then draw `DRAWS` training-mode dropouts, each
/// after a barrier so that the threads draw at the same moments.
fn masks(seed: u64, barrier: &Barrier) -> (Vec<Vec<f32>>, Vec<i64>) {
    let device = Default::default();
    B::seed(&device, seed);
    let dropout: Dropout = DropoutConfig::new(0.5).init();
    let mut out = Vec::new();
    for _ in 0..DRAWS {
        barrier.wait();
        let x = Tensor::<B, 2>::ones([32, 32], &device).require_grad();
        let y = dropout.forward(x);
        out.push(y.into_data().convert::<f32>().into_vec().unwrap());
    }
    barrier.wait();
    let ints = Tensor::<B, 1, Int>::random([64], Distribution::Uniform(0.0, 1000.0), &device);
    (out, ints.into_data().convert::<i64>().into_vec().unwrap())
}

/// Every thread's masks, the threads running concurrently.
fn run(seeds: &[u64]) -> Vec<(Vec<Vec<f32>>, Vec<i64>)> {
    let barrier = Arc::new(Barrier::new(seeds.len()));
    let handles: Vec<_> = seeds
        .iter()
        .map(|&seed| {
            let barrier = barrier.clone();
            std::thread::spawn(move || masks(seed, &barrier))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn same_seed_same_masks_on_concurrent_threads() {
    let first = run(&[7, 7]);
    assert_eq!(first[0], first[1], "two threads seeded alike differ");
    // Dropout really is on: about half the values are zero, the rest 1/(1-p).
    let zeros = first[0].0.iter().flatten().filter(|&&v| v == 0.0).count();
    let total = DRAWS * 32 * 32;
    assert!(
        zeros > total * 2 / 5 && zeros < total * 3 / 5,
        "{zeros} of {total}"
    );
    assert!(first[0].0.iter().flatten().all(|&v| v == 0.0 || v == 2.0));
    // Successive draws on one thread differ (the generator advances).
    assert_ne!(first[0].0[0], first[0].0[1]);
    let again = run(&[7, 7]);
    assert_eq!(first, again, "a second run with the same seed differs");
}

#[test]
fn different_seeds_different_masks() {
    let out = run(&[7, 8]);
    assert_ne!(out[0].0, out[1].0);
    assert_ne!(out[0].1, out[1].1);
}
