//! Training tasks: how token windows become batches, and batches a loss.
//!
//! A [`Task`] owns what depends on the objective: the window of tokens a
//! sample covers, how a micro-batch of windows becomes model inputs and
//! targets, and the scale that turns each rank's summed token losses into
//! the mean over the global batch. The loss itself is the fused LM head +
//! cross-entropy of `mics-fused`: the `[tokens, vocab]` logits never exist
//! whole.

use burn::tensor::{Int, Tensor, TensorData};
use mics_datasets::{IGNORE_INDEX, SpecialTokens, TokenFile, lm_batch, mlm_batch};
use mics_fused::{CrossEntropyOptions, FusedCrossEntropyBackend, linear_cross_entropy};

use crate::TrainError;
use crate::family::Head;

/// The objective a model family trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Next-token prediction over every position.
    CausalLm,
    /// Predicting the masked tokens (15% of positions, BERT's 80/10/10 rule).
    MaskedLm,
}

/// A task with what it needs to make batches: the dataset's special tokens
/// and vocabulary (masked LM), the sequence length and the seed.
#[derive(Debug, Clone)]
pub struct Task {
    kind: TaskKind,
    seq_len: usize,
    special: SpecialTokens,
    vocab_size: usize,
    seed: u64,
    /// Ranks × micro-steps: each rank's micro-batch loss is a share of it.
    shares: usize,
}

/// One micro-batch: the model's input ids `[batch, seq]`, the target of every
/// position (`IGNORE_INDEX` where nothing is predicted) and the factor that
/// turns the summed token losses into this micro-batch's share of the global
/// mean.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input ids, row-major `[batch, seq]`.
    pub input_ids: Vec<i64>,
    /// The target of every position, row-major; `IGNORE_INDEX` for none.
    pub targets: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq_len: usize,
    /// Multiplies the sum of the token losses.
    pub scale: f32,
}

impl Task {
    /// The task of `kind` for sequences of `seq_len` tokens, trained by
    /// `ranks` ranks with `micro_steps` micro-steps each per optimizer step.
    pub fn new(
        kind: TaskKind,
        seq_len: usize,
        special: SpecialTokens,
        vocab_size: usize,
        seed: u64,
        ranks: usize,
        micro_steps: usize,
    ) -> Task {
        Task {
            kind,
            seq_len,
            special,
            vocab_size,
            seed,
            shares: ranks * micro_steps,
        }
    }

    /// The objective.
    pub fn kind(&self) -> TaskKind {
        self.kind
    }

    /// Tokens a sample window covers: `seq_len + 1` for causal LM (inputs
    /// and the targets shifted by one), `seq_len - 2` for masked LM (wrapped
    /// in `[CLS] … [SEP]`).
    pub fn window(&self) -> usize {
        match self.kind {
            TaskKind::CausalLm => self.seq_len + 1,
            TaskKind::MaskedLm => self.seq_len - 2,
        }
    }

    /// The loss scale shared by every micro-batch of one global batch
    /// (`all`: its windows). Causal LM: the mean over a micro-batch's tokens,
    /// applied per micro-batch (`0`: see [`batch`](Self::batch)). Masked LM:
    /// `N·s / selected tokens of the whole global batch`, so that after the
    /// optimizer's `1/(N·s)` the gradient is that of the mean over the
    /// global batch's selected tokens, whatever the split over ranks.
    pub fn global_scale(
        &self,
        tokens: &TokenFile,
        all: impl FnOnce() -> Vec<usize>,
    ) -> Result<f32, TrainError> {
        Ok(match self.kind {
            TaskKind::CausalLm => 0.0,
            TaskKind::MaskedLm => {
                let total = self.mlm(tokens, &all())?.masked.max(1);
                self.shares as f32 / total as f32
            }
        })
    }

    fn mlm(
        &self,
        tokens: &TokenFile,
        windows: &[usize],
    ) -> Result<mics_datasets::MlmBatch, TrainError> {
        Ok(mlm_batch(
            tokens,
            windows,
            self.seq_len,
            &self.special,
            self.vocab_size,
            self.seed,
        )?)
    }

    /// The micro-batch of `windows`, with the scale from
    /// [`global_scale`](Self::global_scale).
    pub fn batch(
        &self,
        tokens: &TokenFile,
        windows: &[usize],
        global_scale: f32,
    ) -> Result<Batch, TrainError> {
        Ok(match self.kind {
            TaskKind::CausalLm => {
                let b = lm_batch(tokens, windows, self.seq_len);
                Batch {
                    input_ids: b.inputs.iter().map(|&id| i64::from(id)).collect(),
                    targets: b.targets.iter().map(|&id| i64::from(id)).collect(),
                    batch: b.batch,
                    seq_len: b.seq_len,
                    scale: 1.0 / (b.batch * b.seq_len).max(1) as f32,
                }
            }
            TaskKind::MaskedLm => {
                let b = self.mlm(tokens, windows)?;
                debug_assert!(b.labels.iter().all(|&l| l >= 0 || l == IGNORE_INDEX));
                Batch {
                    input_ids: b.input_ids.iter().map(|&id| i64::from(id)).collect(),
                    targets: b.labels,
                    batch: b.batch,
                    seq_len: b.seq_len,
                    scale: global_scale,
                }
            }
        })
    }
}

impl Batch {
    /// The input ids as a tensor.
    pub fn inputs<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Tensor<B, 2, Int> {
        let data = TensorData::new(self.input_ids.clone(), [self.batch, self.seq_len]);
        Tensor::from_data(data, device)
    }

    /// The loss of this micro-batch given what the model's head projects:
    /// the fused head + cross-entropy, summed over the predicted tokens and
    /// scaled by [`Batch::scale`].
    pub fn loss<B: FusedCrossEntropyBackend>(
        &self,
        head: Head<B>,
        options: &CrossEntropyOptions,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let n = self.batch * self.seq_len;
        let targets =
            Tensor::<B, 1, Int>::from_data(TensorData::new(self.targets.clone(), [n]), device);
        linear_cross_entropy(head.hidden, head.weight, head.bias, targets, None, options)
            * self.scale
    }
}
