"""Stacks of per-tenant tensors (one row a tenant) that grow into spare rows.

Loading tenants one by one into a stack that is exactly full copies the whole
stack on every load: T loads copy it T/2 times over. A stack here keeps
``HEADROOM`` spare rows when it is (re)allocated, so a load writes only its own
row and T loads reallocate it O(log T) times. Rows already in a stack are
never written by a growth: views taken of it before (a failed load's rollback,
a prepared kernel's arrays) keep their values. A removal moves the last row
into the freed one (one row copied): the rows' order changes, and callers keep
their own index of which tenant sits where.
"""

from __future__ import annotations

import math

import torch

#: Spare rows a (re)allocated stack reserves, as a fraction of its rows: at most
#: this fraction of its bytes held unused (docs/RUNTIME.md, "Cost of a load").
HEADROOM = 0.25


def _with_room(rows: int, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised ``[rows, *shape]`` prefix of a buffer with spare rows."""
    spare = max(1, math.ceil(rows * HEADROOM))
    return like.new_empty((rows + spare, *shape))[:rows]


def _rows_in_place(stack: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``stack``'s buffer seen as its first ``rows`` rows, or None where that view
    cannot be written in place: ``stack`` is not a contiguous prefix of its
    buffer, the buffer is too small, or rows are empty."""
    row_bytes = math.prod(stack.shape[1:]) * stack.element_size()
    storage = stack.untyped_storage()
    if not (
        row_bytes > 0
        and stack.is_contiguous()
        and stack.storage_offset() == 0
        and storage.nbytes() >= rows * row_bytes
        # An inference tensor cannot be written outside inference mode.
        and (torch.is_inference_mode_enabled() or not stack.is_inference())
    ):
        return None
    return stack.new_empty(0).set_(storage, 0, (rows, *stack.shape[1:]))


def appended(stack: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``torch.cat([stack, row[None]])`` (``row`` cast to the stack's dtype), written
    into the spare rows of ``stack``'s buffer when it has one (``stack`` is then a
    prefix of it), else into a new buffer with ``HEADROOM`` spare rows."""
    n, shape = stack.shape[0], tuple(stack.shape[1:])
    if tuple(row.shape) != shape:
        raise ValueError(f"a stack row: expected shape {list(shape)}, found {list(row.shape)}")
    grown = _rows_in_place(stack, n + 1)
    if grown is None:
        grown = _with_room(n + 1, stack, shape)
        grown[:n] = stack
    grown[n] = row
    return grown


def started(row: torch.Tensor) -> torch.Tensor:
    """A stack of the one row ``row``, with spare rows."""
    return appended(row.new_empty((0, *row.shape)), row)


def without(stack: torch.Tensor, index: int) -> torch.Tensor:
    """``stack`` less its row ``index``: the last row moves into that row (one row
    copied, in place), so the caller's index of the last row becomes ``index``.
    Views of ``stack`` from before see that move. Once fewer than half of the
    buffer's rows would be in use (headroom counted), the rows are copied into
    a new, smaller buffer instead, so evictions give memory back; no row left
    holds no buffer at all."""
    n, shape = stack.shape[0], tuple(stack.shape[1:])
    if n == 1:
        return stack.new_empty((0, *shape))
    rows = n - 1
    wanted = rows + max(1, math.ceil(rows * HEADROOM))
    row_bytes = math.prod(shape) * stack.element_size()
    kept = None
    if stack.untyped_storage().nbytes() <= 2 * wanted * row_bytes:
        kept = _rows_in_place(stack, rows)
    if kept is None:
        kept = _with_room(rows, stack, shape)
        kept[:] = stack[:rows]
    if index < rows:
        kept[index] = stack[rows]
    return kept
