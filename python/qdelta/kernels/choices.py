"""Which kernel runs a delta matmul on the GPU: the named kernel choices, the fixed
rule behind ``path=``, and autotuning among the choices (docs/CUDA.md).

The module switches (``PREFILL_KERNEL``, ``GEMM_ROWS``, ``LUT_PREFETCH_NEXT``, ...)
stay in :mod:`qdelta.kernels.cuda` and are read at every call.
"""

from __future__ import annotations

import functools

import torch

from qdelta.errors import ShapeError
from qdelta.kernels import autotune, cuda, overlap

# What each kernel choice runs; autotuning picks among these (docs/CUDA.md).
KERNEL_CHOICES = (
    "mma", "lut", "lut-prefetch", "lut-narrow", "expand", "expand-overlap", "gemm128", "gemm64",
)  # fmt: skip


def path_choice(path: str) -> str:
    """The kernel choice a fixed ``path`` runs under the module's switches."""
    if path == "decode":
        return "lut-prefetch" if cuda.LUT_PREFETCH_NEXT else "lut"
    if path == "prefill" and cuda.PREFILL_KERNEL not in ("expand", "gemm", "overlap"):
        raise ShapeError(
            f"PREFILL_KERNEL: expected 'expand', 'gemm' or 'overlap', found {cuda.PREFILL_KERNEL!r}"
        )
    if path == "prefill" and cuda.PREFILL_KERNEL == "overlap":
        return "expand-overlap"
    if path == "gemm" or (path == "prefill" and cuda.PREFILL_KERNEL == "gemm"):
        if cuda.GEMM_ROWS not in cuda.GEMM_ROW_CHOICES:
            raise ShapeError(
                f"GEMM_ROWS: expected one of {cuda.GEMM_ROW_CHOICES}, found {cuda.GEMM_ROWS}"
            )
        return f"gemm{cuda.GEMM_ROWS}"
    return "expand" if path == "prefill" else "mma"


def run_choice(choice, x, planes, scales, tenant_ids, base, out, use, row_scales, dt) -> None:
    args = (x, planes, scales, tenant_ids, base, out, use, row_scales, dt)
    if choice in ("lut", "lut-prefetch"):
        cuda._run_lut(*args, prefetch=choice == "lut-prefetch")
    elif choice == "lut-narrow":
        cuda._run_lut(*args, prefetch=False, max_features=cuda.LUT_NARROW_FEATURES)
    elif choice in ("gemm128", "gemm64"):
        cuda._run_gemm(*args, tile_rows=int(choice[4:]))
    elif choice == "expand":
        cuda._run_expand(*args)
    elif choice == "expand-overlap":
        overlap.run(*args)
    elif choice == "mma":
        cuda._run_mma(*args)
    else:
        raise ShapeError(f"kernel choice: expected one of {KERNEL_CHOICES}, found {choice!r}")


#: Choices that read the tenant ids on the host (the tenant order of expand and gemm).
HOST_SYNCING = frozenset({"expand", "expand-overlap", "gemm64", "gemm128"})


def row_bucket(m_rows: int) -> int:
    """Rows rounded up to a power of two: one tuning decision covers the bucket."""
    return 1 << max(0, m_rows - 1).bit_length()


def tuning_candidates(bucket: int, dt: int, use: int) -> tuple[str, ...]:
    """The kernel choices autotuning times for a row bucket (see :func:`row_bucket`)."""
    gemm_ok = dt != cuda.DTYPE_CODES[torch.float32] and use <= cuda.GEMM_MAX_PLANES
    expand = ("expand", "expand-overlap")
    if bucket <= cuda.DECODE_MAX_ROWS:
        wide = expand + (("gemm64",) if gemm_ok else ())
        return ("mma", "lut", "lut-prefetch", "lut-narrow") + (wide if bucket >= 16 else ())
    return expand + (("gemm128", "gemm64") if gemm_ok else ())


@functools.cache
def _source_hash() -> str:
    import hashlib

    return hashlib.sha256(cuda.SOURCE.read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)  # a decode loop asks for the same key every step
def tuning_key(device_name: str, bucket: int, one_tenant: bool, n, k, use, row_scales, dt) -> str:
    """Autotuning decision key: card, kernel source, row bucket and the shape class."""
    scale = "row" if row_scales else "matrix"
    tenancy = "one" if one_tenant else "multi"
    return (
        f"delta_matmul|{device_name}|src={_source_hash()}|rows<={bucket}|{tenancy}|"
        f"N={n}|K={k}|planes={use}|scales={scale}|dtype={dt}"
    )


def auto_choice(one_tenant: bool, args: tuple) -> str:
    """The fixed rule (auto_path), or with autotuning on the measured winner."""
    x, planes, scales, tenant_ids, base, out, use, row_scales, dt = args
    m_rows, k = x.shape
    rule = path_choice(cuda.auto_path(m_rows, one_tenant))
    if not autotune.enabled():
        return rule
    bucket = row_bucket(m_rows)
    device = x.device
    key = tuning_key(
        cuda.RUNTIME.device_name(cuda._device_index(device)),
        bucket, one_tenant, planes.shape[2], k, use, row_scales, dt,
    )  # fmt: skip
    candidates = tuning_candidates(bucket, dt, use)
    known = autotune.decided(key)
    capturing = cuda.RUNTIME.capturing(device)
    # A recorded choice this version no longer offers is re-tuned (choose() does that).
    if known in candidates:
        # Under CUDA-graph capture the fixed rule stands in for a choice that reads
        # the tenant ids on the host (a sync, which capture does not allow).
        return rule if capturing and known in HOST_SYNCING else known
    if capturing:
        return rule
    scratch = torch.empty_like(out)  # the caller's out (maybe base itself) is written once

    def run(choice: str) -> None:
        run_choice(choice, x, planes, scales, tenant_ids, base, scratch, use, row_scales, dt)

    return autotune.choose(key, candidates, run, lambda fn: cuda.RUNTIME.time_us(device, fn))
