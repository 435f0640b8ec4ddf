//! The element types a delta may come in, behind one small trait so the
//! packing loops are written once and monomorphised per type.

use half::{bf16, f16};

pub trait Float: Copy + Send + Sync + 'static {
    /// Name as users spell it (numpy / torch dtype names).
    const NAME: &'static str;
    /// The IEEE-754 sign bit as 0 or 1 (so -0.0 gives 1).
    fn sign_bit(self) -> u32;
    /// False for NaN and +-Inf.
    fn is_finite_value(self) -> bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn sign_bit(self) -> u32 {
        self.to_bits() >> 31
    }
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        self.to_bits() & 0x7f80_0000 != 0x7f80_0000
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn sign_bit(self) -> u32 {
        (self.to_bits() >> 15) as u32
    }
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        self.to_bits() & 0x7c00 != 0x7c00
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Float for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn sign_bit(self) -> u32 {
        (self.to_bits() >> 15) as u32
    }
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        self.to_bits() & 0x7f80 != 0x7f80
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Reinterpret raw 16-bit patterns (how numpy hands us float16 and bfloat16)
/// as the half type, without copying.
pub fn halves_from_bits<T: Float>(bits: &[u16]) -> &[T] {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    // SAFETY: f16 and bf16 are repr(transparent) over u16, every bit pattern
    // is a valid value, and size/alignment are checked above.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const T, bits.len()) }
}

/// The other direction, for handing owned half buffers back to numpy as u16.
pub fn halves_into_bits<T: Float>(v: Vec<T>) -> Vec<u16> {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same layout as u16 (checked above); ownership moves to the new Vec.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut u16, v.len(), v.capacity()) }
}
