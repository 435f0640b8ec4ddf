"""The emulator under AddressSanitizer: out-of-bounds accesses of the kernels are caught.

With ``QDELTA_EMU_SANITIZE=address`` the emulated modules are built with
``-fsanitize=address``: a kernel reading or writing past a torch tensor's
allocation, a static ``__shared__`` array or the launch's dynamic shared memory
stops the process with ASan's report naming the source line (the plain emulator
does not see reads out of bounds at all), and a misaligned vector load (a fault
on a GPU) is UBSan's fatal alignment report. ASan's runtime must be loaded before
Python, so every run here is a subprocess started through
``python -m qdelta.kernels.emulator asan -- ...``. The self-test kernels show each
kind of access is reported (and that in-bounds runs are clean); the delta kernel suite and the
ring kernels' reference cases then run under the sanitizer (``make emu-asan``
runs all four emulated suites whole).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qdelta import QDeltaError

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="the CUDA emulator needs g++ on PATH"
)

emulator = pytest.importorskip("qdelta.kernels.emulator")

TESTS = Path(__file__).parent
SELFTEST = TESTS / "emu_selftest.cu"
REPORT = "ERROR: AddressSanitizer"

# One launch of a self-test kernel whose threads read element t + past of a
# blockDim-sized buffer (past = 1: one element past its end).
PROBE = """
import sys
import numpy as np
import torch
from qdelta.kernels import emulator

kind, past = sys.argv[1], int(sys.argv[2])
names = ["read_global", "read_static_shared", "read_dynamic_shared", "read_uint4"]
fn = emulator.module(sys.argv[3], names).get_function(f"read_{kind}")
n = 64
x = torch.arange(n, dtype=torch.float32) * 0.5
out = torch.full((n,), float("nan"))
p = lambda t: np.uint64(t.data_ptr())
if kind == "uint4":  # past: the offset in words of a 16-byte load
    words = torch.arange(n, dtype=torch.int32)
    out = torch.full((n,), -1, dtype=torch.int32)
    fn((1,), (n,), (p(words), p(out), np.int32(past)))
    x = torch.full((n,), 4 * past + 6, dtype=torch.int32)  # words past .. past + 3 summed
elif kind == "global":
    fn((1,), (n,), (p(x), p(out), np.int32(past)))
else:
    args = (p(out), np.int32(past))
    fn((1,), (n,), args, shared_mem=4 * n if kind == "dynamic_shared" else 0)
assert torch.equal(out, x), out
print("in bounds")
"""


def _has_asan() -> bool:
    try:
        emulator.asan_runtime()
    except QDeltaError:
        return False
    return True


needs_asan = pytest.mark.skipif(not _has_asan(), reason="the compiler ships no libasan")


def _sanitized(args: list[str], tmp_path: Path, timeout: float) -> tuple[int, str]:
    """Run ``args`` through the emulator's asan launcher; (exit status, ASan's reports)."""
    env = {**os.environ, "ASAN_OPTIONS": f"log_path={tmp_path / 'asan'}"}
    env.pop(emulator.SANITIZE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "qdelta.kernels.emulator", "asan", "--", *args],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("asan.*")))
    return proc.returncode, logs + proc.stdout[-4000:] + proc.stderr[-4000:]


@needs_asan
@pytest.mark.parametrize(
    ("kind", "finding"),
    [
        ("global", "heap-buffer-overflow"),
        ("static_shared", "global-buffer-overflow"),
        ("dynamic_shared", "use-after-poison"),
    ],
)
def test_a_read_one_past_the_end_is_reported(tmp_path, kind, finding):
    probe = [sys.executable, "-c", PROBE, kind]
    rc, out = _sanitized([*probe, "0", str(SELFTEST)], tmp_path / "inside", timeout=300)
    assert rc == 0 and "in bounds" in out and REPORT not in out, out
    rc, out = _sanitized([*probe, "1", str(SELFTEST)], tmp_path / "past", timeout=300)
    assert rc != 0 and REPORT in out and finding in out, out
    assert f"read_{kind}" in out and "emu_selftest.cu" in out, out  # names the kernel's line


@needs_asan
def test_a_misaligned_vector_load_is_reported(tmp_path):
    probe = [sys.executable, "-c", PROBE, "uint4"]
    rc, out = _sanitized([*probe, "4", str(SELFTEST)], tmp_path / "aligned", timeout=300)
    assert rc == 0 and "in bounds" in out and "misaligned" not in out, out
    rc, out = _sanitized([*probe, "1", str(SELFTEST)], tmp_path / "misaligned", timeout=300)
    assert rc != 0 and "misaligned address" in out and "requires 16 byte alignment" in out, out
    assert "emu_selftest.cu" in out, out


@needs_asan
@pytest.mark.timeout(900)
def test_the_delta_and_ring_kernels_run_clean_under_the_sanitizer(tmp_path):
    # The delta suite whole, the ring suite's kernel-against-reference cases (its
    # host-side tests add nothing here); `make emu-asan` runs every emulated suite.
    suites = [str(TESTS / "test_cuda_emulated.py"), str(TESTS / "test_ring_emulated.py")]
    ring_kernels = "not ring_emulated or matches_reference or window_and_softcap_match"
    rc, out = _sanitized(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *suites,
            "-k",
            ring_kernels,
        ],
        tmp_path,
        timeout=880,
    )
    assert REPORT not in out, out
    assert rc == 0 and " passed" in out, out


def test_the_sanitizer_without_its_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(emulator, "_asan_loaded", lambda: False)
    monkeypatch.setenv(emulator.SANITIZE_ENV, "address")
    with pytest.raises(QDeltaError, match="AddressSanitizer runtime loaded"):
        emulator.compile_flags()
    monkeypatch.setenv(emulator.SANITIZE_ENV, "thread")
    with pytest.raises(QDeltaError, match="expected one of address or unset"):
        emulator.compile_flags()
    monkeypatch.delenv(emulator.SANITIZE_ENV)
    assert emulator.compile_flags() == emulator.FLAGS


def test_the_launcher_needs_a_command(capsys):
    assert emulator.main(["asan"]) == 2
    assert "usage: python -m qdelta.kernels.emulator asan -- <command>" in capsys.readouterr().err
