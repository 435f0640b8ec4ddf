"""Calibration data for scale distillation as padded token batches.

Accepted: a list of strings (one sequence each, needs a tokenizer), the path
of a text file (tokenized whole and cut into ``seq_len`` windows, needs a
tokenizer), token ids as a tensor (``[n, L]`` rows or a 1-D stream), or a
mapping with ``input_ids`` (and optionally ``attention_mask``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qdelta.errors import CalibrationError

Calibration = Sequence[str] | str | os.PathLike | torch.Tensor | Mapping[str, Any]


def _encode(tokenizer: Callable[..., Any] | None, text: str, what: str) -> list[int]:
    if tokenizer is None:
        raise CalibrationError(
            f"calibration {what}: expected a tokenizer to encode text, found None"
        )
    out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _windows(stream: list[int], seq_len: int) -> list[list[int]]:
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _sequences(calib: Calibration, tokenizer: Any, seq_len: int) -> list[list[int]]:
    if isinstance(calib, torch.Tensor):
        if calib.is_floating_point() or calib.dim() not in (1, 2):
            raise CalibrationError(
                f"calibration tensor: expected integer token ids [n, L] or [L], "
                f"found {calib.dtype} {list(calib.shape)}"
            )
        if calib.dim() == 1:
            return _windows(calib.tolist(), seq_len)
        return [row[:seq_len] for row in calib.tolist()]
    if isinstance(calib, Mapping):
        if "input_ids" not in calib:
            raise CalibrationError(
                f"calibration mapping: expected 'input_ids', found {sorted(calib)}"
            )
        ids = torch.as_tensor(calib["input_ids"])
        mask = torch.as_tensor(calib.get("attention_mask", torch.ones_like(ids)))
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None]
        return [r[m.bool()].tolist()[:seq_len] for r, m in zip(ids, mask, strict=True)]
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise CalibrationError(
                f"calibration: expected a text file path (or a list of strings), found no file {path}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(
                f"calibration file {path}: expected UTF-8 text, found byte "
                f"0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})"
            ) from e
        except OSError as e:
            raise CalibrationError(
                f"calibration file {path}: expected a readable file, found {e}"
            ) from e
        return _windows(_encode(tokenizer, text, str(path)), seq_len)
    if isinstance(calib, Sequence) and all(isinstance(s, str) for s in calib):
        return [_encode(tokenizer, s, "text")[:seq_len] for s in calib]
    raise CalibrationError(
        "calibration: expected a list of strings, a text file, a token tensor or a mapping "
        f"with input_ids, found {type(calib).__name__}"
    )


def prepare_calibration(
    calib: Calibration, tokenizer: Any = None, *, seq_len: int = 128, min_sequences: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both int64 ``[n, L]``, right-padded, ``L <= seq_len``.

    Empty sequences are dropped; fewer than ``min_sequences`` remaining is a
    :class:`CalibrationError`.
    """
    if seq_len < 1:
        raise CalibrationError(f"seq_len: expected >= 1, found {seq_len}")
    seqs = [s for s in _sequences(calib, tokenizer, seq_len) if s]
    if len(seqs) < min_sequences:
        tokens = sum(len(s) for s in seqs)
        raise CalibrationError(
            f"calibration data too short: expected at least {min_sequences} non-empty sequences "
            f"of up to {seq_len} tokens, found {len(seqs)} ({tokens} tokens)"
        )
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    return _pad(seqs, pad_id)
