"""Bad input to compress / apply / merge: a QDeltaError naming the layer and what was expected."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.tiny_models import fake_finetune, tiny_gpt2, tiny_llama

import qdelta


@pytest.fixture(scope="module")
def llama_pair():
    base = tiny_llama()
    return base, fake_finetune(base)


def test_different_architectures(llama_pair):
    base, _ = llama_pair
    with pytest.raises(qdelta.ModelMismatchError, match="same architecture"):
        qdelta.compress(base, tiny_gpt2())


def test_different_shapes_name_the_layer(llama_pair):
    base, _ = llama_pair
    wider = tiny_llama(intermediate_size=64)
    with pytest.raises(
        qdelta.ShapeError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[56, 32\].*\[64, 32\]"
    ):
        qdelta.compress(base, wider)
    bigger_vocab = tiny_llama(vocab_size=70)
    with pytest.raises(qdelta.ShapeError, match="vocabulary sizes must match"):
        qdelta.compress(base, bigger_vocab, compress_embeddings=True)
    wider_hidden = tiny_llama(hidden_size=48)
    with pytest.raises(qdelta.ShapeError, match=r"embed_tokens.*hidden sizes must match"):
        qdelta.compress(base, wider_hidden, compress_embeddings=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(llama_pair, bad):
    base, ft = llama_pair
    broken = copy.deepcopy(ft)
    with torch.no_grad():
        broken.model.layers[1].self_attn.v_proj.weight[3, 5] = bad
    with pytest.raises(
        qdelta.NonFiniteError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*\[3, 5\]"
    ):
        qdelta.compress(base, broken)
    with torch.no_grad():
        broken.model.layers[1].self_attn.v_proj.weight[3, 5] = 0.0
        broken.model.norm.weight[2] = bad
    with pytest.raises(qdelta.NonFiniteError, match=r"model\.norm\.weight.*\[2\]"):
        qdelta.compress(broken, ft)


def test_target_pattern_matching_nothing(llama_pair):
    base, ft = llama_pair
    with pytest.raises(qdelta.TargetError, match=r"'qkv_proj'.*matched none"):
        qdelta.compress(base, ft, targets=["q_proj", "qkv_proj"])
    with pytest.raises(qdelta.TargetError, match=r"exclude pattern 'attn_out'"):
        qdelta.compress(base, ft, exclude="attn_out")
    with pytest.raises(qdelta.TargetError, match="at least one layer"):
        qdelta.compress(base, ft, exclude=".*")


def test_delta_on_a_model_of_other_shapes_names_the_layer(llama_pair):
    base, ft = llama_pair
    delta = qdelta.compress(base, ft)
    wider = tiny_llama(intermediate_size=64)
    # The fingerprint check refuses it first; without it, the shape check names the layer.
    with pytest.raises(qdelta.BaseMismatchError, match=delta.base_fingerprint):
        qdelta.apply(wider, delta)
    with pytest.raises(qdelta.ShapeError, match=r"layer model\.layers\.0\.mlp\.gate_proj"):
        qdelta.apply(wider, delta, check=False)
    # A failed apply leaves the model untouched.
    assert not any(isinstance(m, qdelta.BitDeltaLinear) for m in wider.modules())
    with pytest.raises(qdelta.ShapeError, match=r"layer model\.layers\.0\.mlp\.gate_proj"):
        qdelta.merge(wider, delta, check=False)
    with pytest.raises(qdelta.ModelMismatchError, match=r"lm_head|model\.layers"):
        qdelta.apply(tiny_gpt2(), delta, check=False)


def test_delta_on_a_different_base_of_same_shapes(llama_pair):
    base, ft = llama_pair
    delta = qdelta.compress(base, ft)
    other = tiny_llama()
    with torch.no_grad():
        other.load_state_dict(base.state_dict())
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # one weight differs
    with pytest.raises(qdelta.BaseMismatchError) as err:
        qdelta.apply(other, delta)
    assert delta.base_fingerprint in str(err.value)
    assert qdelta.fingerprint(other) in str(err.value)
    assert not any(isinstance(m, qdelta.BitDeltaLinear) for m in other.modules())
    with pytest.raises(qdelta.BaseMismatchError):
        qdelta.merge(other, delta)
    qdelta.apply(base, delta)  # the right base is accepted
