//! Parity: `Autodiff<Mics<NdArray>>` over N ranks equals one process on the
//! same global batches, for an MLP and a small transformer.

mod common;

use std::ops::Range;

use burn::module::Module;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::*;
use mics_backend::PrefetchConfig;

const TOL: f32 = 1e-5;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    l1: Linear<B>,
    ln: LayerNorm<B>,
    l2: Linear<B>,
    act: Gelu,
}

struct MlpTask;

const IN: usize = 7;
const HIDDEN: usize = 13;
const OUT: usize = 5;

fn sample_data<B: Backend>(
    samples: Range<usize>,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = samples.len();
    let x: Vec<f32> = samples
        .clone()
        .flat_map(|s| (0..IN).map(move |i| ((s * IN + i) as f32 * 0.37).cos()))
        .collect();
    let y: Vec<f32> = samples
        .flat_map(|s| (0..OUT).map(move |i| ((s * 3 + i) as f32 * 0.11).sin()))
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [n, IN]), device),
        Tensor::from_data(TensorData::new(y, [n, OUT]), device),
    )
}

impl Task for MlpTask {
    type Model<B: AutodiffBackend> = Mlp<B>;

    fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            l1: LinearConfig::new(IN, HIDDEN).init(device),
            ln: LayerNormConfig::new(HIDDEN).init(device),
            l2: LinearConfig::new(HIDDEN, OUT).init(device),
            act: Gelu::new(),
        }
    }

    fn loss<B: AutodiffBackend>(
        &self,
        m: &Mlp<B>,
        samples: Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let (x, y) = sample_data::<B>(samples, device);
        let h = m.act.forward(m.ln.forward(m.l1.forward(x)));
        let out = m.l2.forward(h);
        (out - y).powi_scalar(2).mean()
    }
}

fn check<T: Task>(task: &T, c: Config, params: usize, clip: Option<f32>, prefetch: PrefetchConfig) {
    let reference = reference(task, c, clip);
    let ranks = distributed(task, c, clip, prefetch);
    let worst = assert_parity(&reference, &ranks, TOL);
    assert_collective_counts(&ranks, params, c, clip.is_some());
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

const MLP_PARAMS: usize = 6;

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
        check(
            &MlpTask,
            cfg(n, k, p, s),
            MLP_PARAMS,
            None,
            PrefetchConfig::disabled(),
        );
    }
}
