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

/// An empty vector with room for `len` elements. Large ones are backed by
/// transparent huge pages where the kernel offers them: a fresh 64 MiB
/// output otherwise costs 16 Ki page faults, which doubled the time of a
/// 64 MiB all-gather in the benchmark (`benches/collectives.rs`).
pub(crate) fn output_vec<E>(len: usize) -> Vec<E> {
    let mut out = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE_FROM: usize = 4 << 20;
        const PAGE: usize = 4096;
        let bytes = len * std::mem::size_of::<E>();
        if bytes >= HUGE_FROM {
            let start = (out.as_mut_ptr() as usize).next_multiple_of(PAGE);
            let end = (out.as_mut_ptr() as usize + bytes) & !(PAGE - 1);
            // SAFETY: [start, end) lies inside the allocation just made and
            // is page-aligned; MADV_HUGEPAGE only changes how the kernel
            // backs those pages, never their contents. Failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    out
}

fn concat_typed<E: Element>(inputs: &[&Buffer]) -> Vec<E> {
    let len = inputs.iter().map(|b| b.len()).sum();
    let mut out = output_vec(len);
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
    let mut acc: Vec<f32> = output_vec(range.len());
    acc.extend(
        typed::<E>(inputs[0])[range.clone()]
            .iter()
            .map(|x| x.to_f32()),
    );
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
