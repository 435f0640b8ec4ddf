"""`qdelta demo`: an end-to-end run of what qdelta does today.

Trains a small MLP (the base), fine-tunes it on a shifted task, turns every
layer's weight delta into 1/2/3 sign bit-planes with the Rust core, and
reports storage ratio vs the fp16 fine-tune and the reconstruction error of
the weights and of the fine-tuned model's outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from qdelta.bitplane import as_torch, pack_residual, unpack_residual


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 16)
    )


def _train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
    return float(loss.detach())


def run_demo(out_dir: str | Path = "results", seed: int = 0, width: int = 512) -> dict:
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = torch.randn(2048, 64)
    task_a = torch.sin(inputs @ torch.randn(64, 16))
    task_b = task_a + 0.5 * torch.tanh(inputs @ torch.randn(64, 16))

    base = _mlp(width)
    print(f"training base MLP (width {width}) ...", flush=True)
    _train(base, inputs, task_a, 300)
    finetuned = _mlp(width)
    finetuned.load_state_dict(base.state_dict())
    print("fine-tuning on a shifted task ...", flush=True)
    _train(finetuned, inputs, task_b, 200)

    layers = [name for name, m in base.named_modules() if isinstance(m, nn.Linear)]
    ft_out = finetuned(inputs).detach()
    rows = []
    for bits in (1, 2, 3):
        approx = _mlp(width)
        approx.load_state_dict(base.state_dict())
        packed_bytes = dense_bytes = 0
        weight_err = []
        t0 = time.perf_counter()
        for name in layers:
            w_base = base.get_submodule(name).weight.detach()
            w_ft = finetuned.get_submodule(name).weight.detach()
            delta = (w_ft - w_base).contiguous()
            planes, scales = pack_residual(delta, bits=bits, scale="matrix")
            recon = as_torch(unpack_residual(planes, scales, tuple(delta.shape)))
            approx.get_submodule(name).weight.data = w_base + recon
            packed_bytes += planes.nbytes + scales.nbytes
            dense_bytes += delta.numel() * 2  # the fp16 fine-tune's weights
            weight_err.append(float((recon - delta).norm() / delta.norm()))
        seconds = time.perf_counter() - t0
        out_err = float((approx(inputs).detach() - ft_out).norm() / ft_out.norm())
        rows.append(
            {
                "bits": bits,
                "packed_bytes": packed_bytes,
                "fp16_bytes": dense_bytes,
                "ratio_vs_fp16": dense_bytes / packed_bytes,
                "delta_rel_error_mean": sum(weight_err) / len(weight_err),
                "output_rel_error": out_err,
                "pack_unpack_seconds": seconds,
            }
        )
    print(f"\n{'bits':>4} {'delta bytes':>12} {'vs fp16':>8} {'delta err':>10} {'output err':>11}")
    for r in rows:
        print(
            f"{r['bits']:>4} {r['packed_bytes']:>12,} {r['ratio_vs_fp16']:>7.1f}x "
            f"{r['delta_rel_error_mean']:>10.3f} {r['output_rel_error']:>11.4f}"
        )
    result = {"layers": layers, "rows": rows}
    path = out / "demo.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nresults written to {path.resolve()}")
    return result
