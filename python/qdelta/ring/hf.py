"""Run a Hugging Face model's attention as ring attention.

``use_ring_attention(model, group=..., layout=...)`` registers a ``qdelta_ring``
attention function with transformers' AttentionInterface and switches the
model to it; each rank then runs the model on its shard of the tokens with
the shard's global position ids (so RoPE sees true positions), and attention
spans the whole sequence through the ring. ``ring_forward`` does the sharding,
with the group and layout recorded by ``use_ring_attention``.
No causal mask tensor is built: causality (and the layout's positions) are
handled inside ring_attention, and so are the sliding windows (Mistral, Qwen2's
and Gemma's sliding layers: the window each layer's attention asks for) and
Gemma2's logit soft-capping. Padding masks are refused (the ring attends over
the whole sequence). Prefill/training only: a KV cache is refused.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qdelta.errors import DTypeError, ShapeError
from qdelta.optional import require
from qdelta.ring.attention import ring_attention
from qdelta.ring.block import BACKENDS
from qdelta.ring.comm import check_timeout
from qdelta.ring.errors import RingError
from qdelta.ring.layout import LAYOUTS, Layout, local_length, position_ids, shard

ATTENTION_NAME = "qdelta_ring"

# Packed sequences: ring_forward passes this rank's segment ids shard through the
# model's forward kwargs under SEGMENTS_KWARG, which transformers hands on to every
# attention call, so a recompute (gradient checkpointing) gets them too. The
# context variable holds them while ring_forward runs, so an attention call that
# did not receive them (a model that drops unknown kwargs) is an error, not
# attention across the packed sequences.
SEGMENTS_KWARG = "qdelta_segment_ids"
_SEGMENTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "qdelta_ring_segments", default=None
)

# The attention modules that ran through the ring during ring_forward's model call:
# a module whose class computes attention its own way (not through transformers'
# attention interface) would attend within its rank's shard only, so ring_forward
# checks every switched module was called.
_CALLED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "qdelta_ring_called", default=None
)

PADDING_HINT = (
    "padding masks are not supported by ring attention: expected attention_mask None or all "
    "ones; drop the padding (pack the sequences into one row and pass ring_forward "
    "segment_ids to keep packed sequences apart)"
)


@dataclass(frozen=True)
class RingSettings:
    group: dist.ProcessGroup | None
    layout: str
    backend: str
    timeout: float | None


def _check_mask(mask: torch.Tensor | None, q_len: int, causal: bool) -> bool:
    """Whether the call is causal: ``causal``, or True for a mask that is exactly
    the plain causal one. Refuses a mask that hides any other key."""
    if mask is None:
        return causal
    visible = mask if mask.dtype == torch.bool else mask == 0  # additive masks: 0 = visible
    if bool(visible.all()):
        return causal
    # Older transformers build the plain causal mask for custom attention functions
    # (transformers 4.x's CLIP text encoder with is_causal=False beside it).
    if tuple(visible.shape[-2:]) == (q_len, q_len):
        tril = torch.ones(q_len, q_len, dtype=torch.bool, device=mask.device).tril()
        if bool((visible == tril).all()):
            return True
    raise RingError(f"{PADDING_HINT}; found a {list(mask.shape)} mask that hides some keys")


def ring_mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers mask-interface function: no mask tensor, but refuse padding.

    Without it, transformers drops a 2-D padding mask for an attention function it
    does not know, and the padded keys would be attended silently.
    """
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        padded = int((~attention_mask.bool()).sum())
        raise RingError(f"{PADDING_HINT}; found {padded} padded positions")
    return None


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
    window, softcap = _window_and_softcap(module, kwargs)
    called = _CALLED.get()
    if called is not None:
        called.add(id(module))
    # A per-call is_causal wins over the module's, as in transformers' own
    # attention functions (CLIP's text encoder sets it per call).
    causal = kwargs.pop("is_causal", None)
    if causal is None:
        causal = getattr(module, "is_causal", True)
    causal = _check_mask(attention_mask, query.shape[2], bool(causal))
    if window is not None and not causal:
        raise RingError(
            f"{type(module).__name__}: ring attention runs sliding windows causally only; "
            f"found sliding_window={window} on a non-causal attention"
        )
    out = ring_attention(
        query,
        key,
        value,
        causal=causal,
        segment_ids=_segments_of_call(module, kwargs),
        group=settings.group,
        layout=settings.layout,
        softmax_scale=scaling,
        backend=settings.backend,
        timeout=settings.timeout,
        window=window,
        softcap=softcap,
    )
    return out.transpose(1, 2).contiguous(), None


def _segments_of_call(module, kwargs: dict) -> torch.Tensor | None:
    """The packed-sequence segment ids of this attention call (see SEGMENTS_KWARG)."""
    given = kwargs.get(SEGMENTS_KWARG)
    if given is None and _SEGMENTS.get() is not None:
        raise RingError(
            f"{type(module).__name__}: ring_forward was given segment_ids, but this attention "
            f"call did not receive them (expected the model to pass its forward's "
            f"{SEGMENTS_KWARG!r} keyword on to attention, as transformers' models do); "
            "refusing to attend across the packed sequences"
        )
    return given


def _window_and_softcap(module, kwargs: dict) -> tuple[int | None, float | None]:
    """The sliding window (``kv_idx > q_idx - window``) and logit soft-cap this layer's
    attention asks for; refuse what the ring does not do (attention sinks), since
    ignoring it would give other logits."""
    name = type(module).__name__
    if kwargs.get("s_aux") is not None:
        raise RingError(f"{name}: ring attention has no attention sinks (s_aux); found some")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise RingError(f"{name}: expected sliding_window as an int or None, found {window!r}")
    if window is not None and window < 1:
        raise RingError(f"{name}: expected sliding_window >= 1 or None, found {window}")
    return window, softcap


def _unsupported_attention(config) -> str | None:
    """Why ring attention would not compute this config's attention (None: it does).

    Refused: ALiBi, and layer types other than full or sliding attention (chunked
    attention, linear attention...). Sliding windows and logit soft-capping arrive
    with each layer's attention call and are computed by the ring."""
    # Falcon (alibi=True) adds its ALiBi bias to the attention mask, which the ring
    # does not build: the model would crash, or attend without the bias.
    if (
        getattr(config, "alibi", False)
        or getattr(config, "position_embedding_type", None) == "alibi"
    ):
        return (
            "ALiBi position bias: it lives in the attention mask, which ring attention does "
            "not use; expected a model with rotary or learned positions (alibi off)"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if other:
            return (
                f"layer_types {other}: ring attention runs full and sliding-window causal "
                "attention only"
            )
    return None


def _check_settings(group, layout, backend, timeout) -> None:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise RingError(
            f"use_ring_attention group: expected None or a torch.distributed ProcessGroup, "
            f"found {type(group).__name__}"
        )
    if layout not in LAYOUTS:
        raise RingError(f"use_ring_attention layout: expected one of {LAYOUTS}, found {layout!r}")
    if backend not in BACKENDS:
        raise RingError(
            f"use_ring_attention backend: expected one of {BACKENDS}, found {backend!r}"
        )
    check_timeout(timeout, "use_ring_attention timeout")


def use_ring_attention(
    model: torch.nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
    backend: str = "auto",
    timeout: float | None = None,
) -> torch.nn.Module:
    """Switch ``model`` (in place) to ring attention over ``group``; returns it.

    Every argument is checked before the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise DTypeError(
            f"use_ring_attention: expected a torch.nn.Module, found {type(model).__name__}"
        )
    _check_settings(group, layout, backend, timeout)
    AttentionInterface = require("transformers", "use_ring_attention").AttentionInterface

    modules = _attention_modules(model)
    if not modules:
        raise RingError(
            f"use_ring_attention: expected attention modules (with is_causal and a config, "
            f"as transformers' attention classes have) in {type(model).__name__}, found none"
        )
    own = sorted({c.__name__ for c in {type(m) for m in modules} if not _calls_the_interface(c)})
    if own:
        raise RingError(
            f"use_ring_attention: {type(model).__name__}'s {own} compute attention their own "
            "way, not through transformers' attention interface, so the ring cannot run it; "
            "expected attention classes that call the interface (Llama, Mistral, Qwen2, Gemma, "
            "GPT-2, GPT-NeoX, OPT...)"
        )
    config = getattr(model, "config", None)
    if config is None:
        raise RingError(
            f"use_ring_attention: expected a transformers model with a config, "
            f"found {type(model).__name__} without one"
        )
    configs = [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))]
    for cfg in configs:
        reason = None if cfg is None else _unsupported_attention(cfg)
        if reason is not None:
            raise RingError(f"use_ring_attention: {type(model).__name__}: {reason}")
    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers pass their masks to the attention function
        pass
    else:
        AttentionMaskInterface.register(ATTENTION_NAME, ring_mask)
    settings = RingSettings(group, layout, backend, timeout)
    for module in modules:
        module._qdelta_ring = settings
    for cfg in configs:
        if cfg is not None:
            cfg._attn_implementation = ATTENTION_NAME
    return model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """transformers' attention modules: they carry ``is_causal`` and their config
    (Llama, GPT-2, GPT-NeoX, OPT... alike). Whether each really calls the attention
    interface is checked when ring_forward runs the model."""
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


def _calls_the_interface(cls: type) -> bool:
    """Whether ``cls.forward`` dispatches through ``ALL_ATTENTION_FUNCTIONS`` (read from
    its source; without source it is trusted, and ring_forward checks the calls)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


def _check_all_called(model: nn.Module, called: set[int]) -> None:
    missed = sorted(
        {type(m).__name__ for m in model.modules() if getattr(m, "_qdelta_ring", None)
         and id(m) not in called}
    )  # fmt: skip
    if missed:
        raise RingError(
            f"ring_forward: {missed} computed attention without transformers' attention "
            "interface, so it attended within each rank's shard only; expected a model whose "
            "attention classes call the interface (Llama, Mistral, Qwen2, Gemma, GPT-2, "
            "GPT-NeoX, OPT...)"
        )


def _recorded_settings(model: nn.Module) -> RingSettings:
    """The settings use_ring_attention left on ``model``'s attention modules."""
    found = {id(s): s for m in model.modules() if (s := getattr(m, "_qdelta_ring", None))}
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not found or implementation != ATTENTION_NAME:
        # Plain attention here would attend within each rank's shard only: wrong logits.
        raise RingError(
            f"ring_forward: expected a model switched to ring attention, found "
            f"{type(model).__name__} using attention {implementation!r}: call "
            "qdelta.ring.hf.use_ring_attention(model, group=..., layout=...) first"
        )
    if len(found) > 1:
        raise RingError(
            f"ring_forward: expected one ring setting for the whole model, found {len(found)} "
            "(use_ring_attention was applied to parts of it): call use_ring_attention on the model"
        )
    return next(iter(found.values()))


def _same_group(a, b) -> bool:
    world = (None, dist.group.WORLD)  # None means the default group
    return a is b or (a in world and b in world)


def ring_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: Layout | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's logits for its shard of the full ``input_ids`` ``[B, S]``.

    The model must already use ring attention (:func:`use_ring_attention`);
    ``group`` and ``layout`` default to the ones given there, and others are
    refused (the tokens must be sharded the way the attention expects).
    Reassemble the full logits with ``qdelta.ring.unshard(shards, layout=layout)``.

    ``segment_ids`` ``[B, S]`` (or ``[S]``) packs several sequences into each row
    (Large World Model's masked packing): each segment is a run of equal ids,
    attends only to itself, and its positions start at 0, so every packed
    sequence gets the logits it would get alone.
    """
    if not isinstance(model, nn.Module):
        raise DTypeError(f"ring_forward: expected a torch.nn.Module, found {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise DTypeError(
            f"ring_forward input_ids: expected an integer tensor [batch, seq], "
            f"found {type(input_ids).__name__}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise DTypeError(
            f"ring_forward input_ids: expected integer token ids, found {input_ids.dtype}"
        )
    if input_ids.dim() != 2:
        raise ShapeError(
            f"ring_forward input_ids: expected [batch, seq], found shape {list(input_ids.shape)}"
        )
    settings = _recorded_settings(model)
    if layout is None:
        layout = settings.layout
    elif layout != settings.layout:
        raise RingError(
            f"ring_forward layout: expected {settings.layout!r} as given to use_ring_attention "
            f"(or None), found {layout!r}"
        )
    if group is None:
        group = settings.group
    elif not _same_group(group, settings.group):
        raise RingError(
            "ring_forward group: expected the process group given to use_ring_attention (or None), "
            "found another one"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RingError(
            "ring_forward: expected an initialized torch.distributed process group "
            "(dist.init_process_group, or qdelta.ring.launch.spawn_ring)"
        )
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    _check_every_rank_has_tokens(input_ids.shape[-1], world_size, layout)
    local_ids = shard(input_ids, world_size, rank, layout=layout, dim=-1)
    if segment_ids is None:
        pos = position_ids(input_ids.shape[-1], world_size, rank, layout).to(input_ids.device)
        pos = pos[None].expand(input_ids.shape[0], -1)
        local_seg = None
    else:
        seg = _check_segments(segment_ids, input_ids)
        pos = shard(segment_positions(seg), world_size, rank, layout=layout, dim=-1)
        local_seg = shard(seg, world_size, rank, layout=layout, dim=-1)
    extra = {} if local_seg is None else {SEGMENTS_KWARG: local_seg}
    token, called = _SEGMENTS.set(local_seg), set()
    called_token = _CALLED.set(called)
    try:
        logits = model(input_ids=local_ids, position_ids=pos, use_cache=False, **extra).logits
    finally:
        _SEGMENTS.reset(token)
        _CALLED.reset(called_token)
    _check_all_called(model, called)
    return logits


def _check_every_rank_has_tokens(seq_len: int, world_size: int, layout: Layout) -> None:
    """A rank without tokens would fail inside the model (and leave its peers
    waiting): every rank sees the same length, so every rank raises this."""
    empty = [r for r in range(world_size) if local_length(seq_len, world_size, r, layout) == 0]
    if empty:
        need = next(
            n
            for n in itertools.count(world_size)
            if all(local_length(n, world_size, r, layout) for r in range(world_size))
        )
        raise ShapeError(
            f"ring_forward input_ids: expected at least {need} tokens for {world_size} ranks in "
            f"the {layout} layout (a token per rank), found {seq_len}, which leaves rank(s) "
            f"{empty} none"
        )


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each run of equal segment ids begins
    (``[B, S]`` int64): a packed sequence's own positions."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


def _check_segments(segment_ids, input_ids: torch.Tensor) -> torch.Tensor:
    """``segment_ids`` as ``[B, S]`` integers on the ids' device, each id one run."""
    if not isinstance(segment_ids, torch.Tensor):
        raise DTypeError(
            f"ring_forward segment_ids: expected an integer tensor [batch, seq] or [seq], "
            f"found {type(segment_ids).__name__}"
        )
    if (
        segment_ids.is_floating_point()
        or segment_ids.is_complex()
        or segment_ids.dtype == torch.bool
    ):
        raise DTypeError(
            f"ring_forward segment_ids: expected integer ids, found {segment_ids.dtype}"
        )
    b, s = input_ids.shape
    if segment_ids.dim() == 1:
        segment_ids = segment_ids[None].expand(b, -1)
    if tuple(segment_ids.shape) != (b, s):
        raise ShapeError(
            f"ring_forward segment_ids: expected shape [{b}, {s}] or [{s}] (input_ids' "
            f"{[b, s]}), found {list(segment_ids.shape)}"
        )
    segment_ids = segment_ids.to(input_ids.device)
    # A segment id that comes back after another one would join two sequences.
    runs = torch.ones_like(segment_ids, dtype=torch.int64)
    runs[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    for row in range(b):
        ids = segment_ids[row][runs[row].bool()]
        if ids.unique().numel() != ids.numel():
            raise ShapeError(
                f"ring_forward segment_ids: expected each segment as one run of equal ids, "
                f"found row {row} returning to an id it left ({ids.tolist()[:12]})"
            )
    return segment_ids
