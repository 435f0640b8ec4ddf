import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    # Fresh random data every run; the seed is printed on failure by pytest's repr.
    return np.random.default_rng()


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
