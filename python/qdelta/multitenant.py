"""One shared base linear layer serving many fine-tunes in one batch.

Every row (or sequence) of a batch names its tenant; the base matmul is done
once for the whole batch and each row adds its own tenant's packed delta
through one kernel call (:func:`qdelta.kernels.multi_tenant_delta_matmul`),
so the hot path has no Python loop over tenants or rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from qdelta import kernels, stacks
from qdelta.delta import PackedLayer
from qdelta.errors import (
    DTypeError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnknownTenantError,
)
from qdelta.kernels import Backend, cpu
from qdelta.locking import SerializedCalls, serialized
from qdelta.nn import _tracing, linear_shape, plain_linear
from qdelta.sources import is_conv1d

TenantKey = str | int

# Marks an id with no tenant in the id -> slot table.
_NO_SLOT = -2
_MAX_ID = 2**63 - 1

#: Rows up to which the layer runs base matmul and deltas as one Rust call
#: (src/fused.rs: one pass, no separate BLAS call) on CPUs with AVX-512; from
#: there on torch's GEMM does the base better. Measured on the zoo's shapes
#: and 1024x1024 (docs/CPU_KERNEL.md).
FUSED_MAX_ROWS = 16


class MultiTenantLinear(SerializedCalls, nn.Module):
    """``y[r] = base_layer(x[r]) + sum_p alpha[t_r, p] * x[r] @ S[t_r, p]^T``.

    ``base_layer`` is shared, not copied. The loaded tenants' planes are
    stacked into one int32 buffer ``planes [T, P, N, W]`` with row scales
    ``scales [T, P, N]`` (matrix scales are broadcast to rows: 1/W of the
    plane bytes). Tenants with fewer than ``P`` planes are padded with zero
    planes of zero scale, which the kernels skip.

    Tenants are keyed by a name or a non-negative int id; ``forward`` takes
    the int ids (:meth:`tenant_id` maps a name to its id), ``-1`` = base only.
    """

    def __init__(self, base_layer: nn.Module, *, backend: Backend = "auto") -> None:
        super().__init__()
        self._init_lock()  # calls from several threads take turns (qdelta.locking)
        if not isinstance(base_layer, nn.Linear) and not is_conv1d(base_layer):
            raise DTypeError(
                "base_layer: expected a torch.nn.Linear or a transformers Conv1D, found "
                f"{type(base_layer).__name__}"
            )
        kernels.check_backend(backend)
        self.base_layer = base_layer
        # A Conv1D stores its weight [in, out]; its deltas still pack [out, in].
        self.transposed = is_conv1d(base_layer)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.backend: Backend = backend
        words = -(-self.in_features // 32)
        device = base_layer.weight.device
        self.register_buffer(
            "planes",
            torch.zeros(0, 0, self.out_features, words, dtype=torch.int32, device=device),
            persistent=False,
        )
        self.register_buffer(
            "scales",
            torch.zeros(0, 0, self.out_features, dtype=torch.float32, device=device),
            persistent=False,
        )
        # Loaded ids, sorted, and their stack slots: a lookup by binary search, so an
        # id's size costs nothing (ids may be any int64 >= 0, e.g. hashes).
        self.register_buffer(
            "known_ids", torch.zeros(0, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer(
            "known_slots", torch.zeros(0, dtype=torch.int64, device=device), persistent=False
        )
        self._names: dict[str, int] = {}  # name -> id
        self._slots: dict[int, int] = {}  # id -> slot in the stacks
        self._bits: dict[int, int] = {}  # id -> planes it really has
        # Per-call work done once: the CPU kernel's view of the stack, and the
        # row slots of the last ids tensor (keyed by identity and version).
        self._prepared: cpu.PreparedStack | None = None
        # (key, (slots, slots array)) in one attribute, replaced whole.
        self._slots_cache: tuple[tuple, tuple[torch.Tensor, np.ndarray | None]] | None = None
        # The fused call of the last decode-sized batch (see _FusedPlan).
        self._plan: _FusedPlan | None = None

    # -- tenants ---------------------------------------------------------------

    @property
    @serialized
    def tenants(self) -> dict[TenantKey, int]:
        """Every loaded tenant: key (name, or the id itself) -> id."""
        named = set(self._names.values())
        keys: dict[TenantKey, int] = dict(self._names)
        keys.update({i: i for i in self._slots if i not in named})
        return keys

    @serialized
    def tenant_id(self, key: TenantKey) -> int:
        """The id ``forward`` takes for a loaded tenant."""
        if isinstance(key, str):
            if key not in self._names:
                raise UnknownTenantError(
                    f"tenant {key!r}: not loaded (loaded: {sorted(self._names) or 'none'})"
                )
            return self._names[key]
        i = self._as_id(key)
        if i not in self._slots:
            raise UnknownTenantError(
                f"tenant id {i}: not loaded (loaded ids: {sorted(self._slots) or 'none'})"
            )
        return i

    @serialized
    def add_tenant(self, key: TenantKey, layer: PackedLayer) -> int:
        """Loads (or replaces) one tenant's delta of this layer; returns its id."""
        if not isinstance(layer, PackedLayer):
            raise DTypeError(f"layer: expected a qdelta.PackedLayer, found {type(layer).__name__}")
        if (
            layer.shape != (self.out_features, self.in_features)
            or layer.transposed != self.transposed
        ):
            kind = "Conv1D, transposed" if self.transposed else "Linear, not transposed"
            raise ShapeError(
                f"tenant {key!r}: expected a [{self.out_features}, {self.in_features}] delta "
                f"({kind}) for this layer, found {list(layer.shape)}"
                f"{' transposed' if layer.transposed else ' not transposed'}"
            )
        if not np.isfinite(layer.scales).all():  # checked when built; arrays stay mutable
            raise NonFiniteError(f"tenant {key!r}: expected finite scales, found NaN/Inf")
        if isinstance(key, str):
            tid = self._names.get(key)
            if tid is None:
                # Never a removed name's id: a request still holding it must be refused,
                # not served by the next tenant added.
                tid = self.__dict__.get("_next_name_id", 0)
                while tid in self._slots:
                    tid += 1
        else:
            tid = self._as_id(key)
            owner = next((n for n, i in self._names.items() if i == tid), None)
            if owner is not None:
                raise QDeltaError(
                    f"tenant id {tid}: expected a free id or one added by id, found the id "
                    f"of tenant {owner!r} (replace that tenant by its name)"
                )
        # All or nothing: a failure on the way (out of device memory) leaves the layer
        # as it was, with no name pointing at a half-loaded slot.
        before = (dict(self._names), dict(self._bits), dict(self._slots), self.planes, self.scales)
        try:
            self._store_tenant(key, tid, layer)
        except BaseException:
            self._names, self._bits, self._slots, self.planes, self.scales = before
            self._rebuild_table()
            raise
        if isinstance(key, str):
            self.__dict__["_next_name_id"] = max(self.__dict__.get("_next_name_id", 0), tid + 1)
        return tid

    def _store_tenant(self, key: TenantKey, tid: int, layer: PackedLayer) -> None:
        device = self.planes.device
        planes = _read_only_tensor(np.ascontiguousarray(layer.planes).view(np.int32)).to(device)
        scales = _read_only_tensor(np.ascontiguousarray(layer.scales)).to(device)
        if scales.dim() == 1:
            scales = scales[:, None].expand(-1, self.out_features)
        if isinstance(key, str):
            self._names[key] = tid
        self._bits[tid] = layer.bits
        self._resize_planes(max(self._bits.values()))
        depth = self.planes.shape[1]
        planes = _pad_planes(planes, depth)[None]
        scales = _pad_planes(scales.to(self.scales.dtype), depth)[None]
        if tid in self._slots:
            slot = self._slots[tid]
            self.planes[slot : slot + 1] = planes
            self.scales[slot : slot + 1] = scales
        else:
            self._slots[tid] = self.planes.shape[0]
            self.planes = stacks.appended(self.planes, planes[0])
            self.scales = stacks.appended(self.scales, scales[0])
        self._rebuild_table()

    @serialized
    def remove_tenant(self, key: TenantKey) -> None:
        """Unloads a tenant; rows that still name it are then refused."""
        tid = self.tenant_id(key)
        slot = self._slots[tid]
        # The new stacks first: a failure there (out of memory) changes nothing. The
        # two buffers are always allocated alike (same rows), so both shrink into new
        # buffers (which may fail, before any change) or both move one row in place.
        planes, scales = stacks.without(self.planes, slot), stacks.without(self.scales, slot)
        del self._slots[tid], self._bits[tid]
        self._names = {n: i for n, i in self._names.items() if i != tid}
        last = len(self._slots)  # its tenant moved into the freed row (qdelta.stacks)
        self._slots = {i: slot if s == last else s for i, s in self._slots.items()}
        self.planes, self.scales = planes, scales
        self._resize_planes(max(self._bits.values(), default=0))
        self._rebuild_table()

    # -- forward -----------------------------------------------------------------

    @serialized
    def forward(self, x: torch.Tensor, tenant_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``x``: ``[B, S, K]`` with one tenant id per sequence, or ``[M, K]`` with one per row."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"x: expected [batch, seq, {self.in_features}] or [rows, {self.in_features}], "
                f"found {list(x.shape)}"
            )
        if _tracing():
            return self._traced_forward(x, tenant_ids)
        plan = self._plan
        if plan is not None and plan.serves(self, tenant_ids, x):
            return plan(x)
        slots, slots_array = self._row_slots(tenant_ids, x)
        plan = self._plan = _FusedPlan.make(self, tenant_ids, slots_array, x)
        if plan is not None:
            return plan(x)
        y = self.base_layer(x)
        if not self._slots:
            return y
        x2 = x.reshape(-1, self.in_features)
        if self._adds_in_place(x2, y, slots_array):
            # The Rust kernel adds each row's delta straight into the base output.
            self._prepared_stack().add_into(x2, slots_array, y.view(-1, self.out_features))
            return y
        delta = kernels.multi_tenant_delta_matmul(
            x2, self.planes, self.scales, slots, backend=self.backend
        )
        return y + delta.reshape(y.shape).to(y.dtype)

    def _traced_forward(
        self, x: torch.Tensor, tenant_ids: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """torch ops only (jit.trace / torch.compile record no numpy write): the base
        layer plus the reference delta, no cached slots or plans."""
        y = self.base_layer(x)
        if not self._slots:
            return y
        slots = self._compute_row_slots(tenant_ids, x)
        delta = kernels.multi_tenant_delta_matmul(
            x.reshape(-1, self.in_features), self.planes, self.scales, slots, backend="reference"
        )
        return y + delta.reshape(y.shape).to(y.dtype)

    def _adds_in_place(
        self, x2: torch.Tensor, y: torch.Tensor, slots_array: np.ndarray | None
    ) -> bool:
        """Whether the CPU kernel can add into ``y``: the dispatch rule picks it and
        ``y`` is a float32 contiguous result that needs no gradient."""

        def tenants() -> int:
            return 1 if slots_array is None else len(np.unique(slots_array[slots_array >= 0]))

        return (
            y.dtype == torch.float32
            and not y.requires_grad
            and y.is_contiguous()
            and not x2.is_cuda
            and kernels._use_cpu(x2, self.scales, self.backend, self.out_features, tenants)
        )

    def _prepared_stack(self) -> cpu.PreparedStack:
        """The stack as the CPU kernel's arrays, rebuilt only after the stack changed."""
        prepared = self._prepared
        if prepared is None or not prepared.current(self.planes, self.scales):
            prepared = self._prepared = cpu.PreparedStack(self.planes, self.scales)
        return prepared

    def _row_slots(
        self, tenant_ids: torch.Tensor | Sequence[int], x: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Tenant ids (one per sequence or row) -> stack slots per row of x, as a tensor
        on x's device and (on the CPU) an int64 array. Remembered for the last ids
        tensor: decode passes the same one every step."""
        rows = x.shape[:-1]
        cached = self._slots_cache
        key = cached[0] if cached is not None else None
        if (
            key is not None
            and key[0] is tenant_ids
            and key[1] == rows
            and key[2] is self.known_ids
            and key[3] is not None
            and key[3] == cpu._version(tenant_ids)
            and key[4] == x.device
            and _same_ids(tenant_ids, key[5])
        ):
            return cached[1]
        slots = self._compute_row_slots(tenant_ids, x)
        array = slots.numpy() if slots.device.type == "cpu" else None
        if isinstance(tenant_ids, torch.Tensor):
            version = cpu._version(tenant_ids)
            key = (tenant_ids, rows, self.known_ids, version, x.device, _ids_snapshot(tenant_ids))
            self._slots_cache = (key, (slots, array))
        return slots, array

    def _compute_row_slots(
        self, tenant_ids: torch.Tensor | Sequence[int], x: torch.Tensor
    ) -> torch.Tensor:
        ids = tenant_ids if isinstance(tenant_ids, torch.Tensor) else _ids_tensor(tenant_ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise DTypeError(f"tenant_ids: expected an integer tensor (int64), found {ids.dtype}")
        what = "sequence" if x.dim() == 3 else "row"
        if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise ShapeError(
                f"tenant_ids: expected one id per {what} of x, shape [{x.shape[0]}], "
                f"found shape {list(ids.shape)}"
            )
        ids = ids.to(device=self.known_ids.device, dtype=torch.int64)
        keys = self.known_ids
        if keys.numel():
            at = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
            slots = torch.where(keys[at] == ids, self.known_slots[at], _NO_SLOT)
        else:
            slots = torch.full_like(ids, _NO_SLOT)
        slots = torch.where(ids == -1, -1, slots)
        bad = torch.nonzero(slots == _NO_SLOT)
        if bad.numel():
            r = int(bad[0, 0])
            raise UnknownTenantError(
                f"tenant_ids: {what} {r} names tenant id {int(ids[r])}, which is not loaded "
                f"(loaded ids: {sorted(self._slots) or 'none'}; -1 = base only)"
            )
        if x.dim() == 3:
            slots = slots.repeat_interleave(x.shape[1])
        return slots.to(x.device).contiguous()

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def _as_id(key: object) -> int:
        if isinstance(key, bool) or not isinstance(key, int | np.integer):
            raise DTypeError(
                f"tenant: expected a name (str) or an id (int >= 0), found {type(key).__name__}"
            )
        if not 0 <= key <= _MAX_ID:
            raise QDeltaError(
                f"tenant id: expected an int in [0, 2**63) (-1 means base only), found {key}"
            )
        return int(key)

    def _resize_planes(self, depth: int) -> None:
        """Pads with zero planes, or drops planes no tenant has, to ``depth`` planes."""
        self.planes = _pad_planes(self.planes.transpose(0, 1), depth).transpose(0, 1).contiguous()
        self.scales = _pad_planes(self.scales.transpose(0, 1), depth).transpose(0, 1).contiguous()

    @serialized
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # Moves and casts replace the stack tensors: the fused plan's views are stale.
        self._plan = None
        # Scales are kernel data (float32 in every kernel), not the model's dtype:
        # .half() / .double() cast the base, the stacks keep their exact values
        # (a cast there and back would round them, and flush the smallest to 0).
        scales = self._buffers.pop("scales")
        try:
            result = super()._apply(fn, recurse)
        finally:
            target = fn(scales[:0]).device  # where fn moves tensors (its dtype ignored)
            self._buffers["scales"] = scales.to(target)
        return result

    def _rebuild_table(self) -> None:
        self._plan = None
        # Through numpy: a load rebuilds this per layer, a Python loop over T tenants.
        count = len(self._slots)
        ids = np.fromiter(self._slots.keys(), dtype=np.int64, count=count)
        slots = np.fromiter(self._slots.values(), dtype=np.int64, count=count)
        order = np.argsort(ids, kind="stable")
        device = self.planes.device
        self.known_ids = torch.from_numpy(ids[order]).to(device)
        self.known_slots = torch.from_numpy(slots[order]).to(device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tenants={len(self._slots)}, planes={self.planes.shape[1]}, backend={self.backend!r}"
        )


_IdsSnapshot = tuple[int, np.ndarray, bytes]


def _ids_snapshot(ids: torch.Tensor) -> _IdsSnapshot | None:
    """CPU tenant ids as they are now, to see writes that bypass torch's version
    counter (through ``.numpy()`` or ``.data``): the storage address, a zero-copy
    view and its bytes (comparing bytes costs a fraction of a microsecond at decode
    sizes). None on a GPU, where comparing would sync."""
    if ids.device.type != "cpu":
        return None
    view = ids.numpy()
    return ids.data_ptr(), view, view.tobytes()


def _same_ids(ids: torch.Tensor, snapshot: _IdsSnapshot | None) -> bool:
    if snapshot is None:
        return True
    address, view, raw = snapshot
    return ids.data_ptr() == address and view.tobytes() == raw


class _FusedPlan:
    """Base matmul and deltas of a decode-sized batch as one Rust call
    (src/fused.rs), its arguments bound once: decode calls a layer with the
    same tenant ids every step, and re-deriving them costs more than the
    kernel at small model sizes. The plan serves a call only while the ids
    tensor (and its version), the row shape, the tenant stack tensors and the
    base parameters' storage are the ones it was made for; in-place edits of
    the stack or the base are seen through the zero-copy views."""

    __slots__ = (
        "base",
        "bias",
        "bias_param",
        "ids",
        "ids_array",
        "ids_snapshot",
        "k",
        "n",
        "pointers",
        "rows",
        "stack",
        "version",
        "weight",
        "weight_param",
    )  # fmt: skip

    @classmethod
    def make(
        cls,
        layer: MultiTenantLinear,
        tenant_ids: torch.Tensor | Sequence[int],
        slots_array: np.ndarray | None,
        x: torch.Tensor,
    ) -> _FusedPlan | None:
        """A plan for this call, or None when the fused kernel does not apply:
        it needs AVX-512, float32 CPU input of at most FUSED_MAX_ROWS rows, some
        row with a delta, nothing needing gradients, a float32 contiguous base
        that :func:`qdelta.nn.plain_linear` accepts (hooks, subclasses: torch)."""
        if (
            not isinstance(tenant_ids, torch.Tensor)
            or cpu._version(tenant_ids) is None
            or slots_array is None
            or cpu.ISA != "avx512"
            or layer.backend not in ("auto", "cpu")
            or x.dtype != torch.float32
            or slots_array.shape[0] > FUSED_MAX_ROWS
            or not (slots_array >= 0).any()
            or not plain_linear(layer.base_layer)
            or _tracks_grad(layer.base_layer, x)
        ):
            return None
        arrays = cpu.base_arrays(layer.base_layer)
        if arrays is None:
            return None
        plan = cls()
        plan.ids, plan.version, plan.rows = tenant_ids, cpu._version(tenant_ids), x.shape[:-1]
        plan.ids_snapshot = _ids_snapshot(tenant_ids)
        base = plan.base = layer.base_layer
        plan.weight_param, plan.bias_param = base.weight, base.bias
        plan.pointers = _storage(base)
        plan.stack, plan.ids_array = layer._prepared_stack(), slots_array
        plan.weight, plan.bias = arrays
        plan.n, plan.k = layer.out_features, layer.in_features
        return plan

    def serves(self, layer: MultiTenantLinear, tenant_ids: object, x: torch.Tensor) -> bool:
        """Whether this call is the one the plan was made for. The layer drops its
        plan whenever its stack changes; the base is checked here (the plain dict
        lookups are a fraction of nn.Module attribute access, which matters at
        this size)."""
        if (
            tenant_ids is not self.ids
            or x.shape[:-1] != self.rows
            or x.dtype != torch.float32
            or x.is_cuda
        ):
            return False
        base = self.base
        buffers = layer._buffers
        if (
            layer._modules["base_layer"] is not base
            or not self.stack.current(buffers["planes"], buffers["scales"])
            or base._parameters["weight"] is not self.weight_param
            or base._parameters.get("bias") is not self.bias_param
            or cpu._version(tenant_ids) != self.version
            or not _same_ids(tenant_ids, self.ids_snapshot)
        ):
            return False
        weight, bias = self.weight_param, self.bias_param
        if (weight.data_ptr(), 0 if bias is None else bias.data_ptr()) != self.pointers:
            return False
        return plain_linear(base) and not (torch.is_grad_enabled() and _tracks_grad(base, x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*self.rows, self.n, dtype=torch.float32)
        self.stack.fused_linear(x, self.weight, self.bias, self.ids_array, y)
        return y


def _tracks_grad(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether autograd would track this layer's output (then torch does the work)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or layer.weight.requires_grad
        or (layer.bias is not None and layer.bias.requires_grad)
    )


def _storage(layer: nn.Linear) -> tuple[int, int]:
    """Where the base's weight and bias live (a replaced ``.data`` moves them)."""
    bias = layer.bias
    return layer.weight.data_ptr(), 0 if bias is None else bias.data_ptr()


def _ids_tensor(ids: object) -> torch.Tensor:
    """A sequence of int tenant ids as an int64 tensor (empty for no rows)."""
    try:
        seq = list(ids)  # type: ignore[call-overload]
        if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in seq):
            bad = next(i for i in seq if not isinstance(i, int | np.integer) or isinstance(i, bool))
            raise TypeError(f"found {type(bad).__name__} {bad!r}")
        return torch.tensor(seq, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        found = str(err) if str(err).startswith("found") else f"found {type(ids).__name__}"
        raise DTypeError(
            f"tenant_ids: expected an int64 tensor or a sequence of int ids in [-1, 2**63), {found}"
        ) from None


def _pad_planes(t: torch.Tensor, depth: int) -> torch.Tensor:
    """``t[:depth]``, zero-padded along dim 0 when shorter."""
    if t.shape[0] >= depth:
        return t[:depth]
    pad = torch.zeros((depth - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _read_only_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor view of a (possibly read-only, memory-mapped) array that is only read
    and copied into the tenant stack, so torch's non-writable warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)
