"""Launch each kernel whose time is off its target a few times, for Nsight Compute.

Run under ``ncu`` by scripts/gpu_check.sh when the GPU machine has it; alone it
just runs the launches. The shapes are the benchmark's: decode B = 16 tenants x 1
row at N = K = 4096 (the table kernel ran at 3x its memory floor; also with
narrow tiles), one row on the tensor-core kernel, prefill
M = 512 at 4096 on the fused GEMM, and the ring block kernels at S = 4096.
The profile answers what the benchmark cannot: whether a kernel waits on memory
latency, DRAM efficiency, shared memory or issue slots.

    ncu --set detailed -o prof python scripts/profile_kernels.py
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device; nothing launched")
        return 0
    from qdelta.kernels import choices
    from qdelta.kernels import cuda as cuda_backend

    n = k = 4096
    w = k // 32
    tenants = 16
    planes = torch.randint(-(2**31), 2**31 - 1, (tenants, 1, n, w), dtype=torch.int32).cuda()
    scales = torch.rand(tenants, 1, device="cuda") * 0.01
    ids = torch.arange(tenants, device="cuda")
    x = torch.randn(tenants, k, device="cuda", dtype=torch.float16)
    for _ in range(2):
        cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, check_ids=False, path="decode"
        )
    # The same decode with 256-row feature tiles (the L2-footprint question), and the
    # single-row decode on the tensor-core kernel (14 us against a 0.5 us floor).
    out = torch.empty(tenants, n, device="cuda", dtype=x.dtype)
    dt = cuda_backend.DTYPE_CODES[x.dtype]
    choices.run_choice("lut-narrow", x, planes, scales, ids, None, out, 1, False, dt)
    cuda_backend.multi_tenant_delta_matmul(
        x[:1], planes[:1], scales[:1], ids[:1], check_ids=False, path="mma"
    )
    xp = torch.randn(512, k, device="cuda", dtype=torch.float16)
    for _ in range(2):
        cuda_backend.delta_matmul(xp, planes[0], scales[0], path="gemm")
    try:
        from qdelta.ring import cuda_block

        q = torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
        for kernel in cuda_block.KERNELS:
            cuda_block.attention_block(q, q, q, 0.125, True, 0, 0, None, None, kernel=kernel)
    except Exception as exc:  # the delta kernels' profile is still worth having
        print(f"profile_kernels: ring block kernels not launched: {exc}")
    torch.cuda.synchronize()
    print("profile_kernels: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
