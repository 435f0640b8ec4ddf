"""Which modules of a model see the batch flattened into its rows.

Some models reshape ``[batch, seq, hidden]`` to ``[batch * seq, hidden]`` before
a layer (OPT runs each decoder layer's final_layer_norm and MLP that way). A
per-row tenant module there can route the rows only if it knows the order of
the flattening, and that is found here by running the model, not assumed: the
model's forward runs on a two-sequence probe batch and on each sequence alone,
and a module counts as *batch-first flat* when its batched input is 2-D with
``batch * seq`` rows whose first ``seq`` rows are the first sequence's input and
the next ``seq`` the second's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import nn

#: Probe batch: two sequences of this many tokens.
_PROBE_BATCH, _PROBE_SEQ = 2, 3


def batch_first_flat(model: nn.Module, modules: dict[str, nn.Module], vocab: int) -> set[str]:
    """Names of ``modules`` (submodules of ``model``) whose input is the batch
    flattened batch first. The model runs without a cache and without gradients;
    a model whose forward fails on the probe yields the empty set (every module
    then keeps the batch-first-or-refused rule)."""
    if vocab < 1 or not modules:
        return set()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_PROBE_BATCH, _PROBE_SEQ), generator=gen)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return set()
    ids = ids.to(device)
    batched = _inputs(model, modules.items(), ids)
    flat = {n for n, x in batched.items() if x.dim() == 2 and x.shape[0] == ids.numel()}
    if not flat:
        return set()
    alone = [_inputs(model, ((n, modules[n]) for n in flat), ids[i : i + 1]) for i in range(2)]
    return {n for n in flat if _stacked_rows(batched[n], [a.get(n) for a in alone])}


def _inputs(
    model: nn.Module, modules: Iterable[tuple[str, nn.Module]], ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each module's first tensor input in one forward of ``ids`` (the first call)."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
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
    """No cache and an all-ones mask, passed only where the forward takes them (a
    model whose forward has no ``use_cache`` is probed all the same, not refused)."""
    wanted = {"attention_mask": torch.ones_like(ids), "use_cache": False}
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
    close = (got - want).abs().max() <= 1e-3 * scale
    # The sequences' inputs differ, so a wrong order cannot pass as the right one.
    distinct = (alone[0].double() - alone[1].double()).abs().max() > 1e-2 * scale
    return bool(close and distinct)
