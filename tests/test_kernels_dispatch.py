"""Backend selection of qdelta.kernels (runs everywhere)."""

import pytest
import torch

from qdelta import QDeltaError, kernels
from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels import reference


def test_auto_on_cpu_tensors_matches_the_reference():
    # "auto" runs the Rust kernel here (small CPU batch), the reference is the oracle.
    x = torch.randn(3, 40)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 1, 5, 2), dtype=torch.int32)
    scales = torch.rand(2, 1)
    ids = torch.tensor([1, -1, 0])
    got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    want = reference.multi_tenant_delta_matmul(x, planes, scales, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(cuda_backend.available(), reason="checks the no-GPU error")
def test_cuda_backend_without_device_is_a_clear_error():
    x = torch.randn(2, 32)
    planes = torch.zeros(1, 3, 1, dtype=torch.int32)
    with pytest.raises(QDeltaError, match="backend 'cuda'"):
        kernels.delta_matmul(x, planes, torch.ones(1), backend="cuda")
