"""Per-row tenant modules: the pieces MultiTenantModel swaps into a base model.

Every module here wraps one base module (it does not copy it) and holds the
loaded tenants' data for that module, stacked. The tenant of each batch row
comes from a shared ``Route`` that the model sets for the forward in flight,
as *model slots*; each module maps slots to its own local index (``-1``: the
row uses the base), so a tenant that does not touch a module costs nothing
there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qdelta import stacks
from qdelta.delta import PackedLayer
from qdelta.errors import QDeltaError, ShapeError
from qdelta.kernels import cpu
from qdelta.reference import unpack_signs
from qdelta.sources import embedding_form, embedding_scale, is_conv1d


class Route:
    """The per-row model slots of the forward in flight (None: every row on the base)."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None


def _base_keys_out(module: TenantModule, state_dict: dict, prefix: str, local_metadata) -> None:
    base = prefix + "base."
    mine = [k for k in state_dict if k.startswith(prefix)]
    values = {k: state_dict.pop(k) for k in mine}
    for k, v in values.items():
        if k.startswith(base):
            state_dict[prefix + k[len(base) :]] = v


def _base_keys_in(module: TenantModule, state_dict: dict, prefix: str, *args) -> None:
    paths = [prefix + p + "." for p in module._base_paths()]
    for k in [k for k in state_dict if k.startswith(prefix)]:
        if any(k.startswith(p) for p in paths):
            continue  # already in the wrapper's own form
        value = state_dict.pop(k)
        for p in paths:
            state_dict[p + k[len(prefix) :]] = value


def _check_new(module: TenantModule, name: str) -> None:
    """A QDeltaError when tenant ``name`` is in ``module`` already (it would be
    served twice, its second copy never read)."""
    if name in module._names:
        raise QDeltaError(f"tenant {name!r}: already added to {type(module.base).__name__}")


class TenantModule(nn.Module):
    """Common part: the slot -> local index map and the local tenant order."""

    def __init__(self, base: nn.Module, route: Route) -> None:
        super().__init__()
        self.base = base
        self._route = route
        self._names: list[str] = []
        # Model slot + 1 -> local index (-1: not here), with spare entries; the model
        # slot of each local tenant it maps, so a removal updates only its entries.
        self.register_buffer("_slot_map", torch.full((1,), -1, dtype=torch.long), persistent=False)
        self._mapped: dict[str, int] = {}
        self._local_cache: tuple | None = None
        # Whether inputs may come as [batch * seq, ...], batch first (set by
        # MultiTenantModel from its probe of the base; see _rows_of).
        self.flat_rows = False
        # Whether its rows are not the batch's at all (a mixture-of-experts expert's
        # gathered tokens, found by the same probe): only one tenant per batch then.
        self.gathered_rows = False
        self._repeat_cache: tuple | None = None
        # The wrapped model's state dict (save_pretrained, checkpoints) stays the
        # base's own: under this module's name, the base module's keys, once.
        self.register_state_dict_post_hook(_base_keys_out)
        self.register_load_state_dict_pre_hook(_base_keys_in)

    def _base_paths(self) -> list[str]:
        """Where the base module sits inside this wrapper ("base", and e.g. a
        MultiTenantLinear's "layer.base_layer"): the same module, more than one name."""
        return [n for n, m in self.named_modules(remove_duplicate=False) if m is self.base]

    @property
    def tenants(self) -> list[str]:
        return list(self._names)

    def local_index(self, name: str) -> int | None:
        return self._names.index(name) if name in self._names else None

    def _local_indices(self) -> dict[str, int]:
        """Each tenant's index among this module's own (the order they were added)."""
        return {name: i for i, name in enumerate(self._names)}

    def set_slots(self, slot_of: dict[str, int], capacity: int) -> None:
        """The whole slot map again: tenant name -> model slot, for slots < ``capacity``
        (the model's loads and evictions update it one tenant at a time instead:
        :meth:`map_slot`, and each module's ``remove``)."""
        local_of = self._local_indices()
        self._mapped = {n: slot for n, slot in slot_of.items() if n in local_of}
        table = torch.full((capacity + 1,), -1, dtype=torch.long)
        if self._mapped:
            at = torch.tensor(list(self._mapped.values()), dtype=torch.long) + 1
            table[at] = torch.tensor([local_of[n] for n in self._mapped], dtype=torch.long)
        self._slot_map = table.to(self._slot_map.device)
        self._slots_changed()

    def map_slot(self, name: str, slot: int, capacity: int) -> None:
        """Tenant ``name`` was loaded into model slot ``slot`` (a no-op for the map
        where it is not on this module), the model now having ``capacity`` slots:
        only that entry is written (a full :meth:`set_slots` per load would cost
        every module O(tenants) per load)."""
        local = self.local_index(name)
        entries = {}
        if local is not None:
            self._mapped[name] = slot
            entries[slot] = local
        self._write_map(entries, capacity)

    def _write_map(self, entries: dict[int, int], capacity: int | None = None) -> None:
        """Slot -> local index ``entries`` written into a new table (the routed-rows
        cache tells tables apart by identity), grown with spare entries to cover
        ``capacity`` slots."""
        table = self._slot_map
        if not entries and (capacity is None or table.shape[0] > capacity):
            return
        if capacity is not None and table.shape[0] <= capacity:
            # A quarter spare, as the stacks (qdelta.stacks): O(log T) growths for T loads.
            room = capacity + 1 + max(1, (capacity + 1) // 4)
            grown = torch.full((room,), -1, dtype=torch.long, device=table.device)
            grown[: table.shape[0]] = table
            table = grown
        else:
            table = table.clone()
        if entries:
            at = torch.tensor(list(entries), dtype=torch.long) + 1
            table[at.to(table.device)] = torch.tensor(list(entries.values()), dtype=torch.long).to(
                table.device
            )
        self._slot_map = table
        self._slots_changed()

    def _slots_changed(self) -> None:
        """Called when the slot map changed."""

    def _drop_name(self, name: str) -> int:
        """Take ``name`` out of the local order, the last tenant moving into its index
        (as a stack's last row moves on a removal: qdelta.stacks.without), and the
        map with it; returns that index. Modules apply the same move to their rows."""
        i = self._names.index(name)
        last = self._names.pop()
        entries = {}
        slot = self._mapped.pop(name, None)
        if slot is not None:
            entries[slot] = -1
        if i < len(self._names):
            self._names[i] = last
            if last in self._mapped:
                entries[self._mapped[last]] = i
        self._write_map(entries)
        return i

    def tenant_nbytes(self) -> int:
        """Bytes of the tenant tensors this module holds (not the base's)."""
        return sum(t.numel() * t.element_size() for t in self._tenant_tensors())

    def tenant_tensors(self) -> list[torch.Tensor]:
        """The tenant tensors this module holds (not the base's)."""
        return self._tenant_tensors()

    def _tenant_tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    def derived_tensors(self) -> list[torch.Tensor]:
        """Tables this module made from its tenants and keeps until they change
        (counted as reserved, not as the tenants' bytes the budget bounds)."""
        return []

    def routed_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The local tenant of each entry of ``x``'s first dimension for the forward
        in flight, or None when the base module serves ``x`` as it is."""
        local = self.local_rows()
        return None if local is None else self._rows_of(x, local)

    def _rows_of(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
        """The local tenant of each entry of ``x``'s first dimension (``local`` when
        that dimension is the batch), or None when every row is on the base and the
        base module serves ``x`` as it is.

        A model may fold the batch into another dimension: OPT's decoder runs each
        layer's final_layer_norm and MLP on ``[batch * seq, hidden]``. Such an input
        is routed (each batch row's tenant repeated for its ``seq`` entries) only
        where MultiTenantModel probed this module and saw the batch flattened batch
        first (``flat_rows``), or when every row has the same tenant; elsewhere
        guessing the fold would be guesswork: a ShapeError, not other rows' weights.
        Where the probe saw rows that are not the batch's at all (``gathered_rows``),
        even a first dimension the batch's size is no batch."""
        batch = local.shape[0]
        if x.dim() > 0 and x.shape[0] == batch and not self.gathered_rows:
            return local
        if self.flat_rows and x.dim() == 2 and batch and x.shape[0] % batch == 0:
            return self._repeated(local, x.shape[0] // batch)
        if not bool((local >= 0).any()):
            return None
        if x.dim() > 0 and bool((local == local[0]).all()):
            # One tenant for every row: whatever the layout, every entry is its.
            return self._repeated(local[:1], x.shape[0])
        raise ShapeError(
            f"{type(self).__name__} ({type(self.base).__name__}): expected the batch's "
            f"{batch} rows first in the input, found shape {list(x.shape)}: the model "
            "reshapes the batch before this layer in a way its probe did not confirm, so "
            "per-row tenants cannot be routed here; keep this layer frozen in the "
            "fine-tune, or serve it with qdelta.apply"
        )

    def _repeated(self, local: torch.Tensor, per_row: int) -> torch.Tensor:
        """``local`` with each row's entry repeated ``per_row`` times, made once per
        routed batch and length (the same tensor then serves every layer's caches)."""
        cached = self._repeat_cache
        version = _version(local)
        if (
            cached is not None
            and cached[0] is local
            and cached[1] == (version, per_row)
            and version is not None
        ):
            return cached[2]
        with torch.inference_mode(False):  # a versioned tensor, as local_rows makes
            rows = local.repeat_interleave(per_row)
        self._repeat_cache = (local, (version, per_row), rows)
        return rows

    def local_rows(self) -> torch.Tensor | None:
        """Local tenant index per batch row, or None when no row needs a tenant here."""
        slots = self._route.slots
        if slots is None or not self._names:
            return None
        # One lookup per routed batch, not per step: generate() routes once and
        # every decode step reuses the same slots tensor. Returning the same
        # tensor object also lets MultiTenantLinear reuse its row slots.
        cached = self._local_cache
        if (
            cached is not None
            and cached[0] is slots
            and cached[1] is self._slot_map
            and cached[2] is not None
            and cached[2] == _version(slots)
        ):
            return cached[3]
        with torch.inference_mode(False):  # a versioned tensor (see MultiTenantModel.routing)
            local = self._slot_map[slots + 1]
        self._local_cache = (slots, self._slot_map, _version(slots), local)
        return local


def _version(t: torch.Tensor) -> int | None:
    """The in-place modification counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _grown(stack: torch.Tensor | None, row: torch.Tensor) -> torch.Tensor:
    """``stack`` with ``row`` after its rows (a new stack for None), grown into spare
    rows (qdelta.stacks): a load copies its own row, not every tenant's."""
    return stacks.started(row) if stack is None else stacks.appended(stack, row)


def _shrunk(stack: torch.Tensor, index: int) -> torch.Tensor | None:
    """``stack`` less row ``index``, the last row moved in (None once no row is left),
    as :meth:`TenantModule._drop_name` moves the names."""
    return None if stack.shape[0] == 1 else stacks.without(stack, index)


def _moved_last(items: list, index: int) -> None:
    """``items`` less its entry ``index``, the last one moved in (the names' move)."""
    last = items.pop()
    if index < len(items):
        items[index] = last


def _base_bias(module: nn.Module) -> torch.Tensor | None:
    """The module's ``bias`` (None when it has none at all: Cohere's LayerNorm)."""
    return getattr(module, "bias", None)


class _WeightsAndBiases(ABC):
    """Per-tenant full-precision weight and bias lists (a tenant that keeps the
    base's shares it, no copy), for a TenantModule; ``_forget()`` drops what the
    module derived from them. A base module without a ``bias`` attribute has bias
    None."""

    base: nn.Module
    _names: list[str]

    def _init_lists(self) -> None:
        self._weights: list[torch.Tensor] = []
        self._biases: list[torch.Tensor | None] = []

    def add(self, name: str, params: dict[str, torch.Tensor]) -> None:
        # All or nothing: every value found before any list grows, so a failure
        # leaves no half tenant behind.
        _check_new(self, name)
        unknown = sorted(set(params) - {"weight", "bias"})
        if unknown:
            raise QDeltaError(
                f"tenant {name!r}: {type(self.base).__name__} takes a weight and a bias, "
                f"found {unknown}"
            )
        base_bias = _base_bias(self.base)
        if "bias" in params and base_bias is None:
            raise QDeltaError(
                f"tenant {name!r}: a bias for {type(self.base).__name__}, which has none"
            )
        weight = params.get("weight", self.base.weight)
        bias = params.get("bias", base_bias)
        self._forget()
        self._names.append(name)
        self._weights.append(weight)
        self._biases.append(bias)

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        self._forget()
        i = self._drop_name(name)
        _moved_last(self._weights, i)
        _moved_last(self._biases, i)

    def _tenant_tensors(self) -> list[torch.Tensor]:
        weight, bias = self.base.weight, _base_bias(self.base)
        own = [w for w in self._weights if w is not weight]
        return own + [b for b in self._biases if b is not None and b is not bias]

    @abstractmethod
    def _forget(self) -> None: ...


class _TwoForms(TenantModule, ABC):
    """Common forward of the modules with a one-call form: the base alone when no
    row has a tenant here, else the one-call form (``_rowwise``, None where it
    does not apply) or the torch form (``_torch_form``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.routed_rows(x)
        if local is None:
            return self.base(x)
        fast = self._rowwise(x, local)
        return fast if fast is not None else self._torch_form(x, local)

    @abstractmethod
    def _rowwise(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None: ...

    @abstractmethod
    def _torch_form(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor: ...


class RowEmbedding(_TwoForms):
    """nn.Embedding with per-tenant full-precision tables, gathered per row."""

    def __init__(self, base: nn.Embedding, route: Route) -> None:
        super().__init__(base, route)
        self._scaled = _lookup_form(base) == "scaled"
        self._stacked: torch.Tensor | None = None  # [tenants, vocab, dim]
        self._plan: tuple | None = None  # the bound one-call form (see _rowwise)

    def add(self, name: str, params: dict[str, torch.Tensor]) -> None:
        _check_new(self, name)
        # All or nothing: the new stack is made before anything of this module changes.
        self._stacked = _grown(self._stacked, params["weight"])
        self._names.append(name)

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        shrunk = _shrunk(self._stacked, self._names.index(name))  # may fail: nothing changed
        self._drop_name(name)
        self._stacked = shrunk

    def _rowwise(self, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
        """The batch's rows as one Rust call (src/embedding.rs) for float32 CPU
        tables and int64 CPU ids with no gradient to track, else None; the table
        arrays and each token's table are bound once per routed batch."""
        weight, stacked = self.base.weight, self._stacked
        if (
            stacked is None
            or weight.dtype != torch.float32
            or stacked.dtype != torch.float32
            or weight.is_cuda
            or ids.dtype != torch.int64
            or ids.is_cuda
            or (torch.is_grad_enabled() and (weight.requires_grad or stacked.requires_grad))
        ):
            return None
        # The stack's shape too: a load grows it in place, at the same address.
        storage = (weight.data_ptr(), _version(weight), stacked.data_ptr(), stacked.shape)
        plan = self._plan
        if not (
            plan is not None
            and plan[0] is local
            and plan[1] == _version(local)
            and plan[1] is not None
            and plan[2] == ids.shape
            and plan[3] == storage
        ):
            before = None if plan is None else plan[3]
            if before is not None and before[:3] == storage[:3] and before[3][1:] == storage[3][1:]:
                # The same buffers, rows added or dropped at the end (qdelta.stacks):
                # the views of the rows kept stand, so a load binds its own row only.
                kept = plan[4][: stacked.shape[0] + 1]
                tables = kept + [t.numpy() for t in stacked.detach()[len(kept) - 1 :].unbind(0)]
            else:
                tables = [weight.detach().contiguous().numpy()]
                tables += [t.numpy() for t in stacked.detach().unbind(0)]
            # Local -1 (base) is table 0. The call gets the batch's own tables only:
            # the binding reads every array it is passed, on every decode step.
            used, among = torch.unique(local + 1, return_inverse=True)
            mine = [tables[u] for u in used.tolist()]
            index = among.repeat_interleave(ids[0].numel()).numpy()
            plan = self._plan = (local, _version(local), ids.shape, storage, tables, mine, index)
        out = torch.empty(*ids.shape, weight.shape[1], dtype=torch.float32)
        cpu.gather_embedding(plan[5], ids.contiguous(), plan[6], out)
        if self._scaled:  # the base's own product: lookup * embed_scale (weight dtype)
            out.mul_(embedding_scale(self.base))
        return out

    def _torch_form(self, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        # One gather over the stacked tables: row r reads table local[r].
        shape = (-1,) + (1,) * (ids.dim() - 1)
        flat = local.clamp(min=0).view(shape) * self.base.num_embeddings + ids
        gathered = self._stacked.view(-1, out.shape[-1])[flat]
        if self._scaled:
            gathered = gathered * embedding_scale(self.base)
        return torch.where((local >= 0).view(*shape, 1), gathered, out)


# A stack an embedding lookup reads: planes, scales, each batch row's index there (-1: none).
_Source = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RowRerunEmbedding(TenantModule):
    """An embedding whose forward is not a lookup of its argument (OPT's learned
    positions: ``forward(attention_mask, cache_length, position_ids)``) with
    per-tenant full-precision tables: the base module's own forward runs once for
    the batch and once more per tenant in it, on that tenant's rows, with the
    tenant's table in place of the weight (``torch.func.functional_call``).

    Exact when the forward is row-separable (row i of the output depends on row i
    of the batch-first arguments only) and reads its weight alone:
    MultiTenantModel serves a module here only after its probe forward showed that
    (``qdelta.batch_layout``). Batch-first arguments are the tensors whose first
    dimension is the batch's; everything else is passed as it is.
    """

    def __init__(self, base: nn.Embedding, route: Route) -> None:
        super().__init__(base, route)
        self._tables: list[torch.Tensor] = []

    def add(self, name: str, params: dict[str, torch.Tensor]) -> None:
        _check_new(self, name)
        table = params["weight"]
        self._names.append(name)
        self._tables.append(table)

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        _moved_last(self._tables, self._drop_name(name))

    def _tenant_tensors(self) -> list[torch.Tensor]:
        return list(self._tables)

    def forward(self, *args, **kwargs):
        local = self.local_rows()
        out = self.base(*args, **kwargs)
        if local is None or not bool((local >= 0).any()):
            return out
        batch = local.shape[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch:
            raise ShapeError(
                f"{type(self.base).__name__}: expected an output with the batch's {batch} "
                f"rows first, found {type(out).__name__} "
                f"{list(out.shape) if isinstance(out, torch.Tensor) else ''}"
            )
        out = out.clone()
        for t in local[local >= 0].unique().tolist():
            rows = (local == t).nonzero().squeeze(1)

            def pick(a, rows=rows):
                batched = isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
                return a.index_select(0, rows.to(a.device)) if batched else a

            sub = torch.func.functional_call(
                self.base,
                {"weight": self._tables[t]},
                tuple(pick(a) for a in args),
                {k: pick(v) for k, v in kwargs.items()},
            )
            out[rows.to(out.device)] = sub.to(out.dtype)
        return out


class PackedRowEmbedding(_TwoForms):
    """nn.Embedding with per-tenant *packed* deltas (``compress(...,
    compress_embeddings=True)``): each row adds, for each of its tokens, that
    token's delta row of its tenant, unpacked from the sign planes.

    A tenant added with a ``twin`` (the RoutedLinear of a head tied to this
    embedding and holding the very same delta) has no stack here: its rows are
    read from the head's MultiTenantLinear stack, whose ``[vocab, hidden]``
    weight is packed along hidden like a table, so the pair is resident once."""

    def __init__(self, base: nn.Embedding, route: Route) -> None:
        super().__init__(base, route)
        self._scaled = _lookup_form(base) == "scaled"
        self._own: list[str] = []  # tenants with a stack here, in stack order
        self._planes: list[torch.Tensor] = []  # per own tenant: int32 [P, V, W]
        self._scales: list[torch.Tensor] = []  # per own tenant: float32 [P, V]
        self._stacked_planes: torch.Tensor | None = None  # [T, P_max, V, W]
        self._stacked_scales: torch.Tensor | None = None  # [T, P_max, V]
        # Tenants read from their twin's stack (a dict, so not a submodule here).
        self._shared: dict[str, RoutedLinear] = {}
        self._sources_cache: tuple | None = None  # see _sources
        self._table_cache: tuple | None = None  # see _source_table
        self._plan: tuple | None = None  # the bound one-call form (see _rowwise)

    def add(
        self,
        name: str,
        packed: PackedLayer,
        params: dict[str, torch.Tensor],
        slot: int,
        twin: RoutedLinear | None = None,
    ) -> None:
        _check_new(self, name)
        self._sources_cache = self._table_cache = None
        if twin is not None:
            self._check_twin(name, packed, slot, twin)
            self._names.append(name)
            self._shared[name] = twin
            return
        device = self.base.weight.device
        planes = torch.from_numpy(np.ascontiguousarray(packed.planes).view(np.int32))
        scales = torch.as_tensor(np.asarray(packed.scales), dtype=torch.float32)
        if scales.dim() == 1:  # one scale per matrix: the same for every token row
            scales = scales[:, None].expand(-1, packed.shape[0])
        planes, scales = planes.to(device), scales.to(device)
        stacked = self._stacked_planes
        if stacked is not None and planes.shape[0] <= stacked.shape[1]:
            self._append_own(planes, scales)  # as deep as the stack: into its spare rows
        else:
            self._restack_with([*self._planes, planes], [*self._scales, scales])
        self._names.append(name)
        self._own.append(name)

    def _append_own(self, planes: torch.Tensor, scales: torch.Tensor) -> None:
        """One more own tenant, padded with zero planes to the stack's depth and
        grown into its spare rows (qdelta.stacks); all or nothing."""
        depth = self._stacked_planes.shape[1]
        pad = depth - planes.shape[0]
        grown_planes = stacks.appended(self._stacked_planes, F.pad(planes, (0, 0, 0, 0, 0, pad)))
        grown_scales = stacks.appended(self._stacked_scales, F.pad(scales, (0, 0, 0, pad)))
        self._stacked_planes, self._stacked_scales = grown_planes, grown_scales
        self._view_lists([*(p.shape[0] for p in self._planes), planes.shape[0]])

    def _check_twin(self, name: str, packed: PackedLayer, slot: int, twin: RoutedLinear) -> None:
        """Refuse a twin whose stack cannot stand in for this table (QDeltaError):
        another shape or layout, the tenant not loaded there, or a second head."""
        layer = twin.layer
        table = tuple(self.base.weight.shape)
        others = {id(t) for t in self._shared.values()}
        head = (layer.out_features, layer.in_features)
        problems = [
            f"a transposed {'head' if layer.transposed else 'delta'}"
            if layer.transposed or packed.transposed
            else None,
            f"a {list(head)} head" if head != table else None,
            f"a {list(packed.shape)} delta" if packed.shape != table else None,
            f"the tenant at slot {twin.local_index(name)} there"
            if twin.local_index(name) != slot
            else None,
            "a second head (another tenant shares a different one)"
            if others and others != {id(twin)}
            else None,
            f"its planes on {layer.planes.device}"
            if layer.planes.device != self.base.weight.device
            else None,
        ]
        found = [p for p in problems if p is not None]
        if found:
            raise QDeltaError(
                f"tenant {name!r}: expected its tied head's stack to hold this embedding's "
                f"{list(table)} delta, not transposed, at slot {slot}, on "
                f"{self.base.weight.device}; found {', '.join(found)}"
            )

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        self._sources_cache = self._table_cache = None
        if self._shared.pop(name, None) is not None:
            self._drop_name(name)
            return
        i = self._own.index(name)
        counts = [p.shape[0] for p in self._planes]
        _moved_last(counts, i)
        if not counts or max(counts) < self._stacked_planes.shape[1]:
            # No tenant left as deep as the stack: restacked without its extra planes.
            self._restack_with(
                self._planes[:i] + self._planes[i + 1 :], self._scales[:i] + self._scales[i + 1 :]
            )
            del self._own[i]
        else:  # the last own tenant's rows move into the freed ones (qdelta.stacks)
            # Both stacks are allocated alike: both shrink into new buffers (which may
            # fail before any change) or both move one row in place.
            planes = stacks.without(self._stacked_planes, i)
            self._stacked_scales = stacks.without(self._stacked_scales, i)
            self._stacked_planes = planes
            _moved_last(self._own, i)
            self._view_lists(counts)
        self._drop_name(name)

    def _restack_with(self, planes: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        """Own tenants' ``planes`` / ``scales`` become the lists, restacked; all or
        nothing: a failed restack (out of memory, say) leaves the old lists."""
        kept = (self._planes, self._scales)
        self._planes, self._scales = planes, scales
        try:
            self._restack()
        except BaseException:
            self._planes, self._scales = kept
            raise

    def _restack(self) -> None:
        """One stack for every own tenant (planes padded with zero-scale planes); the
        lists become views of it, so one copy stays resident."""
        if not self._planes:
            self._stacked_planes = self._stacked_scales = None
            return
        depth = max(p.shape[0] for p in self._planes)
        planes = [F.pad(p, (0, 0, 0, 0, 0, depth - p.shape[0])) for p in self._planes]
        scales = [F.pad(s, (0, 0, 0, depth - s.shape[0])) for s in self._scales]
        counts = [p.shape[0] for p in self._planes]
        self._stacked_planes, self._stacked_scales = torch.stack(planes), torch.stack(scales)
        self._view_lists(counts)

    def _view_lists(self, counts: list[int]) -> None:
        """The per-tenant lists as views of the stacks (tenant i's own ``counts[i]``
        planes), so no older buffer stays alive through them."""
        self._planes = [self._stacked_planes[i, :n] for i, n in enumerate(counts)]
        self._scales = [self._stacked_scales[i, :n] for i, n in enumerate(counts)]

    def _tenant_tensors(self) -> list[torch.Tensor]:
        # Shared tenants' bytes are the twin's (counted there).
        return [t for t in (self._stacked_planes, self._stacked_scales) if t is not None]

    def _sources(self, local: torch.Tensor) -> list[_Source]:
        """``(planes [T, P, V, W], scales [T, P, V], each row's index there or -1)`` of
        the stacks this batch reads: the own one and the twin's (by its stack slots
        as they are now; at least one stack). Found once per routed batch, and again
        whenever either stack or the twin's slots change."""
        twin = next(iter(self._shared.values()), None)
        key: tuple = (self._stacked_planes, self._stacked_scales)
        if twin is not None:
            key += (twin.layer.planes, twin.layer.scales, twin.layer.known_slots)
        version = _version(local)
        cached = self._sources_cache
        if (
            cached is not None
            and cached[0] is local
            and cached[1] == version
            and version is not None
            and len(cached[2]) == len(key)
            and all(a is b for a, b in zip(cached[2], key, strict=True))
        ):
            return cached[3]
        read = [key[:2]] if twin is None else [key[:2], key[2:4]]
        with torch.inference_mode(False):  # versioned tensors, as local_rows makes
            rows = self._source_table(key, twin, local.device)[:, local + 1]
        sources = [(p, s, r) for (p, s), r in zip(read, rows, strict=True) if p is not None]
        sources = [src for src in sources if bool((src[2] >= 0).any())] or sources[:1]
        self._sources_cache = (local, version, key, sources)
        return sources

    def _source_table(
        self, key: tuple, twin: RoutedLinear | None, device: torch.device
    ) -> torch.Tensor:
        """``[stacks, 1 + tenants]``: each local index's row (column 0: the base) in
        the own stack and the twin's, -1 where it has none. Made once per change of
        the tenants or the stacks (O(tenants)), so a routed batch indexes it."""
        cached = self._table_cache
        if (
            cached is not None
            and len(cached[0]) == len(key)
            and all(a is b for a, b in zip(cached[0], key, strict=True))
        ):
            return cached[1]
        own = {n: i for i, n in enumerate(self._own)}
        table = [[-1] + [own.get(n, -1) for n in self._names]]
        if twin is not None:
            shared = self._shared
            table.append([-1] + [twin.stack_slot(n) if n in shared else -1 for n in self._names])
        found = torch.tensor(table, dtype=torch.long, device=device)
        self._table_cache = (key, found)
        return found

    def _rowwise(self, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
        """The batch's rows as one Rust call per stack read (src/embedding.rs) for a
        float32 CPU table and int64 CPU ids with no gradient to track, else None. The
        stacks' arrays and each token's index are bound once per routed batch."""
        weight = self.base.weight
        if (
            weight.dtype != torch.float32
            or weight.is_cuda
            or not weight.is_contiguous()
            or ids.dtype != torch.int64
            or ids.is_cuda
            or (torch.is_grad_enabled() and weight.requires_grad)
        ):
            return None
        sources = self._sources(local)
        plan = self._plan
        if not (plan is not None and plan[0] is sources and plan[1] == ids.shape):
            if any(p.is_cuda for p, _, _ in sources):
                return None
            per_row = ids[0].numel()
            mask = (-1,) + (1,) * ids.dim()  # a batch row's mask over its tokens and hidden
            bound = [
                (
                    (p.numpy().view(np.uint32), s.numpy()),
                    r.repeat_interleave(per_row).numpy(),
                    (r >= 0).view(mask),
                )
                for p, s, r in sources
            ]
            plan = self._plan = (sources, ids.shape, bound)
        tokens = ids.contiguous()
        out = None
        for stack, rows, mine in plan[2]:
            part = torch.empty(*ids.shape, weight.shape[1], dtype=torch.float32)
            cpu.packed_embedding(weight, *stack, tokens, rows, part)
            # A row outside this stack got the base row: the earlier result stands.
            out = part if out is None else torch.where(mine, part, out)
        if self._scaled:  # (base + delta) rows times embed_scale, as the fine-tune's module
            out.mul_(embedding_scale(self.base))
        return out

    def _torch_form(self, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        shape = (-1,) + (1,) * (ids.dim() - 1)
        delta = None
        for stacked_planes, stacked_scales, rows in self._sources(local):
            tenant = rows.clamp(min=0).view(shape).expand_as(ids)
            # [..., P, W] planes and [..., P] scales of each token's row in its tenant's table.
            planes = stacked_planes[tenant, :, ids]
            scales = stacked_scales[tenant, :, ids]
            signs = unpack_signs(planes, out.shape[-1]).to(torch.float32)
            part = (signs * scales[..., None]).sum(-2) * (rows >= 0).view(*shape, 1)
            delta = part if delta is None else delta + part
        if self._scaled:  # out is already scaled (the base's forward); the delta too
            delta = delta * embedding_scale(self.base).to(torch.float32)
        return out + delta.to(out.dtype)


def _lookup_form(base: nn.Embedding) -> str:
    """The base embedding's form (:func:`qdelta.sources.embedding_form`), or a
    QDeltaError when its forward is not a lookup a per-row table can stand in for."""
    form = embedding_form(base)
    if form is None:
        raise QDeltaError(
            f"{type(base).__name__}: expected an embedding whose forward is a lookup of its "
            "weight (nn.Embedding, or a subclass checked to compute one, possibly times "
            "embed_scale), found another forward; per-row tenants are not supported for it"
        )
    return form


def rms_norm_form(module: nn.Module) -> tuple[float, float] | None:
    """``(offset, eps)`` when ``module(x)`` is ``x * rsqrt(mean(x^2) + eps) * (offset +
    weight)``: offset 0 for LlamaRMSNorm and kin, 1 for Gemma's RMSNorms; else None.

    Decided from the module's output, not its class name: its forward runs on a
    probe input with a probe float32 weight (``torch.func.functional_call``), with
    rows of an ordinary size and rows small enough for ``eps`` to decide the result
    (:func:`_probe_rows`), and must match one formula to float32 rounding. A
    LayerNorm (mean subtracted, a bias) matches neither.
    """
    weight = _norm_weight(module, {"weight"})
    eps = _norm_eps(module, ("variance_epsilon", "eps"), 1e-6)
    if weight is None or eps is None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = _probe_rows(torch.randn(6, weight.shape[0], generator=gen, dtype=torch.float64) + 0.5, eps)
    w = torch.rand(weight.shape[0], generator=gen, dtype=torch.float64) - 0.5
    found = _run_probe(module, {"weight": w}, x)
    if found is None:
        return None
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if _matches(found, normed * (offset + w)):
            return offset, eps
    return None


def _probe_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The probe input of a norm with epsilon ``eps`` from six float64 rows of an
    ordinary size (about 1): rows 0-1 as they are, rows 2-3 scaled by ``sqrt(eps)``
    and rows 4-5 by ``sqrt(eps) / 10`` (the mean square, or variance, about ``eps``
    and a hundredth of it: there ``eps`` decides the result), then rounded to float32
    (what the module is run in), so that the float64 reference sees the very input
    the module sees.

    Whole rows are scaled, offset included: a small deviation around a large mean
    (``0.5 + 1e-6 * noise``) is not representable in float32 at small ``eps``.
    ``sqrt(eps)`` is taken at least 1e-6 (``eps`` may be 0): the squares stay far
    above float32's subnormal range, and a smaller ``eps`` is still in the reference."""
    scale = math.sqrt(max(eps, 1e-12))
    x = x.clone()
    x[2:4] *= scale
    x[4:6] *= scale / 10
    return x.to(torch.float32).to(torch.float64)


def norm_probe_finding(module: nn.Module) -> str:
    """What :func:`rms_norm_form` and :func:`layer_norm_form` found on ``module``, in
    words, for a message refusing per-row parameters there: the form it matched, or
    why neither matched (its parameters, its epsilon, or its output on the probe)."""
    weight = getattr(module, "weight", None)
    names = sorted(n for n, _ in module.named_parameters())
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return f"no floating-point weight (parameters {names})"
    if weight.is_meta:
        return "its weight on the meta device"
    if weight.dim() != 1:
        return f"a {list(weight.shape)} weight, not one value per feature"
    if set(names) not in ({"weight"}, {"weight", "bias"}):
        return f"parameters {names}, not a weight and maybe a bias"
    if ("bias" in names) != isinstance(_base_bias(module), torch.Tensor):
        return "a bias attribute that is not its bias parameter"
    rms, layer = rms_norm_form(module), layer_norm_form(module)
    if rms is not None:
        return f"an RMSNorm (x / rms(x) * {'(1 + w)' if rms[0] else 'w'}, eps {rms[1]:g})"
    if layer is not None:
        return f"a LayerNorm ((x - mean) / std * w + b, eps {layer:g})"
    eps = [_norm_eps(module, ("eps", "variance_epsilon"), 1e-5)]
    eps.append(_norm_eps(module, ("variance_epsilon", "eps"), 1e-6))
    if None in eps:
        return "an epsilon (eps or variance_epsilon) that is not a number >= 0"
    shown = " / ".join(sorted({f"{e:g}" for e in eps}))
    return (
        "an output on a probe input that is neither x / rms(x) * w, x / rms(x) * (1 + w) "
        f"nor (x - mean) / std * w + b, with its eps ({shown})"
    )


def _norm_weight(module: nn.Module, *allowed: set[str]) -> torch.Tensor | None:
    """The module's 1-D float ``weight`` when its parameters are one of ``allowed``."""
    weight = getattr(module, "weight", None)
    names = {n for n, _ in module.named_parameters()}
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 1
        or not weight.is_floating_point()
        or weight.is_meta
        or names not in allowed
        or ("bias" in names) != isinstance(getattr(module, "bias", None), torch.Tensor)
    ):
        return None
    return weight


def _norm_eps(module: nn.Module, names: tuple[str, str], default: float) -> float | None:
    """The module's epsilon (the first of ``names`` it has), or None when not a number >= 0."""
    eps = getattr(module, names[0], getattr(module, names[1], default))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return None
    return float(eps)


def _run_probe(
    module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor | None:
    """``module(x)`` with its parameters replaced by ``params`` (float64 values, run
    in float32 on the module's device), as float64 on the CPU; None when it fails
    or returns something else than a tensor of ``x``'s shape."""
    device = module.weight.device
    try:
        with torch.no_grad():
            found = torch.func.functional_call(
                module,
                {k: v.to(device=device, dtype=torch.float32) for k, v in params.items()},
                (x.to(device=device, dtype=torch.float32),),
            )
    except Exception:
        return None
    if not isinstance(found, torch.Tensor) or found.shape != x.shape:
        return None
    return found.detach().double().cpu()


def _matches(found: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float32 rounding (relative to each value and the largest)."""
    return bool(((found - want).abs() <= 1e-5 * (want.abs() + want.abs().max())).all())


class RowRMSNorm(TenantModule):
    """An RMSNorm (LlamaRMSNorm and kin, Gemma's) with per-tenant weights gathered per row.

    The arithmetic is the base module's formula, found by :func:`rms_norm_form`:
    LlamaRMSNorm's float32 ``x * rsqrt(mean(x^2) + eps)``, then the weight in
    the input dtype; Gemma's ``(normed * (1 + weight)).to(dtype)`` in float32. A
    row's result is the tenant's own norm to float32 rounding. A module matching
    neither formula is refused (QDeltaError).
    """

    def __init__(self, base: nn.Module, route: Route) -> None:
        super().__init__(base, route)
        form = rms_norm_form(base)
        if form is None:
            raise QDeltaError(
                f"{type(base).__name__}: expected an RMSNorm computing x / rms(x) * weight "
                "or * (1 + weight) (checked on a probe input), found another formula"
            )
        self.offset, self.eps = form
        self._rows_cache: tuple | None = None
        self._stacked: torch.Tensor | None = None  # [tenants, dim]

    def add(self, name: str, params: dict[str, torch.Tensor]) -> None:
        _check_new(self, name)
        # All or nothing: the new stack is made before anything of this module changes.
        self._stacked = _grown(self._stacked, params["weight"])
        self._names.append(name)

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        shrunk = _shrunk(self._stacked, self._names.index(name))  # may fail: nothing changed
        self._drop_name(name)
        self._stacked = shrunk

    def _row_weights(self, local: torch.Tensor) -> torch.Tensor:
        """Each row's factor (its norm weight; ``1 + weight`` in float32 for Gemma's
        form); gathered once per routed batch (decode steps reuse it)."""
        stacked, weight = self._stacked, self.base.weight
        versions = (_version(local), _version(stacked), _version(weight))
        cached = self._rows_cache
        if (
            cached is not None
            and cached[0] is local
            and cached[1] is stacked
            and cached[2] is weight
            and cached[3] == versions
            and None not in versions
        ):
            return cached[4]
        rows = torch.where((local >= 0)[:, None], stacked[local.clamp(min=0)], weight)
        if self.offset:
            rows = self.offset + rows.to(torch.float32)
        self._rows_cache = (local, stacked, weight, versions, rows)
        return rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.routed_rows(hidden)
        if local is None:
            return self.base(hidden)
        rows = self._row_weights(local)
        if (
            hidden.dtype == torch.float32
            and rows.dtype == torch.float32
            and not hidden.is_cuda
            and not (torch.is_grad_enabled() and (hidden.requires_grad or rows.requires_grad))
            and cpu.ISA != "portable"
        ):
            # One Rust call (src/rmsnorm.rs) instead of the torch ops below.
            out = torch.empty(hidden.shape, dtype=torch.float32)
            cpu.rms_norm_rows(hidden if hidden.is_contiguous() else hidden.contiguous(),
                              rows, self.eps, out)  # fmt: skip
            return out
        dtype = hidden.dtype
        # The base's formula, x * rsqrt(mean(x^2) + eps) in float32, as one op:
        # at decode sizes each torch op costs microseconds whatever its size.
        h = F.rms_norm(hidden.to(torch.float32), (hidden.shape[-1],), eps=self.eps)
        rows = rows.view(rows.shape[0], *(1,) * (hidden.dim() - 2), -1)
        if self.offset:  # Gemma: (normed * (1 + w)) in float32, then the input dtype
            return (h * rows).to(dtype)
        return rows * h.to(dtype)


def layer_norm_form(module: nn.Module) -> float | None:
    """``eps`` when ``module(x)`` is ``F.layer_norm(x, (d,), weight, bias, eps)`` (mean
    subtracted, divided by the standard deviation, times ``weight`` plus ``bias``;
    ``nn.LayerNorm`` and kin, with or without a bias); else None.

    Decided from the module's output on a probe input with probe float32 weight and
    bias (``torch.func.functional_call``), to float32 rounding: rows of an ordinary
    size, and rows scaled so that their variance is about ``eps`` and a hundredth
    of it (where ``eps`` decides the result; see :func:`_probe_rows`). An RMSNorm
    (no mean taken away) does not match, nor a norm with another ``eps``.
    """
    weight = _norm_weight(module, {"weight"}, {"weight", "bias"})
    eps = _norm_eps(module, ("eps", "variance_epsilon"), 1e-5)
    if weight is None or eps is None:
        return None
    dim = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = _probe_rows(torch.randn(6, dim, generator=gen, dtype=torch.float64) * 2 + 0.5, eps)
    probe = {"weight": torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5}
    bias = torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5
    if isinstance(_base_bias(module), torch.Tensor):
        probe["bias"] = bias
    found = _run_probe(module, probe, x)
    if found is None:
        return None
    want = F.layer_norm(x, (dim,), probe["weight"], probe.get("bias"), eps)
    return eps if _matches(found, want) else None


class RowLayerNorm(_WeightsAndBiases, TenantModule):
    """A LayerNorm (``nn.LayerNorm`` and kin: GPT-2, GPT-NeoX, OPT) with per-tenant
    weights and biases gathered per row.

    Every row is ``F.layer_norm(x, (d,), eps=eps) * w_row + b_row`` in float32
    (float64 for float64 input), then the input dtype (what ``nn.LayerNorm`` computes, to float32 rounding); ``eps``
    is the base module's, found by :func:`layer_norm_form`. A tenant may change
    the weight, the bias or both; what it leaves is the base's.

    The tenants' weights and biases are stacked once per change of the tenants or
    of the base's own (a routed batch then gathers its rows: O(batch), not
    O(tenants)); a tenant's tensors are the module's own (MultiTenantModel passes
    copies): change one by removing and adding the tenant again.
    """

    def __init__(self, base: nn.Module, route: Route) -> None:
        super().__init__(base, route)
        eps = layer_norm_form(base)
        if eps is None:
            raise QDeltaError(
                f"{type(base).__name__}: expected a LayerNorm computing (x - mean) / std * "
                "weight (+ bias) (checked on a probe input), found another formula"
            )
        self.eps = eps
        self._init_lists()
        self._rows_cache: tuple | None = None
        # (compute dtype, base weight, base bias, then what _tables returns).
        self._tables_cache: tuple | None = None

    def _forget(self) -> None:
        self._rows_cache = None

    def add(self, name: str, params: dict[str, torch.Tensor]) -> None:
        super().add(name, params)
        self._edit_tables(lambda table, row: stacks.appended(table, row), len(self._weights) - 1)

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._names:
            return
        i = self._names.index(name)
        super().remove(name)
        if not self._names:
            self._tables_cache = None
            return
        # The lists' last entry moved into i: the tables' last row moves into i + 1.
        self._edit_tables(lambda table, row: stacks.without(table, i + 1), i)

    def _edit_tables(self, edit: Callable, i: int) -> None:
        """The tables (if made) after one tenant came or left: ``edit(table, row)``
        with tenant ``i``'s row, so a load costs its own row, not every tenant's. A
        failure drops them (they are made again when next used)."""
        cached = self._tables_cache
        if cached is None:
            return
        ct, weight, bias = cached[:3]
        try:
            with torch.inference_mode(False), torch.no_grad():
                edited = ()
                for base, own, table, live in (
                    (weight, self._weights, *cached[3:5]),
                    (bias, self._biases, *cached[5:7]),
                ):
                    if table is None:
                        edited += (None, None)
                        continue
                    entry = own[i] if i < len(own) else base
                    row = entry.detach().to(ct)
                    flag = torch.tensor(entry is base, device=live.device)
                    edited += (edit(table, row), edit(live, flag))
        except BaseException as error:
            self._tables_cache = None  # rows may have moved in place: made again
            if not isinstance(error, Exception):
                raise
            return
        self._tables_cache = (ct, weight, bias, *edited)

    def derived_tensors(self) -> list[torch.Tensor]:
        cached = self._tables_cache
        return [] if cached is None else [t for t in cached[3:] if t is not None]

    def _tables(self) -> tuple:
        """``(weights, live_w, biases, live_b)``: every tenant's weight (bias) stacked
        ``[T + 1, d]`` in the compute dtype, entry 0 the base's, and ``[T + 1]``
        where that entry is the base's own tensor: those rows read it live, so a
        base checkpoint loaded later and gradients reach it. Made again only when
        the tenants change (their tensors carry no gradient: the module's own)."""
        weight, bias = self.base.weight, _base_bias(self.base)
        ct = torch.promote_types(weight.dtype, torch.float32)
        cached = self._tables_cache
        if cached is not None and cached[0] == ct and cached[1] is weight and cached[2] is bias:
            return cached[3:]

        def stacked(base: torch.Tensor, own: list) -> tuple[torch.Tensor, torch.Tensor]:
            table = torch.stack([base, *own]).to(ct)
            live = torch.tensor([True, *(t is base for t in own)], device=base.device)
            return table, live

        # Outside inference mode: the tables outlive the batch (versioned tensors).
        with torch.inference_mode(False), torch.no_grad():
            tables = stacked(weight, self._weights)
            tables += (None, None) if bias is None else stacked(bias, self._biases)
        self._tables_cache = (ct, weight, bias, *tables)
        return tables

    def _row_affine(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's weight and bias ``[B, d]`` (base rows: the base's), float32 or
        float64; gathered once per routed batch (decode steps reuse them): O(batch),
        not O(tenants)."""
        tables = self._tables()
        weight, bias = self.base.weight, _base_bias(self.base)
        versions = (_version(local), _version(weight), None if bias is None else _version(bias))
        cached = self._rows_cache
        if (
            cached is not None
            and cached[0] is local
            and cached[1] is tables[0]
            and cached[2] == versions
            and None not in versions[:2]
            and (bias is None or versions[2] is not None)
        ):
            return cached[3]
        index = local + 1  # -1 (base): entry 0

        def rows(base: torch.Tensor, table: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
            own = table[index]
            return torch.where(live[index][:, None], base.to(own.dtype), own)

        rows_w = rows(weight, tables[0], tables[1])
        rows_b = None if bias is None else rows(bias, tables[2], tables[3])
        self._rows_cache = (local, tables[0], versions, (rows_w, rows_b))
        return rows_w, rows_b

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.routed_rows(hidden)
        if local is None:
            return self.base(hidden)
        rows_w, rows_b = self._row_affine(local)
        # float32 at least (what nn.LayerNorm accumulates in), float64 for float64.
        ct = torch.promote_types(hidden.dtype, torch.float32)
        shape = (rows_w.shape[0], *(1,) * (hidden.dim() - 2), -1)
        h = F.layer_norm(hidden.to(ct), (hidden.shape[-1],), eps=self.eps)
        h = h * rows_w.view(shape).to(ct)
        if rows_b is not None:
            h = h + rows_b.view(shape).to(ct)
        return h.to(hidden.dtype)


class RowLinear(_WeightsAndBiases, _TwoForms):
    """nn.Linear (or a GPT-2 ``Conv1D``, weight ``[in, out]``) whose weight and/or bias
    are replaced per tenant at full precision (a fine-tune's lm_head, for instance)."""

    def __init__(self, base: nn.Module, route: Route) -> None:
        super().__init__(base, route)
        self._transposed = is_conv1d(base)
        self._out_features = int(base.weight.shape[1 if self._transposed else 0])
        self._init_lists()
        self._groups_cache: tuple | None = None
        # The one-call form of the last decode-sized batch (see _rowwise).
        self._plan: tuple | None = None

    def _forget(self) -> None:
        self._plan = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        self._plan = None
        return super()._apply(fn, recurse)

    def _groups(self, local: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(local tenant, its batch rows)`` for every distinct tenant of the batch;
        found once per routed batch (``local`` is the same tensor every decode step)."""
        cached = self._groups_cache
        if cached is not None and cached[0] is local and cached[1] == _version(local):
            return cached[2]
        groups = [(t, (local == t).nonzero().squeeze(1)) for t in torch.unique(local).tolist()]
        if _version(local) is not None:
            self._groups_cache = (local, _version(local), groups)
        return groups

    def _rowwise(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
        """A decode-sized float32 batch as one Rust call (src/rowwise.rs: each row
        its own weight, each weight read once), or None where it does not apply
        (no AVX-512, other dtypes, gradients, more than FUSED_MAX_ROWS rows).
        Its arguments are bound once per routed batch and re-bound whenever the
        rows, the tensors or their storage change."""
        from qdelta.multitenant import FUSED_MAX_ROWS

        if self._transposed:  # src/rowwise.rs takes [out, in] weights
            return None
        tensors = [self.base.weight, self.base.bias, *self._weights, *self._biases]
        storage = tuple(0 if t is None else t.data_ptr() for t in tensors)
        plan = self._plan
        if not (
            plan is not None
            and plan[0] is local
            and plan[1] == _version(local)
            and plan[2] == x.shape[:-1]
            and plan[3] == storage
        ):
            weights = [self.base.weight, *self._weights]
            biases = [self.base.bias, *self._biases]
            usable = (
                cpu.ISA == "avx512"
                and _version(local) is not None
                and x.shape[:-1].numel() <= FUSED_MAX_ROWS
                and all(
                    t is None or (t.dtype == torch.float32 and t.is_contiguous() and not t.is_cuda)
                    for t in weights + biases
                )
            )
            arrays = None
            if usable:
                weights_np = [w.detach().numpy() for w in weights]
                biases_np = [None if b is None else b.detach().numpy() for b in biases]
                # Local -1 (base) is entry 0; one index per row of x.
                index = (local + 1).repeat_interleave(x[0].numel() // x.shape[-1])
                arrays = (weights_np, biases_np, index.numpy())
            plan = self._plan = (local, _version(local), x.shape[:-1], storage, arrays)
        arrays = plan[4]
        if arrays is None or x.dtype != torch.float32 or x.is_cuda:
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
        ):
            return None
        out = torch.empty(*x.shape[:-1], self._out_features, dtype=torch.float32)
        cpu.rowwise_linear(x if x.is_contiguous() else x.contiguous(), *arrays, out)
        return out

    def _torch_form(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self._out_features)
        # One matmul per distinct tenant in the batch: each tenant's weight is
        # read once, which is the least traffic a full-precision head allows.
        for t, rows in self._groups(local):
            if t < 0:
                w, b = self.base.weight, self.base.bias
            else:
                w, b = self._weights[t], self._biases[t]
            out[rows] = F.linear(x[rows], w.T if self._transposed else w, b)
        return out


class RoutedLinear(TenantModule):
    """A linear layer (nn.Linear or GPT-2's ``Conv1D``) with packed per-tenant weight deltas: MultiTenantLinear
    keyed by model slot and fed the row slots of the forward in flight (plus
    optional per-tenant full-precision biases)."""

    def __init__(self, base: nn.Module, route: Route) -> None:
        from qdelta.multitenant import MultiTenantLinear

        super().__init__(base, route)
        self.layer = MultiTenantLinear(base)
        self._slot_by_name: dict[str, int] = {}
        # Each tenant's own full-precision bias, as given: not a change relative to
        # the base's bias, which a base checkpoint loaded later may move.
        self._biases: dict[str, torch.Tensor] = {}
        # (base bias, its version and storage, [slots + 1, out] change per slot).
        self._change_cache: tuple | None = None

    def add(
        self, name: str, packed: PackedLayer, params: dict[str, torch.Tensor], slot: int
    ) -> None:
        _check_new(self, name)
        self.layer.add_tenant(slot, packed)  # the last step that may fail
        self._names.append(name)
        self._slot_by_name[name] = slot
        if "bias" in params:
            self._biases[name] = params["bias"]

    def remove(self, name: str) -> None:
        """Drop tenant ``name`` (nothing to do for a name never added)."""
        if name not in self._slot_by_name:
            return
        slot = self._slot_by_name.pop(name)
        self.layer.remove_tenant(slot)
        self._names.remove(name)  # their order is not the local index here: the slot is
        if self._mapped.pop(name, None) is not None:
            self._write_map({slot: -1})
        if self._biases.pop(name, None) is not None:
            self._write_change(slot, None)

    def _tenant_tensors(self) -> list[torch.Tensor]:
        return [self.layer.planes, self.layer.scales, *self._biases.values()]

    def derived_tensors(self) -> list[torch.Tensor]:
        cached = self._change_cache
        return [] if cached is None else [cached[3]]

    def local_index(self, name: str) -> int | None:
        # MultiTenantLinear's ids are the model slots themselves.
        return self._slot_by_name.get(name)

    def _local_indices(self) -> dict[str, int]:
        return self._slot_by_name

    def stack_slot(self, name: str) -> int:
        """Where a loaded tenant's planes sit in the layer's stack now (the last
        tenant's move into the row of one that leaves)."""
        return self.layer._slots[self._slot_by_name[name]]

    def set_slots(self, slot_of: dict[str, int], capacity: int) -> None:
        super().set_slots(slot_of, capacity)
        self._change_cache = None  # a whole rebuild: made again, whole, when next used

    def map_slot(self, name: str, slot: int, capacity: int) -> None:
        super().map_slot(name, slot, capacity)
        if name in self._biases:
            self._write_change(slot, self._biases[name])

    def _slots_changed(self) -> None:
        cached = self._change_cache
        if cached is not None and cached[3].shape[0] < self._slot_map.shape[0]:
            self._change_cache = None  # the map grew past it: made again when next used

    def _write_change(self, slot: int, own: torch.Tensor | None) -> None:
        """Slot ``slot``'s row of the bias change table, if there is one: ``own`` less
        the base's bias (zero for None): one row, not the table again per load."""
        cached = self._change_cache
        if cached is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            row = cached[3][slot]
            if own is None:
                row.zero_()
            else:
                row.copy_(own - cached[0])

    def _bias_change(self) -> torch.Tensor | None:
        """``[slots + 1, out]`` (the slot map's length): row s is slot s's bias minus
        the base's bias as it is now (zero for tenants keeping the base's; the last
        row, index -1, is the base rows'). Made again when the base bias changes or
        the map outgrows it; a load or a removal writes its own row."""
        if not self._biases:
            return None
        bias = self.base.bias
        version = _version(bias)
        cached = self._change_cache
        if (
            cached is not None
            and cached[0] is bias
            and cached[1:3] == (version, bias.data_ptr())
            and version is not None
        ):
            return cached[3]
        # Outside inference mode (a versioned tensor, as the other per-batch shortcuts),
        # and no gradient (leaving inference mode turns it back on).
        with torch.inference_mode(False), torch.no_grad():
            rows = self._slot_map.shape[0]  # > every mapped slot + 1: row -1 is no slot's
            change = torch.zeros(rows, self.layer.out_features, dtype=bias.dtype)
            change = change.to(bias.device)
            for name, own in self._biases.items():
                change[self._slot_by_name[name]] = own - bias
        self._change_cache = (bias, version, bias.data_ptr(), change)
        return change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_rows()
        if local is not None:
            local = self._rows_of(x, local)
            if local is None:
                return self.base(x)
        else:
            local = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        # Straight to forward: the layer is internal (no hooks of its own), and
        # nn.Module's call machinery costs a fifth of a decode-sized call.
        out = self.layer.forward(x, local)
        change = self._bias_change()
        if change is not None:
            bias = change[local]
            out = out + bias.view(x.shape[0], *(1,) * (x.dim() - 2), -1).to(out.dtype)
        return out
