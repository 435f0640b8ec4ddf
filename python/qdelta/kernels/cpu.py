"""The Rust CPU delta matmul (src/gemv.rs) for torch CPU tensors.

Type plumbing only: tensors go to the core through ``.numpy()`` without a
copy (int32 planes viewed as uint32, float16/bfloat16 as their uint16 bits);
the core releases the GIL and runs on its own thread pool. Same conventions
as :mod:`qdelta.kernels` (planes ``[T, P, N, W]``, scales ``[T, P]`` or
``[T, P, N]``, ``tenant_ids`` ``[M]``, ``-1`` = no delta).

Copies that do happen, all small: a non-contiguous ``x`` is made contiguous
(the core converts it to padded float32 rows anyway); scales that are not
float32 (after ``module.half()``) are converted; integer tenant ids become int64.
"""

from __future__ import annotations

import numpy as np
import torch

from qdelta import _core
from qdelta.errors import DTypeError, QDeltaError, ShapeError

#: The instruction set the kernel runs on here: "avx512", "avx2" or "portable".
ISA: str = _core.gemv_isa()

_X_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _on_cpu(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{what}: expected a torch tensor, found {type(t).__name__}")
    if t.device.type != "cpu":
        raise QDeltaError(
            f"{what}: the cpu backend expected a CPU tensor, found one on {t.device} "
            "(use backend='auto' to pick the device's kernel)"
        )
    return t.detach()


def _x_array(x: torch.Tensor) -> tuple[np.ndarray, str]:
    name = _X_DTYPES.get(x.dtype)
    if name is None:
        raise DTypeError(f"x: expected float32, float16 or bfloat16, found {x.dtype}")
    x = x.contiguous()
    if name == "float32":
        return x.numpy(), name
    return x.view(torch.int16).numpy().view(np.uint16), name


def _planes_array(planes: torch.Tensor) -> np.ndarray:
    # Contiguous as the reference takes any strides (a copy only for a strided view).
    if planes.dtype == torch.int32:
        return planes.contiguous().numpy().view(np.uint32)
    if planes.dtype == torch.uint32:
        return planes.contiguous().numpy()
    raise DTypeError(f"planes: expected int32 (or uint32) packed words, found {planes.dtype}")


def _scales_array(scales: torch.Tensor) -> np.ndarray:
    if not scales.is_floating_point():
        raise DTypeError(f"scales: expected a float tensor, found {scales.dtype}")
    return scales.to(torch.float32).contiguous().numpy()


def _ids_array(tenant_ids: torch.Tensor) -> np.ndarray:
    if tenant_ids.is_floating_point() or tenant_ids.is_complex() or tenant_ids.dtype == torch.bool:
        raise DTypeError(
            f"tenant_ids: expected an integer tensor (int64), found {tenant_ids.dtype}"
        )
    return tenant_ids.to(torch.int64).contiguous().numpy()


def multi_tenant_delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    tenant_ids: torch.Tensor,
    *,
    bits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row tenant delta ``y[m] = sum_p alpha[t_m, p] * x[m] @ S[t_m, p]^T``.

    ``x``: ``[..., K]``; ``tenant_ids``: one per row of ``x.reshape(-1, K)``.
    Returns ``[..., N]`` in x's dtype. With ``out`` (float32 ``[M, N]``,
    contiguous) the delta is added into ``out`` in float32 and ``out`` is returned.
    """
    x = _on_cpu(x, "x")
    planes = _on_cpu(planes, "planes")
    scales = _on_cpu(scales, "scales")
    tenant_ids = _on_cpu(tenant_ids, "tenant_ids")
    if x.dim() < 1 or x.shape[-1] == 0 or planes.dim() != 4:
        raise ShapeError(
            f"expected x [..., K] and planes [T, P, N, W], found x {list(x.shape)} "
            f"and planes {list(planes.shape)}"
        )
    lead, k = x.shape[:-1], x.shape[-1]
    xa, name = _x_array(x.reshape(-1, k))
    out_arr = None
    if out is not None:
        if _on_cpu(out, "out").dtype != torch.float32:
            raise DTypeError(f"out: expected float32, found {out.dtype}")
        out_arr = _out_array(out)
    y = _core.delta_matmul(
        xa,
        name,
        _planes_array(planes),
        _scales_array(scales),
        _ids_array(tenant_ids),
        _bits_arg(bits),
        out_arr,
    )
    if out is not None:
        return out
    return torch.from_numpy(y).reshape(*lead, y.shape[-1]).to(x.dtype)


class PreparedStack:
    """A tenant stack as the arrays the core takes, converted once.

    For callers that run many calls against the same stack (a layer while
    serving): the per-call checks and conversions of
    :func:`multi_tenant_delta_matmul` are done here once; :meth:`add_into` only
    views ``x`` and ``out``. The arrays view ``planes`` (zero-copy) and
    ``scales`` (a copy only when they are not float32), so rebuild after either
    is replaced or modified (:meth:`current` tells).
    """

    def __init__(self, planes: torch.Tensor, scales: torch.Tensor) -> None:
        # Identity and version catch in-place edits; the data pointers catch storage
        # that moved under the same tensor (share_memory_(), ``.data = ...``), which
        # would leave the arrays below pointing at freed memory.
        self._sources = (planes, _version(planes), scales, _version(scales))
        self._pointers = (planes.data_ptr(), scales.data_ptr(), planes.shape, scales.shape)
        planes = _on_cpu(planes, "planes")
        scales = _on_cpu(scales, "scales")
        if planes.dim() != 4 or scales.dim() not in (2, 3):
            raise ShapeError(
                f"expected planes [T, P, N, W] and scales [T, P] or [T, P, N], found planes "
                f"{list(planes.shape)} and scales {list(scales.shape)}"
            )
        self.planes = _planes_array(planes.contiguous())
        self.scales = np.ascontiguousarray(_scales_array(scales))

    def current(self, planes: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether this was made from exactly these tensors, unmodified since."""
        p, pv, s, sv = self._sources
        return (
            p is planes and s is scales and pv is not None and sv is not None
            and pv == _version(planes) and sv == _version(scales)
            and self._pointers
            == (planes.data_ptr(), scales.data_ptr(), planes.shape, scales.shape)
        )  # fmt: skip

    def add_into(self, x: torch.Tensor, tenant_ids: np.ndarray, out: torch.Tensor) -> None:
        """``out[m] += delta of row m`` for CPU ``x`` ``[M, K]`` (float32/16, bfloat16),
        ``tenant_ids`` int64 ``[M]`` (stack slots, ``-1`` = none) and float32
        contiguous ``out`` ``[M, N]``, neither needing gradients."""
        xa, name = _x_array(x)
        _core.delta_matmul(xa, name, self.planes, self.scales, tenant_ids, None, out.numpy())

    def fused_linear(
        self,
        x: torch.Tensor,
        weight: np.ndarray,
        bias: np.ndarray | None,
        tenant_ids: np.ndarray,
        out: torch.Tensor,
    ) -> None:
        """``out = x @ weight.T + bias + each row's delta`` in one pass (src/fused.rs):
        float32 contiguous CPU ``x`` ``[..., K]`` (``M`` rows), the base's ``weight``
        ``[N, K]`` and ``bias`` ``[N]`` as float32 arrays (:func:`base_arrays`),
        ``tenant_ids`` int64 ``[M]`` (stack slots, ``-1`` = base only), float32
        contiguous ``out`` ``[..., N]``."""
        _core.fused_linear(
            _plain(x), weight, bias, self.planes, self.scales, tenant_ids, out.numpy()
        )


def single_fused_linear(
    x: torch.Tensor,
    weight: np.ndarray,
    bias: np.ndarray | None,
    planes: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """One tenant's layer in one pass (src/fused.rs): ``out = x @ weight.T + bias +
    x @ (sum_p alpha_p S_p)^T`` for float32 contiguous CPU ``x`` ``[..., K]`` and
    ``out`` ``[..., N]``, the base's arrays (:func:`base_arrays`), int32 ``planes``
    ``[P, N, W]`` and float32 ``scales`` ``[P]`` / ``[P, N]``."""
    rows = out.numel() // max(out.shape[-1], 1)
    _core.fused_linear(
        _plain(x), weight, bias, _planes_array(planes)[None], _plain(scales)[None],
        np.zeros(rows, dtype=np.int64), _out_array(out),
    )  # fmt: skip


def rowwise_linear(
    x: torch.Tensor,
    weights: list[np.ndarray],
    biases: list[np.ndarray | None],
    index: np.ndarray,
    out: torch.Tensor,
) -> None:
    """``out[r] = x[r] @ weights[index[r]].T + biases[index[r]]`` (src/rowwise.rs):
    float32 contiguous CPU ``x`` ``[..., K]`` and ``out`` ``[..., N]``, float32
    ``[N, K]`` weights, ``[N]`` biases or None, int64 ``index`` (one per row)."""
    _core.rowwise_linear(_plain(x), weights, biases, index, _out_array(out))


def rms_norm_rows(x: torch.Tensor, weights: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """``out[r] = weights[r // s] * x[r] / sqrt(mean(x[r]^2) + eps)`` (src/rmsnorm.rs):
    float32 contiguous CPU ``x`` and ``out`` ``[..., D]``, ``weights`` ``[G, D]``,
    ``s`` = rows / G."""
    _core.rms_norm_rows(_plain(x), _plain(weights), eps, _out_array(out))


def packed_embedding(
    base: torch.Tensor,
    planes: np.ndarray,
    scales: np.ndarray,
    tokens: torch.Tensor,
    tenants: np.ndarray,
    out: torch.Tensor,
) -> None:
    """``out[m] = base[tokens[m]] + tenant tenants[m]'s packed delta row of that token``
    (src/embedding.rs): float32 ``base`` ``[V, H]``, uint32 ``planes`` ``[T, P, V, W]``,
    float32 ``scales`` ``[T, P]`` / ``[T, P, V]``, int64 ``tokens`` (M of them) and
    ``tenants`` ``[M]`` (``-1`` = the base row), float32 ``out`` ``[..., H]``."""
    out_arr = _out_array(out)
    _core.packed_embedding(_plain(base), planes, scales, tokens.numpy(), tenants, out_arr)


def gather_embedding(
    tables: list[np.ndarray], tokens: torch.Tensor, table: np.ndarray, out: torch.Tensor
) -> None:
    """``out[m] = tables[table[m]][tokens[m]]`` (src/embedding.rs): float32 ``[V, H]``
    tables, int64 ``tokens`` (M of them) and ``table`` ``[M]``, float32 ``out``."""
    _core.gather_embedding(tables, tokens.numpy(), table, _out_array(out))


def _out_array(out: torch.Tensor) -> np.ndarray:
    """The array a kernel writes ``out`` through, refusing a tensor that needs a
    gradient: the write bypasses autograd. (The core refuses an ``out`` whose
    memory overlaps an input.)"""
    if out.requires_grad:
        raise QDeltaError(
            "out: expected a tensor that needs no gradient (the kernel writes it in place, "
            "unseen by autograd), found requires_grad=True"
        )
    return out.numpy()


def _plain(t: torch.Tensor) -> np.ndarray:
    """The array view of a tensor that is only read (detached only when needed:
    detaching is itself a dispatch, and these calls are decode-sized)."""
    return (t.detach() if t.requires_grad else t).numpy()


def base_arrays(layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A linear layer's weight and bias as the float32 arrays the fused kernel
    takes (views, no copy), or None when they are not float32 contiguous CPU tensors."""
    weight, bias = layer.weight, layer.bias
    ok = weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()
    if bias is not None:
        ok = ok and bias.dtype == torch.float32 and bias.is_contiguous()
    if not ok:
        return None
    return weight.detach().numpy(), None if bias is None else bias.detach().numpy()


def _bits_arg(bits: object) -> int | None:
    """``bits`` as the core takes it: None or an int (its range is the core's check)."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise DTypeError(f"bits: expected an int or None, found {type(bits).__name__}")
    return int(bits)


def _version(t: torch.Tensor) -> int | None:
    """The in-place modification counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def delta_matmul(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, *, bits: int | None = None
) -> torch.Tensor:
    """One tenant: ``y = sum_p alpha_p * x @ S_p^T`` (planes ``[P, N, W]``, scales ``[P]``/``[P, N]``)."""
    if planes.dim() != 3 or scales.dim() not in (1, 2):
        raise ShapeError(
            f"expected planes [P, N, W] and scales [P] or [P, N], found planes "
            f"{list(planes.shape)} and scales {list(scales.shape)}"
        )
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    ids = torch.zeros(rows, dtype=torch.int64)
    return multi_tenant_delta_matmul(x, planes[None], scales[None], ids, bits=bits)
