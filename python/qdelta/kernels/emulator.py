"""Run the project's CUDA kernels on the CPU: a test tool for machines without a GPU.

The real sources (qdelta/_cuda/delta_matmul.cu, qdelta/_cuda/attention_block.cu) are compiled by
g++ against ``qdelta/_cuda/emu/cuda_emu.h``, which emulates the CUDA subset they use:
blocks run one after another, the threads of a block are cooperative fibers
switched at barriers and warp collectives, ``mma.sync`` is computed from the PTX
fragment layouts, conversions are bit-exact software versions (docs/CUDA.md,
"Running the kernels without a GPU").

``with emulate(): ...`` makes the real host code of ``qdelta.kernels.cuda`` and
``qdelta.ring.cuda_block`` run on CPU tensors through the emulator, by swapping
the kernel runtime (``qdelta.kernels.cuda.RUNTIME``) for the duration.
``emulate(order="reverse")`` (or ``"shuffle"`` with a ``seed``) resumes the threads
of a block in another order between barriers: results that change with the order
come from a race inside a barrier interval (tests/test_cuda_emulated_races.py).

With ``QDELTA_EMU_SANITIZE=address`` the modules are built with AddressSanitizer,
so an out-of-bounds access (global memory, static or dynamic shared memory) stops
the process with a report naming the source line. The ASan runtime must be loaded
first: ``python -m qdelta.kernels.emulator asan -- <command>`` runs a command
with that environment (``make emu-asan`` runs the emulated suites so).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from qdelta.errors import QDeltaError
from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels.cuda import CUDA_DIR, KernelLaunchError

HEADER = CUDA_DIR / "emu" / "cuda_emu.h"
# -O2: delta_matmul.cu (every instantiation) compiles in seconds here (-O1 saves a
# little but runs slower); a module compiles once per source edit (cached on disk).
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-w")
SANITIZE_ENV = "QDELTA_EMU_SANITIZE"
# ASan plus UBSan's alignment check (a misaligned uint4 load faults on a GPU; here
# it is a report, and fatal); -g: the reports name the kernel's source lines.
_SANITIZE_FLAGS = {
    "address": (
        "-fsanitize=address,alignment",
        "-fno-sanitize-recover=alignment",
        "-fno-omit-frame-pointer",
        "-g",
    )
}
DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without the opt-in
_ERR_BYTES = 2048
# The scheduler's run orders (qd_emu::Order): the order in which each scheduling
# round resumes the runnable threads of a block, lanes of a warp included.
ORDERS = ("forward", "reverse", "shuffle")

# `extern __shared__ T name[];` (dynamic shared memory) -> a pointer to the launch's buffer.
_DYN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


def cache_dir() -> Path:
    """Where compiled modules live: $QDELTA_EMU_CACHE, else ~/.cache/qdelta/emu."""
    env = os.environ.get("QDELTA_EMU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qdelta" / "emu"


def compiler() -> str:
    """The C++ compiler (g++ on PATH, or $CXX); a QDeltaError when there is none."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise QDeltaError(
            f"the CUDA emulator needs a C++17 compiler: expected {cxx!r} on PATH, found none "
            "(install g++ or set CXX)"
        )
    return path


def compile_flags() -> tuple[str, ...]:
    """g++'s flags for a module: :data:`FLAGS`, plus AddressSanitizer's under
    ``QDELTA_EMU_SANITIZE=address`` (which needs the ASan runtime loaded first)."""
    mode = os.environ.get(SANITIZE_ENV, "")
    if not mode:
        return FLAGS
    if mode not in _SANITIZE_FLAGS:
        raise QDeltaError(
            f"{SANITIZE_ENV}={mode!r}: expected one of {', '.join(_SANITIZE_FLAGS)} or unset"
        )
    if not _asan_loaded():
        raise QDeltaError(
            f"{SANITIZE_ENV}={mode}: expected the AddressSanitizer runtime loaded before "
            "Python starts, found it absent (run the command through "
            "`python -m qdelta.kernels.emulator asan -- <command>`)"
        )
    return FLAGS + _SANITIZE_FLAGS[mode]


def _asan_loaded() -> bool:
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # cannot tell here: the loader will say when the module loads
    return "libasan" in maps


def asan_runtime() -> Path:
    """The compiler's AddressSanitizer runtime (libasan.so); a QDeltaError without one."""
    cxx = compiler()
    out = subprocess.run(
        [cxx, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    path = Path(out)
    if not path.is_absolute() or not path.exists():
        raise QDeltaError(
            f"AddressSanitizer: expected {cxx} to ship libasan.so, found {out or 'nothing'} "
            "(install the compiler's libasan)"
        )
    return path


def asan_environment() -> dict[str, str]:
    """The variables a process needs to run the emulator under AddressSanitizer."""
    # Python and torch keep allocations to exit by design: no leak report. The
    # caller's own ASAN_OPTIONS come after, so they win.
    options = ":".join(filter(None, ["detect_leaks=0", os.environ.get("ASAN_OPTIONS", "")]))
    return {"LD_PRELOAD": str(asan_runtime()), "ASAN_OPTIONS": options, SANITIZE_ENV: "address"}


def rewrite_source(text: str) -> str:
    """The source as the emulator compiles it: dynamic shared memory becomes a pointer
    to the per-launch buffer (one line for one line, so __LINE__ and errors match)."""
    return _DYN_SHARED.sub(
        lambda m: (
            f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::qd_emu::dyn_smem());"
        ),
        text,
    )


def _normalize(name: str) -> str:
    return re.sub(r"\s+", "", name)


def translation_unit(source_name: str, text: str, names: Sequence[str]) -> str:
    """The .cpp: the emulator header, the rewritten source, one extern "C" entry per name."""
    lines = [
        "#define QDELTA_EMULATE 1",
        f'#include "{HEADER}"',
        f'#line 1 "{source_name}"',
        rewrite_source(text),
        "",
        '#line 1 "qdelta-emulator-entries"',
    ]
    for i, name in enumerate(names):
        lines.append(
            f'extern "C" int qd_emu_entry_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            "unsigned by, unsigned bz, size_t smem, void** args, const size_t* sizes, int nargs, "
            "char* err, size_t errlen, int order, unsigned long long seed) {\n"
            f'    return ::qd_emu::launch(&{name}, "{name}", dim3(gx, gy, gz), dim3(bx, by, bz), '
            "smem, args, sizes, nargs, err, errlen, order, seed);\n}"
        )
    return "\n".join(lines) + "\n"


def order_code(order: str) -> int:
    """The scheduler's code for a run order name (a KernelLaunchError for another name)."""
    try:
        return ORDERS.index(order)
    except ValueError:
        raise KernelLaunchError(
            f"emulator run order {order!r}: expected one of {', '.join(ORDERS)}"
        ) from None


def _dims(v, what: str) -> tuple[int, int, int]:
    t = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    if not 1 <= len(t) <= 3:
        raise KernelLaunchError(f"{what}: expected 1 to 3 dimensions, found {v!r}")
    return (*t, *(1,) * (3 - len(t)))  # type: ignore[return-value]


class EmulatedKernel:
    """One compiled kernel, called like a cupy kernel: ``kernel(grid, block, args, shared_mem=0)``.

    ``order`` / ``seed`` (emulator only): the run order of the threads of each block
    between barriers, one of :data:`ORDERS`; ``seed`` drives ``"shuffle"``.
    """

    def __init__(self, name: str, entry) -> None:
        self.name = name
        self._entry = entry
        # The attribute cupy exposes; the emulator enforces it as the GPU does.
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED_LIMIT

    def __call__(
        self,
        grid,
        block,
        args: Sequence,
        shared_mem: int = 0,
        order: str = "forward",
        seed: int = 0,
    ) -> None:
        g, b = _dims(grid, "grid"), _dims(block, "block")
        code = order_code(order)
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise KernelLaunchError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory, expected at most "
                f"{self.max_dynamic_shared_size_bytes} (max_dynamic_shared_size_bytes not raised)"
            )
        blobs = []
        for i, a in enumerate(args):
            # The argument bytes are exactly what cupy would pass: the numpy scalar's.
            if not isinstance(a, np.generic):
                raise KernelLaunchError(
                    f"{self.name}: argument {i}: expected a numpy scalar (np.int32, np.uint64 ...), "
                    f"found {type(a).__name__}"
                )
            blobs.append(a.tobytes())
        n = len(blobs)
        bufs = [ctypes.create_string_buffer(x, len(x)) for x in blobs]
        ptrs = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(x) for x in bufs])
        sizes = (ctypes.c_size_t * max(n, 1))(*[len(x) for x in blobs])
        err = ctypes.create_string_buffer(_ERR_BYTES)
        rc = self._entry(
            *g, *b, int(shared_mem), ptrs, sizes, n, err, _ERR_BYTES, code, int(seed) % 2**64
        )
        if rc != 0:
            raise KernelLaunchError(err.value.decode(errors="replace"))


class EmulatedModule:
    """A .cu file compiled for the emulator (the counterpart of cupy.RawModule)."""

    def __init__(self, source: Path, name_expressions: Sequence[str]) -> None:
        self.source = Path(source)
        self.names = list(name_expressions)
        text = self.source.read_text(encoding="utf-8")
        cpp = translation_unit(self.source.name, text, self.names)
        cxx = compiler()
        flags = compile_flags()
        # The translation unit (source, entry points) and the header it includes.
        key = hashlib.sha256(
            "\0".join([HEADER.read_text(encoding="utf-8"), cpp, *self.names, *flags, cxx]).encode()
        ).hexdigest()
        self.library = cache_dir() / f"{key}.so"
        if not self.library.exists():
            _build(cxx, flags, cpp, self.library, self.source.name)
        self._lib = ctypes.CDLL(str(self.library))
        self._index = {_normalize(n): i for i, n in enumerate(self.names)}
        self._kernels: dict[str, EmulatedKernel] = {}

    def compile(self) -> None:
        """Compiled at construction already (cupy's RawModule has this method)."""

    def get_function(self, name: str) -> EmulatedKernel:
        kernel = self._kernels.get(name)
        if kernel is None:
            i = self._index.get(_normalize(name))
            if i is None:
                raise KernelLaunchError(
                    f"{name}: not among the name expressions of {self.source.name}"
                )
            entry = getattr(self._lib, f"qd_emu_entry_{i}")
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.c_uint] * 6 + [
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_ulonglong,
            ]
            kernel = self._kernels[name] = EmulatedKernel(name, entry)
        return kernel


def _build(cxx: str, flags: Sequence[str], cpp: str, library: Path, what: str) -> None:
    """Compile ``cpp`` into ``library`` atomically (a temp file, then os.replace)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        src = Path(tmp) / "module.cpp"
        src.write_text(cpp, encoding="utf-8")
        out = Path(tmp) / "module.so"
        proc = subprocess.run(
            [cxx, *flags, "-o", str(out), str(src)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise KernelLaunchError(
                f"compiling {what} for the emulator failed:\n{proc.stderr[-4000:]}"
            )
        os.replace(out, library)


@functools.cache
def _cached_module(source: Path, names: tuple[str, ...], stamp: float) -> EmulatedModule:
    # stamp (the source's mtime) makes an edited source recompile in a long-lived process.
    return EmulatedModule(source, names)


def module(source: Path, name_expressions: Sequence[str]) -> EmulatedModule:
    """The compiled module of ``source``, loaded once per process (and per edit)."""
    source = Path(source).resolve()
    return _cached_module(source, tuple(name_expressions), source.stat().st_mtime)


class EmulatorRuntime(cuda_backend.KernelRuntime):
    """The kernel runtime behind :func:`emulate`: CPU tensors, g++-compiled kernels.

    ``order`` and ``seed`` (attributes, may be changed between launches) are the run
    order every launch uses: "forward" (thread order, the default), "reverse" or
    "shuffle" (a pseudo-random order per scheduling round from ``seed``).
    """

    emulated = True

    def __init__(
        self,
        sm_count: int = 132,
        order: str = "forward",
        seed: int = 0,
        shared_limit: int = cuda_backend.SHARED_LIMIT_SM90,
    ) -> None:
        super().__init__()
        self._sms = sm_count
        self._shared_limit = shared_limit
        order_code(order)
        self.order = order
        self.seed = seed

    def on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def device_index(self, device: torch.device) -> int:
        return 0

    def sm_count(self, index: int) -> int:
        return self._sms

    def device_name(self, index: int) -> str:
        return f"qdelta CUDA emulator ({self._sms} SMs)"

    def shared_limit(self, index: int) -> int:
        return self._shared_limit

    def module(self, index: int, source: Path, options: tuple[str, ...], names: tuple[str, ...]):
        try:
            return module(source, names)
        except QDeltaError:  # (KernelLaunchError included) already says what failed
            raise
        except Exception as exc:
            raise KernelLaunchError(f"compiling {Path(source).name} failed: {exc}") from exc

    def launch(self, kernel, device, name, grid, block, args, shared_mem) -> None:
        cuda_backend._check_grid(name, grid)
        if shared_mem > self._shared_limit - cuda_backend.SHARED_STATIC_MARGIN:
            # What raising max_dynamic_shared_size_bytes past the card's opt-in does.
            raise KernelLaunchError(
                f"{name}: {shared_mem} bytes of dynamic shared memory, more than this "
                f"device's opt-in limit ({self._shared_limit} bytes per block)"
            )
        try:
            cuda_backend._opt_in_shared(kernel, self.shared_opt_in, 0, name, shared_mem)
            kernel(grid, block, args, shared_mem=shared_mem, order=self.order, seed=self.seed)
        except Exception as exc:
            raise KernelLaunchError(
                f"{name} grid={grid} block={block}: expected a clean launch, found {exc}"
            ) from exc


@contextlib.contextmanager
def emulate(
    sm_count: int = 132,
    order: str = "forward",
    seed: int = 0,
    shared_limit: int = cuda_backend.SHARED_LIMIT_SM90,
) -> Iterator[EmulatorRuntime]:
    """Within the block, qdelta's CUDA kernels run on CPU tensors through the emulator.

    ``sm_count`` is the SM count the host code plans launches for (132: an H100/H200);
    ``shared_limit`` the opt-in shared memory per block (227 KB; 99 KB: sm_86/89 cards).
    ``order`` / ``seed``: the run order of the threads of a block between barriers
    (:class:`EmulatorRuntime`); results must not depend on it.
    Not thread-safe with respect to other threads using the CUDA backend meanwhile.
    """
    compiler()  # fail early and clearly without g++
    runtime = EmulatorRuntime(sm_count, order, seed, shared_limit)
    previous = cuda_backend.RUNTIME
    cuda_backend.RUNTIME = runtime
    try:
        yield runtime
    finally:
        cuda_backend.RUNTIME = previous


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qdelta.kernels.emulator asan -- <command>``: run the command with
    :func:`asan_environment`; its exit status is returned."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "asan" or args[1] != "--":
        print(
            f"usage: python -m qdelta.kernels.emulator asan -- <command>; found {args!r}",
            file=sys.stderr,
        )
        return 2
    try:
        env = {**os.environ, **asan_environment()}
    except QDeltaError as err:
        print(f"qdelta: {err}", file=sys.stderr)
        return 2
    return subprocess.run(args[2:], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
