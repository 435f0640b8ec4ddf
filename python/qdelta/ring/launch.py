"""Spawn a local ring of CPU processes (gloo over 127.0.0.1) and collect results.

For tests, demos and benchmarks: ``spawn_ring(fn, world_size, args)`` runs
``fn(rank, world_size, *args)`` in ``world_size`` fresh processes that share an
initialized default process group, and returns each rank's return value. The
rendezvous store lives in this process on a free port chosen by the OS, so
concurrent rings never collide. Every run is bounded: past ``timeout`` the
remaining ranks are killed; a failing rank's traceback is reported.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qdelta.ring.errors import RingError


@dataclass
class RankOutcome:
    rank: int
    ok: bool
    value: object = None
    error: str = ""
    seconds: float = 0.0


def _child(rank, world_size, port, fn, args, out_dir, pg_timeout, threads, backend):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result: dict
    joined = False
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=timedelta(seconds=pg_timeout))  # fmt: skip
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )  # fmt: skip
        joined = True
        result = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    result["seconds"] = time.perf_counter() - start
    # Reported before the teardown: after a failed exchange, destroying the group
    # can wait on the pending operation (gloo, torch 2.6) until the parent kills it.
    tmp = Path(out_dir) / f".rank{rank}.tmp"
    torch.save(result, tmp)
    os.replace(tmp, Path(out_dir) / f"rank{rank}.pt")
    if joined:
        dist.destroy_process_group()


def run_ring(
    fn: Callable,
    world_size: int,
    args: Sequence = (),
    *,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
    threads: int = 1,
    backend: str = "gloo",
    grace: float = 5.0,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on a fresh local ring; every rank's outcome.

    A rank that has not finished ``timeout`` seconds after the start, ``grace``
    seconds after another rank failed, or ``pg_timeout + grace`` seconds after
    another rank finished, is killed and reported as hung.
    """
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout))  # fmt: skip
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="qdelta-ring-") as out_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(
                    r,
                    world_size,
                    store.port,
                    fn,
                    tuple(args),
                    out_dir,
                    pg_timeout,
                    threads,
                    backend,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        first_exit = False
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if any(p.exitcode not in (None, 0) for p in procs) or any(
                    _read(out_dir, r) is not None and not _read(out_dir, r)["ok"]
                    for r in range(world_size)
                ):
                    deadline = min(deadline, time.monotonic() + grace)
                elif any(p.exitcode == 0 for p in procs) and not first_exit:
                    # A rank still waiting on a finished one fails within the
                    # process group timeout; past that it is hung.
                    first_exit = True
                    deadline = min(deadline, time.monotonic() + pg_timeout + grace)
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        outcomes = []
        for r, p in enumerate(procs):
            res = _read(out_dir, r)
            if res is None:
                why = (
                    "hung: killed after the timeout"
                    if p.exitcode in (-9, None)
                    else (f"died with exit code {p.exitcode} before reporting")
                )
                outcomes.append(RankOutcome(r, False, error=why))
            else:
                outcomes.append(RankOutcome(r, res["ok"], res.get("value"), res.get("error", ""),
                                            res["seconds"]))  # fmt: skip
    return outcomes


def spawn_ring(fn: Callable, world_size: int, args: Sequence = (), **kwargs) -> list:
    """Like :func:`run_ring` but return the values, or raise RingError naming failed ranks."""
    outcomes = run_ring(fn, world_size, args, **kwargs)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines = "\n".join(f"rank {o.rank}: {o.error}" for o in failed)
        raise RingError(
            f"expected all {world_size} ranks to succeed, {len(failed)} failed:\n{lines}"
        )
    return [o.value for o in outcomes]


def _read(out_dir: str, rank: int) -> dict | None:
    path = Path(out_dir) / f"rank{rank}.pt"
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)
