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
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    bad[8 + n / 2] = b'}';
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
        "claimed by both",
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
    // Grown in place is refused alike; a fresh open sees the new file.
    fs::write(&path, [image.as_slice(), &[0u8; 8]].concat()).unwrap();
    assert!(f.bytes("emb").unwrap_err().to_string().contains("now"));
    fs::write(&path, &image).unwrap();
    assert_eq!(f.verify().unwrap(), 6);
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
