//! AdamW on an NdArray shard in one pass over host memory.
//!
//! Burn's `AdamW` runs about 15 tensor ops per parameter, each a pass over
//! the shard and a new allocation, on one thread: on the main job's 7.2 M
//! parameters at world 1 that is about 40 ms of a 500 ms step. This step
//! reads the parameter, gradient and both moments once and writes them
//! once, on the current Rayon pool, with Burn's arithmetic in Burn's order
//! (every operation an `f32` IEEE operation, as NdArray's), so the result is
//! bit-identical to Burn's `AdamW` (`tests` below). It takes AdamW without
//! AMSGrad or cautious weight decay, on `f32` NdArray tensors; anything
//! else goes to Burn's `AdamW`.

use std::any::Any;

use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_ndarray::{NdArray, NdArrayTensor};
use rayon::prelude::*;

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HostAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl HostAdamW {
    /// The hyper-parameters of `config`, or `None` where this step does not
    /// apply (AMSGrad, cautious weight decay). `AdamWConfig`'s fields are
    /// private: they are read from its serialised form.
    pub(crate) fn from_config(config: &AdamWConfig) -> Option<HostAdamW> {
        let value = serde_json::to_value(config).ok()?;
        let flag = |key: &str| value.get(key).and_then(serde_json::Value::as_bool);
        if flag("amsgrad") != Some(false) || flag("cautious_weight_decay") != Some(false) {
            return None;
        }
        let number = |key: &str| value.get(key)?.as_f64().map(|x| x as f32);
        Some(HostAdamW {
            beta_1: number("beta_1")?,
            beta_2: number("beta_2")?,
            epsilon: number("epsilon")?,
            weight_decay: number("weight_decay")?,
        })
    }
}

/// The f32 values of a contiguous NdArray tensor, if `t` is one (also the
/// slice copy of `gather::primitive_to_vec`).
pub(crate) fn host_values<P: 'static>(t: &P) -> Option<&[f32]> {
    match (t as &dyn Any).downcast_ref::<NdArrayTensor>()? {
        NdArrayTensor::F32(storage) => storage.view().to_slice(),
        _ => None,
    }
}

/// `values` as an NdArray tensor primitive of type `P` (`None` if `P` is
/// not NdArray's).
fn primitive<P: 'static>(values: Vec<f32>) -> Option<P> {
    let array = ndarray::Array1::from(values).into_shared().into_dyn();
    let t: Box<dyn Any> = Box::new(NdArrayTensor::from(array));
    t.downcast::<P>().ok().map(|b| *b)
}

/// Burn's AdamW arithmetic on one block of elements.
#[derive(Clone, Copy)]
struct Kernel {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    lr: f32,
}

impl Kernel {
    /// A step with moments: `moments(j)` gives element `j`'s, `decay` the
    /// decayed parameter.
    #[inline(always)]
    // Five slices in lockstep: an index reads clearest.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn run(
        self,
        g: &[f32],
        p: &[f32],
        out_p: &mut [f32],
        out_m1: &mut [f32],
        out_m2: &mut [f32],
        moments: impl Fn(usize) -> (f32, f32),
        decay: impl Fn(f32) -> f32,
    ) {
        for j in 0..out_p.len() {
            let (m1, m2) = moments(j);
            let a = m1 * self.b1 + g[j] * self.f1;
            let b = m2 * self.b2 + (g[j] * g[j]) * self.f2;
            self.finish(j, a, b, p, out_p, out_m1, out_m2, &decay);
        }
    }

    /// The first step: the moments start from the gradient.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn first(
        self,
        g: &[f32],
        p: &[f32],
        out_p: &mut [f32],
        out_m1: &mut [f32],
        out_m2: &mut [f32],
        decay: impl Fn(f32) -> f32,
    ) {
        for j in 0..out_p.len() {
            let a = g[j] * self.f1;
            let b = (g[j] * g[j]) * self.f2;
            self.finish(j, a, b, p, out_p, out_m1, out_m2, &decay);
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        j: usize,
        a: f32,
        b: f32,
        p: &[f32],
        out_p: &mut [f32],
        out_m1: &mut [f32],
        out_m2: &mut [f32],
        decay: &impl Fn(f32) -> f32,
    ) {
        let delta = (a / self.c1) / ((b / self.c2).sqrt() + self.eps);
        out_p[j] = decay(p[j]) - delta * self.lr;
        out_m1[j] = a;
        out_m2[j] = b;
    }
}

/// Elements per Rayon task.
const BLOCK: usize = 1 << 14;

/// One AdamW step of the shard `param` (a primitive of `B`) with the
/// gradient `grad` and the optimizer state `state` (`S` is `AdamWState<B,
/// 1>`), at learning rate `lr`: the new shard and state. Gives back the
/// inputs where it does not apply (`B` is not `f32` NdArray).
#[allow(clippy::type_complexity)]
pub(crate) fn step<B: Backend, S: 'static>(
    h: &HostAdamW,
    lr: f64,
    param: B::FloatTensorPrimitive,
    grad: &[f32],
    state: Option<S>,
) -> Result<(B::FloatTensorPrimitive, S), (B::FloatTensorPrimitive, Option<S>)> {
    type Nd = NdArray<f32, i64, i8>;
    let Some(p) = host_values(&param) else {
        return Err((param, state));
    };
    if p.len() != grad.len() {
        return Err((param, state));
    }
    // The moments as host slices, when there is a state of NdArray's AdamW.
    let moments = match &state {
        None => None,
        Some(s) => {
            let Some(s) = (s as &dyn Any).downcast_ref::<AdamWState<Nd, 1>>() else {
                return Err((param, state));
            };
            let m = &s.momentum;
            if m.max_moment_2.is_some() {
                return Err((param, state));
            }
            let m1 = m.moment_1.clone().into_primitive().tensor();
            let m2 = m.moment_2.clone().into_primitive().tensor();
            Some((m.time, m1, m2))
        }
    };
    let (time, m1, m2) = match &moments {
        None => (1, None, None),
        Some((time, m1, m2)) => {
            let (Some(a), Some(b)) = (host_values(m1), host_values(m2)) else {
                return Err((param, state));
            };
            if a.len() != p.len() || b.len() != p.len() {
                return Err((param, state));
            }
            (time + 1, Some(a), Some(b))
        }
    };
    // Burn's scalars, each rounded to f32 where Burn's op rounds it.
    let (b1, b2, eps) = (h.beta_1, h.beta_2, h.epsilon);
    let (f1, f2) = (1.0 - b1, 1.0 - b2);
    let c1 = 1f32 - b1.powi(time as i32);
    let c2 = 1f32 - b2.powi(time as i32);
    let decay_rate = lr * h.weight_decay as f64;
    let keep = (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32);
    let lr = lr as f32;
    let n = p.len();
    let (mut new_p, mut new_m1, mut new_m2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    new_p
        .par_chunks_mut(BLOCK)
        .zip(new_m1.par_chunks_mut(BLOCK))
        .zip(new_m2.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(i, ((out_p, out_m1), out_m2))| {
            let at = i * BLOCK;
            let end = at + out_p.len();
            let (g, p) = (&grad[at..end], &p[at..end]);
            let moments = m1.zip(m2).map(|(m1, m2)| (&m1[at..end], &m2[at..end]));
            let k = Kernel {
                b1,
                b2,
                f1,
                f2,
                c1,
                c2,
                eps,
                lr,
            };
            // One loop per case, branch-free inside (it vectorises).
            match (moments, keep) {
                (Some((m1, m2)), Some(keep)) => k.run(
                    g,
                    p,
                    out_p,
                    out_m1,
                    out_m2,
                    |j| (m1[j], m2[j]),
                    |x| x * keep,
                ),
                (Some((m1, m2)), None) => {
                    k.run(g, p, out_p, out_m1, out_m2, |j| (m1[j], m2[j]), |x| x)
                }
                (None, Some(keep)) => k.first(g, p, out_p, out_m1, out_m2, |x| x * keep),
                (None, None) => k.first(g, p, out_p, out_m1, out_m2, |x| x),
            }
        });
    let moment = |values: Vec<f32>| {
        primitive::<burn::tensor::ops::FloatTensor<Nd>>(values)
            .map(|t| Tensor::<Nd, 1>::from_primitive(TensorPrimitive::Float(t)))
    };
    let (Some(new_param), Some(moment_1), Some(moment_2)) = (
        primitive::<B::FloatTensorPrimitive>(new_p),
        moment(new_m1),
        moment(new_m2),
    ) else {
        return Err((param, state));
    };
    let new_state: Box<dyn Any> = Box::new(AdamWState::<Nd, 1> {
        momentum: AdaptiveMomentumState {
            time,
            moment_1,
            moment_2,
            max_moment_2: None,
        },
    });
    match new_state.downcast::<S>() {
        Ok(s) => Ok((new_param, *s)),
        Err(_) => Err((param, state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::SimpleOptimizer;
    use burn::tensor::TensorData;

    type Nd = NdArray<f32, i64, i8>;

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    fn tensor(values: &[f32]) -> Tensor<Nd, 1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    fn values(t: Tensor<Nd, 1>) -> Vec<u32> {
        t.into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Five steps against Burn's `AdamW`, bit for bit: parameters and both
    /// moments, with and without weight decay, over a length that is not a
    /// multiple of the block.
    #[test]
    fn bit_identical_to_burns_adamw() {
        for (weight_decay, lr) in [(0.0, 1e-3), (0.1, 3e-4), (1e-4, 0.05)] {
            let config = AdamWConfig::new()
                .with_beta_1(0.85)
                .with_beta_2(0.995)
                .with_epsilon(1e-7)
                .with_weight_decay(weight_decay);
            let host = HostAdamW::from_config(&config).unwrap();
            let burn_adamw = config.build();
            let n = BLOCK * 2 + 1234;
            let mut burn_p = tensor(&random(n, 1, 2.0));
            let mut host_p = burn_p.clone().into_primitive().tensor();
            let mut burn_state: Option<AdamWState<Nd, 1>> = None;
            let mut host_state: Option<AdamWState<Nd, 1>> = None;
            for i in 0..5 {
                let grad = random(n, 10 + i, 0.01 * (i + 1) as f32);
                let (p, s) =
                    SimpleOptimizer::<Nd>::step(&burn_adamw, lr, burn_p, tensor(&grad), burn_state);
                (burn_p, burn_state) = (p, s);
                let (p, s) =
                    super::step::<Nd, AdamWState<Nd, 1>>(&host, lr, host_p, &grad, host_state)
                        .unwrap_or_else(|_| panic!("the host step applies"));
                (host_p, host_state) = (p, Some(s));
                let host_t =
                    Tensor::<Nd, 1>::from_primitive(TensorPrimitive::Float(host_p.clone()));
                assert!(
                    values(host_t) == values(burn_p.clone()),
                    "parameters, step {i}"
                );
                let (b, h) = (
                    burn_state.as_ref().unwrap().momentum.clone(),
                    host_state.as_ref().unwrap().momentum.clone(),
                );
                assert_eq!(b.time, h.time);
                assert!(
                    values(b.moment_1) == values(h.moment_1),
                    "moment 1, step {i}"
                );
                assert!(
                    values(b.moment_2) == values(h.moment_2),
                    "moment 2, step {i}"
                );
            }
        }
    }

    #[test]
    fn amsgrad_and_cautious_decay_stay_with_burn() {
        assert!(HostAdamW::from_config(&AdamWConfig::new().with_amsgrad(true)).is_none());
        assert!(
            HostAdamW::from_config(&AdamWConfig::new().with_cautious_weight_decay(true)).is_none()
        );
        assert!(HostAdamW::from_config(&AdamWConfig::new()).is_some());
    }
}
