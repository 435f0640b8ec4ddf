"""Where model weights come from: a torch module, a state dict, or a local
Hugging Face model directory (safetensors, loaded offline)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qdelta.errors import FileError, FormatError, ModelMismatchError
from qdelta.optional import require

ModelSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
LayerKind = Literal["linear", "conv1d", "embedding"]


def load_hf_model(path: str | os.PathLike) -> nn.Module:
    """A local Hugging Face model directory as a module (offline, no hub access).

    The class is the config's first ``architectures`` entry (e.g.
    ``LlamaForCausalLM``), falling back to ``AutoModel``.
    """
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelMismatchError(
            f"{directory}: expected a Hugging Face model directory with config.json, found none"
        )
    transformers = require("transformers", "loading a Hugging Face model directory")
    from safetensors import SafetensorError

    config_file = directory / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except OSError as e:  # transformers' word for unreadable or invalid JSON
        raise FormatError(
            f"{config_file}: expected a readable Hugging Face config (JSON), found: "
            f"{' '.join(str(e).split())}"
        ) from e
    except ValueError as e:  # e.g. an unknown model_type
        raise FormatError(f"{config_file}: expected a known model config, found: {e}") from e
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(directory, local_files_only=True)
    except SafetensorError as e:  # truncated or corrupt weights
        files = ", ".join(p.name for p in sorted(directory.glob("*.safetensors")))
        raise FormatError(
            f"{directory}: expected complete safetensors weights, found a damaged file "
            f"({files or 'none'}): {e}"
        ) from e
    except OSError as e:  # no weights file, or one that cannot be read
        raise FileError(
            f"{directory}: expected model weights (model.safetensors), found: "
            f"{' '.join(str(e).split())}"
        ) from e
    return model.eval()


def as_module(src: ModelSource) -> nn.Module | None:
    """The source as a module: itself, a loaded HF directory, or None for a state dict."""
    if isinstance(src, nn.Module):
        return src
    if isinstance(src, (str, os.PathLike)):
        return load_hf_model(src)
    if isinstance(src, Mapping):
        return None
    raise ModelMismatchError(
        "model: expected an nn.Module, a state dict or a Hugging Face model directory, "
        f"found {type(src).__name__}"
    )


def state_dict_of(src: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> tensor, detached, without copying."""
    items = src.state_dict(keep_vars=False) if isinstance(src, nn.Module) else src
    out: dict[str, torch.Tensor] = {}
    for name, value in items.items():
        if not isinstance(value, torch.Tensor):
            raise ModelMismatchError(
                f"state dict entry {name!r}: expected a torch.Tensor, found {type(value).__name__}"
            )
        out[name] = value.detach()
    return out


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer with weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_kinds(module: nn.Module) -> dict[str, LayerKind]:
    """Module name -> kind for every layer a delta can replace."""
    kinds: dict[str, LayerKind] = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            kinds[name] = "linear"
        elif is_conv1d(child):
            kinds[name] = "conv1d"
        elif isinstance(child, nn.Embedding):
            kinds[name] = "embedding"
    return kinds


def guess_layer_kinds(state: Mapping[str, torch.Tensor]) -> dict[str, LayerKind]:
    """Without a module every 2-D floating ``*.weight`` is taken for an ``nn.Linear``."""
    return {
        key[: -len(".weight")]: "linear"
        for key, value in state.items()
        if key.endswith(".weight") and value.dim() == 2 and value.is_floating_point()
    }


def model_output(out: Any) -> torch.Tensor:
    """The tensor to compare from a model's output: logits, else the last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelMismatchError(
        f"model output: expected a tensor or an object with .logits, found {type(out).__name__}"
    )
