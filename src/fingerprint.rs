//! The base fingerprint: one hash over the names, dtypes, shapes and bytes of
//! a set of weights, so a delta can refuse a base it was not made against.
//!
//! Definition (docs/FORMAT.md, "Base fingerprint"): tensors sorted by name;
//! each tensor's bytes split into 8 MiB chunks, each chunk hashed with
//! XXH3-128 (chunks in parallel, so 1 GB takes a fraction of a second); the
//! result is XXH3-128 over, per tensor in order, the name, the dtype name,
//! the shape, the byte length and the chunk digests (every length and number
//! as little-endian u64). The chunk size is fixed, so the value does not
//! depend on the thread count. Returned as 32 lowercase hex digits.

use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::error::{Error, Result};
use crate::pool;

/// Bytes hashed per parallel task; part of the definition, never change it.
pub const CHUNK_BYTES: usize = 8 << 20;
const DOMAIN: &[u8] = b"qdelta-base-fingerprint-v1";

/// One named tensor as raw little-endian bytes.
pub struct Weight<'a> {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn put_u64(h: &mut Xxh3, v: u64) {
    h.update(&v.to_le_bytes());
}

fn put_str(h: &mut Xxh3, s: &str) {
    put_u64(h, s.len() as u64);
    h.update(s.as_bytes());
}

/// The fingerprint of `weights` (any order; duplicate names are an error).
pub fn fingerprint(weights: &mut [Weight<'_>]) -> Result<String> {
    weights.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = weights.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::Value(format!(
            "fingerprint: expected unique tensor names, found {:?} twice",
            w[0].name
        )));
    }
    // (tensor index, chunk) tasks over every tensor, hashed in parallel.
    let tasks: Vec<(usize, &[u8])> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.data.chunks(CHUNK_BYTES).map(move |c| (i, c)))
        .collect();
    // On the crate's pool, not rayon's global one: see `pool` (fork).
    let digests: Vec<(usize, u128)> = pool::install(|| {
        tasks
            .par_iter()
            .map(|&(i, chunk)| (i, xxh3_128(chunk)))
            .collect()
    });
    let mut h = Xxh3::new();
    h.update(DOMAIN);
    put_u64(&mut h, weights.len() as u64);
    let mut next = digests.iter().peekable();
    for (i, w) in weights.iter().enumerate() {
        put_str(&mut h, &w.name);
        put_str(&mut h, &w.dtype);
        put_u64(&mut h, w.shape.len() as u64);
        for &d in &w.shape {
            put_u64(&mut h, d as u64);
        }
        put_u64(&mut h, w.data.len() as u64);
        while let Some(&(_, d)) = next.next_if(|(j, _)| *j == i) {
            h.update(&d.to_le_bytes());
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w<'a>(name: &str, data: &'a [u8]) -> Weight<'a> {
        Weight {
            name: name.into(),
            dtype: "U8".into(),
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn order_independent_and_sensitive_to_everything() {
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let b: Vec<u8> = (0..77u32).map(|i| (i * 13 + 1) as u8).collect();
        let base = fingerprint(&mut [w("a", &a), w("b", &b)]).unwrap();
        assert_eq!(base.len(), 32);
        assert_eq!(base, fingerprint(&mut [w("b", &b), w("a", &a)]).unwrap());
        assert_ne!(base, fingerprint(&mut [w("a", &a), w("c", &b)]).unwrap());
        let mut flipped = a.clone();
        flipped[999] ^= 1;
        assert_ne!(
            base,
            fingerprint(&mut [w("a", &flipped), w("b", &b)]).unwrap()
        );
        let mut reshaped = [w("a", &a), w("b", &b)];
        reshaped[0].shape = vec![10, 100];
        assert_ne!(base, fingerprint(&mut reshaped).unwrap());
        let mut retyped = [w("a", &a), w("b", &b)];
        retyped[1].dtype = "I8".into();
        assert_ne!(base, fingerprint(&mut retyped).unwrap());
        // Moving bytes across the tensor boundary changes it too.
        assert_ne!(
            base,
            fingerprint(&mut [w("a", &a[..999]), w("b", &[&a[999..], &b[..]].concat())]).unwrap()
        );
    }

    #[test]
    fn multi_chunk_tensors_hash_every_chunk() {
        let big: Vec<u8> = (0..CHUNK_BYTES * 2 + 5).map(|i| (i % 251) as u8).collect();
        let base = fingerprint(&mut [w("big", &big)]).unwrap();
        let mut changed = big.clone();
        changed[CHUNK_BYTES + 17] ^= 0x80;
        assert_ne!(base, fingerprint(&mut [w("big", &changed)]).unwrap());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = fingerprint(&mut [w("x", b"ab"), w("x", b"cd")]).unwrap_err();
        assert!(err.to_string().contains("\"x\" twice"), "{err}");
    }
}
