//! Element-wise reductions and concatenation shared by the engines, so that
//! every engine and the tests' reference give bit-identical results: values
//! are combined in rank order, half types in f32.

use crate::{Buffer, DType, Element, ReduceOp};

/// Reduces `inputs[r][range]` over ranks `r` in rank order. All inputs have
/// the same element type.
pub fn reduce_range(inputs: &[&Buffer], range: std::ops::Range<usize>, op: ReduceOp) -> Buffer {
    match inputs[0].dtype() {
        DType::F32 => Buffer::F32(reduce_typed(inputs, range, op)),
        DType::Bf16 => Buffer::Bf16(reduce_typed(inputs, range, op)),
        DType::F16 => Buffer::F16(reduce_typed(inputs, range, op)),
    }
}

/// Concatenates buffers of one element type, in order.
pub fn concat(inputs: &[&Buffer]) -> Buffer {
    match inputs[0].dtype() {
        DType::F32 => Buffer::F32(concat_typed(inputs)),
        DType::Bf16 => Buffer::Bf16(concat_typed(inputs)),
        DType::F16 => Buffer::F16(concat_typed(inputs)),
    }
}

fn typed<E: Element>(buffer: &Buffer) -> &[E] {
    E::slice(buffer).expect("element types were checked to match across ranks")
}

fn concat_typed<E: Element>(inputs: &[&Buffer]) -> Vec<E> {
    let len = inputs.iter().map(|b| b.len()).sum();
    let mut out = Vec::with_capacity(len);
    for input in inputs {
        out.extend_from_slice(typed::<E>(input));
    }
    out
}

fn reduce_typed<E: Element>(
    inputs: &[&Buffer],
    range: std::ops::Range<usize>,
    op: ReduceOp,
) -> Vec<E> {
    let mut acc: Vec<f32> = typed::<E>(inputs[0])[range.clone()]
        .iter()
        .map(|x| x.to_f32())
        .collect();
    for input in &inputs[1..] {
        let src = &typed::<E>(input)[range.clone()];
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += s.to_f32();
                }
            }
            ReduceOp::Max => {
                for (a, s) in acc.iter_mut().zip(src) {
                    *a = a.max(s.to_f32());
                }
            }
        }
    }
    if op == ReduceOp::Mean {
        let p = inputs.len() as f32;
        for a in acc.iter_mut() {
            *a /= p;
        }
    }
    if E::DTYPE == DType::F32 {
        // Already the output type: reinterpret instead of converting again.
        return bytemuck::allocation::cast_vec(acc);
    }
    acc.into_iter().map(E::from_f32).collect()
}
