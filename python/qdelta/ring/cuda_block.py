"""The ``cuda`` block backend: qdelta/_cuda/attention_block.cu compiled by cupy.RawModule.

fp16/bf16 inputs, head dims 64 and 128, on a CUDA device; returns fp32
``(out, lse)`` like every block backend (see block.py). Torch tensors are passed
to the kernel as raw device pointers (``data_ptr()``, no copies, no DLPack); the
kernel runs on torch's current stream, launched by qdelta.kernels.cuda.launch,
which checks the grid and the launch (KernelLaunchError) and, with
``QDELTA_CUDA_SYNC=1``, synchronizes so a fault is reported at its launch.

Three kernels: ``mma2`` (``attention_block_mma2``: tensor cores, FlashAttention-2
style with cp.async double buffering and ldmatrix fragments, sm_80+), ``mma``
(``attention_block_mma``: the first tensor-core kernel, synchronous tile loads,
kept selectable so the GPU benchmark can time both) and ``v1``
(``attention_block``: CUDA cores, the first kernel). Backend ``cuda`` runs
DEFAULT_KERNEL; backend ``cuda_v1`` always runs ``v1``; ``attention_block(...,
kernel=name)`` also takes a KERNELS name directly. ``window`` (a sliding window)
and ``softcap`` (logit soft-capping) are handled by all three kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from qdelta._cuda import DIR as KERNEL_DIR
from qdelta.errors import DTypeError, ShapeError
from qdelta.ring.block import check_window
from qdelta.ring.errors import RingError

SOURCE = KERNEL_DIR / "attention_block.cu"  # shipped inside the package (qdelta/_cuda)
HEAD_DIMS = (64, 128)
# Which kernel backend "cuda" runs: "mma2" (tensor cores, cp.async + ldmatrix),
# "mma" (the first tensor-core kernel) or "v1" (the first kernel, CUDA cores).
DEFAULT_KERNEL = "mma2"
KERNELS = {
    # name: (function, query rows per block, threads per block)
    "mma2": ("attention_block_mma2", 64, 128),
    "mma": ("attention_block_mma", 64, 128),
    "v1": ("attention_block", 32, 128),
}
TILE_KEYS = 64  # keys per K/V tile of the mma kernels
ROWS_PER_BLOCK = KERNELS["v1"][1]
THREADS = 128
_CTYPES = {torch.float16: "0", torch.bfloat16: "1"}  # the kernel's DT template argument
# The fp32 range the kernels take softcap in (c * log2e and its inverse stay finite and
# normal); outside it capping is the identity / a constant up to fp32 rounding.
SOFTCAP_RANGE = (1e-30, 1e37)


def available() -> bool:
    """True when cupy imports and a CUDA device is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def instantiations() -> list[str]:
    return [
        f"{fn}<{c}, {d}>"
        for fn, _, _ in KERNELS.values()
        for c in _CTYPES.values()
        for d in HEAD_DIMS
    ]


def kernel_name(backend: str) -> str:
    """The KERNELS entry a block backend name (or a KERNELS name) runs."""
    if backend in KERNELS:
        return backend
    return "v1" if backend == "cuda_v1" else DEFAULT_KERNEL


def shared_bytes(kernel: str, head_dim: int) -> int:
    """Dynamic shared memory of one block: mma2 double-buffers K and V tiles (rows padded
    by 8 halves) plus two tiles of segment ids (Mma2Shape::kSmemBytes in the .cu file);
    the other kernels use static shared memory only."""
    if kernel != "mma2":
        return 0
    return 2 * 2 * TILE_KEYS * (head_dim + 8) * 2 + 2 * TILE_KEYS * 4


def launch_grid(kernel: str, b: int, hq: int, sq: int) -> tuple[tuple[int, int, int], int]:
    """(grid, threads) of one launch: one block per ``rows`` query rows of each (batch, head)."""
    _, rows, threads = KERNELS[kernel]
    return ((sq + rows - 1) // rows, hq, b), threads


def window_first_tile(first_q: int, kv_start: int, window: int | None, sk: int) -> int:
    """The first key tile a query block whose first row is at ``first_q`` may see
    through ``window`` (window_first_tile in the .cu file); ``sk`` when none."""
    if not window:
        return 0
    lo = first_q - window + 1 - kv_start  # the first key index the block's first row sees
    if lo <= 0:
        return 0
    return sk if lo >= sk else lo // TILE_KEYS * TILE_KEYS


def mma_tiles(
    block: int,
    sq: int,
    sk: int,
    causal: bool,
    q_start: int,
    kv_start: int,
    segments: bool,
    *,
    window: int | None = None,
) -> list[tuple[int, bool]]:
    """``(first key, masked?)`` of every key tile query block ``block`` of the mma
    kernel visits: the kernel's loop bounds and mask test, for tests on any machine."""
    _, rows, _ = KERNELS["mma"]
    keys = TILE_KEYS
    row0 = block * rows
    last_q = q_start + min(sq, row0 + rows) - 1
    tiles = []
    for t0 in range(window_first_tile(q_start + row0, kv_start, window, sk), sk, keys):
        if causal and kv_start + t0 > last_q:
            break
        masked = (
            t0 + keys > sk
            or segments
            or (causal and kv_start + t0 + keys - 1 > q_start + row0)
            or row0 + rows > sq
            or (bool(window) and last_q - (kv_start + t0) >= window)
        )
        tiles.append((t0, masked))
    return tiles


def mma2_tiles(
    block: int,
    warp: int,
    sq: int,
    sk: int,
    causal: bool,
    q_start: int,
    kv_start: int,
    segments: bool,
    *,
    window: int | None = None,
) -> list[tuple[int, bool]]:
    """``(first key, masked?)`` of every key tile warp ``warp`` of query block ``block``
    of the mma2 kernel computes (16 rows per warp; the block loads the tiles from its
    first row's window start up to its last row's causal reach, a warp computes those
    its own rows see): the kernel's loop bounds, skip and mask tests (with the kernel's
    int clamps), for tests on any machine."""
    _, rows, _ = KERNELS["mma2"]
    keys = TILE_KEYS
    row0 = block * rows
    wrow0 = row0 + 16 * warp
    n_tiles = -(-sk // keys)
    diag = max(-(row0 + rows + 1), min(q_start - kv_start, sk))
    if causal:
        reach = diag + min(sq, row0 + rows) - 1
        n_tiles = 0 if reach < 0 else min(n_tiles, reach // keys + 1)
    warp_reach = diag + min(sq, wrow0 + 16) - 1 if causal else sk
    warp_full = diag + wrow0 if causal else sk
    wlo = -(row0 + rows)
    if window:
        wlo = max(wlo, min(q_start - kv_start - window + 1, sk))
    block_lo = wlo + row0
    first_it = 0 if block_lo <= 0 else n_tiles if block_lo >= sk else block_lo // keys
    warp_lo = wlo + wrow0
    tiles = []
    for t0 in range(first_it * keys, n_tiles * keys, keys):
        if wrow0 >= sq or t0 > warp_reach or min(sk, t0 + keys) - 1 < warp_lo:
            continue
        masked = t0 + keys > sk or segments or t0 + keys - 1 > warp_full or t0 < warp_lo + 15
        tiles.append((t0, masked))
    return tiles


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the mma kernel loads 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _module(device_index: int):
    """The compiled module, from the kernel runtime of qdelta.kernels.cuda (cupy, or the
    CPU emulator under qdelta.kernels.emulator.emulate()); cached there."""
    from qdelta.kernels import cuda as kernels_cuda

    return kernels_cuda.RUNTIME.module(
        device_index, SOURCE, ("-std=c++17",), tuple(instantiations())
    )


_NARROW_INTS = (torch.int32, torch.int16, torch.int8, torch.uint8)


def _int32_segments(q_seg: torch.Tensor, kv_seg: torch.Tensor):
    """The kernels compare int32 ids. Wider ids are checked (one device sync;
    int32 ids skip it) and, where some do not fit, renumbered together: only
    equality between a query's and a key's id matters, and that is kept."""
    if q_seg.dtype in _NARROW_INTS and kv_seg.dtype in _NARROW_INTS:
        return q_seg.to(torch.int32), kv_seg.to(torch.int32)
    both = torch.cat([q_seg.reshape(-1).to(torch.int64), kv_seg.reshape(-1).to(torch.int64)])
    lo, hi = torch.aminmax(both)
    if int(lo) >= -(2**31) and int(hi) < 2**31:
        return q_seg.to(torch.int32), kv_seg.to(torch.int32)
    _, ranks = torch.unique(both, return_inverse=True)
    ranks = ranks.to(torch.int32)
    return ranks[: q_seg.numel()].reshape(q_seg.shape), ranks[q_seg.numel() :].reshape(kv_seg.shape)


def attention_block(
    q,
    k,
    v,
    scale,
    causal,
    q_start,
    kv_start,
    q_seg,
    kv_seg,
    *,
    kernel="cuda",
    window=None,
    softcap=None,
):
    """Run the kernel; arguments as in block._math_forward; ``kernel``: the backend name;
    ``window``: None or an int >= 1 (query ``q_start + i`` sees key ``kv_start + j`` only
    when their distance is below it); ``softcap``: None or a finite number > 0 (scores
    ``s`` become ``softcap * tanh(s / softcap)``)."""
    from qdelta.kernels import cuda as kernels_cuda

    check_window(window, softcap, "ring block backend 'cuda'")

    runtime = kernels_cuda.RUNTIME
    if not runtime.emulated and not available():
        raise RingError("ring block backend 'cuda': expected cupy and a CUDA device, found none")
    if not runtime.on_device(q):
        raise RingError(f"ring block backend 'cuda': expected CUDA tensors, found {q.device}")
    if q.dtype not in _CTYPES:
        raise DTypeError(
            f"ring block backend 'cuda': expected float16 or bfloat16, found {q.dtype}"
        )
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if d not in HEAD_DIMS:
        raise ShapeError(f"ring block backend 'cuda': expected head_dim in {HEAD_DIMS}, found {d}")
    name = kernel_name(kernel)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty((b, hq, sq, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0:
        return out, lse
    seg_batched = 0
    if q_seg is not None:
        # The kernels index both id arrays alike (row b at b * length): batched when
        # either is [B, L] with B > 1, the other broadcast to it, as the math backend does.
        rows = {s.shape[0] for s in (q_seg, kv_seg) if s.dim() == 2} - {1}
        if rows - {b}:
            raise ShapeError(
                f"ring block backend 'cuda': expected segment ids for {b} rows, found "
                f"{tuple(q_seg.shape)} and {tuple(kv_seg.shape)}"
            )
        seg_batched = int(bool(rows))
        if seg_batched:
            q_seg, kv_seg = (s.reshape(-1, s.shape[-1]).expand(b, -1) for s in (q_seg, kv_seg))
        else:
            q_seg, kv_seg = q_seg.reshape(-1), kv_seg.reshape(-1)
        q_seg, kv_seg = _int32_segments(q_seg, kv_seg)
        q_seg = q_seg.to(device=q.device).contiguous()
        kv_seg = kv_seg.to(device=q.device).contiguous()
    # The kernels take window 0 for "none": a window wider than the farthest pair hides
    # nothing (and keeps the fast path); one nearer than the nearest pair hides all.
    if window is not None and q_start + sq - 1 - kv_start < window:
        window = None
    if sk == 0 or (window is not None and q_start - (kv_start + sk - 1) >= window):
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    cap = 0.0 if softcap is None else min(max(float(softcap), SOFTCAP_RANGE[0]), SOFTCAP_RANGE[1])
    from qdelta.kernels.cuda import KernelLaunchError, launch

    index = runtime.device_index(q.device)
    fn_name = f"{KERNELS[name][0]}<{_CTYPES[q.dtype]}, {d}>"
    try:
        fn = _module(index).get_function(fn_name)
    except Exception as exc:
        raise KernelLaunchError(f"compiling {fn_name} of {SOURCE.name} failed: {exc}") from exc

    def ptr(t):  # (cupy's scalar types are numpy's)
        return np.uint64(0) if t is None else np.uint64(t.data_ptr())

    grid, threads = launch_grid(name, b, hq, sq)
    launch(
        fn,
        q.device,
        fn_name,
        grid,
        (threads,),
        (
            ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(q_seg), ptr(kv_seg),
            np.int32(seg_batched), np.int32(hq), np.int32(hkv),
            np.int32(sq), np.int32(sk), np.float32(scale), np.int32(int(causal)),
            np.int64(q_start), np.int64(kv_start), np.int64(window or 0), np.float32(cap),
        ),
        shared_bytes(name, d),
    )  # fmt: skip
    return out, lse
