//! Host buffers of the element types the collectives move.

use half::{bf16, f16};

/// Element type of a [`Buffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// A typed, owned host buffer: what a collective takes and returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

impl Buffer {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::Bf16(_) => DType::Bf16,
            Buffer::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::Bf16(v) => v.len(),
            Buffer::F16(v) => v.len(),
        }
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// A zero-filled buffer of `len` elements of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(vec![0.0; len]),
            DType::Bf16 => Buffer::Bf16(vec![bf16::ZERO; len]),
            DType::F16 => Buffer::F16(vec![f16::ZERO; len]),
        }
    }

    /// The raw bytes, native endian (what travels over MPI and NCCL).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Buffer::F32(v) => bytemuck::cast_slice(v),
            Buffer::Bf16(v) => bytemuck::cast_slice(v),
            Buffer::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The raw bytes, mutable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buffer::F32(v) => bytemuck::cast_slice_mut(v),
            Buffer::Bf16(v) => bytemuck::cast_slice_mut(v),
            Buffer::F16(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type the collectives move: `f32`, `bf16` or `f16`.
///
/// Reductions of the half types accumulate in f32, in rank order, and round
/// once at the end.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Wraps a vector into a [`Buffer`].
    fn into_buffer(values: Vec<Self>) -> Buffer;
    /// Unwraps a [`Buffer`] of this element type; `None` for another type.
    fn from_buffer(buffer: Buffer) -> Option<Vec<Self>>;
    /// Borrows a [`Buffer`] of this element type; `None` for another type.
    fn slice(buffer: &Buffer) -> Option<&[Self]>;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Rounds from f32.
    fn from_f32(value: f32) -> Self;
}

macro_rules! element {
    ($ty:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $ty {
            const DTYPE: DType = DType::$variant;
            fn into_buffer(values: Vec<Self>) -> Buffer {
                Buffer::$variant(values)
            }
            fn from_buffer(buffer: Buffer) -> Option<Vec<Self>> {
                match buffer {
                    Buffer::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice(buffer: &Buffer) -> Option<&[Self]> {
                match buffer {
                    Buffer::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn from_f32(value: f32) -> Self {
                $from(value)
            }
        }
    };
}

element!(f32, F32, |x: f32| x, |x: f32| x);
element!(bf16, Bf16, bf16::to_f32, bf16::from_f32);
element!(f16, F16, f16::to_f32, f16::from_f32);
