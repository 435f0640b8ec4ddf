"""Bad and unusual input to the public API: a clear qdelta error naming what was
expected and what was found, raised before anything changes; never a bare
AttributeError/TypeError, silent garbage or a half-changed model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qdelta
from qdelta.nn import delta_modules
from qdelta.store import fingerprint


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 3))


def _delta(rng, scale_size: float = 0.02) -> qdelta.Delta:
    base, ft = _model(), _model()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)) * scale_size)
    return qdelta.compress(base, ft, targets=["0", "2"])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"0.bias": torch.ones(3)}, qdelta.ShapeError, r"0.bias: expected shape \[24\]"),
        ({"0.nope": torch.ones(3)}, qdelta.ModelMismatchError, "0.nope: expected a parameter"),
    ],
)
def test_merge_with_a_bad_param_changes_nothing(rng, params, error, match):
    delta = _delta(rng)
    bad = qdelta.Delta(delta.layers, params, delta.base_fingerprint)
    model = _model()
    before = _state(model)
    with pytest.raises(error, match=match):
        qdelta.merge(model, bad, check=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("verb", ["apply", "merge"])
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.full((24,), float("nan")), qdelta.NonFiniteError, "0.bias: expected finite"),
        (torch.ones(24, dtype=torch.complex64), qdelta.DTypeError, "found torch.complex64"),
        (torch.ones(24, dtype=torch.int64), qdelta.DTypeError, "found torch.int64"),
        ([1.0] * 24, qdelta.DTypeError, "found list"),
    ],
)
def test_params_of_the_wrong_kind_change_nothing(rng, verb, value, error, match):
    delta = _delta(rng)
    bad = qdelta.Delta(delta.layers, {"0.bias": value}, delta.base_fingerprint)
    model = _model()
    before = _state(model)
    with pytest.raises(error, match=match):
        getattr(qdelta, verb)(model, bad, check=False)
    _assert_unchanged(model, before)
    assert not delta_modules(model)


def test_merge_into_a_module_without_weight_is_a_mismatch(rng):
    delta = _delta(rng)
    bad = qdelta.Delta({"1": delta.layers["0"]}, {}, delta.base_fingerprint)
    model = _model()
    before = _state(model)
    with pytest.raises(qdelta.ModelMismatchError, match=r"layer 1: .*found ReLU"):
        qdelta.merge(model, bad, check=False)
    _assert_unchanged(model, before)


def test_merge_of_a_conv1d_delta_into_a_linear_names_the_orientation(rng):
    import dataclasses

    delta = _delta(rng)
    flipped = dataclasses.replace(delta.layers["0"], transposed=True)
    bad = qdelta.Delta({"0": flipped}, {}, delta.base_fingerprint)
    model = _model()
    before = _state(model)
    with pytest.raises(
        qdelta.ShapeError,
        match=r"layer 0: expected a delta for a Linear weight \(transposed=False\), found one "
        r"made for a Conv1D \(transposed=True\)",
    ):
        qdelta.merge(model, bad, check=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_then_unapply_restores_the_exact_base(rng, dtype):
    # Large deltas relative to the weights: a plain subtraction does not round back.
    delta = _delta(rng, scale_size=0.5)
    model = _model().to(dtype)
    before = _state(model)
    print_fp = fingerprint(model.state_dict())
    qdelta.apply(model, delta, check=False)
    for module in delta_modules(model).values():
        module.merge()
    assert any(m._merge_fix is not None for m in delta_modules(model).values())
    qdelta.unapply(model)
    _assert_unchanged(model, before)
    assert fingerprint(model.state_dict()) == print_fp


def test_merged_forward_equals_unmerged(rng):
    delta = _delta(rng)
    model = qdelta.apply(_model(), delta)
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = model(x)
        for module in delta_modules(model).values():
            module.merge()
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- modules


def test_wrong_input_width_names_x(rng):
    layer = _delta(rng).layers["0"]
    mod = qdelta.BitDeltaLinear(nn.Linear(40, 24), layer)
    for grad in (False, True):
        with (
            torch.set_grad_enabled(grad),
            pytest.raises(qdelta.ShapeError, match=r"x: expected \[\.\.\., 40\].*found \[4, 20\]"),
        ):
            mod(torch.randn(4, 20, requires_grad=grad))


def test_constructor_and_apply_type_errors(rng):
    delta = _delta(rng)
    with pytest.raises(qdelta.DTypeError, match=r"expected a qdelta\.PackedLayer, found NoneType"):
        qdelta.BitDeltaLinear(nn.Linear(40, 24), None)  # type: ignore[arg-type]
    with pytest.raises(qdelta.DTypeError, match=r"expected a qdelta\.Delta, found dict"):
        qdelta.apply(_model(), {"0": delta.layers["0"]})  # type: ignore[arg-type]
    with pytest.raises(qdelta.QDeltaError, match=r"backend: expected one of .* found 'gpu'"):
        qdelta.BitDeltaLinear(nn.Linear(40, 24), delta.layers["0"], backend="gpu")
    with pytest.raises(qdelta.QDeltaError, match="found 'gpu'"):
        qdelta.MultiTenantLinear(nn.Linear(40, 24), backend="gpu")  # type: ignore[arg-type]
    model = _model()
    with pytest.raises(qdelta.QDeltaError, match="found 'gpu'"):
        qdelta.apply(model, delta, backend="gpu")
    assert not delta_modules(model)


# ---------------------------------------------------------------- packed layers


def test_packed_layer_refuses_non_finite_scales(rng):
    layer = _delta(rng).layers["0"]
    for bad in (np.nan, np.inf, -np.inf):
        scales = layer.scales.copy()
        scales[-1] = bad
        with pytest.raises(
            qdelta.NonFiniteError, match=rf"scales: expected finite values, found {bad}"
        ):
            qdelta.PackedLayer(layer.planes, scales, layer.shape)


def test_add_tenant_refuses_scales_made_non_finite_after_building(rng):
    layer = _delta(rng).layers["0"]
    mt = qdelta.MultiTenantLinear(nn.Linear(40, 24))
    layer.scales[0] = np.nan  # numpy arrays stay mutable after the checks in PackedLayer
    with pytest.raises(qdelta.NonFiniteError, match="tenant 'a': expected finite scales"):
        mt.add_tenant("a", layer)
    assert mt.tenants == {}


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((0, 0), "two ints >= 1"),
        ((24.0, 40.0), "two ints"),
        ((24, 40, 1), "two ints"),
        (5, "two ints"),
    ],
)
def test_packed_layer_refuses_bad_shapes(rng, shape, match):
    layer = _delta(rng).layers["0"]
    with pytest.raises(qdelta.ShapeError, match=match):
        qdelta.PackedLayer(layer.planes, layer.scales, shape)


def test_packed_layer_refuses_lists(rng):
    layer = _delta(rng).layers["0"]
    with pytest.raises(qdelta.DTypeError, match="planes: expected a numpy array, found list"):
        qdelta.PackedLayer(layer.planes.tolist(), layer.scales, layer.shape)
    with pytest.raises(qdelta.DTypeError, match="scales: expected a numpy array, found list"):
        qdelta.PackedLayer(layer.planes, layer.scales.tolist(), layer.shape)


# ---------------------------------------------------------------- multi-tenant ids


def test_huge_tenant_ids_cost_no_memory(rng):
    layer = _delta(rng).layers["0"]
    mt = qdelta.MultiTenantLinear(nn.Linear(40, 24))
    big = 2**62
    assert mt.add_tenant(big, layer) == big
    mt.add_tenant("a", layer)
    assert mt.known_ids.numel() == 2
    x = torch.randn(3, 40)
    with torch.no_grad():
        a = mt.tenant_id("a")
        y = mt(x, torch.tensor([big, -1, big]))
        torch.testing.assert_close(y, mt(x, torch.tensor([a, -1, a])), atol=0, rtol=0)
        torch.testing.assert_close(y[1], mt.base_layer(x)[1])
    with pytest.raises(qdelta.QDeltaError, match=r"expected an int in \[0, 2\*\*63\)"):
        mt.add_tenant(2**63, layer)
    assert set(mt.tenants.values()) == {big, mt.tenant_id("a")}
    with pytest.raises(qdelta.UnknownTenantError, match="names tenant id 7"):
        mt(x[:1], [7])


def test_an_id_of_a_named_tenant_is_not_taken_over_by_id(rng):
    first, second = _delta(rng).layers["0"], _delta(rng).layers["0"]
    mt = qdelta.MultiTenantLinear(nn.Linear(40, 24))
    a = mt.add_tenant("a", first)
    x = torch.randn(2, 40)
    with torch.no_grad():
        before = mt(x, [a, a])
    with pytest.raises(qdelta.QDeltaError, match=f"tenant id {a}: .* found the id of tenant 'a'"):
        mt.add_tenant(a, second)
    assert mt.tenants == {"a": a}
    with torch.no_grad():
        torch.testing.assert_close(mt(x, [a, a]), before, atol=0, rtol=0)  # still 'a'
    assert mt.add_tenant(a + 1, second) == a + 1  # a free id is taken as given
    assert mt.add_tenant(a + 1, first) == a + 1  # and replaced by id


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (["a", "b", "c"], "found str 'a'"),
        (None, "found NoneType"),
        ([0, 1, 2**70], "2\\*\\*63"),
        ([0, True, 1], "found bool True"),
    ],
)
def test_bad_tenant_ids_are_dtype_errors(rng, ids, match):
    mt = qdelta.MultiTenantLinear(nn.Linear(40, 24))
    mt.add_tenant("a", _delta(rng).layers["0"])
    with pytest.raises(qdelta.DTypeError, match=match):
        mt(torch.randn(3, 40), ids)


def test_zero_rows_with_an_empty_id_list(rng):
    mt = qdelta.MultiTenantLinear(nn.Linear(40, 24))
    mt.add_tenant("a", _delta(rng).layers["0"])
    y = mt(torch.randn(0, 40), [])
    assert y.shape == (0, 24)


# ---------------------------------------------------------------- bit planes


def test_as_torch_refuses_a_dtype_that_does_not_match():
    arr = np.zeros((6, 37), dtype=np.float32)
    with pytest.raises(qdelta.DTypeError, match=r"as_torch\(bfloat16\): expected a uint16 array"):
        qdelta.as_torch(arr, "bfloat16")
    with pytest.raises(qdelta.DTypeError, match=r"expected one of .* found 'float64'"):
        qdelta.as_torch(arr, "float64")  # type: ignore[arg-type]
    with pytest.raises(qdelta.DTypeError, match="expected a float32 array, found float16"):
        qdelta.as_torch(arr.astype(np.float16), "float32")
    assert qdelta.as_torch(arr).dtype == torch.float32


def test_words_per_row_refuses_non_counts():
    from qdelta.bitplane import words_per_row

    assert words_per_row(33) == 2 and words_per_row(0) == 0
    for bad in (-5, 1.5, True, "3"):
        with pytest.raises(qdelta.ShapeError, match="cols: expected an int >= 0"):
            words_per_row(bad)  # type: ignore[arg-type]


def test_unpack_scaled_scales():
    planes, _ = qdelta.pack_residual(np.ones((3, 40), np.float32))
    for bad, found in ((None, "NoneType"), ("a", "str of <U1"), (1 + 2j, "complex of complex128")):
        with pytest.raises(qdelta.DTypeError, match=f"expected real numbers .*found {found}"):
            qdelta.unpack_scaled(planes[0], bad, (3, 40))
    # A trainable scale tensor is read, not refused.
    scale = torch.tensor([0.5], requires_grad=True)
    dense = qdelta.unpack_scaled(planes[0], scale, (3, 40))
    assert np.all(dense == 0.5)


# ---------------------------------------------------------------- compress


@pytest.mark.parametrize("targets", [[0], 0, ["0", None]])
def test_compress_refuses_non_string_targets(targets):
    with pytest.raises(qdelta.TargetError, match="targets: expected a layer name pattern"):
        qdelta.compress(_model(), _model(1), targets=targets)


def test_compress_refuses_a_bad_scale_mode_and_meta_tensors():
    with pytest.raises(qdelta.QDeltaError, match='expected "matrix" or "row", found None'):
        qdelta.compress(_model(), _model(1), scale=None)  # type: ignore[arg-type]
    meta = _model().to("meta")
    with pytest.raises(qdelta.DTypeError, match="found a meta tensor"):
        qdelta.compress(meta, _model(1))


# ---------------------------------------------------------------- cached kernel state


def _mt_with_two_tenants(rng, n=64, k=96):
    mt = qdelta.MultiTenantLinear(nn.Linear(k, n))
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    for name in ("a", "b"):
        planes, scales = qdelta.pack_residual(torch.randn(n, k, generator=gen) * 0.05, bits=2)
        mt.add_tenant(name, qdelta.PackedLayer(planes, scales, (n, k)))
    return mt


def _mt_reference(mt, x, ids):
    """float64, row by row, from the layer's current stack tensors."""
    w = mt.base_layer.weight.double()
    out = x.double() @ w.T + mt.base_layer.bias.double()
    signs = (
        1.0
        - 2.0
        * torch.from_numpy(
            np.unpackbits(mt.planes.numpy().view(np.uint8), axis=-1, bitorder="little")
        )[..., : mt.in_features].double()
    )  # [T, P, N, K]
    dense = (signs * mt.scales.double()[..., None]).sum(1)  # [T, N, K]
    for r, t in enumerate(ids.tolist()):
        if t >= 0:
            out[r] += x[r].double() @ dense[mt._slots[t]].T
    return out


@pytest.mark.parametrize("rows", [4, 40])  # the fused plan and the add-into path
@pytest.mark.parametrize("change", ["share_memory", "data", "reassign"])
def test_cached_stack_follows_moved_or_replaced_storage(rng, rows, change):
    mt = _mt_with_two_tenants(rng)
    ids = torch.tensor([i % 3 - 1 for i in range(rows)])  # -1, a, b, ...
    x = torch.randn(rows, mt.in_features)
    with torch.no_grad():
        mt(x, ids)  # builds the cached stack (and the fused plan for few rows)
        if change == "share_memory":
            mt.share_memory()  # moves the storage: the old memory is freed
        elif change == "data":
            mt.scales.data = torch.randn_like(mt.scales)
        else:
            mt.scales = mt.scales * 2
        got = mt(x, ids)
    torch.testing.assert_close(got.double(), _mt_reference(mt, x, ids), atol=1e-4, rtol=1e-4)


def test_kernel_out_must_not_overlap_inputs_or_need_grad():
    from qdelta.kernels import cpu

    b = torch.randn(5, 8)
    with pytest.raises(qdelta.ShapeError, match=r"out: expected an array not shared .* also x"):
        cpu.rms_norm_rows(b[:-1], torch.ones(1, 8), 1e-6, b[1:])
    x = torch.randn(3, 40)
    planes = torch.zeros(1, 1, 40, 2, dtype=torch.int32)
    scales = torch.ones(1, 1)
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(qdelta.ShapeError, match="found it is also x"):
        cpu.multi_tenant_delta_matmul(x, planes, scales, ids, out=x)
    with pytest.raises(qdelta.QDeltaError, match="out: expected a tensor that needs no gradient"):
        cpu.multi_tenant_delta_matmul(
            x, planes, scales, ids, out=torch.zeros(3, 40, requires_grad=True)
        )
    # Disjoint views of one storage are fine.
    buf = torch.zeros(2, 5, 8)
    buf[0] = torch.randn(5, 8)
    cpu.rms_norm_rows(buf[0], torch.ones(1, 8), 1e-6, buf[1])
    want = buf[0] / buf[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(buf[1], want, atol=1e-6, rtol=1e-5)
