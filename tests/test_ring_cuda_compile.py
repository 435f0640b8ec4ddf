"""cuda/attention_block.cu compiles with NVRTC for every shipped arch and instantiation."""

import re

import pytest

from qdelta.kernels.nvrtc import ARCHS, compile_source
from qdelta.ring import cuda_block

SOURCE = cuda_block.SOURCE.read_text()


def test_instantiate_lines_match_the_backend():
    listed = [n.strip() for n in re.findall(r"qdelta-instantiate:\s*(.+)", SOURCE)]
    assert sorted(listed) == sorted(cuda_block.instantiations())


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_block_compiles(arch):
    ptx = compile_source(SOURCE, "attention_block.cu", arch, cuda_block.instantiations())
    text = ptx.decode(errors="replace")
    assert text.count(".entry") == len(cuda_block.instantiations())
    assert f".target {arch}" in text
