"""Serving objects called from several threads give each call its own right answer.

The Python interpreter is made to switch threads every microsecond, so the
interleavings that broke these calls before (a shared routing slot, a row-slot
cache set in two steps, a restack seen half done, a store write and the open
of another thread's file) happen within a few hundred calls.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading
from collections import Counter
from collections.abc import Callable

import pytest
import torch

import qdelta
from qdelta.locking import serialized
from qdelta.multitenant import MultiTenantLinear
from runtime_helpers import make_delta, perturbed, tiny_llama


@pytest.fixture(autouse=True)
def fast_switching():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_threads(*targets: Callable[[], None], timeout: float = 120.0) -> list[str]:
    """Run the targets in threads; the exceptions they raised, as text."""
    errors: list[str] = []

    def guarded(fn):
        try:
            fn()
        except Exception as e:  # collected and asserted on by the test
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    return errors


def packed_layers(n: int, k: int, count: int, gen: torch.Generator) -> list[qdelta.PackedLayer]:
    out = []
    for t in range(count):
        planes, scales = qdelta.pack_residual(torch.randn(n, k, generator=gen), bits=1 + t % 2)
        out.append(qdelta.PackedLayer(planes, scales, (n, k)))
    return out


@pytest.fixture
def layer_and_refs(gen):
    n, k = 48, 70
    layer = MultiTenantLinear(torch.nn.Linear(k, n))
    packed = packed_layers(n, k, 4, gen)
    for t, p in enumerate(packed):
        layer.add_tenant(t, p)
    x = torch.randn(4, k, generator=gen)
    with torch.no_grad():
        refs = {t: layer(x, torch.full((4,), t)).clone() for t in range(4)}
    return layer, packed, x, refs


def test_multitenant_linear_serves_each_thread_its_own_tenant(layer_and_refs):
    layer, _, x, refs = layer_and_refs
    wrong = Counter()

    def serve(t):
        ids = torch.full((4,), t)  # reused every call, as decode does (the cached path)
        with torch.no_grad():
            for _ in range(1500):
                if not torch.allclose(layer(x, ids), refs[t], atol=1e-5):
                    wrong[t] += 1

    errors = run_threads(*(lambda t=t: serve(t) for t in range(4)))
    assert not errors and not wrong, (errors[:3], dict(wrong))


def test_adding_and_removing_tenants_while_another_thread_serves(layer_and_refs):
    layer, packed, x, refs = layer_and_refs
    done = threading.Event()
    wrong, calls = [0], [0]

    def serve():
        ids = torch.full((4,), 3)
        with torch.no_grad():
            while not done.is_set():
                calls[0] += 1
                wrong[0] += not torch.allclose(layer(x, ids), refs[3], atol=1e-5)

    def churn():
        try:
            for _ in range(300):
                layer.remove_tenant(0)
                layer.add_tenant(0, packed[0])
        finally:
            done.set()

    errors = run_threads(serve, churn)
    assert not errors and wrong[0] == 0 and calls[0] > 0, (errors[:3], wrong[0], calls[0])


@pytest.fixture(scope="module")
def model_and_refs():
    torch.manual_seed(0)
    base = tiny_llama(0)
    deltas = {f"t{i}": make_delta(base, perturbed(base, 100 + i, scale=0.2)) for i in range(2)}
    model = qdelta.MultiTenantModel(base, tenants=deltas)
    prompt = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(1))
    refs = {t: model.generate(prompt, [t], 12).tokens for t in ("t0", "t1", None)}
    assert not torch.equal(refs["t0"], refs["t1"]) and not torch.equal(refs["t0"], refs[None])
    return model, deltas, prompt, refs


def test_generate_from_several_threads_routes_each_call(model_and_refs):
    model, _, prompt, refs = model_and_refs
    wrong = Counter()

    def serve(t):
        for _ in range(6):
            if not torch.equal(model.generate(prompt, [t], 12).tokens, refs[t]):
                wrong[t] += 1

    errors = run_threads(*(lambda t=t: serve(t) for t in ("t0", "t1", None)))
    assert not errors and not wrong, (errors[:3], dict(wrong))


def test_tenants_replaced_while_another_thread_generates(model_and_refs):
    model, deltas, prompt, refs = model_and_refs
    done = threading.Event()
    wrong = [0]

    def serve():
        while not done.is_set():
            wrong[0] += not torch.equal(model.generate(prompt, ["t1"], 12).tokens, refs["t1"])

    def churn():
        try:
            for _ in range(20):
                model.remove_tenant("t0")
                model.add_tenant("t0", deltas["t0"])
                model.preload(["t0"])
        finally:
            done.set()

    errors = run_threads(serve, churn)
    assert not errors and wrong[0] == 0, (errors[:3], wrong[0])


def test_store_add_returns_the_file_this_thread_wrote(tmp_path, gen):
    store = qdelta.DeltaStore(tmp_path)
    mine = {}
    for rows in (40, 56):
        planes, scales = qdelta.pack_residual(torch.randn(rows, 64, generator=gen))
        layer = qdelta.PackedLayer(planes, scales, (rows, 64))
        mine[rows] = qdelta.Delta({"l": layer}, {}, "f" * 32, metadata={"rows": str(rows)})
    wrong = Counter()

    def add(rows):
        for _ in range(60):
            if store.add("t", mine[rows]).user_metadata["rows"] != str(rows):
                wrong[rows] += 1

    errors = run_threads(*(lambda r=r: add(r) for r in mine))
    assert not errors and not wrong, (errors[:3], dict(wrong))
    assert store.open("t").verify() > 0


def test_copies_get_a_lock_of_their_own(layer_and_refs, model_and_refs):
    layer, _, x, refs = layer_and_refs
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._lock is not layer._lock
        with torch.no_grad():
            torch.testing.assert_close(clone(x, torch.full((4,), 2)), refs[2])
    model, _, prompt, refs_model = model_and_refs
    clone = copy.deepcopy(model)
    assert clone._lock is not model._lock
    torch.testing.assert_close(clone.generate(prompt, ["t1"], 12).tokens, refs_model["t1"])


def test_properties_read_while_another_thread_loads_and_evicts(model_and_refs):
    """A metrics thread polling the registry saw OrderedDict mutated during iteration."""
    model = model_and_refs[0]
    model.budget_bytes = model.resident_bytes  # room for what is loaded now, no more
    done = threading.Event()

    def churn():
        try:
            for i in range(30):
                model.preload(["t0" if i % 2 else "t1"])
        finally:
            done.set()

    def poll():
        while not done.is_set():
            model.resident_bytes, model.loaded_tenants, model.tenants  # noqa: B018
            model.tenant_id("t0")

    try:
        errors = run_threads(churn, poll, poll)
    finally:
        model.budget_bytes = None
    assert not errors, errors[:3]


def _in_forked_child(check: Callable[[], None]) -> int:
    """Exit code of ``check`` run in a forked child (0 ok, 1 failed, -14 hung: SIGALRM)."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        # A deadlock ends as SIGALRM: the default action, since a Python handler
        # (pytest-timeout's) never runs while the thread is stuck in C.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(20)
        # torch's OpenMP pool is not fork-safe (a parallel region in the child can
        # hang on the parent's threads); qdelta's own pool is rebuilt per process.
        torch.set_num_threads(1)
        try:
            check()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_fork_while_another_thread_is_inside_a_call_does_not_deadlock(layer_and_refs, tmp_path):
    layer, packed, x, refs = layer_and_refs
    idle = MultiTenantLinear(torch.nn.Linear(x.shape[1], 48))
    idle.add_tenant("a", packed[0])
    store = qdelta.DeltaStore(tmp_path)
    inside, leave = threading.Event(), threading.Event()

    @serialized
    def long_call(module):  # inside a call on the layer, holding the store's write lock
        with store._write_lock:
            inside.set()
            leave.wait(60)

    def busy():
        long_call(layer)

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    assert inside.wait(10)

    def child():
        try:
            layer(x, torch.full((4,), 1))
        except qdelta.QDeltaError as e:  # the busy object refuses, it does not hang
            assert "mid-call in another thread" in str(e)
        else:
            raise AssertionError("a half-updated object served")
        with torch.no_grad():
            idle(x, torch.tensor([0, -1, 0, -1]))  # an idle one serves
        delta = qdelta.Delta({"l": packed[1]}, {}, "f" * 32)
        assert store.add("t", delta).tenant == "t"  # the store's locks are new

    def idle_lock_only():
        with torch.no_grad():
            layer(x, torch.full((4,), 1))

    try:
        assert _in_forked_child(child) == 0
    finally:
        leave.set()
        worker.join(10)
    with layer._lock:  # held, but not inside a call (a property read): not busy
        assert _in_forked_child(idle_lock_only) == 0
    with torch.no_grad():  # the parent goes on as before
        torch.testing.assert_close(layer(x, torch.full((4,), 1)), refs[1])


def _routed_llama():
    base = tiny_llama(3)
    model = qdelta.MultiTenantModel(copy.deepcopy(base))
    model.add_tenant("t", make_delta(base, perturbed(base, 4)))
    return base, model, torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))


def test_a_call_inside_a_routing_block_is_refused_and_the_route_stays():
    """An inner forward/generate would set its own route and clear the block's on
    return (the block then served every row as the base), and its loads could evict
    the block's tenants: refused, the block's route intact."""
    base, model, ids = _routed_llama()
    with torch.no_grad():
        want = model(ids, ["t", None]).logits
        with model.routing(["t", None], 2):
            for inner in (
                lambda: model(ids, [None, "t"]),
                lambda: model.generate(ids, ["t", "t"], 2),
                lambda: model.routing([None, None], 2).__enter__(),
            ):
                with pytest.raises(qdelta.QDeltaError, match="inside a routing\\(\\) block"):
                    inner()
            torch.testing.assert_close(model.model(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(model.model(input_ids=ids).logits, base(ids).logits)


def test_a_fork_while_another_thread_is_inside_routing_refuses_and_forgets_the_route():
    base, model, ids = _routed_llama()
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with model.routing(["t", "t"], 2):
            inside.set()
            leave.wait(60)

    worker = threading.Thread(target=hold, daemon=True)
    worker.start()
    assert inside.wait(10)

    def child():
        with torch.no_grad():  # no route left: the wrapped model is the base
            torch.testing.assert_close(model.model(input_ids=ids).logits, base(ids).logits)
        try:
            model.generate(ids, ["t", None], 2)
        except qdelta.QDeltaError as e:
            assert "mid-call in another thread" in str(e)
        else:
            raise AssertionError("a model mid-call in another thread served")

    try:
        assert _in_forked_child(child) == 0
    finally:
        leave.set()
        worker.join(10)
