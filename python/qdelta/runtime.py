"""Multi-tenant serving: one base causal LM, many tenants' deltas, one mixed batch.

``MultiTenantModel`` wraps a Hugging Face causal LM in place. Linear layers
that a tenant's delta covers become ``RoutedLinear`` (MultiTenantLinear: the
base matmul shared, each row adding its tenant's packed delta); modules whose
full-precision parameters a tenant replaces (embeddings, norms, head) become
per-row gathering modules. Every request row names its tenant; the model
turns names into slots, loads missing tenants (lazily, under a byte budget
with LRU eviction) and routes the slots to every swapped module for the
forward in flight.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qdelta.batch_layout import Layouts, probe_layouts
from qdelta.checks import as_int, check_tensor_like
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import (
    BaseMismatchError,
    BudgetError,
    DTypeError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnknownTenantError,
)
from qdelta.locking import SerializedCalls, holding, serialized
from qdelta.nn import tensor_aliases
from qdelta.sources import conv1d_form, embedding_form, is_conv1d, linear_form, max_positions
from qdelta.store import check_base, fingerprint
from qdelta.tenant_modules import (
    PackedRowEmbedding,
    Route,
    RoutedLinear,
    RowEmbedding,
    RowLayerNorm,
    RowLinear,
    RowRerunEmbedding,
    RowRMSNorm,
    layer_norm_form,
    norm_probe_finding,
    rms_norm_form,
)

TenantIds = torch.Tensor | Sequence[str | int | None]
# Module name -> (the tenant module class serving it, the tenants it serves).
_Planned = dict[str, tuple[type[nn.Module], list[str]]]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class Generation:
    """What ``MultiTenantModel.generate`` returns."""

    sequences: torch.Tensor  # [B, L + n]: prompts followed by the new tokens
    tokens: torch.Tensor  # [B, n]: the new tokens
    logits: torch.Tensor | None  # [B, n, vocab] float32 per step, when asked for


def _store_delta(store: Any, name: str) -> Delta:
    """A tenant's Delta from the memory-mapped store (planes stay mapped)."""
    return store.open(name).to_delta()


def _given(delta: Delta) -> Delta:
    """The source of a tenant added as a Delta (a partial of it pickles; a lambda not)."""
    return delta


def _servable(module: nn.Module) -> bool:
    """Whether a per-row module can stand in for ``module`` exactly: a plain linear
    map (nn.Linear, GPT-2's Conv1D) or embedding lookup (subclasses checked on a
    probe, Gemma's scaled lookup included), an RMSNorm of either formula
    (x / rms(x) * w or * (1 + w)) or a LayerNorm, checked on a probe input rather
    than by class name."""
    if isinstance(module, nn.Embedding):
        return embedding_form(module) is not None
    if isinstance(module, nn.Linear):
        return linear_form(module)
    if is_conv1d(module):
        return conv1d_form(module)
    return rms_norm_form(module) is not None or layer_norm_form(module) is not None


class MultiTenantModel(SerializedCalls, nn.Module):
    """One base causal LM serving many tenants' deltas in one mixed batch.

    ``store``: a ``qdelta.DeltaStore``; its tenants are registered and load
    lazily on first use. ``tenants``: names to load now, or a mapping
    name -> ``Delta`` to add. ``budget_bytes``: the most bytes of loaded tenant
    tensors kept resident (None: no limit; an int >= 0, also when set later);
    the least recently used tenant not in the current batch is evicted to make
    room.

    Row tenants (``tenant_ids``) are names, integer ids (``tenant_id(name)``)
    or None / ``-1`` for the base model alone.
    """

    def __init__(
        self,
        base_model: nn.Module,
        store: Any = None,
        tenants: Iterable[str] | Mapping[str, Delta] = (),
        *,
        budget_bytes: int | None = None,
    ) -> None:
        budget_bytes = _budget(budget_bytes)
        super().__init__()
        self._init_lock()  # calls from several threads take turns (qdelta.locking)
        self.model = base_model.eval()
        self.store = store
        self._budget_bytes = budget_bytes
        self._route = Route()
        # The base as built, captured before any swap (references, no copies).
        self._base_modules = dict(base_model.named_modules())
        self._base_params = dict(base_model.named_parameters(remove_duplicate=False))
        self._base_state = dict(base_model.state_dict())
        self._ties = tensor_aliases(base_model)  # name -> every name of its tensor
        # Read before any swap: a wrapped position table no longer looks like one.
        self._position_limit = max_positions(base_model)
        self._probe_results: dict[str, bool] = {}  # module name -> _servable(), probed once
        self._wrapper_classes: dict[tuple[str, bool], type[nn.Module]] = {}
        self._layout: Layouts | None = None  # how modules see the batch (probed once)
        self._fingerprint: str | None = None
        self._sources: dict[str, Callable[[], Delta]] = {}
        self._ids: dict[str, int] = {}
        self._next_id = 0
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._footprints: dict[str, _Footprint] = {}  # loaded name -> its share of the stacks
        self._tally = _StackTally()  # the loaded footprints' bytes together
        self._slot_of: dict[str, int] = {}
        self._capacity = 0  # slots the modules' maps cover: one more than the highest used
        self._wrapped: dict[str, nn.Module] = {}
        if store is not None:
            for name in store.tenants():
                self._register(name, functools.partial(_store_delta, self.store, name))
        if isinstance(tenants, Mapping):
            for name, delta in tenants.items():
                self.add_tenant(name, delta)
            names = list(tenants)
        else:
            names = list(tenants)
        if names:
            self.preload(names)

    # ---- tenant registry ----------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        """The most bytes of loaded tenant tensors kept resident (None: no limit)."""
        return self._budget_bytes

    @budget_bytes.setter
    @serialized
    def budget_bytes(self, value: int | None) -> None:
        self._budget_bytes = _budget(value)
        # A lowered budget holds at once: least recently used tenants leave until
        # the rest fit (no batch is running: calls are serialized).
        while self._budget_bytes is not None and self.resident_bytes > self._budget_bytes:
            self._evict(next(iter(self._loaded)))

    @property
    def tenants(self) -> list[str]:
        """Registered tenant names (loaded or not)."""
        # Snapshots without the lock (list() of a dict is one step under the GIL), so
        # a metrics thread never waits for a generate call of another thread.
        return list(self._ids)

    @property
    def loaded_tenants(self) -> list[str]:
        """Loaded tenants, least recently used first."""
        return list(self._loaded)

    @property
    def resident_bytes(self) -> int:
        """Bytes of loaded tenant tensors as the stacks hold them (what the budget
        counts): a layer's stack pads every tenant to its deepest tenant's planes."""
        # An int kept by the loads (no iteration over the live dicts, which another
        # thread's load may be changing).
        return self._tally.bytes

    @serialized
    def memory(self) -> dict[str, int]:
        """Resident bytes measured from the tensors: the base model's parameters
        and buffers, the tenant tensors the swapped modules hold, and the bytes
        allocated for the tenants (``tenant_reserved_bytes``: with the spare rows a
        growing tenant stack keeps, ``qdelta.stacks.HEADROOM``, and the tables the
        modules derive from their tenants: bias changes, stacked LayerNorm rows)."""
        seen: set[int] = set()
        base = 0
        for t in [*self._base_params.values(), *self._base_state.values()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                base += t.numel() * t.element_size()
        tenants = sum(w.tenant_nbytes() for w in self._wrapped.values())
        buffers: dict[tuple[str, int], int] = {}
        for wrapper in self._wrapped.values():
            for t in [*wrapper.tenant_tensors(), *wrapper.derived_tensors()]:
                storage = t.untyped_storage()
                buffers[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return {
            "base_bytes": base,
            "tenant_bytes": tenants,
            "tenant_reserved_bytes": sum(buffers.values()),
            "tenants_loaded": len(self._loaded),
        }

    def tenant_id(self, name: str) -> int:
        found = self._ids.get(name) if isinstance(name, str) else None
        if found is None:
            raise UnknownTenantError(f"tenant {name!r} is not registered; known: {self.tenants}")
        return found

    def base_fingerprint(self) -> str:
        """The fingerprint of the base weights as built (before any swap)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._base_state)
        return self._fingerprint

    @serialized
    def add_tenant(self, name: str, delta: Delta | None = None) -> int:
        """Register a tenant while serving; returns its integer id.

        ``delta=None``: the tenant comes from the store (loaded on first use).
        A given delta is checked against the base now (BaseMismatchError,
        ShapeError) and loaded on first use. Re-adding a name replaces it.
        """
        if not isinstance(name, str) or not name:
            raise DTypeError(f"tenant name: expected a non-empty str, found {name!r}")
        if delta is None:
            if self.store is not None:
                self.store.path(name)  # a name no store can hold says why (TenantNameError)
            if self.store is None or name not in self.store.tenants():
                raise UnknownTenantError(
                    f"tenant {name!r}: no delta given and no such tenant in the store"
                )
            source: Callable[[], Delta] = functools.partial(_store_delta, self.store, name)
        else:
            if not isinstance(delta, Delta):
                raise DTypeError(f"delta: expected qdelta.Delta, found {type(delta).__name__}")
            self._check(delta, name)
            source = functools.partial(_given, delta)
        if name in self._loaded:
            self._evict(name)
        return self._register(name, source)

    @serialized
    def preload(self, names: Iterable[str]) -> None:
        """Load these tenants now (within the budget) instead of at first use."""
        names = list(names)
        for name in names:
            self.tenant_id(name)
        self._ensure_loaded(names)

    @serialized
    def remove_tenant(self, name: str) -> None:
        """Unload and unregister a tenant while serving; its id is retired."""
        self.tenant_id(name)
        if name in self._loaded:
            self._evict(name)
        del self._sources[name], self._ids[name]

    def _register(self, name: str, source: Callable[[], Delta]) -> int:
        self._sources[name] = source
        if name not in self._ids:
            self._ids[name] = self._next_id
            self._next_id += 1
        return self._ids[name]

    # ---- checking a delta against the base ----------------------------------

    def _check(self, delta: Delta, name: str, planned: _Planned | None = None) -> None:
        """Refuse a delta made against another base, not fitting its shapes, or
        with values the base cannot serve (complex, NaN/Inf, out of its dtype)."""
        try:
            check_base(delta, self.base_fingerprint())
        except BaseMismatchError as e:
            raise BaseMismatchError(f"tenant {name!r}: {e}") from None
        for lname, packed in delta.layers.items():
            module = self._base_modules.get(lname)
            conv = module is not None and is_conv1d(module)
            if not (isinstance(module, (nn.Linear, nn.Embedding)) or conv):
                found = "nothing" if module is None else type(module).__name__
                raise ShapeError(
                    f"tenant {name!r}: packed layer {lname!r} expects an nn.Linear, an "
                    f"nn.Embedding or a Conv1D in the base, found {found}"
                )
            if packed.transposed != conv:
                raise ShapeError(_orientation_mismatch(name, lname, module, packed.transposed))
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                raise QDeltaError(f"tenant {name!r}: {lname!r} uses max_norm, not supported")
            if not self._probed(lname):
                raise QDeltaError(
                    f"tenant {name!r}: packed layer {lname!r} is a {type(module).__name__}, "
                    f"whose forward is not a plain {_plain_what(module)}; a per-row delta "
                    f"for it would be guesswork (keep that layer frozen in the fine-tune)"
                )
            shape = tuple(module.weight.shape)
            if (shape[::-1] if conv else shape) != packed.shape:
                raise ShapeError(
                    f"tenant {name!r}: layer {lname!r} is {list(module.weight.shape)} in the "
                    f"base{' ([in, out])' if conv else ''}, the delta has {list(packed.shape)}"
                    f"{' ([out, in])' if conv else ''}"
                )
            # PackedLayer checks its scales when built; they may be changed since.
            if not np.isfinite(packed.scales).all():
                raise NonFiniteError(
                    f"tenant {name!r}: layer {lname!r}: expected finite scales, found NaN/Inf"
                )
        for pname, value in delta.params.items():
            base = self._base_params.get(pname)
            if base is None:
                raise ShapeError(f"tenant {name!r}: the base has no parameter {pname!r}")
            check_tensor_like(f"tenant {name!r}: parameter {pname!r}", value, base, "base")
            if tuple(value.shape) != tuple(base.shape):
                raise ShapeError(
                    f"tenant {name!r}: parameter {pname!r} is {list(base.shape)} in the base, "
                    f"the delta has {list(value.shape)}"
                )
            _check_fits(value, base.dtype, f"tenant {name!r}: parameter {pname!r}")
        for mname, attrs in self._params_by_module(delta).items():
            module = self._base_modules[mname]
            packed = mname in delta.layers
            if packed and set(attrs) - {"bias"}:
                raise QDeltaError(
                    f"tenant {name!r}: {mname!r} has a packed delta and full-precision "
                    f"{sorted(attrs)}; only a bias may be replaced beside a packed delta"
                )
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                raise QDeltaError(f"tenant {name!r}: {mname!r} uses max_norm, not supported")
            if not packed and not self._probed(mname) and not self._rerunnable(mname):
                raise QDeltaError(
                    f"tenant {name!r}: per-row parameters of {type(module).__name__} "
                    f"({mname!r}) are not supported; expected Embedding, Linear, Conv1D, "
                    f"RMSNorm or LayerNorm (a plain lookup, linear map, x / rms(x) * w or "
                    f"* (1 + w), or (x - mean) / std * w + b, checked on a probe input), "
                    f"found {norm_probe_finding(module)}; keep {sorted(attrs)} frozen in the "
                    "fine-tune or serve it with qdelta.apply"
                )
        # One tenant module class per base module: what the other loaded tenants (and
        # those checked before this one for the same batch) are served by decides. The
        # tenant this delta replaces does not count, nor does a module left empty.
        hint = "remove those tenants first" if planned is None else "split the batch"
        planned = self._serving(excluding=name) if planned is None else planned
        touched = {m: m in delta.layers for m in self._params_by_module(delta)}
        touched.update(dict.fromkeys(delta.layers, True))
        for mname, packed in touched.items():
            wants = self._wrapper_class(mname, packed)
            current, users = planned.setdefault(mname, (wants, []))
            if current is not wants:
                kind = "packed" if packed else "full-precision"
                raise QDeltaError(
                    f"tenant {name!r}: {mname!r} takes a {kind} delta ({wants.__name__}), "
                    f"but tenants {users} are served there by {current.__name__}; mixing "
                    f"packed and full-precision deltas on one layer is not supported "
                    f"({hint}, or compress every tenant alike)"
                )
            users.append(name)

    def _serving(self, excluding: str | None = None, among: list[str] | None = None) -> _Planned:
        """Swapped module name -> (its tenant module class, the loaded tenants it
        serves), for modules serving a tenant other than ``excluding`` (of ``among``
        when given: a batch's tenants, looked up rather than every module's listed)."""
        out: _Planned = {}
        for mname, wrapper in self._wrapped.items():
            if among is None:
                users = [t for t in wrapper.tenants if t != excluding]
            else:
                users = [t for t in among if t != excluding and wrapper.local_index(t) is not None]
            if users:
                out[mname] = (type(wrapper), users)
        return out

    def _layouts(self) -> Layouts:
        """How each base module's input holds the batch, found once by a probe
        forward of the model (:mod:`qdelta.batch_layout`) with no rows routed."""
        if self._layout is None:
            candidates = {
                n: m
                for n, m in self._base_modules.items()
                if n and isinstance(getattr(m, "weight", None), torch.Tensor)
            }
            # Embeddings whose forward is no lookup (OPT's positions): served by
            # re-running them per tenant where the probe finds them row-separable.
            rerun = [
                n
                for n, m in candidates.items()
                if isinstance(m, nn.Embedding) and m.max_norm is None and embedding_form(m) is None
            ]
            routed, self._route.slots = self._route.slots, None
            try:
                self._layout = probe_layouts(
                    self.model, candidates, self._vocab_size(), rerun=rerun
                )
            finally:
                self._route.slots = routed
        return self._layout

    def _wrapper_class(self, mname: str, packed: bool) -> type[nn.Module]:
        """The tenant module class for base module ``mname`` (norms: by their
        probed formula, found once)."""
        key = (mname, packed)
        if key not in self._wrapper_classes:
            module = self._base_modules[mname]
            if not packed and isinstance(module, nn.Embedding) and embedding_form(module) is None:
                self._wrapper_classes[key] = RowRerunEmbedding  # (only once _rerunnable)
            else:
                self._wrapper_classes[key] = _wrapper_class(module, packed)
        return self._wrapper_classes[key]

    def _rerunnable(self, mname: str) -> bool:
        """Whether full-precision tables of base module ``mname`` (an embedding whose
        forward is no lookup) can be served by re-running it per tenant: its probe
        call was row-separable (:mod:`qdelta.batch_layout`)."""
        return mname in self._layouts().rerun

    def _probed(self, mname: str) -> bool:
        """:func:`_servable` for base module ``mname``, probed once (the base as built)."""
        if mname not in self._probe_results:
            self._probe_results[mname] = _servable(self._base_modules[mname])
        return self._probe_results[mname]

    def _params_by_module(self, delta: Delta) -> dict[str, dict[str, torch.Tensor]]:
        """module name -> {attribute: value}, tied parameters following their twin."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for pname, value in delta.params.items():
            for alias in self._ties.get(pname, [pname]):
                if alias != pname and alias in delta.params:
                    continue  # the delta gives that name its own value
                mname, _, attr = alias.rpartition(".")
                out.setdefault(mname, {})[attr] = value
        return out

    # ---- loading, eviction, module swaps -------------------------------------

    def _packed_twins(self, delta: Delta) -> dict[str, str]:
        """Packed embedding -> the head tied to it whose packed delta is the very same
        (an nn.Linear, same shape, planes and scales): the embedding reads its rows
        from that head's stack. Tied layers with other deltas keep a stack each."""
        twins: dict[str, str] = {}
        for ename, emb in delta.layers.items():
            if not isinstance(self._base_modules.get(ename), nn.Embedding):
                continue
            for alias in self._ties.get(f"{ename}.weight", []):
                hname, _, attr = alias.rpartition(".")
                head = delta.layers.get(hname)
                if (
                    attr == "weight"
                    and head is not None
                    and isinstance(self._base_modules.get(hname), nn.Linear)
                    and _same_packed(emb, head)
                ):
                    twins[ename] = hname
                    break
        return twins

    def _footprint(self, delta: Delta, twins: dict[str, str] | None = None) -> _Footprint:
        """What a tenant adds to the stacks, as loaded: per packed layer its planes
        and bytes per plane (the planes as stored, scales float32 per plane and row:
        the stacks keep matrix scales broadcast to rows, one layout for every kernel),
        and its kept parameters' bytes. An embedding reading its tied head's stack
        adds nothing (``twins``: :meth:`_packed_twins` of ``delta``, if known)."""
        twins = self._packed_twins(delta) if twins is None else twins
        layers = {
            lname: (
                layer.bits,
                (layer.planes.nbytes + 4 * layer.bits * layer.shape[0]) // layer.bits,
            )
            for lname, layer in delta.layers.items()
            if lname not in twins and layer.bits > 0
        }
        # Each kept tensor is served in its own base tensor's dtype (a base may mix them).
        params = sum(
            v.numel() * getattr(self._base_modules[mname], attr).element_size()
            for mname, attrs in self._params_by_module(delta).items()
            for attr, v in attrs.items()
        )
        return _Footprint(layers, params)

    def _tenant_bytes(self, delta: Delta) -> int:
        """A tenant's bytes loaded alone."""
        return _stacked_bytes([self._footprint(delta)])

    def _ensure_loaded(self, names: Iterable[str]) -> None:
        """Load every tenant of ``names`` (refreshing their LRU age) or raise
        before changing anything the batch needs."""
        with torch.inference_mode(False):  # versioned tensors (see routing)
            self._load_batch(list(dict.fromkeys(names)))

    def _load_batch(self, needed: list[str]) -> None:
        missing = [n for n in needed if n not in self._loaded]
        deltas = {n: self._sources[n]() for n in missing}
        # Only this batch's tenants must agree on each layer's tenant module class; a
        # loaded tenant outside it that disagrees is evicted below, once all is checked.
        planned = self._serving(among=needed)
        for n, d in deltas.items():
            self._check(d, n, planned)
        # Found once per tenant (comparing tied deltas reads their planes).
        twins = {n: self._packed_twins(d) for n, d in deltas.items()}
        prints = {n: self._footprint(d, twins[n]) for n, d in deltas.items()}
        if self.budget_bytes is not None:
            for n, fp in prints.items():
                size = _stacked_bytes([fp])
                if size > self.budget_bytes:
                    raise BudgetError(
                        f"tenant {n!r} needs {size} bytes, more than the whole budget of "
                        f"{self.budget_bytes} bytes"
                    )
            together = [
                *prints.values(),
                *(self._footprints[n] for n in needed if n in self._loaded),
            ]
            total = _stacked_bytes(together)
            if total > self.budget_bytes:
                raise BudgetError(
                    f"this batch's {len(needed)} tenants need {total} bytes together, more "
                    f"than the budget of {self.budget_bytes} bytes; split the batch"
                )
        for n in needed:
            if n in self._loaded:
                self._loaded.move_to_end(n)
        for n in self._outside_the_plan(planned):
            self._evict(n)
        for n, delta in deltas.items():
            self._load(n, delta, twins[n], prints[n], pinned=set(needed))

    def _outside_the_plan(self, planned: _Planned) -> list[str]:
        """Loaded tenants on a module whose planned tenant module class is another
        than the one serving them (packed vs full-precision): they must leave first."""
        out: dict[str, None] = {}
        for mname, (cls, _) in planned.items():
            wrapper = self._wrapped.get(mname)
            if wrapper is not None and type(wrapper) is not cls:
                out.update(dict.fromkeys(wrapper.tenants))
        return list(out)

    def _load(
        self,
        name: str,
        delta: Delta,
        twins: dict[str, str],
        footprint: _Footprint,
        pinned: set[str],
    ) -> None:
        size = _stacked_bytes([footprint])
        if self.budget_bytes is not None:
            while self._tally.with_one_more(footprint) > self.budget_bytes:
                victim = next((n for n in self._loaded if n not in pinned), None)
                if victim is None:  # _ensure_loaded checked the batch fits
                    raise BudgetError(f"no tenant left to evict for {name!r}")
                self._evict(victim)
        params = self._params_by_module(delta)
        free = set(range(len(self._slot_of) + 1)) - set(self._slot_of.values())
        slot = min(free)
        try:
            with torch.no_grad():
                # Heads first: a twin embedding reads the stack its head just filled.
                for mname, packed in sorted(delta.layers.items(), key=lambda kv: kv[0] in twins):
                    wrapper = self._wrap(mname, packed=True)
                    attrs = self._cast(mname, params.get(mname, {}))
                    if mname in twins:
                        wrapper.add(name, packed, attrs, slot, twin=self._wrapped[twins[mname]])
                    else:
                        wrapper.add(name, packed, attrs, slot)
                for mname, attrs in params.items():
                    if mname in delta.layers:
                        continue
                    self._wrap(mname, packed=False).add(name, self._cast(mname, attrs))
        except BaseException:
            # Half a tenant is no tenant: undo what was added (e.g. out of memory).
            for wrapper in self._wrapped.values():
                if name in wrapper.tenants:
                    wrapper.remove(name)
            self._refresh_slots()  # the whole maps again, whatever the failure left
            raise
        self._slot_of[name] = slot
        self._loaded[name] = size
        self._footprints[name] = footprint
        self._tally.add(footprint)
        capacity = max(self._capacity, slot + 1)
        for wrapper in self._wrapped.values():
            wrapper.map_slot(name, slot, capacity)
        self._capacity = capacity

    def _evict(self, name: str) -> None:
        """Unload ``name`` (each module's remove updates its own slot map)."""
        for wrapper in self._wrapped.values():
            if wrapper.local_index(name) is not None:
                wrapper.remove(name)
        self._tally.remove(self._footprints.pop(name))
        del self._slot_of[name], self._loaded[name]

    def _refresh_slots(self) -> None:
        """Every module's whole slot map again (a new module, a failed load)."""
        self._capacity = max(self._slot_of.values(), default=-1) + 1
        for wrapper in self._wrapped.values():
            wrapper.set_slots(self._slot_of, self._capacity)

    def _cast(self, mname: str, attrs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter values in the base parameter's dtype and device."""
        out = {}
        for attr, value in attrs.items():
            base = getattr(self._base_modules[mname], attr)
            out[attr] = value.detach().to(device=base.device, dtype=base.dtype).clone()
        return out

    def _wrap(self, mname: str, packed: bool) -> nn.Module:
        """The tenant module standing in for base module ``mname`` (swapped in once;
        swapped again when its tenants left and the next one needs the other class)."""
        cls = self._wrapper_class(mname, packed)
        current = self._wrapped.get(mname)
        if current is not None and type(current) is not cls:
            if current.tenants:  # _check refuses such a delta before any load
                raise QDeltaError(
                    f"{mname!r}: expected no tenants left on its {type(current).__name__} "
                    f"before serving it by {cls.__name__}, found {current.tenants}"
                )
            self._swap(mname, self._base_modules[mname])
            del self._wrapped[mname]
        if mname not in self._wrapped:
            wrapper = cls(self._base_modules[mname], self._route)
            layouts = self._layouts()
            wrapper.flat_rows = mname in layouts.flat
            wrapper.gathered_rows = mname in layouts.other
            self._swap(mname, wrapper)
            self._wrapped[mname] = wrapper
            self._refresh_slots()
        return self._wrapped[mname]

    def _swap(self, mname: str, module: nn.Module) -> None:
        """Put ``module`` where the model holds module ``mname``."""
        parent, _, child = mname.rpartition(".")
        setattr(self.model.get_submodule(parent), child, module)

    @serialized
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """``.to()``, ``.half()``, ``.cuda()``...: tenant tensors are stacked per module in
        the base's dtype and device, so they are unloaded, the base is cast, and they
        load again in the new form. Deltas stay checked against the base as built.
        Under a budget that the new form outgrows, the most recently used that fit
        load again; the others stay registered, unloaded."""
        self.base_fingerprint()
        loaded = list(self._loaded)
        for name in loaded:
            self._evict(name)
        result = super()._apply(fn, recurse)
        # Parameters may be replaced, not converted in place; state tensors always are.
        self._base_params = {k: self._base_attr(k) for k in self._base_params}
        self._base_state = {k: self._base_attr(k).detach() for k in self._base_state}
        for name in loaded:  # least recently used first: each load evicts as a request's would
            try:
                self._ensure_loaded([name])
            except BudgetError:
                pass  # alone larger than the budget now: loaded again only if it is raised
        return result

    def _base_attr(self, key: str) -> torch.Tensor:
        mname, _, attr = key.rpartition(".")
        return getattr(self._base_modules[mname], attr)

    # ---- requests ------------------------------------------------------------

    def _row_tenants(self, tenant_ids: TenantIds, batch: int) -> list[str | None]:
        """Validate ``tenant_ids`` for a batch of ``batch`` rows -> names (None: base)."""
        if isinstance(tenant_ids, torch.Tensor):
            if tenant_ids.dtype not in _INT_DTYPES:
                raise DTypeError(
                    f"tenant_ids: expected an int64, int32, int16, int8 or uint8 tensor, "
                    f"found {tenant_ids.dtype}"
                )
            if tenant_ids.dim() != 1:
                raise ShapeError(
                    f"tenant_ids: expected a 1-D tensor of {batch}, found shape "
                    f"{list(tenant_ids.shape)}"
                )
            items: list[Any] = tenant_ids.tolist()
        elif isinstance(tenant_ids, np.ndarray):  # ids or names, checked entry by entry
            if tenant_ids.ndim != 1:
                raise ShapeError(
                    f"tenant_ids: expected a 1-D array of {batch}, found shape "
                    f"{list(tenant_ids.shape)}"
                )
            items = tenant_ids.tolist()
        elif isinstance(tenant_ids, (str, bytes)) or not isinstance(tenant_ids, Sequence):
            raise DTypeError(
                f"tenant_ids: expected a tensor or a sequence (one entry per row), "
                f"found {type(tenant_ids).__name__}"
            )
        else:
            items = list(tenant_ids)
        if len(items) != batch:
            raise ShapeError(
                f"tenant_ids: expected {batch} entries (one per row), found {len(items)}"
            )
        by_id = {i: n for n, i in self._ids.items()}
        names: list[str | None] = []
        for row, item in enumerate(items):
            if item is None:
                names.append(None)
            elif isinstance(item, str):
                self.tenant_id(item)
                names.append(item)
            elif isinstance(item, bool):
                raise DTypeError(f"tenant_ids[{row}]: expected a name, an id or None, found a bool")
            else:
                try:
                    i = operator.index(item)
                except TypeError:
                    raise DTypeError(
                        f"tenant_ids[{row}]: expected a name, an int id or None, found "
                        f"{type(item).__name__}"
                    ) from None
                if i != -1 and i not in by_id:
                    raise UnknownTenantError(
                        f"tenant_ids[{row}]: no tenant with id {i}; known ids: {sorted(by_id)}"
                    )
                names.append(None if i == -1 else by_id[i])
        return names

    def _forget_call_state(self) -> None:
        """In a forked child, of a call another thread was making: its route is gone."""
        self._route.slots = None

    @contextmanager
    def routing(self, tenant_ids: TenantIds, batch: int) -> Iterator[None]:
        """Route the rows of the forward(s) inside to their tenants (loading them).

        Holds the model's lock until the block ends: the route is the model's. A call
        of this model inside the block is refused: it would set its own route, and its
        loads could evict the block's tenants."""
        with holding(self):
            if self._route.slots is not None:
                raise QDeltaError(
                    "routing: expected no call of this model inside a routing() block (the "
                    "block's route is in force), found one; make the call after the block"
                )
            names = self._row_tenants(tenant_ids, batch)
            # Outside inference mode even when called inside it: loaded tenant tensors
            # and the routing tensors then keep version counters, which the modules'
            # per-batch shortcuts check (inference tensors have none, and would force
            # every shortcut to be rebuilt on every call).
            self._ensure_loaded(n for n in names if n is not None)
            with torch.inference_mode(False):
                device = next(iter(self._base_params.values())).device
                slots = [-1 if n is None else self._slot_of[n] for n in names]
                self._route.slots = torch.tensor(slots, dtype=torch.long, device=device)
            try:
                yield
            finally:
                self._route.slots = None

    @serialized
    def forward(
        self,
        input_ids: torch.Tensor,
        tenant_ids: TenantIds,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward with each row served by its tenant.

        With an attention mask and no ``position_ids``, positions count only
        the unmasked tokens (left padding). With a KV cache (``past_key_values``
        or ``cache``), the mask covers the cached
        tokens and the new ones, as in transformers (``[batch, past + length]``;
        None: all ones), and positions continue after the cached tokens."""
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = _cache_length(cache)
        ids, mask = self._check_inputs(input_ids, attention_mask, past=past)
        kwargs.setdefault("position_ids", _positions(mask)[:, past:])
        with torch.no_grad(), self.routing(tenant_ids, ids.shape[0]):
            return self.model(input_ids=ids, attention_mask=mask, **kwargs)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(input_ids, attention_mask)`` as int64 tensors.

        ``input_ids``: an integer tensor ``[batch >= 1, length >= 1]`` of token
        ids in ``[0, vocab)``; an empty batch is an error (ShapeError), not an
        empty result. ``attention_mask``: None, or a tensor (not a list: DTypeError)
        of shape ``[batch, past + length]`` (``past``: tokens already in the KV
        cache), bool, integer or floating dtype, every value exactly 0 or 1,
        left-padded.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _INT_DTYPES:
            found = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise DTypeError(
                f"input_ids: expected an int64, int32, int16, int8 or uint8 tensor, found {found}"
            )
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ShapeError(
                f"input_ids: expected [batch, length >= 1], found {list(input_ids.shape)}"
            )
        if input_ids.shape[0] == 0:
            raise ShapeError("input_ids: expected at least one sequence, found batch 0")
        vocab = self._vocab_size()
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ShapeError(
                f"input_ids: expected token ids in [0, {vocab}), found "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        want = (input_ids.shape[0], past + input_ids.shape[1])
        if attention_mask is None:
            attention_mask = input_ids.new_ones(want)
        if not isinstance(attention_mask, torch.Tensor):
            raise DTypeError(
                f"attention_mask: expected a torch.Tensor, found {type(attention_mask).__name__}"
            )
        if attention_mask.dtype is not torch.bool and (
            attention_mask.dtype not in _INT_DTYPES and not attention_mask.is_floating_point()
        ):
            raise DTypeError(
                f"attention_mask: expected a bool, integer or float tensor, found "
                f"{attention_mask.dtype}"
            )
        if tuple(attention_mask.shape) != want:
            cached = f" ({past} cached + {input_ids.shape[1]} new tokens)" if past else ""
            raise ShapeError(
                f"attention_mask: expected shape {list(want)}{cached}, found "
                f"{list(attention_mask.shape)}"
            )
        # Values before the conversion: .to(long) would turn 0.5 into 0 and 1.7 into 1.
        bad = ~((attention_mask == 0) | (attention_mask == 1))
        if bool(bad.any()):
            found = attention_mask[bad][0].item()
            raise ShapeError(f"attention_mask: expected only 0 and 1, found {found}")
        mask = attention_mask.to(torch.long)
        if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all()):
            raise ShapeError(
                "attention_mask: expected left padding (zeros, then ones to the end of each row)"
            )
        return input_ids.to(torch.long), mask

    def _check_positions(self, prompt: int, max_new_tokens: int) -> None:
        """Refuse up front what would run past the model's positions (learned
        position tables fail mid-decode, rotary ones silently leave their range).
        The last new token is not fed back: its position is never used."""
        limit = self._position_limit
        if limit is not None and prompt + max_new_tokens - 1 > limit:
            raise ShapeError(
                f"max_new_tokens: expected at most {max(limit - prompt + 1, 0)} after the "
                f"longest prompt ({prompt} tokens; the model has {limit} positions), "
                f"found {max_new_tokens}"
            )

    def _vocab_size(self) -> int:
        emb = self._base_modules.get("model.embed_tokens")
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings
        return int(self.model.config.vocab_size)

    # ---- generation ------------------------------------------------------------

    @serialized
    def generate(
        self,
        input_ids: torch.Tensor,
        tenant_ids: TenantIds,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
    ) -> Generation:
        """Decode ``max_new_tokens`` per row with the KV cache, every row by its tenant.

        Batches are left-padded (``attention_mask`` 0 on the left); greedy by
        default, or sampling with ``temperature`` / ``top_k`` from a generator
        seeded with ``seed`` (without one, from torch's global generator, which
        ``torch.manual_seed`` makes reproducible). A row that emitted ``eos_token_id`` keeps
        emitting it; decoding stops early when every row has.

        Every argument is checked before anything is loaded or generated
        (DTypeError for a wrong type, ShapeError for a value out of range):
        ``max_new_tokens`` an int >= 1; ``temperature`` a finite number >= 0,
        > 0 when sampling (greedy decoding ignores it); ``top_k`` None or an
        int >= 1; ``seed`` None or an int in [0, 2**63); ``eos_token_id`` None
        or a token id in [0, vocab).
        """
        ids, mask = self._check_inputs(input_ids, attention_mask)
        max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1)
        self._check_positions(int(mask.sum(1).max()), max_new_tokens)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise DTypeError(f"temperature: expected a number, found {type(temperature).__name__}")
        if not math.isfinite(temperature) or temperature < 0 or (do_sample and temperature == 0):
            raise ShapeError(
                f"temperature: expected a finite number > 0 when sampling (>= 0 when "
                f"greedy), found {temperature}"
            )
        if top_k is not None:
            top_k = as_int("top_k", top_k, 1)
        if seed is not None:
            seed = as_int("seed", seed, 0, 2**63, "2**63")
        if eos_token_id is not None:
            eos_token_id = as_int("eos_token_id", eos_token_id, 0, self._vocab_size())
        # Without a seed, sampling draws from torch's global generator (as torch
        # code does: torch.manual_seed reproduces it), never reseeding it.
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=ids.device)
            generator.manual_seed(seed)
        cache_kw = _cache_argument(self.model)
        batch = ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        tokens: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        positions = _positions(mask)
        # No padding: no mask at all, so attention takes its causal fast path
        # instead of building and applying a mask of ones every step.
        padded = not bool(mask.all())
        with torch.no_grad(), self.routing(tenant_ids, batch):
            out = self.model(
                input_ids=ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                use_cache=True,
                **_last_logits_only(self.model),
            )
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].to(torch.float32)
                token = _pick(logits, do_sample, temperature, top_k, generator)
                if eos_token_id is not None:
                    token = torch.where(finished, eos_token_id, token)
                    finished |= token == eos_token_id
                tokens.append(token)
                if return_logits:
                    step_logits.append(logits)
                if step == max_new_tokens - 1 or (
                    eos_token_id is not None and bool(finished.all())
                ):
                    break
                if padded:
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=mask if padded else None,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_kw: _cache_of(out)},
                )
        new = torch.stack(tokens, dim=1)
        return Generation(
            sequences=torch.cat([ids, new], dim=1),
            tokens=new,
            logits=torch.stack(step_logits, dim=1) if return_logits else None,
        )


def _budget(value: Any) -> int | None:
    """A valid ``budget_bytes`` (None or an int >= 0), or a BudgetError naming it."""
    if value is None:
        return None
    try:
        return as_int("budget_bytes", value, 0)
    except QDeltaError:
        raise BudgetError(
            f"budget_bytes: expected None or an int >= 0, found {value!r} ({type(value).__name__})"
        ) from None


def _check_fits(value: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse (finite) values that would overflow to Inf in the base ``dtype``."""
    if value.numel() and value.is_floating_point() and dtype.is_floating_point:
        peak = float(value.detach().abs().max())
        if peak > torch.finfo(dtype).max:
            raise NonFiniteError(
                f"{what}: expected values finite in the base's {dtype}, found magnitude {peak:g}"
            )


@dataclass(frozen=True)
class _Footprint:
    """A tenant's share of the stacks: packed layer -> (planes, bytes per plane),
    and the bytes of its kept parameters."""

    layers: dict[str, tuple[int, int]]
    params: int


class _StackTally:
    """What :func:`_stacked_bytes` counts for the loaded tenants, kept up to date as
    they load and leave: per layer its tenants by depth and a plane's bytes. A
    question costs the layers of the tenant asked about, not every loaded
    tenant's layers (a load under a full budget asks once per eviction)."""

    def __init__(self) -> None:
        self.bytes = 0  # an int, so resident_bytes reads it without the lock
        self._depths: dict[str, Counter[int]] = {}
        self._plane: dict[str, int] = {}

    def _term(self, lname: str) -> int:
        depths = self._depths.get(lname)
        if not depths:
            return 0
        return sum(depths.values()) * max(depths) * self._plane[lname]

    def _change(self, fp: _Footprint, sign: int) -> None:
        total = self.bytes + sign * fp.params
        for lname, (bits, plane) in fp.layers.items():
            total -= self._term(lname)
            depths = self._depths.setdefault(lname, Counter())
            depths[bits] += sign
            if depths[bits] == 0:
                del depths[bits]
            self._plane[lname] = plane
            total += self._term(lname)
        self.bytes = total

    def add(self, fp: _Footprint) -> None:
        self._change(fp, 1)

    def remove(self, fp: _Footprint) -> None:
        self._change(fp, -1)

    def with_one_more(self, fp: _Footprint) -> int:
        """The bytes with ``fp`` loaded too."""
        total = self.bytes + fp.params
        for lname, (bits, plane) in fp.layers.items():
            depths = self._depths.get(lname) or Counter()
            count = sum(depths.values())
            deepest = max(bits, max(depths, default=0))
            total += (count + 1) * deepest * plane - self._term(lname)
        return total


def _stacked_bytes(footprints: Iterable[_Footprint]) -> int:
    """Bytes the stacks hold for these tenants together: a layer's stack has one
    entry per tenant on it, each as deep as the deepest (zero planes below)."""
    count: dict[str, int] = {}
    depth: dict[str, int] = {}
    per_plane: dict[str, int] = {}
    params = 0
    for fp in footprints:
        params += fp.params
        for lname, (bits, plane) in fp.layers.items():
            count[lname] = count.get(lname, 0) + 1
            depth[lname] = max(depth.get(lname, 0), bits)
            per_plane[lname] = plane
    return params + sum(count[n] * depth[n] * per_plane[n] for n in count)


def _same_packed(a: PackedLayer, b: PackedLayer) -> bool:
    """Equal packed deltas (the same bytes, or views of one pair as a store maps it)."""
    if a.shape != b.shape or a.transposed or b.transposed:
        return False
    return all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and ((x.ctypes.data == y.ctypes.data and x.strides == y.strides) or np.array_equal(x, y))
        for x, y in ((a.planes, b.planes), (a.scales, b.scales))
    )


def _orientation_mismatch(tenant: str, lname: str, module: nn.Module, transposed: bool) -> str:
    """The message for a packed layer packed for the other weight layout."""
    if is_conv1d(module):
        want, kind = True, "a Conv1D (weight [in, out])"
    elif isinstance(module, nn.Embedding):
        want, kind = False, "an nn.Embedding (weight [vocab, dim])"
    else:
        want, kind = False, "an nn.Linear (weight [out, in])"
    return (
        f"tenant {tenant!r}: packed layer {lname!r} is {kind} in the base, so its delta "
        f"must have transposed={want}; found transposed={transposed} (a delta made for a "
        f"model with the other layout)"
    )


def _plain_what(module: nn.Module) -> str:
    return "embedding lookup" if isinstance(module, nn.Embedding) else "linear map"


def _wrapper_class(module: nn.Module, packed: bool) -> type[nn.Module]:
    if packed:
        return PackedRowEmbedding if isinstance(module, nn.Embedding) else RoutedLinear
    if isinstance(module, nn.Embedding):
        return RowEmbedding
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return RowLinear
    if layer_norm_form(module) is not None:
        return RowLayerNorm
    return RowRMSNorm


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch ``(input_ids, attention_mask)``, the
    form :meth:`MultiTenantModel.generate` takes."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (0 under left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_length(cache: Any) -> int:
    """Tokens held by a transformers KV cache (0 for None)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        raise DTypeError(
            "past_key_values: expected a transformers Cache (e.g. the past_key_values of "
            f"an earlier output), found {type(cache).__name__}"
        )
    return int(length())


def _cache_argument(model: nn.Module) -> str:
    """The KV cache keyword of this transformers version (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _last_logits_only(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` (the prefill computes the head for the last position
    only) where the model's forward names it: some (Bloom on transformers 4.x)
    refuse unknown keywords, and others swallow them unused."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


__all__ = ["Generation", "MultiTenantModel", "left_padded"]
