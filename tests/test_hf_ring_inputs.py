"""qdelta.ring.hf refuses misuse with clear errors, before changing the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from tests.tiny_models import VOCAB, tiny_llama

from qdelta.errors import DTypeError, ShapeError
from qdelta.ring.errors import RingError
from qdelta.ring.hf import ATTENTION_NAME, ring_forward, use_ring_attention


def _ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def _attn_impl(model) -> str:
    return model.config._attn_implementation


def test_ring_forward_equals_plain_forward_with_the_recorded_layout(one_rank):
    ids = _ids()
    with torch.no_grad():
        want = tiny_llama(3)(ids).logits
        model = use_ring_attention(tiny_llama(3), layout="zigzag", backend="math", timeout=30)
        got = ring_forward(model, ids)  # layout and group from use_ring_attention
        again = ring_forward(model, ids, layout="zigzag")
        ones = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ones, want, atol=1e-5, rtol=1e-5)  # all-ones mask: no padding


def test_ring_forward_refuses_a_model_without_ring_attention(one_rank):
    # Plain attention would attend within each rank's shard only.
    with pytest.raises(RingError, match=r"call qdelta\.ring\.hf\.use_ring_attention"):
        ring_forward(tiny_llama(), _ids())
    model = use_ring_attention(tiny_llama())
    model.config._attn_implementation = "sdpa"  # switched back by hand
    with pytest.raises(RingError, match="using attention 'sdpa'"):
        ring_forward(model, _ids())


def test_ring_forward_refuses_another_layout_than_use_ring_attention(one_rank):
    model = use_ring_attention(tiny_llama(), layout="zigzag")
    with pytest.raises(RingError, match=r"expected 'zigzag'.*found 'contiguous'"):
        ring_forward(model, _ids(), layout="contiguous")
    other = dist.new_group([0])
    with pytest.raises(RingError, match="process group given to use_ring_attention"):
        ring_forward(model, _ids(), group=other)


def test_padding_mask_is_refused(one_rank):
    model = use_ring_attention(tiny_llama())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(RingError, match=r"padding masks are not supported.*segment_ids"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    # A prepared 4-D mask reaches the attention function itself.
    mask4 = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask4[0, :, :, :2] = False
    with pytest.raises(RingError, match="padding masks are not supported"):
        model(input_ids=ids, attention_mask=mask4, use_cache=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"layout": "bogus"},
            RingError,
            r"expected one of \('contiguous', 'zigzag'\), found 'bogus'",
        ),
        ({"backend": "nope"}, RingError, r"backend: expected one of \(.*'sdpa'.*\), found 'nope'"),
        ({"timeout": "x"}, DTypeError, r"timeout: expected None or a number of seconds, found str"),
        ({"timeout": True}, DTypeError, "found bool"),
        ({"timeout": 0}, RingError, r"finite number of seconds > 0 and <= 1e\+09 .*found 0"),
        ({"timeout": 1e14}, RingError, r"<= 1e\+09 .*found 100000000000000\.0"),
        ({"timeout": float("nan")}, RingError, "found nan"),
        ({"timeout": -1.5}, RingError, "found -1.5"),
        ({"group": "world"}, RingError, "group: expected None or a torch.distributed ProcessGroup"),
    ],
)
def test_use_ring_attention_checks_arguments_before_changing_the_model(kwargs, error, match):
    model = tiny_llama()
    before = _attn_impl(model)
    with pytest.raises(error, match=match):
        use_ring_attention(model, **kwargs)
    assert _attn_impl(model) == before != ATTENTION_NAME
    assert not any(hasattr(m, "_qdelta_ring") for m in model.modules())
    model(_ids())  # still runs


def test_use_ring_attention_refuses_a_non_module():
    with pytest.raises(DTypeError, match=r"expected a torch\.nn\.Module, found dict"):
        use_ring_attention({"weights": 1})


def test_ring_forward_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    model = use_ring_attention(tiny_llama())
    with pytest.raises(
        RingError, match=r"expected an initialized torch\.distributed process group"
    ):
        ring_forward(model, _ids())


def test_ring_forward_checks_its_inputs(one_rank):
    model = use_ring_attention(tiny_llama())
    with pytest.raises(ShapeError, match=r"expected \[batch, seq\], found shape \[9\]"):
        ring_forward(model, _ids()[0])
    with pytest.raises(DTypeError, match=r"expected integer token ids, found torch\.float32"):
        ring_forward(model, _ids().float())
    with pytest.raises(DTypeError, match="found list"):
        ring_forward(model, [[1, 2, 3]])
    with pytest.raises(DTypeError, match=r"expected a torch\.nn\.Module, found str"):
        ring_forward("model-dir", _ids())


def test_ring_forward_packs_sequences_by_segment_ids(one_rank):
    """Two sequences packed in one row give each its own logits (segments attend
    only to themselves, positions restart), and the segment ids are checked."""
    from qdelta.ring.hf import segment_positions

    model = tiny_llama(4)
    ids = _ids(1, 11)
    with torch.no_grad():
        first, second = model(ids[:, :4]).logits, model(ids[:, 4:]).logits
        ring = use_ring_attention(model, backend="math", timeout=30)
        seg = torch.tensor([5] * 4 + [2] * 7)
        packed = ring_forward(ring, ids, segment_ids=seg)
        again = ring_forward(ring, ids, segment_ids=seg[None].int())
    torch.testing.assert_close(packed[:, :4], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 4:], second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, packed)
    assert segment_positions(seg[None]).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]
    with pytest.raises(ShapeError, match=r"expected shape \[1, 11\] or \[11\]"):
        ring_forward(ring, ids, segment_ids=seg[:5])
    with pytest.raises(DTypeError, match=r"expected integer ids, found torch\.float32"):
        ring_forward(ring, ids, segment_ids=seg.float())
    with pytest.raises(DTypeError, match="found list"):
        ring_forward(ring, ids, segment_ids=seg.tolist())
    with pytest.raises(ShapeError, match="one run of equal ids"):
        ring_forward(ring, ids, segment_ids=torch.tensor([0] * 3 + [1] * 4 + [0] * 4))


def test_packed_sequences_keep_their_segments_under_gradient_checkpointing(one_rank):
    """The recompute in backward runs after ring_forward returned: the segment ids
    travel with the model's forward kwargs, so the gradients are those of each
    sequence run alone."""
    import copy

    base = tiny_llama(2).train()  # (no dropout in the tiny config)
    ids = _ids(1, 20)
    cuts = ((0, 8), (8, 20))
    ref = copy.deepcopy(base)
    sum(ref(input_ids=ids[:, a:b]).logits.pow(2).mean() * (b - a) for a, b in cuts).backward()
    want = ref.model.layers[0].self_attn.q_proj.weight.grad
    model = use_ring_attention(copy.deepcopy(base), backend="math", timeout=30)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logits = ring_forward(model, ids, segment_ids=torch.tensor([0] * 8 + [1] * 12))
    sum(logits[:, a:b].pow(2).mean() * (b - a) for a, b in cuts).backward()
    got = model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


class _DropsKwargs(torch.nn.Module):
    """A wrapper whose forward does not hand its extra keywords on to the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, use_cache=None, **ignored):
        return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)


def test_segment_ids_a_model_does_not_pass_on_are_an_error(one_rank):
    model = _DropsKwargs(use_ring_attention(tiny_llama(), timeout=30))
    with torch.no_grad():
        ring_forward(model, _ids(1, 6))  # no segments: nothing to lose
        with pytest.raises(RingError, match="did not receive them"):
            ring_forward(model, _ids(1, 6), segment_ids=torch.tensor([0, 0, 0, 1, 1, 1]))


def test_a_per_call_is_causal_wins_over_the_module_attribute(one_rank):
    """CLIP's text encoder: is_causal False on the module, True on every call."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        use_ring_attention(model, backend="math", timeout=30)
        got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_a_sequence_too_short_for_every_rank_is_refused_on_every_rank(layout):
    from qdelta.ring.hf import _check_every_rank_has_tokens

    _check_every_rank_has_tokens(3, 3, layout)  # one token each
    with pytest.raises(
        ShapeError, match=rf"at least 3 tokens for 3 ranks in the {layout}.*found 2"
    ):
        _check_every_rank_has_tokens(2, 3, layout)


def test_a_mask_that_is_exactly_causal_makes_the_call_causal():
    """transformers 4.x's CLIP text encoder passes is_causal=False beside an
    additive causal mask: the mask decides."""
    from qdelta.ring.hf import _check_mask

    q = 5
    additive = torch.full((q, q), float("-inf")).triu(1)[None, None].expand(2, 1, q, q)
    assert _check_mask(additive, q, False) is True
    assert _check_mask(additive == 0, q, False) is True  # the boolean form
    assert _check_mask(torch.zeros(2, 1, q, q), q, False) is False  # nothing hidden
    assert _check_mask(None, q, True) is True
    padded = additive.clone()
    padded[1, :, :, 0] = float("-inf")
    with pytest.raises(RingError, match="mask that hides some keys"):
        _check_mask(padded, q, True)
