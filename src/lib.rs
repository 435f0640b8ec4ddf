//! qdelta core: bit-plane packing of weight deltas (and, in later modules,
//! the delta file store and CPU kernels). Pure Rust: numpy-shaped slices in,
//! owned buffers out; it never knows about torch. The PyO3 bindings live in
//! `python.rs` behind the `python` feature so `cargo test` needs no libpython.

pub mod args;
pub mod bitplane;
pub mod embedding;
pub mod error;
pub mod fingerprint;
pub mod float;
pub mod fused;
pub mod gemv;
pub mod header;
pub mod pool;
pub mod rmsnorm;
pub mod rowwise;
pub mod store;
#[cfg(test)]
mod test_support;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod python;
