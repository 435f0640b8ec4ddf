"""MultiTenantModel refuses bad input with a clear qdelta error, before changing anything."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.runtime_helpers import left_pad, make_delta, perturbed, tiny_llama
from tests.tiny_models import one_thread

import qdelta
from qdelta import MultiTenantModel

pytest.importorskip("transformers")

VOCAB = 101  # tiny_llama's


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def base():
    return tiny_llama(5)


@pytest.fixture(scope="module")
def delta(base):
    return make_delta(base, perturbed(base, 6, only=("layers.0.mlp.down_proj", "model.norm")))


@pytest.fixture
def model(base, delta):
    """A model with one registered tenant that is not loaded yet."""
    m = MultiTenantModel(copy.deepcopy(base))
    m.add_tenant("t", delta)
    return m


def _prompt():
    return left_pad([[5, 6, 7], [8, 9]])


# ---- attention_mask ---------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 1.7, float("nan"), 2.0, -1.0])
def test_float_mask_values_are_checked_before_conversion(model, value):
    ids, mask = _prompt()
    bad = mask.to(torch.float32)
    bad[1, 0] = value  # a padding position: 0.5 would silently become padding
    with pytest.raises(qdelta.ShapeError, match=r"only 0 and 1, found"):
        model(ids, ["t", None], attention_mask=bad)
    assert model.loaded_tenants == []


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.uint8, torch.float16])
def test_mask_of_exact_zeros_and_ones_in_any_real_dtype_is_accepted(model, dtype):
    ids, mask = _prompt()
    want = model(ids, ["t", None], attention_mask=mask).logits
    got = model(ids, ["t", None], attention_mask=mask.to(dtype)).logits
    torch.testing.assert_close(got, want)


def test_mask_must_be_a_tensor_of_real_dtype(model):
    ids, mask = _prompt()
    with pytest.raises(qdelta.DTypeError, match=r"expected a torch\.Tensor, found list"):
        model(ids, ["t", None], attention_mask=mask.tolist())
    with pytest.raises(qdelta.DTypeError, match="complex64"):
        model(ids, ["t", None], attention_mask=mask.to(torch.complex64))
    assert model.loaded_tenants == []


# ---- empty batch ------------------------------------------------------------


def test_empty_batch_is_a_clear_error(model):
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(qdelta.ShapeError, match="at least one sequence, found batch 0"):
        model(empty, [])
    with pytest.raises(qdelta.ShapeError, match="at least one sequence, found batch 0"):
        model.generate(empty, [], 3)


# ---- generate() arguments ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eos_token_id=1.5), qdelta.DTypeError, "eos_token_id: expected an int"),
        (dict(eos_token_id="x"), qdelta.DTypeError, "eos_token_id.*found str"),
        (dict(eos_token_id=True), qdelta.DTypeError, "eos_token_id.*found bool"),
        (dict(eos_token_id=-5), qdelta.ShapeError, r"eos_token_id.*\[0, 101\).*-5"),
        (dict(eos_token_id=VOCAB), qdelta.ShapeError, r"eos_token_id.*\[0, 101\).*101"),
        (dict(eos_token_id=200), qdelta.ShapeError, r"eos_token_id.*200"),
        (dict(temperature=float("nan")), qdelta.ShapeError, "temperature.*nan"),
        (dict(temperature=float("inf"), do_sample=True), qdelta.ShapeError, "temperature.*inf"),
        (dict(temperature=-1.0), qdelta.ShapeError, "temperature.*-1.0"),
        (dict(temperature=0.0, do_sample=True), qdelta.ShapeError, "temperature.*sampling"),
        (dict(temperature="hot"), qdelta.DTypeError, "temperature.*found str"),
        (dict(temperature=True), qdelta.DTypeError, "temperature.*found bool"),
        (dict(seed="x", do_sample=True), qdelta.DTypeError, "seed.*found str"),
        (dict(seed=1.5, do_sample=True), qdelta.DTypeError, "seed.*found float"),
        (dict(seed=2**70, do_sample=True), qdelta.ShapeError, r"seed.*2\*\*63"),
        (dict(seed=-1, do_sample=True), qdelta.ShapeError, "seed.*-1"),
        (dict(top_k=True, do_sample=True), qdelta.DTypeError, "top_k.*found bool"),
        (dict(top_k=1.5, do_sample=True), qdelta.DTypeError, "top_k.*found float"),
        (dict(top_k=0, do_sample=True), qdelta.ShapeError, "top_k.*found 0"),
        (dict(max_new_tokens="3"), qdelta.DTypeError, "max_new_tokens.*found str"),
        (dict(max_new_tokens=0), qdelta.ShapeError, "max_new_tokens.*found 0"),
    ],
)
def test_generate_arguments_are_checked_before_any_token(model, kwargs, error, match):
    ids, mask = _prompt()
    kwargs = dict(max_new_tokens=3) | kwargs
    with pytest.raises(error, match=match):
        model.generate(ids, ["t", None], attention_mask=mask, **kwargs)
    assert model.loaded_tenants == []  # raised before loading (or generating) anything


def test_generate_accepts_the_documented_edge_values(model):
    ids, mask = _prompt()
    greedy = model.generate(ids, ["t", None], 3, attention_mask=mask).tokens
    # Temperature is unused by greedy decoding: 0 is fine there; so is an unused seed.
    same = model.generate(ids, ["t", None], 3, attention_mask=mask, temperature=0, seed=1)
    assert torch.equal(same.tokens, greedy)
    top1 = model.generate(
        ids,
        ["t", None],
        3,
        attention_mask=mask,
        do_sample=True,
        top_k=np.int64(1),
        seed=2**63 - 1,
        eos_token_id=np.int64(VOCAB - 1),
    )
    assert top1.tokens.dtype == torch.long
    assert top1.tokens.shape[0] == 2


# ---- budget_bytes -------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), 1.5, 1e9, True, "10", -1, [1]])
def test_budget_bytes_must_be_none_or_an_int_at_least_zero(base, model, value):
    with pytest.raises(qdelta.BudgetError, match=r"budget_bytes: expected None or an int >= 0"):
        MultiTenantModel(copy.deepcopy(base), budget_bytes=value)
    model.budget_bytes = 1000
    with pytest.raises(qdelta.BudgetError, match=r"found"):
        model.budget_bytes = value
    assert model.budget_bytes == 1000  # unchanged


def test_budget_bytes_accepts_none_zero_and_integer_likes(base):
    assert MultiTenantModel(copy.deepcopy(base), budget_bytes=None).budget_bytes is None
    m = MultiTenantModel(copy.deepcopy(base), budget_bytes=np.int64(0))
    assert m.budget_bytes == 0 and type(m.budget_bytes) is int
    m.budget_bytes = None
    assert m.budget_bytes is None


# ---- tenant deltas with bad parameter values -----------------------------------


def _served_logits(model):
    ids, mask = _prompt()
    return model(ids, ["t", None], attention_mask=mask).logits


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_params_are_refused_at_add_tenant(model, delta, value):
    before = _served_logits(model)
    bad_value = torch.ones(48)
    bad_value[7] = value
    bad = qdelta.Delta({}, {"model.norm.weight": bad_value}, delta.base_fingerprint)
    with pytest.raises(qdelta.NonFiniteError, match=r"'bad'.*model.norm.weight.*finite"):
        model.add_tenant("bad", bad)
    assert "bad" not in model.tenants
    # Replacing a loaded tenant with a bad delta keeps the old one serving.
    with pytest.raises(qdelta.NonFiniteError, match=r"model\.norm\.weight"):
        model.add_tenant("t", bad)
    assert model.loaded_tenants == ["t"]
    torch.testing.assert_close(_served_logits(model), before)


def test_complex_or_non_tensor_params_are_refused(model, delta):
    fp = delta.base_fingerprint
    complex_value = torch.ones(48, dtype=torch.complex64)
    with pytest.raises(
        qdelta.DTypeError,
        match=r"model.norm.weight.*base.s kind .torch.float32., found torch.complex64",
    ):
        model.add_tenant("c", qdelta.Delta({}, {"model.norm.weight": complex_value}, fp))
    with pytest.raises(qdelta.DTypeError, match=r"model.norm.weight.*found list"):
        model.add_tenant("l", qdelta.Delta({}, {"model.norm.weight": [1.0] * 48}, fp))
    assert model.tenants == ["t"]


def test_params_overflowing_a_half_precision_base_are_refused(base):
    half = copy.deepcopy(base).to(torch.float16)
    fp = qdelta.fingerprint(half.state_dict())
    big = torch.full((48,), 1e6)  # finite in float32, inf in float16
    model = MultiTenantModel(half)
    with pytest.raises(qdelta.NonFiniteError, match=r"model.norm.weight.*float16"):
        model.add_tenant("big", qdelta.Delta({}, {"model.norm.weight": big}, fp))
    assert model.tenants == []


def test_non_finite_packed_scales_are_refused(model, delta):
    name, layer = next(iter(delta.layers.items()))
    bad_layer = qdelta.PackedLayer(layer.planes, layer.scales.copy(), layer.shape)
    bad_layer.scales.flat[0] = np.nan  # changed after the layer was built and checked
    bad = qdelta.Delta({name: bad_layer}, {}, delta.base_fingerprint)
    with pytest.raises(qdelta.NonFiniteError, match=rf"'bad'.*{name}.*scales"):
        model.add_tenant("bad", bad)
    assert model.tenants == ["t"]


def test_a_store_tenant_name_the_store_cannot_hold_says_why(base, delta, tmp_path):
    store = qdelta.DeltaStore(tmp_path)
    store.add("fine", delta)
    (tmp_path / "with space.qdelta").write_bytes((tmp_path / "fine.qdelta").read_bytes())
    served = qdelta.MultiTenantModel(copy.deepcopy(base), store)
    with pytest.raises(qdelta.TenantNameError, match="found 'with space'"):
        served.add_tenant("with space")
    assert served.tenants == ["fine"]


def test_the_prefill_asks_for_last_logits_only_where_the_forward_takes_it():
    """A forward that refuses unknown keywords (Bloom on transformers 4.x) is not
    given ``logits_to_keep``."""
    from qdelta.runtime import _last_logits_only

    class Takes(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0, **kwargs): ...

    class Strict(torch.nn.Module):
        def forward(self, input_ids, use_cache=None, **deprecated_arguments): ...

    assert _last_logits_only(Takes()) == {"logits_to_keep": 1}
    assert _last_logits_only(Strict()) == {}


def test_a_learned_position_table_is_checked_after_a_tenant_wraps_it():
    """A tenant changing GPT-2's wpe wraps the table in a tenant module; decoding past
    its positions is still refused up front, for tenant and base rows alike."""
    from tests.tiny_models import fake_finetune, tiny_gpt2

    base = tiny_gpt2(0)
    limit = base.config.n_positions
    delta = qdelta.compress(base, fake_finetune(base, 1))
    assert "transformer.wpe.weight" in delta.params
    m = MultiTenantModel(copy.deepcopy(base), tenants={"ft": delta})
    assert not isinstance(m.model.transformer.wpe, torch.nn.Embedding)  # wrapped
    prompt = torch.randint(1, 60, (1, limit - 4))
    for row in ("ft", None):
        with pytest.raises(qdelta.ShapeError, match=f"expected at most 5 .* {limit} positions"):
            m.generate(prompt, [row], 10)
    assert m.generate(prompt, ["ft"], 5).tokens.shape == (1, 5)


def test_tenant_ids_as_a_numpy_array(model):
    """A numpy array of ids or names is taken entry by entry like a list (it was
    refused as 'not a sequence'); a 2-D one is a ShapeError."""
    ids, mask = _prompt()
    tid = model.tenant_id("t")
    with torch.no_grad():
        want = model(ids, ["t", None], attention_mask=mask).logits
        for rows in (np.array([tid, -1]), np.array(["t", None], dtype=object)):
            got = model(ids, rows, attention_mask=mask).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(qdelta.ShapeError, match=r"expected a 1-D array of 2, found shape \[1, 2\]"):
        model(ids, np.array([[tid, -1]]), attention_mask=mask)
