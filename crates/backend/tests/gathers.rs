//! No gather for metadata: an op that needs only a parameter's shape, dtype
//! or device (the gradient of an embedding table or of a convolution's
//! weight and bias) never all-gathers it. The backend's own counters show
//! exactly the gathers the forward pass needs, and the training still
//! matches the one-process reference.

mod common;

use std::ops::Range;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use mics_backend::PrefetchConfig;

#[derive(Module, Debug)]
struct EmbedConv<B: Backend> {
    embed: Embedding<B>,
    conv: Conv2d<B>,
}

struct EmbedConvTask;

const VOCAB: usize = 11;
const D: usize = 6;
const SEQ: usize = 4;

impl Task for EmbedConvTask {
    type Model<B: AutodiffBackend> = EmbedConv<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> EmbedConv<B> {
        EmbedConv {
            embed: EmbeddingConfig::new(VOCAB, D).init(device),
            conv: Conv2dConfig::new([2, 3], [3, 3]).init(device),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &EmbedConv<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let b = samples.len();
        let ids: Vec<i64> = samples
            .clone()
            .flat_map(|s| (0..SEQ).map(move |t| ((s * 5 + t * 3) % VOCAB) as i64))
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, SEQ]), device);
        let x: Vec<f32> = samples
            .flat_map(|s| (0..2 * 5 * 5).map(move |i| ((s * 50 + i) as f32 * 0.13).sin()))
            .collect();
        // The image does not require a gradient: only the weight and bias
        // gradients of the convolution are computed.
        let x = Tensor::<B, 4>::from_data(TensorData::new(x, [b, 2, 5, 5]), device);
        let e = m.embed.forward(ids).powi_scalar(2).mean();
        let c = m.conv.forward(x).powi_scalar(2).mean();
        e + c
    }
}

#[test]
fn gradients_of_embeddings_and_convolutions_gather_nothing() {
    let c = Config {
        n: 4,
        k: 4,
        p: 4,
        s: 2,
        b: 2,
        steps: 3,
    };
    let reference = reference(&EmbedConvTask, c, None);
    let ranks = distributed(&EmbedConvTask, c, None, PrefetchConfig::disabled());
    let worst = assert_parity(&reference, &ranks, 1e-5);
    eprintln!("worst relative error {worst:e}");
    // Forward: the table, the conv weight and bias, once per micro-step.
    // Backward: nothing (before, the table, weight and bias were gathered
    // again just for their shapes).
    let per_micro_step = 3;
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(
            rank.counters.gathers,
            (per_micro_step * c.s * c.steps) as u64,
            "rank {r}: {:?}",
            rank.counters
        );
    }
}

/// Host staging: every gather copies the shard to the host once and the
/// gathered value back once; every gradient goes to the host once to be
/// reduced, and AdamW on NdArray steps its shard there (the one-pass host
/// step), so it does not come back. A partition group of one gathers
/// nothing, so in f32 it copies nothing to gather.
#[test]
fn every_collective_stages_through_the_host_once_each_way() {
    use common::tasks::GptTask;
    const PARAMS: u64 = common::tasks::GPT_PARAMS as u64;
    for (p, prefetch) in [
        (1, PrefetchConfig::disabled()),
        (4, PrefetchConfig::disabled()),
        (4, PrefetchConfig::new(4, 1 << 20)),
    ] {
        let c = Config {
            n: 4,
            k: 4,
            p,
            s: 2,
            b: 2,
            steps: 3,
        };
        let ranks = distributed(&GptTask, c, None, prefetch);
        for rank in &ranks {
            let k = rank.counters;
            // One download per gradient per micro-step; no upload for the
            // optimizer step (Burn's AdamW would take one per parameter).
            let grads_down = PARAMS * (c.s * c.steps) as u64;
            let grads_up = 0;
            let gathers = if p == 1 { 0 } else { k.gathers };
            assert_eq!(k.host_downloads, gathers + grads_down, "p = {p}: {k:?}");
            assert_eq!(k.host_uploads, gathers + grads_up, "p = {p}: {k:?}");
            if p == 1 {
                assert!(k.gathers > 0);
                assert_eq!(k.bytes_gathered_wire, k.bytes_gathered);
            }
        }
    }
}
