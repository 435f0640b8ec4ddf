"""Blockwise feed-forward: apply a position-wise module chunk by chunk along the
sequence so only one chunk's hidden activations (often 4x the model width) are
alive at a time (Ring Attention's blockwise FFN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint

from qdelta.errors import DTypeError, ShapeError
from qdelta.ring.errors import RingError
from qdelta.ring.layout import as_int


def blockwise_feedforward(
    ffn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk_size: int,
    *,
    dim: int = -2,
    checkpoint: bool | None = None,
) -> torch.Tensor:
    """``ffn(x)`` computed ``chunk_size`` positions at a time along ``dim``.

    ``ffn`` must act on each position independently (an MLP, not attention).
    Under autograd each chunk is checkpointed by default (recomputed in the
    backward pass), otherwise its hidden activations would be kept for backward
    and nothing would be saved.
    """
    if not callable(ffn):
        raise DTypeError(
            f"blockwise_feedforward: expected ffn as a callable, found {type(ffn).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise DTypeError(
            f"blockwise_feedforward: expected x as a torch.Tensor, found {type(x).__name__}"
        )
    chunk_size = as_int("blockwise_feedforward: chunk_size", chunk_size)
    if chunk_size < 1:
        raise RingError(f"blockwise_feedforward: expected chunk_size >= 1, found {chunk_size}")
    dim = as_int("blockwise_feedforward: dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise ShapeError(
            f"blockwise_feedforward: expected dim in [{-x.dim()}, {x.dim()}) for x of shape "
            f"{tuple(x.shape)}, found {dim}"
        )
    if checkpoint not in (None, True, False):
        raise DTypeError(
            f"blockwise_feedforward: expected checkpoint None or a bool, found {checkpoint!r}"
        )
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and x.requires_grad
    outs = []
    # At most the whole length: torch.split takes a C long.
    for part in torch.split(x, min(chunk_size, max(x.shape[dim], 1)), dim=dim):
        if checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(ffn, part, use_reentrant=False))
        else:
            outs.append(ffn(part))
    return torch.cat(outs, dim=dim)
