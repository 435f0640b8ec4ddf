"""The .qdelta file and the delta store: round trips, safetensors
compatibility, zero-copy mapping, checksums, fingerprints, the CLI."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import qdelta
from qdelta.cli import main as cli
from store_helpers import assert_same_delta, make_delta


def test_round_trip_every_field(tmp_path, rng):
    delta = make_delta(rng, n_layers=4)
    path = tmp_path / "a.qdelta"
    delta.save(path)
    back = qdelta.load(path)
    assert_same_delta(delta, back)
    # Reconstructions agree too (the layer table carries shape and bits).
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(layer.dense(), back.layers[name].dense())


def test_planes_are_read_only_views_of_the_mapping(tmp_path, rng):
    path = tmp_path / "v.qdelta"
    make_delta(rng).save(path)
    f = qdelta.DeltaFile(path)
    layer = next(iter(f.layers.values()))
    assert not layer.planes.flags.owndata and not layer.planes.flags.writeable
    assert layer.planes.flags.aligned and layer.scales.flags.aligned
    with pytest.raises(ValueError, match="read-only"):
        layer.planes[0, 0, 0] = 1
    # The view keeps the mapping alive after the file object is gone.
    planes = layer.planes
    expected = planes.copy()
    del f, layer
    np.testing.assert_array_equal(planes, expected)


def test_readable_by_the_official_safetensors_package(tmp_path, rng):
    delta = make_delta(rng)
    path = tmp_path / "s.qdelta"
    delta.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert meta["format"] == "qdelta" and meta["tenant"] == delta.tenant
    table = json.loads(meta["layers"])
    assert set(table) == set(delta.layers)
    for name, layer in delta.layers.items():
        entry = table[name]
        assert entry["shape"] == list(layer.shape) and entry["bits"] == layer.bits
        assert entry["scale"] == layer.scale_mode and entry["transposed"] == layer.transposed
        planes = tensors[entry["planes"]]
        assert planes.dtype == torch.uint32
        np.testing.assert_array_equal(planes.numpy(), layer.planes)
        np.testing.assert_array_equal(tensors[entry["scales"]].numpy(), layer.scales)
    for name, p in delta.params.items():
        assert tensors[name].dtype == p.dtype and torch.equal(tensors[name], p)
    assert names == {e[k] for e in table.values() for k in ("planes", "scales")} | set(delta.params)
    # Checksums are XXH3-64 of each tensor's bytes (independent implementation).
    checksums = json.loads(meta["checksums"])
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert checksums[name] == xxhash.xxh3_64_hexdigest(raw), name


def _with_twins(delta: qdelta.Delta, twins: dict[str, str]) -> qdelta.Delta:
    """``delta`` plus, for each new name -> existing layer, a layer with the same
    planes and scales (copies: equal bytes, not the same arrays) and the other
    orientation flag, as tied embeddings and head give."""
    layers = dict(delta.layers)
    for name, of in twins.items():
        src = delta.layers[of]
        layers[name] = qdelta.PackedLayer(
            src.planes.copy(), src.scales.copy(), src.shape, transposed=not src.transposed
        )
    return qdelta.Delta(layers, delta.params, delta.base_fingerprint, delta.tenant, delta.metadata)


def test_equal_layers_are_stored_once_in_a_version_2_file(tmp_path, rng):
    plain = make_delta(rng, n_layers=3)
    first = next(iter(plain.layers))
    tied = _with_twins(plain, {"lm_head": first})
    # A near twin (one bit flipped) is stored on its own: only equal bytes share.
    near = _with_twins(plain, {"lm_head": first})
    flipped = near.layers["lm_head"].planes.copy()
    flipped.reshape(-1)[0] ^= 1
    near.layers["lm_head"] = qdelta.PackedLayer(
        flipped, near.layers["lm_head"].scales, near.layers["lm_head"].shape
    )
    paths = {k: tmp_path / f"{k}.qdelta" for k in ("plain", "tied", "near")}
    for k, d in (("plain", plain), ("tied", tied), ("near", near)):
        d.save(paths[k])
    files = {k: qdelta.DeltaFile(p) for k, p in paths.items()}
    assert files["plain"].format_version == 1 and files["near"].format_version == 1
    assert files["tied"].format_version == 2
    pair = plain.layers[first].nbytes
    assert len(files["tied"].tensors) == len(files["plain"].tensors)
    assert len(files["near"].tensors) == len(files["plain"].tensors) + 2
    assert files["near"].nbytes - files["tied"].nbytes >= pair
    back = files["tied"].to_delta()
    assert_same_delta(tied, back)
    assert np.shares_memory(back.layers["lm_head"].planes, back.layers[first].planes)
    assert back.layers["lm_head"].transposed != back.layers[first].transposed
    assert files["tied"].verify() == len(files["tied"].tensors)
    # The official reader sees each tensor once; both layers name the same pair.
    with safe_open(str(paths["tied"]), framework="pt") as f:
        table = json.loads(f.metadata()["layers"])
        assert len(set(f.keys())) == len(files["tied"].tensors)
    assert table["lm_head"]["planes"] == table[first]["planes"]
    assert table["lm_head"]["scales"] == table[first]["scales"]
    from qdelta.store_cli import describe

    assert f"shared with {first}" in describe(files["tied"])
    assert "1 layer(s) sharing another's tensors are counted once" in describe(files["tied"])
    assert "shared with" not in describe(files["near"])
    assert "counted once" not in describe(files["near"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), picks=st.lists(st.integers(0, 3), max_size=5))
def test_twins_round_trip_property(tmp_path_factory, seed, picks):
    """Any set of layers with twins (twins of twins too) round-trips exactly, each
    distinct pair stored once, the file version 2 exactly when something is shared."""
    rng = np.random.default_rng(seed)
    delta = make_delta(rng, n_layers=4)
    names = list(delta.layers)
    twins: dict[str, str] = {}
    for i, p in enumerate(picks):
        twins[f"twin.{i}"] = (names + list(twins))[p]
    tied = _with_twins(delta, {})
    for name, of in twins.items():
        tied = _with_twins(tied, {name: of})
    path = tmp_path_factory.mktemp("twins") / "t.qdelta"
    tied.save(path)
    f = qdelta.DeltaFile(path)
    assert f.format_version == (2 if twins else 1)
    assert len(f.tensors) == 2 * len(names) + len(delta.params)
    assert_same_delta(tied, f.to_delta())


def test_verify_passes_then_catches_a_flipped_bit(tmp_path, rng):
    path = tmp_path / "c.qdelta"
    make_delta(rng).save(path)
    f = qdelta.DeltaFile(path)
    assert f.verify() == len(f.tensors)
    name, _, _, nbytes = f.tensors[int(rng.integers(len(f.tensors)))]
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8:header])[name]["data_offsets"][0]
    raw[header + begin + int(rng.integers(nbytes))] ^= 1 << int(rng.integers(8))
    bad = tmp_path / "bad.qdelta"
    bad.write_bytes(bytes(raw))
    g = qdelta.DeltaFile(bad)  # the header is intact: opening is fine
    with pytest.raises(qdelta.ChecksumError, match=name.replace(".", r"\.")):
        g.verify()


def _fingerprint_reference(weights: dict[str, np.ndarray | torch.Tensor]) -> str:
    """The documented definition (docs/FORMAT.md), in plain Python."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    numpy_names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    chunk = 8 << 20

    def u64(v: int) -> bytes:
        return v.to_bytes(8, "little")

    h = xxhash.xxh3_128(b"qdelta-base-fingerprint-v1" + u64(len(weights)))
    for name in sorted(weights):
        w = weights[name]
        if isinstance(w, torch.Tensor):
            dtype, raw = names[w.dtype], w.contiguous().view(torch.uint8).numpy().tobytes()
        else:
            dtype, raw = numpy_names[w.dtype], w.tobytes()
        h.update(u64(len(name)) + name.encode() + u64(len(dtype)) + dtype.encode())
        h.update(u64(w.ndim) + b"".join(u64(d) for d in w.shape) + u64(len(raw)))
        for i in range(0, len(raw), chunk):
            h.update(xxhash.xxh3_128_digest(raw[i : i + chunk])[::-1])
    return h.hexdigest()


def test_fingerprint_matches_the_documented_definition(rng):
    weights = {
        "b.weight": torch.randn(33, 17).to(torch.bfloat16),
        "a.weight": torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32)),
        "big": torch.randn(3 * (1 << 20) + 5).to(torch.float16),  # crosses a chunk boundary
        "pos": rng.integers(0, 100, size=(7,)),
    }
    assert qdelta.fingerprint(weights) == _fingerprint_reference(weights)


def test_fingerprint_of_module_state_dict_and_numpy(rng):
    model = torch.nn.Sequential(torch.nn.Linear(9, 4), torch.nn.LayerNorm(4))
    sd = model.state_dict()
    fp = qdelta.fingerprint(model)
    assert fp == qdelta.fingerprint(sd)
    assert fp == qdelta.fingerprint({k: v.numpy() for k, v in sd.items()})
    assert fp == qdelta.fingerprint(dict(reversed(list(sd.items()))))
    changed = {k: v.clone() for k, v in sd.items()}
    changed["0.weight"][3, 8] += 1e-3
    assert qdelta.fingerprint(changed) != fp
    assert qdelta.fingerprint({k: v.half() for k, v in sd.items()}) != fp
    renamed = {("x" + k): v for k, v in sd.items()}
    assert qdelta.fingerprint(renamed) != fp


def test_fingerprint_refuses_meta_and_sparse_tensors():
    with pytest.raises(qdelta.DTypeError, match=r"'w'.*found a meta tensor"):
        qdelta.fingerprint({"w": torch.empty(3, device="meta")})
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(qdelta.DTypeError, match=r"dense.*found layout torch.sparse_coo"):
        qdelta.fingerprint({"w": sparse})


def test_check_base(rng):
    base = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    delta = make_delta(rng)
    delta.base_fingerprint = qdelta.fingerprint(base)
    qdelta.check_base(delta, base)
    qdelta.check_base(delta, delta.base_fingerprint)
    other = {"w": base["w"] + 1e-6, "b": base["b"]}
    with pytest.raises(qdelta.BaseMismatchError) as e:
        qdelta.check_base(delta, other)
    assert delta.base_fingerprint in str(e.value)
    assert qdelta.fingerprint(other) in str(e.value)


def test_store_add_open_cache_replace_remove(tmp_path, rng):
    store = qdelta.DeltaStore(tmp_path / "store")
    assert store.tenants() == []
    a, b = make_delta(rng, tenant="x"), make_delta(rng, tenant="y")
    store.add("alice", a)
    store.add("bob", b)
    assert store.tenants() == ["alice", "bob"] and "alice" in store and len(store) == 2
    f = store.open("alice")
    assert store.open("alice") is f  # cached
    assert f.tenant == "alice"  # the store name is the tenant
    a.tenant = "alice"
    assert_same_delta(a, f.to_delta())
    old_planes = next(iter(f.layers.values())).planes
    before = old_planes.copy()
    # Replace alice: the old mapping still reads the old file; open() sees the new.
    c = make_delta(rng, tenant="alice")
    store.add("alice", c)
    np.testing.assert_array_equal(old_planes, before)
    assert f.verify() == len(f.tensors)
    assert_same_delta(c, store.open("alice").to_delta())
    # Another process replacing the file is noticed too.
    d = make_delta(rng, tenant="alice")
    d.save(store.path("alice"))
    assert_same_delta(d, store.open("alice").to_delta())
    held = store.open("bob")
    store.remove("bob")
    assert store.tenants() == ["alice"] and held.verify() == len(held.tensors)
    with pytest.raises(qdelta.UnknownTenantError, match="alice"):
        store.open("bob")
    assert not [p for p in os.listdir(store.directory) if ".tmp-" in p]


def test_store_concurrent_readers_and_writer(tmp_path, rng):
    store = qdelta.DeltaStore(tmp_path)
    versions = [make_delta(rng, tenant="t") for _ in range(4)]
    store.add("t", versions[0])
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(30):
                f = store.open("t")
                f.verify()
                got = f.to_delta()
                assert any(
                    got.metadata == v.metadata and got.layers.keys() == v.layers.keys()
                    for v in versions
                )
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for v in versions[1:]:
        store.add("t", v)
    for t in readers:
        t.join()
    assert not errors, errors


def test_cli_inspect_and_verify(tmp_path, rng, capsys):
    delta = make_delta(rng)
    path = tmp_path / "cli.qdelta"
    delta.save(path)
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for name, layer in delta.layers.items():
        assert name in out and f"{layer.shape[0]}x{layer.shape[1]}" in out
    assert delta.base_fingerprint in out and "compression" in out
    fp16 = sum(2 * x.shape[0] * x.shape[1] for x in delta.layers.values()) + sum(
        2 * p.numel() for p in delta.params.values()
    )
    assert f"{fp16 / path.stat().st_size:.2f}x" in out
    assert cli(["verify", str(path)]) == 0
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cli(["verify", str(path)]) == 1
    assert "checksum" in capsys.readouterr().err
    assert cli(["verify", str(tmp_path)]) == 1
    assert "directory" in capsys.readouterr().err


_READER = """
import sys, time
import qdelta
store = qdelta.DeltaStore(sys.argv[1])
stop = sys.argv[2]
import os
reads = 0
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    f = store.open("t")
    layers = f.layers  # held across the writer's replacement
    f.verify()  # every checksum of the version this reader mapped
    for layer in layers.values():
        int(layer.planes.sum())
    reads += 1
    if reads == 1:
        print("ready", flush=True)  # the writer starts once every reader has mapped a file
print(reads)
"""


def test_store_readers_in_other_processes_survive_replacement(tmp_path, rng):
    """Reader processes keep verifying whole files while this process replaces
    the tenant's file again and again (atomic rename: no reader ever sees a
    half-written or mixed file)."""
    import subprocess
    import sys

    store = qdelta.DeltaStore(tmp_path / "store")
    store.add("t", make_delta(rng, tenant="t"))
    stop = tmp_path / "stop"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(["python", os.environ.get("PYTHONPATH", "")]),
    }
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", _READER, str(store.directory), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for p in readers:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for _ in range(40):
            store.add("t", make_delta(rng, n_layers=int(rng.integers(1, 5)), tenant="t"))
    finally:
        stop.touch()
    for p in readers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert int(out) > 1  # it kept reading while the file was replaced
    assert store.open("t").verify() > 0


def test_cli_inspect_escapes_what_a_file_says(tmp_path, rng, capsys):
    delta = make_delta(rng)
    delta.tenant = "evil\x1b[2J\nbase         fingerprint 0000"
    delta.metadata["note\r"] = "red \x1b[31m text\u2028"
    path = tmp_path / "evil.qdelta"
    delta.save(path)
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u2028" not in out
    assert "evil\\x1b[2J\\nbase" in out and "red \\x1b[31m text\\u2028" in out
    assert [line for line in out.splitlines() if line.startswith("base")] == [
        f"base         fingerprint {delta.base_fingerprint}"
    ]  # no forged line


def test_paths_as_bytes_and_bad_path_types(tmp_path, rng):
    delta = make_delta(rng)
    path = tmp_path / "b.qdelta"
    delta.save(os.fsencode(path))
    assert_same_delta(qdelta.DeltaFile(os.fsencode(path)).to_delta(), delta)
    with pytest.raises(
        qdelta.DTypeError,
        match=r"DeltaFile path: expected a str, bytes or os.PathLike path, found int",
    ):
        qdelta.DeltaFile(3)
    with pytest.raises(qdelta.DTypeError, match=r"save path: .* found NoneType"):
        delta.save(None)


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_delta_file_is_added_and_saved_as_a_faithful_copy(tmp_path, rng):
    """Copying a tenant between stores: the copy holds the delta's user metadata (not
    the source's raw header) and the same bytes in every layer and param."""
    from qdelta.store import save

    delta = make_delta(rng, tenant="alice")
    src, dst = qdelta.DeltaStore(tmp_path / "a"), qdelta.DeltaStore(tmp_path / "b")
    f = src.add("alice", delta)
    save(f, tmp_path / "c.qdelta")
    copies = [
        ("alice", lambda: dst.add("alice", f)),
        ("carol", lambda: dst.add("carol", f)),  # under another name: the tenant is renamed
        ("alice", lambda: qdelta.DeltaFile(tmp_path / "c.qdelta")),
    ]
    for tenant, copy in copies:
        g = copy()
        assert g.tenant == tenant and g.user_metadata == delta.metadata, tenant
        assert g.base_fingerprint == delta.base_fingerprint and g.verify() == len(g.tensors)
        # Same tensors, same bytes: the recorded checksums agree, and against the delta.
        assert json.loads(g.metadata["checksums"]) == json.loads(f.metadata["checksums"])
        assert g.layers.keys() == delta.layers.keys()
        for name, layer in delta.layers.items():
            got = g.layers[name]
            assert (got.shape, got.transposed) == (layer.shape, layer.transposed), name
            assert got.planes.tobytes() == layer.planes.tobytes(), name
            assert got.scales.tobytes() == layer.scales.tobytes(), name
        assert g.params.keys() == delta.params.keys()
        for name, value in delta.params.items():
            got = g.params[name]
            assert (got.dtype, got.shape) == (value.dtype, value.shape), name
            assert _raw_bytes(got) == _raw_bytes(value), name
    for bad, call in (
        ({"layers": {}}, lambda v: dst.add("dave", v)),
        ("alice", lambda v: save(v, tmp_path / "d.qdelta")),
    ):
        with pytest.raises(
            qdelta.DTypeError,
            match=rf"expected a Delta or a DeltaFile, found {type(bad).__name__}",
        ):
            call(bad)
    assert dst.tenants() == ["alice", "carol"] and not (tmp_path / "d.qdelta").exists()


def test_a_store_directory_given_as_bytes_or_a_bad_type(tmp_path, rng):
    store = qdelta.DeltaStore(os.fsencode(tmp_path / "s"))
    assert store.directory == tmp_path / "s" and store.directory.is_dir()
    store.add("t", make_delta(rng))
    assert qdelta.DeltaStore(tmp_path / "s").tenants() == ["t"]
    with pytest.raises(
        qdelta.DTypeError,
        match=r"DeltaStore directory: expected a str, bytes or os.PathLike path, found int",
    ):
        qdelta.DeltaStore(3)


def test_a_dangling_tenant_link_is_a_file_error(tmp_path):
    store = qdelta.DeltaStore(tmp_path / "s")
    os.symlink(tmp_path / "gone.qdelta", store.directory / "gone.qdelta")
    assert "gone" in store.tenants()
    with pytest.raises(
        qdelta.FileError,
        match=r"tenant 'gone': .* a symbolic link to .*gone.qdelta'?, which does not exist",
    ):
        store.open("gone")
