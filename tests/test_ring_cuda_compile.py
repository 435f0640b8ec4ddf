"""qdelta/_cuda/attention_block.cu declares exactly the instantiations the cuda backend launches.

tests/test_cuda_compile.py compiles every qdelta/_cuda/*.cu with NVRTC (sm_80, sm_90)
for the instantiations its ``// qdelta-instantiate:`` lines declare.
"""

import pytest
import torch

from qdelta.errors import DTypeError, ShapeError
from qdelta.kernels.cuda import declared_instantiations
from qdelta.ring import cuda_block

# Sliding windows for the tile tests: none, one key, inside a tile, a tile, several.
WINDOWS = [None, 1, 7, 64, 100, 300]


def visible_pairs(qpos, kpos, causal, window):
    """The kernels' visibility rule (no segment ids), [len(qpos), len(kpos)]."""
    d = qpos[:, None] - kpos[None, :]
    vis = d >= 0 if causal else torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    return vis if window is None else vis & (d < window)


def test_instantiate_lines_match_the_backend():
    declared = declared_instantiations(cuda_block.SOURCE.read_text())
    assert sorted(d.replace(" ", "") for d in declared) == sorted(
        i.replace(" ", "") for i in cuda_block.instantiations()
    )
    assert len(declared) == 12  # (v1, mma, mma2) x fp16/bf16 x head dims 64/128


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(
    "sq, sk, causal, q_start, kv_start",
    [(64, 64, True, 0, 0), (130, 77, False, 0, 0), (61, 190, True, 200, 37),
     (96, 200, True, 0, 50), (257, 300, True, 40, 0), (1, 1, True, 0, 5),
     (200, 64, False, 0, 0), (70, 400, True, 300, 0), (100, 300, False, 150, 0)],
)  # fmt: skip
def test_mma_tiles_cover_every_visible_pair_and_unmask_only_visible_ones(
    sq, sk, causal, q_start, kv_start, window
):
    """Every visible pair lies in exactly one tile its block visits, a tile without masks
    is whole and visible, and every visited tile holds a visible pair (the window's
    skipped tiles: work follows the window, not Sk). v1 shares the window skip."""
    _, rows, _ = cuda_block.KERNELS["mma"]
    grid, threads = cuda_block.launch_grid("mma", 2, 3, sq)
    assert grid == (-(-sq // rows), 3, 2) and threads == 128
    qpos = torch.arange(q_start, q_start + sq)
    kpos = torch.arange(kv_start, kv_start + sk)
    visible = visible_pairs(qpos, kpos, causal, window)
    seen = torch.zeros(sq, sk, dtype=torch.int64)
    for blk in range(grid[0]):
        rs = slice(blk * rows, min(sq, (blk + 1) * rows))
        for t0, masked in cuda_block.mma_tiles(
            blk, sq, sk, causal, q_start, kv_start, False, window=window
        ):
            ks = slice(t0, min(sk, t0 + 64))
            seen[rs, ks] += 1
            assert visible[rs, ks].any(), f"block {blk} visits tile {t0} it sees none of"
            if not masked:  # no per-element mask: the whole 64 x 64 tile must be visible
                assert t0 + 64 <= sk and rs.stop - rs.start == rows
                assert visible[rs, ks].all()
    assert (seen <= 1).all() and (seen[visible] == 1).all()


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(
    "sq, sk, causal, q_start, kv_start, segments",
    [(64, 64, True, 0, 0, False), (130, 77, False, 0, 0, False), (61, 190, True, 200, 37, False),
     (96, 200, True, 0, 50, False), (257, 300, True, 40, 0, False), (1, 1, True, 0, 5, False),
     (150, 77, True, 0, 100, False), (200, 200, True, 0, 0, True), (33, 257, True, 1000, 0, False),
     (1000, 1000, True, 0, 0, False), (300, 1000, True, 700, 0, False),
     (200, 64, False, 0, 0, False), (70, 400, True, 300, 0, False),
     (100, 300, False, 150, 0, True), (40, 100, True, 5000, 0, False)],
)  # fmt: skip
def test_mma2_warp_tiles_cover_every_visible_pair_and_unmask_only_visible_ones(
    sq, sk, causal, q_start, kv_start, segments, window
):
    """Per warp (16 rows): every visible (row, key) pair lies in exactly one tile the
    warp computes; a tile without per-element masks is whole and visible for all 16 rows
    (rows past Sq are never stored, so they need no mask), and (without segment ids)
    every computed tile holds a visible pair of the warp's rows inside Sq."""
    _, rows, _ = cuda_block.KERNELS["mma2"]
    grid, threads = cuda_block.launch_grid("mma2", 1, 1, sq)
    assert rows == 16 * (threads // 32)
    qpos = torch.arange(q_start, q_start + sq + rows)  # + rows: the last block's padding rows
    kpos = torch.arange(kv_start, kv_start + sk)
    visible = visible_pairs(qpos, kpos, causal, window)
    seen = torch.zeros(len(qpos), sk, dtype=torch.int64)
    for blk in range(grid[0]):
        for warp in range(threads // 32):
            r = slice(blk * rows + 16 * warp, blk * rows + 16 * warp + 16)
            for t0, masked in cuda_block.mma2_tiles(
                blk, warp, sq, sk, causal, q_start, kv_start, segments, window=window
            ):
                ks = slice(t0, min(sk, t0 + 64))
                seen[r, ks] += 1
                if not segments:
                    assert visible[r.start : min(sq, r.stop), ks].any()
                if not masked:
                    assert t0 + 64 <= sk and not segments
                    assert visible[r, ks].all()
    seen, visible = seen[:sq], visible[:sq]
    assert (seen <= 1).all() and (seen[visible] == 1).all()


def test_backend_names_pick_the_kernels(monkeypatch):
    assert cuda_block.kernel_name("cuda") == cuda_block.DEFAULT_KERNEL == "mma2"
    assert cuda_block.kernel_name("cuda_v1") == "v1"
    assert cuda_block.kernel_name("mma") == "mma"
    assert cuda_block.launch_grid("mma2", 2, 3, 65) == ((2, 3, 2), 128)
    assert cuda_block.shared_bytes("mma", 128) == 0 < cuda_block.shared_bytes("mma2", 64)
    monkeypatch.setattr(cuda_block, "DEFAULT_KERNEL", "v1")
    assert cuda_block.kernel_name("cuda") == "v1"
    assert cuda_block.launch_grid("v1", 1, 2, 33) == ((2, 2, 1), 128)


@pytest.mark.parametrize(
    "window, softcap, error, match",
    [(0, None, ShapeError, r"expected window >= 1 and < 2\*\*63 \(None for no window\), found 0"),
     (-3, None, ShapeError, "found -3"),
     (2**63, None, ShapeError, f"found {2**63}"),
     (2.0, None, DTypeError, "expected window as None or an int, found float"),
     (True, None, DTypeError, "found bool"),
     (None, 0.0, ShapeError, "expected a finite softcap > 0, found 0.0"),
     (None, -1, ShapeError, "found -1"),
     (None, float("inf"), ShapeError, "found inf"),
     (None, float("nan"), ShapeError, "found nan"),
     (None, "50", DTypeError, "expected softcap as None or a number, found str")],
)  # fmt: skip
def test_attention_block_checks_window_and_softcap(window, softcap, error, match):
    """Checked before anything else (so on any machine, GPU or not)."""
    q = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        cuda_block.attention_block(
            q, q, q, 0.125, True, 0, 0, None, None, window=window, softcap=softcap
        )
