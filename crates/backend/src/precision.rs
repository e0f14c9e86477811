//! Mixed precision on the wire: the element types parameters are gathered
//! and gradients reduced in, and the conversions around the collectives.
//!
//! Shards, accumulated gradients and optimizer states stay `f32` (the master
//! copies); only what a collective moves is narrowed, and what it returns is
//! widened back to `f32` at once.

use std::sync::Arc;

use burn::tensor::{bf16, f16};
use mics_comm::{
    Collectives, Communicator, DType, Element, Fingerprint, MicsGroups, ReduceOp, Work,
};

/// The element types of the collectives of training (mixed precision).
///
/// Shards are kept as `f32` master copies and the optimizer (AdamW moments
/// included) steps them in `f32`; only the collectives narrow:
///
/// - `gather`: parameters are all-gathered in this type (the shard is
///   rounded to it before the all-gather, so the wire carries half the
///   bytes of `f32` in bf16), and the gathered value is widened back to the
///   parameter's dtype for compute: the forward and backward passes see
///   weights rounded to `gather`. A partition group of one rounds the same
///   way (no collective), so the numerics do not depend on p.
/// - `reduce`: gradients are reduce-scattered inside the partition group and
///   all-reduced across the replication group in this type: each rank's
///   `f32` gradient bucket is rounded to it before the collective, the
///   engines sum in `f32` in rank order and round the sum once (see
///   `mics_comm::Element`; NCCL sums in the element type), and the received
///   shard is widened and accumulated over micro-steps in `f32`. A group of
///   one rounds its gradient the same way.
///
/// `f16` gradients overflow above 65504: pair `reduce: DType::F16` with a
/// loss scale ([`LossScale`](crate::LossScale)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Precision {
    /// Element type of the parameter all-gathers.
    pub gather: DType,
    /// Element type of the gradient reduce-scatters and all-reduces.
    pub reduce: DType,
}

impl Precision {
    /// Everything in `f32` (the default).
    pub const FP32: Precision = Precision {
        gather: DType::F32,
        reduce: DType::F32,
    };
    /// Parameters gathered and gradients reduced in bf16.
    pub const BF16: Precision = Precision {
        gather: DType::Bf16,
        reduce: DType::Bf16,
    };
    /// Parameters gathered and gradients reduced in f16 (use a loss scale).
    pub const FP16: Precision = Precision {
        gather: DType::F16,
        reduce: DType::F16,
    };

    /// Gathers in `gather`, reduces in `reduce`.
    pub fn new(gather: DType, reduce: DType) -> Precision {
        Precision { gather, reduce }
    }
}

impl Default for Precision {
    fn default() -> Self {
        Precision::FP32
    }
}

fn narrow<E: Element>(values: &[f32]) -> Vec<E> {
    values.iter().map(|&x| E::from_f32(x)).collect()
}

fn widen<E: Element>(values: Vec<E>) -> Vec<f32> {
    values.into_iter().map(E::to_f32).collect()
}

/// `values` rounded to `dtype` (what a collective over a group of one
/// returns in that type), kept as `f32`.
pub(crate) fn rounded(dtype: DType, mut values: Vec<f32>) -> Vec<f32> {
    match dtype {
        DType::F32 => {}
        DType::Bf16 => values
            .iter_mut()
            .for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        DType::F16 => values
            .iter_mut()
            .for_each(|x| *x = f16::from_f32(*x).to_f32()),
    }
    values
}

/// All-gather of a shard inside the partition group, in `dtype` on the wire.
pub(crate) fn all_gather_partition(
    groups: &MicsGroups,
    dtype: DType,
    shard: Vec<f32>,
    tag: Fingerprint,
) -> Work<Vec<f32>> {
    match dtype {
        DType::F32 => groups.all_gather_partition_with(shard, tag),
        DType::Bf16 => groups
            .all_gather_partition_with(narrow::<bf16>(&shard), tag)
            .map(|v| Ok(widen(v))),
        DType::F16 => groups
            .all_gather_partition_with(narrow::<f16>(&shard), tag)
            .map(|v| Ok(widen(v))),
    }
}

/// Sum-reduce-scatter in `dtype` on the wire.
pub(crate) fn reduce_scatter(
    comm: &Arc<dyn Communicator>,
    dtype: DType,
    values: Vec<f32>,
    tag: Fingerprint,
) -> Work<Vec<f32>> {
    let op = ReduceOp::Sum;
    match dtype {
        DType::F32 => comm.reduce_scatter_with(values, op, tag),
        DType::Bf16 => comm
            .reduce_scatter_with(narrow::<bf16>(&values), op, tag)
            .map(|v| Ok(widen(v))),
        DType::F16 => comm
            .reduce_scatter_with(narrow::<f16>(&values), op, tag)
            .map(|v| Ok(widen(v))),
    }
}

/// Sum-all-reduce in `dtype` on the wire.
pub(crate) fn all_reduce(
    comm: &Arc<dyn Communicator>,
    dtype: DType,
    values: Vec<f32>,
    tag: Fingerprint,
) -> Work<Vec<f32>> {
    let op = ReduceOp::Sum;
    match dtype {
        DType::F32 => comm.all_reduce_with(values, op, tag),
        DType::Bf16 => comm
            .all_reduce_with(narrow::<bf16>(&values), op, tag)
            .map(|v| Ok(widen(v))),
        DType::F16 => comm
            .all_reduce_with(narrow::<f16>(&values), op, tag)
            .map(|v| Ok(widen(v))),
    }
}
