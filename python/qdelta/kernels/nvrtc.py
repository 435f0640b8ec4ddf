"""Compile CUDA sources with NVRTC without a GPU (NVRTC needs no device).

Used by CI to prove every kernel in cuda/ compiles for the architectures we
ship for; on a GPU machine cupy.RawModule compiles the same sources.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from qdelta.errors import QDeltaError

CUDA_DIR = Path(__file__).resolve().parents[3] / "cuda"
ARCHS = ("sm_80", "sm_90")


class KernelCompileError(QDeltaError):
    """A CUDA source failed to compile; the message carries NVRTC's log."""


def cuda_include_dirs() -> list[str]:
    """Header folders of the pip-installed CUDA toolkit (cuda_fp16.h, mma.h, ...)."""
    import site

    found = set()
    for root in site.getsitepackages():
        for header in glob.glob(os.path.join(root, "nvidia", "**", "cuda_fp16.h"), recursive=True):
            found.add(os.path.dirname(header))
    return sorted(found)


def compile_source(
    source: str,
    name: str,
    arch: str,
    name_expressions: Sequence[str] = (),
    options: Sequence[str] = (),
) -> bytes:
    """Compile ``source`` to PTX for ``arch``; raise KernelCompileError with the log."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, err, name, "create")
    try:
        for expr in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            _check(nvrtc, err, name, f"name expression {expr}")
        opts = [f"--gpu-architecture={arch}", "-std=c++17", *options]
        opts += [f"-I{d}" for d in cuda_include_dirs()]
        encoded = [o.encode() for o in opts]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(
                f"{name} ({arch}): expected a clean NVRTC compile, found errors:\n"
                f"{log.decode(errors='replace')}"
            )
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(prog, ptx)
        return ptx
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _check(nvrtc, err, name: str, step: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"{name}: NVRTC {step} failed: {err}")
