"""Argument checks shared across the package: each raises the qdelta error that
names the argument, what was expected and what was found."""

from __future__ import annotations

import operator
from typing import Any

import torch

from qdelta.errors import DTypeError, NonFiniteError, ShapeError


def as_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, hi_text: str = ""
) -> int:
    """``value`` as an int (a Python or numpy integer, never a bool) in ``[lo, hi)``:
    DTypeError for another type, ShapeError out of range. ``hi_text`` writes ``hi``
    in the message (e.g. ``"2**63"``)."""
    try:
        if isinstance(value, bool):  # an int to Python, never meant as a count or an id
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise DTypeError(f"{name}: expected an int, found {type(value).__name__}") from None
    if (lo is not None and i < lo) or (hi is not None and i >= hi):
        if hi is None:
            want = f">= {lo}"
        else:
            want = f"in [{lo if lo is not None else '-inf'}, {hi_text or hi})"
        raise ShapeError(f"{name}: expected an int {want}, found {i}")
    return i


def check_tensor_like(what: str, value: object, like: torch.Tensor, owner: str = "model") -> None:
    """``value`` a finite tensor of ``like``'s kind (float for float, int for int):
    a cast would silently drop an imaginary part or a fraction, NaN would spread."""
    if (
        not isinstance(value, torch.Tensor)
        or value.is_complex()
        or value.is_floating_point() != like.is_floating_point()
    ):
        found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise DTypeError(
            f"{what}: expected a tensor of the {owner}'s kind ({like.dtype}), found {found}"
        )
    if value.is_floating_point():
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            at = (~finite).nonzero()[0].tolist()
            raise NonFiniteError(f"{what}: expected finite values, found NaN/Inf at {at}")
