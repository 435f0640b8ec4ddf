"""Bad .qdelta input, one test per kind: always a QDeltaError subclass whose
message says what was expected and what was found; never a crash, never a
partial result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import qdelta
from store_helpers import make_delta


@pytest.fixture
def good(tmp_path, rng) -> Path:
    path = tmp_path / "good.qdelta"
    make_delta(rng).save(path)
    return path


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite(path: Path, header: dict, data: bytes, name: str = "bad.qdelta") -> Path:
    text = json.dumps(header).encode()
    out = path.with_name(name)
    out.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return out


def edit_meta(path: Path, **changes: str | None) -> Path:
    header, data = split(path)
    for key, value in changes.items():
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value
    return rewrite(path, header, data)


def refused(path: Path, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        qdelta.DeltaFile(path)
    with pytest.raises(exc, match=pattern):
        qdelta.load(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "half", "all-but-one"])
def test_truncated_file(good, keep):
    raw = good.read_bytes()
    n = {"half": len(raw) // 2, "all-but-one": len(raw) - 1}.get(keep, keep)
    bad = good.with_name("cut.qdelta")
    bad.write_bytes(raw[:n])
    refused(bad, qdelta.FormatError, "truncated|out of range")


def test_header_length_larger_than_file(good):
    raw = bytearray(good.read_bytes())
    raw[:8] = (len(raw) + 1).to_bytes(8, "little")
    bad = good.with_name("long.qdelta")
    bad.write_bytes(bytes(raw))
    refused(bad, qdelta.FormatError, r"header declares \d+ bytes but only \d+")


def test_absurd_header_length(good):
    raw = bytearray(good.read_bytes())
    raw[:8] = (2**64 - 1).to_bytes(8, "little")
    bad = good.with_name("huge.qdelta")
    bad.write_bytes(bytes(raw))
    refused(bad, qdelta.FormatError, "larger than the limit")


def test_non_utf8_header(good):
    raw = bytearray(good.read_bytes())
    raw[20] = 0xFE
    bad = good.with_name("latin.qdelta")
    bad.write_bytes(bytes(raw))
    refused(bad, qdelta.FormatError, "not valid UTF-8")


def test_non_json_header(good):
    raw = bytearray(good.read_bytes())
    raw[9:13] = b"}}}}"
    bad = good.with_name("json.qdelta")
    bad.write_bytes(bytes(raw))
    refused(bad, qdelta.FormatError, "not valid safetensors JSON")


def test_offsets_out_of_range(good):
    header, data = split(good)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = len(data) + 64
    refused(rewrite(good, header, data), qdelta.FormatError, "out of range")


def test_overlapping_offsets(good):
    header, data = split(good)
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    offs, second = tensors[1]
    size = offs[1] - offs[0]
    header[second]["data_offsets"] = [offs[0] - 1, offs[0] - 1 + size]
    refused(rewrite(good, header, data), qdelta.FormatError, "overlaps")


def test_gap_between_tensors(good):
    header, data = split(good)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    size = header[last]["data_offsets"][1] - header[last]["data_offsets"][0]
    header[last]["data_offsets"] = [len(data) + 4 - size, len(data) + 4]
    refused(rewrite(good, header, data + bytes(4)), qdelta.FormatError, "gap")


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("dtype", "F64", "needs .* bytes, but data_offsets"),
        ("shape", [1000, 1000], "needs .* bytes"),
        ("dtype", "COMPLEX", 'found "COMPLEX"'),
        ("shape", [-1], "invalid value"),
    ],
)
def test_dtype_shape_length_mismatch(good, field, value, pattern):
    header, data = split(good)
    header["model.embed.weight"][field] = value
    refused(rewrite(good, header, data), qdelta.FormatError, pattern)


def test_planes_with_the_wrong_shape_for_the_layer(good):
    header, _ = split(good)
    table = json.loads(header["__metadata__"]["layers"])
    name, entry = next(iter(table.items()))
    entry["shape"][1] += 32  # one more packed word per row than stored
    refused(
        edit_meta(good, layers=json.dumps(table)),
        qdelta.FormatError,
        f'layer "{name}": tensor .*expected U32',
    )


def test_unknown_version(good):
    refused(edit_meta(good, format_version="99"), qdelta.UnsupportedVersionError, "version 99")
    assert issubclass(qdelta.UnsupportedVersionError, qdelta.FormatError)


def test_unknown_bit_layout(good):
    refused(edit_meta(good, bit_layout="msb-first"), qdelta.FormatError, "unknown bit layout")


@pytest.mark.parametrize(
    "key",
    [
        "format",
        "format_version",
        "bit_layout",
        "tenant",
        "creator",
        "base_fingerprint",
        "layers",
        "params",
        "checksums",
        "checksum_algorithm",
    ],
)
def test_missing_metadata_key(good, key):
    refused(edit_meta(good, **{key: None}), qdelta.FormatError, f'"{key}"')


def test_plain_safetensors_file_is_not_a_qdelta_file(tmp_path, rng):
    path = tmp_path / "plain.safetensors"
    save_file({"w": rng.standard_normal((3, 4)).astype(np.float32)}, str(path))
    refused(path, qdelta.FormatError, "not a qdelta file")


def test_flipped_bit_in_data_is_caught_by_verify(good, rng):
    raw = bytearray(good.read_bytes())
    raw[-1 - int(rng.integers(64))] ^= 1 << int(rng.integers(8))
    bad = good.with_name("flip.qdelta")
    bad.write_bytes(bytes(raw))
    f = qdelta.DeltaFile(bad)
    with pytest.raises(qdelta.ChecksumError, match=r"1 tensor\(s\) fail .*expected [0-9a-f]{16}"):
        f.verify()


def test_directory_where_a_file_is_expected(tmp_path, rng):
    (tmp_path / "dir.qdelta").mkdir()
    refused(tmp_path / "dir.qdelta", qdelta.FileError, "found a directory")
    with pytest.raises(qdelta.FileError, match="directory"):
        make_delta(rng).save(tmp_path / "dir.qdelta")


def test_fifo_in_a_store_is_refused_without_hanging(tmp_path, rng):
    store = qdelta.DeltaStore(tmp_path / "s")
    store.add("a", make_delta(rng, tenant="a"))
    os.mkfifo(tmp_path / "s" / "b.qdelta")  # nobody ever writes to it
    with pytest.raises(qdelta.FileError, match=r"expected a regular \.qdelta file, found a FIFO"):
        store.open("b")
    assert store.open("a").tenant == "a"


def test_file_rewritten_in_place_while_mapped(good):
    f = qdelta.DeltaFile(good)
    name = f.tensors[0][0]
    size = good.stat().st_size
    os.truncate(good, size // 2)  # what `cp new old` does for a moment
    for call in (f.verify, lambda: f.tensor(name)):
        with pytest.raises(qdelta.FileError, match="changed size while mapped"):
            call()


def test_file_where_a_store_directory_is_expected(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(qdelta.FileError, match=r"expected a directory .* found a file"):
        qdelta.DeltaStore(tmp_path / "x.txt")


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.qdelta", qdelta.FileError, "No such file")


# The child loads only the core extension (no torch import: it stays fast).
_LOAD_CORE = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('_core', {qdelta._core.__file__!r})\n"
    "core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)\n"
)


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a child for which file permissions hold: as root, the
    child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set."""

    def drop() -> None:
        if os.geteuid() == 0:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    os._exit(77)

    done = subprocess.run(
        [sys.executable, "-S", "-c", _LOAD_CORE + code],
        preexec_fn=drop,
        capture_output=True,
        text=True,
    )
    if done.returncode == 77:
        pytest.skip("cannot drop root's file-permission override here")
    return done


def test_permission_denied_reading(good):
    good.chmod(0)
    code = (
        f"try: core.DeltaFile({str(good)!r})\nexcept core.FileError as e: print(e); sys.exit(3)\n"
    )
    done = _as_nobody(code)
    assert done.returncode == 3, done.stderr
    assert "Permission denied" in done.stdout
    assert issubclass(qdelta.FileError, qdelta.QDeltaError)


def test_permission_denied_writing_leaves_nothing(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code = (
        f"try: core.write_delta({str(locked / 'out.qdelta')!r}, [], [], 't', '0' * 32, {{}})\n"
        "except core.FileError as e: print(e); sys.exit(3)\n"
    )
    done = _as_nobody(code)
    assert done.returncode == 3, done.stderr
    assert "Permission denied" in done.stdout
    assert os.listdir(locked) == []


def test_failed_save_leaves_no_file(tmp_path, rng):
    delta = make_delta(rng)
    delta.params["bad"] = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(qdelta.DTypeError, match="complex64"):
        delta.save(tmp_path / "x.qdelta")
    delta = make_delta(rng)
    delta.metadata["n"] = 3  # type: ignore[assignment]
    with pytest.raises(qdelta.DTypeError, match="metadata"):
        delta.save(tmp_path / "x.qdelta")
    with pytest.raises(qdelta.FileError, match="No such file"):
        make_delta(rng).save(tmp_path / "missing-dir" / "x.qdelta")
    assert os.listdir(tmp_path) == []


def test_a_header_readers_refuse_is_never_written(tmp_path, rng):
    """Metadata past the readers' header limit (100,000,000 bytes): refused before
    anything is written, so a good file at the path is kept, not replaced."""
    path = tmp_path / "x.qdelta"
    make_delta(rng).save(path)
    before = path.read_bytes()
    delta = make_delta(rng)
    delta.metadata["notes"] = "x" * 100_000_000
    user = sum(len(k.encode()) + len(v.encode()) for k, v in delta.metadata.items())
    with pytest.raises(
        qdelta.QDeltaError,
        match=rf"header: expected at most 100000000 bytes .*, found \d+ bytes, "
        rf"{user} of them user metadata",
    ):
        delta.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.qdelta"]
    qdelta.load(path)


def test_param_name_colliding_with_layer_tensors(tmp_path, rng):
    delta = make_delta(rng)
    layer = next(iter(delta.layers))
    delta.params[f"{layer}.qdelta_planes"] = torch.zeros(1)
    with pytest.raises(qdelta.QDeltaError, match="used twice"):
        delta.save(tmp_path / "x.qdelta")
    assert os.listdir(tmp_path) == []


def test_param_named_like_the_safetensors_metadata_is_refused(tmp_path, rng):
    delta = make_delta(rng)
    delta.params["__metadata__"] = torch.zeros(1)
    with pytest.raises(qdelta.QDeltaError, match="reserved by the safetensors header"):
        delta.save(tmp_path / "x.qdelta")
    assert os.listdir(tmp_path) == []


def test_unknown_and_invalid_tenant_names(tmp_path, rng):
    store = qdelta.DeltaStore(tmp_path)
    store.add("known", make_delta(rng))
    with pytest.raises(qdelta.UnknownTenantError, match=r"'ghost'.*known"):
        store.open("ghost")
    with pytest.raises(qdelta.UnknownTenantError, match="ghost"):
        store.remove("ghost")
    for bad in ["", "../escape", "a/b", ".hidden", "x" * 201]:
        with pytest.raises(qdelta.UnknownTenantError, match="tenant name"):
            store.add(bad, make_delta(rng))
