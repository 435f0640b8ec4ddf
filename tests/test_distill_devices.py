"""compress -> distill -> apply on every device available (CUDA runs the cupy kernels)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qdelta

VOCAB, WIDTH = 61, 48

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


class TinyLM(nn.Module):
    """Embedding -> two linears -> logits; enough to distill scales against."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH + 3)
        self.fc2 = nn.Linear(2 * WIDTH + 3, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


@pytest.mark.parametrize("device", DEVICES)
def test_distill_lowers_the_loss_and_trains_only_scales(device):
    torch.manual_seed(0)
    base = TinyLM().to(device)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for layer in (ft.fc1, ft.fc2):
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    delta = qdelta.compress(base, ft, bits=1, targets=["fc1", "fc2"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    calib = torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(1))
    result = qdelta.distill(base, ft, delta, calib, steps=40, lr=1e-3, progress=False)
    assert result.loss_after < result.loss_before
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    trained = result.delta
    assert any(
        (a.scales != b.scales).any()
        for a, b in zip(delta.layers.values(), trained.layers.values(), strict=True)
    )
    merged = qdelta.merge(copy.deepcopy(base), trained)
    qdelta.apply(base, trained)
    ids = torch.randint(0, VOCAB, (3, 11), device=device)
    with torch.no_grad():
        torch.testing.assert_close(base(ids), merged(ids), rtol=1e-4, atol=1e-4)
