"""qdelta.atomic_io: whole-file replacement, nothing torn or left behind on failure."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdelta.atomic_io import write_json_atomic, write_text_atomic


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=2000))
def test_text_round_trip(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("a") / "f.txt"
    path.write_text("old")
    assert write_text_atomic(path, text) == path
    with open(path, newline="") as f:
        assert f.read() == text
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_failed_rename_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"v": 1})

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_unserializable_data_writes_nothing(tmp_path):
    path = tmp_path / "f.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert list(tmp_path.iterdir()) == []


def test_json_options(tmp_path):
    path = write_json_atomic(tmp_path / "f.json", {"b": 1, "a": 2}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": 2,\n "b": 1\n}'
