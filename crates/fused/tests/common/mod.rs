//! Shared by the tests: random problems and the unfused reference.
#![allow(dead_code)]

use burn::backend::NdArray;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use mics_fused::IGNORE_INDEX;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A problem: `hidden` `[t, h]`, `weight` `[v, h]`, an optional `bias`
/// `[v]`, targets, token weights.
#[derive(Debug, Clone)]
pub struct Problem {
    pub t: usize,
    pub h: usize,
    pub v: usize,
    pub hidden: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub targets: Vec<i64>,
    pub weights: Option<Vec<f32>>,
}

impl Problem {
    /// Random values; `ignored` of the targets are `IGNORE_INDEX`; logits
    /// of size about `scale`.
    pub fn random(
        seed: u64,
        t: usize,
        h: usize,
        v: usize,
        ignored: f64,
        weighted: bool,
        scale: f32,
    ) -> Problem {
        let mut rng = StdRng::seed_from_u64(seed);
        let hidden = (0..t * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w_scale = scale / (h as f32).sqrt();
        let weight = (0..v * h)
            .map(|_| rng.random_range(-w_scale..w_scale))
            .collect();
        let targets = (0..t)
            .map(|_| {
                if rng.random_bool(ignored) {
                    IGNORE_INDEX
                } else {
                    rng.random_range(0..v as i64)
                }
            })
            .collect();
        let weights = weighted.then(|| (0..t).map(|_| rng.random_range(0.0..2.0)).collect());
        Problem {
            t,
            h,
            v,
            hidden,
            weight,
            bias: None,
            targets,
            weights,
        }
    }

    /// The same problem with a random bias of size about `scale` (as large
    /// as the logits, so that it matters).
    pub fn with_bias(mut self, seed: u64, scale: f32) -> Problem {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xb1a5);
        self.bias = Some(
            (0..self.v)
                .map(|_| rng.random_range(-scale..scale))
                .collect(),
        );
        self
    }

    pub fn hidden<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(self.hidden.clone(), [self.t, self.h]),
            device,
        )
    }

    pub fn weight<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(self.weight.clone(), [self.v, self.h]),
            device,
        )
    }

    pub fn bias<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Option<Tensor<B, 1>> {
        self.bias
            .as_ref()
            .map(|b| Tensor::from_data(TensorData::new(b.clone(), [self.v]), device))
    }

    pub fn targets<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(self.targets.clone(), [self.t]), device)
    }

    pub fn token_weights<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Option<Tensor<B, 1>> {
        self.weights
            .as_ref()
            .map(|w| Tensor::from_data(TensorData::new(w.clone(), [self.t]), device))
    }
}

/// Loss and gradients with respect to hidden, weight and bias (if any).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub loss: f32,
    pub grad_hidden: Vec<f32>,
    pub grad_weight: Vec<f32>,
    pub grad_bias: Option<Vec<f32>>,
}

pub fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// The unfused path on an autodiff backend: the whole logits (matmul, plus
/// the bias broadcast over the rows), Burn's `log_softmax`, a gather of the
/// targets, the weighted sum; gradients by autodiff.
pub fn unfused<A: AutodiffBackend>(p: &Problem) -> Output {
    let device = Default::default();
    let hidden = p.hidden::<A>(&device).require_grad();
    let weight = p.weight::<A>(&device).require_grad();
    let bias = p.bias::<A>(&device).map(|b| b.require_grad());
    let mut logits = hidden.clone().matmul(weight.clone().transpose());
    if let Some(b) = &bias {
        logits = logits + b.clone().unsqueeze_dim::<2>(0);
    }
    let logp = log_softmax(logits, 1);
    let safe: Vec<i64> = p
        .targets
        .iter()
        .map(|&x| if x == IGNORE_INDEX { 0 } else { x })
        .collect();
    let mask: Vec<f32> = p
        .targets
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x == IGNORE_INDEX {
                0.0
            } else {
                p.weights.as_ref().map_or(1.0, |w| w[i])
            }
        })
        .collect();
    let picked = logp
        .gather(
            1,
            Tensor::<A, 2, Int>::from_data(TensorData::new(safe, [p.t, 1]), &device),
        )
        .reshape([p.t]);
    let mask = Tensor::<A, 1>::from_data(TensorData::new(mask, [p.t]), &device);
    let loss = (picked.neg() * mask).sum();
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    Output {
        loss: value,
        grad_hidden: values(hidden.grad(&grads).unwrap()),
        grad_weight: values(weight.grad(&grads).unwrap()),
        grad_bias: bias.map(|b| values(b.grad(&grads).unwrap())),
    }
}

/// `max |a - b| / max |b|` (0 when both are all zeros).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0_f64, |m, &x| m.max((x as f64).abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0_f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if diff == 0.0 { 0.0 } else { diff / scale }
}

pub fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

/// NdArray with the defaults.
pub type Cpu = NdArray;
