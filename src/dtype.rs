//! The element types logits may be stored in. Every op accumulates in f32 whatever the storage.

use half::{bf16, f16};

/// The storage type of a logits buffer, as a value (for error messages and the CUDA dispatch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE f32.
    F32,
    /// bfloat16 (`half::bf16`): f32's exponent, 8 bits of mantissa.
    BF16,
    /// IEEE half (`half::f16`): largest finite value 65504.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// A logits element: converts to f32 for accumulation and back (round-to-nearest-even) for storage.
pub trait LogitElement: Copy + Send + Sync + bytemuck::Pod + std::fmt::Debug + 'static {
    /// The element type as a value.
    const DTYPE: DType;
    /// Widens to f32 (exact for every type here).
    fn to_f32(self) -> f32;
    /// Narrows from f32, rounding to nearest even (overflow to ±inf for f16).
    fn from_f32(value: f32) -> Self;
}

impl LogitElement for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl LogitElement for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl LogitElement for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}
