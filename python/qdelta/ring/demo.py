"""``qdelta ring-demo``: a Llama model's forward over a ring of CPU processes
equals its single-process forward.

The model is written once with save_pretrained (a small random Llama built
offline with a fixed seed, a small random Mistral with a sliding window, or any
local Llama-style checkpoint directory), every
rank loads it, runs its shard of a long random input through ring attention,
and the parent compares the reassembled logits with one ordinary forward.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from qdelta.errors import FileError
from qdelta.optional import require
from qdelta.ring.errors import RingError
from qdelta.ring.launch import spawn_ring
from qdelta.ring.layout import unshard


def tiny_llama(seed: int = 0, max_positions: int = 8192, sliding_window: int | None = None):
    """A small random LlamaForCausalLM (GQA, RoPE), built offline and deterministic;
    with ``sliding_window`` the same shape as a MistralForCausalLM with that window."""
    import transformers

    name = "Llama" if sliding_window is None else "Mistral"
    extra = {} if sliding_window is None else {"sliding_window": sliding_window}
    config = getattr(transformers, f"{name}Config")(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    # A local directory only: a name like "nope" must not become a hub download.
    if not (Path(model_dir) / "config.json").is_file():
        raise FileError(
            f"--model {model_dir}: expected a local model directory with config.json, found "
            + ("no config.json in it" if Path(model_dir).is_dir() else "no such directory")
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as e:  # bad config, missing / unreadable weights
        raise FileError(
            f"--model {model_dir}: expected a loadable causal LM checkpoint, found: "
            f"{' '.join(str(e).split())}"
        ) from e
    return model.eval()


def _rank_logits(rank, world_size, model_dir, input_ids, layout):
    from qdelta.ring.hf import ring_forward, use_ring_attention

    model = use_ring_attention(_load(model_dir), layout=layout, backend="sdpa", timeout=120)
    start = time.perf_counter()
    with torch.no_grad():
        logits = ring_forward(model, input_ids, layout=layout)
    return logits, time.perf_counter() - start


def run_ring_demo(
    *,
    world_size: int = 2,
    seq_len: int = 1024,
    layout: str = "zigzag",
    seed: int = 0,
    model_dir: str | None = None,
    input_ids: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    timeout: float = 300.0,
    sliding_window: int | None = None,
) -> dict:
    """Run the demo; return ``{"max_abs_error", "ok", ...}`` and print a summary.
    ``input_ids`` (``[1, S]``, e.g. tokenized text) replaces the random input of
    ``seq_len`` tokens. ``sliding_window``: the random model is a Mistral with
    that window (not with ``model_dir``)."""
    require("transformers", "the ring demo")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
    ):
        raise RingError(f"expected sliding_window as an int, found {sliding_window!r}")
    if sliding_window is not None and (sliding_window < 1 or model_dir is not None):
        raise RingError(
            "expected a sliding window >= 1 for the random model (not with a model "
            f"directory), found {sliding_window}"
            + ("" if model_dir is None else f" with model directory {model_dir}")
        )
    length = seq_len if input_ids is None else int(input_ids.shape[-1])
    chunks = max(world_size, 1) * (2 if layout == "zigzag" else 1)
    if world_size < 1 or length < chunks:  # checked before any model is built or loaded
        raise RingError(
            f"expected world size >= 1 and at least {chunks} tokens (one per "
            f"{layout} chunk), found world size {world_size} and {length} tokens"
        )
    with tempfile.TemporaryDirectory(prefix="qdelta-ring-demo-") as tmp:
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            model = tiny_llama(seed, max(8192, seq_len), sliding_window)
            model.save_pretrained(model_dir)
        model = _load(model_dir)
        if input_ids is None:
            gen = torch.Generator().manual_seed(seed)
            input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
        seq_len = input_ids.shape[-1]
        start = time.perf_counter()
        with torch.no_grad():
            ref = model(input_ids=input_ids, use_cache=False).logits
        single_s = time.perf_counter() - start
        results = spawn_ring(
            _rank_logits, world_size, (model_dir, input_ids, layout), timeout=timeout, threads=1
        )
    logits = unshard([r[0] for r in results], layout=layout)
    err = (logits - ref).abs().max().item()
    summary = {
        "world_size": world_size,
        "seq_len": seq_len,
        "layout": layout,
        "sliding_window": sliding_window,
        "max_abs_error": err,
        "max_abs_logit": ref.abs().max().item(),
        "single_process_s": single_s,
        "ring_rank_s": [r[1] for r in results],
        "ok": err <= tolerance,
    }
    window = "" if sliding_window is None else f", sliding window {sliding_window}"
    print(
        f"ring-demo: {seq_len} tokens over {world_size} gloo ranks ({layout}{window}): "
        f"max |logits_ring - logits_single| = {err:.3e} (logits up to {summary['max_abs_logit']:.2f}; "
        f"tolerance {tolerance:g}) -> {'OK' if summary['ok'] else 'MISMATCH'}"
    )
    return summary
