"""Drop-in modules: the base layer plus a packed delta, and the in-place verbs
``apply`` / ``unapply`` / ``merge`` that swap them into a user's model.

The wrapper holds the base layer itself (never a copy): one base serves every
delta. The delta's matmul goes through :func:`qdelta.kernels.delta_matmul`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module

from qdelta import kernels
from qdelta.checks import check_tensor_like
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import DTypeError, ModelMismatchError, NonFiniteError, ShapeError
from qdelta.kernels import cpu
from qdelta.kernels.reference import dense_delta
from qdelta.reference import unpack_planes, unpack_signs
from qdelta.sources import is_conv1d, storage_key
from qdelta.store import check_base

_STASH = "_qdelta_replaced"  # model attribute: state-dict name -> the original tensor
# State-dict key of a merged BitDeltaLinear (torch's name for extra state; torch
# never reports it as unexpected). Written only while merged.
_MERGE_KEY = "_extra_state"


def _planes_tensor(planes: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint32 planes as a new int32 tensor on ``device``, owned by the module.

    A copy (P bits per weight, 1/32 of float32 weights per plane): a view would
    let ``load_state_dict`` write into the caller's Delta, or into the read-only
    map of a loaded file (a segfault).
    """
    view = np.ascontiguousarray(planes).view(np.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(view).to(device, copy=True)


def plain_linear(layer: nn.Module) -> bool:
    """Whether calling ``layer`` is exactly ``F.linear``: an ``nn.Linear`` (no
    subclass) without forward hooks or pre-hooks, its own or global. Only then
    may a fused kernel stand in for the call."""
    return (
        type(layer) is nn.Linear
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and not _module._global_forward_hooks
        and not _module._global_forward_pre_hooks
    )


_tracing = kernels.tracing  # only torch ops while jit.trace / torch.compile record


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed in float64, everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def added_delta(weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``weight + d`` in ``weight``'s dtype, added in float64 for float64 weights,
    else in float32 (check it first with :func:`check_delta_fits`)."""
    ct = _compute_dtype(weight)
    return (weight.to(ct) + d.to(device=weight.device, dtype=ct)).to(weight.dtype)


def check_delta_fits(
    weight: torch.Tensor,
    d: torch.Tensor | Callable[[], torch.Tensor],
    name: str,
    *,
    d_bound: float | None = None,
) -> None:
    """Refuse a merge whose weights would leave ``weight``'s dtype range: a merged
    ``inf`` would poison every output, where the unmerged layer computes the same
    model finely. Two reductions decide it almost always (max |w| + max |d|
    within range); only past that bound is the sum itself checked.

    ``d`` may be a function making the delta, with ``d_bound`` >= max |d| known
    without it (a packed layer's :meth:`~qdelta.delta.PackedLayer.abs_bound`): then
    the delta is made only when that bound is not enough."""
    if not weight.is_floating_point() or weight.numel() == 0:
        return
    ct = _compute_dtype(weight)
    top = torch.finfo(weight.dtype).max
    if d_bound is None:
        d = d() if callable(d) else d
        d_bound = float(d.abs().amax().to(ct))
    if float(weight.abs().amax().to(ct)) + d_bound <= top:
        return
    d = d() if callable(d) else d
    merged = added_delta(weight, d)
    bad = ~torch.isfinite(merged) & torch.isfinite(weight)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(
            f"merge {name}: expected weights within {weight.dtype}'s range "
            f"(+-{top:.6g}), found {float(weight[at]):.6g} + delta {float(d[at]):.6g} = "
            f"{float(merged[at])} at index {list(at)} ({int(bad.sum())} such weights); "
            "serve it unmerged (qdelta.apply) or in a wider dtype"
        )


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _set_pass_through(module: nn.Module, name: str, value: Any) -> bool:
    """``module.weight = value`` (or ``bias``) on a wrapper: the base layer's tensor
    again is a no-op (Hugging Face's ``tie_weights`` re-ties what already is tied);
    anything else is refused, the base layer is not the wrapper's to change.
    False: not such an attribute (set it as usual)."""
    if name not in ("weight", "bias") or "base_layer" not in module._modules:
        return False
    if value is getattr(module.base_layer, name, None):
        return True
    raise AttributeError(
        f"{type(module).__name__}.{name} is the base layer's {name}, read-only here; "
        f"set base_layer.{name} (every delta applied to it sees the change) or unapply first"
    )


class _DeltaMatmul(torch.autograd.Function):
    """``x @ D^T`` through the kernel dispatch, with gradients for ``x`` and the scales.

    The backward does not rely on the kernel being differentiable: it decodes
    the sign planes (torch reference) and forms both gradients densely, from
    tensors that are not detached, so ``create_graph=True`` differentiates them
    again. float64 inputs stay float64 throughout.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, backend: str
    ):
        ctx.save_for_backward(x, planes, scales)
        ctx.backend = backend
        return kernels.delta_matmul(x, planes, scales.detach(), backend=backend)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, planes, scales = ctx.saved_tensors
        grad_x = grad_scales = None
        ct = _compute_dtype(x)
        g = grad.to(ct)
        # The signs are decoded once per backward (torch, any device).
        signs = unpack_signs(planes, x.shape[-1]).to(ct)  # [P, N, K]
        if ctx.needs_input_grad[0]:
            s = scales.to(ct)  # not detached: grad_x depends on the scales (double backward)
            s = s[:, None, None] if s.dim() == 1 else s[:, :, None]
            grad_x = (g @ (signs * s).sum(0)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            per_plane = torch.einsum("mk,pnk->pmn", x.to(ct), signs) * g
            grad_scales = per_plane.sum((1, 2)) if scales.dim() == 1 else per_plane.sum(1)
            grad_scales = grad_scales.to(scales.dtype)
        return grad_x, None, grad_scales, None


class _FloatScales(nn.Module):
    """Keeps ``scales`` float32 (or wider) through model-wide casts: ``.half()`` /
    ``.bfloat16()`` would round them and flush the smallest to 0 (a fine-tune
    silently gone); the kernels take float32 scales in any case."""

    scales: nn.Parameter

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        exact = self.scales.detach()
        result = super()._apply(fn, recurse)
        if self.scales.dtype in (torch.float16, torch.bfloat16):
            self.scales.data = exact.to(device=self.scales.device, dtype=torch.float32)
            if self.scales.grad is not None:  # an optimizer wants it in the scales' dtype
                self.scales.grad = self.scales.grad.float()
        return result


class BitDeltaLinear(_FloatScales):
    """``base_layer(x) + x @ (sum_p alpha_p S_p)^T`` for an ``nn.Linear`` or a GPT-2 ``Conv1D``.

    ``planes`` is an int32 buffer ``[P, out, ceil(in/32)]`` (the uint32 bits,
    copied: the module owns them, P/32 of the float32 weight bytes);
    ``scales`` a float32 parameter ``[P]`` or ``[P, out]``, trainable.
    A merged module's ``state_dict`` carries ``_extra_state``, an int64 tensor
    (the merged flag and what :meth:`unmerge` needs for the exact base bits; the
    dict form of older versions still loads); an unmerged one's has just the
    tensors. ``weight`` / ``bias`` read the base layer's (without the delta).
    """

    # Names (in the model given to apply) of the other delta layers wrapping the same base weight.
    _tied_with: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, layer: PackedLayer, *, backend: str = "auto"):
        super().__init__()
        _check_layer(layer)
        kernels.check_backend(backend)
        out_f, in_f = linear_shape(base_layer)
        if (out_f, in_f) != layer.shape:
            raise ShapeError(
                f"delta: expected a [{out_f}, {in_f}] (out, in) delta for this layer, "
                f"found {list(layer.shape)}"
            )
        if is_conv1d(base_layer) != layer.transposed:
            raise ModelMismatchError(
                f"delta: made for a {'Conv1D' if layer.transposed else 'Linear'} layer, "
                f"found {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.transposed = layer.transposed
        self.backend = backend
        self.merged = False
        # Where subtracting the delta again does not round back to the original
        # bits: (indices, original values), so unmerge() restores them exactly.
        self._merge_fix: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None
        device = _linear_weight(base_layer).device
        self.register_buffer("planes", _planes_tensor(layer.planes, device))
        self.scales = nn.Parameter(torch.tensor(layer.scales, dtype=torch.float32, device=device))

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    # Read-only views of the base layer's tensors, for code that inspects a linear
    # layer (Hugging Face reads ``layer.weight.dtype``, as PEFT's wrappers allow).
    # They are the *base* tensors (the delta is not in them unless merged) and stay
    # out of the state dict: the base layer's own keys hold them.
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (``[out, in]``, ``[in, out]`` for a Conv1D), without the delta."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or None)."""
        return getattr(self.base_layer, "bias", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if not _set_pass_through(self, name, value):
            super().__setattr__(name, value)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` delta (no gradient): float32, float64 after ``.double()``."""
        scales = self.scales.detach()
        return dense_delta(self.planes, scales, self.in_features, dtype=_compute_dtype(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"x: expected [..., {self.in_features}] (in_features last), found {list(x.shape)}"
            )
        if self.merged:
            return self.base_layer(x)
        ct = _compute_dtype(x)
        if _tracing():
            y = self.base_layer(x)
            dense = dense_delta(self.planes, self.scales.to(ct), self.in_features, dtype=ct)
            return y + (x.to(ct) @ dense.T).to(y.dtype)
        if self._fuses(x):
            # Decode-sized float32 CPU batch: base and delta in one Rust pass.
            arrays = cpu.base_arrays(self.base_layer)
            if arrays is not None:
                y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
                x = x if x.is_contiguous() else x.contiguous()
                cpu.single_fused_linear(x, *arrays, self.planes, self.scales, y)
                return y
        y = self.base_layer(x)
        flat = x.reshape(-1, self.in_features)
        # to(ct): a model-wide .half() must not change the kernel's scale dtype;
        # float64 runs on the (float64) torch reference, no kernel takes it.
        backend = "reference" if ct == torch.float64 else self.backend
        d = _DeltaMatmul.apply(flat, self.planes, self.scales.to(ct), backend)
        return y + d.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether src/fused.rs does this call: AVX-512, a plain nn.Linear base
        (:func:`plain_linear`: the kernel replaces its call), float32 CPU input of
        at most FUSED_MAX_ROWS rows and float32 scales, nothing that autograd must
        track (scale distillation keeps the differentiable path)."""
        from qdelta.multitenant import FUSED_MAX_ROWS

        if (
            cpu.ISA != "avx512"
            or self.backend not in ("auto", "cpu")
            or self.transposed
            or not plain_linear(self.base_layer)
            or x.dtype != torch.float32
            or x.is_cuda
            or self.scales.dtype != torch.float32
            or x.numel() > FUSED_MAX_ROWS * self.in_features
        ):
            return False
        base = self.base_layer
        return not torch.is_grad_enabled() or not (
            x.requires_grad
            or self.scales.requires_grad
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight (in place; the base layer is shared).

        Refused (:class:`ModelMismatchError`) for a layer whose base weight is tied
        to other layers carrying a delta (a tied head and embedding under
        :func:`apply`): they would go on adding their delta to the merged weight.
        """
        if self._tied_with:
            raise ModelMismatchError(
                f"merge: expected a layer whose base weight no other delta layer shares, found "
                f"it tied to {list(self._tied_with)}, which add a delta to it too (merged here, "
                "theirs would count twice); write the fine-tune into the base with "
                "qdelta.merge(base_model, delta), which adds a tied weight's delta once"
            )
        if not self.merged:
            self._shift(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base weight gets its exact original bits back
        (as long as neither it nor the scales changed while merged)."""
        if self.merged:
            w = _linear_weight(self.base_layer)
            w.copy_(self._shifted(w, -1.0))
            if self._merge_fix is not None:
                index, values = self._merge_fix
                w[tuple(i.to(w.device) for i in index)] = values.to(w.device)
            self._merge_fix = None
            self.merged = False

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        """Adds (+1) the delta into the base weight, remembering what a later
        subtraction would not round back exactly."""
        w = _linear_weight(self.base_layer)
        merged = self._shifted(w, sign, check=sign > 0)
        wrong = _bits(self._shifted(merged, -sign)) != _bits(w)
        index = wrong.nonzero(as_tuple=True)
        self._merge_fix = (index, w[index].clone()) if index[0].numel() else None
        w.copy_(merged)

    def _shifted(self, w: torch.Tensor, sign: float, *, check: bool = False) -> torch.Tensor:
        ct = _compute_dtype(w)
        d = dense_delta(self.planes, self.scales.detach(), self.in_features, dtype=ct)
        d = d.to(w.device).T if self.transposed else d.to(w.device)
        if check:
            name = f"{type(self).__name__}(out={self.out_features}, in={self.in_features})"
            check_delta_fits(w, sign * d, name)
        return (w.to(ct) + sign * d).to(w.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            # The base weight saved beside it has the delta in: a loader must know.
            # One int64 tensor (safetensors and save_pretrained take tensors only).
            destination[prefix + _MERGE_KEY] = _encode_merge_state(
                self._merge_fix, _linear_weight(self.base_layer)
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        key = prefix + _MERGE_KEY
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict and prefix + "base_layer.weight" not in state_dict:
            return  # a partial load that leaves the base weight alone
        # No key: an unmerged module's state (and every checkpoint of older versions).
        state = state_dict.get(key, {"merged": False})
        try:
            self.merged, self._merge_fix = _merge_state(state, _linear_weight(self.base_layer))
        except (TypeError, ValueError) as err:
            errors.append(f"{key}: expected the merged state of a BitDeltaLinear, {err}")

    def extra_repr(self) -> str:
        mode = "matrix" if self.scales.dim() == 1 else "row"
        nbytes = self.planes.numel() * 4 + self.scales.numel() * 4
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, scale={mode}, delta_size={_human(nbytes)}, merged={self.merged}"
        )


class BitDeltaEmbedding(_FloatScales):
    """``base_layer(ids) + delta[ids]`` for an ``nn.Embedding`` whose delta was compressed.

    For an embedding that scales its lookup (Gemma's ``*ScaledWordEmbedding``:
    ``weight[ids] * embed_scale``) the delta rows are scaled the same way, so the
    output is the fine-tuned module's. Subclasses whose forward is not such a
    lookup (checked by :func:`qdelta.sources.embedding_form`, e.g. OPT's
    positional embedding) are refused with ModelMismatchError.
    """

    # Names (in the model given to apply) of the other delta layers wrapping the same base weight.
    _tied_with: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Embedding, layer: PackedLayer):
        super().__init__()
        _check_layer(layer)
        if tuple(base_layer.weight.shape) != layer.shape or layer.transposed:
            raise ShapeError(
                f"delta: expected a {list(base_layer.weight.shape)} embedding delta, "
                f"found {list(layer.shape)}"
            )
        from qdelta.sources import embedding_form

        form = embedding_form(base_layer)
        if form is None:
            raise ModelMismatchError(
                f"delta: expected an embedding whose forward is a lookup of its weight, found "
                f"{type(base_layer).__name__}, whose forward computes something else "
                "(keep its weight whole: compress leaves such modules out of its layers)"
            )
        self._scaled = form == "scaled"
        self.base_layer = base_layer
        self.embedding_dim = base_layer.embedding_dim
        device = base_layer.weight.device
        self.register_buffer("planes", _planes_tensor(layer.planes, device))
        self.scales = nn.Parameter(torch.tensor(layer.scales, dtype=torch.float32, device=device))

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    # Read-only views of the base embedding, for code that inspects it (the base
    # weight, without the delta; not in the state dict: the base layer's key holds it).
    @property
    def weight(self) -> torch.Tensor:
        """The base embedding's weight ``[num_embeddings, embedding_dim]``, without the delta."""
        return self.base_layer.weight

    def __setattr__(self, name: str, value: Any) -> None:
        if not _set_pass_through(self, name, value):
            super().__setattr__(name, value)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        flat = ids.reshape(-1)
        rows = self.planes.index_select(1, flat)
        scales = self.scales if self.scales.dim() == 1 else self.scales.index_select(1, flat)
        d = unpack_planes(rows, scales, self.embedding_dim, dtype=_compute_dtype(y))
        if self._scaled:  # y is weight[ids] * embed_scale: the delta rows are scaled too
            from qdelta.sources import embedding_scale

            d = d * embedding_scale(self.base_layer).to(d.dtype)  # as the module rounds it
        return y + d.reshape(*ids.shape, self.embedding_dim).to(y.dtype)

    def extra_repr(self) -> str:
        nbytes = self.planes.numel() * 4 + self.scales.numel() * 4
        return f"{self.planes.shape[1]}, {self.embedding_dim}, bits={self.bits}, delta_size={_human(nbytes)}"


DeltaModule = (BitDeltaLinear, BitDeltaEmbedding)


def _check_layer(layer: object) -> None:
    if not isinstance(layer, PackedLayer):
        raise DTypeError(f"layer: expected a qdelta.PackedLayer, found {type(layer).__name__}")


def _check_delta(delta: object) -> None:
    if not isinstance(delta, Delta):
        raise DTypeError(f"delta: expected a qdelta.Delta, found {type(delta).__name__}")


# The merged state as one int64 tensor: [magic, version, merged, dtype code, ndim, n,
# the merge fix's index (ndim x n, row-major), the raw bits of its n values].
_MERGE_MAGIC = 0x7164_6D67  # "qdmg"
_MERGE_VERSION = 1
_MERGE_HEADER = 6
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _encode_merge_state(
    fix: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None, weight: torch.Tensor
) -> torch.Tensor:
    """A merged module's extra state: the flag and the merge fix, bit-exact, as one
    int64 tensor (any float weight dtype: the values travel as their raw bits)."""
    if weight.dtype not in _DTYPE_CODES:
        raise DTypeError(
            f"weight: expected float16, bfloat16, float32 or float64, found {weight.dtype}"
        )
    if fix is None:
        index = torch.zeros(weight.dim(), 0, dtype=torch.int64)
        values = torch.zeros(0, dtype=weight.dtype)
    else:
        index = torch.stack(fix[0]).cpu().to(torch.int64)
        values = fix[1].detach().cpu().to(weight.dtype)
    header = [_MERGE_MAGIC, _MERGE_VERSION, 1, _DTYPE_CODES[weight.dtype], *index.shape]
    return torch.cat(
        [torch.tensor(header, dtype=torch.int64), index.reshape(-1), _bits(values).to(torch.int64)]
    )


def _decode_merge_state(state: torch.Tensor) -> dict[str, Any]:
    """The dict form (that of older versions) of an extra-state tensor."""
    if state.dtype != torch.int64 or state.dim() != 1 or state.numel() < _MERGE_HEADER:
        raise TypeError(f"found a {state.dtype} tensor of shape {list(state.shape)}")
    head = [int(v) for v in state[:_MERGE_HEADER]]
    magic, version, merged, code, ndim, n = head
    if magic != _MERGE_MAGIC or version != _MERGE_VERSION or merged not in (0, 1):
        raise TypeError(f"found a tensor that is not a qdelta merged state (header {head})")
    if (
        code not in _CODE_DTYPES
        or ndim < 1
        or n < 0
        or state.numel() != _MERGE_HEADER + n * (ndim + 1)
    ):
        raise ValueError(f"found a merged state of {state.numel()} values with header {head}")
    body = state[_MERGE_HEADER:].cpu()
    dtype = _CODE_DTYPES[code]
    raw = body[ndim * n :].to({8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize])
    return {
        "merged": bool(merged),
        "merge_fix_index": body[: ndim * n].reshape(ndim, n).clone(),
        "merge_fix_values": raw.view(dtype).clone(),
    }


def _merge_state(
    state: Any, weight: torch.Tensor
) -> tuple[bool, tuple[tuple[torch.Tensor, ...], torch.Tensor] | None]:
    """``(merged, merge fix)`` from a state-dict entry (the int64 tensor, or the dict
    older versions wrote), checked against the base weight."""
    if isinstance(state, torch.Tensor):
        state = _decode_merge_state(state)
    if not isinstance(state, dict) or not isinstance(state.get("merged"), bool):
        raise TypeError(f"found {type(state).__name__} {state!r:.80}")
    if not state["merged"]:
        return False, None
    index, values = state.get("merge_fix_index"), state.get("merge_fix_values")
    if (
        not isinstance(index, torch.Tensor)
        or not isinstance(values, torch.Tensor)
        or index.dtype != torch.int64
        or index.dim() != 2
        or index.shape[0] != weight.dim()
        or values.shape != (index.shape[1],)
        or bool((index < 0).any() or (index >= torch.tensor(weight.shape)[:, None]).any())
    ):
        raise ValueError(
            f"found a merge fix that does not index a {list(weight.shape)} weight "
            "(unmerge could not restore the exact base bits)"
        )
    fix = (tuple(index), values.clone()) if index.shape[1] else None
    return True, fix


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (exact comparison, NaN included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight  # type: ignore[return-value]


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of an ``nn.Linear`` or a ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if is_conv1d(layer):
        inp, out = layer.weight.shape
        return int(out), int(inp)
    raise ModelMismatchError(
        f"delta layer: expected nn.Linear or Conv1D, found {type(layer).__name__}"
    )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _find_module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelMismatchError(
            f"{what} {name!r}: expected the model to have this module, found none"
        ) from None


def _wrap(module: nn.Module, layer: PackedLayer, name: str, backend: str) -> nn.Module:
    try:
        if isinstance(module, nn.Embedding):
            return BitDeltaEmbedding(module, layer)
        return BitDeltaLinear(module, layer, backend=backend)
    except (ShapeError, ModelMismatchError) as err:
        raise type(err)(f"layer {name}: {err}") from None


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """State-dict name -> every name of the same tensor object in ``model`` (tied
    weights: GPT-2's ``transformer.wte.weight`` is ``lm_head.weight``), in module order."""
    names: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is not None:
                    key = f"{prefix}.{attr}" if prefix else attr
                    group = names.setdefault(id(tensor), [])
                    if key not in group:
                        group.append(key)
    return {key: group for group in names.values() for key in group}


def _same_value(a: Any, b: Any) -> bool:
    """Whether two given values are the same tensor value (exact, dtype included)."""
    if a is b:
        return True
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and not (a.is_meta or b.is_meta)
        and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
    )


def _param_groups(
    model: nn.Module, params: dict[str, torch.Tensor], covered: set[str]
) -> list[tuple[list[str], torch.Tensor]]:
    """``(names, value)``: the kept tensors of ``params``, each with every name it
    must be set under, so that a tensor the base ties under several names stays
    one tensor. A value given under one name of a tied group goes to all of them
    (but not to a name in ``covered``: a packed layer's weight takes its delta);
    a group given several different values (the fine-tune untied it) gets them
    name by name, one tensor each."""
    aliases = tensor_aliases(model)
    groups: list[tuple[list[str], torch.Tensor]] = []
    done: set[str] = set()
    for key, value in params.items():
        if key in done:
            continue
        names = aliases.get(key, [key])  # an unknown key fails in _swap_group
        given = [n for n in names if n in params]
        done.update(given)
        if all(_same_value(params[n], value) for n in given):
            groups.append(([n for n in names if n in given or n not in covered], value))
        else:
            groups.extend(([n], params[n]) for n in given)
    return groups


def _replace_tensors(
    model: nn.Module, params: dict[str, torch.Tensor], covered: AbstractSet[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Swap whole tensors in (new objects, the base's stay untouched); returns the
    originals, by name (every name of a tied tensor that was swapped)."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for names, value in _param_groups(model, params, set(covered)):
            _swap_group(model, names, value, originals)
    except Exception:
        _restore_tensors(model, originals)  # all or nothing
        raise
    return originals


def _swap_group(
    model: nn.Module, names: list[str], value: torch.Tensor, originals: dict[str, torch.Tensor]
) -> None:
    """Set one new tensor made of ``value`` under every name in ``names`` (one
    tensor of the model, or a single name)."""
    new: torch.Tensor | None = None
    for key in names:
        owner_name, _, attr = key.rpartition(".")
        owner = _find_module(model, owner_name, "tensor owner") if owner_name else model
        current = owner._parameters.get(attr, owner._buffers.get(attr))
        if current is not None:
            check_tensor_like(key, value, current)
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            table: dict[str, Any] = owner._parameters
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            old = owner._buffers[attr]
            table = owner._buffers
        else:
            raise ModelMismatchError(
                f"{key}: expected a parameter or buffer of the model, found none"
            )
        if old is new:  # the same module under a second name (T5's embed_tokens is shared)
            continue  # swapped already: recording it would make the new tensor "original"
        if old.shape != value.shape:
            raise ShapeError(f"{key}: expected shape {list(old.shape)}, found {list(value.shape)}")
        if new is None:
            new = value.to(device=old.device, dtype=old.dtype)
            if table is owner._parameters:
                new = nn.Parameter(new, requires_grad=old.requires_grad)
        table[attr] = new
        originals[key] = old


def _note_tied_layers(wrapped: dict[str, nn.Module]) -> None:
    """Tells each delta layer which others wrap the same base weight (so that
    :meth:`BitDeltaLinear.merge` can refuse to add one delta to a weight the others
    still add theirs to). Tied layers given the very same delta (compress gives tied
    twins the same planes and scales) share one scales parameter: the weight is one
    tensor, so its trained delta stays one too (separate copies drift apart when
    distilled, and merge then refuses the pair)."""
    sharing: dict[tuple, list[str]] = {}
    for name, module in wrapped.items():
        sharing.setdefault(storage_key(module.weight), []).append(name)
    for names in sharing.values():
        first = wrapped[names[0]]
        for name in names:
            module = wrapped[name]
            module._tied_with = tuple(n for n in names if n != name)
            if module is not first and _same_delta(module, first):
                module.scales = first.scales


def _same_delta(a: nn.Module, b: nn.Module) -> bool:
    return (
        a.planes.shape == b.planes.shape
        and a.scales.shape == b.scales.shape
        and torch.equal(a.planes, b.planes)
        and torch.equal(a.scales, b.scales)
    )


def _restore_tensors(
    model: nn.Module, originals: dict[str, torch.Tensor], *, follow_casts: bool = False
) -> None:
    """Puts the originals back. ``follow_casts``: in the dtype and on the device of
    what replaced them (a ``model.half()`` or ``.to()`` since apply moved only what
    the model holds; a tensor tied under several names comes back as one tensor)."""
    moved: dict[int, torch.Tensor] = {}
    for key, old in originals.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        table = owner._parameters if isinstance(old, nn.Parameter) else owner._buffers
        now = table.get(attr)
        if follow_casts and now is not None and (now.dtype, now.device) != (old.dtype, old.device):
            if id(old) not in moved:
                with torch.no_grad():
                    data = old.detach().to(device=now.device, dtype=now.dtype)
                moved[id(old)] = (
                    nn.Parameter(data, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter)
                    else data
                )
            old = moved[id(old)]
        table[attr] = old


def apply(
    model: nn.Module, delta: Delta, *, backend: str = "auto", check: bool = True
) -> nn.Module:
    """Turn ``model`` (the base) into the fine-tune, in place, without copying base weights.

    Target layers become :class:`BitDeltaLinear` / :class:`BitDeltaEmbedding`
    wrapping the original layers; tensors stored whole in the delta replace
    the model's (the originals are kept for :func:`unapply`). A tensor the base
    ties under several names (embeddings and head) stays one tensor: a value kept
    under any of its names replaces it under all of them, unless the delta keeps
    different values under two of its names (a fine-tune that untied it: each
    name gets its own). With ``check``
    the model's fingerprint must be the delta's base fingerprint
    (:class:`BaseMismatchError` otherwise).
    """
    _check_delta(delta)
    if getattr(model, _STASH, None) is not None:
        raise ModelMismatchError(
            "model: expected a plain base model, found a delta already applied"
        )
    kernels.check_backend(backend)
    if check:
        check_base(delta, model)
    modules = {name: _find_module(model, name, "delta layer") for name in delta.layers}
    for name, module in modules.items():
        if isinstance(module, DeltaModule):
            raise ModelMismatchError(
                f"layer {name}: expected a base layer, found {type(module).__name__}"
            )
    wrapped = {n: _wrap(modules[n], layer, n, backend) for n, layer in delta.layers.items()}
    _note_tied_layers(wrapped)
    covered = {f"{name}.weight" for name in delta.layers}
    originals = _replace_tensors(model, delta.params, covered)
    for name, new in wrapped.items():
        _set_module(model, name, new)
    object.__setattr__(model, _STASH, originals)
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the original layers and tensors come back (merged layers unmerge)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DeltaModule):
            if isinstance(module, BitDeltaLinear):
                module.unmerge()
            _set_module(model, name, module.base_layer)
    originals = getattr(model, _STASH, None)
    if originals:
        _restore_tensors(model, originals, follow_casts=True)
    if originals is not None:
        object.__delattr__(model, _STASH)
    return model


@torch.no_grad()
def merge(model: nn.Module, delta: Delta, *, check: bool = True) -> nn.Module:
    """Write the fine-tune's dense weights into ``model`` in place (e.g. for export).

    Unlike :func:`apply` this changes the base weights themselves. A tied tensor
    is written once, for all its names; a delta that keeps two different values
    for it is refused (:class:`ModelMismatchError`, nothing written). ``check``:
    as in :func:`apply`.
    """
    _check_delta(delta)
    if getattr(model, _STASH, None) is not None:
        raise ModelMismatchError(
            "model: expected a plain base model, found a delta applied (unapply it first)"
        )
    if check:
        check_base(delta, model)
    # Everything is checked before the first write: a bad delta leaves the model as it was.
    weights = {name: _merge_target(model, name, layer) for name, layer in delta.layers.items()}
    tensors = merge_param_targets(model, delta.params)

    def oriented(name: str) -> torch.Tensor:
        layer = delta.layers[name]
        d = torch.from_numpy(layer.dense())
        return d.T if layer.transposed else d

    # Tied layers (an embedding and the head sharing one tensor) are one weight: it
    # takes the delta once. Their deltas must agree (compress packs both alike).
    sharing: dict[tuple, list[str]] = {}
    for name, weight in weights.items():
        sharing.setdefault(storage_key(weight), []).append(name)
    twins = set()
    for names in (names for names in sharing.values() if len(names) > 1):
        d0 = oriented(names[0])
        for other in names[1:]:
            if not torch.equal(d0, oriented(other)):
                raise ModelMismatchError(
                    f"layers {names[0]} and {other}: expected one delta for the weight they "
                    "share (tied), found two different ones; untie the weights first (e.g. "
                    "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))"
                )
            twins.add(other)
    for name, weight in weights.items():  # a weight that would overflow: nothing written
        if name not in twins:  # the bound from the scales spares unpacking it twice
            layer = delta.layers[name]
            check_delta_fits(weight, lambda n=name: oriented(n), name, d_bound=layer.abs_bound())
    for name, weight in weights.items():
        if name not in twins:
            weight.copy_(added_delta(weight, oriented(name)))
    for key, target in tensors.items():
        target.copy_(delta.params[key].to(device=target.device, dtype=target.dtype))
    return model


def _merge_target(model: nn.Module, name: str, layer: PackedLayer) -> torch.Tensor:
    """The weight ``merge`` adds layer ``name``'s delta into, checked against the delta."""
    module = _find_module(model, name, "delta layer")
    if isinstance(module, nn.Embedding):
        shape = tuple(module.weight.shape)
    else:
        try:
            shape = linear_shape(module)
        except ModelMismatchError as err:
            raise ModelMismatchError(f"layer {name}: {err}") from None
    if shape != layer.shape:
        raise ShapeError(f"layer {name}: expected a {list(shape)} delta, found {list(layer.shape)}")
    if is_conv1d(module) != layer.transposed:
        want, found = ("Conv1D", "Linear") if is_conv1d(module) else ("Linear", "Conv1D")
        raise ShapeError(
            f"layer {name}: expected a delta for a {want} weight (transposed="
            f"{not layer.transposed}), found one made for a {found} (transposed={layer.transposed})"
        )
    return module.weight  # type: ignore[return-value]


def merge_param_targets(
    model: nn.Module, params: Mapping[str, torch.Tensor], what: Callable[[str], str] = str
) -> dict[str, torch.Tensor]:
    """Key -> the parameter or buffer a merge overwrites with ``params[key]``, every
    one checked (``what(key)``: how errors name it). A tensor tied under several
    names is written once, in place: every name sees it, so the values given for
    two of its names must agree (one tensor cannot hold both)."""
    tensors = {key: _param_target(model, key, value, what(key)) for key, value in params.items()}
    given: dict[int, str] = {}
    for key, target in tensors.items():
        first = given.setdefault(id(target), key)
        if first != key and not _same_value(params[first], params[key]):
            raise ModelMismatchError(
                f"params {first} and {key}: expected one value for the tensor they share "
                "(tied), found two different ones; untie them first (e.g. model.lm_head.weight "
                "= nn.Parameter(model.lm_head.weight.clone())) or use qdelta.apply"
            )
    return tensors


def _param_target(model: nn.Module, key: str, value: torch.Tensor, what: str) -> torch.Tensor:
    """The parameter or buffer ``merge`` overwrites with ``value``, checked."""
    try:
        target = model.get_parameter(key) if _is_parameter(model, key) else model.get_buffer(key)
    except AttributeError:
        raise ModelMismatchError(
            f"{what}: expected a parameter or buffer of the model, found none"
        ) from None
    check_tensor_like(what, value, target)
    if target.shape != value.shape:
        raise ShapeError(f"{what}: expected shape {list(target.shape)}, found {list(value.shape)}")
    return target


def _is_parameter(model: nn.Module, key: str) -> bool:
    try:
        model.get_parameter(key)
        return True
    except AttributeError:
        return False


def delta_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every :class:`BitDeltaLinear` / :class:`BitDeltaEmbedding` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaModule)}


def read_scales(model: nn.Module, delta: Delta) -> Delta:
    """A copy of ``delta`` whose scales are the (trained) scales of the applied ``model``."""
    modules = delta_modules(model)
    return delta.with_scales(
        {name: modules[name].scales.detach().cpu().numpy() for name in delta.layers}
    )
