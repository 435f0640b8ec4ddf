"""qdelta/_cuda/attention_block.cu declares exactly the instantiations the cuda backend launches.

tests/test_cuda_compile.py compiles every qdelta/_cuda/*.cu with NVRTC (sm_80, sm_90)
for the instantiations its ``// qdelta-instantiate:`` lines declare.
"""

import pytest
import torch

from qdelta.kernels.cuda import declared_instantiations
from qdelta.ring import cuda_block


def test_instantiate_lines_match_the_backend():
    declared = declared_instantiations(cuda_block.SOURCE.read_text())
    assert sorted(d.replace(" ", "") for d in declared) == sorted(
        i.replace(" ", "") for i in cuda_block.instantiations()
    )
    assert len(declared) == 12  # (v1, mma, mma2) x fp16/bf16 x head dims 64/128


@pytest.mark.parametrize(
    "sq, sk, causal, q_start, kv_start",
    [(64, 64, True, 0, 0), (130, 77, False, 0, 0), (61, 190, True, 200, 37),
     (96, 200, True, 0, 50), (257, 300, True, 40, 0), (1, 1, True, 0, 5)],
)  # fmt: skip
def test_mma_tiles_cover_every_visible_pair_and_unmask_only_visible_ones(
    sq, sk, causal, q_start, kv_start
):
    _, rows, _ = cuda_block.KERNELS["mma"]
    grid, threads = cuda_block.launch_grid("mma", 2, 3, sq)
    assert grid == (-(-sq // rows), 3, 2) and threads == 128
    qpos = torch.arange(q_start, q_start + sq)
    kpos = torch.arange(kv_start, kv_start + sk)
    visible = qpos[:, None] >= kpos[None, :] if causal else torch.ones(sq, sk, dtype=torch.bool)
    seen = torch.zeros(sq, sk, dtype=torch.int64)
    for blk in range(grid[0]):
        rs = slice(blk * rows, min(sq, (blk + 1) * rows))
        for t0, masked in cuda_block.mma_tiles(blk, sq, sk, causal, q_start, kv_start, False):
            ks = slice(t0, min(sk, t0 + 64))
            seen[rs, ks] += 1
            if not masked:  # no per-element mask: the whole 64 x 64 tile must be visible
                assert t0 + 64 <= sk and rs.stop - rs.start == rows
                assert visible[rs, ks].all()
    assert (seen <= 1).all() and (seen[visible] == 1).all()


@pytest.mark.parametrize(
    "sq, sk, causal, q_start, kv_start, segments",
    [(64, 64, True, 0, 0, False), (130, 77, False, 0, 0, False), (61, 190, True, 200, 37, False),
     (96, 200, True, 0, 50, False), (257, 300, True, 40, 0, False), (1, 1, True, 0, 5, False),
     (150, 77, True, 0, 100, False), (200, 200, True, 0, 0, True), (33, 257, True, 1000, 0, False),
     (1000, 1000, True, 0, 0, False), (300, 1000, True, 700, 0, False)],
)  # fmt: skip
def test_mma2_warp_tiles_cover_every_visible_pair_and_unmask_only_visible_ones(
    sq, sk, causal, q_start, kv_start, segments
):
    """Per warp (16 rows): every visible (row, key) pair lies in exactly one tile the
    warp computes; a tile without per-element masks is whole and visible for all 16 rows
    (rows past Sq are never stored, so they need no mask)."""
    _, rows, _ = cuda_block.KERNELS["mma2"]
    grid, threads = cuda_block.launch_grid("mma2", 1, 1, sq)
    assert rows == 16 * (threads // 32)
    qpos = torch.arange(q_start, q_start + sq + rows)  # + rows: the last block's padding rows
    kpos = torch.arange(kv_start, kv_start + sk)
    visible = qpos[:, None] >= kpos[None, :] if causal else torch.ones(len(qpos), sk).bool()
    seen = torch.zeros(len(qpos), sk, dtype=torch.int64)
    for blk in range(grid[0]):
        for warp in range(threads // 32):
            r = slice(blk * rows + 16 * warp, blk * rows + 16 * warp + 16)
            for t0, masked in cuda_block.mma2_tiles(
                blk, warp, sq, sk, causal, q_start, kv_start, segments
            ):
                ks = slice(t0, min(sk, t0 + 64))
                seen[r, ks] += 1
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
