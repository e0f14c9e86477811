//! Evaluation: the mean loss over fixed validation batches, on every rank.

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use mics_backend::Mics;
use mics_comm::{Collectives, ReduceOp};

use crate::family::ModelFamily;
use crate::trainer::{Train, Trainer};
use crate::{TrainBackend, TrainError};

impl<B, F> Trainer<'_, B, F>
where
    B: TrainBackend,
    F: ModelFamily,
    F::Model<Train<B>>: AutodiffModule<Train<B>, InnerModule = F::Model<Mics<B>>>,
{
    /// Mean validation loss over `train.eval_batches` fixed global batches
    /// (the same samples at every evaluation), without autodiff, the same on
    /// every rank.
    pub(crate) fn evaluate(&self) -> Result<f64, TrainError> {
        let c = &self.ctx.config;
        let (rank, n, s) = (self.comm.rank(), self.comm.size(), c.train.grad_accum);
        let model = self.model().valid();
        let data = &self.data;
        let mut sum = 0.0f32;
        for batch_index in 0..c.train.eval_batches {
            self.runtime.begin_step();
            let scale = self
                .task
                .global_scale(&data.val, || data.val_sampler.global_batch(batch_index))?;
            for micro in 0..s {
                let windows = data
                    .val_sampler
                    .micro_batch(batch_index, rank, n, s, micro)?;
                let batch = self.task.batch(&data.val, &windows, scale)?;
                let head = F::head(&model, batch.inputs(&self.device));
                let loss = batch.loss(head, &self.head, &self.device);
                sum += loss.into_scalar().elem::<f32>();
            }
        }
        let total = self.comm.all_reduce(vec![sum], ReduceOp::Sum).wait()?;
        Ok(f64::from(total[0]) / (n * s) as f64 / c.train.eval_batches.max(1) as f64)
    }
}
