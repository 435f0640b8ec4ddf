"""Delta algebra: soups and task arithmetic against float64 hand computations."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from tests.tiny_models import fake_finetune, tiny_gpt2, tiny_llama

import qdelta
from qdelta.algebra import DenseDelta, as_dense


@pytest.fixture(scope="module")
def family():
    base = tiny_llama(seed=int(torch.randint(1000, (1,))))
    fts = [fake_finetune(base, seed=s, rel=0.05) for s in (11, 12, 13)]
    return base, fts


def _sd64(model):
    return {k: v.double() for k, v in model.state_dict().items()}


def _check_weights(base, result: DenseDelta, want: dict[str, torch.Tensor], atol=2e-6):
    """base + result's deltas / params == want (float64), for every tensor."""
    base_sd = _sd64(base)
    for name, d in result.layers.items():
        got = base_sd[f"{name}.weight"] + d.double()
        torch.testing.assert_close(got, want[f"{name}.weight"], atol=atol, rtol=0)
    covered = {f"{n}.weight" for n in result.layers}
    for key, ref in want.items():
        if key in covered:
            continue
        got = result.params[key].double() if key in result.params else base_sd[key]
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_uniform_soup_equals_hand_average(family):
    base, fts = family
    deltas = [qdelta.dense_delta(base, ft, tenant=f"t{i}") for i, ft in enumerate(fts)]
    sds = [_sd64(ft) for ft in fts]
    want = {k: sum(sd[k] for sd in sds) / 3 for k in sds[0]}
    result = qdelta.soup(deltas)
    assert isinstance(result, DenseDelta)
    assert result.metadata["source"] == "soup"
    assert result.metadata["ingredients"] == "t0,t1,t2"
    _check_weights(base, result, want)


def test_weighted_soup_and_combine_equal_hand_sums(family):
    base, fts = family
    d = [qdelta.dense_delta(base, ft) for ft in fts]
    b, sds = _sd64(base), [_sd64(ft) for ft in fts]
    weights = [0.5, 0.3, 0.2]
    want = {k: sum(w * sd[k] for w, sd in zip(weights, sds, strict=True)) for k in b}
    _check_weights(base, qdelta.soup(d, weights=[5, 3, 2]), want)
    # Task arithmetic: base + 1.0 * t0 - 0.7 * t1 (+ params, so the base is needed).
    want = {k: b[k] + (sds[0][k] - b[k]) - 0.7 * (sds[1][k] - b[k]) for k in b}
    with pytest.raises(qdelta.AlgebraError, match="expected base="):
        qdelta.combine({d[0]: 1.0, d[1]: -0.7})
    _check_weights(base, qdelta.combine({d[0]: 1.0, d[1]: -0.7}, base=base), want)
    # Operators are combine() too (layers only: params kept whole would need the base).
    layers_only = DenseDelta(d[2].layers, {}, d[2].base_fingerprint)
    neg, twice = -layers_only, layers_only * 2.0 - layers_only + layers_only
    for name in d[2].layers:
        torch.testing.assert_close(neg.layers[name], -d[2].layers[name], atol=0, rtol=0)
        torch.testing.assert_close(twice.layers[name], 2 * d[2].layers[name], atol=1e-7, rtol=0)


def test_soup_of_compressed_recompresses_the_average(family, tmp_path):
    base, fts = family
    packed = [qdelta.compress(base, ft, bits=2, tenant=f"c{i}") for i, ft in enumerate(fts[:2])]
    result = qdelta.soup(packed)
    assert isinstance(result, qdelta.Delta)
    assert result.metadata["source"] == "soup"
    for name, layer in result.layers.items():
        assert layer.bits == 2
        avg = (
            packed[0].layers[name].dense().astype(np.float64) + packed[1].layers[name].dense()
        ) / 2
        planes, scales = qdelta.pack_residual(avg.astype(np.float32), bits=2)
        np.testing.assert_array_equal(layer.planes, planes)
        np.testing.assert_allclose(layer.scales, scales, rtol=1e-6)
    one_bit = qdelta.soup(packed, bits=1)
    assert {layer.bits for layer in one_bit.layers.values()} == {1}
    # A normal tenant: store, load, merge like any other.
    store = qdelta.DeltaStore(tmp_path)
    store.add("soup", result)
    back = qdelta.load(tmp_path / "soup.qdelta")
    assert back.metadata["source"] == "soup" and back.tenant == "soup"
    dense_back = as_dense(back)
    for name, layer in result.layers.items():
        np.testing.assert_array_equal(dense_back.layers[name].numpy(), layer.dense())
    qdelta.check_base(back, base)


def test_combine_mapping_of_compressed_deltas_equals_hand_sum(family):
    base, fts = family
    p1, p2 = (qdelta.compress(base, ft, bits=2, tenant=f"p{i}") for i, ft in enumerate(fts[:2]))
    assert hash(p1) != hash(p2) and len({p1: 1, p2: 2}) == 2  # identity keys
    b = _sd64(base)
    got = qdelta.combine({p1: 0.5, p2: -1.0}, base=base, dense=True)
    assert isinstance(got, DenseDelta) and got.metadata["weights"] == "0.5,-1"
    assert got.layers.keys() == p1.layers.keys()
    for name in p1.layers:
        # Independently: each plane times its scale, summed in float64.
        want = np.zeros(p1.layers[name].shape)
        for w, layer in ((0.5, p1.layers[name]), (-1.0, p2.layers[name])):
            for k in range(layer.bits):
                bits = np.unpackbits(layer.planes[k].view(np.uint8), axis=1, bitorder="little")
                signs = np.where(bits[:, : layer.shape[1]] == 1, -1.0, 1.0)
                scale = layer.scales[k].astype(np.float64)
                want += w * (scale if scale.ndim == 0 else scale[:, None]) * signs
        np.testing.assert_allclose(got.layers[name].double().numpy(), want, atol=1e-6, rtol=0)
    assert got.params.keys() == p1.params.keys() and got.params
    for key, v in got.params.items():
        want = (
            b[key] + 0.5 * (p1.params[key].double() - b[key]) - (p2.params[key].double() - b[key])
        )
        torch.testing.assert_close(v.double(), want, atol=1e-6, rtol=0)
    # The default output recompresses that sum to the inputs' 2 planes; keys may mix forms.
    packed = qdelta.combine({p1: 0.5, as_dense(p2): -1.0}, base=base)
    assert isinstance(packed, qdelta.Delta)
    for name, layer in packed.layers.items():
        planes, scales = qdelta.pack_residual(got.layers[name], bits=2)
        np.testing.assert_array_equal(layer.planes, planes)
        np.testing.assert_array_equal(layer.scales, scales)
    # A delta of another base is refused, in mapping form too.
    other = tiny_llama(seed=99)
    stranger = qdelta.compress(other, fake_finetune(other, seed=6), tenant="stranger")
    with pytest.raises(qdelta.BaseMismatchError, match="'p0' and 'stranger'"):
        qdelta.combine({p1: 0.5, stranger: -1.0}, base=base)


def test_dense_compress_roundtrip_through_file(family, tmp_path):
    base, fts = family
    dense = qdelta.dense_delta(base, fts[0])
    packed = dense.compress(bits=3, scale="row", tenant="x")
    packed.save(tmp_path / "x.qdelta")
    back = as_dense(qdelta.load(tmp_path / "x.qdelta"))
    for name, d in dense.layers.items():
        planes, scales = qdelta.pack_residual(d, bits=3, scale="row")
        want = qdelta.unpack_residual(planes, scales, tuple(d.shape))
        np.testing.assert_array_equal(back.layers[name].numpy(), want)
    assert back.metadata["source"] == "full" and back.metadata["bits"] == "3"
    qdelta.soup([dense, dense]).save(tmp_path / "s.qdelta", bits=2)
    s = qdelta.load(tmp_path / "s.qdelta")
    assert s.metadata["source"] == "soup" and {x.bits for x in s.layers.values()} == {2}


def test_mismatched_bases_are_refused(family):
    base, fts = family
    other = tiny_llama(seed=99)
    a = qdelta.dense_delta(base, fts[0], tenant="a")
    b = qdelta.dense_delta(other, fake_finetune(other, seed=5), tenant="b")
    with pytest.raises(qdelta.BaseMismatchError) as err:
        qdelta.soup([a, b])
    assert "'a'" in str(err.value) and "'b'" in str(err.value)
    assert a.base_fingerprint in str(err.value) and b.base_fingerprint in str(err.value)
    with pytest.raises(qdelta.BaseMismatchError):
        qdelta.combine([(a, 1.0), (qdelta.compress(other, fake_finetune(other, seed=6)), -1.0)])


def test_mismatched_layers_are_refused(family):
    base, fts = family
    a = qdelta.dense_delta(base, fts[0], tenant="a")
    b = qdelta.dense_delta(base, fts[1], targets=["q_proj"], tenant="b")
    with pytest.raises(qdelta.ModelMismatchError, match="expected the same layers"):
        qdelta.combine({a: 1.0, b: 1.0})
    c = qdelta.dense_delta(base, fts[1], tenant="c")
    name = next(iter(c.layers))
    c.layers[name] = c.layers[name][:, :-1].contiguous()
    with pytest.raises(qdelta.ShapeError, match=name):
        qdelta.soup([a, c])
    with pytest.raises(qdelta.AlgebraError):
        qdelta.soup([])
    with pytest.raises(qdelta.AlgebraError):
        qdelta.soup([a, c], weights=[1.0, -1.0])


def test_conv1d_orientation_survives_soup():
    base = tiny_gpt2(seed=3)
    fts = [fake_finetune(base, seed=s) for s in (1, 2)]
    deltas = [qdelta.dense_delta(base, ft) for ft in fts]
    result = qdelta.soup(deltas)
    assert result.transposed and result.transposed == deltas[0].transposed
    b, sds = _sd64(base), [_sd64(ft) for ft in fts]
    for name in result.layers:
        want = (sds[0][f"{name}.weight"] + sds[1][f"{name}.weight"]) / 2
        got = b[f"{name}.weight"] + result.weight(name).double()
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def _indicator_deltas(n: int, fp: str = "f" * 32) -> list[DenseDelta]:
    """Ingredient i has a 1 at position i: a soup's non-zero positions name its ingredients."""
    out = []
    for i in range(n):
        m = torch.zeros(1, n)
        m[0, i] = 1.0
        out.append(DenseDelta({"l": m}, {}, fp, tenant=f"i{i}"))
    return out


def _members(d: DenseDelta) -> frozenset[int]:
    return frozenset(int(i) for i in torch.nonzero(d.layers["l"][0]).flatten())


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_greedy_soup_follows_the_paper(lower_is_better):
    # Held-out scores for every subset tried; the table is written for "lower is
    # better" and negated for the accuracy-like direction.
    table = {
        frozenset({0}): 3.0,
        frozenset({1}): 1.0,  # best alone: the soup starts with 1
        frozenset({2}): 2.0,
        frozenset({3}): 4.0,
        frozenset({1, 2}): 1.5,  # worse than 1.0: 2 is not added
        frozenset({0, 1}): 0.8,  # better: 0 is added
        frozenset({0, 1, 3}): 0.8,  # a tie: not an improvement, 3 is left out
    }
    sign = 1.0 if lower_is_better else -1.0
    calls = []

    def score(d):
        calls.append(_members(d))
        return sign * table[_members(d)]

    result = qdelta.greedy_soup(_indicator_deltas(4), score, lower_is_better=lower_is_better)
    assert result.order == [1, 2, 0, 3]
    assert result.chosen == [1, 0]
    assert [kept for _, _, kept in result.history] == [False, True, False]
    assert calls[4:] == [frozenset({1, 2}), frozenset({0, 1}), frozenset({0, 1, 3})]
    assert _members(result.soup) == {0, 1}
    torch.testing.assert_close(result.soup.layers["l"], torch.tensor([[0.5, 0.5, 0, 0]]))
    # A dense soup is what was scored: no extra call, both scores equal.
    assert result.soup_score == result.selection_score == sign * 0.8
    assert len(calls) == 7


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_greedy_soup_leaves_out_an_ingredient_that_ties(family, lower_is_better):
    # A copy of the best ingredient: the soup with it is the same weights, the
    # same score, so it is not an improvement; a real improvement is kept.
    base, fts = family
    a = qdelta.dense_delta(base, fts[0], tenant="a")
    copy_of_a = DenseDelta(dict(a.layers), dict(a.params), a.base_fingerprint, tenant="a2")
    b = qdelta.dense_delta(base, fts[1], tenant="b")
    # Nearer to a than to b, nearest to their soup: a is best alone, b helps.
    target = {n: 0.6 * a.layers[n] + 0.4 * b.layers[n] for n in a.layers}

    def score(d):
        dist = sum(float(torch.linalg.norm(d.layers[n] - target[n])) for n in target)
        return dist if lower_is_better else -dist

    result = qdelta.greedy_soup([a, copy_of_a], score, lower_is_better=lower_is_better)
    assert result.chosen == [0] and [k for _, _, k in result.history] == [False]
    assert result.history[0][1] == pytest.approx(result.individual_scores[0], rel=1e-6)
    result = qdelta.greedy_soup([a, copy_of_a, b], score, lower_is_better=lower_is_better)
    assert result.chosen == [0, 2]  # a and its copy score alike: a comes first (stable)


def test_greedy_soup_scores_the_recompressed_soup_it_returns(family):
    base, fts = family
    packed = [qdelta.compress(base, ft, bits=1, tenant=f"c{i}") for i, ft in enumerate(fts)]
    target = {n: torch.zeros(layer.shape) for n, layer in packed[0].layers.items()}
    scored = []

    def score(d):  # distance to the base: the soup of independent deltas shrinks
        scored.append(d)
        return sum(float(torch.linalg.norm(d.layers[n] - target[n])) for n in target)

    result = qdelta.greedy_soup(packed, score)
    assert len(result.chosen) > 1
    assert isinstance(result.soup, qdelta.Delta)
    assert {layer.bits for layer in result.soup.layers.values()} == {1}
    # The last call scored the returned 1-bit soup; the selection scored it dense.
    assert len(scored) == len(packed) + len(result.history) + 1
    last = scored[-1]
    for name, layer in result.soup.layers.items():
        np.testing.assert_array_equal(last.layers[name].numpy(), layer.dense())
    assert result.soup_score == score(as_dense(result.soup))
    dense_soup = qdelta.soup([packed[i] for i in result.chosen], dense=True)
    assert result.selection_score == pytest.approx(score(dense_soup), rel=1e-9)
    assert result.soup_score != result.selection_score


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_greedy_soup_refuses_a_non_finite_score(bad):
    # A NaN sorts anywhere: with [nan, 5, 0.5] it used to be picked as the best.
    scores = {frozenset({0}): bad, frozenset({1}): 5.0, frozenset({2}): 0.5}
    with pytest.raises(qdelta.AlgebraError, match=rf"ingredient 0 \('i0'\).*{bad}"):
        qdelta.greedy_soup(_indicator_deltas(3), lambda d: scores[_members(d)])
    # A soup's score too, naming the ingredient tried.
    scores[frozenset({1, 2})] = float("nan")
    scores[frozenset({0})] = 9.0
    with pytest.raises(qdelta.AlgebraError, match=r"ingredient 1 \('i1'\).*nan"):
        qdelta.greedy_soup(_indicator_deltas(3), lambda d: scores[_members(d)])
    with pytest.raises(qdelta.AlgebraError, match=r"ingredient 2 \('i2'\).*'bad'"):
        qdelta.greedy_soup(_indicator_deltas(3), lambda d: "bad" if _members(d) == {2} else 1.0)


def test_greedy_soup_takes_any_iterable():
    scores = {frozenset({0}): 2.0, frozenset({1}): 1.0, frozenset({0, 1}): 0.5}
    result = qdelta.greedy_soup((d for d in _indicator_deltas(2)), lambda d: scores[_members(d)])
    assert result.chosen == [1, 0] and result.soup_score == 0.5


def test_soup_weights_are_checked_and_normalised_safely(family):
    base, fts = family
    d = [qdelta.dense_delta(base, ft) for ft in fts[:2]]
    # 1e308 + 1e308 overflows: every weight used to become 0 (an all-zero soup).
    huge = qdelta.soup(d, weights=[1e308, 1e308])
    uniform = qdelta.soup(d)
    for name in uniform.layers:
        torch.testing.assert_close(huge.layers[name], uniform.layers[name], atol=0, rtol=0)
    for key in uniform.params:
        torch.testing.assert_close(huge.params[key], uniform.params[key], atol=0, rtol=0)
    assert huge.metadata["weights"] == "0.5,0.5"
    for weights, found in (
        ([float("inf"), 1.0], "weight 0: expected a finite number, found inf"),
        ([1.0, float("nan")], "weight 1: expected a finite number, found nan"),
        (["a", 1.0], "weight 0: expected a number, found 'a'"),
        ([None, 1.0], "weight 0: expected a number, found None"),
        ([1.0, -2.0], "weight 1: expected a non-negative number, found -2.0"),
        ([0.0, 0.0], "expected weights with a positive sum, found [0.0, 0.0]"),
        (3.0, "expected a sequence of weights, found float"),
        ("ab", "expected a sequence of weights, found str"),
    ):
        with pytest.raises(qdelta.AlgebraError, match=re.escape(found)):
            qdelta.soup(d, weights=weights)


def test_combine_names_bad_weights_shapes_and_non_finite_results():
    fp = "f" * 32
    a = DenseDelta({"l": torch.ones(1, 2)}, {"p": torch.ones(3)}, fp, tenant="a")
    b = DenseDelta({"l": torch.ones(1, 2)}, {"p": torch.ones(4)}, fp, tenant="b")
    for weight in ("abc", None):
        with pytest.raises(qdelta.AlgebraError, match="weight of input #0, found"):
            qdelta.combine([(a, weight)])
    with pytest.raises(qdelta.ShapeError, match=r"param p: expected shape \[3\].*found \[4\] in b"):
        qdelta.combine([(a, 0.5), (b, 0.5)])
    nan = DenseDelta(
        {"l": torch.tensor([[1.0, float("nan")]])}, {"p": torch.ones(3)}, fp, tenant="n"
    )
    with pytest.raises(qdelta.NonFiniteError, match=r"l: expected finite values.*from n"):
        qdelta.combine([(a, 0.5), (nan, 0.5)])
    with pytest.raises(qdelta.NonFiniteError, match=r"p: expected finite.*from n"):
        bad = DenseDelta(
            {"l": torch.ones(1, 2)}, {"p": torch.full((3,), float("inf"))}, fp, tenant="n"
        )
        qdelta.soup([a, bad], bits=1)
    huge = DenseDelta({"l": torch.full((1, 2), 3e38)}, {}, fp)
    with pytest.raises(qdelta.NonFiniteError, match="the weighted sum overflowed"):
        qdelta.combine([(huge, 1.0), (huge, 1.0)])


def test_integer_params_are_not_truncated():
    fp = "f" * 32
    layer = {"l": torch.zeros(1, 2)}
    a = DenseDelta(dict(layer), {"count": torch.tensor([1, 2])}, fp)
    b = DenseDelta(dict(layer), {"count": torch.tensor([2, 3])}, fp)
    # (1 + 2) / 2 used to be written back as 1: refused, naming the param and dtype.
    with pytest.raises(qdelta.DTypeError, match=r"param 'count'.*torch.int64.*1.5"):
        qdelta.soup([a, b])
    # An exact integer result is written as is.
    c = DenseDelta(dict(layer), {"count": torch.tensor([3, 4])}, fp)
    got = qdelta.soup([a, c]).params["count"]
    assert got.dtype == torch.int64 and got.tolist() == [2, 3]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_merge_into_validates_everything_before_writing(family):
    base, fts = family
    delta = qdelta.dense_delta(base, fts[0])
    assert delta.params  # norms: the params are written after the layers
    model = copy.deepcopy(base)
    before = _snapshot(model)
    key = next(iter(delta.params))
    bad = DenseDelta(delta.layers, {**delta.params, key: torch.zeros(3)}, delta.base_fingerprint)
    with pytest.raises(qdelta.ShapeError, match=rf"param {key!r}: expected shape \[.*found \[3\]"):
        bad.merge_into(model)
    _assert_unchanged(model, before)
    missing = DenseDelta(
        delta.layers, {**delta.params, "no.such": torch.zeros(3)}, delta.base_fingerprint
    )
    with pytest.raises(qdelta.ModelMismatchError, match=r"param 'no\.such'"):
        missing.merge_into(model)
    _assert_unchanged(model, before)
    name = sorted(delta.layers)[-1]  # the last layer is checked after the others
    layers = {**delta.layers, name: delta.layers[name][:, :-1]}
    with pytest.raises(qdelta.ShapeError, match=f"layer {name}"):
        DenseDelta(layers, delta.params, delta.base_fingerprint).merge_into(model)
    _assert_unchanged(model, before)
    layers = {**delta.layers, "model.nowhere": torch.zeros(2, 2)}
    with pytest.raises(qdelta.ModelMismatchError, match=r"layer 'model\.nowhere'"):
        DenseDelta(layers, delta.params, delta.base_fingerprint).merge_into(model)
    _assert_unchanged(model, before)
    # Still merges correctly after all that.
    merged = delta.merge_into(model).state_dict()
    for k, v in fts[0].state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_merge_into_a_module_without_a_weight():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    before = _snapshot(model)
    delta = DenseDelta({"0": torch.ones(2, 2), "1": torch.ones(2, 2)}, {}, "f" * 32)
    with pytest.raises(qdelta.ModelMismatchError, match="layer '1': expected a module with a"):
        delta.merge_into(model, check=False)
    _assert_unchanged(model, before)


def _tied_gpt2_pair():
    """A tied GPT-2 base, one fine-tune that kept its head tied and one that untied it."""
    base = tiny_gpt2(0)
    kept = fake_finetune(base, 1)
    untied = copy.deepcopy(base)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied = fake_finetune(untied, 2)
    assert kept.lm_head.weight is kept.transformer.wte.weight
    return base, kept, untied


def test_merge_into_refuses_two_values_for_a_tied_tensor():
    base, _, untied = _tied_gpt2_pair()
    delta = qdelta.dense_delta(base, untied)
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(delta.params)
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(qdelta.ModelMismatchError, match=r"lm_head\.weight: expected one value"):
        delta.merge_into(model)
    _assert_unchanged(model, before)
    with pytest.raises(qdelta.ModelMismatchError, match="expected one value"):  # as merge does
        qdelta.merge(copy.deepcopy(base), qdelta.compress(base, untied))


def test_soup_reads_a_tied_tensor_an_input_kept_under_its_other_name():
    """The tied fine-tune keeps wte once (its lm_head is that tensor); the soup's head
    is the mean of the two heads, not of the base's head and the untied one."""
    base, kept, untied = _tied_gpt2_pair()
    a, b = qdelta.dense_delta(base, kept), qdelta.dense_delta(base, untied)
    assert "lm_head.weight" not in a.params and "lm_head.weight" in b.params
    mixed = qdelta.soup([a, b], base=base)
    want = (kept.lm_head.weight.double() + untied.lm_head.weight.double()) / 2
    torch.testing.assert_close(mixed.params["lm_head.weight"].double(), want, rtol=0, atol=1e-6)
    want_wte = (kept.transformer.wte.weight.double() + untied.transformer.wte.weight.double()) / 2
    torch.testing.assert_close(
        mixed.params["transformer.wte.weight"].double(), want_wte, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("weight", ["x", None, True, torch.ones(2)])
def test_a_delta_times_a_non_number_is_a_dtype_error(weight):
    delta = DenseDelta({"l": torch.ones(1, 2)}, {}, "f" * 32)
    with pytest.raises(qdelta.DTypeError, match="delta \\* weight: expected a real number"):
        delta * weight
    assert torch.equal((delta * 2).layers["l"], torch.full((1, 2), 2.0))
