"""Compile CUDA sources with NVRTC without a GPU (NVRTC needs no device).

Used by CI to prove every kernel in qdelta/_cuda/ compiles for the architectures we
ship for; on a GPU machine cupy.RawModule compiles the same sources.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from qdelta._cuda import DIR as KERNEL_DIR
from qdelta.errors import QDeltaError

CUDA_DIR = KERNEL_DIR  # the .cu files ship inside the package (qdelta/_cuda)
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


def find_ptxas() -> str | None:
    """A ptxas binary: $QDELTA_PTXAS, the PATH, or the one triton (a torch dependency) ships."""
    import shutil

    explicit = os.environ.get("QDELTA_PTXAS")
    if explicit:
        return explicit
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import triton
    except Exception:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(candidate) if candidate.is_file() else None


def _assemble(ptx: bytes, arch: str, ptxas: str, out_dir: Path) -> str:
    """``ptxas -v`` on ``ptx`` into ``out_dir/k.cubin``; its report (stderr).

    The NVRTC wheel may emit a newer PTX ISA version than an older ptxas accepts;
    the kernels use nothing newer than 8.x, so the version line is lowered to what
    this ptxas reports it supports when it refuses the original.
    """
    import re
    import subprocess

    text = ptx.rstrip(b"\0").decode()
    src = out_dir / "kernels.ptx"
    for attempt in range(2):
        src.write_text(text, encoding="utf-8")
        run = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", str(src), "-o", str(out_dir / "k.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        supported = re.search(r"current version is '(\d+\.\d+)'", run.stderr)
        if run.returncode == 0 or attempt or not supported:
            break
        text = re.sub(r"^\.version \S+", f".version {supported.group(1)}", text, flags=re.M)
    if run.returncode != 0:
        raise KernelCompileError(f"ptxas ({arch}): expected a clean assembly, found:\n{run.stderr}")
    return run.stderr


def kernel_resources(ptx: bytes, arch: str, ptxas: str) -> dict[str, dict[str, int]]:
    """Registers and spill bytes per entry point, from ``ptxas -v`` on ``ptx``."""
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = _assemble(ptx, arch, ptxas, Path(tmp))
    resources: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line)
        if entry:
            current = resources.setdefault(entry.group(1), {"registers": 0, "spill_bytes": 0})
        elif current is not None:
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if spills:
                current["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
            used = re.search(r"Used (\d+) registers", line)
            if used:
                current["registers"] = int(used.group(1))
    return resources


def kernel_sass(ptx: bytes, arch: str, ptxas: str) -> dict[str, list[str]] | None:
    """Each entry point's SASS instructions (opcode and operands, one per item), from
    nvdisasm next to ``ptxas``; None when there is no nvdisasm."""
    import re
    import subprocess
    import tempfile

    nvdisasm = Path(ptxas).with_name("nvdisasm")
    if not nvdisasm.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        _assemble(ptx, arch, ptxas, Path(tmp))
        listing = subprocess.run(
            [str(nvdisasm), "-c", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    kernels: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        section = re.match(r"\s*\.text\.(\S+):", line)
        if section:
            current = kernels.setdefault(section.group(1), [])
            continue
        instr = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if instr and current is not None:
            current.append(instr.group(1))
    return kernels
