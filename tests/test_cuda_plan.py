"""Launch plan of the decode (lookup-table) kernel: pure shape arithmetic, no GPU needed."""

import pytest

from qdelta.kernels import cuda as cuda_backend


@pytest.mark.parametrize("sms", [1, 108, 132])
@pytest.mark.parametrize("tenants", [None, 1, 3, 64])
@pytest.mark.parametrize(
    ("m", "n", "w", "use"), [(1, 1, 1, 1), (5, 97, 10, 2), (64, 4096, 128, 1), (16, 8192, 256, 3)]
)
def test_lut_plan_covers_every_feature_and_slice(m, n, w, use, tenants, sms):
    plan = cuda_backend.lut_plan(m, n, w, use, tenants, sms)
    rows = plan["rows"]
    assert rows in cuda_backend.LUT_GROUP_ROWS
    # The kernel covers 32 * (32 / R) features per block: nb must not exceed it.
    assert 1 <= plan["nb"] <= plan["nb_max"] == 32 * (32 // rows)
    slices = -(-w // cuda_backend.LUT_WORDS)
    assert plan["slices"] == slices
    # Every slice in exactly one chunk, no empty chunk.
    assert plan["spc"] * plan["kch"] >= slices > plan["spc"] * (plan["kch"] - 1)
    assert use * plan["kch"] <= 65535 and m <= 65535
    shared = rows * cuda_backend.LUT_BYTES_PER_ROW
    assert shared <= 4 * 32 * 1024  # 128 KB: fits sm_80 and sm_90 (opt-in above 48 KB)


def test_lut_plan_rows_per_group_follow_rows_per_tenant():
    assert cuda_backend.lut_plan(64, 4096, 128, 1, 64, 132)["rows"] == 1
    assert cuda_backend.lut_plan(6, 64, 2, 1, 3, 132)["rows"] == 2
    assert cuda_backend.lut_plan(16, 64, 2, 1, None, 132)["rows"] == 4
    # The benchmark's decode shapes keep full 1024-feature tiles at B >= 16.
    assert cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132)["nb"] == 1024


def test_auto_path_rule(monkeypatch):
    """One row -> mma; few rows -> lookup tables; many rows -> expansion + cuBLAS."""
    assert cuda_backend.auto_path(1, one_tenant=True) == "mma"
    assert cuda_backend.auto_path(1, one_tenant=False) == "mma"
    assert cuda_backend.auto_path(2, one_tenant=False) == "decode"
    assert cuda_backend.auto_path(64, one_tenant=False) == "decode"
    assert cuda_backend.auto_path(65, one_tenant=False) == "prefill"
    assert cuda_backend.auto_path(16, one_tenant=True) == "decode"
    assert cuda_backend.auto_path(17, one_tenant=True) == "prefill"
    # The one constant that switches single-row decode back to the tables.
    monkeypatch.setattr(cuda_backend, "DECODE_MMA_MAX_ROWS", 0)
    assert cuda_backend.auto_path(1, one_tenant=True) == "decode"


def test_variant_switches_name_compiled_kernels():
    names = set(cuda_backend.name_expressions())
    assert cuda_backend.EXPAND_KERNEL in ("rows", "flat")
    assert isinstance(cuda_backend.LUT_L2_LINE_LOADS, bool)
    assert isinstance(cuda_backend.LUT_PREFETCH_NEXT, bool)
    for dt in cuda_backend.DTYPE_CODES.values():
        assert f"qd_expand_rows<{dt}>" in names and f"qd_expand<{dt}>" in names


def test_fewer_blocks_per_sm_gives_longer_blocks():
    """LUT_BLOCKS_PER_SM = 1 splits K less: more slices per block for the prefetch."""
    default = cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132)
    long = cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132, per_sm=1)
    assert long["kch"] < default["kch"] and long["spc"] > default["spc"]
    assert long["spc"] * long["kch"] >= long["slices"]


def test_feature_cap_narrows_tiles_and_splits_k_less():
    """max_features (the "lut-narrow" choice) caps nb; the grid then fills with fewer K
    splits, so each block runs more slices."""
    wide = cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132)
    narrow = cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132, max_features=256)
    assert wide["nb"] == 1024 and narrow["nb"] == 256
    assert narrow["kch"] < wide["kch"] and narrow["spc"] * narrow["kch"] >= narrow["slices"]
    assert cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132, max_features=300)["nb"] == 288
    assert cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132, max_features=1)["nb"] == 32
    assert cuda_backend.lut_plan(16, 4096, 128, 1, 16, 132, max_features=99999)["nb"] == 1024
