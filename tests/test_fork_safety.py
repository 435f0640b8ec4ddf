"""The Rust core in a child made by fork() after the parent used its thread pool.

A forked child inherits the parent's memory but not its threads: a thread pool
the parent had started looks alive in the child, and a parallel call there
waits forever for workers that do not exist (this was rayon's global pool).
fork is Python's default multiprocessing start method on Linux before 3.14 and how
torch DataLoader workers start. The core now runs its parallel work on a pool
of its own, rebuilt in each process (src/pool.rs). Every child here is joined
with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import qdelta
from qdelta.kernels import cpu

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods(), reason="needs os.fork (POSIX)"
)

JOIN_S = 60.0
FORK = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def _digest(value) -> str:
    """A short text that is equal exactly when two results are (arrays by dtype,
    shape and bytes; torch tensors as their arrays; tuples element-wise)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().numpy()
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_digest(v) for v in value) + ")"
    if isinstance(value, np.ndarray):
        h = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return f"{value.dtype}{list(value.shape)}:{h}"
    return repr(value)


class Calls:
    """Each entry point that uses the thread pool, on inputs large enough to use
    it (several row tasks, several fingerprint chunks, kernel calls over the
    threading thresholds of docs/CPU_KERNEL.md). Each call returns a result
    that depends only on the inputs, so a child must get the parent's. None
    runs a torch matmul: torch's own OpenMP pool has the same problem after
    fork (a BitDeltaLinear forward of more than 16 rows calls F.linear), which
    is torch's, not the core's."""

    def __init__(self, tmp: Path, rng: np.random.Generator) -> None:
        self.tmp = tmp
        f32 = np.float32
        self.delta = rng.standard_normal((512, 1000)).astype(f32)
        self.tiny = rng.standard_normal((8, 64)).astype(f32)
        self.planes, self.scales = qdelta.pack_residual(self.delta, bits=3, scale="row")
        # 2.5 Mi float32 = 10 MiB: two 8 MiB fingerprint chunks, plus small tensors.
        self.weights = {
            "big": torch.from_numpy(rng.standard_normal(5 << 19).astype(f32)),
            **{
                f"w{i}": torch.from_numpy(rng.standard_normal((64, 64)).astype(f32))
                for i in range(8)
            },
        }
        # Distinct scales: four layers of their own (equal ones would share one pair
        # of tensors in the file), so verify() hashes 9 tensors on the pool.
        layers = {
            f"layer{i}": qdelta.PackedLayer(self.planes, self.scales * (i + 1), self.delta.shape)
            for i in range(4)
        }
        self.delta_obj = qdelta.Delta(layers, {"norm": torch.ones(1000)}, "f" * 32, tenant="t")
        self.saved = tmp / "parent.qdelta"
        self.delta_obj.save(self.saved)
        # delta_matmul: 2 planes x 1024 rows x 32 words x 16 row tiles = 2^20
        # packed words >= PARALLEL_FROM_WORDS (2^18).
        k = n = 1024
        w = rng.standard_normal((n, k)).astype(f32)
        p, s = qdelta.pack_residual(w, bits=2)
        self.stack_planes = torch.from_numpy(np.stack([p, p]).view(np.int32))
        self.stack_scales = torch.from_numpy(np.stack([s, 2 * s]))
        self.x = torch.from_numpy(rng.standard_normal((64, k)).astype(f32))
        self.ids = torch.from_numpy((np.arange(64) % 2).astype(np.int64))
        # fused / rowwise: 16 rows x 1024 x 1024 multiply-adds >= PARALLEL_FROM (2^20).
        self.weight = rng.standard_normal((n, k)).astype(f32)
        self.bias = rng.standard_normal(n).astype(f32)
        self.x16 = torch.from_numpy(rng.standard_normal((16, k)).astype(f32))

    def pack_residual(self):
        return qdelta.pack_residual(self.delta, bits=3, scale="row")

    def pack_residual_tiny(self):
        return qdelta.pack_residual(self.tiny, bits=1)

    def pack_signs(self):
        return qdelta.pack_signs(self.delta)

    def unpack_signs(self):
        return qdelta.unpack_signs(self.planes[0], self.delta.shape)

    def unpack_residual(self):
        return qdelta.unpack_residual(self.planes, self.scales, self.delta.shape)

    def fingerprint(self):
        return qdelta.fingerprint(self.weights)

    def save(self):
        """Writing computes the checksums in parallel: the same bytes as the parent's file."""
        path = self.tmp / f"pid{os.getpid()}.qdelta"
        self.delta_obj.save(path)
        data = path.read_bytes()
        path.unlink()
        return hashlib.sha256(data).hexdigest()

    def verify(self):
        return qdelta.DeltaFile(self.saved).verify()

    def multi_tenant_delta_matmul(self):
        return cpu.multi_tenant_delta_matmul(self.x, self.stack_planes, self.stack_scales, self.ids)

    def fused_linear(self):
        out = torch.empty(16, self.weight.shape[0])
        cpu.single_fused_linear(
            self.x16, self.weight, self.bias, self.stack_planes[0], self.stack_scales[0], out
        )
        return out

    def rowwise_linear(self):
        out = torch.empty(16, self.weight.shape[0])
        index = np.zeros(16, np.int64)
        cpu.rowwise_linear(self.x16, [self.weight], [self.bias], index, out)
        return out

    def names(self) -> list[str]:
        return [
            "pack_residual", "pack_residual_tiny", "pack_signs", "unpack_signs",
            "unpack_residual", "fingerprint", "save", "verify",
            "multi_tenant_delta_matmul", "fused_linear", "rowwise_linear",
        ]  # fmt: skip

    def run(self, name: str) -> str:
        with torch.no_grad():
            return _digest(getattr(self, name)())


@pytest.fixture
def calls(tmp_path: Path, rng: np.random.Generator) -> Calls:
    return Calls(tmp_path, rng)


def _start(target: Callable, *args) -> tuple[mp.process.BaseProcess, object]:
    """A forked child running ``target(conn, *args)``; returns it and the parent's end."""
    parent_end, child_end = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=target, args=(child_end, *args))
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (the pool's).
        warnings.simplefilter("ignore", DeprecationWarning)
        proc.start()
    child_end.close()
    return proc, parent_end


def _collect(children: dict[str, tuple], timeout: float = JOIN_S) -> dict[str, str]:
    """Each child's result by name, or "HUNG" / "DIED" / "FAILED: ..."; every
    child is finished (killed if need be) on return. One deadline for all."""
    deadline = time.monotonic() + timeout
    results = {}
    for name, (proc, conn) in children.items():
        left = max(0.0, deadline - time.monotonic())
        if conn.poll(left):
            try:
                results[name] = conn.recv()
            except EOFError:
                results[name] = f"DIED (exit code {proc.exitcode})"
        else:
            results[name] = f"HUNG (no result within {timeout:.0f} s)"
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
    return results


def _child_runs(conn, calls: Calls, names: list[str]) -> None:
    try:
        conn.send([calls.run(n) for n in names])
    except BaseException as e:
        conn.send(f"FAILED: {type(e).__name__}: {e}")


def test_forked_children_get_the_parents_results(calls):
    # The parent runs every call first: its thread pool is now running.
    want = {name: calls.run(name) for name in calls.names()}
    children = {name: _start(_child_runs, calls, [name]) for name in calls.names()}
    got = _collect(children)
    bad = {n: g for n, g in got.items() if g != [want[n]]}
    assert not bad, f"forked children: {bad} (expected {[want[n] for n in bad]})"
    # The parent's own pool still works after the forks.
    assert {name: calls.run(name) for name in calls.names()} == want


def _fork_again(conn, calls: Calls, names: list[str]) -> None:
    """In a child: use the pool here, then fork a grandchild that uses it too."""
    try:
        mine = [calls.run(n) for n in names]
        got = _collect({"grandchild": _start(_child_runs, calls, names)}, JOIN_S / 2)
        conn.send((mine, got["grandchild"]))
    except BaseException as e:
        conn.send(f"FAILED: {type(e).__name__}: {e}")


def test_a_fork_of_a_forked_child(calls):
    names = ["pack_residual", "verify", "multi_tenant_delta_matmul", "fused_linear"]
    want = [calls.run(n) for n in names]
    got = _collect({"child": _start(_fork_again, calls, names)})["child"]
    assert got == (want, want)


def test_fork_while_another_thread_runs_a_parallel_call(calls):
    """fork() while the pool is busy: the child gets a pool of its own, not the
    copy of a busy one whose workers it lacks."""
    names = ["pack_residual", "fingerprint", "multi_tenant_delta_matmul"]
    want = [calls.run(n) for n in names]
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            calls.run("pack_residual")

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        children = {f"child{i}": _start(_child_runs, calls, names) for i in range(3)}
        got = _collect(children)
    finally:
        stop.set()
        thread.join(JOIN_S)
    assert got == {name: want for name in children}


class _PackAndVerify(Dataset):
    """What a DataLoader worker might do with deltas: pack rows, verify a file."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        planes, scales = qdelta.pack_residual(self.calls.delta[i * 128 : (i + 1) * 128], bits=2)
        checked = qdelta.DeltaFile(self.calls.saved).verify()
        return (
            torch.from_numpy(planes.view(np.int32)),
            torch.from_numpy(scales),
            torch.tensor(checked),
        )


def test_dataloader_fork_workers(calls):
    ds = _PackAndVerify(calls)
    want = [ds[i] for i in range(len(ds))]  # the parent uses the pool first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loader = DataLoader(
            ds, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=JOIN_S
        )
        got = list(loader)
    assert len(got) == len(want)
    for (gp, gs, gc), (wp, ws, wc) in zip(got, want, strict=True):
        assert torch.equal(gp, wp) and torch.equal(gs, ws)
        assert int(gc) == int(wc) == len(calls.delta_obj.layers) * 2 + 1
