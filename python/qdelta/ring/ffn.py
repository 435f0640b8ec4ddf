"""Blockwise feed-forward: apply a position-wise module chunk by chunk along the
sequence so only one chunk's hidden activations (often 4x the model width) are
alive at a time (Ring Attention's blockwise FFN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint

from qdelta.ring.errors import RingError


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
    if chunk_size < 1:
        raise RingError(f"blockwise_feedforward: expected chunk_size >= 1, found {chunk_size}")
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and x.requires_grad
    outs = []
    for part in torch.split(x, chunk_size, dim=dim):
        if checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(ffn, part, use_reentrant=False))
        else:
            outs.append(ffn(part))
    return torch.cat(outs, dim=dim)
