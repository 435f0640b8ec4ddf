"""Tiny random Hugging Face models built offline from configs, and fake fine-tunes."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 61  # odd on purpose: ragged packing


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    cfg = LlamaConfig(**{**settings, **kw})
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=36,
        n_layer=2,
        n_head=3,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=36,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=70,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@torch.no_grad()
def fake_finetune(base: nn.Module, seed: int = 1, rel: float = 0.05) -> nn.Module:
    """A deep copy of ``base`` with every floating tensor nudged by ~rel of its spread."""
    ft = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    for p in ft.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_((noise * rel * (p.float().std() + 1e-3)).to(p.dtype))
    return ft


def output(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(ids, attention_mask=mask) if mask is not None else model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def one_thread():
    """Generator for a module fixture: tiny models run faster on one thread on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
