//! The GPT-2 LM head on NdArray: fused linear + cross-entropy against the
//! unfused path (matmul, `log_softmax`, gather, weighted sum), forward and
//! backward on `Autodiff<NdArray>`, at T = 1024 tokens, H = 128, V = 50257.
//!
//! `cargo bench -p mics-fused --bench lm_head` (add `-- --quick` for a short
//! run). After Criterion's report, a direct timing (median of 3 runs each)
//! prints the fused / unfused time ratio for a few chunk sizes.

use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, black_box};
use mics_fused::{CrossEntropyOptions, linear_cross_entropy};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

// Plain: plain Burn, an autodiff backend under Burn's distributed autodiff too.
type B = Autodiff<mics_plain::Plain<NdArray>>;

const T: usize = 1024;
const H: usize = 128;
const V: usize = 50257;

struct Inputs {
    hidden: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<i64>,
}

fn inputs() -> Inputs {
    let mut rng = StdRng::seed_from_u64(0);
    let scale = 3.0 / (H as f32).sqrt();
    Inputs {
        hidden: (0..T * H).map(|_| rng.random_range(-1.0..1.0)).collect(),
        weight: (0..V * H)
            .map(|_| rng.random_range(-scale..scale))
            .collect(),
        targets: (0..T).map(|_| rng.random_range(0..V as i64)).collect(),
    }
}

/// Forward and backward; returns the loss and one gradient element, so that
/// nothing is optimised away.
fn step(inputs: &Inputs, chunk: Option<usize>) -> (f32, f32) {
    let device = Default::default();
    let hidden = Tensor::<B, 2>::from_data(TensorData::new(inputs.hidden.clone(), [T, H]), &device)
        .require_grad();
    let weight = Tensor::<B, 2>::from_data(TensorData::new(inputs.weight.clone(), [V, H]), &device)
        .require_grad();
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(inputs.targets.clone(), [T]), &device);
    let loss = match chunk {
        Some(chunk) => linear_cross_entropy(
            hidden.clone(),
            weight.clone(),
            None,
            targets,
            None,
            &CrossEntropyOptions::default().with_chunk_tokens(chunk),
        ),
        None => {
            let logp = log_softmax(hidden.clone().matmul(weight.clone().transpose()), 1);
            logp.gather(1, targets.reshape([T, 1])).neg().sum()
        }
    };
    let value = loss.clone().into_scalar();
    let grads = loss.backward();
    let gw = weight.grad(&grads).unwrap();
    let gh = hidden.grad(&grads).unwrap();
    let probe = gw.slice([0..1, 0..1]).into_scalar() + gh.slice([0..1, 0..1]).into_scalar();
    (value, probe)
}

fn median(inputs: &Inputs, chunk: Option<usize>) -> Duration {
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            let start = Instant::now();
            black_box(step(inputs, chunk));
            start.elapsed()
        })
        .collect();
    times.sort();
    times[1]
}

fn main() {
    let inputs = inputs();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15))
        .configure_from_args();
    let mut group = c.benchmark_group("lm_head T=1024 H=128 V=50257 forward+backward");
    group.bench_function("unfused", |b| b.iter(|| step(&inputs, None)));
    group.bench_function("fused chunk=256", |b| b.iter(|| step(&inputs, Some(256))));
    group.finish();
    c.final_summary();

    let (lu, _) = step(&inputs, None);
    let (lf, _) = step(&inputs, Some(256));
    println!("loss: unfused {lu}, fused {lf}");
    let unfused = median(&inputs, None);
    println!("unfused: {unfused:?} (median of 3)");
    for chunk in [64, 256, 1024] {
        let fused = median(&inputs, Some(chunk));
        println!(
            "fused chunk={chunk}: {fused:?} (median of 3), fused / unfused = {:.3}, speed-up {:.2}x",
            fused.as_secs_f64() / unfused.as_secs_f64(),
            unfused.as_secs_f64() / fused.as_secs_f64()
        );
    }
}
