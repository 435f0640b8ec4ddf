"""Integrity of .qdelta files around their writes and reads: an overwrite keeps
the old file's permissions; a writer killed mid-write leaves a temporary that
the next write sweeps (never a live writer's); a same-size rewrite under a
live mapping is refused; the header parser takes only the documented forms;
the header checksum makes ``verify`` catch header edits (docs/FORMAT.md)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qdelta
from qdelta.store import DeltaStore
from store_helpers import make_delta, make_layer

TEMP_MARK = ".qdelta.tmp-"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_MARK))


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite(path: Path, header: dict, data: bytes, name: str) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out = path.with_name(name)
    out.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return out


def edit_meta(path: Path, name: str, **changes: str | None) -> Path:
    header, data = split(path)
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return rewrite(path, header, data, name)


# --------------------------------------------------------------------------- permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_overwrite_keeps_the_old_files_permissions(tmp_path, rng):
    delta = make_delta(rng)
    path = tmp_path / "t.qdelta"
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what a new file gets: 0o666 less the umask
    delta.save(path)
    assert mode(path) == mode(plain)
    for bits in (0o600, 0o640, 0o444, 0o604):
        os.chmod(path, bits)
        delta.save(path)
        assert mode(path) == bits, oct(bits)
    store = DeltaStore(tmp_path)
    os.chmod(path, 0o600)
    store.add("t", delta)
    assert mode(path) == 0o600
    assert store.open("t").verify() > 0


# --------------------------------------------------------------------------- killed writers

# The child loads only the core extension and numpy (no torch: it starts fast).
_WRITER = (
    "import importlib.util, sys\n"
    "import numpy as np\n"
    f"spec = importlib.util.spec_from_file_location('_core', {qdelta._core.__file__!r})\n"
    "core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)\n"
    "n = int(sys.argv[2])\n"
    "core.write_delta(sys.argv[1], [], [('p', 'U8', [n], np.ones(n, np.uint8))], 't', "
    "'0' * 32, {})\n"
)


def _stopped_writer(path: Path, nbytes: int = 256 << 20) -> tuple[subprocess.Popen, str]:
    """A child writing ``nbytes`` to ``path``, stopped (SIGSTOP) while its
    temporary file exists; with the temporary's name."""
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(nbytes)])
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            found = temps(path.parent)
            if found:
                child.send_signal(signal.SIGSTOP)
                if temps(path.parent):  # not renamed in between
                    return child, found[0]
                child.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        child.kill()
        child.wait()
        for t in temps(path.parent):  # a rename raced the stop: try again
            os.remove(path.parent / t)
    pytest.fail("never caught the writer with its temporary file in place")


@pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP/SIGKILL and pid liveness")
def test_a_killed_writers_temporary_is_swept_by_the_next_write_never_a_live_one(tmp_path, rng):
    path = tmp_path / "big.qdelta"
    delta = make_delta(rng)
    delta.save(path)
    before = path.read_bytes()
    child, tmp = _stopped_writer(path)
    try:
        # A live (here: stopped) writer's temporary is kept by another write.
        other = tmp_path / "other.qdelta"
        delta.save(other)
        delta.save(path)
        assert tmp in temps(tmp_path)
    finally:
        child.kill()  # SIGKILL: no chance to clean up
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert temps(tmp_path) == [tmp]  # left behind
    assert path.read_bytes() == before  # the target untouched
    # The next write to that name sweeps it.
    delta.save(path)
    assert temps(tmp_path) == []
    assert qdelta.DeltaFile(path).verify() > 0


# --------------------------------------------------------------------------- in-place rewrites


def test_a_same_size_rewrite_in_place_under_a_mapping_is_a_file_error(tmp_path, rng):
    a = make_delta(rng, tenant="a")
    # New bytes, the same header length: the same shapes and transposed flags
    # ("true" / "false" differ in length, which could cross an 8-byte padding step).
    fresh = {
        n: make_layer(rng, *layer.shape, layer.bits, layer.scale_mode)
        for n, layer in a.layers.items()
    }
    b = qdelta.Delta(
        layers={
            n: qdelta.PackedLayer(f.planes, f.scales, f.shape, transposed=a.layers[n].transposed)
            for n, f in fresh.items()
        },
        params=a.params,
        base_fingerprint=a.base_fingerprint,
        tenant="b",  # same length: the same file size
        metadata=a.metadata,
    )
    path, other = tmp_path / "x.qdelta", tmp_path / "other.qdelta"
    a.save(path)
    b.save(other)
    assert path.stat().st_size == other.stat().st_size
    os.utime(path, (1_000_000_000, 1_000_000_000))
    f = qdelta.DeltaFile(path)
    name = f.tensors[0][0]
    assert f.verify() > 0
    layer_name = next(iter(f.layers))  # the layer views are cached from here on
    subprocess.run(["cp", str(other), str(path)], check=True)  # same inode, new bytes
    for call in (
        f.verify,
        lambda: f.tensor(name),
        lambda: f.layers,
        lambda: f.layer(layer_name),
        f.to_delta,
    ):
        with pytest.raises(qdelta.FileError, match=r"changed while mapped.*modification time"):
            call()
    # A fresh open reads the new file.
    assert qdelta.DeltaFile(path).tenant == "b"


def test_a_truncation_under_cached_layer_views_is_a_file_error_not_sigbus(tmp_path, rng):
    """In a child: a regression would kill the process (SIGBUS), not fail a test."""
    path = tmp_path / "x.qdelta"
    qdelta.Delta(make_delta(rng).layers, {}, "f" * 32, tenant="t").save(path)  # layers only
    script = f"""
import qdelta
f = qdelta.DeltaFile({str(path)!r})
name = next(iter(f.layers))
open({str(path)!r}, "r+").truncate(100)
for call in (lambda: f.layers, lambda: f.layer(name), f.to_delta):
    try:
        call()
    except qdelta.FileError as e:
        assert "changed size while mapped" in str(e), e
    else:
        raise SystemExit("served views of a truncated file")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_the_store_keeps_a_bounded_number_of_files_open(tmp_path, rng):
    store = DeltaStore(tmp_path, max_open=3)
    for i in range(8):
        store.add(f"t{i}", make_delta(rng, n_layers=1))

    def mapped() -> int:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # listdir's own descriptor, closed by now
                pass
        return sum(str(tmp_path) in target for target in targets)

    for i in range(8):
        store.open(f"t{i}")
    assert mapped() <= 3
    os.remove(store.path("t7"))  # deleted by hand: the cache lets go of it
    with pytest.raises(qdelta.UnknownTenantError):
        store.open("t7")
    assert "t7" not in store._cache and mapped() <= 2
    with pytest.raises(qdelta.ShapeError, match="max_open"):
        DeltaStore(tmp_path, max_open=0)


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="reads /proc/self/maps")
def test_the_store_cache_lets_go_of_deleted_and_replaced_files(tmp_path, rng, monkeypatch):
    """Another process deletes a tenant, or renames a new file over it: the cache must
    not keep the old mapping (and its disk space) while the store serves and lists
    other tenants. tenants() checks every cached path; open() at most once a second."""
    import qdelta.store as store_module

    store = DeltaStore(tmp_path / "s")
    for name in ("gone", "new", "other"):
        store.add(name, make_delta(rng, n_layers=1, tenant=name))  # cached, held by no one

    def mapped(name: str) -> list[str]:
        with open("/proc/self/maps") as maps:
            return [line for line in maps if line.rstrip().endswith(f"/s/{name}.qdelta")]

    def mapped_deleted(name: str) -> list[str]:
        with open("/proc/self/maps") as maps:
            return [line for line in maps if f"/s/{name}.qdelta (deleted)" in line]

    other = store.open("other")
    assert mapped("gone") and mapped("new")
    os.remove(store.path("gone"))
    make_delta(rng, n_layers=1, tenant="new").save(tmp_path / "n.qdelta")
    os.replace(tmp_path / "n.qdelta", store.path("new"))
    assert mapped_deleted("gone") and mapped_deleted("new")  # what the cache pins
    assert store.tenants() == ["new", "other"]
    assert not mapped_deleted("gone") and not mapped_deleted("new")
    assert store.open("other") is other  # a file still there stays cached
    # open() checks the other cached paths at most once per _SWEEP_SECONDS (an hour
    # here, so a slow machine cannot make the interval pass early).
    monkeypatch.setattr(store_module, "_SWEEP_SECONDS", 3600.0)
    store.open("new")
    os.remove(store.path("new"))
    store.open("other")  # swept by tenants() just now: not checked again yet
    assert mapped_deleted("new")
    store._swept -= 3600.0  # as if the interval had passed
    assert store.open("other") is other
    assert not mapped_deleted("new")


def test_a_rename_over_or_a_delete_under_a_mapping_keeps_it_readable(tmp_path, rng):
    path = tmp_path / "x.qdelta"
    make_delta(rng, tenant="a").save(path)
    f = qdelta.DeltaFile(path)
    name = f.tensors[0][0]
    held = np.array(f.tensor(name))
    replacement = tmp_path / "y.qdelta"
    make_delta(rng, tenant="b").save(replacement)
    os.replace(replacement, path)  # new inode; the old one's ctime changes
    assert f.verify() > 0
    np.testing.assert_array_equal(np.asarray(f.tensor(name)), held)
    os.remove(path)
    assert f.verify() > 0


# --------------------------------------------------------------------------- strict parsing


@pytest.fixture
def good(tmp_path, rng) -> Path:
    path = tmp_path / "good.qdelta"
    make_delta(rng).save(path)
    return path


@pytest.mark.parametrize("version", ["+1", "0001", "01", " 1", "1 ", "", "1.0"])
def test_format_version_must_be_a_plain_integer(good, version):
    bad = edit_meta(good, "v.qdelta", format_version=version)
    with pytest.raises(
        qdelta.FormatError,
        match="expected a decimal integer.*found " + re.escape(json.dumps(version)),
    ):
        qdelta.DeltaFile(bad)


def test_checksums_must_be_16_lowercase_hex_digits(good):
    header, _ = split(good)
    sums = json.loads(header["__metadata__"]["checksums"])
    name, value = next((k, v) for k, v in sums.items() if v != v.upper())
    for bad_value in (value.upper(), "+" + value[1:], value[:15], value + "0"):
        bad = edit_meta(good, "c.qdelta", checksums=json.dumps({**sums, name: bad_value}))
        with pytest.raises(qdelta.FormatError, match="expected 16 lowercase hex digits"):
            qdelta.DeltaFile(bad)


@pytest.mark.parametrize("fp", ["", "fp", "0" * 31, "0" * 33, "A" * 32, "g" * 32, " " + "0" * 31])
def test_base_fingerprint_must_be_32_lowercase_hex_digits(good, tmp_path, fp):
    bad = edit_meta(good, "f.qdelta", base_fingerprint=fp)
    with pytest.raises(
        qdelta.FormatError,
        match="expected 32 lowercase hex digits.*found " + re.escape(json.dumps(fp)),
    ):
        qdelta.DeltaFile(bad)
    # Nor does a save write one (it would not open).
    delta = qdelta.load(good)
    delta.base_fingerprint = fp
    with pytest.raises(qdelta.QDeltaError, match="32 lowercase hex digits"):
        delta.save(tmp_path / "new.qdelta")
    assert not (tmp_path / "new.qdelta").exists() and temps(tmp_path) == []


# --------------------------------------------------------------------------- header checksum


def _pair_delta(rng) -> qdelta.Delta:
    """Two same-shape layers (q_proj, k_proj) and a float32 [64] param."""
    import torch

    layers = {
        f"model.layers.0.self_attn.{p}": make_layer(rng, 16, 40, 2, "row") for p in ("q", "k")
    }
    params = {"model.layers.0.input_layernorm.weight": torch.ones(64)}
    return qdelta.Delta(layers, params, "0123456789abcdef" * 2, tenant="t")


def _layer_table_edit(path: Path, name: str, edit) -> Path:
    header, data = split(path)
    table = json.loads(header["__metadata__"]["layers"])
    edit(table)
    header["__metadata__"]["layers"] = json.dumps(table)
    return rewrite(path, header, data, name)


def _swap_qk(table: dict) -> None:
    q, k = "model.layers.0.self_attn.q", "model.layers.0.self_attn.k"
    for f in ("planes", "scales"):
        table[q][f], table[k][f] = table[k][f], table[q][f]


def _flip_transposed(table: dict) -> None:
    entry = table["model.layers.0.self_attn.q"]
    entry["transposed"] = not entry["transposed"]


def _tensor_edit(path: Path, name: str, **changes) -> Path:
    header, data = split(path)
    header["model.layers.0.input_layernorm.weight"].update(changes)
    return rewrite(path, header, data, name)


@pytest.mark.parametrize(
    "case",
    ["swap_qk", "transposed", "dtype F32->I32", "shape [64]->[8,8]", "tenant", "user metadata"],
)
def test_verify_catches_header_edits_with_the_header_checksum(tmp_path, rng, case):
    path = tmp_path / "d.qdelta"
    _pair_delta(rng).save(path)
    f = qdelta.DeltaFile(path)
    assert f._file.header_covered and f.verify() == 5
    assert len(f.metadata["header_checksum"]) == 16
    bad = {
        "swap_qk": lambda: _layer_table_edit(path, "bad.qdelta", _swap_qk),
        "transposed": lambda: _layer_table_edit(path, "bad.qdelta", _flip_transposed),
        "dtype F32->I32": lambda: _tensor_edit(path, "bad.qdelta", dtype="I32"),
        "shape [64]->[8,8]": lambda: _tensor_edit(path, "bad.qdelta", shape=[8, 8]),
        "tenant": lambda: edit_meta(path, "bad.qdelta", tenant="mallory"),
        "user metadata": lambda: edit_meta(path, "bad.qdelta", user_metadata='{"k": "v"}'),
    }[case]()
    g = qdelta.DeltaFile(bad)  # still a well-formed file: it opens
    with pytest.raises(qdelta.ChecksumError, match="the header fails its xxh3-64 checksum"):
        g.verify()
    if case == "swap_qk":  # what the audit ran: `qdelta verify` fails too
        out = subprocess.run(
            [sys.executable, "-m", "qdelta.cli", "verify", str(bad)], capture_output=True, text=True
        )
        assert out.returncode == 1 and "ChecksumError" in out.stderr, out


def test_files_without_a_header_checksum_open_and_verify_their_tensors(tmp_path, rng, capsys):
    path = tmp_path / "d.qdelta"
    _pair_delta(rng).save(path)
    old = edit_meta(path, "old.qdelta", header_checksum=None)
    f = qdelta.DeltaFile(old)
    assert not f.header_covered and qdelta.DeltaFile(path).header_covered
    assert f.verify() == 5
    from qdelta.cli import main

    assert main(["verify", str(old)]) == 0
    said = capsys.readouterr().out
    assert "5 tensors, every checksum matches; the header has no checksum" in said
    assert main(["verify", str(path)]) == 0
    assert "OK (the header and 5 tensors" in capsys.readouterr().out
    with pytest.raises(qdelta.FormatError, match=r"header_checksum.*16 lowercase hex"):
        qdelta.DeltaFile(edit_meta(path, "badhc.qdelta", header_checksum="XYZ"))


def _spec_header_checksum(header: dict) -> str:
    """The header checksum computed from docs/FORMAT.md's definition alone."""
    import struct

    import xxhash

    def u64(v: int) -> bytes:
        return struct.pack("<Q", v)

    def text(s: str) -> bytes:
        raw = s.encode()
        return u64(len(raw)) + raw

    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    out = b"qdelta-header-v1" + u64(len(tensors))
    for name in sorted(tensors, key=str.encode):
        t = tensors[name]
        out += text(name) + text(t["dtype"]) + u64(len(t["shape"]))
        out += b"".join(u64(d) for d in t["shape"])
        out += u64(t["data_offsets"][0]) + u64(t["data_offsets"][1])
    meta = {k: v for k, v in header["__metadata__"].items() if k != "header_checksum"}
    out += u64(len(meta))
    for key in sorted(meta, key=str.encode):
        out += text(key) + text(meta[key])
    return f"{xxhash.xxh3_64_intdigest(out):016x}"


def test_the_header_checksum_is_the_one_the_spec_defines(tmp_path, rng):
    path = tmp_path / "d.qdelta"
    delta = _pair_delta(rng)
    delta.metadata["ünïcode key"] = "✓ value"
    delta.save(path)
    header, _ = split(path)
    assert header["__metadata__"]["header_checksum"] == _spec_header_checksum(header)


def test_a_delta_file_pickles_as_its_path(tmp_path, rng, monkeypatch):
    """A spawned worker's dataset may hold one: the copy maps the file anew."""
    import pickle

    path = tmp_path / "x.qdelta"
    delta = make_delta(rng, tenant="a")
    delta.save(path)
    monkeypatch.chdir(tmp_path)
    f = qdelta.DeltaFile("x.qdelta")  # relative: the copy must not depend on the cwd
    data = pickle.dumps(f)
    monkeypatch.chdir("/")
    copy = pickle.loads(data)
    assert copy.path == path and copy.tenant == "a" and copy.verify() == f.verify()
    for name, layer in f.layers.items():
        np.testing.assert_array_equal(copy.layers[name].planes, layer.planes)


def test_a_name_no_store_can_hold_says_so(tmp_path, rng):
    store = DeltaStore(tmp_path)
    for bad in ("with space", "ünï", "../up", "", "x" * 201):
        with pytest.raises(qdelta.TenantNameError, match="expected 1-200 characters"):
            store.path(bad)
    (tmp_path / "with space.qdelta").write_bytes(b"")  # not a tenant: listed nowhere
    assert store.tenants() == []
    with pytest.raises(qdelta.UnknownTenantError):  # TenantNameError is one, for old callers
        store.open("with space")


# --------------------------------------------------------------------------- inspect


def _rename_layer_tensors(path: Path, names: dict[str, str], out: str) -> Path:
    """``path`` with each tensor ``old`` of ``names`` renamed ``new`` everywhere (tensor
    entry, layer table, checksums) and the header checksum recomputed: still valid."""
    header, data = split(path)
    meta = header["__metadata__"]
    table, sums = json.loads(meta["layers"]), json.loads(meta["checksums"])
    for old, new in names.items():
        header[new] = header.pop(old)
        sums[new] = sums.pop(old)
        for entry in table.values():
            for kind in ("planes", "scales"):
                entry[kind] = new if entry[kind] == old else entry[kind]
    meta["layers"], meta["checksums"] = json.dumps(table), json.dumps(sums)
    meta["header_checksum"] = _spec_header_checksum(header)
    return rewrite(path, header, data, out)


def test_inspect_calls_a_layer_shared_only_when_another_names_its_tensors(tmp_path, rng):
    """Tensor names are free in the format ("planes": TENSOR): a layer whose tensors are
    not named MODULE.qdelta_planes is not "shared" unless another layer names them."""
    from qdelta.store_cli import describe

    path = tmp_path / "d.qdelta"
    make_delta(rng, n_layers=3).save(path)
    layer = "model.layers.0.proj"
    renamed = _rename_layer_tensors(
        path, {f"{layer}.qdelta_{k}": f"L0.{k}" for k in ("planes", "scales")}, "r.qdelta"
    )
    f = qdelta.DeltaFile(renamed)
    assert f.verify() == len(f.tensors) and f.header_covered  # a valid file
    text = describe(f)
    assert "shared with" not in text and "counted once" not in text
    # Its row shows its own size, and the totals count it, as for the original file.
    size = sum(n for t, _, _, n in f.tensors if t.startswith("L0."))
    row = next(line for line in text.splitlines() if line.startswith(layer))
    assert f" {size} B " in row or f" {size / 1024:,.1f} KiB " in row, row
    fp16 = re.compile(r"fp16 fine-tune: (.*?);")
    assert fp16.findall(text) == fp16.findall(describe(qdelta.DeltaFile(path)))
    # Two layers naming one renamed pair (version 2): one is shared with the other.
    pair = tmp_path / "p.qdelta"
    twin = _pair_delta(rng)
    q, k = "model.layers.0.self_attn.q", "model.layers.0.self_attn.k"
    twin.layers[k] = twin.layers[q]
    twin.save(pair)
    assert qdelta.DeltaFile(pair).format_version == 2
    both = _rename_layer_tensors(
        pair, {f"{q}.qdelta_{n}": f"pair.{n}" for n in ("planes", "scales")}, "pr.qdelta"
    )
    text = describe(qdelta.DeltaFile(both))
    shared = [line for line in text.splitlines() if "shared with" in line]
    assert len(shared) == 1 and shared[0].startswith(q) and shared[0].endswith(f"{k}  -")
    assert "1 layer(s) sharing another's tensors are counted once" in text
