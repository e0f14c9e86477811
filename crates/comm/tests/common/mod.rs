//! What the collective suites share (the threads engine's `collectives.rs`
//! and the MPI suite `mpi/`): the naive reference reduction.

use mics_comm::{Element, ReduceOp};

/// The naive reduction, element by element: widen to f32, combine in rank
/// order, divide for the mean, round once.
pub fn reference_reduce<E: Element>(inputs: &[Vec<E>], op: ReduceOp) -> Vec<E> {
    let len = inputs[0].len();
    (0..len)
        .map(|i| {
            let mut acc = inputs[0][i].to_f32();
            for input in &inputs[1..] {
                let v = input[i].to_f32();
                acc = match op {
                    ReduceOp::Sum | ReduceOp::Mean => acc + v,
                    ReduceOp::Max => acc.max(v),
                };
            }
            if op == ReduceOp::Mean {
                acc /= inputs.len() as f32;
            }
            E::from_f32(acc)
        })
        .collect()
}
