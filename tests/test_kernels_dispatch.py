"""Backend selection of qdelta.kernels (runs everywhere)."""

import warnings

import numpy as np
import pytest
import torch

import qdelta
from qdelta import QDeltaError, kernels
from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels import reference


def test_auto_on_cpu_tensors_matches_the_reference():
    # "auto" runs the Rust kernel here (small CPU batch), the reference is the oracle.
    x = torch.randn(3, 40)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 1, 5, 2), dtype=torch.int32)
    scales = torch.rand(2, 1)
    ids = torch.tensor([1, -1, 0])
    got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    want = reference.multi_tenant_delta_matmul(x, planes, scales, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(cuda_backend.available(), reason="checks the no-GPU error")
def test_cuda_backend_without_device_is_a_clear_error():
    x = torch.randn(2, 32)
    planes = torch.zeros(1, 3, 1, dtype=torch.int32)
    with pytest.raises(QDeltaError, match="backend 'cuda'"):
        kernels.delta_matmul(x, planes, torch.ones(1), backend="cuda")


def _never() -> bool:
    raise AssertionError("cuda_available() consulted where the answer does not depend on it")


@pytest.mark.parametrize(
    ("backend", "is_cuda", "needs_grad", "cupy", "want"),
    [
        ("auto", True, False, True, "cuda"),
        ("auto", True, False, False, "no-cupy"),
        ("auto", True, True, True, "other"),  # gradients: the differentiable reference
        ("auto", True, True, False, "other"),
        ("auto", False, False, True, "other"),
        ("auto", False, True, True, "other"),
        ("cuda", True, False, True, "cuda"),
        ("cuda", False, False, True, "cuda"),  # the kernel itself refuses CPU tensors
        ("reference", True, False, True, "other"),
        ("cpu", True, False, True, "other"),
    ],
)
def test_cuda_choice(backend, is_cuda, needs_grad, cupy, want):
    consulted = []

    def available():
        consulted.append(True)
        return cupy

    got = kernels.cuda_choice(
        backend, is_cuda=is_cuda, needs_grad=needs_grad, cuda_available=available
    )
    assert got == want
    # Availability matters only for "cuda" and for auto on CUDA tensors without grads.
    assert bool(consulted) == (
        backend == "cuda" or (backend == "auto" and is_cuda and not needs_grad)
    )


@pytest.mark.parametrize("is_cuda", [True, False])
def test_auto_never_asks_for_cupy_when_gradients_are_needed(is_cuda):
    choice = kernels.cuda_choice("auto", is_cuda=is_cuda, needs_grad=True, cuda_available=_never)
    assert choice == "other"


def test_explicit_cuda_with_gradients_is_a_clear_error():
    with pytest.raises(QDeltaError, match=r"backend 'cuda'.*no backward"):
        kernels.cuda_choice("cuda", is_cuda=True, needs_grad=True, cuda_available=lambda: True)
    with pytest.raises(QDeltaError, match="backend 'cuda': expected a CUDA device"):
        kernels.cuda_choice("cuda", is_cuda=True, needs_grad=False, cuda_available=lambda: False)
    with pytest.raises(QDeltaError, match="backend: expected one of"):
        kernels.cuda_choice("gpu", is_cuda=True, needs_grad=False, cuda_available=_never)


def _inputs(requires_grad: bool):
    x = torch.randn(3, 40, requires_grad=requires_grad)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 1, 5, 2), dtype=torch.int32)
    scales = (torch.rand(2, 1) + 0.1).requires_grad_(requires_grad)
    ids = torch.tensor([1, -1, 0])
    return x, planes, scales, ids


@pytest.fixture
def recorded_cuda_calls(monkeypatch):
    """cupy "available" and the CUDA entry points replaced by recorders."""
    calls = []

    def fake(name):
        def run(x, planes, scales, *rest, **kw):
            calls.append(name)
            return torch.zeros(x.shape[0], planes.shape[-2], dtype=x.dtype)

        return run

    monkeypatch.setattr(cuda_backend, "available", lambda: True)
    monkeypatch.setattr(cuda_backend, "delta_matmul", fake("delta_matmul"))
    monkeypatch.setattr(cuda_backend, "multi_tenant_delta_matmul", fake("multi_tenant"))
    return calls


def test_explicit_cuda_dispatch_reaches_the_kernel_only_without_gradients(recorded_cuda_calls):
    x, planes, scales, ids = _inputs(requires_grad=False)
    kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="cuda")
    kernels.delta_matmul(x, planes[0], scales[0], backend="cuda")
    assert recorded_cuda_calls == ["multi_tenant", "delta_matmul"]
    x, planes, scales, ids = _inputs(requires_grad=True)
    with pytest.raises(QDeltaError, match="no backward"):
        kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="cuda")
    with pytest.raises(QDeltaError, match="no backward"):
        kernels.delta_matmul(x, planes[0], scales[0], backend="cuda")
    with torch.no_grad():  # grad mode off: nothing to differentiate, the kernel runs
        kernels.delta_matmul(x, planes[0], scales[0], backend="cuda")
    assert recorded_cuda_calls == ["multi_tenant", "delta_matmul", "delta_matmul"]


@pytest.mark.parametrize("grad_of", ["x", "scales", "both"])
def test_auto_with_gradients_runs_the_differentiable_reference(recorded_cuda_calls, grad_of):
    x, planes, scales, ids = _inputs(requires_grad=False)
    x.requires_grad_(grad_of in ("x", "both"))
    scales.requires_grad_(grad_of in ("scales", "both"))
    dy = torch.randn(3, 5)
    y = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    assert y.requires_grad
    leaves = [t for t in (x, scales) if t.requires_grad]
    got = torch.autograd.grad((y * dy).sum(), leaves)
    ref = reference.multi_tenant_delta_matmul(x, planes, scales, ids)
    want = torch.autograd.grad((ref * dy).sum(), leaves)
    for g, w in zip(got, want, strict=True):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, w)
    y1 = kernels.delta_matmul(x, planes[0], scales[0], backend="auto")
    assert y1.requires_grad
    assert recorded_cuda_calls == []


def test_auto_on_cuda_without_cupy_warns_once(monkeypatch):
    monkeypatch.setattr(cuda_backend, "available", lambda: False)
    monkeypatch.setattr(kernels, "_warned_no_cupy", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # a second warning would be recorded, not hidden
        for _ in range(3):
            assert not kernels._use_cuda_for("auto", is_cuda=True, needs_grad=False)
        assert not kernels._use_cuda_for("auto", is_cuda=False, needs_grad=False)
    runtime = [w for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in seen]
    assert "cupy is not importable" in str(runtime[0].message)
    assert kernels._warned_no_cupy


def test_auto_on_cuda_with_gradients_does_not_warn_about_cupy(monkeypatch):
    monkeypatch.setattr(cuda_backend, "available", lambda: False)
    monkeypatch.setattr(kernels, "_warned_no_cupy", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not kernels._use_cuda_for("auto", is_cuda=True, needs_grad=True)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]
    assert not kernels._warned_no_cupy


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("rows", [2, 200])  # "auto": the CPU kernel, then the reference
@pytest.mark.parametrize("bits", [0, -1, 3, 2.0, True])
def test_bits_checked_the_same_on_every_backend(backend, rows, bits):
    planes, scales = qdelta.pack_residual(np.ones((5, 40), np.float32), bits=2)
    planes_t, scales_t = torch.from_numpy(planes.view(np.int32)), torch.from_numpy(scales)
    x = torch.randn(rows, 40)
    error = qdelta.DTypeError if isinstance(bits, (bool, float)) else qdelta.ShapeError
    with pytest.raises(error, match="bits: expected"):
        kernels.delta_matmul(x, planes_t, scales_t, bits=bits, backend=backend)
    one = kernels.delta_matmul(x, planes_t, scales_t, bits=1, backend=backend)
    expected = (
        x.double()
        @ torch.from_numpy(qdelta.unpack_residual(planes, scales, (5, 40), bits=1)).double().T
    )
    torch.testing.assert_close(one.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([0, 3], QDeltaError, r"expected values in \[-1, 3\) .* found 3 at row 1"),
        ([-2, 0], QDeltaError, r"found -2 at row 0"),
        ([0], qdelta.ShapeError, r"one id per row of x \(\d+\), found 1"),
        (
            [0.0, 1.0],
            qdelta.DTypeError,
            r"expected an integer tensor \(int64\), found torch.float32",
        ),
    ],
)
@pytest.mark.parametrize("how", ["cpu", "reference", "auto+grad", "auto, many rows"])
def test_every_backend_refuses_bad_ids_alike(ids, error, match, how):
    """The reference (which "auto" takes for gradients and large batches) checks
    its inputs as the Rust kernel does: the batch size never decides the answer."""
    rows = 300 if how == "auto, many rows" else 2
    x = torch.randn(rows, 40, requires_grad=how == "auto+grad")
    planes = torch.randint(-(2**31), 2**31 - 1, (3, 1, 5, 2), dtype=torch.int32)
    scales = torch.rand(3, 1)
    ids = torch.tensor(ids * (rows // 2 if len(ids) == 2 else 1))
    backend = how if how in ("cpu", "reference") else "auto"
    with pytest.raises(error, match=match):
        kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend=backend)


def _bad_stacks():
    """(label, x, planes [T, P, N, W], scales, error, match) for K = 40 (W = 2)."""
    x = torch.randn(2, 40)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 2, 5, 2), dtype=torch.int32)
    nan = torch.rand(2, 2, 5)
    nan[1, 0, 3] = float("nan")
    return [
        (
            "NaN scale",
            x,
            planes,
            nan,
            qdelta.NonFiniteError,
            "found NaN for tenant ., plane 0, index 3",
        ),
        ("inf scale", x, planes, torch.full((2, 2), float("inf")), qdelta.NonFiniteError, "inf"),
        ("extra plane", x, planes, torch.rand(2, 3, 5), qdelta.ShapeError, r"\(per matrix\) or"),
        ("int scales", x, planes, torch.ones(2, 2, dtype=torch.int64), qdelta.DTypeError, "float"),
        ("int x", x.long(), planes, torch.rand(2, 2), qdelta.DTypeError, "x: expected"),
        ("int64 planes", x, planes.long(), torch.rand(2, 2), qdelta.DTypeError, "planes: expected"),
        (
            "short words",
            torch.randn(2, 70),
            planes,
            torch.rand(2, 2),
            qdelta.ShapeError,
            "need 3 u32 words per row",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_stacks())), ids=[c[0] for c in _bad_stacks()])
@pytest.mark.parametrize("how", ["cpu", "reference", "auto, many rows"])
@pytest.mark.parametrize("tenants", ["multi", "one"])
def test_every_backend_refuses_bad_stacks_alike(case, how, tenants):
    """Planes, scales and x are checked by the reference as by the Rust kernel."""
    _, x, planes, scales, error, match = _bad_stacks()[case]
    if how == "auto, many rows":
        x = x.repeat(150, 1)
    backend = how if how in ("cpu", "reference") else "auto"
    with pytest.raises(error, match=match):
        if tenants == "multi":  # tenant 1 holds the NaN: the rows use both
            ids = torch.arange(x.shape[0]) % 2
            kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend=backend)
        else:
            kernels.delta_matmul(x, planes[1], scales[1], backend=backend)


def test_reference_takes_x_of_any_leading_shape_with_gradients():
    x = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 2, 5, 2), dtype=torch.int32)
    scales = torch.rand(2, 2, dtype=torch.float64)
    ids = torch.tensor([1, -1, 0, 0, 1, -1])
    got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    assert got.shape == (2, 3, 5)
    flat = reference.multi_tenant_delta_matmul(x.detach().reshape(6, 40), planes, scales, ids)
    torch.testing.assert_close(got.detach().reshape(6, 5), flat)
    assert torch.autograd.gradcheck(
        lambda xx: kernels.multi_tenant_delta_matmul(xx, planes, scales, ids), (x,)
    )


@pytest.mark.parametrize("bits", [True, 2.7, "1"])
def test_cpu_kernel_takes_bits_as_an_int_only(bits):
    from qdelta.kernels import cpu

    x = torch.randn(2, 40)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 5, 2), dtype=torch.int32)
    with pytest.raises(qdelta.DTypeError, match="bits: expected an int or None"):
        cpu.delta_matmul(x, planes, torch.rand(2), bits=bits)
    with pytest.raises(qdelta.DTypeError, match="bits: expected an int or None"):
        cpu.multi_tenant_delta_matmul(
            x, planes[None], torch.rand(1, 2), torch.zeros(2).long(), bits=bits
        )


def test_auto_on_the_kernel_device_takes_what_the_cpu_takes(emulated):
    """Leading dims, float64 x (to the reference), int32 ids and a NaN scale of a
    used tenant behave as on the CPU (the CUDA host code runs under the emulator)."""
    from tests.delta_cases import random_planes, random_scales

    g = torch.Generator().manual_seed(5)
    planes = random_planes(2, 1, 8, 40, generator=g)
    scales = random_scales(2, 1, 8, False, generator=g)
    cases = [
        (torch.randn(2, 3, 40, generator=g).half(), torch.tensor([0, 1, -1, 0, 1, 0])),
        (torch.randn(3, 40, generator=g, dtype=torch.float64), torch.tensor([0, 1, -1])),
        (torch.randn(3, 40, generator=g).half(), torch.tensor([0, 1, -1], dtype=torch.int32)),
    ]
    for x, ids in cases:
        got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids)
        want = reference.multi_tenant_delta_matmul(x.double(), planes, scales, ids.long())
        assert got.shape == want.shape and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    # The scales' scan is cached by version: a NaN written in place after a call counts.
    stack = scales.clone()
    x = torch.randn(3, 40, generator=g).half()
    kernels.multi_tenant_delta_matmul(x, planes, stack, torch.tensor([0, 1, -1]))
    stack[1, 0] = float("nan")
    with pytest.raises(qdelta.NonFiniteError, match="tenant 1, plane 0"):
        kernels.multi_tenant_delta_matmul(x, planes, stack, torch.tensor([0, 1, -1]))
    kernels.multi_tenant_delta_matmul(x, planes, stack, torch.tensor([0, 0, -1]))  # 1 unused
    empty = torch.zeros(0, 1, 8, 2, dtype=torch.int32)
    with pytest.raises(qdelta.ShapeError, match="with every size > 0"):
        kernels.multi_tenant_delta_matmul(x, empty, torch.ones(0, 1), torch.tensor([-1] * 3))


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_uint8_ids_empty_stacks_and_non_tensors_alike_on_every_backend(backend):
    x = torch.randn(3, 40)
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 1, 5, 2), dtype=torch.int32)
    scales = torch.rand(2, 1)
    ids = torch.tensor([0, 1, 1], dtype=torch.uint8)  # no -1 in uint8: must not wrap
    got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend=backend)
    want = reference.multi_tenant_delta_matmul(x.double(), planes, scales, ids.long())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for empty in ((0, 1, 5, 2), (2, 0, 5, 2), (2, 1, 0, 2)):
        with pytest.raises(qdelta.ShapeError, match="with every size > 0"):
            kernels.multi_tenant_delta_matmul(
                x, torch.zeros(empty, dtype=torch.int32), torch.ones(empty[:2]),
                torch.tensor([-1, -1, -1]), backend=backend,
            )  # fmt: skip
    for name, args in (
        ("x", (x.numpy(), planes, scales, ids)),
        ("planes", (x, planes.tolist(), scales, ids)),
        ("scales", (x, planes, scales.tolist(), ids)),
        ("tenant_ids", (x, planes, scales, [0, 1, 1])),
    ):
        with pytest.raises(qdelta.DTypeError, match=f"{name}: expected a torch.Tensor"):
            kernels.multi_tenant_delta_matmul(*args, backend=backend)
