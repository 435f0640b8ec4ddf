"""The DoRA paper's weight-decomposition view over one fine-tuning run.

Fine-tunes the zoo's base on one domain (full fine-tune with the zoo's
training loop: AdamW, warm-up and cosine schedule), saves a checkpoint at each of ``--at`` steps, then runs
``qdelta analyze BASE CKPT1 CKPT2 ... --steps``: per layer the relative delta
norm, the k-plane errors and (dM, dD) at every checkpoint, a trajectory per
layer in the PNG (one panel per layer type: q_proj, v_proj, ...).

Run: ``PYTHONPATH=python python benches/analyze_checkpoints.py [--tiny]
[--out DIR]``. Writes DIR/analyze_checkpoints.{json,png} (the table on
stdout) and the checkpoints under DIR/checkpoints/. Uses the zoo from its
cache (``~/.cache/qdelta/zoo``; built first if absent: minutes for the
default sizes on 2 cores, seconds for ``--tiny``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from qdelta.analysis import main as analyze_main
from qdelta.zoo import ZooConfig, _domain_stream, build_zoo, train_lm


def fine_tune_checkpoints(
    base: torch.nn.Module,
    streams: list[torch.Tensor],
    at: list[int],
    *,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    out: Path,
) -> list[Path]:
    """The zoo's fine-tuning loop (``train_lm``); a saved model directory at each step in ``at``."""
    saved: list[Path] = []

    def checkpoint(step: int, model: torch.nn.Module) -> None:
        if step in at:
            directory = out / f"step-{step:04d}"
            model.save_pretrained(directory)
            saved.append(directory)

    train_lm(
        copy.deepcopy(base),
        streams,
        steps=max(at),
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        desc="fine-tune",
        on_step=checkpoint,
    )
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny zoo (CI sizes)")
    parser.add_argument("--cache", default=None, help="zoo cache directory")
    parser.add_argument("--domain", default="code", help="fine-tuning text (code)")
    parser.add_argument("--at", default="10,25,50,100", help="checkpoint steps (10,25,50,100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benches/results", help="output directory")
    args = parser.parse_args(argv)
    at = sorted({int(s) for s in args.at.split(",")})
    config = ZooConfig.tiny() if args.tiny else ZooConfig.default()
    zoo = build_zoo(config, args.cache, progress=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    streams = [_domain_stream(zoo.train_texts[args.domain], zoo.tokenizer)]
    start = time.perf_counter()
    ckpts = fine_tune_checkpoints(
        zoo.load("base"),
        streams,
        at,
        lr=args.lr,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=args.seed,
        out=out / "checkpoints",
    )
    print(f"fine-tuned {max(at)} steps in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    stem = out / "analyze_checkpoints"
    return analyze_main(
        [
            str(zoo.base_dir),
            *map(str, ckpts),
            "--steps",
            "--json",
            f"{stem}.json",
            "--plot",
            f"{stem}.png",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
