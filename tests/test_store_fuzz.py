"""Mutated real .qdelta files: opening, verifying and loading them either
works or raises a QDeltaError subclass; nothing else ever comes out."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdelta
from store_helpers import make_delta


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[bytes, object]:
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "sample.qdelta"
    make_delta(np.random.default_rng(), n_layers=2).save(path)
    return path.read_bytes(), directory


def _header_len(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("header-byte"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("header-digit"), st.floats(0, 1, exclude_max=True), st.integers(0, 9)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(-16, 16), st.just(0)),
)


def _apply(raw: bytearray, kind: str, where, value: int) -> bytearray:
    head = _header_len(raw) if len(raw) >= 8 else len(raw)
    if kind == "flip":
        raw[int(where * len(raw))] ^= 1 << value
    elif kind == "header-byte":
        raw[8 + int(where * max(min(head, len(raw)) - 8, 1)) if len(raw) > 8 else 0] = value
    elif kind == "header-digit":
        digits = [i for i in range(8, min(head, len(raw))) if chr(raw[i]).isdigit()]
        if digits:
            raw[digits[int(where * len(digits))]] = ord("0") + value
    elif kind == "truncate":
        del raw[int(where * len(raw)) :]
    elif kind == "insert":
        raw.insert(int(where * len(raw)), value)
    elif kind == "length" and len(raw) >= 8:
        raw[:8] = max(_header_len(raw) - 8 + where, 0).to_bytes(8, "little")
    return raw


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_raise_only_qdelta_errors(sample, mutations):
    original, directory = sample
    raw = bytearray(original)
    for kind, where, value in mutations:
        if raw:
            raw = _apply(raw, kind, where, value)
    path = directory / "mutant.qdelta"
    path.write_bytes(bytes(raw))
    try:
        f = qdelta.DeltaFile(path)
        f.verify()
        delta = f.to_delta()
    except qdelta.QDeltaError as e:
        assert str(e), "errors carry a message"
        return
    # Accepted: the mutation touched nothing that matters (e.g. header padding)
    # or restored the original; the result is then complete and consistent.
    assert delta.layers and delta.params
    for layer in delta.layers.values():
        layer.dense()
