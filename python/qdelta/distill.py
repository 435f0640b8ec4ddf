"""Scale distillation (BitDelta): train only the delta's scales so the base +
delta model's outputs match the fine-tune's on calibration text.

Loss: MSE between logits (or KL between their softmaxes) over non-padding
tokens; AdamW with a cosine schedule; defaults as in the paper (200 steps,
batch 4, 128 tokens). The base weights are shared with the user's model, never
copied, and never change; the model is restored afterwards.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qdelta.calibration import Calibration, prepare_calibration
from qdelta.checks import as_int
from qdelta.compress import check_same_architecture
from qdelta.delta import Delta
from qdelta.errors import (
    CalibrationError,
    DTypeError,
    ModelMismatchError,
    NonFiniteError,
    ShapeError,
)
from qdelta.nn import apply, delta_modules, read_scales, unapply
from qdelta.sources import (
    ModelSource,
    as_module,
    layer_kinds,
    max_positions,
    model_output,
    state_dict_of,
    vocab_size,
)

LossName = Literal["mse", "kl"]
LOSSES = ("mse", "kl")


@dataclass
class DistillResult:
    """The distilled delta and the calibration loss around training.

    ``loss_after`` is the trained scales' loss; ``kept_initial`` says that it was
    higher than ``loss_before`` and ``delta`` carries the initial scales
    (``keep_best=True``)."""

    delta: Delta
    loss_before: float
    loss_after: float
    losses: list[float] = field(default_factory=list)
    kept_initial: bool = False


def output_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: LossName = "mse"
) -> torch.Tensor:
    """Mean over non-padding tokens of the per-token MSE (over the last axis) or KL(teacher || student)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "kl":
        per_token = F.kl_div(
            F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none"
        ).sum(-1)
    else:
        raise ShapeError(f"loss: expected one of {LOSSES}, found {kind!r}")
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _Runner:
    """Calls a model on token batches, passing the attention mask when it takes one."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = _device(model)
        params = inspect.signature(model.forward).parameters
        self.takes_mask = "attention_mask" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(ids, attention_mask=mask) if self.takes_mask else self.model(ids)
        return model_output(out)


def _check_arguments(steps, batch_size, seq_len, lr, loss, seed, eval_batches) -> None:
    as_int("steps", steps, 0)
    as_int("batch_size", batch_size, 1)
    as_int("seq_len", seq_len, 1)
    as_int("seed", seed, 0, 2**63)
    as_int("eval_batches", eval_batches, 1)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise DTypeError(f"lr: expected a number, found {type(lr).__name__}")
    if not math.isfinite(lr) or lr <= 0 or lr > torch.finfo(torch.float32).max:
        raise ShapeError(f"lr: expected a finite float32 number > 0, found {lr}")
    if loss not in LOSSES:
        raise ShapeError(f"loss: expected one of {LOSSES}, found {loss!r}")


def _check_positions(ids: torch.Tensor, model: nn.Module) -> None:
    """Windows longer than the model's positions fail deep inside its forward."""
    limit = max_positions(model)
    if limit is not None and ids.shape[-1] > limit:
        raise CalibrationError(
            f"calibration windows: expected at most {limit} tokens (the model's positions), "
            f"found windows of {ids.shape[-1]}; pass a smaller seq_len (qdelta compress --seq-len)"
        )


def _check_pair(base: nn.Module, finetuned: nn.Module) -> None:
    """One architecture (names and shapes), or the student trains toward the wrong outputs."""
    ft_sd = state_dict_of(finetuned)
    kinds = {n: k for n, k in layer_kinds(finetuned).items() if f"{n}.weight" in ft_sd}
    check_same_architecture(state_dict_of(base), ft_sd, kinds)


def _check_vocab(ids: torch.Tensor, model: nn.Module) -> None:
    vocab = vocab_size(model)
    if vocab is None or not ids.numel():
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise CalibrationError(
            f"calibration token ids: expected ids in the model's vocabulary of {vocab} "
            f"(0..{vocab - 1}), found {int(ids[row, pos])} at row {row}, position {pos} "
            "(padding included: check the tokenizer's pad_token_id)"
        )


def _check_step(
    step: int, steps: int, value: torch.Tensor, scales: list[torch.Tensor], loss: str
) -> None:
    """A NaN/Inf loss or gradient would make every scale NaN at this step's update."""
    value = value.detach()
    checks = [torch.isfinite(value)] + [
        torch.isfinite(s.grad).all().to(value.device) for s in scales if s.grad is not None
    ]
    if not bool(torch.stack(checks).all()):  # one sync a step
        what = f"loss {float(value)}" if not bool(torch.isfinite(value)) else "scale gradients"
        raise NonFiniteError(
            f"distill step {step + 1} of {steps}: expected a finite {loss} loss and gradients, "
            f"found non-finite {what} (the fine-tune's or the student's outputs on this "
            "batch, or a far too large lr); nothing was updated at this step and the model "
            "is restored"
        )


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Seeded epochs of shuffled indices, cut into ``steps`` batches."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch_size / n) + 1)]
    )
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def distill(
    base: ModelSource,
    finetuned: ModelSource,
    delta: Delta,
    calib: Calibration,
    *,
    tokenizer: Any = None,
    steps: int = 200,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 1e-4,
    loss: LossName = "mse",
    seed: int = 0,
    eval_batches: int = 4,
    progress: bool = True,
    keep_best: bool = True,
) -> DistillResult:
    """Train the scales of ``delta`` (a copy; ``delta`` itself is not changed).

    ``base`` and ``finetuned`` are modules (or HF model directories), each on
    the device it should run on; the student runs where ``base`` is.
    ``loss_before`` / ``loss_after``: the mean loss over the first
    ``eval_batches`` calibration batches with the initial and the trained scales.
    A run whose trained scales fit worse than the initial ones returns the
    initial scales (``kept_initial``) with ``keep_best`` (the default), or the
    trained ones with a ``RuntimeWarning`` without it.
    Every argument, the model pair and the calibration data are checked before
    the delta is applied to ``base``.
    """
    _check_arguments(steps, batch_size, seq_len, lr, loss, seed, eval_batches)
    if not isinstance(keep_best, bool):
        raise DTypeError(f"keep_best: expected a bool, found {type(keep_best).__name__}")
    base_mod, ft_mod = as_module(base), as_module(finetuned)
    if base_mod is None or ft_mod is None:
        raise ModelMismatchError(
            "distill: expected modules or model directories, found a state dict"
        )
    if delta_modules(base_mod):  # else the pair check names the wrappers' tensors
        raise ModelMismatchError(
            "base: expected a plain base model, found a delta applied (qdelta.unapply it first)"
        )
    _check_pair(base_mod, ft_mod)
    ids, mask = prepare_calibration(calib, tokenizer, seq_len=seq_len, min_sequences=batch_size)
    _check_vocab(ids, base_mod)
    _check_positions(ids, base_mod)
    student, teacher = _Runner(base_mod), _Runner(ft_mod)
    modes = {m: m.training for m in (base_mod, ft_mod)}
    grads = {p: p.requires_grad for p in base_mod.parameters()}
    apply(base_mod, delta)  # refuses a delta that does not fit before changing the model
    try:
        base_mod.eval()
        ft_mod.eval()
        for p in base_mod.parameters():
            p.requires_grad_(False)
        # Tied layers share one scales parameter (nn.apply): the optimizer takes it once.
        scales = list({id(m.scales): m.scales for m in delta_modules(base_mod).values()}.values())
        for s in scales:
            s.requires_grad_(True)

        fixed = [
            torch.arange(i, min(i + batch_size, len(ids))) for i in range(0, len(ids), batch_size)
        ]
        fixed = fixed[:eval_batches]

        @torch.no_grad()
        def evaluate() -> float:
            total = [
                output_loss(
                    student(ids[b], mask[b]),
                    teacher(ids[b], mask[b]).to(student.device),
                    mask[b].to(student.device),
                    loss,
                )
                for b in fixed
            ]
            return float(torch.stack(total).mean())

        before = evaluate()
        opt = torch.optim.AdamW(scales, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        history: list[float] = []
        running = None
        bar = tqdm(
            _batches(len(ids), batch_size, steps, seed), desc="distill scales", disable=not progress
        )
        for step, b in enumerate(bar):
            with torch.no_grad():
                target = teacher(ids[b], mask[b]).to(student.device)
            value = output_loss(student(ids[b], mask[b]), target, mask[b].to(student.device), loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            _check_step(step, steps, value, scales, loss)
            opt.step()
            sched.step()
            history.append(float(value.detach()))
            running = history[-1] if running is None else 0.9 * running + 0.1 * history[-1]
            bar.set_postfix(loss=f"{running:.4g}")
        after = evaluate()
        trained = read_scales(base_mod, delta)
    finally:
        unapply(base_mod)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.train(flag)
    rose = bool(steps) and not after <= before  # NaN after training counts as worse
    kept_initial = rose and keep_best
    if kept_initial:
        trained = delta.with_scales()
    trained.metadata["distill"] = (
        f"steps={steps},batch={batch_size},seq_len={seq_len},lr={lr},loss={loss},seed={seed}"
        + (",kept=initial" if kept_initial else "")
    )
    if rose and not keep_best:
        warnings.warn(
            f"distill: the {loss} loss rose from {before:.4g} to {after:.4g} over {steps} "
            f"steps (lr={lr}): the trained scales fit the fine-tune worse than the initial "
            "ones; try another lr or more steps, or keep the undistilled delta",
            RuntimeWarning,
            stacklevel=2,
        )
    return DistillResult(
        delta=trained,
        loss_before=before,
        loss_after=after,
        losses=history,
        kept_initial=kept_initial,
    )
