"""Tiny offline Llama models, real fine-tunes of them, their deltas, and the
merged dense oracle: shared by the runtime tests and benchmark."""

from __future__ import annotations

import copy

import torch
from torch import nn

import qdelta
from qdelta import reference


def tiny_llama(seed: int, **overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def perturbed(
    base: nn.Module, seed: int, scale: float = 0.03, only: tuple[str, ...] = ()
) -> nn.Module:
    """A fine-tune: every parameter (or those whose name contains one of ``only``) moved."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if not only or any(o in name for o in only):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return ft


def trained(base: nn.Module, seed: int, steps: int = 4) -> nn.Module:
    """A fine-tune by a few AdamW steps on random tokens from a narrow band."""
    ft = copy.deepcopy(base).train()
    g = torch.Generator().manual_seed(seed)
    vocab = ft.config.vocab_size
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(vocab // 3, vocab // 2, (4, 16), generator=g)
        loss = ft(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ft.eval()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def make_delta(
    base: nn.Module, ft: nn.Module, *, bits: int = 1, scale: str = "matrix"
) -> qdelta.Delta:
    """Packed deltas of the block linears; changed other parameters kept whole."""
    bsd, fsd = base.state_dict(), ft.state_dict()
    layers = {}
    for name in linear_names(base):
        diff = (fsd[name + ".weight"] - bsd[name + ".weight"]).float().contiguous()
        if not diff.any():
            continue
        planes, scales = qdelta.pack_residual(diff, bits=bits, scale=scale)
        layers[name] = qdelta.PackedLayer(planes, scales, tuple(diff.shape))
    covered = {n + ".weight" for n in layers}
    params = {
        k: v.clone() for k, v in fsd.items() if k not in covered and not torch.equal(v, bsd[k])
    }
    return qdelta.Delta(layers, params, qdelta.fingerprint(bsd))


def merged(base: nn.Module, delta: qdelta.Delta | None) -> nn.Module:
    """The oracle: base weights + the unpacked delta (torch reference), params replaced."""
    model = copy.deepcopy(base)
    if delta is None:
        return model
    sd = model.state_dict()
    with torch.no_grad():
        for name, layer in delta.layers.items():
            planes = torch.from_numpy(layer.planes.view("int32"))
            dense = reference.unpack_planes(
                planes, torch.from_numpy(layer.scales), layer.shape[1], dtype=torch.float64
            )
            w = sd[name + ".weight"]
            w.copy_((w.double() + dense).to(w.dtype))
        for name, value in delta.params.items():
            sd[name].copy_(value)
    return model


def greedy_alone(model: nn.Module, prompt: list[int], steps: int):
    """Greedy decode of one unpadded prompt by full recomputation (no KV cache)."""
    seq = list(prompt)
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            logits.append(out)
            seq.append(int(out.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask
