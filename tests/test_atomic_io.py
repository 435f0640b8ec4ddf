"""qdelta.atomic_io: whole-file replacement, nothing torn or left behind on failure."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdelta import atomic_io
from qdelta.atomic_io import (
    atomic_open,
    check_output,
    ensure_dir,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from qdelta.errors import FileError


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=2000))
def test_text_round_trip(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("a") / "f.txt"
    path.write_text("old")
    assert write_text_atomic(path, text) == path
    with open(path, newline="") as f:
        assert f.read() == text
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_refused_targets_are_file_errors_and_stay_as_they_were(tmp_path):
    """The rename would replace a FIFO, a device or a folder someone relies on."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "to_fifo").symlink_to(fifo)
    (tmp_path / "to_folder").symlink_to(folder)
    for name, found in (
        ("fifo", "a FIFO"),
        ("folder", "a directory"),
        ("to_fifo", "a FIFO"),
        ("to_folder", "a directory"),
    ):
        for write in (
            lambda p: write_text_atomic(p, "x"),
            lambda p: write_json_atomic(p, {"a": 1}),
            lambda p: write_bytes_atomic(p, b"x"),
        ):
            with pytest.raises(FileError, match=f"{name}.*{found}"):
                write(tmp_path / name)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()
    assert (tmp_path / "to_fifo").is_symlink() and (tmp_path / "to_folder").is_symlink()
    leftovers = {"fifo", "folder", "to_fifo", "to_folder"}
    assert {p.name for p in tmp_path.iterdir()} == leftovers
    with pytest.raises(FileError, match="nodir"):
        write_text_atomic(tmp_path / "nodir" / "f.txt", "x")


def test_a_link_to_a_file_is_replaced_and_its_target_kept(tmp_path):
    target = tmp_path / "v1.json"
    target.write_text("v1")
    link = tmp_path / "current.json"
    link.symlink_to(target)
    write_text_atomic(link, "v2")
    assert not link.is_symlink() and link.read_text() == "v2" and target.read_text() == "v1"


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".qdelta.tmp-{int(dead.stdout)}-0-1"
    stale.write_bytes(b"half a file")
    write_text_atomic(tmp_path / "f.txt", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_bytes_and_path_like_paths(tmp_path):
    write_text_atomic(os.fsencode(tmp_path / "b.txt"), "b")
    write_json_atomic(str(tmp_path / "s.json"), [1])
    assert (tmp_path / "b.txt").read_text() == "b" and json.loads((tmp_path / "s.json").read_text())


def test_unserializable_data_writes_nothing(tmp_path):
    path = tmp_path / "f.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert list(tmp_path.iterdir()) == []


def test_json_options(tmp_path):
    path = write_json_atomic(tmp_path / "f.json", {"b": 1, "a": 2}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": 2,\n "b": 1\n}'


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    """mkstemp's 0o600 is not what a plain open() would have made."""
    assert atomic_io.current_umask() == 0o022
    for write in (
        lambda p: write_text_atomic(p, "x"),
        lambda p: write_json_atomic(p, {"a": 1}),
        lambda p: write_bytes_atomic(p, b"\x00\x01"),
    ):
        path = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        write(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "f.json"
    path.write_text("old")
    path.chmod(0o640)
    write_json_atomic(path, {"v": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"v": 2}


def test_umask_without_proc_falls_back_to_the_round_trip(monkeypatch, umask_022):
    real_open = open

    def no_proc(name, *args, **kwargs):
        if str(name).startswith("/proc/"):
            raise FileNotFoundError(name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic_io.current_umask() == 0o022
    assert os.umask(0o022) == 0o022  # restored


def test_bytes_and_a_failing_writer_keep_the_old_file(tmp_path):
    path = tmp_path / "p.png"
    write_bytes_atomic(path, b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_open(path, "wb") as f:
        f.write(b"half a new file")
        raise RuntimeError("half way")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(ValueError, match="mode"), atomic_open(path, "a"):
        pass


def test_check_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    inputs = [model, calib]
    assert check_output(tmp_path / "new.qdelta", "-o", inputs) == tmp_path / "new.qdelta"
    assert check_output(model / "new.qdelta", "-o", inputs)  # a new file in a model dir is fine
    (tmp_path / "old.qdelta").write_text("x")
    assert check_output(tmp_path / "old.qdelta", "-o", inputs)  # replacing a non-input is fine
    for path, want in (
        (model / "config.json", "input directory"),
        (tmp_path / "model" / ".." / "model" / "config.json", "input directory"),
        (calib, "input file"),
        (model, "found a directory"),
        (tmp_path / "nodir" / "x", "found nothing there"),
        (calib / "x", "found a file"),
    ):
        with pytest.raises(FileError, match=want):
            check_output(path, "-o", inputs)
    link = tmp_path / "link.json"
    link.symlink_to(model / "config.json")
    with pytest.raises(FileError, match="input directory"):
        check_output(link, "--json", inputs)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileError, match="special file"):
        check_output(fifo, "--json", inputs)


def _in_a_child(fn, *, uid: int | None) -> str:
    """``fn()``'s returned text, run in a forked child (as ``uid`` if given): no exec,
    so the child needs no access to the interpreter's files."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.write(write, fn().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX permission bits, os.fork")
def test_check_output_refuses_a_folder_it_cannot_write():
    """The atomic write needs to create a file in the folder: find out before the work.
    Root ignores permission bits, so as root the check runs as the nobody user."""
    import contextlib
    import io

    from qdelta.cli import main

    top = tempfile.mkdtemp(prefix="qdelta-ro-")  # not tmp_path: another user may not enter it
    ro = os.path.join(top, "ro")
    try:
        os.chmod(top, 0o755)
        os.mkdir(ro)
        os.chmod(ro, 0o555)

        def attempt() -> str:
            try:
                check_output(os.path.join(ro, "x.qdelta"), "-o")
                said = "no error\n"
            except FileError as e:
                said = f"{e}\n"
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                # Before any work: else the missing model folders are the error.
                code = main(["compress", f"{ro}/nobase", f"{ro}/noft", "-o", f"{ro}/x.qdelta"])
            return f"{said}{code}\n{err.getvalue()}"

        said, code, err = _in_a_child(attempt, uid=65534 if os.geteuid() == 0 else None).split(
            "\n", 2
        )
        want = (
            f"-o {ro}/x.qdelta: expected a directory this user can create files in, "
            f"found {ro} is not writable"
        )
        assert said.startswith(want), said
        assert code == "1" and err.startswith(f"qdelta compress: error: {want}"), err
        assert os.listdir(ro) == []
        os.chmod(ro, 0o777)  # a folder it can write is fine
        assert check_output(os.path.join(ro, "x.qdelta"), "-o")
    finally:
        if os.path.isdir(ro):
            os.chmod(ro, 0o755)
        shutil.rmtree(top)


def test_ensure_dir(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b", "--out").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(FileError, match=r"expected a directory, found a file$"):
        ensure_dir(blocker, "--out")
    with pytest.raises(FileError, match=r"found a file \(.*file\)"):
        ensure_dir(blocker / "below", "--out")
    assert blocker.read_text() == "keep"


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_atomically(tmp_path, monkeypatch, umask_022):
    import matplotlib.figure

    from qdelta.analysis import plot_analysis
    from qdelta.plots import plot_memory

    result = {
        "finetuned": ["a"],
        "steps": False,
        "layers": [{"finetuned": "a", "layer": "l", "delta_d": 0.1, "delta_m": 0.2}],
    }
    path = plot_analysis(result, tmp_path / "a.png")
    assert _png(path) and stat.S_IMODE(path.stat().st_mode) == 0o644
    table = [
        {"n": n, "full_models_bytes": n * 2**20, "base_plus_deltas_bytes": 2**20} for n in (1, 2)
    ]
    assert _png(plot_memory(table, tmp_path / "m.png", "t"))

    def torn(self, fname, **kw):  # half a PNG, then the disk fills up
        fname.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        plot_analysis(result, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m.png"]


def test_a_long_but_valid_name_can_be_written(tmp_path):
    # The temporary file must not be named after the target: 250 bytes + a
    # prefix and suffix would pass NAME_MAX (255).
    path = tmp_path / ("a" * 245 + ".json")
    write_json_atomic(path, {"ok": True})
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
