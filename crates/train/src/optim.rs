//! The run's sharded optimizer: AdamW or SGD (`train.optimizer`), with the
//! run's clipping and loss scaling.

use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamW, AdamWConfig, Sgd, SgdConfig, SimpleOptimizer};
use burn::tensor::backend::AutodiffBackend;
use mics_backend::{
    LossScale, LossScaleState, Mics, MicsRuntime, ParamShardState, ShardedOptimizer, StateError,
};

use crate::{OptimConfig, OptimizerKind, Precision, TrainBackend};

/// One of Burn's optimizers on the shards.
pub(crate) enum Optim<B: TrainBackend> {
    AdamW(ShardedOptimizer<B, AdamW>),
    Sgd(ShardedOptimizer<B, Sgd<B>>),
}

/// Calls the same method on whichever optimizer it is.
macro_rules! each {
    ($self:expr, |$o:ident| $body:expr) => {
        match $self {
            Optim::AdamW($o) => $body,
            Optim::Sgd($o) => $body,
        }
    };
}

impl<B: TrainBackend> Optim<B> {
    /// The optimizer of `t` over `runtime`'s shards: global-norm clipping
    /// when `grad_clip > 0` (the norm tracked for the metrics either way),
    /// dynamic loss scaling in fp16.
    pub fn new(
        t: &OptimConfig,
        precision: Precision,
        bucket_bytes: usize,
        runtime: &Arc<MicsRuntime>,
    ) -> Optim<B> {
        let scaling = match precision {
            Precision::Fp16 => LossScale::dynamic_from(t.initial_loss_scale),
            Precision::Fp32 | Precision::Bf16 => LossScale::None,
        };
        fn finish<B: TrainBackend, O: SimpleOptimizer<B>>(
            o: ShardedOptimizer<B, O>,
            scaling: LossScale,
            clip: f32,
            bucket_bytes: usize,
        ) -> ShardedOptimizer<B, O> {
            let o = o
                .with_grad_norm_tracking()
                .with_loss_scale(scaling)
                .with_bucket_bytes(bucket_bytes);
            if clip > 0.0 {
                o.with_grad_clip_norm(clip)
            } else {
                o
            }
        }
        match t.optimizer {
            OptimizerKind::Adamw => {
                let config = AdamWConfig::new()
                    .with_beta_1(t.beta1)
                    .with_beta_2(t.beta2)
                    .with_epsilon(t.eps)
                    .with_weight_decay(t.weight_decay as f32);
                Optim::AdamW(finish(
                    ShardedOptimizer::adamw(&config, runtime),
                    scaling,
                    t.grad_clip,
                    bucket_bytes,
                ))
            }
            OptimizerKind::Sgd => {
                let mut config = SgdConfig::new();
                if t.weight_decay > 0.0 {
                    config = config
                        .with_weight_decay(Some(WeightDecayConfig::new(t.weight_decay as f32)));
                }
                if t.momentum > 0.0 {
                    config =
                        config.with_momentum(Some(MomentumConfig::new().with_momentum(t.momentum)));
                }
                Optim::Sgd(finish(
                    ShardedOptimizer::sgd(&config, runtime),
                    scaling,
                    t.grad_clip,
                    bucket_bytes,
                ))
            }
        }
    }

    pub fn accumulate<AB, M>(&mut self, module: &M, grads: AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        each!(self, |o| o.accumulate::<AB, M>(module, grads))
    }

    pub fn step<AB, M>(&mut self, lr: f64, module: M) -> M
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        each!(self, |o| o.step::<AB, M>(lr, module))
    }

    pub fn loss_scale(&self) -> f32 {
        each!(self, |o| o.loss_scale())
    }

    pub fn last_grad_norm(&self) -> Option<f32> {
        each!(self, |o| o.last_grad_norm())
    }

    pub fn last_step_skipped(&self) -> bool {
        each!(self, |o| o.last_step_skipped())
    }

    pub fn loss_scale_state(&self) -> LossScaleState {
        each!(self, |o| o.loss_scale_state())
    }

    pub fn restore_loss_scale(&mut self, state: LossScaleState) {
        each!(self, |o| o.restore_loss_scale(state))
    }

    pub fn export_state<AB, M>(&self, module: &M) -> Result<Vec<ParamShardState>, StateError>
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        each!(self, |o| o.export_state::<AB, M>(module))
    }

    pub fn import_state<AB, M>(
        &mut self,
        module: M,
        states: Vec<ParamShardState>,
    ) -> Result<M, StateError>
    where
        AB: AutodiffBackend<InnerBackend = Mics<B>>,
        M: AutodiffModule<AB>,
    {
        each!(self, |o| o.import_state::<AB, M>(module, states))
    }
}
