import os
import secrets

import numpy as np
import pytest
import torch

SEED_ENV = "QDELTA_TEST_SEED"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random data every test: a new 64-bit seed from ``secrets`` (os.urandom),
    or the one in ``QDELTA_TEST_SEED`` to reproduce a failure.

    The seed is recorded in ``request.node.user_properties`` (also written to JUnit XML)
    and the ``pytest_runtest_makereport`` hook below adds an "rng seed" section, with the
    command to rerun it, to the report of every failed test that used this fixture.
    """
    forced = os.environ.get(SEED_ENV)
    seed = int(forced, 0) if forced else secrets.randbits(64)
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in item.user_properties:
        if name == "rng_seed":
            report.sections.append(
                (
                    "rng seed",
                    f"rng seed {value}; reproduce with {SEED_ENV}={value} pytest {item.nodeid}",
                )
            )


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@pytest.fixture
def gen(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from the rng fixture (seed printed on failure)."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA host code on CPU tensors through the kernel emulator
    (qdelta.kernels.emulator, 4 SMs); torch.cuda must not be touched meanwhile."""
    from qdelta.kernels import emulator

    def refuse(*args, **kwargs):
        raise AssertionError("a torch.cuda function ran under emulation")

    for name in ("current_stream", "synchronize", "current_device", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setenv("QDELTA_CUDA_SYNC", "1")
    with emulator.emulate(sm_count=4) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny model zoo, built once per session into ``<tmp>/zoo`` (the layout
    of ``$QDELTA_CACHE/zoo``); tests that need another cache build their own."""
    from qdelta.zoo import ZooConfig, build_zoo

    cache = tmp_path_factory.mktemp("qdelta-cache") / "zoo"
    return build_zoo(ZooConfig.tiny(), cache, progress=False)


@pytest.fixture(autouse=True)
def _kernel_runtime_restored():
    """No test may leave the CUDA backend's runtime swapped (e.g. the emulator):
    later tests would take the CUDA path on CPU tensors without knowing it."""
    from qdelta.kernels import cuda

    before = cuda.RUNTIME
    yield
    assert cuda.RUNTIME is before, "a test left qdelta.kernels.cuda.RUNTIME replaced"


@pytest.fixture
def one_rank():
    """A one-process gloo group in this process, destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
