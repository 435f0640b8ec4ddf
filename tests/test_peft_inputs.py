"""from_peft refuses incomplete, non-finite or mismatched adapters with clear qdelta errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.tiny_models import tiny_gpt2, tiny_llama

import qdelta
from qdelta.errors import FileError, FormatError, ModelMismatchError, NonFiniteError, ShapeError

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _adapted(base, rank=4, alpha=8, dora=False, targets=("q_proj", "v_proj")):
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_dora=dora
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_llama(0)


@pytest.fixture
def saved(base, tmp_path):
    """An adapter directory for ``base``; tests damage it."""
    _adapted(base).save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(directory, fn):
    path = directory / WEIGHTS
    state = fn(safetensors_torch.load_file(path))
    safetensors_torch.save_file(state, path)


def _edit_config(directory, **changes):
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_lora_a_or_b_is_refused(base, saved):
    assert qdelta.from_peft(base, saved).layers  # intact: loads
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(saved, lambda sd: {k: v for k, v in sd.items() if k != key})
    # PEFT would keep A's random init and only warn.
    with pytest.raises(ModelMismatchError, match=r"missing.*layers\.0\.self_attn\.q_proj\.lora_A"):
        qdelta.from_peft(base, saved)


def test_missing_lora_b_is_refused(base, saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_weights(saved, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(
        ModelMismatchError, match=r"1 missing.*layers\.1\.self_attn\.v_proj\.lora_B"
    ):
        qdelta.from_peft(base, saved)


def test_adapter_without_lora_tensors_is_refused(base, saved):
    _edit_weights(saved, lambda sd: {"something.else": torch.zeros(2)})
    with pytest.raises(ModelMismatchError, match="8 missing"):
        qdelta.from_peft(base, saved)


def test_adapter_for_more_layers_than_the_base(base, saved):
    shallow = tiny_llama(0, num_hidden_layers=1)
    with pytest.raises(ModelMismatchError, match=r"not in the model.*layers\.1\."):
        qdelta.from_peft(shallow, saved)


def test_nan_alpha_or_weights_are_refused(base, saved, tmp_path_factory):
    _edit_config(saved, lora_alpha=float("nan"))
    with pytest.raises(NonFiniteError, match="lora_alpha: expected a finite number, found nan"):
        qdelta.from_peft(base, saved)
    other = tmp_path_factory.mktemp("nan_weights")
    _adapted(base).save_pretrained(other)

    def poison(sd):
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
        return sd

    _edit_weights(other, poison)
    with pytest.raises(NonFiniteError, match=r"q_proj\.lora_B\.weight: expected finite"):
        qdelta.from_peft(base, other)
    # A PeftModel in memory with a NaN scaling: the delta is refused, not returned.
    model = _adapted(base)
    model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\.0\.self_attn\.q_proj: expected a finite"):
        qdelta.from_peft(None, model)


def test_rank_in_config_differs_from_the_weights(base, saved):
    _edit_config(saved, r=3)
    with pytest.raises(ShapeError, match=r"r=3.*size mismatch.*\[4, 32\].*\[3, 32\]"):
        qdelta.from_peft(base, saved)


def test_rank_zero_is_refused(base, saved):
    _edit_config(saved, r=0)
    with pytest.raises(FormatError, match=r"r: expected an int >= 1, found 0"):
        qdelta.from_peft(base, saved)


def test_base_of_another_shape_or_architecture(saved):
    with pytest.raises(ShapeError, match=r"size mismatch.*\[4, 32\].*\[4, 48\]"):
        qdelta.from_peft(tiny_llama(0, hidden_size=48), saved)
    with pytest.raises(ModelMismatchError, match=r"target modules.*GPT2LMHeadModel"):
        qdelta.from_peft(tiny_gpt2(0), saved)


def test_missing_or_corrupt_files(base, saved, tmp_path_factory):
    (saved / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match=rf"{WEIGHTS}: expected a readable adapter weights file"):
        qdelta.from_peft(base, saved)
    (saved / WEIGHTS).unlink()
    with pytest.raises(
        FileError, match=r"expected adapter_model\.safetensors or adapter_model\.bin"
    ):
        qdelta.from_peft(base, saved)
    other = tmp_path_factory.mktemp("bad_config")
    _adapted(base).save_pretrained(other)
    (other / CONFIG).write_text("{not json")
    with pytest.raises(FormatError, match=rf"{CONFIG}: expected a valid PEFT adapter config"):
        qdelta.from_peft(base, other)


def test_peft_model_with_a_base_model_that_is_not_its_base(base):
    model = _adapted(base)
    dense = qdelta.from_peft(base, model)  # the same weights: fine
    assert dense.base_fingerprint == qdelta.fingerprint(base)
    inner = qdelta.from_peft(model.get_base_model(), model)  # PEFT's own (wrapped) base: fine
    assert inner.base_fingerprint == dense.base_fingerprint
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        qdelta.from_peft(tiny_llama(5), model)
    with pytest.raises(ModelMismatchError, match="only in the base_model"):
        qdelta.from_peft(tiny_llama(0, num_hidden_layers=3), model)
    with pytest.raises(ShapeError, match=r"expected the base_model.s shape"):
        qdelta.from_peft(tiny_llama(0, intermediate_size=40), model)


def test_unknown_adapter_name(base):
    with pytest.raises(ModelMismatchError, match=r"adapter 'other'.*\['default'\]"):
        qdelta.from_peft(None, _adapted(base), adapter_name="other")


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"target_modules": ["embed_tokens", "q_proj"]}, r"model\.embed_tokens: .*on an embedding"),
        ({"bias": "all"}, r"expected bias='none', found bias='all'"),
        ({"bias": "lora_only"}, r"found bias='lora_only'"),
        ({"trainable_token_indices": [1, 2, 3]}, r"no trainable_token_indices, found \[1, 2, 3\]"),
    ],
    ids=["embedding", "bias all", "bias lora_only", "trainable tokens"],
)
def test_what_a_weight_delta_cannot_carry_is_refused(base, settings, match, tmp_path):
    """These adapters train values outside the LoRA factors: importing them silently
    dropped those (the delta was not the fine-tune), from a model or a directory."""
    cfg = peft.LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **settings})
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with pytest.raises(ModelMismatchError, match=match):
        qdelta.from_peft(None, model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelMismatchError, match=match):
        qdelta.from_peft(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_merged_into_its_base_is_refused(base, dora):
    """merge_adapter() leaves W + BA in the base weights: the delta would be taken
    against the merged weights (and DoRA's would be wrong)."""
    model = _adapted(base, dora=dora)
    model.merge_adapter()
    with pytest.raises(ModelMismatchError, match=r"merged into the base weights.*unmerge_adapter"):
        qdelta.from_peft(None, model)
    model.unmerge_adapter()
    assert qdelta.from_peft(None, model).layers  # unmerged: imported as usual
