"""Merge attention partials computed over disjoint key blocks, exactly.

A partial is ``(out, lse)``: the softmax-weighted values over some keys and the
log-sum-exp of those keys' scores. Two partials combine as

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

A row that has seen only masked keys has ``lse = -inf`` and ``out = 0``; merging
two such rows must give ``-inf`` and ``0`` again, never ``-inf - -inf = NaN``.
"""

from __future__ import annotations

import torch

from qdelta.errors import DTypeError, ShapeError


def check_partials(what: str, out, lse, block_out, block_lse, *, devices: bool = True) -> None:
    """Metadata checks of two partials to merge (no data is read): ``out`` and
    ``block_out`` of one shape ``[..., S, D]``, ``lse`` and ``block_lse`` of
    ``[..., S]``, all floating, on one device (``devices=False``: the caller's
    torch ops catch a device mismatch). Broadcasting is refused: a block of one
    row would silently be merged into every row."""
    try:  # one cheap expression on the hot path; _explain says what is wrong
        shape = out.shape
        ok = (
            len(shape) > 0
            and block_out.shape == shape
            and lse.shape == shape[:-1]
            and block_lse.shape == lse.shape
            and out.dtype.is_floating_point
            and lse.dtype.is_floating_point
            and block_out.dtype.is_floating_point
            and block_lse.dtype.is_floating_point
            and (not devices or out.device == lse.device == block_out.device == block_lse.device)
        )
    except AttributeError:
        ok = False
    if not ok:
        _explain(what, out, lse, block_out, block_lse)


def _explain(what: str, out, lse, block_out, block_lse) -> None:
    names = ("out", "lse", "block_out", "block_lse")
    parts = (out, lse, block_out, block_lse)
    for name, t in zip(names, parts, strict=True):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{what}: expected {name} as a torch.Tensor, found {type(t).__name__}")
    if (
        out.dim() < 1
        or block_out.shape != out.shape
        or lse.shape != out.shape[:-1]
        or block_lse.shape != lse.shape
    ):
        raise ShapeError(
            f"{what}: expected out and block_out of one shape [..., S, D], lse and block_lse "
            f"[..., S], found out {tuple(out.shape)}, lse {tuple(lse.shape)}, block_out "
            f"{tuple(block_out.shape)}, block_lse {tuple(block_lse.shape)}"
        )
    if not all(t.dtype.is_floating_point for t in parts):
        raise DTypeError(
            f"{what}: expected floating partials, found out {out.dtype}, lse {lse.dtype}, "
            f"block_out {block_out.dtype}, block_lse {block_lse.dtype}"
        )
    if not (out.device == lse.device == block_out.device == block_lse.device):
        raise DTypeError(
            f"{what}: expected partials on one device, found out {out.device}, lse "
            f"{lse.device}, block_out {block_out.device}, block_lse {block_lse.device}"
        )


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partials. ``out``: ``[..., S, D]``, ``lse``: ``[..., S]``; returns new ones.

    Computed in the partials' dtype (keep them fp32 or fp64); ``block_*`` are cast to it.
    Shapes must match exactly (ShapeError), dtypes be floating (DTypeError).
    """
    check_partials("merge", out, lse, block_out, block_lse)
    block_out = block_out.to(out.dtype)
    block_lse = block_lse.to(lse.dtype)
    # Where both are -inf the row has still seen nothing: its weights are 0 and its
    # lse stays -inf. Those rows compute on zeros instead (the double-where rule), so
    # not even their gradients see -inf - -inf.
    empty = torch.isneginf(lse) & torch.isneginf(block_lse)
    lse_s = torch.where(empty, 0.0, lse)
    block_s = torch.where(empty, 0.0, block_lse)
    new_lse = torch.where(empty, float("-inf"), torch.logaddexp(lse_s, block_s))
    # exp(lse - new_lse) = sigmoid(lse - block_lse): from the difference alone, so the
    # rounding of a large new_lse (|lse| ~ 1e7 in fp32) never reaches the weights.
    w_old = torch.where(empty, 0.0, torch.sigmoid(lse_s - block_s)).unsqueeze(-1)
    w_new = torch.where(empty, 0.0, torch.sigmoid(block_s - lse_s)).unsqueeze(-1)
    return out * w_old + block_out * w_new, new_lse


def merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In-place :func:`merge` into ``out`` and ``lse`` (which may be views of larger buffers)."""
    check_partials("merge_", out, lse, block_out, block_lse)
    new_out, new_lse = merge(out, lse, block_out, block_lse)
    out.copy_(new_out)
    lse.copy_(new_lse)


def empty_partial(
    shape_out: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of no keys at all: ``out = 0``, ``lse = -inf``."""
    out = torch.zeros(shape_out, dtype=dtype, device=device)
    lse = torch.full(shape_out[:-1], float("-inf"), dtype=dtype, device=device)
    return out, lse


def merge_fused_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In-place :func:`merge` in a few fused ops with no temporaries of ``out``'s size.

    ``block_out`` may stay in its kernel's dtype (e.g. bf16 from flash attention);
    it is read once, promoted inside ``addcmul_``. The block's weight is
    ``exp(block_lse - new_lse) = sigmoid(block_lse - lse)``; when both are ``-inf``
    that is NaN, set to 0 (the row keeps ``out = 0``, ``lse = -inf``).
    """
    check_partials("merge_fused_", out, lse, block_out, block_lse, devices=False)
    try:
        block_lse = block_lse.to(lse.dtype)
        w = torch.nan_to_num_(torch.sigmoid(block_lse - lse), nan=0.0).unsqueeze(-1)
        out.mul_(1.0 - w).addcmul_(block_out, w)
        torch.logaddexp(lse, block_lse, out=lse)
    except RuntimeError:
        # The hot path leaves device checks to torch (which refuses a mismatch
        # before writing): name the devices when that is what failed.
        _explain("merge_fused_", out, lse, block_out, block_lse)
        raise
