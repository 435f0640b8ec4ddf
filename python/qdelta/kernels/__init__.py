"""One dispatch point for the delta matmul kernels.

Tensor conventions shared by every backend:
- ``planes``: int32 ``[P, N, W]`` (one tenant) or ``[T, P, N, W]`` (tenants),
  ``W = ceil(K / 32)``, the project's bit layout (docs/FORMAT.md);
- ``scales``: float32 ``[P]`` / ``[P, N]`` (one tenant) or ``[T, P]`` / ``[T, P, N]``;
- ``x``: ``[M, K]`` in float32, float16 or bfloat16; the result ``[M, N]`` has x's dtype;
- ``tenant_ids``: int64 ``[M]``, ``-1`` = no delta for that row.

Backends: ``reference`` (torch, the oracle), ``cpu`` (Rust) and ``cuda``
(cupy) as they land; ``auto`` picks the fastest available for the device.

Only the reference is differentiable. When gradients are needed (grad mode on
and ``x`` or ``scales`` requires grad), ``auto`` runs the reference on every
device, CUDA included, so training through these functions gets gradients;
an explicit ``backend="cuda"`` then raises :class:`QDeltaError` instead of
returning a result without a gradient (its kernels have no backward). An
explicit ``backend="cpu"`` runs the Rust kernel as asked (no gradient).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch

from qdelta.errors import DTypeError, QDeltaError, ShapeError
from qdelta.kernels import cpu, reference
from qdelta.kernels import cuda as _cuda  # cupy itself is imported only when used

Backend = Literal["auto", "reference", "cpu", "cuda"]

#: "auto" runs the Rust kernel on CPU inputs of at most
#: ``max(CPU_MIN_ROWS, out_features * in_features // CPU_WEIGHTS_PER_ROW)`` rows.
#: The reference decodes the whole delta once per call and then uses BLAS, so
#: the more rows share that decode, the better it does; the kernel's cost grows
#: with rows times weights. Measured crossovers (Intel Xeon, 2 cores, AVX-512;
#: 1 plane; benches/crossover_gemv.py and docs/CPU_KERNEL.md): 128x128 at about
#: 200 rows, 256x256 about 150, 512x512 about 500, 1024x1024 about 600,
#: 2048x2048 about 1900. Inputs that need gradients stay on the
#: (differentiable) reference.
CPU_MIN_ROWS = 128
CPU_WEIGHTS_PER_ROW = 2048


def check_backend(backend: object) -> None:
    """Raises :class:`QDeltaError` unless ``backend`` is one of :data:`Backend`'s names."""
    if backend not in get_args(Backend):
        raise QDeltaError(f"backend: expected one of {get_args(Backend)}, found {backend!r}")


def cpu_max_rows(out_features: int, in_features: int) -> int:
    """The most rows "auto" hands to the Rust kernel for one ``[out, in]`` delta."""
    return max(CPU_MIN_ROWS, out_features * in_features // CPU_WEIGHTS_PER_ROW)


def tracing() -> bool:
    """jit.trace or torch.compile is recording: the Rust kernels write through
    numpy, which neither sees, so only torch ops may run."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _needs_grad(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether autograd would track the result (then only the reference will do)."""
    return torch.is_grad_enabled() and (x.requires_grad or scales.requires_grad)


def _use_cpu(
    x: torch.Tensor,
    scales: torch.Tensor,
    backend: str,
    out_features: int,
    tenants: Callable[[], int] | None = None,
) -> bool:
    """The CPU rule. ``tenants`` counts the distinct tenants of the rows (asked
    only when the rows pass the one-tenant limit): the reference decodes each
    tenant's delta once, so its cost grows with them while the kernel's grows
    with rows only, and the limit applies to rows per tenant."""
    check_backend(backend)
    if backend != "auto":
        return backend == "cpu"
    if tracing():  # a numpy-written result would be recorded as a constant
        return False
    needs_grad = _needs_grad(x, scales)
    in_features = x.shape[-1] if x.dim() else 0
    rows = x.numel() // max(in_features, 1) if x.dim() else 0
    if not (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not needs_grad
    ):
        return False
    limit = cpu_max_rows(out_features, in_features)
    return rows <= limit or (tenants is not None and rows <= limit * max(tenants(), 1))


def delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``y = sum_p alpha_p * x @ S_p^T`` for one tenant's delta."""
    _check_tensors(x=x, planes=planes, scales=scales)
    if planes.dim() == 3:
        bits = _check_bits(bits, planes.shape[0])  # once, the same for every backend
    if _use_cuda(backend, x, scales) and _kernel_dtype(x, backend):
        from qdelta.kernels import cuda

        return _rows_through(x, lambda x2: cuda.delta_matmul(x2, planes, scales, bits=bits))
    if _use_cpu(x, scales, backend, planes.shape[-2]):
        return cpu.delta_matmul(x, planes, scales, bits=bits)
    return reference.delta_matmul(x, planes, scales, bits=bits)


_NARROW_IDS = (torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_tensors(**arguments: object) -> None:
    """Every argument a torch tensor (the dispatch reads their attributes first)."""
    for name, value in arguments.items():
        if not isinstance(value, torch.Tensor):
            raise DTypeError(f"{name}: expected a torch.Tensor, found {type(value).__name__}")


def _kernel_dtype(x: torch.Tensor, backend: str) -> bool:
    """Whether the CUDA kernels take x's dtype; "auto" sends float64 to the
    reference (it computes in float64), "cuda" lets the kernel refuse it by name."""
    return backend == "cuda" or x.dtype != torch.float64


def _rows_through(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run`` on x as ``[rows, K]`` (the kernels' shape), the result as ``[..., N]``,
    so x of any leading shape works as with the other backends."""
    if not isinstance(x, torch.Tensor) or x.dim() == 2 or x.dim() == 0:
        return run(x)
    y = run(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _check_bits(bits: object, stored: int) -> int | None:
    """``bits`` (None: every plane) as an int in 1..=stored, or a ShapeError naming it."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise DTypeError(f"bits: expected an int or None, found {type(bits).__name__}")
    if not 1 <= bits <= stored:
        raise ShapeError(f"bits: expected 1..={stored} (planes stored), found {bits}")
    return int(bits)


def multi_tenant_delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    tenant_ids: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-row tenant delta: ``y[m] = sum_p alpha[t_m, p] * x[m] @ S[t_m, p]^T``."""
    _check_tensors(x=x, planes=planes, scales=scales, tenant_ids=tenant_ids)
    if _use_cuda(backend, x, scales) and _kernel_dtype(x, backend):
        from qdelta.kernels import cuda

        if planes.dim() == 4 and 0 in planes.shape[:3]:  # the CPU backends refuse it too
            reference.check_stack_sizes(planes, x.shape[-1])

        if isinstance(tenant_ids, torch.Tensor) and tenant_ids.dtype in _NARROW_IDS:
            tenant_ids = tenant_ids.to(torch.int64)  # what the reference takes too
        return _rows_through(
            x, lambda x2: cuda.multi_tenant_delta_matmul(x2, planes, scales, tenant_ids)
        )

    def tenants() -> int:
        return int(torch.unique(tenant_ids[tenant_ids >= 0]).numel())

    if _use_cpu(x, scales, backend, planes.shape[-2], tenants):
        return cpu.multi_tenant_delta_matmul(x, planes, scales, tenant_ids)
    return reference.multi_tenant_delta_matmul(x, planes, scales, tenant_ids)


CudaChoice = Literal["cuda", "no-cupy", "other"]


def cuda_choice(
    backend: str, *, is_cuda: bool, needs_grad: bool, cuda_available: Callable[[], bool]
) -> CudaChoice:
    """Whether a call goes to the cupy kernels (pure: unit-tested on any machine).

    ``"cuda"``: run the CUDA kernel; ``"no-cupy"``: ``auto`` on a CUDA tensor
    without cupy (the caller warns once and runs the reference); ``"other"``:
    not a CUDA call, the CPU rule (``_use_cpu``) decides. ``auto`` on a CUDA
    tensor that needs gradients is ``"other"`` (the differentiable reference).
    Raises :class:`QDeltaError` for ``backend="cuda"`` when gradients are needed
    or no CUDA device and cupy are there. ``cuda_available`` is called only when
    the answer depends on it.
    """
    check_backend(backend)
    if backend == "cuda":
        if needs_grad:
            raise QDeltaError(
                "backend 'cuda': expected inputs that need no gradient (the CUDA kernels "
                "have no backward), found x or scales requiring grad; use backend='auto' "
                "(the differentiable torch reference) or torch.no_grad()"
            )
        if not cuda_available():
            raise QDeltaError("backend 'cuda': expected a CUDA device and cupy, found none")
        return "cuda"
    if backend != "auto" or not is_cuda or needs_grad:
        return "other"
    return "cuda" if cuda_available() else "no-cupy"


_warned_no_cupy = False


def _cuda_available() -> bool:
    from qdelta.kernels import cuda

    return cuda.available()


def _use_cuda(backend: str, x: torch.Tensor, scales: torch.Tensor) -> bool:
    """:func:`cuda_choice` for these tensors; warns once when cupy is missing.

    "On the kernel device" is the CUDA backend's runtime's answer: ``x.is_cuda``, or
    under ``qdelta.kernels.emulator.emulate()`` any tensor, so the modules' CUDA path
    is tested on CPU.
    """
    return _use_cuda_for(backend, _cuda.RUNTIME.on_device(x), _needs_grad(x, scales))


def _use_cuda_for(backend: str, is_cuda: bool, needs_grad: bool) -> bool:
    global _warned_no_cupy
    choice = cuda_choice(
        backend, is_cuda=is_cuda, needs_grad=needs_grad, cuda_available=_cuda_available
    )
    if choice == "no-cupy" and not _warned_no_cupy:
        _warned_no_cupy = True
        warnings.warn(
            "qdelta: cupy is not importable; CUDA tensors use the torch reference kernels",
            RuntimeWarning,
            stacklevel=4,
        )
    return choice == "cuda"
