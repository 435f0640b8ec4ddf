//! A strict reader of safetensors headers: the container every .qdelta file is.
//!
//! Layout: 8 bytes little-endian `u64` header length `N`, `N` bytes of UTF-8
//! JSON, then the data section. The JSON maps tensor names to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
//! data section) plus an optional `"__metadata__"` string-to-string map.
//!
//! Stricter than the format demands where leniency would hide corruption:
//! duplicate keys, unknown fields, gaps, overlaps, trailing bytes and a
//! dtype/shape that disagrees with the byte length are all errors. Every
//! check says what was expected and what was found; nothing here panics on
//! any input (fuzzed: fuzz/fuzz_targets/header.rs).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Bytes of the little-endian header-length prefix.
pub const PREFIX_LEN: usize = 8;
/// The largest header accepted (the reference reader's limit too).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// The key of the string-to-string metadata map.
pub const METADATA_KEY: &str = "__metadata__";

/// Element types a tensor may have (safetensors names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    pub fn parse(name: &str) -> Result<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
                Error::DType(format!(
                    "dtype: expected one of {}, found {name:?}",
                    known.join(", ")
                ))
            })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

/// One tensor of the file; `begin..end` is relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A validated header: every tensor lies inside the data section, tensors
/// tile it exactly (sorted by offset), and each byte length matches its
/// dtype and shape.
#[derive(Clone, Debug)]
pub struct Header {
    /// `None` when the file has no `__metadata__` entry.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Sorted by `begin`.
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_start: usize,
    index: BTreeMap<String, usize>,
}

fn format_err(msg: String) -> Error {
    Error::Format(msg)
}

impl Header {
    /// Parses and validates the header of a whole safetensors file.
    pub fn parse(file: &[u8]) -> Result<Header> {
        if file.len() < PREFIX_LEN {
            return Err(format_err(format!(
                "file is truncated: expected at least {PREFIX_LEN} bytes (the header length), \
                 found {} byte(s)",
                file.len()
            )));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&file[..PREFIX_LEN]);
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_LEN {
            return Err(format_err(format!(
                "header length {header_len} is larger than the limit of {MAX_HEADER_LEN} bytes \
                 (not a safetensors file, or a corrupt one)"
            )));
        }
        let available = (file.len() - PREFIX_LEN) as u64;
        if header_len > available {
            return Err(format_err(format!(
                "file is truncated: the header declares {header_len} bytes but only \
                 {available} follow the length prefix"
            )));
        }
        let header_len = header_len as usize;
        let data_start = PREFIX_LEN + header_len;
        let text = std::str::from_utf8(&file[PREFIX_LEN..data_start]).map_err(|e| {
            format_err(format!(
                "header is not valid UTF-8: invalid byte at header offset {}",
                e.valid_up_to()
            ))
        })?;
        if !text.starts_with('{') {
            return Err(format_err(format!(
                "header is not a JSON object: expected it to start with '{{', found {:?}",
                text.chars().next().map(String::from).unwrap_or_default()
            )));
        }
        let raw: RawHeader = serde_json::from_str(text)
            .map_err(|e| format_err(format!("header is not valid safetensors JSON: {e}")))?;
        Self::validate(raw, data_start, file.len() - data_start)
    }

    fn validate(raw: RawHeader, data_start: usize, data_len: usize) -> Result<Header> {
        let mut tensors = Vec::with_capacity(raw.tensors.len());
        for (name, entry) in raw.tensors {
            let bad = |what: String| format_err(format!("tensor {name:?}: {what}"));
            let dtype = Dtype::parse(&entry.dtype).map_err(|e| bad(e.to_string()))?;
            let [begin, end] = entry.data_offsets;
            if begin > end {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}]: expected begin <= end"
                )));
            }
            if end > data_len as u64 {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] out of range: the data section has \
                     {data_len} bytes (file truncated?)"
                )));
            }
            let mut numel: u64 = 1;
            for &d in &entry.shape {
                numel = numel
                    .checked_mul(d)
                    .ok_or_else(|| bad(format!("shape {:?} overflows 64 bits", entry.shape)))?;
            }
            let want = numel
                .checked_mul(dtype.size() as u64)
                .ok_or_else(|| bad(format!("shape {:?} overflows 64 bits", entry.shape)))?;
            if want != end - begin {
                return Err(bad(format!(
                    "dtype {} with shape {:?} needs {want} bytes, but data_offsets \
                     [{begin}, {end}] hold {}",
                    dtype.name(),
                    entry.shape,
                    end - begin
                )));
            }
            // Every value is <= data_len here, so the casts cannot truncate.
            tensors.push(TensorInfo {
                name,
                dtype,
                shape: entry.shape.iter().map(|&d| d as usize).collect(),
                begin: begin as usize,
                end: end as usize,
            });
        }
        tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
        let mut covered = 0usize;
        let mut previous: Option<&TensorInfo> = None;
        for t in &tensors {
            if t.begin < covered {
                let other = previous.map(|p| p.name.as_str()).unwrap_or_default();
                return Err(format_err(format!(
                    "tensor {:?} (bytes {}..{}) overlaps tensor {other:?}, which ends at {covered}",
                    t.name, t.begin, t.end
                )));
            }
            if t.begin > covered {
                return Err(format_err(format!(
                    "gap in the data section: bytes {covered}..{} belong to no tensor \
                     (next tensor {:?})",
                    t.begin, t.name
                )));
            }
            covered = t.end;
            previous = Some(t);
        }
        if covered != data_len {
            return Err(format_err(format!(
                "the tensors cover {covered} bytes of data but the data section has \
                 {data_len} (trailing bytes or a damaged header)"
            )));
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Header {
            metadata: raw.metadata,
            tensors,
            data_start,
            index,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Bytes of all tensor data.
    pub fn data_len(&self) -> usize {
        self.tensors.last().map(|t| t.end).unwrap_or(0)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

struct RawHeader {
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<(String, RawTensor)>,
}

/// A JSON object whose duplicate keys are an error (serde_json keeps the last).
pub(crate) struct UniqueKeys<T>(pub(crate) BTreeMap<String, T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for UniqueKeys<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = UniqueKeys<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object with unique keys")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<T>()?;
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    out.insert(key, value);
                }
                Ok(UniqueKeys(out))
            }
        }
        de.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut metadata = None;
                let mut tensors: Vec<(String, RawTensor)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == METADATA_KEY {
                        if metadata.is_some() {
                            return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                        }
                        let m: UniqueKeys<String> = map.next_value()?;
                        metadata = Some(m.0);
                    } else {
                        let t: RawTensor = map.next_value()?;
                        tensors.push((key, t));
                    }
                }
                // Duplicate tensor names, found by sorting references (opening a
                // file allocates nothing per tensor for this check).
                let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
                names.sort_unstable();
                if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                    return Err(serde::de::Error::custom(format!(
                        "duplicate key {:?}",
                        w[0]
                    )));
                }
                Ok(RawHeader { metadata, tensors })
            }
        }
        de.deserialize_map(V)
    }
}
