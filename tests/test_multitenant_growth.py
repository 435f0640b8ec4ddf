"""A MultiTenantLinear's stack grows into spare rows: loading tenants one by one
reallocates it O(log T) times, never rewrites rows already there, and serves
every tenant as the dense float64 reference does through any mix of loads,
replacements and removals."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from tests.test_multitenant import assert_close, dense_reference, packed, seeded

import qdelta
from qdelta import stacks
from qdelta.stacks import HEADROOM


def _storage_rows(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // (math.prod(t.shape[1:]) * t.element_size())


def _loaded(n: int, k: int, count: int, bits: int, gen: torch.Generator):
    """A fresh [n, k] base, its MultiTenantLinear and ``count`` row-scale tenants
    of ``bits`` planes loaded one by one."""
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    layers = {t: packed(n, k, bits, "row", gen) for t in range(count)}
    for t, layer in layers.items():
        module.add_tenant(t, layer)
    return base, module, layers


def _check_all(module, base, layers, gen, k):
    ids = torch.tensor([*layers, -1])
    x = torch.randn(len(ids), k, generator=gen)
    with torch.no_grad():
        assert_close(module(x, ids), dense_reference(base, layers, x, ids), torch.float32)


def test_loading_one_by_one_reallocates_the_stack_logarithmically():
    gen = seeded()
    n, k, count = 7, 45, 200  # 45: the last word of each row is part padding
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    layers, buffers = {}, set()
    for t in range(count):
        layers[t] = packed(n, k, 1, "row" if t % 2 else "matrix", gen)
        module.add_tenant(t, layers[t])
        buffers.add(module.planes.untyped_storage().data_ptr())
        rows = module.planes.shape[0]
        assert rows == t + 1 and module.scales.shape[0] == t + 1
        # Spare rows stay within the headroom (one row at least when it grows).
        assert _storage_rows(module.planes) <= rows + max(1, math.ceil(rows * HEADROOM))
    bound = math.ceil(math.log(count) / math.log(1 + HEADROOM)) + 4
    assert len(buffers) <= bound, f"{len(buffers)} buffers for {count} loads (bound {bound})"
    _check_all(module, base, layers, gen, k)


def test_rows_taken_before_a_load_keep_their_values():
    """A load writes only its own row: a view of the stack from before (what a
    failed load rolls back to, what a prepared kernel stack reads) is unchanged."""
    gen = seeded()
    module = qdelta.MultiTenantLinear(torch.nn.Linear(64, 16))
    for t in range(5):
        module.add_tenant(t, packed(16, 64, 1, "row", gen))
    views = [module.planes, module.scales]
    copies = [v.clone() for v in views]
    for t in range(5, 12):
        module.add_tenant(t, packed(16, 64, 1, "row", gen))
    for view, before in zip(views, copies, strict=True):
        assert torch.equal(view, before)


def test_a_failed_load_into_spare_rows_leaves_the_layer_serving_as_before(monkeypatch):
    gen = seeded()
    base, module, layers = _loaded(9, 40, 5, 2, gen)
    assert _storage_rows(module.planes) > module.planes.shape[0]  # there is room

    real, calls = stacks.appended, []

    def planes_then_fail(stack: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        calls.append(stack.shape)
        if len(calls) == 2:  # the planes went into the spare row; the scales fail
            raise MemoryError("out of memory (simulated)")
        return real(stack, row)

    monkeypatch.setattr(stacks, "appended", planes_then_fail)
    with pytest.raises(MemoryError):
        module.add_tenant(5, packed(9, 40, 2, "row", gen))
    monkeypatch.undo()
    assert sorted(module.tenants) == list(range(5)) and module.planes.shape[0] == 5
    _check_all(module, base, layers, gen, 40)
    layers[5] = packed(9, 40, 1, "matrix", gen)  # into the row the failed load wrote
    module.add_tenant(5, layers[5])
    _check_all(module, base, layers, gen, 40)


@pytest.mark.parametrize("seed", range(3))
def test_any_mix_of_loads_replacements_and_removals_serves_the_reference(seed):
    gen = seeded()
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 11, 70
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    layers: dict[int, qdelta.PackedLayer] = {}
    for _ in range(60):
        action = rng.random()
        if layers and action < 0.3:
            t = rng.choice(list(layers))
            module.remove_tenant(t)
            del layers[t]
        else:  # a new id, or a loaded one replaced; 1 to 3 planes, either scale mode
            t = rng.randrange(40)
            layers[t] = packed(n, k, rng.randint(1, 3), rng.choice(["row", "matrix"]), gen)
            module.add_tenant(t, layers[t])
        if layers:
            _check_all(module, base, layers, gen, k)


def test_loads_in_and_out_of_inference_mode_mix():
    gen = seeded()
    base = torch.nn.Linear(33, 5)
    module = qdelta.MultiTenantLinear(base)
    layers = {}
    for t in range(8):
        layers[t] = packed(5, 33, 1, "row", gen)
        if t % 3 == 0:
            with torch.inference_mode():
                module.add_tenant(t, layers[t])
        else:
            module.add_tenant(t, layers[t])
    _check_all(module, base, layers, gen, 33)
    with torch.inference_mode():
        _check_all(module, base, layers, gen, 33)


def test_a_moved_or_copied_layer_grows_on_its_own():
    """A deepcopy gets a stack of its own: a load into the copy leaves the
    original's spare rows (and so its next load) alone."""
    gen = seeded()
    base, module, layers = _loaded(6, 32, 5, 1, gen)
    twin = copy.deepcopy(module)
    assert twin.planes.untyped_storage().data_ptr() != module.planes.untyped_storage().data_ptr()
    twin_layers = {**layers, 5: packed(6, 32, 3, "matrix", gen)}
    twin.add_tenant(5, twin_layers[5])
    layers[5] = packed(6, 32, 1, "matrix", gen)
    module.add_tenant(5, layers[5])
    _check_all(module, base, layers, gen, 32)
    _check_all(twin, twin.base_layer, twin_layers, gen, 32)
    np.testing.assert_array_equal(module.planes[:5].numpy(), twin.planes[:5, :1].numpy())


def test_planes_and_scales_stay_allocated_alike():
    """Removal relies on it: both stacks shrink into new buffers or both move a
    row in place, so a failed allocation happens before any change."""
    gen = seeded()
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    module = qdelta.MultiTenantLinear(torch.nn.Linear(50, 7))
    for _ in range(80):
        if module.tenants and rng.random() < 0.45:
            module.remove_tenant(rng.choice(list(module.tenants)))
        else:
            module.add_tenant(rng.randrange(60), packed(7, 50, rng.randint(1, 3), "row", gen))
        if module.tenants:
            assert _storage_rows(module.planes) == _storage_rows(module.scales)
