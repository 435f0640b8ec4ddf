"""CUDA backend: qdelta/_cuda/delta_matmul.cu compiled at run time by cupy.RawModule.

Torch tensors are passed by pointer (no copies) and every kernel runs on
torch's current stream. Set ``QDELTA_CUDA_SYNC=1`` to synchronize after each
launch, so an asynchronous fault is reported at the launch that caused it.
"""

from __future__ import annotations

import abc
import functools
import os
import re
import weakref
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from qdelta._cuda import DIR as KERNEL_DIR
from qdelta.errors import DTypeError, QDeltaError, ShapeError
from qdelta.kernels import autotune  # REPEATS, for the runtimes' timers

CUDA_DIR = KERNEL_DIR  # the .cu files ship inside the package (qdelta/_cuda)
SOURCE = CUDA_DIR / "delta_matmul.cu"

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SPLITS = {0: 1, 1: 1, 2: 3}  # fp32 runs as three exact bf16 parts
# (FT, NT, WF, WM, KS): warp tile 16*FT features x 8*NT rows; WF x WM warp tiles; KS-way split K.
# Tensor-core kernel, the "mma" path ("auto" picks it for M <= DECODE_MMA_MAX_ROWS).
TILES = {"decode": (2, 1, 1, 1, 8), "prefill": (2, 4, 2, 2, 1)}
PREP_THREADS = 256

# Path rule for "auto" (docs/CUDA.md): the lookup-table decode kernel while the
# rows are few: M <= DECODE_MAX_ROWS with tenant ids, M <= DECODE_MAX_ROWS_ONE_TENANT
# without; otherwise expand each tenant's delta once and use cuBLAS (prefill).
DECODE_MAX_ROWS = 64
DECODE_MAX_ROWS_ONE_TENANT = 16
# Single-row decode goes to the tensor-core kernel: on an H200 it took 14.1 / 20.4 us
# (N = K = 4096 / 8192) against 27.9 / 29.6 us for the lookup-table kernel, whose
# table build and second launch are fixed costs. 0 sends every decode to the tables.
DECODE_MMA_MAX_ROWS = 1
# The table kernel reads 32 bytes of a row per slice; with this set its loads ask L2
# for the whole 128-byte line (PTX ld .L2::128B), so the row's next three slices hit
# L2 instead of DRAM. False: plain 32-byte sector reads (the first measured version).
LUT_L2_LINE_LOADS = True
# The table kernel loads the next K slice's words while the current slice's lookups run
# (qd_delta_lut<..., 1>). False: each slice's loads are issued at its start, before
# its table is built (the measured default). Checked by the emulator; not yet timed.
LUT_PREFETCH_NEXT = False
# The one-row tensor-core tile (M <= 64, fp16/bf16) reads x straight into its mma
# fragments; False restores the qd_prep_x launch and its scratch (the measured version).
MMA_DIRECT_X = True
# Feature-tile cap of the "lut-narrow" choice. A full tile is 1024 rows; with 128-byte L2
# lines (LUT_L2_LINE_LOADS) a wave of 264 such blocks keeps about 35 MB of lines open
# for their next slices, near all of an H200's 50 MB L2. At 256 rows it is a quarter,
# and the table build is amortized over 4x fewer lookups. Not yet timed.
LUT_NARROW_FEATURES = 256
# lut_plan splits K (then shrinks feature tiles) until the grid has this many blocks per
# SM. Fewer blocks mean more K slices per block, which is what the prefetch needs to
# hide latency; 3 is the measured default.
LUT_BLOCKS_PER_SM = 3
# Prefill expansion kernel: "rows" (qd_expand_rows: 2-D grid, no 64-bit division,
# sign-bit flip for one plane) or "flat" (the original qd_expand). Same output bits.
EXPAND_KERNEL = "rows"
# What path="prefill" (and "auto" above the decode limits) runs: "expand" (expand each
# tenant's delta, then cuBLAS; measured on the H200 at 1.40x a dense GEMM) or "gemm"
# (qd_delta_gemm: one fused tensor-core GEMM straight from the packed words, no dense
# delta written; checked by the emulator, not yet timed on a GPU). fp16/bf16 only:
# fp32 inputs and more than GEMM_MAX_PLANES planes always expand.
PREFILL_KERNEL = "expand"  # or "overlap": the expansion overlapped with cuBLAS (overlap.py)
SIDE_STREAMS = 4  # streams the overlapped prefill runs its GEMM pieces on
# Fused prefill GEMM (qd_delta_gemm): tile and pipeline shape, as in the .cu file.
# x rows per block (one tile of one tenant's rows): 128 (NT = 8 row tiles per warp) or
# 64 (NT = 4: twice the blocks when M is small; each sign fragment feeds 4 mmas, not 8).
GEMM_ROWS = 128
GEMM_ROW_CHOICES = (128, 64)
GEMM_FEATURES = 128  # output features per block
GEMM_THREADS = 128
GEMM_STAGES = 3
GEMM_WORDS = 4  # packed words (128 k) per pipeline stage
GEMM_XSTRIDE = GEMM_WORDS * 32 + 8  # halves per staged x row
# More planes than this do not fit the stages in an sm_80 block's shared memory (163 KB).
GEMM_MAX_PLANES = 8
MAX_GRID_Y = 65535
LUT_GROUP_ROWS = (1, 2, 4)  # R: x rows sharing one read of a tenant's planes
SHARED_LIMIT_SM90 = 227 * 1024  # opt-in shared memory per block of an H100/H200
SHARED_STATIC_MARGIN = 1024  # the kernels' static __shared__ arrays (a few hundred bytes)
LUT_THREADS = 256  # 8 warps: the kernel's table build assumes exactly this
LUT_WORDS = 8  # packed words per K slice (one 32 KB table per x row)
LUT_BYTES_PER_ROW = 256 * 4 * LUT_WORDS * 4
FINISH_THREADS = 256
EXPAND_THREADS = 256

Path_ = Literal["auto", "decode", "prefill", "gemm", "mma"]


class KernelLaunchError(QDeltaError):
    """A CUDA kernel could not be compiled, launched or failed while running."""


def name_expressions() -> list[str]:
    """Every template instantiation this module launches (the .cu file lists the same)."""
    dts = list(DTYPE_CODES.values())
    names = [f"qd_prep_x<{dt}>" for dt in dts]
    for tile in TILES.values():
        names += [f"qd_delta_mm<{dt}, {', '.join(map(str, tile))}>" for dt in dts]
    names += [
        f"qd_delta_lut<{dt}, {r}, {pf}>" for pf in (0, 1) for r in LUT_GROUP_ROWS for dt in dts
    ]
    names += [f"qd_lut_finish<{dt}>" for dt in dts]
    names += [f"qd_expand<{dt}>" for dt in dts]
    names += [f"qd_expand_rows<{dt}>" for dt in dts]
    names += [f"qd_delta_gemm<{dt}, {r // 16}>" for r in GEMM_ROW_CHOICES for dt in dts[:2]]
    return names


def declared_instantiations(source: str) -> list[str]:
    """The ``// qdelta-instantiate: name<...>`` lines of a .cu file."""
    return [m.strip() for m in re.findall(r"//\s*qdelta-instantiate:\s*(.+)", source)]


@functools.cache
def _cupy():
    import cupy

    return cupy


def available() -> bool:
    """True when torch sees a CUDA device and cupy imports (or the emulator runs the kernels)."""
    if RUNTIME.emulated:
        return True
    return torch.cuda.is_available() and _cupy_importable()


@functools.cache  # a failed import is not cached by _cupy: ask once, not every call
def _cupy_importable() -> bool:
    try:
        _cupy()
    except Exception:
        return False
    return True


class KernelRuntime(abc.ABC):
    """Where the kernels are compiled and run: the seam between the host code and cupy.

    Every host path of this module and of qdelta.ring.cuda_block asks the module-level
    ``RUNTIME`` whether a tensor is on the kernel device, for a compiled module, for
    the SM count and to launch. The default (:class:`CupyRuntime`) is cupy on CUDA
    devices; ``qdelta.kernels.emulator.emulate()`` swaps in a CPU emulator so the same
    host code and kernel sources run in CI without a GPU.
    """

    emulated = False  # True: CPU tensors, no cupy and no torch.cuda calls

    def __init__(self) -> None:
        self.kernels: dict[tuple[int, str], object] = {}  # (device index, name) -> kernel
        self.shared_opt_in: dict[tuple[int, str], int] = {}  # dynamic shared memory allowed

    @abc.abstractmethod
    def on_device(self, t: torch.Tensor) -> bool:
        """True when ``t`` lives where the kernels run."""

    @abc.abstractmethod
    def device_index(self, device: torch.device) -> int:
        """The index of ``device`` (the current device when it names none)."""

    @abc.abstractmethod
    def sm_count(self, index: int) -> int:
        """Streaming multiprocessors of device ``index`` (launch plans depend on it)."""

    @abc.abstractmethod
    def module(self, index: int, source: Path, options: tuple[str, ...], names: tuple[str, ...]):
        """The compiled module of ``source`` for device ``index`` (has ``get_function``)."""

    @abc.abstractmethod
    def launch(self, kernel, device, name, grid, block, args, shared_mem) -> None:
        """Run ``kernel``; a failed launch raises KernelLaunchError naming it."""

    @abc.abstractmethod
    def device_name(self, index: int) -> str:
        """What autotuning decisions are keyed by (a new card is measured afresh)."""

    def shared_limit(self, index: int) -> int:
        """Shared memory one block may opt in to on device ``index`` (bytes): the
        launch plans stay within it (sm_86/89 cards allow 99 KB, sm_80 163 KB,
        sm_90 227 KB)."""
        return SHARED_LIMIT_SM90

    def capturing(self, device: torch.device) -> bool:
        """True while a CUDA graph is being captured (nothing may be timed then)."""
        return False

    def current_stream(self, device: torch.device):
        """The stream kernels are queued on (None: one implicit stream)."""
        return None

    def side_streams(self, device: torch.device) -> list:
        """Extra streams work may fork onto and join back from ([]: run in order)."""
        return []

    def stream_context(self, stream):
        """A context that queues torch work and kernel launches on ``stream``."""
        import contextlib

        return contextlib.nullcontext()

    def time_us(self, device: torch.device, fn) -> float:
        """Median wall time of ``fn`` in microseconds, after one warm-up call."""
        import time

        fn()
        times = []
        for _ in range(autotune.REPEATS):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return sorted(times)[len(times) // 2]


@functools.cache
def _cupy_module(index: int, source: Path, options: tuple[str, ...], names: tuple[str, ...]):
    cupy = _cupy()
    with cupy.cuda.Device(index):
        module = cupy.RawModule(
            code=source.read_text(encoding="utf-8"), options=options, name_expressions=list(names)
        )
        if source == SOURCE:  # delta_matmul.cu compiles at once (errors surface here)
            module.compile()
    return module


class CupyRuntime(KernelRuntime):
    """cupy.RawModule kernels on torch's current CUDA stream (the default runtime)."""

    def on_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def device_index(self, device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def sm_count(self, index: int) -> int:
        return _sm_count(index)

    def module(self, index: int, source: Path, options: tuple[str, ...], names: tuple[str, ...]):
        return _cupy_module(index, source, options, names)

    def launch(self, kernel, device, name, grid, block, args, shared_mem) -> None:
        cupy = _cupy()
        index = _device_index(device)
        stream = _stream(index, torch.cuda.current_stream(device).cuda_stream)
        _check_grid(name, grid)
        try:
            with cupy.cuda.Device(index), stream:
                _opt_in_shared(kernel, self.shared_opt_in, index, name, shared_mem)
                kernel(grid, block, args, shared_mem=shared_mem)
            if os.environ.get("QDELTA_CUDA_SYNC") == "1":
                torch.cuda.synchronize(device)
        except Exception as exc:
            raise KernelLaunchError(
                f"{name} grid={grid} block={block}: expected a clean launch, found {exc}"
            ) from exc

    def device_name(self, index: int) -> str:
        return _device_name(index)

    def shared_limit(self, index: int) -> int:
        return _shared_limit(index)

    def capturing(self, device: torch.device) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def side_streams(self, device: torch.device) -> list:
        index = _device_index(device)
        streams = _SIDE_STREAMS.get(index)
        if streams is None:
            with torch.cuda.device(index):
                streams = [torch.cuda.Stream() for _ in range(SIDE_STREAMS)]
            _SIDE_STREAMS[index] = streams
        return streams

    def stream_context(self, stream):
        return torch.cuda.stream(stream)

    def time_us(self, device: torch.device, fn) -> float:
        """Median CUDA-event time of ``fn`` on torch's current stream, after a warm-up call.

        L2 is flushed before each timed call: in a model the weights of a layer come
        from HBM (the other layers evicted them), so a candidate is timed that way too.
        The GPU is kept busy (torch.cuda._sleep) while the host enqueues the call, so
        the events time the kernels, not the host's launch cost (which a CUDA graph
        removes and which is about the same for every choice).
        """
        fn()
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(max(l2, 1 << 20) * 2, dtype=torch.uint8, device=device)
        sleep = getattr(torch.cuda, "_sleep", None)
        pairs = []
        for _ in range(autotune.REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            if sleep is not None:
                sleep(1_000_000)  # about 0.5 ms of GPU time, longer than one call's enqueue
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = sorted(s.elapsed_time(e) * 1000.0 for s, e in pairs)
        return times[len(times) // 2]


RUNTIME: KernelRuntime = CupyRuntime()
_SIDE_STREAMS: dict[int, list] = {}  # device index -> streams the overlapped prefill forks onto
_STREAMS: dict[tuple[int, int], object] = {}  # (device, stream handle) -> ExternalStream


def _module(device_index: int, options: tuple[str, ...]):
    try:
        return RUNTIME.module(device_index, SOURCE, options, tuple(name_expressions()))
    except Exception as exc:
        raise KernelLaunchError(f"compiling {SOURCE.name} failed: {exc}") from exc


def _kernel(index: int, name: str):
    """The compiled kernel, looked up once per device (get_function is not free)."""
    key = (index, name)
    kernels = RUNTIME.kernels
    kernel = kernels.get(key)
    if kernel is None:
        module = _module(index, ("-std=c++17",))
        try:
            kernel = module.get_function(name)
        except Exception as exc:
            raise KernelLaunchError(f"kernel {name} not found in {SOURCE.name}: {exc}") from exc
        kernels[key] = kernel
    return kernel


def _stream(index: int, handle: int):
    """A cupy view of torch's stream, made once per (device, stream handle)."""
    key = (index, handle)
    stream = _STREAMS.get(key)
    if stream is None:
        cupy = _cupy()
        with cupy.cuda.Device(index):  # the view belongs to the stream's device
            stream = cupy.cuda.ExternalStream(handle)
        if len(_STREAMS) > 256:  # streams come and go: keep the cache bounded
            _STREAMS.clear()
        _STREAMS[key] = stream
    return stream


def launch(kernel, device: torch.device, name: str, grid, block, args, shared_mem: int = 0) -> None:
    """Launch a compiled cupy kernel on torch's current stream of ``device``, checked.

    The grid is checked against CUDA's limits first (ShapeError); dynamic shared
    memory above 48 KB is opted into once per kernel; any launch failure, and with
    ``QDELTA_CUDA_SYNC=1`` any fault while the kernel runs, raises KernelLaunchError
    naming the kernel and its launch shape. Shared by every cupy module of qdelta
    (this one and qdelta.ring.cuda_block). Runs through ``RUNTIME`` (cupy, or the
    CPU emulator under ``qdelta.kernels.emulator.emulate()``).
    """
    RUNTIME.launch(kernel, device, name, grid, block, args, shared_mem)


def _check_grid(name: str, grid) -> None:
    if any(g < 1 for g in grid) or grid[0] > 2**31 - 1 or any(g > 65535 for g in grid[1:]):
        raise ShapeError(f"{name}: grid {grid} is outside what CUDA can launch")


def _opt_in_shared(kernel, opted: dict, index: int, name: str, shared_mem: int) -> None:
    """Dynamic shared memory above 48 KB needs the kernel's opt-in, set once per kernel."""
    if shared_mem > 48 * 1024 and opted.get((index, name), 0) < shared_mem:
        if kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem
        opted[(index, name)] = shared_mem


def _launch(device: torch.device, name: str, grid, block, args, shared_mem: int = 0) -> None:
    """Launch kernel ``name`` of qdelta/_cuda/delta_matmul.cu (see :func:`launch`)."""
    kernel = _kernel(_device_index(device), name)
    launch(kernel, device, name, grid, block, args, shared_mem)


_NULL = np.uint64(0)


def _ptr(t: torch.Tensor | None):
    return _NULL if t is None else np.uint64(t.data_ptr())


def _check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.device != device:
        raise DTypeError(f"{name}: expected a tensor on {device} (like x), found {t.device}")


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ShapeError(f"{name}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}")
    if shape[0] and shape[1] and t.stride(1) != 1:
        raise ShapeError(f"{name}: expected unit stride along the last axis, found {t.stride()}")


def multi_tenant_delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    tenant_ids: torch.Tensor | None,
    *,
    bits: int | None = None,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    check_ids: bool = True,
    path: Path_ = "auto",
) -> torch.Tensor:
    """``y[m] = base[m] + sum_p alpha[t_m, p] * x[m] @ S[t_m, p]^T`` on the GPU.

    ``planes`` int32 ``[T, P, N, W]``, ``scales`` float32 ``[T, P]`` or ``[T, P, N]``,
    ``tenant_ids`` int64 ``[M]`` (``-1`` = no delta; ``None`` = every row tenant 0).
    ``base`` (optional, ``[M, N]``, x's dtype) is added in fp32 before the cast;
    ``out`` may be ``base`` itself (in-place ``y += delta``). Given ids, they and the
    used tenants' scales are checked (in range, finite) in one read back to the host;
    with ``check_ids=False`` (or no ids: one tenant) nothing is (no sync): an
    out-of-range id then turns its output row into NaN instead of raising, a
    non-finite scale its rows' outputs.

    ``path``: ``"decode"`` (lookup-table kernel, few rows), ``"prefill"`` (the kernel
    PREFILL_KERNEL names: ``"expand"`` each tenant's delta once to a dense matrix in x's
    dtype, then cuBLAS, or the fused ``"gemm"``; the prefill paths read the ids on the
    host once), ``"gemm"`` (the fused tensor-core GEMM from the packed words, fp16/bf16;
    fp32 expands), ``"mma"`` (tensor-core kernel for few rows) or
    ``"auto"`` (:func:`auto_path`): mma for one row, decode for M <= 64 rows with tenant
    ids (M <= 16 for one tenant), else prefill. All paths compute the same result (docs/CUDA.md).
    """
    if path not in ("auto", "decode", "prefill", "gemm", "mma"):
        raise ShapeError(
            f"path: expected 'auto', 'decode', 'prefill', 'gemm' or 'mma', found {path!r}"
        )
    if not isinstance(x, torch.Tensor) or not RUNTIME.on_device(x):
        found = x.device if isinstance(x, torch.Tensor) else type(x).__name__
        raise DTypeError(f"x: expected a CUDA torch.Tensor, found {found}")
    device = x.device
    if x.dtype not in DTYPE_CODES:
        raise DTypeError(f"x: expected float16, bfloat16 or float32, found {x.dtype}")
    if x.dim() != 2:
        raise ShapeError(f"x: expected [M, K], found {list(x.shape)}")
    m_rows, k = x.shape
    for name, t in (("planes", planes), ("scales", scales)):
        _check_cuda(name, t, device)
    if planes.dtype != torch.int32 or planes.dim() != 4:
        raise DTypeError(
            f"planes: expected int32 [T, P, N, W], found {planes.dtype} {list(planes.shape)}"
        )
    tenants, n_planes, n, w = planes.shape
    if w != -(-k // 32):
        raise ShapeError(f"planes: expected W = ceil(K/32) = {-(-k // 32)} words, found {w}")
    if not planes.is_contiguous():
        raise ShapeError("planes: expected a contiguous tensor")
    row_scales = scales.dim() == 3
    if scales.dtype != torch.float32 or tuple(scales.shape) not in (
        (tenants, n_planes),
        (tenants, n_planes, n),
    ):
        raise ShapeError(
            f"scales: expected float32 [{tenants}, {n_planes}] or [{tenants}, {n_planes}, {n}], "
            f"found {scales.dtype} {list(scales.shape)}"
        )
    scales = scales.contiguous()
    use = n_planes if bits is None else bits
    if not 0 <= use <= n_planes:
        raise ShapeError(f"bits: expected 0..{n_planes}, found {bits}")
    if tenant_ids is not None:
        _check_cuda("tenant_ids", tenant_ids, device)
        if tenant_ids.dtype != torch.int64 or tuple(tenant_ids.shape) != (m_rows,):
            raise ShapeError(
                f"tenant_ids: expected int64 [{m_rows}], found {tenant_ids.dtype} "
                f"{list(tenant_ids.shape)}"
            )
        tenant_ids = tenant_ids.contiguous()
    if tenant_ids is not None and check_ids and m_rows and tenants:
        _check_ids_and_scales(tenant_ids, scales, tenants, use)
    if base is not None:
        _check_cuda("base", base, device)
        _check_rows("base", base, (m_rows, n), x.dtype)
    if out is None:
        out = torch.empty(m_rows, n, dtype=x.dtype, device=device)
    else:
        _check_cuda("out", out, device)
        _check_rows("out", out, (m_rows, n), x.dtype)
    if m_rows == 0 or n == 0:
        return out
    if k == 0 or use == 0 or tenants == 0:
        if base is None:
            out.zero_()
        elif out.data_ptr() != base.data_ptr():
            out.copy_(base)
        return out
    if x.stride(1) != 1:  # the kernels read rows of K: a transposed x is taken as the CPU takes it
        x = x.contiguous()

    dt = DTYPE_CODES[x.dtype]
    args = (x, planes, scales, tenant_ids, base, out, use, row_scales, dt)
    if path == "auto":
        choice = choices.auto_choice(tenant_ids is None or tenants == 1, args)
    else:
        choice = choices.path_choice(path)
    choices.run_choice(choice, *args)
    return out


# id(scales) -> (a weak reference to it, (version, data_ptr, planes used), [T] bool
# of tenants with a non-finite scale or None when all are finite): one scan per
# change of a stack. Keyed by id: tensors compare elementwise, so no WeakKeyDictionary.
_NONFINITE: dict[int, tuple] = {}


def _nonfinite_tenants(scales: torch.Tensor, tenants: int, use: int) -> torch.Tensor | None:
    key = (scales._version, scales.data_ptr(), use)
    hit = _NONFINITE.get(id(scales))
    if hit is not None and hit[0]() is scales and hit[1] == key:
        return hit[2]
    flags = (~torch.isfinite(scales[:, :use])).reshape(tenants, -1).any(1)
    found = flags if bool(flags.any()) else None  # a sync once per version of the stack
    ident = id(scales)
    ref = weakref.ref(scales, lambda _, ident=ident: _NONFINITE.pop(ident, None))
    _NONFINITE[ident] = (ref, key, found)
    return found


def _check_ids_and_scales(tenant_ids, scales, tenants: int, use: int) -> None:
    """Ids in -1..T-1 and finite scales for the tenants the rows use (as the CPU
    kernel checks), read back in one sync; a stack whose scales are all finite
    (the usual case, scanned once per change) costs what the ids check alone does."""
    bad = (tenant_ids < -1) | (tenant_ids >= tenants)
    nonfinite = _nonfinite_tenants(scales, tenants, use)
    if nonfinite is None:
        ids_bad, scales_bad = bool(bad.any()), False
    else:
        used = nonfinite[tenant_ids.clamp(0, tenants - 1)] & (tenant_ids >= 0)
        ids_bad, scales_bad = torch.stack([bad.any(), used.any()]).tolist()
    if ids_bad:
        first = int(bad.nonzero()[0, 0])
        raise ShapeError(
            f"tenant_ids: expected -1..{tenants - 1}, found {int(tenant_ids[first])} at row {first}"
        )
    if scales_bad:
        from qdelta.kernels.reference import _check_finite

        used_ids = torch.unique(tenant_ids[tenant_ids >= 0]).tolist()
        _check_finite(scales[:, :use].cpu(), used_ids)


def auto_path(m_rows: int, one_tenant: bool) -> str:
    """The path ``path="auto"`` takes for ``m_rows`` rows (docs/CUDA.md has the measurements).

    mma for M <= DECODE_MMA_MAX_ROWS; the table kernel up to DECODE_MAX_ROWS rows
    (DECODE_MAX_ROWS_ONE_TENANT when every row is one tenant); prefill above.
    """
    if m_rows <= DECODE_MMA_MAX_ROWS:
        return "mma"
    limit = DECODE_MAX_ROWS_ONE_TENANT if one_tenant else DECODE_MAX_ROWS
    return "decode" if m_rows <= limit else "prefill"


@functools.cache
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _shared_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:  # older torch: ask the driver through cupy
        limit = _cupy().cuda.Device(device_index).attributes["MaxSharedMemoryPerBlockOptin"]
    return int(limit)


def _dynamic_shared_limit(device: torch.device) -> int:
    """What a launch may ask for: the opt-in limit less the kernels' static arrays."""
    return RUNTIME.shared_limit(_device_index(device)) - SHARED_STATIC_MARGIN


def lut_max_rows(dynamic_limit: int) -> int:
    """The largest R whose R lookup tables fit in ``dynamic_limit`` bytes."""
    fits = [r for r in LUT_GROUP_ROWS if r * LUT_BYTES_PER_ROW <= dynamic_limit]
    if not fits:
        raise ShapeError(
            f"decode kernel: expected at least {LUT_BYTES_PER_ROW} bytes of shared memory per "
            f"block, found {dynamic_limit} on this device"
        )
    return fits[-1]


def _device_index(device: torch.device) -> int:
    return RUNTIME.device_index(device)


def lut_plan(
    m_rows: int,
    n: int,
    w: int,
    use: int,
    tenants: int | None,
    sms: int,
    per_sm: int = 3,
    max_features: int | None = None,
    max_rows: int = LUT_GROUP_ROWS[-1],
) -> dict:
    """Launch shape of the decode kernel (pure function of the shapes; unit-tested on CPU).

    ``tenants`` is None when every row is tenant 0. R (rows per group) is a guess
    of rows per tenant made without reading the ids: any R gives the same result.
    ``max_features`` caps the feature tile (``nb``, rounded down to 32): the rows a
    wave of blocks has open in L2 at once (see LUT_NARROW_FEATURES). ``max_rows`` caps R
    (each row's table is 32 KB of shared memory: :func:`lut_max_rows` of the device).
    """
    return dict(_lut_plan(m_rows, n, w, use, tenants, sms, per_sm, max_features, max_rows))


@functools.lru_cache(maxsize=4096)
def _lut_plan(
    m_rows, n, w, use, tenants, sms, per_sm, max_features=None, max_rows=LUT_GROUP_ROWS[-1]
) -> dict:
    """lut_plan, cached: decode calls repeat the same shapes every step."""
    per_tenant = m_rows if tenants is None else -(-m_rows // max(1, min(m_rows, tenants)))
    allowed = [r for r in LUT_GROUP_ROWS if r <= max_rows]
    rows = next((r for r in allowed if per_tenant <= r), allowed[-1])
    nb_max = 32 * (32 // rows)  # 8 warps x 4 features x (32 / R) steps
    nb = nb_max if max_features is None else max(32, min(nb_max, max_features // 32 * 32))
    slices = -(-w // LUT_WORDS)
    groups = -(-m_rows // rows)
    kch_max = max(1, min(slices, w // 16))  # partial sums stay <= 1/8 of the plane bytes
    kch = 1
    target = per_sm * sms
    while -(-n // nb) * groups * use * kch < target:
        if kch < kch_max:
            kch = min(kch_max, 2 * kch)
        elif nb > 32:
            nb //= 2
        else:
            break
    spc = -(-slices // kch)  # slices per K chunk
    kch = -(-slices // spc)  # no empty chunk
    return {"rows": rows, "nb": nb, "nb_max": nb_max, "spc": spc, "kch": kch, "slices": slices}


@functools.lru_cache(maxsize=4096)
def _lut_launches(
    m_rows,
    k,
    n,
    w,
    tenants,
    n_planes,
    use,
    row_scales,
    one_tenant,
    dt,
    ldx,
    ldb,
    ldy,
    sms,
    flags,
    prefetch,
    per_sm,
    max_features=None,
    max_rows=LUT_GROUP_ROWS[-1],
) -> tuple:
    """Everything of the two decode launches that depends only on shapes, built once.

    A decode step repeats the same shapes every call; making the numpy scalars and the
    plan again each time was most of the host cost of a call.
    """
    plan = _lut_plan(
        m_rows, n, w, use, None if one_tenant else tenants, sms, per_sm, max_features, max_rows
    )
    assert plan["nb"] <= plan["nb_max"] and plan["spc"] * plan["kch"] >= plan["slices"]
    z = use * plan["kch"]
    ints = (m_rows, n, w, tenants, n_planes, int(row_scales), plan["nb"], plan["spc"], plan["kch"])
    lut = (
        f"qd_delta_lut<{dt}, {plan['rows']}, {int(prefetch)}>",
        (-(-n // plan["nb"]), m_rows, z),
        (np.int64(ldx), np.int32(k)),
        tuple(np.int32(v) for v in (*ints, flags)),
        plan["rows"] * LUT_BYTES_PER_ROW,
    )
    finish = (
        f"qd_lut_finish<{dt}>",
        (min(-(-m_rows * n // FINISH_THREADS), 32 * sms),),
        (np.int32(z), np.int32(tenants), np.int64(ldb), np.int64(ldy)),
        (np.int32(m_rows), np.int32(n)),
    )
    return z, lut, finish


def _run_lut(
    x, planes, scales, tenant_ids, base, out, use, row_scales, dt, prefetch, max_features=None
) -> None:
    """Decode: lookup-table kernel writes partial sums, qd_lut_finish reduces + adds base."""
    device = x.device
    m_rows, k = x.shape
    tenants, n_planes, n, w = planes.shape
    sms = RUNTIME.sm_count(_device_index(device))
    flags = 1 if LUT_L2_LINE_LOADS else 0
    ldb = base.stride(0) if base is not None else 0
    max_rows = lut_max_rows(_dynamic_shared_limit(device))
    z, lut, finish = _lut_launches(
        m_rows, k, n, w, tenants, n_planes, use, row_scales, tenant_ids is None, dt,
        x.stride(0), ldb, out.stride(0), sms, flags, prefetch, LUT_BLOCKS_PER_SM, max_features,
        max_rows,
    )  # fmt: skip
    part = torch.empty(z * m_rows * n, dtype=torch.float32, device=device)
    ids, p_part = _ptr(tenant_ids), _ptr(part)
    name, grid, (ldx, k32), ints, shared = lut
    args = (_ptr(x), ldx, k32, _ptr(planes), _ptr(scales), ids, p_part, *ints)
    _launch(device, name, grid, (LUT_THREADS,), args, shared_mem=shared)
    name, grid, (z32, t32, ldb64, ldy64), tail = finish
    args = (p_part, z32, ids, t32, _ptr(base), ldb64, _ptr(out), ldy64, *tail)
    _launch(device, name, grid, (FINISH_THREADS,), args)


def _expand(planes_t, scales_t, use, row_scales, dt, dtype, k) -> torch.Tensor:
    """One tenant's delta as a dense ``[N, K]`` view (row stride 32 * W) in ``dtype``."""
    _, n, w = planes_t.shape
    device = planes_t.device
    dense = torch.empty(n, 32 * w, dtype=dtype, device=device)
    args = (
        _ptr(planes_t),
        _ptr(scales_t),
        np.int32(n),
        np.int32(w),
        np.int32(use),
        np.int32(1 if row_scales else 0),
        _ptr(dense),
    )
    if EXPAND_KERNEL == "rows":
        grid = (-(-4 * w // EXPAND_THREADS), min(n, 65535))
        _launch(device, f"qd_expand_rows<{dt}>", grid, (EXPAND_THREADS,), args)
    else:
        groups = n * w * 4
        sms = RUNTIME.sm_count(_device_index(device))
        grid = (min(-(-groups // EXPAND_THREADS), 32 * sms),)
        _launch(device, f"qd_expand<{dt}>", grid, (EXPAND_THREADS,), args)
    return dense[:, :k]


def _dense_rows(x, dense, base, out) -> None:
    """``out = x @ dense^T (+ base)`` through cuBLAS, base added in the GEMM epilogue."""
    if base is None:
        torch.matmul(x, dense.T, out=out)
    elif out.data_ptr() == base.data_ptr():
        out.addmm_(x, dense.T)
    else:
        torch.addmm(base, x, dense.T, out=out)


def _tenant_order(tenant_ids: torch.Tensor, tenants: int) -> tuple[torch.Tensor, list[int]]:
    """Rows sorted by tenant (stable) and the rows per tenant; bad ids and -1 sort last.

    ``counts[tenants]`` counts the rows of id -1 and of out-of-range ids. One host sync.
    """
    valid = (tenant_ids >= 0) & (tenant_ids < tenants)
    key = torch.where(valid, tenant_ids, torch.full_like(tenant_ids, tenants))
    order = torch.argsort(key, stable=True)
    return order, torch.bincount(key, minlength=tenants + 1).tolist()


def _fill_rest(out, base, tenant_ids, rest) -> None:
    """Rows without a delta: base (or 0) for id -1, NaN for out-of-range ids."""
    if not rest.numel():
        return
    if base is None:
        fill = torch.zeros(rest.numel(), out.shape[1], dtype=out.dtype, device=out.device)
    else:
        fill = base.index_select(0, rest)
    bad = tenant_ids.index_select(0, rest) != -1
    fill = fill.masked_fill(bad[:, None], float("nan"))
    out.index_copy_(0, rest, fill)


def _run_expand(x, planes, scales, tenant_ids, base, out, use, row_scales, dt) -> None:
    """Prefill: expand each present tenant's delta once, then one GEMM per tenant."""
    tenants = planes.shape[0]
    k = x.shape[1]
    if tenant_ids is None:
        dense = _expand(planes[0], scales[0], use, row_scales, dt, x.dtype, k)
        _dense_rows(x, dense, base, out)
        return
    order, counts = _tenant_order(tenant_ids, tenants)
    start = 0
    for t in range(tenants):
        c = counts[t]
        if c == 0:
            continue
        rows = order[start : start + c]
        start += c
        dense = _expand(planes[t], scales[t], use, row_scales, dt, x.dtype, k)
        y = torch.empty(c, out.shape[1], dtype=out.dtype, device=out.device)
        _dense_rows(
            x.index_select(0, rows), dense, None if base is None else base.index_select(0, rows), y
        )
        out.index_copy_(0, rows, y)
    _fill_rest(out, base, tenant_ids, order[start:])


def gemm_shared_bytes(use: int, rows: int = GEMM_ROWS) -> int:
    """Dynamic shared memory of one qd_delta_gemm block: ``use`` planes, ``rows`` x rows."""
    x_stage = rows * GEMM_XSTRIDE * 2
    plane_stage = use * GEMM_FEATURES * GEMM_WORDS * 4
    return GEMM_STAGES * (x_stage + plane_stage) + use * GEMM_FEATURES * 4


def gemm_tiles(counts: list[int], rows: int = GEMM_ROWS) -> list[tuple[int, int, int]]:
    """(tenant, first position in the sorted row order, rows) of every block row.

    The ``counts[t]`` rows of tenant t follow each other in the sorted order; each
    tenant's rows split into tiles of at most ``rows`` (pure function, unit-tested).
    """
    tiles = []
    start = 0
    for tenant, c in enumerate(counts):
        tiles += [(tenant, start + s, min(rows, c - s)) for s in range(0, c, rows)]
        start += c
    return tiles


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are 16-byte aligned (cp.async copies), else a padded copy."""
    if x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0:
        return x
    m_rows, k = x.shape
    padded = torch.zeros(m_rows, -(-k // 8) * 8, dtype=x.dtype, device=x.device)
    padded[:, :k] = x
    return padded


def _run_gemm(x, planes, scales, tenant_ids, base, out, use, row_scales, dt, tile_rows) -> None:
    """Prefill on the fused GEMM: one launch over every tenant's row tiles, no dense delta."""
    limit = _dynamic_shared_limit(x.device)
    if gemm_shared_bytes(use, tile_rows) > limit:  # e.g. 128-row tiles on a 99 KB card
        tile_rows = 64
    if (
        dt == DTYPE_CODES[torch.float32]
        or use > GEMM_MAX_PLANES
        or gemm_shared_bytes(use, tile_rows) > limit
    ):
        _run_expand(x, planes, scales, tenant_ids, base, out, use, row_scales, dt)
        return
    device = x.device
    m_rows, k = x.shape
    tenants, n_planes, n, w = planes.shape
    xa = _aligned_rows(x)
    rows = None
    rest = None
    if tenant_ids is None:
        tile_list = gemm_tiles([m_rows], tile_rows)
    else:
        order, counts = _tenant_order(tenant_ids, tenants)
        rows = order.to(torch.int32)
        tile_list = gemm_tiles(counts[:tenants], tile_rows)
        rest = order[sum(counts[:tenants]) :]
    tiles = torch.tensor(tile_list, dtype=torch.int32).reshape(-1, 3).to(device)
    vec_ok = w % 4 == 0 and planes.data_ptr() % 16 == 0
    for first in range(0, len(tile_list), MAX_GRID_Y):  # grid y holds at most 65535 tiles
        _launch(
            device,
            f"qd_delta_gemm<{dt}, {tile_rows // 16}>",
            (-(-n // GEMM_FEATURES), min(MAX_GRID_Y, len(tile_list) - first)),
            (GEMM_THREADS,),
            (
                _ptr(xa),
                np.int64(xa.stride(0)),
                np.int32(k),
                _ptr(planes),
                _ptr(scales),
                _ptr(rows),
                np.uint64(tiles.data_ptr() + 12 * first),
                _ptr(base),
                np.int64(base.stride(0) if base is not None else 0),
                _ptr(out),
                np.int64(out.stride(0)),
                np.int32(n),
                np.int32(w),
                np.int32(n_planes),
                np.int32(use),
                np.int32(1 if row_scales else 0),
                np.int32(1 if vec_ok else 0),
            ),
            shared_mem=gemm_shared_bytes(use, tile_rows),
        )
    if rest is not None:
        _fill_rest(out, base, tenant_ids, rest)


@functools.lru_cache(maxsize=4096)
def _mma_launches(m_rows, k, n, w, tenants, n_planes, use, row_scales, dt, ldx, ldb, ldy, vec_ok):
    """The shape-only parts of the two tensor-core launches, built once per shape."""
    total = m_rows * w * 16
    prep = (
        f"qd_prep_x<{dt}>",
        (min(-(-total // PREP_THREADS), 65535),),
        (np.int64(ldx), np.int32(m_rows), np.int32(k), np.int32(w)),
    )
    ft, nt, wf, wm, ks = TILES["decode" if m_rows <= 64 else "prefill"]
    grid = (-(-m_rows // (8 * nt * wm)), -(-n // (16 * ft * wf)))
    if grid[1] > 65535:
        raise ShapeError(f"N = {n} output features is more than this kernel's grid supports")
    ints = (m_rows, n, w, tenants, n_planes, use, int(row_scales), int(vec_ok))
    mma = (
        f"qd_delta_mm<{dt}, {ft}, {nt}, {wf}, {wm}, {ks}>",
        grid,
        (32 * wf * wm * ks,),
        (np.int64(ldb), np.int64(ldy)),
        tuple(np.int32(v) for v in ints),
    )
    return SPLITS[dt] * total, prep, mma


def _run_mma(x, planes, scales, tenant_ids, base, out, use, row_scales, dt) -> None:
    """The tensor-core kernel (path="mma"): decode tile for M <= 64, prefill tile above.

    The decode tile with 16-bit x builds its x fragments from x itself (MMA_DIRECT_X):
    one launch, no scratch; otherwise qd_prep_x writes them first.
    """
    device = x.device
    m_rows, k = x.shape
    tenants, n_planes, n, w = planes.shape
    vec_ok = w % 4 == 0 and planes.data_ptr() % 16 == 0
    ldb = base.stride(0) if base is not None else 0
    direct = MMA_DIRECT_X and dt != DTYPE_CODES[torch.float32] and m_rows <= 64
    words, prep, mma = _mma_launches(
        m_rows, k, n, w, tenants, n_planes, use, row_scales, dt,
        x.stride(0), ldb, out.stride(0), vec_ok,
    )  # fmt: skip
    name, grid, (ldx, m32, k32, w32) = prep
    if direct:
        p_xp = _NULL
        x_vec = np.int32(1 if x.data_ptr() % 8 == 0 and x.stride(0) % 4 == 0 else 0)
        tail = (_ptr(x), ldx, k32, x_vec)
    else:
        xp = torch.empty(words, dtype=torch.int32, device=device)
        p_xp = _ptr(xp)
        _launch(device, name, grid, (PREP_THREADS,), (_ptr(x), ldx, m32, k32, w32, p_xp))
        tail = (_NULL, np.int64(0), k32, np.int32(0))
    name, grid, block, (ldb64, ldy64), ints = mma
    args = (p_xp, _ptr(planes), _ptr(scales), _ptr(tenant_ids), _ptr(base), ldb64, _ptr(out))
    _launch(device, name, grid, block, (*args, ldy64, *ints, *tail))


def delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int | None = None,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    path: Path_ = "auto",
) -> torch.Tensor:
    """One tenant: ``planes [P, N, W]``, ``scales [P]`` or ``[P, N]``; see the multi-tenant form."""
    if not isinstance(planes, torch.Tensor) or planes.dim() != 3:
        raise ShapeError("planes: expected a [P, N, W] tensor")
    if not isinstance(scales, torch.Tensor) or scales.dim() not in (1, 2):
        raise ShapeError("scales: expected a [P] or [P, N] tensor")
    return multi_tenant_delta_matmul(
        x, planes[None], scales[None], None, bits=bits, base=base, out=out, path=path
    )


# Last: choices (and overlap) import this module, so they load once it is complete; a
# module-level name keeps the import off the per-call path.
from qdelta.kernels import choices  # noqa: E402
