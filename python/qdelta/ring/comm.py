"""Point-to-point ring communication: each rank sends to ``rank + 1`` and receives
from ``rank - 1`` (within a process group), asynchronously.

Usage per step: ``incoming = comm.send_recv(tensors, shapes)``; ``comm.commit()``
starts the transfer; compute on the current tensors meanwhile; ``comm.wait()``
makes ``incoming`` valid. That is the double buffer: the block being computed on
is the one being sent, the next one lands in fresh buffers.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from qdelta.errors import DTypeError
from qdelta.ring.errors import RingError

# The longest timeout torch.distributed's gloo waits take: the deadline becomes
# int64 nanoseconds on the system clock (2**63 ns after 1970: about 7.4e9 s from
# 2026), and past it a wait never ends or times out at once (measured); timedelta
# itself ends at 8.64e13 s. 1e9 s (about 31 years) leaves a margin for the clock.
MAX_TIMEOUT = 1e9


def check_timeout(timeout, what: str = "ring timeout") -> float | None:
    """``timeout`` as seconds: None (the process group's) or a finite number in
    ``(0, MAX_TIMEOUT]``; ``what`` names it in the error."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise DTypeError(
            f"{what}: expected None or a number of seconds, found {type(timeout).__name__}"
        )
    # 0 or less would time every exchange out at once; see MAX_TIMEOUT for the top.
    # Comparisons, not math.isfinite: nan fails them, and a huge int has no float.
    if not 0 < timeout <= MAX_TIMEOUT:
        raise RingError(
            f"{what}: expected a finite number of seconds > 0 and <= {MAX_TIMEOUT:g} "
            f"(about 31 years), found {timeout!r}"
        )
    return float(timeout)


class RingComm:
    """One direction of a ring over ``group`` (None = the default group): send to
    ``rank + offset``, receive from ``rank - offset`` (offset 1: the next rank)."""

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, tag: int = 0, timeout=None, offset=1
    ):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.tag = tag
        self.timeout = check_timeout(timeout)
        real_group = group if group is not None else dist.group.WORLD
        self.send_to = (self.rank + offset) % self.world_size
        self.recv_from = (self.rank - offset) % self.world_size
        self.send_rank = dist.get_global_rank(real_group, self.send_to)
        self.recv_rank = dist.get_global_rank(real_group, self.recv_from)
        self._ops: list[dist.P2POp] = []
        self._reqs: list | None = None
        self._what = ""

    def send_recv(
        self, tensors: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]], what: str = "block"
    ) -> list[torch.Tensor]:
        """Queue sending ``tensors`` onward and receiving same-dtype ones of ``shapes``."""
        if self._ops or self._reqs is not None:
            raise RingError("RingComm: a transfer is already queued or in flight; wait() first")
        incoming = []
        for t, shape in zip(tensors, shapes, strict=True):
            buf = torch.empty(tuple(shape), dtype=t.dtype, device=t.device)
            self._ops.append(
                dist.P2POp(dist.isend, t.contiguous(), self.send_rank, self.group, self.tag)
            )
            self._ops.append(dist.P2POp(dist.irecv, buf, self.recv_rank, self.group, self.tag))
            incoming.append(buf)
        self._what = what
        return incoming

    def commit(self) -> None:
        """Start the queued transfer."""
        try:
            self._reqs = dist.batch_isend_irecv(self._ops)
        except RuntimeError as exc:
            raise self._error("could not start", exc) from exc
        finally:
            self._ops = []

    def wait(self) -> None:
        """Block until the transfer started by commit() is done; RingError if a peer failed."""
        reqs, self._reqs = self._reqs, None
        if reqs is None:
            return
        try:
            for req in reqs:
                if self.timeout is None:
                    req.wait()
                else:
                    req.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise self._error("failed or timed out", exc) from exc

    def _error(self, verb: str, exc: Exception) -> RingError:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return RingError(
            f"ring rank {self.rank}/{self.world_size}: exchanging the {self._what} with "
            f"rank {self.send_to} (send) and {self.recv_from} (receive) {verb}: {first} "
            "(a peer rank died, hung, or was given a differently shaped input)"
        )


def all_gather_ints(
    values: Sequence[int], group, *, timeout: float | None = None, what: str = "values"
) -> list[list[int]]:
    """Every rank's ``values`` (the same count on every rank), in rank order: one
    small int64 all-gather. ``timeout`` (seconds, None: the group's) bounds the wait."""
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return [list(values)]
    backend = str(dist.get_backend(group)).lower()
    # NCCL gathers CUDA tensors only; every other backend (gloo, or gloo for the CPU
    # half of a mixed one) takes CPU tensors. Independent of the inputs, so a rank
    # whose inputs are invalid can still take part and tell its peers.
    nccl_only = "nccl" in backend and "cpu" not in backend and "gloo" not in backend
    device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else "cpu"
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size)]
    try:
        work = dist.all_gather(out, mine, group=group, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RingError(
            f"ring rank {dist.get_rank(group)}/{world_size}: gathering {what} failed: {first} "
            "(a peer rank died or hung)"
        ) from exc
    return [t.tolist() for t in out]
