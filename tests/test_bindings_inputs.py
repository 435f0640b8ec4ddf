"""Bad input straight into the Rust bindings (qdelta._core): a qdelta error that
names the argument, never a Rust panic (PanicException), a builtin
OverflowError/TypeError, silent garbage, or a special file replaced."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
import time

import numpy as np
import pytest

import qdelta
from qdelta import _core


def _raises(error, match, fn, *args, **kwargs):
    """``fn`` raises ``error`` (a QDeltaError subclass) matching ``match``, nothing else."""
    try:
        fn(*args, **kwargs)
    except error as exc:
        assert isinstance(exc, qdelta.QDeltaError)
        assert re.search(match, str(exc)), str(exc)
        return
    except BaseException as exc:  # a Rust panic surfaces as a BaseException
        pytest.fail(f"expected {error.__name__}, got {type(exc).__name__}: {exc}")
    pytest.fail(f"expected {error.__name__}, nothing raised")


def _misaligned(dtype, shape) -> np.ndarray:
    """A C-contiguous array whose address is off its element alignment by one byte."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    arr = np.zeros(size + 1, np.uint8)[1:].view(dtype).reshape(shape)
    assert arr.ctypes.data % np.dtype(dtype).itemsize
    return arr


def test_misaligned_arrays_are_a_shape_error_not_a_panic():
    _raises(
        qdelta.ShapeError,
        r"delta: expected an array aligned to 4 bytes, found one at an address offset by 1",
        _core.pack_signs,
        _misaligned(np.float32, (5, 40)),
        "float32",
    )
    planes, scales = qdelta.pack_residual(np.ones((6, 40), np.float32), bits=2)
    ids = np.zeros(3, np.int64)
    x = np.ones((3, 40), np.float32)
    for args, name in [
        ((_misaligned(np.float32, (3, 40)), "float32", planes[None], scales[None], ids), "x"),
        ((x, "float32", _misaligned(np.uint32, (1, *planes.shape)), scales[None], ids), "planes"),
        ((x, "float32", planes[None], _misaligned(np.float32, (1, 2)), ids), "scales"),
    ]:
        _raises(
            qdelta.ShapeError,
            rf"{name}: expected an array aligned to 4 bytes",
            _core.delta_matmul,
            *args,
        )


def test_negative_sizes_name_the_argument():
    packed = qdelta.pack_signs(np.ones((3, 8), np.float32))
    _raises(
        qdelta.ShapeError,
        r"rows: expected an int >= 0, found -3",
        _core.unpack_signs,
        packed,
        -3,
        8,
    )
    _raises(
        qdelta.ShapeError,
        r"cols: expected an int >= 0, found -1",
        _core.unpack_signs,
        packed,
        3,
        -1,
    )
    _raises(qdelta.ShapeError, r"in \[0, 2\*\*63\), found", _core.unpack_signs, packed, 2**70, 8)
    planes, scales = qdelta.pack_residual(np.ones((3, 8), np.float32), bits=1)
    _raises(
        qdelta.ShapeError,
        r"bits: expected an int >= 0, found -1",
        _core.unpack_planes, planes, scales, 3, 8, "float32", -1,
    )  # fmt: skip
    for bad, found in (
        (True, r"True \(a bool\)"),
        (1.5, r"1\.5 \(a float\)"),
        ("2", "'2' \\(a str\\)"),
    ):
        _raises(
            qdelta.ShapeError,
            rf"bits: expected an int in \[0, 2\*\*63\), found {found}",
            _core.unpack_planes, planes, scales, 3, 8, "float32", bad,
        )  # fmt: skip


def test_rms_norm_names_an_eps_past_float32():
    x = np.ones((2, 8), np.float32)
    w, out = np.ones((1, 8), np.float32), np.empty_like(x)
    _raises(
        qdelta.QDeltaError,
        r"eps: expected a finite float32 value >= 0 \(at most 3\.4028235e38\), found 1e39",
        _core.rms_norm_rows, x, w, 1e39, out,
    )  # fmt: skip


def test_rms_norm_checks_whole_shapes():
    x = np.ones((6, 8), np.float32)
    for w in (
        np.ones((1, 16), np.float32),
        np.ones((4, 2), np.float32),
        np.ones((2, 12), np.float32),
    ):
        _raises(
            qdelta.ShapeError,
            r"weights: expected \[groups, 8\]",
            _core.rms_norm_rows,
            x,
            w,
            1e-6,
            np.empty_like(x),
        )
    _raises(
        qdelta.ShapeError,
        r"out: expected \[6, 8\] \(the shape of x\), found \[8, 6\]",
        _core.rms_norm_rows, x, np.ones((1, 8), np.float32), 1e-6, np.empty((8, 6), np.float32),
    )  # fmt: skip


def test_out_aliasing_an_input_or_read_only():
    x = np.ones((3, 40), np.float32)
    planes, scales = qdelta.pack_residual(np.ones((40, 40), np.float32) * 0.1)
    ids = np.zeros(3, np.int64)
    _raises(
        qdelta.ShapeError,
        r"out: expected an array not shared with another argument, found it is also x",
        _core.delta_matmul, x, "float32", planes[None], scales[None], ids, None, x,
    )  # fmt: skip
    ro = np.zeros((3, 40), np.float32)
    ro.flags.writeable = False
    _raises(
        qdelta.ShapeError,
        r"out: expected a writable array, found a read-only one",
        _core.delta_matmul, x, "float32", planes[None], scales[None], ids, None, ro,
    )  # fmt: skip


def test_input_being_written_by_another_thread_is_a_shape_error():
    """An input that a call on another thread is writing as its ``out`` (the GIL
    is released while the core runs): a ShapeError naming the input, not
    numpy's bare TypeError "The given array is already borrowed"."""
    m, k = 64, 2048
    planes, scales = qdelta.pack_residual(np.ones((k, k), np.float32) * 0.1, bits=4)
    big_p, big_s = planes[None], scales[None]
    x = np.ones((m, k), np.float32)
    ids = np.zeros(m, np.int64)
    y = np.zeros((m, k), np.float32)  # the out of the long calls; [m, k] fits as an input
    small_p, small_s = qdelta.pack_residual(np.ones((1, k), np.float32), bits=1)
    small_p, small_s = small_p[None], small_s[None]
    cases = {
        "x": lambda: _core.delta_matmul(y, "float32", small_p, small_s, ids),
        "delta": lambda: _core.pack_signs(y, "float32"),
        "weights": lambda: _core.rms_norm_rows(x, y, 1e-6, np.empty_like(x)),
        "weights[0]": lambda: _core.rowwise_linear(
            x[:1], [y], [None], np.zeros(1, np.int64), np.empty((1, m), np.float32)
        ),
        "y": lambda: _core.fingerprint([("y", "F32", [m, k], y.reshape(-1).view(np.uint8))]),
    }
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            _core.delta_matmul(x, "float32", big_p, big_s, ids, None, y)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    seen: dict[str, BaseException] = {}
    deadline = time.monotonic() + 60
    try:
        # Until each input has been caught while the writer was inside its call
        # (between its calls the borrow is released and the call here succeeds).
        while len(seen) < len(cases) and time.monotonic() < deadline:
            for name, call in cases.items():
                if name in seen:
                    continue
                try:
                    call()
                except BaseException as exc:
                    seen[name] = exc
            time.sleep(0.001)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert set(seen) == set(cases), f"not caught while the writer ran: {set(cases) - set(seen)}"
    for name, exc in seen.items():
        assert isinstance(exc, qdelta.ShapeError), f"{name}: {type(exc).__name__}: {exc}"
        assert str(exc).startswith(
            f"{name}: expected an array not being written, found it in use as the output "
            "of a call running on another thread"
        ), str(exc)


def test_packed_embedding_refuses_non_finite_scales():
    base = np.ones((10, 40), np.float32)
    planes, scales = qdelta.pack_residual(np.ones((10, 40), np.float32), bits=1)
    tokens, tenants = np.array([1, 2], np.int64), np.zeros(2, np.int64)
    bad = scales.copy()
    bad[0] = np.nan
    _raises(
        qdelta.NonFiniteError,
        "expected finite values",
        _core.packed_embedding, base, planes[None], bad[None], tokens, tenants, np.empty((2, 40), np.float32),
    )  # fmt: skip


def test_gather_embedding_edges():
    out = np.empty((2, 0), np.float32)
    _core.gather_embedding(
        [np.zeros((4, 0), np.float32)], np.array([1, 2]), np.zeros(2, np.int64), out
    )
    _raises(
        qdelta.ShapeError,
        r"tables\[1\]: expected \[4, 6\]",
        _core.gather_embedding,
        [np.zeros((4, 6), np.float32), np.zeros((8, 3), np.float32)],
        np.array([1, 2]), np.array([0, 1]), np.empty((2, 6), np.float32),
    )  # fmt: skip


def test_saving_over_special_files_refuses_and_keeps_them(tmp_path, rng):
    from store_helpers import make_delta

    delta = make_delta(rng)
    fifo = tmp_path / "f.qdelta"
    os.mkfifo(fifo)
    _raises(qdelta.FileError, "expected a regular file .* found a FIFO", delta.save, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    sock_path = tmp_path / "s.qdelta"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        _raises(qdelta.FileError, "found a socket", delta.save, sock_path)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    link = tmp_path / "null.qdelta"
    link.symlink_to("/dev/null")  # only the link is ever written to, never /dev
    _raises(qdelta.FileError, "found a symbolic link to a character device", delta.save, link)
    assert os.path.islink(link) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_outputs_must_have_the_rows_and_width_not_just_the_size():
    x = np.ones((4, 40), np.float32)
    weight = np.ones((6, 40), np.float32)
    planes, scales = qdelta.pack_residual(np.ones((6, 40), np.float32))
    ids = np.zeros(4, np.int64)
    _raises(
        qdelta.ShapeError,
        r"out: expected \[\.\.\., 6\] with 4 rows in all, found \[8, 3\]",
        _core.fused_linear, x, weight, None, planes[None], scales[None], ids, np.empty((8, 3), np.float32),
    )  # fmt: skip
    _raises(
        qdelta.ShapeError,
        r"out: expected \[\.\.\., 12\] with 4 rows in all, found \[2, 12\]",
        _core.rowwise_linear, x, [weight], [None], np.zeros(4, np.int64), np.empty((2, 12), np.float32),
    )  # fmt: skip
    base = np.ones((10, 40), np.float32)
    tokens = np.array([1, 2], np.int64)
    _raises(
        qdelta.ShapeError,
        r"out: expected \[\.\.\., 40\] with 2 rows in all, found \[4, 20\]",
        _core.packed_embedding,
        base, planes[None][:, :, :1].repeat(10, axis=2)[:, :, :10], scales[None], tokens,
        np.zeros(2, np.int64), np.empty((4, 20), np.float32),
    )  # fmt: skip
    # Leading dims may be anything with the right row count.
    out = np.empty((2, 2, 6), np.float32)
    _core.fused_linear(x, weight, None, planes[None], scales[None], ids, out)
    assert np.allclose(
        out.reshape(4, 6),
        x @ weight.T + np.ones((4, 40)) @ qdelta.unpack_residual(planes, scales, (6, 40)).T,
    )
