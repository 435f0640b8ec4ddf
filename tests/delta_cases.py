"""Inputs, the float64 oracle and the tolerance check shared by the CUDA kernel tests:
on a GPU (tests/test_cuda_kernels.py) and under the CPU emulator (tests/test_cuda_emulated*.py)."""

from __future__ import annotations

import pytest
import torch

from qdelta.kernels import reference

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-4}
DTYPES = list(TOL)


def random_planes(
    t: int, p: int, n: int, k: int, *, device="cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random sign planes ``[T, P, N, W]`` with the format's zero tail padding."""
    w = -(-k // 32)
    planes = torch.randint(
        -(2**31), 2**31, (t, p, n, w), dtype=torch.int64, generator=generator, device=device
    )
    tail = k - 32 * (w - 1)
    if tail < 32:
        planes[..., -1] &= (1 << tail) - 1
    return planes.to(torch.int32)


def random_scales(
    t: int, p: int, n: int, row: bool, *, device="cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    shape = (t, p, n) if row else (t, p)
    return torch.rand(shape, generator=generator, device=device) * 0.02 + 0.001


def oracle(x, planes, scales, ids, base=None) -> torch.Tensor:
    """float64 result from the reference's dense unpack (id -1 and bad ids: no delta;
    ids None: every row tenant 0)."""
    if ids is None:
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    out = torch.zeros(x.shape[0], planes.shape[2], dtype=torch.float64, device=x.device)
    for t in range(planes.shape[0]):
        rows = ids == t
        if rows.any():
            dense = reference.dense_delta(planes[t], scales[t], x.shape[1]).double()
            out[rows] = x[rows].double() @ dense.T
    if base is not None:
        out += base.double()
    return out


def assert_close(y: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Every output finite and within the dtype's tolerance, relative to the largest."""
    assert y.dtype in TOL, what
    finite = torch.isfinite(y)
    if not finite.all():
        bad = (~finite).nonzero()[:5].tolist()
        pytest.fail(f"{what}: {int((~finite).sum())} non-finite outputs, first at {bad}")
    err = (y.double() - want).abs()
    scale = want.abs().max().clamp_min(1e-30)
    rel = float(err.max() / scale)
    if rel > TOL[y.dtype]:
        where = divmod(int(err.argmax()), y.shape[1])
        pytest.fail(
            f"{what}: max relative error {rel:.3g} > {TOL[y.dtype]:.1g} at [row, col] = "
            f"{list(where)}: got {float(y[where]):.6g}, expected {float(want[where]):.6g}"
        )


def poisoned(m: int, n: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """An output buffer of NaN: an element the kernel forgets to write fails the check."""
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


SENTINEL = -7.25  # exact in fp16, bf16 and fp32


def guarded(m: int, n: int, dtype: torch.dtype, device="cpu", margin: int = 64):
    """A NaN-poisoned ``[m, n]`` output inside a larger buffer whose margins hold a
    sentinel, and a check that fails when a kernel wrote outside its output."""
    big = torch.full((m * n + 2 * margin,), float("nan"), dtype=dtype, device=device)
    big[:margin] = SENTINEL
    big[-margin:] = SENTINEL
    out = big[margin : margin + m * n].view(m, n)

    def check() -> None:
        for name, part in (("before", big[:margin]), ("after", big[-margin:])):
            hit = (part != SENTINEL).nonzero().flatten().tolist()
            assert not hit, f"a kernel wrote {len(hit)} elements {name} its output"

    return out, check
