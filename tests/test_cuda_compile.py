"""Every .cu file in cuda/ compiles with NVRTC for the shipped architectures (no GPU needed).

Each file declares the template instantiations to check with lines
``// qdelta-instantiate: name<...>``.
"""

from pathlib import Path

import pytest

from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels.nvrtc import ARCHS, CUDA_DIR, compile_source

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")

SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def test_cuda_folder_has_sources():
    assert cuda_backend.SOURCE in SOURCES


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles(source: Path, arch: str):
    text = source.read_text()
    names = cuda_backend.declared_instantiations(text)
    ptx = compile_source(text, source.name, arch, names)
    assert b".entry" in ptx or not names


def test_declared_instantiations_match_launched_kernels():
    declared = cuda_backend.declared_instantiations(cuda_backend.SOURCE.read_text())
    normalize = lambda s: s.replace(" ", "")  # noqa: E731
    assert sorted(map(normalize, declared)) == sorted(
        map(normalize, cuda_backend.name_expressions())
    )
