"""Where model weights come from: a torch module, a state dict, or a local
Hugging Face model directory (safetensors, loaded offline)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from qdelta.errors import FileError, FormatError, ModelMismatchError
from qdelta.optional import require

ModelSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
LayerKind = Literal["linear", "conv1d", "embedding"]
EmbeddingForm = Literal["plain", "scaled"]


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
        # transformers 4.x wraps a damaged .bin's unpickling error in an OSError
        # without an errno; a real file problem (missing, unreadable) has one.
        inner = e.__cause__ or e.__context__
        damaged = None
        if e.errno is None and inner is not None and not isinstance(inner, OSError):
            damaged = _damaged_pickle(directory, inner)
        if damaged is not None:
            raise damaged from inner
        raise FileError(
            f"{directory}: expected model weights (model.safetensors), found: "
            f"{' '.join(str(e).split())}"
        ) from e
    except Exception as e:
        # torch.load of a damaged pytorch_model.bin fails with whatever its unpickler or
        # zip reader hits (RuntimeError, KeyError, UnpicklingError, EOFError...).
        damaged = _damaged_pickle(directory, e)
        if damaged is None:
            raise
        raise damaged from e
    return model.eval()


def _damaged_pickle(directory: Path, error: BaseException) -> FormatError | None:
    """The FormatError for a directory whose weights are only pickled (``*.bin``)
    and failed to load with ``error``; None when the directory has other weights."""
    pickled = sorted(p.name for p in directory.glob("*.bin"))
    if not pickled or any(directory.glob("*.safetensors")):
        return None
    return FormatError(
        f"{directory}: expected loadable PyTorch weights ({', '.join(pickled)}), found a "
        f"damaged file: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
    )


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


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids a model takes: its input embedding's rows, else its
    config's ``vocab_size``; None when neither says."""
    try:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
    except NotImplementedError:  # a transformers model without input embeddings
        emb = None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model can take: what its config declares
    (``max_position_embeddings``, GPT-2's ``n_positions``) when it looks positions
    up in a learned table (GPT-2's ``wpe``, OPT's ``embed_positions``), where a longer
    one fails; None otherwise (rotary and ALiBi models run past the declared length,
    with rope scaling by design)."""
    learned = any(
        isinstance(m, nn.Embedding) and ("position" in name or name.endswith("wpe"))
        for name, m in model.named_modules()
    )
    if not learned:
        return None
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same elements (tied weights: one tensor
    under two names, or two views of one storage)."""
    where = (id(t),) if t.is_meta else (t.device, t.untyped_storage().data_ptr())
    return (*where, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer with weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _single_input_forward(module: nn.Module) -> bool:
    """Whether the class's ``forward`` takes exactly one input and nothing else (no
    defaults, no ``*args`` / ``**kwargs``): a lookup or linear map of one tensor.
    OPT's positional embedding (``forward(attention_mask, past_key_values_length,
    position_ids)``) is not."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(params) == 1 and params[0].kind in kinds


def _close(found: object, want: torch.Tensor) -> bool:
    """``found`` is a tensor equal to ``want`` up to a few roundings of its dtype."""
    if not isinstance(found, torch.Tensor) or found.shape != want.shape:
        return False
    tol = 8 * torch.finfo(want.dtype).eps
    found, want = found.detach().double(), want.detach().double()
    if not bool(torch.isfinite(found).all()):
        return False
    return bool(((found - want).abs() <= tol * (want.abs() + want.abs().max())).all())


def embedding_form(module: nn.Module) -> EmbeddingForm | None:
    """How ``module(ids)`` is computed from ``module.weight``, or None when it is not
    a lookup a delta of the weight's rows can follow.

    ``"plain"``: ``F.embedding(ids, weight)``: ``nn.Embedding`` itself, or a subclass
    whose forward takes the ids alone and is checked on probe ids to compute exactly
    that. ``"scaled"``: the lookup times ``module.embed_scale`` in the weight's dtype
    (Gemma's ``*ScaledWordEmbedding``), also checked on probe ids. Anything else
    (e.g. OPT's positional embedding, whose forward takes a mask and offsets the
    positions) is None: wrapping it would be guesswork.
    """
    if not isinstance(module, nn.Embedding):
        return None
    if module.max_norm is not None:  # F.embedding would renormalise the rows in place
        return None
    if type(module) is nn.Embedding:
        return "plain"
    weight = module.weight
    if (
        not _single_input_forward(module)
        or not isinstance(weight, torch.Tensor)
        or weight.is_meta
        or not weight.is_floating_point()
    ):
        return None
    n = module.num_embeddings
    ids = torch.linspace(0, n - 1, steps=min(n, 16)).round().long().unique()[None]
    ids = ids.to(weight.device)
    try:
        with torch.no_grad():
            found = module(ids)
            raw = F.embedding(ids, weight, module.padding_idx)
    except Exception:  # a forward that does not take ids: not a lookup
        return None
    if not bool(raw.any()):
        return None  # all-zero rows prove nothing about a factor
    if _close(found, raw):
        return "plain"
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (torch.Tensor, float, int)) and not isinstance(scale, bool):
        factor = torch.as_tensor(scale).to(device=weight.device, dtype=weight.dtype)
        if factor.numel() == 1 and _close(found, raw * factor):
            return "scaled"
    return None


def embedding_scale(module: nn.Module) -> torch.Tensor:
    """The factor a ``"scaled"`` embedding multiplies its lookup by, as the module
    does: ``embed_scale`` in the weight's dtype (read now, so it follows ``.to()``)."""
    weight = module.weight
    return torch.as_tensor(module.embed_scale).to(device=weight.device, dtype=weight.dtype)


def linear_form(module: nn.Module) -> bool:
    """Whether ``module(x)`` is ``F.linear(x, weight, bias)``: ``nn.Linear`` itself, or
    a subclass whose forward takes one input and is checked on a probe input."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module) is nn.Linear:
        return True
    return _computes(module, 1, lambda x, w, b: F.linear(x, w, b))


def conv1d_form(module: nn.Module) -> bool:
    """Whether ``module(x)`` is ``x @ weight + bias`` with ``weight [in, out]``: a
    transformers GPT-2 style ``Conv1D`` (:func:`is_conv1d`), checked on a probe input."""
    if not is_conv1d(module):
        return False
    return _computes(module, 0, lambda x, w, b: x @ w if b is None else x @ w + b)


def _computes(module: nn.Module, in_dim: int, want: Any) -> bool:
    """Whether a one-input module with a 2-D float ``weight`` (inputs along
    ``in_dim``) and optional 1-D ``bias`` returns ``want(x, weight, bias)`` on a
    probe input."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if (
        not _single_input_forward(module)
        or not isinstance(weight, torch.Tensor)
        or weight.is_meta
        or not weight.is_floating_point()
        or weight.dim() != 2
        or (bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1))
    ):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, weight.shape[in_dim], generator=gen)
    x = x.to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            return _close(module(x), want(x, weight, bias))
    except Exception:
        return False


def layer_kinds(module: nn.Module) -> dict[str, LayerKind]:
    """Module name -> kind for every layer a delta can replace.

    Subclasses of ``nn.Linear`` / ``nn.Embedding`` count only when their forward is
    checked to be the plain map (:func:`linear_form`, :func:`embedding_form`);
    the others (OPT's positional embedding, say) keep their weights whole.
    """
    kinds: dict[str, LayerKind] = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            if linear_form(child):
                kinds[name] = "linear"
        elif is_conv1d(child):
            kinds[name] = "conv1d"
        elif isinstance(child, nn.Embedding):
            if embedding_form(child) is not None:
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
