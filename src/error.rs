//! One error type for the whole core. Each variant maps to one Python
//! exception class in the bindings, so messages are written for users:
//! they say what was expected and what was found.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape, length or size that does not fit the request.
    #[error("{0}")]
    Shape(String),
    /// An element type the operation does not take.
    #[error("{0}")]
    DType(String),
    /// NaN or Inf where finite numbers are required.
    #[error("{0}")]
    NonFinite(String),
    /// Any other argument out of its allowed range.
    #[error("{0}")]
    Value(String),
    /// A file that is not a valid .qdelta / safetensors file.
    #[error("{0}")]
    Format(String),
    /// A .qdelta file of a format version this build does not read.
    #[error("{0}")]
    UnsupportedVersion(String),
    /// Tensor bytes that do not match their recorded checksum.
    #[error("{0}")]
    Checksum(String),
    /// A file or directory that cannot be opened, read or written.
    #[error("{0}")]
    File(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The first of `values` outside `[lo, hi)`, with its position: for the index
/// checks whose messages then say what the values mean.
pub fn first_outside(values: &[i64], lo: i64, hi: usize) -> Option<(usize, i64)> {
    values
        .iter()
        .copied()
        .enumerate()
        .find(|&(_, v)| v < lo || v >= hi as i64)
}

/// `a * b`, or a `Shape` error naming what overflowed.
pub fn checked_mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::Shape(format!("{what}: {a} x {b} overflows the address space")))
}
