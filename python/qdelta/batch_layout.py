"""Which modules of a model see the batch flattened into its rows.

Some models reshape ``[batch, seq, hidden]`` to ``[batch * seq, hidden]`` before
a layer (OPT runs each decoder layer's final_layer_norm and MLP that way). A
per-row tenant module there can route the rows only if it knows the order of
the flattening, and that is found here by running the model, not assumed: the
model's forward runs on a two-sequence probe batch and on each sequence alone,
and a module counts as *batch-first flat* when its batched input is 2-D with
``batch * seq`` rows whose first ``seq`` rows are the first sequence's input and
the next ``seq`` the second's. A module whose input is neither ``[batch, seq, ...]``
nor that flattening (the tokens a mixture-of-experts router sent to one expert)
is recorded too: its rows are not the batch's, whatever their count.

Modules asked about as ``rerun`` candidates (embeddings whose forward is not a
lookup of its argument, such as OPT's learned positions) are recorded as
*row-separable* when, called again on each probe sequence's rows of its
batch-first arguments, they return that sequence's rows of their batched output:
then a tenant's table can be applied to its rows by re-running the module.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

#: Probe batch: two sequences of this many tokens.
_PROBE_BATCH, _PROBE_SEQ = 2, 3


@dataclass(frozen=True)
class Layouts:
    """What the probe saw: ``flat`` modules get the batch flattened batch first
    (confirmed against each sequence alone); ``other`` modules get rows that are
    neither the batch nor its flattening (a mixture-of-experts expert's gathered
    tokens, say): no per-row tenant can be routed there."""

    flat: frozenset[str] = frozenset()
    other: frozenset[str] = frozenset()
    rerun: frozenset[str] = frozenset()  # row-separable, weight-reading rerun candidates


def probe_layouts(
    model: nn.Module, modules: dict[str, nn.Module], vocab: int, rerun: Iterable[str] = ()
) -> Layouts:
    """The input layout of each of ``modules`` (submodules of ``model``), from one
    forward of a probe batch (two more when some module sees ``[batch * seq]``
    rows). The model runs without a cache and without gradients, called as
    MultiTenantModel calls it (position ids given). A model whose forward fails on
    the probe yields empty layouts: every module then keeps the
    batch-first-or-refused rule. Modules the probe did not reach are in neither set."""
    if vocab < 1 or not modules:
        return Layouts()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_PROBE_BATCH, _PROBE_SEQ), generator=gen)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return Layouts()
    ids = ids.to(device)
    calls: dict[str, tuple] = {}
    rerun = {n for n in rerun if n in modules}
    batched = _inputs(model, modules.items(), ids, calls, rerun)
    flat = {n for n, x in batched.items() if x.dim() == 2 and x.shape[0] == ids.numel()}
    # Batch first: [batch, ...] of 3 or more dimensions (hidden states, Gemma 3's
    # per-head norms on [batch, heads, seq, dim]) or the ids themselves. A 2-D
    # [batch, hidden] could as well be two gathered tokens: not counted.
    batch = {
        n
        for n, x in batched.items()
        if x.dim() > 0
        and x.shape[0] == ids.shape[0]
        and (x.dim() >= 3 or tuple(x.shape) == tuple(ids.shape))
    }
    confirmed: set[str] = set()
    if flat:
        alone = [_inputs(model, ((n, modules[n]) for n in flat), ids[i : i + 1]) for i in range(2)]
        confirmed = {n for n in flat if _stacked_rows(batched[n], [a.get(n) for a in alone])}
    other = set(batched) - batch - confirmed
    # An expert the probe's tokens never chose saw nothing, but its siblings' gathered
    # rows say what it will see: its first dimension is never the batch.
    gathered = {_index_pattern(n) for n in other}
    other |= {n for n in set(modules) - set(batched) if _index_pattern(n) in gathered}
    separable = {n for n in rerun if n in calls and _row_separable(modules[n], calls[n], 2)}
    return Layouts(flat=frozenset(confirmed), other=frozenset(other), rerun=frozenset(separable))


def _row_separable(module: nn.Module, call: tuple, batch: int) -> bool:
    """Whether ``module(*args, **kwargs)`` (one probe call and its output) gives row i
    of its output from row i of its batch-first arguments alone, and depends on its
    weight (a table change must show).

    The probe's rows are alike (an all-ones mask, the same positions), which would
    hide a module that mixes rows by a mean or a max: the check runs again with the
    last row changed (reversed, and left-padded where it is a mask of ids)."""
    args, kwargs, out = call
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch:
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return False
    try:
        with torch.no_grad():
            varied = (
                tuple(_vary(a, batch) for a in args),
                {k: _vary(v, batch) for k, v in kwargs.items()},
            )
            for a, kw in ((args, kwargs), varied):
                whole = module(*a, **kw)
                for i in range(batch):
                    alone = module(
                        *(_row(x, i, batch) for x in a),
                        **{k: _row(v, i, batch) for k, v in kw.items()},
                    )
                    if not isinstance(alone, torch.Tensor) or not torch.equal(
                        alone, whole[i : i + 1]
                    ):
                        return False
            moved = torch.func.functional_call(module, {"weight": weight + 1}, args, kwargs)
    except Exception:
        return False
    return isinstance(moved, torch.Tensor) and not torch.equal(moved, out)


def _batch_first(a, batch: int) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch


def _row(a, i: int, batch: int):
    return a[i : i + 1] if _batch_first(a, batch) else a


def _vary(a, batch: int):
    """``a`` with its last row changed: reversed along the last dimension, its first
    entry 0 for integers (a mask then reads as left padding)."""
    if not _batch_first(a, batch) or a.dim() < 2:
        return a
    a = a.clone()
    a[-1] = a[-1].flip(-1)
    if not a.is_floating_point():
        a[-1][..., 0] = 0
    else:
        a[-1] = a[-1] * 0.5
    return a


def _inputs(
    model: nn.Module,
    modules: Iterable[tuple[str, nn.Module]],
    ids: torch.Tensor,
    calls: dict[str, tuple] | None = None,
    call_names: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Each module's first tensor input in one forward of ``ids`` (the first call);
    the modules of ``call_names`` also leave their first call in ``calls`` as
    ``(args, kwargs, output)``."""
    modules = list(modules)
    call_names = set(call_names)
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        return hook

    def call_hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if name not in calls:
                calls[name] = (args, kwargs, output)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    if calls is not None:
        handles += [
            m.register_forward_hook(call_hook_for(n), with_kwargs=True)
            for n, m in modules
            if n in call_names
        ]
    try:
        with torch.no_grad():
            model(input_ids=ids, **_probe_kwargs(model, ids))
    except Exception:
        return {}
    finally:
        for h in handles:
            h.remove()
    return seen


def _probe_kwargs(model: nn.Module, ids: torch.Tensor) -> dict[str, object]:
    """No cache, an all-ones mask and per-sequence position ids, passed only where
    the forward takes them (a model whose forward has no ``use_cache`` is probed
    all the same, not refused)."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    wanted = {
        "attention_mask": torch.ones_like(ids),
        "position_ids": positions,  # as MultiTenantModel passes them: one row per sequence
        "use_cache": False,
    }
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: pass both
        return wanted
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


def _stacked_rows(batched: torch.Tensor, alone: list[torch.Tensor | None]) -> bool:
    """Whether ``batched`` is the sequences' inputs one after the other (to the
    rounding a different batch size brings), and not in another order."""
    if any(a is None or a.shape != (_PROBE_SEQ, batched.shape[1]) for a in alone):
        return False
    want = torch.cat(alone).double()
    got = batched.double()
    scale = want.abs().max().clamp(min=1e-30)
    # A different batch size may round differently (more so in half precision on a
    # GPU): a few roundings of the input's dtype, at least 1e-3 of the largest value.
    eps = torch.finfo(batched.dtype).eps if batched.is_floating_point() else 0.0
    tol = max(1e-3, 4 * eps)
    close = (got - want).abs().max() <= tol * scale
    # The sequences' inputs differ by far more, so a wrong order cannot pass.
    distinct = (alone[0].double() - alone[1].double()).abs().max() > 4 * tol * scale
    return bool(close and distinct)


def _index_pattern(name: str) -> str:
    """``name`` with its module-list indices blanked (``experts.3.w1`` -> ``experts.#.w1``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "#", name)
