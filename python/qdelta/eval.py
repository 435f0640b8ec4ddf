"""Quality evaluation: perplexity on held-out text, the fraction of a fine-tune's
improvement that a compressed model keeps, and the results table.

Perplexity here is exact, not an average of per-window averages: the token
stream (``<bos>`` + the text's tokens) is cut into consecutive windows of
``window`` input tokens; window k feeds ``S[k*w : k*w+w]`` and predicts
``S[k*w+1 : k*w+w+1]``, so every text token is predicted exactly once, with the
context restarting at each window. The last window is padded on the right and
its padding masked out (right padding never reaches earlier positions of a
causal LM). ``ppl = exp(sum NLL / number of predicted tokens)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qdelta.atomic_io import read_regular_text, write_json_atomic
from qdelta.errors import EvalError
from qdelta.sources import max_positions, vocab_size
from qdelta.tokenizer import ByteTokenizer

# The variants the results table knows, in display order (others sort after them).
VARIANTS = (
    "base",
    "finetune",
    "bitdelta-init",
    "bitdelta-distilled",
    "bitdelta-row-distilled",
    "2-bit",
    "2-bit-distilled",
    "3-bit",
)


@dataclass(frozen=True)
class Perplexity:
    """Summed NLL (nats) over ``tokens`` predicted tokens."""

    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "mean_nll": self.mean_nll,
            "bits_per_token": self.bits_per_token,
            "nll_sum": self.nll_sum,
            "tokens": self.tokens,
        }


def _logits(output: object) -> torch.Tensor:
    """Logits from a tensor, a transformers ModelOutput, or a tuple whose first item they are."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EvalError(
        f"expected the model to return logits [batch, seq, vocab] (a tensor or an object "
        f"with .logits), found {type(output).__name__}"
    )


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvalError(f"{name}: expected an int >= 1, found {type(value).__name__}")
    if value < 1:
        raise EvalError(f"{name}: expected an int >= 1, found {value}")


def stream_windows(stream: torch.Tensor, window: int, pad_id: int = 0):
    """(inputs [n, window], targets [n, window], mask [n, window]) of the exact windowing."""
    _positive_int("window", window)
    predicted = stream.numel() - 1
    if predicted < 1:
        raise EvalError(
            f"expected at least one token to predict, found a stream of {stream.numel()}"
        )
    n = math.ceil(predicted / window)
    padded = torch.full((n * window + 1,), pad_id, dtype=torch.long)
    padded[: stream.numel()] = stream
    inputs = padded[:-1].view(n, window)
    targets = padded[1:].view(n, window)
    mask = (torch.arange(n * window) < predicted).view(n, window)
    return inputs, targets, mask


def _token_ids(stream: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The stream as int64 ids; a float stream is refused (a cast would truncate it)."""
    found = torch.as_tensor(stream)
    if found.is_floating_point() or found.is_complex() or found.dtype == torch.bool:
        raise EvalError(f"token stream: expected integer token ids, found {found.dtype}")
    return found.to(torch.long).flatten()


def _check_fits(model: nn.Module, stream: torch.Tensor, window: int, pad_id: int) -> None:
    """Ids outside the vocabulary or windows past a learned position table fail deep
    inside the model's forward (an IndexError): refused here, naming what is wrong."""
    vocab = vocab_size(model)
    if vocab is not None:
        for what, ids in (("token id", stream), ("pad_id", torch.tensor([pad_id]))):
            bad = (ids < 0) | (ids >= vocab)
            if bool(bad.any()):
                at = int(bad.nonzero()[0])
                raise EvalError(
                    f"{what}: expected ids in the model's vocabulary of {vocab} "
                    f"(0..{vocab - 1}), found {int(ids[at])}"
                    + (f" at position {at} of the stream" if what == "token id" else "")
                    + " (a tokenizer made for another vocabulary?)"
                )
    limit = max_positions(model)
    if limit is not None and window > limit:  # every window is padded to full length
        raise EvalError(
            f"window: expected at most {limit} tokens (the model's positions), found {window}"
        )


@torch.inference_mode()
def token_stream_nll(
    model: nn.Module,
    stream: Sequence[int] | torch.Tensor,
    *,
    window: int = 256,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> Perplexity:
    """Exact summed NLL of ``stream[1:]`` under ``model`` (see the module docstring)."""
    _positive_int("batch_size", batch_size)
    stream = _token_ids(stream)
    inputs, targets, mask = stream_windows(stream, window, pad_id)
    _check_fits(model, stream, window, pad_id)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in tqdm(
            range(0, inputs.shape[0], batch_size), desc=desc, disable=not progress, leave=False
        ):
            x = inputs[start : start + batch_size].to(device)
            y = targets[start : start + batch_size].to(device)
            m = mask[start : start + batch_size].to(device)
            logits = _logits(model(x)).float()
            if logits.shape[:2] != x.shape:
                raise EvalError(
                    f"expected logits of shape [{x.shape[0]}, {x.shape[1]}, vocab], "
                    f"found {tuple(logits.shape)}"
                )
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            # Selected, not multiplied by the mask: a non-finite logit at a padded
            # position (inf * 0 = NaN) must not reach the sum.
            total += nll.double()[m.reshape(-1)].sum().cpu()
    finally:
        model.train(was_training)
    return Perplexity(float(total), int(mask.sum()))


def perplexity(
    model: nn.Module,
    text: str,
    tokenizer: ByteTokenizer | None = None,
    *,
    window: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> Perplexity:
    """Perplexity of ``model`` on ``text``: ``<bos>`` + the (first ``max_tokens``) tokens."""
    tokenizer = tokenizer or ByteTokenizer()
    if max_tokens is not None:
        _positive_int("max_tokens", max_tokens)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise EvalError("expected non-empty evaluation text, found an empty string")
    return token_stream_nll(
        model,
        [tokenizer.bos_id, *ids],
        window=window,
        batch_size=batch_size,
        pad_id=tokenizer.pad_id,
        progress=progress,
        desc=desc,
    )


def evaluate_models(
    models: Mapping[str, nn.Module],
    texts: Mapping[str, str] | str,
    tokenizer: ByteTokenizer | None = None,
    *,
    window: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """``{model name: {text name: Perplexity.to_dict()}}`` for every model on every text.

    ``models`` may be any causal LMs mapping token ids [batch, seq] to logits
    [batch, seq, vocab]; ``texts`` a single string (named "text") or a mapping.
    """
    if isinstance(texts, str):
        texts = {"text": texts}
    results: dict[str, dict[str, dict]] = {}
    jobs = [(m, t) for m in models for t in texts]
    with tqdm(total=len(jobs), desc="perplexity", disable=not progress) as bar:
        for model_name, text_name in jobs:
            bar.set_postfix_str(f"{model_name} on {text_name}")
            result = perplexity(
                models[model_name],
                texts[text_name],
                tokenizer,
                window=window,
                batch_size=batch_size,
                max_tokens=max_tokens,
            )
            results.setdefault(model_name, {})[text_name] = result.to_dict()
            bar.update()
    return results


def kept_fraction(ppl_base: float, ppl_ft: float, ppl_x: float) -> float:
    """The fraction of the fine-tune's improvement over base that model x keeps.

    ``(ppl_base - ppl_x) / (ppl_base - ppl_ft)``: 1 = as good as the fine-tune,
    0 = no better than base; it can exceed 1 or go negative.
    """
    for name, value in (("ppl_base", ppl_base), ("ppl_ft", ppl_ft), ("ppl_x", ppl_x)):
        if not math.isfinite(value) or value <= 0:
            raise EvalError(f"expected {name} to be a finite positive perplexity, found {value}")
    if ppl_base == ppl_ft:
        raise EvalError(
            f"the kept fraction is undefined: the fine-tune's perplexity equals the base's "
            f"({ppl_ft}); expected a fine-tune that changes the base"
        )
    return (ppl_base - ppl_x) / (ppl_base - ppl_ft)


# ---------------------------------------------------------------- results table


@dataclass
class ResultRow:
    """One model variant of one tenant, evaluated on the tenant's domain."""

    tenant: str
    domain: str
    variant: str
    ppl: float
    kept: float | None = None
    bits: float | None = None  # bits per delta weight (None for dense models)
    delta_bytes: int | None = None
    compression: float | None = None  # fp16 fine-tune bytes / delta bytes


def quality_rows(
    tenant: str,
    domain: str,
    ppls: Mapping[str, float],
    *,
    base: str = "base",
    finetune: str = "finetune",
    sizes: Mapping[str, Mapping[str, float]] | None = None,
) -> list[ResultRow]:
    """Rows for one tenant from ``{variant: ppl}``; ``kept`` is filled for every variant.

    ``sizes`` optionally gives ``{variant: {"bits": .., "delta_bytes": .., "compression": ..}}``.
    """
    for needed in (base, finetune):
        if needed not in ppls:
            raise EvalError(f"expected a {needed!r} perplexity for {tenant}, found {sorted(ppls)}")
    rows = []
    for variant, ppl in ppls.items():
        extra = dict((sizes or {}).get(variant, {}))
        rows.append(
            ResultRow(
                tenant=tenant,
                domain=domain,
                variant=variant,
                ppl=float(ppl),
                kept=kept_fraction(ppls[base], ppls[finetune], ppl),
                bits=extra.get("bits"),
                delta_bytes=None if extra.get("delta_bytes") is None else int(extra["delta_bytes"]),
                compression=extra.get("compression"),
            )
        )
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(rows, key=lambda r: (order.get(r.variant, len(order)), r.variant))


def _cell(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: Sequence[ResultRow]) -> str:
    """A fixed-width text table of the rows, one block per tenant."""
    header = (
        f"{'tenant':<14} {'domain':<6} {'variant':<22} {'ppl':>8} {'kept':>7} "
        f"{'bits':>5} {'delta bytes':>12} {'vs fp16':>8}"
    )
    lines = [header, "-" * len(header)]
    previous = None
    for r in rows:
        if previous is not None and r.tenant != previous:
            lines.append("")
        previous = r.tenant
        kept = "-" if r.kept is None else f"{100 * r.kept:6.1f}%"
        ratio = "-" if r.compression is None else f"{r.compression:.1f}x"
        lines.append(
            f"{r.tenant:<14} {r.domain:<6} {r.variant:<22} {r.ppl:>8.4f} {kept:>7} "
            f"{_cell(r.bits, '.0f'):>5} {_cell(r.delta_bytes, ','):>12} {ratio:>8}"
        )
    return "\n".join(lines)


def write_results(path: str | Path, rows: Sequence[ResultRow], meta: dict | None = None) -> Path:
    """Write ``{"meta": .., "rows": [..]}`` as JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, {"meta": meta or {}, "rows": [asdict(r) for r in rows]})


def read_results(path: str | Path) -> tuple[dict, list[ResultRow]]:
    data = json.loads(read_regular_text(path))
    return data.get("meta", {}), [ResultRow(**r) for r in data["rows"]]
