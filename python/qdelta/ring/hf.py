"""Run a Hugging Face Llama-style model's attention as ring attention.

``use_ring_attention(model, group=..., layout=...)`` registers a ``qdelta_ring``
attention function with transformers' AttentionInterface and switches the
model to it; each rank then runs the model on its shard of the tokens with
the shard's global position ids (so RoPE sees true positions), and attention
spans the whole sequence through the ring. ``ring_forward`` does the sharding.
No causal mask tensor is built: causality (and the layout's positions) are
handled inside ring_attention. Prefill/training only: a KV cache is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from qdelta.ring.attention import ring_attention
from qdelta.ring.errors import RingError
from qdelta.ring.layout import Layout, position_ids, shard

ATTENTION_NAME = "qdelta_ring"


@dataclass(frozen=True)
class RingSettings:
    group: dist.ProcessGroup | None
    layout: str
    backend: str
    timeout: float | None


def ring_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention-interface function: [B, H, S_local, D] in, [B, S_local, H, D] out."""
    settings: RingSettings | None = getattr(module, "_qdelta_ring", None)
    if settings is None:
        raise RingError(
            f"{type(module).__name__}: expected settings from qdelta.ring.hf.use_ring_attention, found none"
        )
    if query.shape[2] != key.shape[2]:
        raise RingError(
            "ring attention runs prefill/training only: expected as many keys as queries on each "
            f"rank, found {query.shape[2]} queries and {key.shape[2]} keys (disable the KV cache)"
        )
    if dropout and module.training:
        raise RingError(f"ring attention: expected attention dropout 0, found {dropout}")
    out = ring_attention(
        query,
        key,
        value,
        causal=getattr(module, "is_causal", True),
        group=settings.group,
        layout=settings.layout,
        softmax_scale=scaling,
        backend=settings.backend,
        timeout=settings.timeout,
    )
    return out.transpose(1, 2).contiguous(), None


def use_ring_attention(
    model: torch.nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
    backend: str = "auto",
    timeout: float | None = None,
) -> torch.nn.Module:
    """Switch ``model`` (in place) to ring attention over ``group``; returns it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    settings = RingSettings(group, layout, backend, timeout)
    found = 0
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "is_causal"):
            module._qdelta_ring = settings
            found += 1
    if not found:
        raise RingError(
            f"use_ring_attention: expected Llama-style attention modules in {type(model).__name__}, found none"
        )
    configs = [
        model.config,
        *(getattr(model.config, k) for k in getattr(model.config, "sub_configs", {})),
    ]
    for cfg in configs:
        if cfg is not None:
            cfg._attn_implementation = ATTENTION_NAME
    return model


def ring_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
) -> torch.Tensor:
    """This rank's logits for its shard of the full ``input_ids`` ``[B, S]``.

    The model must already use ring attention over ``group`` with ``layout``.
    Reassemble the full logits with ``qdelta.ring.unshard(shards, layout=layout)``.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    local_ids = shard(input_ids, world_size, rank, layout=layout, dim=-1)
    pos = position_ids(input_ids.shape[-1], world_size, rank, layout).to(input_ids.device)
    pos = pos[None].expand(input_ids.shape[0], -1)
    return model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
