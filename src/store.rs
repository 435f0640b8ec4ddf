//! .qdelta files: a safetensors container whose `__metadata__` describes a
//! compressed fine-tune (docs/FORMAT.md, "File format"). Writing is atomic
//! (temporary file, fsync, rename, fsync of the directory); reading maps the
//! file and validates only the header, so opening is O(header) and tensor
//! bytes are paged in when touched. `verify` checks every tensor checksum.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::bitplane::{words_per_row, ScaleMode, MAX_PLANES};
use crate::error::{Error, Result};
use crate::header::{
    Dtype, Header, TensorInfo, UniqueKeys, MAX_HEADER_LEN, METADATA_KEY, PREFIX_LEN,
};
use crate::pool;

pub const FORMAT_NAME: &str = "qdelta";
/// The newest version this crate reads and writes. Version 2 lets layers with
/// identical deltas (tied embeddings and head) share one planes/scales pair;
/// a file without such sharing is written as version 1, which every reader
/// of this format reads.
pub const FORMAT_VERSION: u32 = 2;
/// Versions without shared layer tensors.
const UNSHARED_VERSION: u32 = 1;
/// Names the bit layout of docs/FORMAT.md ("Bit layout").
pub const BIT_LAYOUT: &str = "sign-planes/u32-le/lsb-first/in-axis/v1";
pub const CREATOR: &str = concat!("qdelta ", env!("CARGO_PKG_VERSION"));
/// Suffixes of a layer's tensors after its module name.
pub const PLANES_SUFFIX: &str = ".qdelta_planes";
pub const SCALES_SUFFIX: &str = ".qdelta_scales";

/// `__metadata__` keys.
pub mod keys {
    pub const FORMAT: &str = "format";
    pub const VERSION: &str = "format_version";
    pub const BIT_LAYOUT: &str = "bit_layout";
    pub const TENANT: &str = "tenant";
    pub const CREATOR: &str = "creator";
    pub const BASE_FINGERPRINT: &str = "base_fingerprint";
    pub const LAYERS: &str = "layers";
    pub const PARAMS: &str = "params";
    pub const CHECKSUMS: &str = "checksums";
    pub const CHECKSUM_ALGORITHM: &str = "checksum_algorithm";
    pub const USER: &str = "user_metadata";
    /// Optional: XXH3-64 of the rest of the header (`header_digest`). Files
    /// written before it existed have none; `verify` then says so.
    pub const HEADER_CHECKSUM: &str = "header_checksum";
    /// Every key a reader requires.
    pub const REQUIRED: [&str; 10] = [
        FORMAT,
        VERSION,
        BIT_LAYOUT,
        TENANT,
        CREATOR,
        BASE_FINGERPRINT,
        LAYERS,
        PARAMS,
        CHECKSUMS,
        CHECKSUM_ALGORITHM,
    ];
    /// Every key a writer may add besides the required ones.
    pub const OPTIONAL: [&str; 2] = [USER, HEADER_CHECKSUM];
}
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";

/// One row of the layer table (the `layers` metadata value, keyed by module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// `[out, in]` of the delta.
    pub shape: [usize; 2],
    pub bits: usize,
    /// "matrix" or "row".
    pub scale: String,
    pub transposed: bool,
    pub planes: String,
    pub scales: String,
}

/// A validated .qdelta header.
#[derive(Clone, Debug)]
pub struct Contents {
    pub header: Header,
    pub metadata: BTreeMap<String, String>,
    pub version: u32,
    pub tenant: String,
    pub creator: String,
    pub base_fingerprint: String,
    pub layers: BTreeMap<String, LayerEntry>,
    pub params: Vec<String>,
    pub checksums: BTreeMap<String, u64>,
    pub user: BTreeMap<String, String>,
}

fn fmt_err(msg: String) -> Error {
    Error::Format(msg)
}

fn json<'a, T: Deserialize<'a>>(
    meta: &'a BTreeMap<String, String>,
    key: &str,
    what: &str,
) -> Result<T> {
    serde_json::from_str(&meta[key]).map_err(|e| {
        fmt_err(format!(
            "metadata {key:?}: expected {what}, found invalid JSON ({e})"
        ))
    })
}

/// Parses and validates a whole .qdelta file image (header and table only;
/// tensor bytes are not read).
pub fn parse(file: &[u8]) -> Result<Contents> {
    let header = Header::parse(file)?;
    let meta = header.metadata.clone().ok_or_else(|| {
        fmt_err(format!(
            "not a qdelta file: the safetensors header has no {METADATA_KEY:?} entry"
        ))
    })?;
    match meta.get(keys::FORMAT) {
        Some(f) if f == FORMAT_NAME => {}
        Some(f) => {
            return Err(fmt_err(format!(
                "not a qdelta file: metadata \"format\" is {f:?}, expected {FORMAT_NAME:?}"
            )))
        }
        None => {
            return Err(fmt_err(
                "not a qdelta file: missing required metadata key \"format\"".into(),
            ))
        }
    }
    let version_text = meta
        .get(keys::VERSION)
        .ok_or_else(|| fmt_err("missing required metadata key \"format_version\"".into()))?;
    // A plain decimal integer: `str::parse` alone would take "+1", and
    // leading zeros would give one version several spellings.
    let plain = !version_text.is_empty()
        && version_text.bytes().all(|b| b.is_ascii_digit())
        && (version_text.len() == 1 || !version_text.starts_with('0'));
    if !plain {
        return Err(fmt_err(format!(
            "metadata \"format_version\": expected a decimal integer without sign, spaces or \
             leading zeros (\"1\" or \"2\"), found {version_text:?}"
        )));
    }
    // Too many digits for a u32 is a (far) future version too.
    let version = version_text
        .parse::<u32>()
        .ok()
        .filter(|v| (UNSHARED_VERSION..=FORMAT_VERSION).contains(v))
        .ok_or_else(|| {
            Error::UnsupportedVersion(format!(
                "unsupported .qdelta format version {version_text}: this qdelta ({CREATOR}) \
                 reads versions {UNSHARED_VERSION} to {FORMAT_VERSION}"
            ))
        })?;
    if let Some(missing) = keys::REQUIRED.iter().find(|k| !meta.contains_key(**k)) {
        return Err(fmt_err(format!(
            "missing required metadata key {missing:?}"
        )));
    }
    // Versions own the key set: an unknown key is damage (one flipped bit in
    // "header_checksum" would otherwise turn header verification off).
    let known = |k: &str| keys::REQUIRED.contains(&k) || keys::OPTIONAL.contains(&k);
    if let Some(unknown) = meta.keys().find(|k| !known(k)) {
        return Err(fmt_err(format!(
            "unknown metadata key {unknown:?}: format version {version} has only {:?} and \
             optionally {:?} (free-form metadata goes in \"user_metadata\")",
            keys::REQUIRED,
            keys::OPTIONAL
        )));
    }
    if meta[keys::BIT_LAYOUT] != BIT_LAYOUT {
        return Err(fmt_err(format!(
            "unknown bit layout {:?}: expected {BIT_LAYOUT:?}",
            meta[keys::BIT_LAYOUT]
        )));
    }
    if meta[keys::CHECKSUM_ALGORITHM] != CHECKSUM_ALGORITHM {
        return Err(fmt_err(format!(
            "unknown checksum algorithm {:?}: expected {CHECKSUM_ALGORITHM:?}",
            meta[keys::CHECKSUM_ALGORITHM]
        )));
    }
    check_fingerprint(&meta[keys::BASE_FINGERPRINT]).map_err(fmt_err)?;
    if let Some(h) = meta.get(keys::HEADER_CHECKSUM) {
        parse_hex16(h).ok_or_else(|| {
            fmt_err(format!(
                "metadata \"header_checksum\": expected 16 lowercase hex digits, found {h:?}"
            ))
        })?;
    }
    // Objects refuse duplicate keys, as the outer header does: serde_json would
    // keep the last one, hiding an edited or damaged entry.
    let layers: BTreeMap<String, LayerEntry> =
        json::<UniqueKeys<_>>(&meta, keys::LAYERS, "the layer table object")?.0;
    let params: Vec<String> = json(&meta, keys::PARAMS, "a list of tensor names")?;
    let mut listed = BTreeSet::new();
    if let Some(twice) = params.iter().find(|p| !listed.insert(p.as_str())) {
        return Err(fmt_err(format!(
            "metadata \"params\" lists tensor {twice:?} twice"
        )));
    }
    let hex: BTreeMap<String, String> =
        json::<UniqueKeys<_>>(&meta, keys::CHECKSUMS, "an object of hex checksums")?.0;
    let user: BTreeMap<String, String> = match meta.get(keys::USER) {
        Some(_) => json::<UniqueKeys<_>>(&meta, keys::USER, "an object of strings")?.0,
        None => BTreeMap::new(),
    };

    // Every tensor is used exactly once: by a layer or as a parameter; from
    // version 2 on, a layer's tensors may also serve other layers (tied
    // weights), never a parameter. Owners are recorded as borrowed names and
    // described only when a check fails (opening is on the serving path: no
    // allocation per tensor).
    #[derive(Clone, Copy)]
    enum Owner<'a> {
        Layer(&'a str),
        Params,
    }
    let describe = |o: Owner<'_>| match o {
        Owner::Layer(name) => format!("layer {name:?}"),
        Owner::Params => "the params list".to_string(),
    };
    let claims = layers
        .iter()
        .flat_map(|(name, e)| {
            [
                (e.planes.as_str(), Owner::Layer(name)),
                (e.scales.as_str(), Owner::Layer(name)),
            ]
        })
        .chain(params.iter().map(|p| (p.as_str(), Owner::Params)));
    let mut owner: BTreeMap<&str, Owner<'_>> = BTreeMap::new();
    for (tensor, by) in claims {
        if header.get(tensor).is_none() {
            return Err(fmt_err(format!(
                "{} refers to tensor {tensor:?}, which is not in the file",
                describe(by)
            )));
        }
        if let Some(prev) = owner.insert(tensor, by) {
            let shared = matches!((prev, by), (Owner::Layer(_), Owner::Layer(_)));
            if !(shared && version > UNSHARED_VERSION) {
                return Err(fmt_err(format!(
                    "tensor {tensor:?} is claimed by both {} and {}{}",
                    describe(prev),
                    describe(by),
                    if shared {
                        format!(" (layers share tensors from format version {FORMAT_VERSION} on, this file is version {version})")
                    } else {
                        String::new()
                    }
                )));
            }
        }
    }
    if let Some(t) = header
        .tensors
        .iter()
        .find(|t| !owner.contains_key(t.name.as_str()))
    {
        return Err(fmt_err(format!(
            "tensor {:?} is neither a layer's planes/scales nor a listed param",
            t.name
        )));
    }
    for (name, e) in &layers {
        check_layer(name, e, &header)?;
    }

    let mut checksums = BTreeMap::new();
    for t in &header.tensors {
        let h = hex.get(&t.name).ok_or_else(|| {
            fmt_err(format!(
                "metadata \"checksums\" has no entry for tensor {:?}",
                t.name
            ))
        })?;
        let v = parse_hex16(h).ok_or_else(|| {
            fmt_err(format!(
                "checksum of tensor {:?}: expected 16 lowercase hex digits, found {h:?}",
                t.name
            ))
        })?;
        checksums.insert(t.name.clone(), v);
    }
    if let Some(extra) = hex.keys().find(|k| header.get(k).is_none()) {
        return Err(fmt_err(format!(
            "metadata \"checksums\" names tensor {extra:?}, which is not in the file"
        )));
    }
    Ok(Contents {
        version,
        tenant: meta[keys::TENANT].clone(),
        creator: meta[keys::CREATOR].clone(),
        base_fingerprint: meta[keys::BASE_FINGERPRINT].clone(),
        metadata: meta,
        header,
        layers,
        params,
        checksums,
        user,
    })
}

fn is_lower_hex(s: &str, digits: usize) -> bool {
    s.len() == digits && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The value of exactly 16 lowercase hex digits (the form the spec gives
/// checksums: `from_str_radix` alone takes uppercase and a leading `+`).
fn parse_hex16(s: &str) -> Option<u64> {
    is_lower_hex(s, 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// Digits of a base fingerprint: XXH3-128 as lowercase hex (docs/FORMAT.md,
/// "Base fingerprint"; `crate::fingerprint`).
pub const FINGERPRINT_DIGITS: usize = 32;

/// Ok for a fingerprint of the documented form, else the message (without
/// a path) saying what was expected and found.
fn check_fingerprint(fp: &str) -> std::result::Result<(), String> {
    if is_lower_hex(fp, FINGERPRINT_DIGITS) {
        return Ok(());
    }
    Err(format!(
        "metadata \"base_fingerprint\": expected {FINGERPRINT_DIGITS} lowercase hex digits \
         (qdelta.fingerprint of the base), found {fp:?}"
    ))
}

/// XXH3-64 (seed 0) of the canonical form of a header: every tensor entry
/// (sorted by name) and every metadata entry (sorted by key) except
/// `header_checksum` itself. `str(s)` is the byte length as a little-endian
/// u64, then the UTF-8 bytes; numbers are little-endian u64s:
///
/// "qdelta-header-v1" u64(tensor count)
/// per tensor: str(name) str(dtype) u64(ndim) u64(dim)... u64(begin) u64(end)
/// u64(metadata count) per entry: str(key) str(value)
///
/// Independent of the JSON's spelling (key order, whitespace, padding), so
/// any faithful re-serialisation keeps it; any change of a name, dtype,
/// shape, offset or metadata value changes it.
pub fn header_digest<'a>(
    tensors: impl IntoIterator<Item = &'a TensorInfo>,
    metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> u64 {
    fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_u64(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    let mut tensors: Vec<&TensorInfo> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut meta: Vec<(&str, &str)> = metadata
        .into_iter()
        .filter(|(k, _)| *k != keys::HEADER_CHECKSUM)
        .collect();
    meta.sort();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"qdelta-header-v1");
    put_u64(&mut out, tensors.len() as u64);
    for t in tensors {
        put_str(&mut out, &t.name);
        put_str(&mut out, t.dtype.name());
        put_u64(&mut out, t.shape.len() as u64);
        for &d in &t.shape {
            put_u64(&mut out, d as u64);
        }
        put_u64(&mut out, t.begin as u64);
        put_u64(&mut out, t.end as u64);
    }
    put_u64(&mut out, meta.len() as u64);
    for (k, v) in meta {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    xxh3_64(&out)
}

fn check_layer(name: &str, e: &LayerEntry, header: &Header) -> Result<()> {
    let bad = |m: String| fmt_err(format!("layer {name:?}: {m}"));
    let [out, inp] = e.shape;
    if out == 0 || inp == 0 {
        return Err(bad(format!(
            "expected a non-empty shape, found {:?}",
            e.shape
        )));
    }
    if e.bits == 0 || e.bits > MAX_PLANES {
        return Err(bad(format!(
            "bits: expected 1..={MAX_PLANES}, found {}",
            e.bits
        )));
    }
    let mode = ScaleMode::parse(&e.scale).map_err(|err| bad(err.to_string()))?;
    let expect = |t: &TensorInfo, dtype: Dtype, shape: Vec<usize>| -> Result<()> {
        if t.dtype != dtype || t.shape != shape {
            return Err(bad(format!(
                "tensor {:?}: expected {} {shape:?}, found {} {:?}",
                t.name,
                dtype.name(),
                t.dtype.name(),
                t.shape
            )));
        }
        Ok(())
    };
    let planes = header.get(&e.planes).expect("claimed above");
    expect(planes, Dtype::U32, vec![e.bits, out, words_per_row(inp)])?;
    let scales = header.get(&e.scales).expect("claimed above");
    let scale_shape = match mode {
        ScaleMode::Matrix => vec![e.bits],
        ScaleMode::Row => vec![e.bits, out],
    };
    expect(scales, Dtype::F32, scale_shape)
}

/// A memory-mapped, header-validated .qdelta file.
pub struct DeltaFile {
    pub path: PathBuf,
    /// Kept open so the current size and modification time can be compared
    /// with the mapped file's (`check_unchanged`) with one fstat of this
    /// inode, not of the path: a file renamed over the path leaves the
    /// mapping on the old inode, which stays intact.
    file: File,
    map: Mmap,
    /// The opened file's modification time when it was mapped (`None` where
    /// the platform has none).
    mtime: Option<std::time::SystemTime>,
    pub contents: Contents,
}

fn file_err(path: &Path, action: &str, e: std::io::Error) -> Error {
    Error::File(format!("cannot {action} {}: {e}", path.display()))
}

/// What a non-regular file is, for the error message.
fn file_kind(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
    }
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

fn expect_regular(path: &Path, meta: &fs::Metadata) -> Result<()> {
    regular_or(path, meta, "a regular .qdelta file", "")
}

/// Ok for a regular file, else a File error: "`path`: expected `expected`,
/// found `via`a FIFO" (or whatever kind `meta` is).
fn regular_or(path: &Path, meta: &fs::Metadata, expected: &str, via: &str) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(Error::File(format!(
        "{}: expected {expected}, found {via}a {}",
        path.display(),
        file_kind(&meta.file_type())
    )))
}

/// Opens for reading without blocking on a FIFO swapped in after the type
/// check. The flag changes nothing for a regular file, which is only mapped.
fn open_no_wait(path: &Path) -> std::io::Result<File> {
    let mut o = fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO with O_NONBLOCK returns at once instead of waiting for a writer.
        o.custom_flags(libc::O_NONBLOCK);
    }
    o.open(path)
}

/// The bytes of the regular file `path`, read with `DeltaFile::open`'s rules: a
/// FIFO, device, socket or directory is a File error naming what was found
/// (checked before opening and on the opened file, opened without blocking),
/// never a hang or an endless read of /dev/zero.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let expected = "a regular file";
    let meta = fs::metadata(path).map_err(|e| file_err(path, "open", e))?;
    regular_or(path, &meta, expected, "")?;
    let mut file = open_no_wait(path).map_err(|e| file_err(path, "open", e))?;
    let meta = file.metadata().map_err(|e| file_err(path, "stat", e))?;
    regular_or(path, &meta, expected, "")?;
    // try_reserve: a huge (or sparse) file is an error, where a failed
    // allocation would abort the process.
    let mut data = Vec::new();
    usize::try_from(meta.len())
        .ok()
        .and_then(|n| data.try_reserve_exact(n).ok())
        .ok_or_else(|| {
            Error::File(format!(
                "{}: expected a file that fits in memory, found {} bytes",
                path.display(),
                meta.len()
            ))
        })?;
    std::io::Read::read_to_end(&mut file, &mut data).map_err(|e| file_err(path, "read", e))?;
    Ok(data)
}

impl DeltaFile {
    pub fn open(path: &Path) -> Result<DeltaFile> {
        // Check the type before opening: opening a FIFO blocks until a writer
        // appears, and opening a device may have side effects.
        let meta = fs::metadata(path).map_err(|e| file_err(path, "open", e))?;
        expect_regular(path, &meta)?;
        let file = open_no_wait(path).map_err(|e| file_err(path, "open", e))?;
        // Again on what was opened: the path may have been swapped meanwhile.
        let meta = file.metadata().map_err(|e| file_err(path, "stat", e))?;
        expect_regular(path, &meta)?;
        if meta.len() < PREFIX_LEN as u64 {
            return Err(fmt_err(format!(
                "{}: file is truncated: expected at least {PREFIX_LEN} bytes, found {}",
                path.display(),
                meta.len()
            )));
        }
        let mtime = meta.modified().ok();
        // SAFETY: the mapping is read-only. qdelta never modifies a published
        // file in place (writers rename a new file over it), so the bytes stay
        // valid for the life of the mapping; a file another program rewrites
        // in place is caught by `check_unchanged` before its bytes are handed out.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, "map", e))?;
        // Rewritten between the fstat and the mapping: the size or time
        // recorded would not be the mapped file's.
        let again = file.metadata().map_err(|e| file_err(path, "stat", e))?;
        if again.len() != map.len() as u64 || again.modified().ok() != mtime {
            return Err(Error::File(format!(
                "{}: the file changed while it was being opened: it is being rewritten in \
                 place; replace .qdelta files by rename (qdelta writes do)",
                path.display()
            )));
        }
        let contents = parse(&map).map_err(|e| prefix_path(e, path))?;
        Ok(DeltaFile {
            path: path.to_path_buf(),
            file,
            map,
            mtime,
            contents,
        })
    }

    pub fn nbytes(&self) -> usize {
        self.map.len()
    }

    /// Refuses a file that was rewritten in place since it was mapped: pages
    /// past a truncation read as a SIGBUS (a crash), not as an error, and a
    /// same-size rewrite (`cp other.qdelta this.qdelta` of the same
    /// architecture) would hand out the new file's bytes through the old
    /// header. Compares the size and the modification time of the mapped
    /// inode (one fstat per call). The change time is not compared: renaming
    /// another file over the path, deleting it or a chmod change it, and the
    /// mapping stays valid in all three. This narrows the race but cannot
    /// close it: a rewrite after the check still shows, a truncation still
    /// faults, and a rewrite within the file system's timestamp granularity
    /// of the mapping's own time is not seen. Only replacing files by
    /// rename, as `write_atomic` does, is safe.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| file_err(&self.path, "stat", e))?;
        let now = meta.len();
        let was = self.map.len() as u64;
        if now != was {
            return Err(Error::File(format!(
                "{}: the file changed size while mapped (was {was} bytes, now {now}): it was \
                 rewritten in place; replace .qdelta files by rename (qdelta writes do)",
                self.path.display()
            )));
        }
        let mtime = meta.modified().ok();
        if mtime != self.mtime {
            let show = |t: Option<std::time::SystemTime>| match t
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                Some(d) => format!("{}.{:09} s", d.as_secs(), d.subsec_nanos()),
                None => "unknown".into(),
            };
            return Err(Error::File(format!(
                "{}: the file changed while mapped (same size, {was} bytes, but its \
                 modification time was {}, now {}): it was rewritten in place; replace \
                 .qdelta files by rename (qdelta writes do)",
                self.path.display(),
                show(self.mtime),
                show(mtime)
            )));
        }
        Ok(())
    }

    fn slice(&self, t: &TensorInfo) -> &[u8] {
        let start = self.contents.header.data_start;
        &self.map[start + t.begin..start + t.end]
    }

    /// The bytes of tensor `name` inside the mapping.
    pub fn bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let t = self.contents.header.get(name).ok_or_else(|| {
            Error::Value(format!("{}: no tensor named {name:?}", self.path.display()))
        })?;
        self.check_unchanged()?;
        Ok((t, self.slice(t)))
    }

    /// Whether the header carries a `header_checksum` (files written before
    /// it existed do not): only then does `verify` cover the tensor table and
    /// the metadata as well as the tensor bytes.
    pub fn header_covered(&self) -> bool {
        self.contents.metadata.contains_key(keys::HEADER_CHECKSUM)
    }

    /// Checks the header checksum (when the file has one) and every tensor
    /// against its checksum (in parallel); returns the number of tensors
    /// checked.
    pub fn verify(&self) -> Result<usize> {
        self.check_unchanged()?;
        let header = self.contents.metadata.get(keys::HEADER_CHECKSUM).map(|h| {
            let want = parse_hex16(h).expect("checked by parse");
            let got = header_digest(
                &self.contents.header.tensors,
                self.contents
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            (want, got)
        });
        // On the crate's pool, not rayon's global one: see `pool` (fork).
        let mut bad: Vec<String> = pool::install(|| {
            self.contents
                .header
                .tensors
                .par_iter()
                .filter_map(|t| {
                    let data = self.slice(t);
                    let want = self.contents.checksums[&t.name];
                    let got = xxh3_64(data);
                    (got != want)
                        .then(|| format!("{:?} (expected {want:016x}, found {got:016x})", t.name))
                })
                .collect()
        });
        let header_bad = match header {
            Some((want, got)) if want != got => Some(format!(
                "the header fails its {CHECKSUM_ALGORITHM} checksum (expected {want:016x}, \
                 found {got:016x}): tensor names, dtypes, shapes, offsets, the layer table or \
                 other metadata were changed"
            )),
            _ => None,
        };
        if bad.is_empty() {
            if let Some(h) = header_bad {
                return Err(Error::Checksum(format!(
                    "{}: {h}; the file is corrupt",
                    self.path.display()
                )));
            }
            return Ok(self.contents.header.tensors.len());
        }
        bad.sort();
        let n = bad.len();
        bad.truncate(5);
        Err(Error::Checksum(format!(
            "{}: {}{n} tensor(s) fail their {CHECKSUM_ALGORITHM} checksum, the file is corrupt: {}{}",
            self.path.display(),
            header_bad.map(|h| format!("{h}; ")).unwrap_or_default(),
            bad.join(", "),
            if n > 5 { ", ..." } else { "" }
        )))
    }
}

fn prefix_path(e: Error, path: &Path) -> Error {
    let p = path.display();
    match e {
        Error::Format(m) => Error::Format(format!("{p}: {m}")),
        Error::UnsupportedVersion(m) => Error::UnsupportedVersion(format!("{p}: {m}")),
        Error::DType(m) => Error::Format(format!("{p}: {m}")),
        other => other,
    }
}

/// A tensor to write: little-endian bytes plus dtype and shape.
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// One compressed layer to write.
pub struct LayerData<'a> {
    pub name: String,
    pub shape: [usize; 2],
    pub bits: usize,
    pub scale: ScaleMode,
    pub transposed: bool,
    /// u32 `[bits, out, words]` as bytes.
    pub planes: &'a [u8],
    /// f32 `[bits]` or `[bits, out]` as bytes.
    pub scales: &'a [u8],
}

/// Everything a .qdelta file holds.
pub struct DeltaData<'a> {
    pub layers: Vec<LayerData<'a>>,
    pub params: Vec<TensorData<'a>>,
    pub tenant: String,
    pub base_fingerprint: String,
    pub user: BTreeMap<String, String>,
}

/// The complete file image's header (length prefix + padded JSON) and the
/// tensors in data-section order.
fn build<'a>(d: &'a DeltaData<'a>) -> Result<(Vec<u8>, Vec<TensorData<'a>>)> {
    // A file no reader would open is refused before anything is written.
    check_fingerprint(&d.base_fingerprint).map_err(|m| {
        Error::Value(m.replacen("metadata \"base_fingerprint\"", "base_fingerprint", 1))
    })?;
    let mut tensors: Vec<TensorData<'a>> = Vec::new();
    let mut table = BTreeMap::new();
    let mut shares = false;
    for (i, l) in d.layers.iter().enumerate() {
        let [out, inp] = l.shape;
        let mode = match l.scale {
            ScaleMode::Matrix => "matrix",
            ScaleMode::Row => "row",
        };
        // A layer with the same delta as an earlier one (tied weights) names
        // that layer's tensors instead of storing them again.
        let twin = d.layers[..i].iter().find(|t| same_delta(t, l));
        let owner = twin.map_or(&l.name, |t| &t.name);
        let entry = LayerEntry {
            shape: l.shape,
            bits: l.bits,
            scale: mode.into(),
            transposed: l.transposed,
            planes: format!("{owner}{PLANES_SUFFIX}"),
            scales: format!("{owner}{SCALES_SUFFIX}"),
        };
        if twin.is_some() {
            shares = true;
            if table.insert(l.name.clone(), entry).is_some() {
                return Err(Error::Value(format!("layer {:?} given twice", l.name)));
            }
            continue;
        }
        tensors.push(TensorData {
            name: entry.planes.clone(),
            dtype: Dtype::U32,
            shape: vec![l.bits, out, words_per_row(inp)],
            data: l.planes,
        });
        tensors.push(TensorData {
            name: entry.scales.clone(),
            dtype: Dtype::F32,
            shape: match l.scale {
                ScaleMode::Matrix => vec![l.bits],
                ScaleMode::Row => vec![l.bits, out],
            },
            data: l.scales,
        });
        if table.insert(l.name.clone(), entry).is_some() {
            return Err(Error::Value(format!("layer {:?} given twice", l.name)));
        }
    }
    for p in &d.params {
        tensors.push(TensorData {
            name: p.name.clone(),
            dtype: p.dtype,
            shape: p.shape.clone(),
            data: p.data,
        });
    }
    let mut names = BTreeSet::new();
    for t in &tensors {
        if t.name == METADATA_KEY {
            return Err(Error::Value(format!(
                "tensor name {METADATA_KEY:?} is reserved by the safetensors header (name the param otherwise)"
            )));
        }
        if !names.insert(t.name.as_str()) {
            return Err(Error::Value(format!(
                "tensor name {:?} is used twice (a param named like a layer's planes/scales?)",
                t.name
            )));
        }
        let want = t
            .shape
            .iter()
            .try_fold(t.dtype.size(), |a, &b| a.checked_mul(b));
        if want != Some(t.data.len()) {
            return Err(Error::Shape(format!(
                "tensor {:?}: {} {:?} needs {} bytes, found {}",
                t.name,
                t.dtype.name(),
                t.shape,
                want.map(|w| w.to_string()).unwrap_or("too many".into()),
                t.data.len()
            )));
        }
    }
    for (name, e) in &table {
        if e.shape[0] == 0 || e.shape[1] == 0 || e.bits == 0 || e.bits > MAX_PLANES {
            return Err(Error::Shape(format!(
                "layer {name:?}: expected a non-empty shape and 1..={MAX_PLANES} bits, found {:?} with {} bits",
                e.shape, e.bits
            )));
        }
    }
    // Widest dtypes first: every tensor then starts aligned to its element size.
    tensors.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(&b.name))
    });
    // On the crate's pool, not rayon's global one: see `pool` (fork).
    let checksums: BTreeMap<String, String> = pool::install(|| {
        tensors
            .par_iter()
            .map(|t| (t.name.clone(), format!("{:016x}", xxh3_64(t.data))))
            .collect()
    });

    let to_json = |v: &dyn erased::Json| v.json();
    let mut meta = BTreeMap::new();
    meta.insert(keys::FORMAT, FORMAT_NAME.to_string());
    let version = if shares {
        FORMAT_VERSION
    } else {
        UNSHARED_VERSION
    };
    meta.insert(keys::VERSION, version.to_string());
    meta.insert(keys::BIT_LAYOUT, BIT_LAYOUT.to_string());
    meta.insert(keys::TENANT, d.tenant.clone());
    meta.insert(keys::CREATOR, CREATOR.to_string());
    meta.insert(keys::BASE_FINGERPRINT, d.base_fingerprint.clone());
    meta.insert(keys::LAYERS, to_json(&table));
    meta.insert(
        keys::PARAMS,
        to_json(&d.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()),
    );
    meta.insert(keys::CHECKSUM_ALGORITHM, CHECKSUM_ALGORITHM.to_string());
    meta.insert(keys::CHECKSUMS, to_json(&checksums));
    meta.insert(keys::USER, to_json(&d.user));

    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in &tensors {
        infos.push(TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            begin: offset,
            end: offset + t.data.len(),
        });
        offset += t.data.len();
    }
    let digest = header_digest(&infos, meta.iter().map(|(k, v)| (*k, v.as_str())));
    meta.insert(keys::HEADER_CHECKSUM, format!("{digest:016x}"));

    let mut head = serde_json::Map::new();
    head.insert(
        METADATA_KEY.into(),
        serde_json::to_value(&meta).expect("strings"),
    );
    for t in infos {
        head.insert(
            t.name,
            serde_json::json!({
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "data_offsets": [t.begin, t.end],
            }),
        );
    }
    let mut text = serde_json::to_vec(&head).expect("json of strings and numbers");
    // Pad with spaces so the data section starts 8-byte aligned.
    text.resize(text.len().next_multiple_of(8), b' ');
    // The reader refuses a longer header: never publish a file it cannot open.
    if text.len() as u64 > MAX_HEADER_LEN {
        let user: usize = d.user.iter().map(|(k, v)| k.len() + v.len()).sum();
        return Err(Error::Value(format!(
            "header: expected at most {MAX_HEADER_LEN} bytes (the limit readers accept), \
             found {} bytes, {user} of them user metadata keys and values \
             (keep large data out of the metadata)",
            text.len()
        )));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    Ok((out, tensors))
}

/// Whether two layers' planes and scales are the same tensors (shape, scale
/// granularity and bytes): `[out, in]` and the orientation may differ only in
/// the `transposed` flag, which stays per layer.
fn same_delta(a: &LayerData<'_>, b: &LayerData<'_>) -> bool {
    a.shape == b.shape
        && a.bits == b.bits
        && a.scale == b.scale
        && a.planes.len() == b.planes.len()
        && a.scales == b.scales
        && a.planes == b.planes
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("serialisable")
        }
    }
}

/// Writes `d` to `path` atomically: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory (best effort: see
/// `write_atomic_with`). Readers that mapped the old file keep it (its
/// inode lives until they unmap it).
pub fn write(path: &Path, d: &DeltaData<'_>) -> Result<()> {
    let (head, tensors) = build(d)?;
    write_atomic(path, |w| {
        w.write_all(&head)?;
        for t in &tensors {
            w.write_all(t.data)?;
        }
        Ok(())
    })
}

/// Runs `fill` on a temporary file beside `path`, then publishes it under
/// `path`; on any failure the temporary file is removed and `path` untouched.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_with(path, fill, sync_dir)
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A temporary name beside the target. Short, whatever the target's length
/// (a long target name plus a suffix would exceed NAME_MAX), and unique per
/// process (pid), call (counter) and pid reuse after a crash (clock). It
/// keeps the `.tmp-` marker that tests look for (tests/test_store.py).
fn temp_name() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{TEMP_PREFIX}{}-{seq}-{nanos}", std::process::id())
}

/// How every temporary name of `temp_name` starts.
const TEMP_PREFIX: &str = ".qdelta.tmp-";

/// The writer's pid of a name `temp_name` makes (`.qdelta.tmp-PID-SEQ-NANOS`,
/// three decimal numbers), `None` for any other name.
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let mut parts = rest.split('-');
    let fields: [&str; 3] = [parts.next()?, parts.next()?, parts.next()?];
    if parts.next().is_some()
        || fields
            .iter()
            .any(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    fields[0].parse().ok()
}

/// Whether process `pid` exists: `Some(false)` only when the system says
/// there is no such process (`kill(pid, 0)` fails with ESRCH; a process of
/// another user answers EPERM and counts as alive). `None` where it cannot
/// be told (no such call on this platform, a pid out of range).
fn process_alive(pid: u32) -> Option<bool> {
    #[cfg(unix)]
    {
        let pid = libc::pid_t::try_from(pid).ok().filter(|&p| p > 0)?;
        // SAFETY: signal 0 sends nothing; it only checks that `pid` exists.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return Some(true);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => Some(false),
            Some(libc::EPERM) => Some(true),
            _ => None,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        None
    }
}

/// Takes the writer's lock on a temporary file it has just created: an
/// exclusive `flock`, held until the file is closed (or the writer dies).
/// Best effort: a file system without locks leaves only the pid check of
/// `sweep_stale_temps`.
fn lock_temp(file: &File) {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor this function borrows.
        let _ = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    }
    #[cfg(not(unix))]
    let _ = file;
}

/// Whether temporary file `path` may be removed as a dead writer's: its
/// pid is gone and nobody holds its lock (`lock_temp`; this catches a live
/// writer whose pid this process cannot see, e.g. from another pid
/// namespace sharing the directory). A file that cannot be opened to check
/// is kept.
fn temp_is_stale(path: &Path, pid: u32) -> bool {
    if process_alive(pid) != Some(false) {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let Ok(f) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        else {
            return false;
        };
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return false;
        }
        // SAFETY: flock on the descriptor of `f`, which lives to the end of
        // the block; the lock goes with it.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            // EWOULDBLOCK: a live writer holds it. Any other error: this
            // file system has no locks, and the pid check decides.
            return std::io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK);
        }
        true
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Removes, best effort, the temporary files of writers that died before
/// they could (a SIGKILL, a power loss): `temp_name` files in `dir` whose
/// writer is gone (`temp_is_stale`). The names do not say which target a
/// temporary was for, so every dead writer's temporary in the directory
/// goes. A live writer's temporary is never touched, nor anything that is
/// not a regular file of that exact name form.
fn sweep_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_pid) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        if temp_is_stale(&path, pid) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The permission bits (with set-id and sticky bits) of the file `path`
/// names, following a link as the rename replaces what it points to: a
/// rewrite keeps them. `None` for a new path (the new file then gets those
/// of a plainly created file, 0o666 less the umask).
fn existing_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.permissions().mode() & 0o7777)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The rename would put a regular file in place of whatever `path` names: a
/// FIFO, socket or device node someone relies on would be lost, so anything
/// but a new path, a regular file or a link to one is refused. A link to a
/// regular file is replaced by the new file (the link itself, as always);
/// a dangling link counts as a new path. Errors of the lookups are left to
/// the write itself, which reports them.
fn check_write_target(path: &Path) -> Result<()> {
    let Ok(own) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let (meta, via) = if own.file_type().is_symlink() {
        match fs::metadata(path) {
            Ok(m) => (m, "a symbolic link to "),
            Err(_) => return Ok(()),
        }
    } else {
        (own, "")
    };
    regular_or(path, &meta, "a regular file (or a new path) to write", via)
}

/// `write_atomic` with the directory sync as a parameter, so tests can make
/// it fail.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
    sync_dir: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.file_name().is_none() {
        return Err(Error::File(format!(
            "{}: expected a file path",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(Error::File(format!(
            "{}: expected a file path, found a directory",
            path.display()
        )));
    }
    check_write_target(path)?;
    let keep_mode = existing_mode(path);
    sweep_stale_temps(&dir);
    let tmp = dir.join(temp_name());
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if let Some(mode) = keep_mode {
        use std::os::unix::fs::OpenOptionsExt;
        // Never wider than the old file while it is written (the umask can
        // only narrow it); the exact bits are set before the rename.
        options.mode(mode & 0o777);
    }
    // Not removed on failure: if it exists, it is not ours.
    let file = options.open(&tmp).map_err(|e| file_err(path, "write", e))?;
    lock_temp(&file);
    let result = (|| -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        #[cfg(unix)]
        if let Some(mode) = keep_mode {
            use std::os::unix::fs::PermissionsExt;
            // A file system without modes keeps what it has (as
            // qdelta.atomic_io does).
            let _ = file.set_permissions(fs::Permissions::from_mode(mode));
        }
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(file_err(path, "write", e));
    }
    // The rename has published the new file: the write has happened, and
    // reporting it as failed would be false (and a retry pointless). The
    // directory sync only makes the rename survive a power loss, so it is
    // best effort and its error is deliberately ignored.
    let _ = sync_dir(&dir);
    Ok(())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
