//! Round trips, every bad-input class, and a bounded mutation fuzz of the
//! header parser on stable Rust (the libFuzzer target is fuzz/, `make fuzz`).

use super::*;
use crate::header::MAX_HEADER_LEN;

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn tmp_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qdelta-store-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.qdelta"))
}

/// A valid file image with two layers (matrix and row scales) and two params.
fn sample(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let words = words_per_row(45);
    let planes_a: Vec<u8> = (0..2 * 3 * words * 4).map(|_| rng.next() as u8).collect();
    let scales_a: Vec<u8> = [0.5f32, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let planes_b: Vec<u8> = (0..5 * words_per_row(7) * 4)
        .map(|_| rng.next() as u8)
        .collect();
    let scales_b: Vec<u8> = (0..5)
        .flat_map(|i| (i as f32 + 0.5).to_le_bytes())
        .collect();
    let emb: Vec<u8> = (0..6 * 2).map(|_| rng.next() as u8).collect();
    let step = 7i64.to_le_bytes();
    let d = DeltaData {
        layers: vec![
            LayerData {
                name: "model.q".into(),
                shape: [3, 45],
                bits: 2,
                scale: ScaleMode::Matrix,
                transposed: false,
                planes: &planes_a,
                scales: &scales_a,
            },
            LayerData {
                name: "model.k".into(),
                shape: [5, 7],
                bits: 1,
                scale: ScaleMode::Row,
                transposed: true,
                planes: &planes_b,
                scales: &scales_b,
            },
        ],
        params: vec![
            TensorData {
                name: "emb".into(),
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                data: &emb,
            },
            TensorData {
                name: "step".into(),
                dtype: Dtype::I64,
                shape: vec![],
                data: &step,
            },
        ],
        tenant: "alice".into(),
        base_fingerprint: "00112233445566778899aabbccddeeff".into(),
        user: BTreeMap::from([("note".to_string(), "x".to_string())]),
    };
    let (head, tensors) = build(&d).unwrap();
    let mut out = head;
    for t in &tensors {
        out.extend_from_slice(t.data);
    }
    out
}

/// Header JSON and the data section of a file image.
fn split(file: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let head = serde_json::from_slice(&file[8..8 + n]).unwrap();
    (head, file[8 + n..].to_vec())
}

fn join(head: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(head).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

fn with_meta(
    file: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Vec<u8> {
    let (mut head, data) = split(file);
    edit(head.get_mut(METADATA_KEY).unwrap().as_object_mut().unwrap());
    join(&head, &data)
}

fn err_of(file: &[u8]) -> Error {
    parse(file).expect_err("should be refused")
}

fn assert_format(file: &[u8], needle: &str) {
    let e = err_of(file);
    assert!(matches!(e, Error::Format(_)), "{e:?}");
    assert!(e.to_string().contains(needle), "{needle:?} not in {e}");
}

#[test]
fn sample_parses_and_matches_reference_reader() {
    let file = sample(1);
    let c = parse(&file).unwrap();
    assert_eq!(c.tenant, "alice");
    assert_eq!(c.layers.len(), 2);
    assert_eq!(c.params, vec!["emb", "step"]);
    assert!(c.layers["model.k"].transposed);
    assert_eq!(c.header.data_start % 8, 0);
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(st.len(), c.header.tensors.len());
    for t in &c.header.tensors {
        let view = st.tensor(&t.name).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice());
        assert_eq!(
            view.data(),
            &file[c.header.data_start + t.begin..c.header.data_start + t.end]
        );
        // Widest dtypes come first, so every tensor is aligned to its element.
        assert_eq!(
            (c.header.data_start + t.begin) % t.dtype.size(),
            0,
            "{}",
            t.name
        );
    }
}

#[test]
fn write_open_verify_and_detect_flipped_bits() {
    let path = tmp_path("roundtrip");
    fs::write(&path, sample(2)).unwrap();
    let f = DeltaFile::open(&path).unwrap();
    assert_eq!(f.verify().unwrap(), 6);
    let (info, bytes) = f.bytes("model.q.qdelta_planes").unwrap();
    assert_eq!(info.shape, vec![2, 3, 2]);
    assert_eq!(bytes.len(), 48);
    // Flip one bit in each tensor in turn: verify names exactly that tensor.
    let image = sample(2);
    for t in &f.contents.header.tensors {
        let mut bad = image.clone();
        bad[f.contents.header.data_start + t.begin] ^= 0x10;
        let p = tmp_path("flipped");
        fs::write(&p, &bad).unwrap();
        let e = DeltaFile::open(&p).unwrap().verify().unwrap_err();
        assert!(matches!(e, Error::Checksum(_)), "{e:?}");
        assert!(e.to_string().contains(&format!("{:?}", t.name)), "{e}");
    }
}

#[test]
fn atomic_write_replaces_without_touching_an_open_mapping() {
    let path = tmp_path("replace");
    fs::write(&path, sample(3)).unwrap();
    let old = DeltaFile::open(&path).unwrap();
    let before = old.bytes("emb").unwrap().1.to_vec();
    write_atomic(&path, |w| w.write_all(&sample(4))).unwrap();
    // The old mapping still reads the old, complete, valid file.
    assert_eq!(old.bytes("emb").unwrap().1, before.as_slice());
    assert_eq!(old.verify().unwrap(), 6);
    assert_eq!(fs::read(&path).unwrap(), sample(4));
    // A failing writer leaves the published file and no temporary behind.
    let e = write_atomic(&path, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
    assert!(
        matches!(e, Error::File(_)) && e.to_string().contains("disk full"),
        "{e}"
    );
    assert_eq!(fs::read(&path).unwrap(), sample(4));
    let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn truncated_files() {
    let file = sample(5);
    for len in [0, 3, 7, 8, 20, file.len() / 2, file.len() - 1] {
        let e = err_of(&file[..len]);
        assert!(matches!(e, Error::Format(_)), "{len}: {e:?}");
        assert!(
            e.to_string().contains("truncated") || e.to_string().contains("out of range"),
            "{len}: {e}"
        );
    }
}

#[test]
fn header_length_beyond_file_or_limit() {
    let mut file = sample(6);
    let n = file.len() as u64;
    file[..8].copy_from_slice(&n.to_le_bytes());
    assert_format(&file, "declares");
    file[..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
    assert_format(&file, "larger than the limit");
    file[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_format(&file, "larger than the limit");
}

#[test]
fn non_utf8_and_non_json_headers() {
    let file = sample(7);
    let mut bad = file.clone();
    bad[12] = 0xff;
    assert_format(&bad, "not valid UTF-8");
    let mut bad = file.clone();
    bad[8] = b'[';
    assert_format(&bad, "JSON object");
    let mut bad = file.clone();
    // A brace where the first key's colon is: `{"key"} ...`.
    let colon = file[8..].iter().position(|&b| b == b':').unwrap();
    bad[8 + colon] = b'}';
    assert_format(&bad, "JSON");
}

#[test]
fn offsets_out_of_range_overlapping_or_leaving_gaps() {
    let file = sample(8);
    let (head, data) = split(&file);
    let set = |name: &str, offs: [u64; 2]| {
        let mut h = head.clone();
        h[name]["data_offsets"] = serde_json::json!(offs);
        join(&h, &data)
    };
    let emb = head["emb"]["data_offsets"].as_array().unwrap()[0]
        .as_u64()
        .unwrap();
    assert_format(&set("emb", [emb + 100_000, emb + 100_012]), "out of range");
    assert_format(&set("emb", [emb + 12, emb]), "begin <= end");
    assert_format(&set("emb", [0, 12]), "overlaps");
    assert_format(&set("emb", [emb + 1, emb + 13]), "");
    let mut longer = file.clone();
    longer.extend_from_slice(&[0; 8]);
    assert_format(&longer, "trailing bytes");
}

#[test]
fn dtype_shape_and_length_mismatches() {
    let file = sample(9);
    let (head, data) = split(&file);
    let edit = |name: &str, key: &str, v: serde_json::Value| {
        let mut h = head.clone();
        h[name][key] = v;
        join(&h, &data)
    };
    assert_format(&edit("emb", "dtype", "F32".into()), "needs 24 bytes");
    assert_format(
        &edit("emb", "shape", serde_json::json!([3, 3])),
        "needs 18 bytes",
    );
    assert_format(&edit("emb", "dtype", "Q7".into()), "found \"Q7\"");
    assert_format(
        &edit("emb", "shape", serde_json::json!([u64::MAX, 4])),
        "overflows",
    );
    assert_format(&edit("emb", "extra", 1.into()), "unknown field");
    // Right size, wrong role: a layer's planes must be U32 [bits, out, words].
    assert_format(
        &edit("model.q.qdelta_planes", "dtype", "I32".into()),
        "expected U32 [2, 3, 2]",
    );
    assert_format(
        &edit(
            "model.q.qdelta_planes",
            "shape",
            serde_json::json!([3, 2, 2]),
        ),
        "expected U32",
    );
}

#[test]
fn duplicate_keys_are_refused() {
    let file = sample(10);
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&file[8..8 + n]).unwrap().trim_end();
    let dup = format!(
        "{},\"step\":{{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}}}}",
        &text[..text.len() - 1]
    );
    let mut bad = (dup.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(dup.as_bytes());
    bad.extend_from_slice(&file[8 + n..]);
    assert_format(&bad, "duplicate key \"step\"");
}

/// The JSON objects inside the metadata refuse duplicates too (the last would
/// win silently): a layer listed twice, a checksum given twice, a user key twice.
#[test]
fn duplicate_keys_inside_metadata_values_are_refused() {
    let file = sample(10);
    for (key, entry) in [
        ("layers", "\"model.q\""),
        ("checksums", "\"emb\""),
        ("user_metadata", ""),
    ] {
        let bad = with_meta(&file, |m| {
            let text = m[key].as_str().unwrap().to_string();
            let inner = &text[1..text.len() - 1];
            let doubled = if entry.is_empty() {
                "{\"k\":\"1\",\"k\":\"2\"}".to_string()
            } else {
                // The entry for `entry` again, ahead of the original object.
                let at = inner.find(&format!("{entry}:")).unwrap();
                let rest = &inner[at..];
                let end = if rest.contains('{') && key == "layers" {
                    rest.find('}').unwrap() + 1
                } else {
                    rest.find(',').unwrap_or(rest.len())
                };
                format!("{{{},{inner}}}", &rest[..end])
            };
            m.insert(key.into(), doubled.into());
        });
        let e = err_of(&bad).to_string();
        assert!(e.contains("duplicate key"), "{key}: {e}");
    }
}

/// A key outside the version's set is damage, not an extension: one flipped
/// bit in "header_checksum" must not turn header verification off.
#[test]
fn unknown_metadata_keys_are_refused() {
    let file = sample(10);
    let renamed = with_meta(&file, |m| {
        let h = m.remove("header_checksum").unwrap();
        m.insert("ieader_checksum".into(), h);
    });
    assert_format(&renamed, "unknown metadata key \"ieader_checksum\"");
    let extra = with_meta(&file, |m| {
        m.insert("note".into(), "hi".into());
    });
    assert_format(&extra, "free-form metadata goes in \"user_metadata\"");
}

#[test]
fn unknown_version_layout_and_missing_keys() {
    let file = sample(11);
    let e = err_of(&with_meta(&file, |m| {
        m.insert("format_version".into(), "3".into());
    }));
    assert!(
        matches!(e, Error::UnsupportedVersion(_)) && e.to_string().contains("version 3"),
        "{e}"
    );
    for v in ["0", "99"] {
        let e = err_of(&with_meta(&file, |m| {
            m.insert("format_version".into(), v.into());
        }));
        assert!(matches!(e, Error::UnsupportedVersion(_)), "{v}: {e}");
    }
    // A version-1 file read as version 2 is fine (2 only adds sharing).
    let v2 = with_meta(&file, |m| {
        m.insert("format_version".into(), "2".into());
    });
    assert_eq!(parse(&v2).unwrap().version, 2);
    assert_format(
        &with_meta(&file, |m| {
            m.insert("format_version".into(), "one".into());
        }),
        "integer",
    );
    assert_format(
        &with_meta(&file, |m| {
            m.insert("bit_layout".into(), "msb".into());
        }),
        "unknown bit layout",
    );
    assert_format(
        &with_meta(&file, |m| {
            m.insert("format".into(), "gguf".into());
        }),
        "not a qdelta file",
    );
    for key in keys::REQUIRED {
        let e = err_of(&with_meta(&file, |m| {
            m.remove(key);
        }));
        assert!(e.to_string().contains(&format!("{key:?}")), "{key}: {e}");
    }
    let (mut head, data) = split(&file);
    head.remove(METADATA_KEY);
    assert_format(&join(&head, &data), "no \"__metadata__\"");
}

#[test]
fn inconsistent_tables() {
    let file = sample(12);
    assert_format(
        &with_meta(&file, |m| {
            m.insert("params".into(), "[\"emb\"]".into());
        }),
        "\"step\" is neither",
    );
    assert_format(
        &with_meta(&file, |m| {
            m.insert("params".into(), "[\"emb\",\"step\",\"emb\"]".into());
        }),
        "metadata \"params\" lists tensor \"emb\" twice",
    );
    assert_format(
        &with_meta(&file, |m| {
            m.insert("params".into(), "[\"emb\",\"step\",\"ghost\"]".into());
        }),
        "\"ghost\", which is not in the file",
    );
    assert_format(
        &with_meta(&file, |m| {
            m.insert("layers".into(), "{".into());
        }),
        "invalid JSON",
    );
    assert_format(
        &with_meta(&file, |m| {
            let c = m["checksums"]
                .as_str()
                .unwrap()
                .replace("\"emb\":", "\"emb2\":");
            m.insert("checksums".into(), c.into());
        }),
        "no entry for tensor \"emb\"",
    );
    assert_format(
        &with_meta(&file, |m| {
            let l = m["layers"]
                .as_str()
                .unwrap()
                .replace("\"bits\":2", "\"bits\":3");
            m.insert("layers".into(), l.into());
        }),
        "expected U32 [3, 3, 2]",
    );
}

/// Layers `a` and `b` with the same delta bytes (tied weights), `c` another.
fn tied_sample() -> Vec<u8> {
    let planes: Vec<u8> = (0..2 * 3 * words_per_row(45) * 4)
        .map(|i| (i * 7) as u8)
        .collect();
    let other: Vec<u8> = planes.iter().map(|b| b ^ 1).collect();
    let scales: Vec<u8> = [0.5f32, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let layer =
        |name: &str, transposed: bool, planes: &'static [u8], scales: &'static [u8]| LayerData {
            name: name.into(),
            shape: [3, 45],
            bits: 2,
            scale: ScaleMode::Matrix,
            transposed,
            planes,
            scales,
        };
    let planes: &'static [u8] = Box::leak(planes.into_boxed_slice());
    let other: &'static [u8] = Box::leak(other.into_boxed_slice());
    let scales: &'static [u8] = Box::leak(scales.into_boxed_slice());
    let d = DeltaData {
        layers: vec![
            layer("emb", false, planes, scales),
            layer("head", true, planes, scales),
            layer("c", false, other, scales),
        ],
        params: vec![],
        tenant: String::new(),
        base_fingerprint: "00112233445566778899aabbccddeeff".into(),
        user: BTreeMap::new(),
    };
    let (head, tensors) = build(&d).unwrap();
    let mut out = head;
    for t in &tensors {
        out.extend_from_slice(t.data);
    }
    out
}

#[test]
fn tied_layers_share_one_pair_of_tensors_from_version_2() {
    let file = tied_sample();
    let c = parse(&file).unwrap();
    assert_eq!(c.version, 2);
    assert_eq!(c.header.tensors.len(), 4, "emb's pair and c's pair only");
    let (emb, head) = (&c.layers["emb"], &c.layers["head"]);
    assert_eq!((&emb.planes, &emb.scales), (&head.planes, &head.scales));
    assert!(
        !emb.transposed && head.transposed,
        "the flag stays per layer"
    );
    assert_ne!(c.layers["c"].planes, emb.planes);
    // The same table in a version-1 file is refused, naming the version.
    assert_format(
        &with_meta(&file, |m| {
            m.insert("format_version".into(), "1".into());
        }),
        "from format version 2 on",
    );
    // A layer's tensor is never a param too, whatever the version.
    assert_format(
        &with_meta(&file, |m| {
            m.insert("params".into(), "[\"emb.qdelta_scales\"]".into());
        }),
        "claimed by both",
    );
    // Files without equal layers stay version 1 (readable by every reader).
    assert_eq!(parse(&sample(3)).unwrap().version, 1);
}

#[test]
fn directories_and_missing_files_are_file_errors() {
    let dir = tmp_path("adir");
    fs::create_dir_all(&dir).unwrap();
    let e = DeltaFile::open(&dir).err().unwrap();
    assert!(
        matches!(e, Error::File(_)) && e.to_string().contains("directory"),
        "{e}"
    );
    let e = DeltaFile::open(&tmp_path("missing-nothing-here"))
        .err()
        .unwrap();
    assert!(matches!(e, Error::File(_)), "{e}");
    let e = write_atomic(&dir, |_| Ok(())).unwrap_err();
    assert!(
        matches!(e, Error::File(_)) && e.to_string().contains("directory"),
        "{e}"
    );
}

/// Applies one random structural mutation to a file image.
fn mutate(rng: &mut Rng, file: &mut Vec<u8>) {
    let n = file.len();
    match rng.below(8) {
        0 => {
            let i = rng.below(n);
            file[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(n);
            file[i] = rng.next() as u8;
        }
        2 => file.truncate(rng.below(n)),
        3 => {
            let i = rng.below(n);
            file.insert(i, b"{}[],:\"0-9e \\x"[rng.below(14)]);
        }
        4 => {
            let i = rng.below(n);
            file.remove(i);
        }
        5 => {
            // Rewrite the header length to a nearby or wild value.
            let v = match rng.below(3) {
                0 => rng.next(),
                1 => (n as u64)
                    .wrapping_add(rng.below(17) as u64)
                    .wrapping_sub(8),
                _ => rng.below(n) as u64,
            };
            file[..8.min(n)].copy_from_slice(&v.to_le_bytes()[..8.min(n)]);
        }
        6 => {
            // Replace a digit in the header (shapes, offsets, versions).
            let end = (8 + rng.below(n.saturating_sub(8))).min(n);
            if let Some(i) = (8..end).rev().find(|&i| file[i].is_ascii_digit()) {
                file[i] = b'0' + rng.below(10) as u8;
            }
        }
        _ => {
            let i = rng.below(n);
            let j = rng.below(n);
            file.swap(i, j);
        }
    }
}

/// The property the libFuzzer target checks too: no panic, and whatever our
/// header parser accepts the reference safetensors reader accepts alike.
pub(crate) fn check_one(data: &[u8]) {
    let _ = parse(data);
    if let Ok(h) = Header::parse(data) {
        let st = safetensors::SafeTensors::deserialize(data)
            .unwrap_or_else(|e| panic!("accepted by qdelta, refused by safetensors: {e:?}"));
        assert_eq!(st.len(), h.tensors.len());
        for t in &h.tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.shape(), t.shape.as_slice());
            assert_eq!(v.data().len(), t.nbytes());
        }
    }
}

#[test]
fn mutation_fuzz_never_panics_and_agrees_with_reference() {
    let iterations: u64 = std::env::var("QDELTA_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng(seed | 1);
    // Both versions: separate tensors (1) and tied layers sharing a pair (2).
    let bases = [sample(seed), tied_sample()];
    let mut accepted = 0;
    for i in 0..iterations {
        let mut file = bases[i as usize % bases.len()].clone();
        for _ in 0..=rng.below(3) {
            if !file.is_empty() {
                mutate(&mut rng, &mut file);
            }
        }
        let r = std::panic::catch_unwind(|| check_one(&file));
        assert!(
            r.is_ok(),
            "seed {seed}, iteration {i}: {:?}",
            String::from_utf8_lossy(&file[..file.len().min(400)])
        );
        accepted += parse(&file).is_ok() as usize;
    }
    // Data-only mutations keep the header valid: the check saw both outcomes.
    assert!(accepted > 0, "seed {seed}: no mutant was accepted");
}

/// A fresh directory of its own, so leftover checks see only this test's files.
fn own_dir(tag: &str) -> PathBuf {
    let dir = tmp_path(tag).with_extension("d");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A FIFO and a listening Unix socket named like .qdelta files in `dir` (the
/// listener must stay alive for the socket to exist).
#[cfg(unix)]
fn fifo_and_socket(dir: &Path) -> (PathBuf, PathBuf, std::os::unix::net::UnixListener) {
    let fifo = dir.join("fifo.qdelta");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success());
    let sock = dir.join("sock.qdelta");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    (fifo, sock, listener)
}

fn temp_leftovers(dir: &Path) -> Vec<std::ffi::OsString> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp-"))
        .collect()
}

/// Runs `f` on another thread; fails the test if it does not return in time
/// (a blocked `open` would otherwise hang the whole suite).
fn within_seconds<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: still blocked after 10 s"))
}

#[cfg(unix)]
#[test]
fn fifos_sockets_and_devices_are_refused_without_hanging() {
    let dir = own_dir("special");
    let (fifo, sock, _listener) = fifo_and_socket(&dir);
    let link = dir.join("link.qdelta");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let mut cases = vec![
        (fifo.clone(), "found a FIFO"),
        (link, "found a FIFO"),
        (sock, "found a socket"),
        (PathBuf::from("/dev/zero"), "found a character device"),
    ];
    use std::os::unix::fs::FileTypeExt;
    if let Some(block) = fs::read_dir("/dev").ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
    }) {
        cases.push((block.path(), "found a block device"));
    }
    for (path, want) in cases {
        let p = path.clone();
        let e = within_seconds(&format!("open {}", path.display()), move || {
            DeltaFile::open(&p).err()
        })
        .unwrap_or_else(|| panic!("{}: opened", path.display()));
        assert!(
            matches!(e, Error::File(_))
                && e.to_string().contains(want)
                && e.to_string().contains("expected a regular .qdelta file")
                && e.to_string().contains(&path.display().to_string()),
            "{}: {e}",
            path.display()
        );
    }
    // The open itself does not wait for a writer either (the case of a FIFO
    // swapped in after the type check), and the re-check on the open file
    // names it.
    let meta = within_seconds("open_no_wait", move || {
        open_no_wait(&fifo).unwrap().metadata().unwrap()
    });
    let e = expect_regular(Path::new("x.qdelta"), &meta).unwrap_err();
    assert!(e.to_string().contains("found a FIFO"), "{e}");
}

#[test]
fn a_file_rewritten_in_place_while_mapped_is_an_error_not_a_crash() {
    let dir = own_dir("inplace");
    let path = dir.join("t.qdelta");
    let image = sample(13);
    fs::write(&path, &image).unwrap();
    let f = DeltaFile::open(&path).unwrap();
    assert_eq!(f.verify().unwrap(), 6);
    // What `cp new old` or os.truncate does: same inode, new length. Touching
    // the pages past the new end would be a SIGBUS.
    let n = image.len() as u64;
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(n / 2)
        .unwrap();
    let want = format!(
        "the file changed size while mapped (was {n} bytes, now {})",
        n / 2
    );
    for e in [f.bytes("emb").unwrap_err(), f.verify().unwrap_err()] {
        assert!(
            matches!(e, Error::File(_))
                && e.to_string().contains(&want)
                && e.to_string().contains("rename")
                && e.to_string().contains(&path.display().to_string()),
            "{e}"
        );
    }
    // Grown in place is refused alike; so is a rewrite back to the mapped
    // size (the modification time changed); a fresh open sees the new file.
    fs::write(&path, [image.as_slice(), &[0u8; 8]].concat()).unwrap();
    assert!(f.bytes("emb").unwrap_err().to_string().contains("now"));
    fs::write(&path, &image).unwrap();
    let e = f.verify().unwrap_err();
    assert!(
        matches!(e, Error::File(_)) && e.to_string().contains("modification time"),
        "{e}"
    );
    assert_eq!(DeltaFile::open(&path).unwrap().verify().unwrap(), 6);
}

/// Sets `path`'s modification time to `secs` after the epoch.
fn set_mtime(path: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn a_same_size_rewrite_while_mapped_is_an_error_naming_the_time() {
    let dir = own_dir("samesize");
    let path = dir.join("t.qdelta");
    fs::write(&path, sample(21)).unwrap();
    set_mtime(&path, 1_000_000_000);
    let f = DeltaFile::open(&path).unwrap();
    assert_eq!(f.verify().unwrap(), 6);
    // Another file of the same layout, copied over in place (`cp`): same
    // inode, same size, other bytes; the old header would read them silently.
    let other = sample(22);
    assert_eq!(other.len(), sample(21).len());
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(&other)
        .unwrap();
    set_mtime(&path, 1_000_000_001);
    for e in [f.bytes("emb").unwrap_err(), f.verify().unwrap_err()] {
        let m = e.to_string();
        assert!(
            matches!(e, Error::File(_))
                && m.contains("the file changed while mapped")
                && m.contains(
                    "modification time was 1000000000.000000000 s, now 1000000001.000000000 s"
                )
                && m.contains("rename")
                && m.contains(&path.display().to_string()),
            "{m}"
        );
    }
}

#[test]
fn a_file_renamed_over_or_removed_or_chmodded_while_mapped_still_reads() {
    let dir = own_dir("renamed");
    let path = dir.join("t.qdelta");
    fs::write(&path, sample(23)).unwrap();
    let f = DeltaFile::open(&path).unwrap();
    let emb = f.bytes("emb").unwrap().1.to_vec();
    // These change the mapped inode's ctime, not its contents.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    write(&dir.join("t.qdelta"), &sample_data_for_rename()).unwrap();
    assert_eq!(f.bytes("emb").unwrap().1, emb.as_slice());
    assert_eq!(f.verify().unwrap(), 6);
    fs::remove_file(&path).unwrap();
    assert_eq!(f.verify().unwrap(), 6);
}

/// A small valid delta to write over another file.
fn sample_data_for_rename() -> DeltaData<'static> {
    DeltaData {
        layers: vec![],
        params: vec![],
        tenant: "other".into(),
        base_fingerprint: "00112233445566778899aabbccddeeff".into(),
        user: BTreeMap::new(),
    }
}

#[test]
fn a_failing_directory_sync_after_the_rename_is_not_a_failed_write() {
    let dir = own_dir("dirsync");
    let path = dir.join("t.qdelta");
    fs::write(&path, sample(14)).unwrap();
    let r = write_atomic_with(
        &path,
        |w| w.write_all(&sample(15)),
        |_| Err(std::io::Error::other("directory sync failed")),
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(fs::read(&path).unwrap(), sample(15));
    assert!(temp_leftovers(&dir).is_empty());
    // The real sync fails on a directory that cannot be opened for reading;
    // root may open it anyway, then there is nothing to provoke.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o300)).unwrap();
        if File::open(&dir).is_err() {
            let r = write_atomic(&path, |w| w.write_all(&sample(16)));
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            assert!(r.is_ok(), "{r:?}");
            assert_eq!(fs::read(&path).unwrap(), sample(16));
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn failures_before_the_rename_keep_the_old_file_and_remove_the_temporary() {
    let dir = own_dir("prerename");
    let path = dir.join("t.qdelta");
    fs::write(&path, sample(17)).unwrap();
    // The writer fails half way.
    let e = write_atomic(&path, |w| {
        w.write_all(&sample(18)[..100])?;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(
        matches!(e, Error::File(_)) && e.to_string().contains("disk full"),
        "{e}"
    );
    assert_eq!(fs::read(&path).unwrap(), sample(17));
    assert!(temp_leftovers(&dir).is_empty());
    // The rename fails: a non-empty directory took the target name meanwhile.
    let target = dir.join("u.qdelta");
    let t = target.clone();
    let e = write_atomic(&target, move |w| {
        fs::create_dir(&t)?;
        fs::write(t.join("x"), b"x")?;
        w.write_all(&sample(19))
    })
    .unwrap_err();
    assert!(matches!(e, Error::File(_)), "{e}");
    assert!(target.is_dir());
    assert!(temp_leftovers(&dir).is_empty());
}

#[test]
fn long_file_names_up_to_name_max_can_be_saved() {
    let dir = own_dir("longname");
    let name = format!("{}.qdelta", "a".repeat(235));
    assert_eq!(name.len(), 242);
    let path = dir.join(&name);
    write_atomic(&path, |w| w.write_all(&sample(20))).unwrap();
    assert_eq!(DeltaFile::open(&path).unwrap().verify().unwrap(), 6);
    write_atomic(&path, |w| w.write_all(&sample(21))).unwrap();
    assert_eq!(fs::read(&path).unwrap(), sample(21));
    assert!(temp_leftovers(&dir).is_empty());
    // Temporary names are short and distinct even within one clock tick.
    let (a, b) = (temp_name(), temp_name());
    assert_ne!(a, b);
    assert!(a.len() < 80 && a.contains(".tmp-"), "{a}");
}

#[cfg(unix)]
#[test]
fn writes_refuse_fifos_sockets_and_devices_at_the_target_and_keep_them() {
    use std::os::unix::fs::FileTypeExt;
    let dir = own_dir("writespecial");
    let (fifo, sock, _listener) = fifo_and_socket(&dir);
    let to_fifo = dir.join("to-fifo.qdelta");
    std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
    // A link (in our own directory) to a device: only the link could be
    // replaced, the device is never opened or written.
    let to_dev = dir.join("to-dev.qdelta");
    std::os::unix::fs::symlink("/dev/zero", &to_dev).unwrap();
    for (path, want) in [
        (&fifo, "found a FIFO"),
        (&sock, "found a socket"),
        (&to_fifo, "found a symbolic link to a FIFO"),
        (&to_dev, "found a symbolic link to a character device"),
    ] {
        let before = fs::symlink_metadata(path).unwrap().file_type();
        let p = path.clone();
        let e = within_seconds(&format!("write {}", path.display()), move || {
            write_atomic(&p, |w| w.write_all(&sample(22)))
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::File(_))
                && msg.contains(&path.display().to_string())
                && msg.contains("expected a regular file (or a new path) to write")
                && msg.contains(want),
            "{}: {msg}",
            path.display()
        );
        let after = fs::symlink_metadata(path).unwrap().file_type();
        assert_eq!(before, after, "{}: replaced", path.display());
    }
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(temp_leftovers(&dir).is_empty());
    // A link to a regular file, and a dangling one, are replaced as before
    // (the link itself: the file it named is left as it was).
    let plain = dir.join("plain.qdelta");
    fs::write(&plain, b"keep").unwrap();
    let to_plain = dir.join("to-plain.qdelta");
    std::os::unix::fs::symlink(&plain, &to_plain).unwrap();
    let dangling = dir.join("dangling.qdelta");
    std::os::unix::fs::symlink(dir.join("nothing-here"), &dangling).unwrap();
    for path in [&to_plain, &dangling] {
        write_atomic(path, |w| w.write_all(&sample(23))).unwrap();
        assert!(fs::symlink_metadata(path).unwrap().is_file());
        assert_eq!(fs::read(path).unwrap(), sample(23));
    }
    assert_eq!(fs::read(&plain).unwrap(), b"keep");
    write_atomic(&plain, |w| w.write_all(&sample(24))).unwrap();
    assert_eq!(fs::read(&plain).unwrap(), sample(24));
    assert!(temp_leftovers(&dir).is_empty());
}

#[test]
fn format_version_must_be_a_plain_decimal_integer() {
    let file = sample(31);
    for v in ["+1", "0001", "01", " 1", "1 ", "", "1.0", "-1", "0x1", "１"] {
        let e = err_of(&with_meta(&file, |m| {
            m.insert("format_version".into(), v.into());
        }));
        assert!(
            matches!(e, Error::Format(_))
                && e.to_string().contains("expected a decimal integer")
                && e.to_string().contains(&format!("found {v:?}")),
            "{v:?}: {e}"
        );
    }
    for v in ["0", "3", "99999999999999999999"] {
        let e = err_of(&with_meta(&file, |m| {
            m.insert("format_version".into(), v.into());
        }));
        assert!(
            matches!(e, Error::UnsupportedVersion(_)) && e.to_string().contains(v),
            "{v}: {e}"
        );
    }
    assert_eq!(parse(&file).unwrap().version, 1);
}

#[test]
fn checksums_must_be_sixteen_lowercase_hex_digits() {
    let file = sample(32);
    let c = parse(&file).unwrap();
    let name = c.header.tensors[0].name.clone();
    let good = format!("{:016x}", c.checksums[&name]);
    for bad in [
        good.to_uppercase(),
        format!("+{}", &good[1..]),
        good[1..].to_string(),
        format!("{good}0"),
        format!(" {}", &good[1..]),
        "g".repeat(16),
    ] {
        if bad == good {
            continue; // all digits: uppercase is the same text
        }
        let e = err_of(&with_meta(&file, |m| {
            let mut sums: BTreeMap<String, String> =
                serde_json::from_str(m["checksums"].as_str().unwrap()).unwrap();
            sums.insert(name.clone(), bad.clone());
            m.insert(
                "checksums".into(),
                serde_json::to_string(&sums).unwrap().into(),
            );
        }));
        assert!(
            matches!(e, Error::Format(_))
                && e.to_string().contains("expected 16 lowercase hex digits")
                && e.to_string().contains(&format!("{bad:?}")),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn base_fingerprint_must_be_32_lowercase_hex_digits() {
    let file = sample(33);
    let fp = "00112233445566778899aabbccddeeff";
    for bad in [
        String::new(),
        "fp".into(),
        fp.to_uppercase(),
        fp[1..].into(),
        format!("{fp}0"),
        format!("{}z", &fp[1..]),
    ] {
        let e = err_of(&with_meta(&file, |m| {
            m.insert("base_fingerprint".into(), bad.clone().into());
        }));
        assert!(
            matches!(e, Error::Format(_))
                && e.to_string().contains("expected 32 lowercase hex digits")
                && e.to_string().contains(&format!("found {bad:?}")),
            "{bad:?}: {e}"
        );
        // The writer refuses what no reader would open, before writing.
        let dir = own_dir("badfp");
        let mut d = sample_data_for_rename();
        d.base_fingerprint = bad.clone();
        let e = write(&dir.join("x.qdelta"), &d).unwrap_err();
        assert!(
            matches!(e, Error::Value(_)) && e.to_string().contains("32 lowercase hex"),
            "{e}"
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }
}

/// Two layers of one shape with different bytes.
fn same_shape_pair() -> Vec<u8> {
    let words = words_per_row(40);
    let pa: Vec<u8> = (0..4 * words * 4).map(|i| i as u8).collect();
    let pb: Vec<u8> = (0..4 * words * 4).map(|i| (i * 7 + 1) as u8).collect();
    let sa: Vec<u8> = 0.5f32.to_le_bytes().to_vec();
    let sb: Vec<u8> = 0.25f32.to_le_bytes().to_vec();
    let layer = |name: &str, planes: &'static [u8], scales: &'static [u8]| LayerData {
        name: name.into(),
        shape: [4, 40],
        bits: 1,
        scale: ScaleMode::Matrix,
        transposed: false,
        planes,
        scales,
    };
    let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    let d = DeltaData {
        layers: vec![
            layer("a", leak(pa), leak(sa)),
            layer("b", leak(pb), leak(sb)),
        ],
        params: vec![],
        tenant: String::new(),
        base_fingerprint: "00112233445566778899aabbccddeeff".into(),
        user: BTreeMap::new(),
    };
    let (mut out, tensors) = build(&d).unwrap();
    for t in &tensors {
        out.extend_from_slice(t.data);
    }
    out
}

/// `file` with its tensor entries and metadata edited, the header checksum kept.
fn with_head(
    file: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Vec<u8> {
    let (mut head, data) = split(file);
    edit(&mut head);
    join(&head, &data)
}

fn verify_image(tag: &str, image: &[u8]) -> Result<usize> {
    let path = tmp_path(tag);
    fs::write(&path, image).unwrap();
    DeltaFile::open(&path)?.verify()
}

#[test]
fn the_header_checksum_catches_header_edits_that_keep_the_file_valid() {
    let file = sample(34);
    let c = parse(&file).unwrap();
    let want = header_digest(
        &c.header.tensors,
        c.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    assert_eq!(c.metadata["header_checksum"], format!("{want:016x}"));
    assert_eq!(verify_image("hc-good", &file).unwrap(), 6);
    // Re-spelling the JSON (order, whitespace) keeps the checksum.
    let (head, data) = split(&file);
    let mut text = serde_json::to_vec_pretty(&head).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let pretty = [&(text.len() as u64).to_le_bytes()[..], &text, &data].concat();
    assert_eq!(verify_image("hc-pretty", &pretty).unwrap(), 6);

    let layers = |m: &serde_json::Map<String, serde_json::Value>| -> BTreeMap<String, LayerEntry> {
        serde_json::from_str(m["layers"].as_str().unwrap()).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // The layer table's transposed flag.
        (
            "transposed",
            with_meta(&file, |m| {
                let mut t = layers(m);
                t.get_mut("model.q").unwrap().transposed ^= true;
                m.insert("layers".into(), serde_json::to_string(&t).unwrap().into());
            }),
        ),
        // A param's dtype: BF16 [2, 3] -> I16 [2, 3] (same bytes).
        (
            "dtype",
            with_head(&file, |h| {
                h["emb"]["dtype"] = "I16".into();
            }),
        ),
        // A param's shape: [2, 3] -> [6].
        (
            "shape",
            with_head(&file, |h| {
                h["emb"]["shape"] = serde_json::json!([6]);
            }),
        ),
        // What one module's delta was written for is given to another.
        (
            "renamed layer",
            with_meta(&file, |m| {
                let mut t = layers(m);
                let q = t.remove("model.q").unwrap();
                t.insert("model.v".into(), q);
                m.insert("layers".into(), serde_json::to_string(&t).unwrap().into());
            }),
        ),
        // BF16 -> F16: same size, other numbers.
        (
            "dtype F16",
            with_head(&file, |h| {
                h["emb"]["dtype"] = "F16".into();
            }),
        ),
        // Any other metadata.
        (
            "tenant",
            with_meta(&file, |m| {
                m.insert("tenant".into(), "mallory".into());
            }),
        ),
        (
            "user",
            with_meta(&file, |m| {
                m.insert("user_metadata".into(), "{\"note\":\"y\"}".into());
            }),
        ),
    ];
    for (what, image) in cases {
        // Each edit still opens: only verify can tell.
        parse(&image).unwrap_or_else(|e| panic!("{what}: {e}"));
        let e = verify_image("hc-bad", &image).unwrap_err();
        assert!(
            matches!(e, Error::Checksum(_))
                && e.to_string()
                    .contains("the header fails its xxh3-64 checksum"),
            "{what}: {e}"
        );
    }
    // Two same-shape layers trade tensors in the table (the audit's q_proj /
    // k_proj swap): every tensor checksum still matches.
    let swapped = with_meta(&same_shape_pair(), |m| {
        let mut t = layers(m);
        let (a, b) = (t["a"].clone(), t["b"].clone());
        t.get_mut("a").unwrap().planes = b.planes;
        t.get_mut("a").unwrap().scales = b.scales;
        t.get_mut("b").unwrap().planes = a.planes;
        t.get_mut("b").unwrap().scales = a.scales;
        m.insert("layers".into(), serde_json::to_string(&t).unwrap().into());
    });
    assert_eq!(verify_image("hc-pair", &same_shape_pair()).unwrap(), 4);
    let e = verify_image("hc-swap", &swapped).unwrap_err();
    assert!(
        matches!(e, Error::Checksum(_)) && e.to_string().contains("the header fails"),
        "{e}"
    );
    // A bad header and a bad tensor are both named.
    let mut both = with_meta(&file, |m| {
        m.insert("tenant".into(), "mallory".into());
    });
    let last = both.len() - 1;
    both[last] ^= 1;
    let e = verify_image("hc-both", &both).unwrap_err().to_string();
    assert!(
        e.contains("the header fails") && e.contains("1 tensor(s) fail"),
        "{e}"
    );
    // A malformed header checksum is a format error at open.
    for bad in ["", "ABCDEF0123456789", "123"] {
        assert_format(
            &with_meta(&file, |m| {
                m.insert("header_checksum".into(), bad.into());
            }),
            "\"header_checksum\": expected 16 lowercase hex digits",
        );
    }
}

#[test]
fn files_without_a_header_checksum_still_open_and_verify_their_tensors() {
    let file = with_meta(&sample(35), |m| {
        m.remove("header_checksum");
    });
    let path = tmp_path("no-hc");
    fs::write(&path, &file).unwrap();
    let f = DeltaFile::open(&path).unwrap();
    assert!(!f.header_covered());
    assert_eq!(f.verify().unwrap(), 6);
    let path = tmp_path("with-hc");
    fs::write(&path, sample(35)).unwrap();
    assert!(DeltaFile::open(&path).unwrap().header_covered());
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[cfg(unix)]
#[test]
fn an_overwrite_keeps_the_old_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = own_dir("perms");
    let path = dir.join("t.qdelta");
    // A new file gets what a plain create gets (0o666 less the umask).
    let plain = dir.join("plain");
    File::create(&plain).unwrap();
    write_atomic(&path, |w| w.write_all(&sample(36))).unwrap();
    assert_eq!(mode_of(&path), mode_of(&plain));
    for mode in [0o600, 0o640, 0o444, 0o666, 0o755] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        write_atomic(&path, |w| w.write_all(&sample(37))).unwrap();
        assert_eq!(mode_of(&path), mode, "{mode:o}");
        assert_eq!(fs::read(&path).unwrap(), sample(37));
    }
    // Through a link: the link is replaced by a file with the target's mode.
    let target = dir.join("target.qdelta");
    fs::write(&target, b"x").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o604)).unwrap();
    let link = dir.join("link.qdelta");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    write_atomic(&link, |w| w.write_all(&sample(38))).unwrap();
    assert_eq!(mode_of(&link), 0o604);
    assert!(temp_leftovers(&dir).is_empty());
}

/// The pid of a process that has exited (and been reaped).
#[cfg(unix)]
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    assert_eq!(process_alive(pid), Some(false));
    pid
}

#[cfg(unix)]
#[test]
fn a_write_sweeps_dead_writers_temporaries_and_keeps_live_ones() {
    let dir = own_dir("sweep");
    let path = dir.join("t.qdelta");
    let dead = dead_pid();
    let me = std::process::id();
    let stale = [
        format!(".qdelta.tmp-{dead}-0-1700000000000000000"),
        format!(".qdelta.tmp-{dead}-7-1"),
    ];
    let kept = [
        // A live writer (this process).
        format!(".qdelta.tmp-{me}-99999-1"),
        // Not of the exact form.
        format!(".qdelta.tmp-{dead}-0"),
        format!(".qdelta.tmp-{dead}-0-1-2"),
        format!(".qdelta.tmp-{dead}-0-x"),
        format!(".qdelta.tmp-+{dead}-0-1"),
        format!("qdelta.tmp-{dead}-0-1"),
        format!(".other.tmp-{dead}-0-1"),
    ];
    for n in stale.iter().chain(&kept) {
        fs::write(dir.join(n), b"half a file").unwrap();
    }
    // A dead pid whose file is locked: a live writer this process cannot
    // see (another pid namespace). And a directory of the temporary form.
    let locked = format!(".qdelta.tmp-{dead}-1-1");
    let held = File::create(dir.join(&locked)).unwrap();
    lock_temp(&held);
    let as_dir = format!(".qdelta.tmp-{dead}-2-1");
    fs::create_dir(dir.join(&as_dir)).unwrap();

    write_atomic(&path, |w| w.write_all(&sample(39))).unwrap();
    let mut left: Vec<String> = temp_leftovers(&dir)
        .into_iter()
        .map(|n| n.into_string().unwrap())
        .collect();
    left.sort();
    let mut want: Vec<String> = kept
        .iter()
        .filter(|n| n.contains(".tmp-"))
        .cloned()
        .chain([locked.clone(), as_dir.clone()])
        .collect();
    want.sort();
    assert_eq!(left, want);
    // Once its holder is gone, the locked one goes too.
    drop(held);
    write_atomic(&path, |w| w.write_all(&sample(39))).unwrap();
    assert!(!dir.join(&locked).exists());
    assert!(dir.join(&as_dir).is_dir());
}

#[test]
fn temp_names_parse_back_to_their_pid() {
    let n = temp_name();
    assert_eq!(temp_pid(&n), Some(std::process::id()));
    assert_eq!(temp_pid(".qdelta.tmp-12-3-4"), Some(12));
    for bad in [
        ".qdelta.tmp-",
        ".qdelta.tmp-1--2",
        ".qdelta.tmp--1-2-3",
        ".qdelta.tmp-1-2-3\n",
    ] {
        assert_eq!(temp_pid(bad), None, "{bad:?}");
    }
    assert_eq!(process_alive(std::process::id()), Some(true));
    assert_eq!(process_alive(0), None);
    assert_eq!(process_alive(u32::MAX), None);
}

#[test]
fn a_header_over_the_readers_limit_is_refused_before_anything_is_written() {
    let dir = own_dir("bighead");
    let path = dir.join("t.qdelta");
    fs::write(&path, sample(40)).unwrap();
    let mut d = sample_data_for_rename();
    d.user.insert("notes".into(), String::new());
    let small = build(&d).unwrap().0.len() - PREFIX_LEN;
    // Each "x" adds one header byte (no escaping); padding rounds up to 8.
    let room = MAX_HEADER_LEN as usize - small;
    d.user.insert("notes".into(), "x".repeat(room - 8));
    let (head, _) = build(&d).unwrap();
    let len = u64::from_le_bytes(head[..PREFIX_LEN].try_into().unwrap());
    assert!(len <= MAX_HEADER_LEN && len as usize == head.len() - PREFIX_LEN);
    d.user.insert("notes".into(), "x".repeat(room + 8));
    let e = write(&path, &d).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Value(_))
            && msg.contains(&format!("expected at most {MAX_HEADER_LEN} bytes"))
            && msg.contains(&format!("{} of them user metadata", room + 8 + 5)),
        "{msg}"
    );
    // Nothing was written: the old file stays, no temporary is left.
    assert_eq!(fs::read(&path).unwrap(), sample(40));
    assert!(temp_leftovers(&dir).is_empty());
}

#[test]
fn reading_a_file_too_big_for_memory_is_a_file_error_not_an_abort() {
    // Under always-overcommit the reservation would succeed and 4 TiB of zeros be read.
    if fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|m| m.trim() == "1") {
        return;
    }
    let dir = own_dir("sparse");
    let path = dir.join("huge.txt");
    let size: u64 = 1 << 42;
    if File::create(&path).unwrap().set_len(size).is_err() {
        return; // a filesystem without 4 TiB sparse files: nothing to provoke
    }
    let e = read_regular(&path).unwrap_err();
    let msg = e.to_string();
    fs::remove_file(&path).unwrap();
    assert!(
        matches!(e, Error::File(_))
            && msg.contains(&format!(
                "expected a file that fits in memory, found {size} bytes"
            )),
        "{msg}"
    );
}
