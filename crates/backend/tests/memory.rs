//! Memory: each rank keeps 1/p of the parameters, and the gathered copies
//! alive at once stay within the prefetch budget plus one layer's weights,
//! through forward and backward (Autodiff saves shard handles, not copies).

mod common;

use std::ops::Range;

use burn::module::Module;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::*;
use mics_backend::PrefetchConfig;

const D: usize = 23;
const LAYERS: usize = 6;

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    linear: Linear<B>,
    norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Deep<B: Backend> {
    blocks: Vec<Block<B>>,
    act: Gelu,
}

/// `reverse_on_odd_steps`: odd steps run the blocks in reverse order (the
/// step is read from the sample range), so the recorded gather order changes.
struct DeepTask {
    reverse_on_odd_steps: Option<usize>,
}

const DEEP: DeepTask = DeepTask {
    reverse_on_odd_steps: None,
};

impl Task for DeepTask {
    type Model<B: AutodiffBackend> = Deep<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Deep<B> {
        Deep {
            blocks: (0..LAYERS)
                .map(|_| Block {
                    linear: LinearConfig::new(D, D).init(device),
                    norm: LayerNormConfig::new(D).init(device),
                })
                .collect(),
            act: Gelu::new(),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &Deep<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let n = samples.len();
        let start = samples.start;
        let x: Vec<f32> = samples
            .flat_map(|s| (0..D).map(move |i| ((s * D + i) as f32 * 0.29).sin()))
            .collect();
        let mut h = Tensor::<B, 2>::from_data(TensorData::new(x, [n, D]), device);
        let odd = self
            .reverse_on_odd_steps
            .is_some_and(|global| (start / global) % 2 == 1);
        let order: Vec<&Block<B>> = if odd {
            m.blocks.iter().rev().collect()
        } else {
            m.blocks.iter().collect()
        };
        for block in order {
            h = m.act.forward(block.norm.forward(block.linear.forward(h)));
        }
        h.powi_scalar(2).mean()
    }
}

/// Per-parameter sizes of one block: linear weight, linear bias, gamma, beta.
const BLOCK_NUMELS: [usize; 4] = [D * D, D, D, D];
const F32: u64 = 4;

fn expected_shard_bytes(p: usize) -> u64 {
    LAYERS as u64
        * BLOCK_NUMELS
            .iter()
            .map(|&n| n.div_ceil(p) as u64 * F32)
            .sum::<u64>()
}

/// The most one op gathers at once: `linear` takes its weight and bias.
const LARGEST_OP_BYTES: u64 = ((D * D + D) as u64) * F32;
const MODEL_BYTES: u64 = LAYERS as u64 * ((D * D + 3 * D) as u64) * F32;

fn config() -> Config {
    Config {
        n: 4,
        k: 2,
        p: 4,
        s: 2,
        b: 2,
        steps: 3,
    }
}

#[test]
fn shards_are_one_pth_and_gathers_are_freed() {
    let c = config();
    let reference = reference(&DEEP, c, None);
    let ranks = distributed(&DEEP, c, None, PrefetchConfig::disabled());
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        assert_eq!(k.shard_bytes, expected_shard_bytes(c.p), "{k:?}");
        assert_eq!(k.live_gathered_bytes, 0, "{k:?}");
        assert!(k.peak_live_gathered_bytes <= LARGEST_OP_BYTES, "{k:?}");
        // Forward gathers every parameter; backward gathers again the ones
        // its gradients need (the linear weights for the input gradient).
        let forward = (LAYERS * BLOCK_NUMELS.len() * c.s * c.steps) as u64;
        assert!(
            k.gathers >= forward + (LAYERS * c.s * c.steps) as u64,
            "{k:?}"
        );
        // Never more than one layer of the model gathered at once.
        assert!(
            k.peak_live_gathered_bytes <= MODEL_BYTES / LAYERS as u64,
            "{k:?}"
        );
    }
}

#[test]
fn peak_stays_within_prefetch_budget() {
    let c = config();
    let budget = 2 * LARGEST_OP_BYTES;
    let reference = reference(&DEEP, c, None);
    let ranks = distributed(&DEEP, c, None, PrefetchConfig::new(4, budget));
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        assert_eq!(k.shard_bytes, expected_shard_bytes(c.p), "{k:?}");
        assert!(k.prefetch_hits > 0, "{k:?}");
        assert!(
            k.peak_live_gathered_bytes <= budget + LARGEST_OP_BYTES,
            "{k:?}"
        );
        eprintln!("{k:?}");
    }
}

#[test]
fn prefetch_falls_back_when_the_order_changes() {
    let c = Config {
        steps: 4,
        ..config()
    };
    let task = DeepTask {
        reverse_on_odd_steps: Some(c.n * c.b * c.s),
    };
    let budget = 2 * LARGEST_OP_BYTES;
    let reference = reference(&task, c, None);
    let ranks = distributed(&task, c, None, PrefetchConfig::new(4, budget));
    assert_parity(&reference, &ranks, 1e-5);
    for rank in &ranks {
        let k = rank.counters;
        // Every step after the first diverges from the order recorded on the previous one.
        assert!(k.prefetch_misses >= (c.steps - 1) as u64, "{k:?}");
        assert!(
            k.peak_live_gathered_bytes <= budget + LARGEST_OP_BYTES,
            "{k:?}"
        );
        assert_eq!(k.live_gathered_bytes, 0, "{k:?}");
    }
}
