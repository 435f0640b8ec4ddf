"""Files around the commands: outputs checked before the work, SIGTERM, a full
stdout, special files where a file is read, ``~`` in paths, the zoo cache."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qdelta.zoo as zoo_module
from qdelta import cli
from qdelta.atomic_io import check_output, current_umask, read_regular_text
from qdelta.calibration import prepare_calibration
from qdelta.errors import CalibrationError, FileError, ZooError
from qdelta.tokenizer import TOKENIZER_FILE, ByteTokenizer
from qdelta.zoo import ZooConfig, build_zoo, default_cache_dir, open_zoo

QDELTA = [sys.executable, "-m", "qdelta.cli"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"qdelta {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("command", "name"),
    [("eval", "quality.json"), ("demo", "demo.json"), ("demo", "memory.png")],
)
@pytest.mark.parametrize("blocker", ["dir", "fifo"])
def test_eval_and_demo_refuse_unwritable_results_before_any_work(
    tmp_path, capsys, command, name, blocker
):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if blocker == "dir" else os.mkfifo(out / name)
    cache = tmp_path / "cache"  # never made: the check comes before the zoo
    assert cli.main([command, "--tiny", "--out", str(out), "--cache", str(cache)]) == 1
    err = _one_line_error(capsys, command)
    assert name in err and ("directory" in err or "special file" in err)
    assert not cache.exists()
    assert (
        (out / name).is_dir() if blocker == "dir" else stat.S_ISFIFO(os.lstat(out / name).st_mode)
    )


def test_a_trailing_slash_is_not_a_file_path(tmp_path):
    with pytest.raises(FileError, match="expected a file path, found a directory path"):
        check_output(f"{tmp_path}/new/", "-o")
    assert check_output(f"{tmp_path}/new", "-o") == tmp_path / "new"


def test_sigterm_runs_the_cleanup_that_ctrl_c_runs(tmp_path):
    """The zoo build removes its half-built folder and the command says so in one line."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [*QDELTA, "zoo", "--tiny", "--cache", str(cache)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".zoo-*.building-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err  # cleanup first, then the signal's death
    assert err.strip().splitlines()[-1].startswith("qdelta zoo: terminated")
    assert "Traceback" not in err
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_one_line_not_a_traceback(tmp_path):
    import torch

    import qdelta

    base = torch.nn.Sequential(torch.nn.Linear(40, 8))
    ft = torch.nn.Sequential(torch.nn.Linear(40, 8))
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        ft[0].weight.add_(0.01)
    path = tmp_path / "d.qdelta"
    qdelta.compress(base, ft, targets=["0"]).save(path)
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [*QDELTA, "inspect", str(path)], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("qdelta inspect: error: ") and run.stderr.count("\n") == 1
    assert "No space left" in run.stderr


def test_an_os_error_inside_a_command_is_one_line(monkeypatch, capsys):
    def fails(args):
        raise OSError(5, "Input/output error", "/some/file")

    monkeypatch.setattr(cli, "_cmd_inspect", fails)
    assert cli.main(["inspect", "x.qdelta"]) == 1
    assert "/some/file" in _one_line_error(capsys, "inspect")


def test_reading_a_fifo_fails_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileError, match=r"fifo: expected a regular file, found a FIFO"):
        read_regular_text(fifo)
    os.mkfifo(tmp_path / TOKENIZER_FILE)
    with pytest.raises(FileError, match="found a FIFO"):
        ByteTokenizer.load(tmp_path)
    with pytest.raises(CalibrationError, match="found a FIFO"):
        prepare_calibration(str(fifo), ByteTokenizer(), seq_len=8)
    with pytest.raises(CalibrationError, match="found a directory"):
        prepare_calibration(str(tmp_path), ByteTokenizer(), seq_len=8)


_READ_HUGE = """
import sys
from qdelta.atomic_io import read_regular_bytes
from qdelta.calibration import prepare_calibration
from qdelta.errors import CalibrationError, FileError
from qdelta.tokenizer import ByteTokenizer
try:
    read_regular_bytes(sys.argv[1])
except FileError as e:
    print(e)
try:
    prepare_calibration(sys.argv[1], ByteTokenizer(), seq_len=8)
except CalibrationError as e:
    print(e)
"""


def _always_overcommits() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(_always_overcommits(), reason="the 4 TiB reservation would be granted")
def test_a_file_too_big_for_memory_is_a_file_error_not_an_abort(tmp_path):
    """A huge (here sparse) --calib, tokenizer or manifest file: the reader's buffer
    cannot be reserved, which aborted the process (in a child here, so it cannot)."""
    huge = tmp_path / "huge.txt"
    try:
        with open(huge, "wb") as f:
            f.truncate(1 << 42)
    except OSError as e:
        pytest.skip(f"no 4 TiB sparse file here: {e}")
    run = subprocess.run(
        [sys.executable, "-c", _READ_HUGE, str(huge)], capture_output=True, text=True, timeout=120
    )
    want = f"{huge}: expected a file that fits in memory, found {1 << 42} bytes"
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == want and lines[1].endswith(want), run.stdout


def test_a_zoo_whose_manifest_is_a_fifo_is_an_error_not_a_hang(tmp_path):
    root = tmp_path / "zoo-x"
    root.mkdir()
    os.mkfifo(root / "zoo.json")
    with pytest.raises(ZooError, match="found a FIFO"):
        open_zoo(root)


def test_tilde_in_path_options_and_the_cache_variable(monkeypatch):
    home = os.path.expanduser("~")
    args = cli.build_parser().parse_args(["eval", "--out=~/res", "--cache=~/c"])
    assert args.out == f"{home}/res" and args.cache == f"{home}/c"
    args = cli.build_parser().parse_args(["compress", "~/b", "~/f", "-o", "~/x.qdelta"])
    assert (args.base, args.output) == (f"{home}/b", f"{home}/x.qdelta")
    monkeypatch.setenv("QDELTA_CACHE", "~/qc")
    assert default_cache_dir() == Path(home) / "qc" / "zoo"


def test_zoo_cache_failures_are_zoo_errors_and_leave_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zoo_module, "_build", full)
    with pytest.raises(ZooError, match=r"zoo cache .*: building zoo-.* failed: .*No space left"):
        build_zoo(ZooConfig.tiny(), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(zoo_module.tempfile, "mkdtemp", full)
    with pytest.raises(ZooError, match="expected a writable directory"):
        build_zoo(ZooConfig.tiny(), tmp_path, progress=False)


def test_the_zoo_folder_gets_a_plain_folders_mode(tiny_zoo):
    """Not mkdtemp's 0o700: others sharing $QDELTA_CACHE can read it."""
    assert stat.S_IMODE(tiny_zoo.root.stat().st_mode) == 0o777 & ~current_umask()


def test_python_dash_m_qdelta_is_the_command():
    run = subprocess.run(
        [sys.executable, "-m", "qdelta", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.startswith("qdelta "), run.stderr


def test_an_empty_xdg_cache_home_counts_as_unset(monkeypatch):
    from qdelta.kernels import autotune

    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert autotune.cache_path() == Path.home() / ".cache" / "qdelta" / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, "~/t.json")
    assert autotune.cache_path() == Path.home() / "t.json"


def test_errors_raised_by_the_core_pickle():
    """A worker process's error must reach its parent (pickle finds the class)."""
    import pickle

    import numpy as np

    import qdelta

    with pytest.raises(qdelta.ShapeError) as info:
        qdelta.pack_signs(np.zeros((2, 2, 2), np.float32))
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is qdelta.ShapeError and str(again) == str(info.value)
    assert qdelta.FileError.__module__ == "qdelta.errors"
