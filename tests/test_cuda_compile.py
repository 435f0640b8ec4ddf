"""Every .cu file in qdelta/_cuda/ compiles with NVRTC for the shipped architectures (no GPU needed).

Each file declares the template instantiations to check with lines
``// qdelta-instantiate: name<...>``.
"""

import re
from pathlib import Path

import pytest

from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels.nvrtc import ARCHS, CUDA_DIR, compile_source, find_ptxas, kernel_resources

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")

SOURCES = sorted(CUDA_DIR.glob("*.cu"))
# Spills that are known and measured, as (regex on the mangled name, arch) -> most bytes
# allowed. Any other spill, or a bigger one, fails: it would be a regression.
KNOWN_SPILLS = {
    # R = 1 table kernel with the next-slice prefetch (LUT_PREFETCH_NEXT, off by default)
    # under __launch_bounds__(256, 2) (128 registers): 32 words in flight, 32 more being
    # prefetched and 32 sums; both spill a little (docs/CUDA.md). The default R = 1
    # kernel (no prefetch) fits in 128 registers on both.
    (r"12qd_delta_lutILi\dELi1ELi1E", "sm_80"): 200,
    (r"12qd_delta_lutILi\dELi1ELi1E", "sm_90"): 96,
    # The CUDA-core block kernel (the tensor-core ones are the default on sm_80+).
    (r"15attention_blockILi0ELi64E", "sm_90"): 48,
}


def test_cuda_folder_has_sources():
    assert cuda_backend.SOURCE in SOURCES


def test_kernel_sources_ship_inside_the_package():
    # The wheel holds the package directory only: sources outside it (the old
    # top-level cuda/) were missing from every installed copy.
    import qdelta
    from qdelta.kernels import emulator
    from qdelta.ring import cuda_block

    package = Path(qdelta.__file__).resolve().parent
    for path in (cuda_backend.SOURCE, cuda_block.SOURCE, emulator.HEADER, *SOURCES):
        assert path.is_file() and path.is_relative_to(package), path
    assert {p.name for p in SOURCES} == {"delta_matmul.cu", "attention_block.cu"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles(source: Path, arch: str):
    text = source.read_text(encoding="utf-8")
    names = cuda_backend.declared_instantiations(text)
    ptx = compile_source(text, source.name, arch, names)
    assert b".entry" in ptx or not names
    ptxas = find_ptxas()
    if ptxas is None or not names:
        return
    # Register spills turn a kernel's inner loop into local-memory traffic: none allowed.
    resources = kernel_resources(ptx, arch, ptxas)
    assert len(resources) >= len(names), f"ptxas saw {sorted(resources)}"
    spilling = {
        k: v
        for k, v in resources.items()
        if v["spill_bytes"]
        > max((b for (f, a), b in KNOWN_SPILLS.items() if re.search(f, k) and a == arch), default=0)
    }
    assert not spilling, f"{source.name} ({arch}): kernels spill registers: {spilling}"


def test_declared_instantiations_match_launched_kernels():
    declared = cuda_backend.declared_instantiations(cuda_backend.SOURCE.read_text(encoding="utf-8"))
    normalize = lambda s: s.replace(" ", "")  # noqa: E731
    assert sorted(map(normalize, declared)) == sorted(
        map(normalize, cuda_backend.name_expressions())
    )


def _opcode(instr: str) -> str:
    """``@!P0 LDS.U R1, [R2]`` -> ``LDS``."""
    words = instr.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_table_lookup_loop_issue_budget(arch):
    """The decode kernel's lookup loop (after a slice's last barrier, before the lane
    sums' shuffles) costs at most 22 instructions per packed word: 4 LDS, and per byte
    one rotate, one LOP3 and one FADD, plus the step's uniform branch (19.3 on sm_80,
    19.8 on sm_90 with the ptxas 12.9 triton ships; the budget leaves room for other ptxas
    versions, the previous form cost 24). No per-lane branch (BSSY) around the steps.
    A regression here is a slower kernel whatever the GPU (docs/CUDA.md)."""
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas")
    from qdelta.kernels.nvrtc import kernel_sass

    ptx = compile_source(
        cuda_backend.SOURCE.read_text(encoding="utf-8"),
        "delta_matmul.cu",
        arch,
        ["qd_delta_lut<0, 1, 0>"],
    )
    listing = kernel_sass(ptx, arch, ptxas)
    if listing is None:
        pytest.skip("no nvdisasm next to ptxas")
    (sass,) = [v for k, v in listing.items() if "qd_delta_lut" in k]
    ops = [_opcode(i) for i in sass]
    last_barrier = max(i for i, op in enumerate(ops) if op == "BAR")
    loop = ops[last_barrier + 1 : ops.index("SHFL", last_barrier)]
    words = loop.count("LDS") / 4
    assert words == 32, (
        f"expected 32 words (4 LDS each) per lane and slice, found {loop.count('LDS')} LDS"
    )
    per_word = len(loop) / words
    assert per_word <= 22, f"{arch}: expected <= 22 instructions per word, found {per_word:.1f}"
    assert "BSSY" not in loop, f"{arch}: a per-lane branch is back in the lookup loop"


def test_no_module_reads_files_outside_the_package():
    # What the wheel ships is the package directory: a path climbing out of it
    # from __file__ works in this checkout and breaks every installed copy.
    import re

    import qdelta

    package = Path(qdelta.__file__).resolve().parent
    climbing = re.compile(r"__file__\)?(\.resolve\(\))?\.(parents\[[1-9]|parent\.parent)")
    offenders = [
        f"{p.relative_to(package)}:{n}"
        for p in sorted(package.rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if climbing.search(line)
    ]
    assert not offenders, offenders
