"""The runtime's probe of how each module sees the batch (qdelta.batch_layout)."""

from __future__ import annotations

import torch
from torch import nn

from qdelta.batch_layout import probe_layouts


class _TinyMoE(nn.Module):
    """Embedding, then top-1 routing to one of four nn.Linear experts of each of two
    layers (transformers 4.x's Mixtral layout): the probe's tokens never choose
    expert 3, nor expert 2 in the first layer."""

    def __init__(self, vocab: int = 64, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(4))})
            for _ in range(2)
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.embed(input_ids)
        flat = h.reshape(-1, h.shape[-1])
        for i, layer in enumerate(self.layers):
            choice = input_ids.reshape(-1) % (2 if i == 0 else 3)  # experts 0-1 / 0-2
            out = torch.zeros_like(flat)
            for e, expert in enumerate(layer["experts"]):
                rows = (choice == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out[rows] = expert(flat[rows])
            flat = flat + out
        return self.head(flat.reshape(h.shape))


def test_experts_the_probe_never_reached_count_as_gathered_like_their_siblings():
    model = _TinyMoE()
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    layouts = probe_layouts(model, modules, vocab=64)
    experts = {n for n in modules if ".experts." in n}
    assert "layers.0.experts.3" in experts and "layers.1.experts.3" in experts
    assert layouts.other == experts  # reached or not: never the batch's rows
    assert not (layouts.flat & experts)
    assert "head" not in layouts.other and "embed" not in layouts.other
