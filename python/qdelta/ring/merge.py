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


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partials. ``out``: ``[..., S, D]``, ``lse``: ``[..., S]``; returns new ones.

    Computed in the partials' dtype (keep them fp32 or fp64); ``block_*`` are cast to it.
    """
    block_out = block_out.to(out.dtype)
    block_lse = block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    # Where both are -inf the row has still seen nothing: subtract 0 instead of -inf.
    ref = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - ref).unsqueeze(-1)
    w_new = torch.exp(block_lse - ref).unsqueeze(-1)
    return out * w_old + block_out * w_new, new_lse


def merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In-place :func:`merge` into ``out`` and ``lse`` (which may be views of larger buffers)."""
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
    block_lse = block_lse.to(lse.dtype)
    w = torch.nan_to_num_(torch.sigmoid(block_lse - lse), nan=0.0).unsqueeze(-1)
    out.mul_(1.0 - w).addcmul_(block_out, w)
    torch.logaddexp(lse, block_lse, out=lse)
