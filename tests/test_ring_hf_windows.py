"""Hugging Face models with sliding-window layers (Mistral, Qwen2's mixed layers,
Gemma3) and soft-capped logits (Gemma2) run as ring attention over 3 gloo ranks:
their logits equal the model's own eager forward, in both layouts.

At 3 ranks and 37 tokens the windows (4-8 tokens) end the ring's turn after
two of its three steps. A soft-cap of 0.5 sits well inside the scores' range,
so capping changes the logits (both checked below).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qdelta.ring import unshard  # noqa: E402
from qdelta.ring.launch import spawn_ring  # noqa: E402
from test_hf_architectures import COMMON, VOCAB  # noqa: E402  (the tiny configs' sizes)

SEQ = 37
MODELS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=8, sliding_window=5, attn_logit_softcapping=0.5),
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, sliding_window=4)),
}
AVAILABLE = {n: m for n, m in MODELS.items() if hasattr(transformers, m[1])}


def _save_models(root) -> dict[str, str]:
    dirs = {}
    for i, (name, (cfg_name, cls_name, kw)) in enumerate(AVAILABLE.items()):
        cfg = getattr(transformers, cfg_name)(**COMMON, tie_word_embeddings=False, **kw)
        torch.manual_seed(i)
        model = getattr(transformers, cls_name)(cfg).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() == 1:  # norm weights away from their init, so they matter
                    p.add_(0.1 * torch.randn(p.shape))
                if pname.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(8.0)  # scores of a few units: the soft-cap and windows bite
        path = root / name
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _load(path: str, attn: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn, local_files_only=True
    ).eval()


# Packed rows: three sequences of 13, 16 and 8 tokens in one row of SEQ, the
# second row the other way round (Large World Model's masked packing).
LENGTHS = ((13, 16, 8), (8, 16, 13))


def _segments(lengths) -> torch.Tensor:
    return torch.stack(
        [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]
    )


def rank_logits(rank, world_size, dirs, ids, lengths=LENGTHS):
    """One rank's ring logits of every model in ``dirs``, both layouts, plain and
    with rows packed as ``lengths`` (what assert_ring_equals_own_forward reads)."""
    from qdelta.ring.hf import ring_forward, use_ring_attention

    out = {}
    for name, path in dirs.items():
        for layout in ("contiguous", "zigzag"):
            model = use_ring_attention(_load(path, "eager"), layout=layout, timeout=60)
            with torch.no_grad():
                out[(name, layout)] = ring_forward(model, ids)
                segments = _segments(lengths)
                out[(name, layout, "packed")] = ring_forward(model, ids, segment_ids=segments)
    return out


@pytest.mark.timeout(400)
def test_windowed_and_softcapped_models_over_a_ring_equal_their_own_forward(tmp_path):
    assert AVAILABLE, "transformers has none of the windowed architectures"
    dirs = _save_models(tmp_path)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    per_rank = spawn_ring(rank_logits, 3, (dirs, ids), timeout=360, pg_timeout=60, threads=1)
    for name, path in dirs.items():
        model = _load(path, "eager")
        want = assert_ring_equals_own_forward(model, name, per_rank, ids, LENGTHS)
        # The settings matter at this length: the model differs without them.
        if getattr(model.config, "attn_logit_softcapping", None) is not None:
            assert (_logits_without(model, ids, "softcap") - want).abs().max() > 1e-3, name
        assert (_logits_without(model, ids, "window") - want).abs().max() > 1e-3, name


def assert_ring_equals_own_forward(model, name, per_rank, ids, lengths) -> torch.Tensor:
    """Each layout's unsharded ring logits (``per_rank[r][(name, layout)]``) equal the
    model's own forward, and the packed run's (``(name, layout, "packed")``, rows
    packed as ``lengths``) equal each sequence's forward alone. Returns the logits."""
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    for layout in ("contiguous", "zigzag"):
        got = unshard([r[(name, layout)] for r in per_rank], layout=layout)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"{name} {layout}")
        packed = unshard([r[(name, layout, "packed")] for r in per_rank], layout=layout)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                with torch.no_grad():
                    alone = model(input_ids=ids[row : row + 1, start : start + n]).logits
                torch.testing.assert_close(
                    packed[row : row + 1, start : start + n], alone, atol=2e-5, rtol=2e-5,
                    msg=f"{name} {layout} packed row {row} at {start}",
                )  # fmt: skip
                start += n
    return want


def _logits_without(model, ids, setting: str):
    """The model's logits with its windows widened past the sequence, or uncapped."""
    model = copy.deepcopy(model)
    for m in [model.config, *model.modules()]:
        if setting == "window" and getattr(m, "sliding_window", None) is not None:
            m.sliding_window = 4 * SEQ
        if setting == "softcap" and getattr(m, "attn_logit_softcapping", None) is not None:
            m.attn_logit_softcapping = None
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
