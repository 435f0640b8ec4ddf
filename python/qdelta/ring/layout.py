"""How a sequence is cut into chunks and which chunks each rank of a ring holds.

Chunk sizes follow ``torch.tensor_split``: ``n`` chunks of a length ``S`` sequence,
the first ``S % n`` one token longer, so odd lengths need no padding.

- ``contiguous``: rank ``r`` holds chunk ``r`` of ``W`` chunks.
- ``zigzag``: the sequence is cut into ``2W`` chunks and rank ``r`` holds chunks
  ``r`` and ``2W - 1 - r``, so under a causal mask every rank does the same work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from qdelta.checks import as_int
from qdelta.errors import DTypeError, ShapeError
from qdelta.ring.errors import RingError

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions ``[start, start + length)``."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def chunk_sizes(seq_len: int, n: int) -> list[int]:
    base, extra = divmod(seq_len, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def rank_chunks(seq_len: int, world_size: int, rank: int, layout: Layout) -> list[Chunk]:
    """The global chunks rank ``rank`` holds, in the order they sit in its local shard."""
    _check_layout(layout)
    world_size, rank = _check_world(world_size, rank)
    seq_len = as_int("seq_len", seq_len)
    if seq_len < 0:
        raise ShapeError(f"layout: expected seq_len >= 0, found {seq_len}")
    return list(chunks_of(seq_len, world_size, rank, layout))


@functools.lru_cache(maxsize=4096)
def chunks_of(seq_len: int, world_size: int, rank: int, layout: str) -> tuple[Chunk, ...]:
    """:func:`rank_chunks` of arguments already checked, cached: the ring's inner
    loops ask for the same few chunk lists once per block pair."""
    n = world_size if layout == "contiguous" else 2 * world_size
    sizes = chunk_sizes(seq_len, n)
    starts = [sum(sizes[:i]) for i in range(n)]
    ids = [rank] if layout == "contiguous" else [rank, n - 1 - rank]
    return tuple(Chunk(starts[i], sizes[i]) for i in ids)


def local_length(seq_len: int, world_size: int, rank: int, layout: Layout) -> int:
    return sum(c.length for c in rank_chunks(seq_len, world_size, rank, layout))


def position_ids(seq_len: int, world_size: int, rank: int, layout: Layout) -> torch.Tensor:
    """Global positions (int64) of the tokens in rank ``rank``'s shard, e.g. for RoPE."""
    parts = [torch.arange(c.start, c.stop) for c in rank_chunks(seq_len, world_size, rank, layout)]
    return torch.cat(parts)


def shard(
    x: torch.Tensor, world_size: int, rank: int, *, layout: Layout = "contiguous", dim: int = -2
) -> torch.Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` along ``dim``."""
    _check_world(world_size, rank)
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"shard: expected x as a torch.Tensor, found {type(x).__name__}")
    dim = _check_dim("shard", x, dim)
    chunks = rank_chunks(x.shape[dim], world_size, rank, layout)
    return torch.cat([x.narrow(dim, c.start, c.length) for c in chunks], dim=dim)


def unshard(shards: list[torch.Tensor], *, layout: Layout = "contiguous", dim: int = -2):
    """The full sequence back from every rank's shard (``shards[r]`` from rank ``r``)."""
    _check_layout(layout)
    if not isinstance(shards, list | tuple) or not shards:
        found = (
            f"{len(shards)} shards" if isinstance(shards, list | tuple) else type(shards).__name__
        )
        raise ShapeError(f"unshard: expected a non-empty list of shards, found {found}")
    for rank, part in enumerate(shards):
        if not isinstance(part, torch.Tensor):
            raise DTypeError(
                f"unshard: expected rank {rank}'s shard as a torch.Tensor, found "
                f"{type(part).__name__}"
            )
    first = shards[0]
    dim = _check_dim("unshard", first, dim)
    for rank, part in enumerate(shards):
        other = list(part.shape)
        if part.dim() == first.dim():
            other[dim] = first.shape[dim]
        if other != list(first.shape) or part.dtype != first.dtype or part.device != first.device:
            raise ShapeError(
                f"unshard: expected every shard shaped like rank 0's {tuple(first.shape)} "
                f"({first.dtype}, {first.device}) except along dim {dim}, found rank {rank}'s "
                f"{tuple(part.shape)} ({part.dtype}, {part.device})"
            )
    world_size = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    pieces: list[tuple[int, torch.Tensor]] = []
    for rank, part in enumerate(shards):
        chunks = rank_chunks(seq_len, world_size, rank, layout)
        expected = sum(c.length for c in chunks)
        if part.shape[dim] != expected:
            raise ShapeError(
                f"unshard: expected rank {rank}'s shard to hold {expected} tokens of a "
                f"{seq_len}-token {layout} layout, found {part.shape[dim]}"
            )
        offset = 0
        for c in chunks:
            pieces.append((c.start, part.narrow(dim, offset, c.length)))
            offset += c.length
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in pieces], dim=dim)


def seq_len_from_local(lengths: list[int], layout: Layout) -> int:
    """The global length given every rank's local length; raise if they fit no split."""
    seq_len = sum(lengths)
    world_size = len(lengths)
    expected = [local_length(seq_len, world_size, r, layout) for r in range(world_size)]
    if expected != list(lengths):
        raise ShapeError(
            f"ring attention: a {seq_len}-token sequence in the {layout} layout over "
            f"{world_size} ranks has local lengths {expected}, found {list(lengths)} "
            "(shard inputs with qdelta.ring.shard)"
        )
    return seq_len


def _check_layout(layout: str) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise RingError(f"layout: expected one of {LAYOUTS}, found {layout!r}")


def _check_world(world_size: int, rank: int) -> tuple[int, int]:
    world_size, rank = as_int("world_size", world_size), as_int("rank", rank)
    if world_size < 1:
        raise RingError(f"expected world_size >= 1, found {world_size}")
    if not 0 <= rank < world_size:
        # A negative rank would silently index chunks from the end.
        raise RingError(f"expected 0 <= rank < world_size, found rank {rank}, world {world_size}")
    return world_size, rank


def _check_dim(what: str, x: torch.Tensor, dim) -> int:
    """``dim`` of ``x`` as a non-negative index, else ShapeError / DTypeError."""
    dim = as_int(f"{what}: dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise ShapeError(
            f"{what}: expected dim in [{-x.dim()}, {x.dim()}) for a tensor of shape "
            f"{tuple(x.shape)}, found {dim}"
        )
    return dim % x.dim()
