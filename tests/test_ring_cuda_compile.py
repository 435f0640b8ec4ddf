"""cuda/attention_block.cu declares exactly the instantiations the cuda backend launches.

tests/test_cuda_compile.py compiles every cuda/*.cu with NVRTC (sm_80, sm_90)
for the instantiations its ``// qdelta-instantiate:`` lines declare.
"""

from qdelta.kernels.cuda import declared_instantiations
from qdelta.ring import cuda_block


def test_instantiate_lines_match_the_backend():
    declared = declared_instantiations(cuda_block.SOURCE.read_text())
    assert sorted(d.replace(" ", "") for d in declared) == sorted(
        i.replace(" ", "") for i in cuda_block.instantiations()
    )
    assert len(declared) == 8  # (v1, mma) x fp16/bf16 x head dims 64/128
