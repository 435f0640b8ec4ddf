// Small kernels that test the CPU emulator itself (tests/test_cuda_emulated.py).
// Compiled only by the emulator (it calls qd_emu:: helpers directly), never by NVRTC.

__global__ void warp_ops(int* out, int src, int delta, int width) {
    const int tid = threadIdx.x;
    const int n = blockDim.x;
    const int v = tid * 7 + 3;
    out[0 * n + tid] = __shfl_sync(0xffffffffu, v, src, width);
    out[1 * n + tid] = __shfl_up_sync(0xffffffffu, v, delta, width);
    out[2 * n + tid] = __shfl_down_sync(0xffffffffu, v, delta, width);
    out[3 * n + tid] = __shfl_xor_sync(0xffffffffu, v, delta, width);
    out[4 * n + tid] = (int)__ballot_sync(0xffffffffu, (v % 3) == 0);
    out[5 * n + tid] = __any_sync(0xffffffffu, tid == 5);
    out[6 * n + tid] = __all_sync(0xffffffffu, tid < 100000);
    out[7 * n + tid] = __all_sync(0xffffffffu, tid != 7);
}

// Float and 64-bit shuffles keep every bit.
__global__ void wide_shuffles(const float* f, const long long* q, float* fo, long long* qo) {
    const int tid = threadIdx.x;
    fo[tid] = __shfl_xor_sync(0xffffffffu, f[tid], 3);
    qo[tid] = __shfl_down_sync(0xffffffffu, q[tid], 1);
}

// Lanes >= live exit first; the others' collectives and barriers go on without them.
__global__ void exited_lanes(int* out, int live) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    if (lane >= live) return;
    __syncthreads();
    out[tid] = __shfl_xor_sync(0xffffffffu, tid, 1);
    out[blockDim.x + tid] = (int)__ballot_sync(0xffffffffu, 1);
}

// Partial masks: the even lanes shuffle among themselves while the odd ones vote.
__global__ void partial_masks(int* out) {
    const int lane = threadIdx.x;
    if (lane & 1) {
        out[lane] = (int)__ballot_sync(0xaaaaaaaau, lane > 16);
    } else {
        out[lane] = __shfl_sync(0x55555555u, lane * 10, 4);
    }
}

__global__ void byte_perm(const unsigned* x, const unsigned* y, const unsigned* s, unsigned* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = __byte_perm(x[i], y[i], s[i]);
}

__global__ void bit_intrinsics(const unsigned* x, int* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[4 * i + 0] = __popc(x[i]);
        out[4 * i + 1] = __ffs((int)x[i]);
        out[4 * i + 2] = __clz((int)x[i]);
        out[4 * i + 3] = (int)__brev(x[i]);
    }
}

// mode 0: f32 -> f16 bits, 1: f32 -> bf16 bits, 2: f16 bits -> f32, 3: bf16 bits -> f32,
// 4: (f32, f32) -> f16x2, 5: (f32, f32) -> bf16x2.
__global__ void convert(const unsigned* in, unsigned* out, int n, int mode) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned v = in[i];
        unsigned r = 0;
        if (mode == 0) r = qd_emu::f32_to_f16(__uint_as_float(v));
        else if (mode == 1) r = qd_emu::f32_to_bf16(__uint_as_float(v));
        else if (mode == 2) r = __float_as_uint(qd_emu::f16_to_f32((unsigned short)v));
        else if (mode == 3) r = __float_as_uint(qd_emu::bf16_to_f32((unsigned short)v));
        else if (mode == 4) r = qd_emu::f32x2_to_f16x2(__uint_as_float(v), __uint_as_float(in[n + i]));
        else r = qd_emu::f32x2_to_bf16x2(__uint_as_float(v), __uint_as_float(in[n + i]));
        out[i] = r;
    }
}

// One warp: lane l passes its A fragment a[l][0..3], B fragment b[l][0..1], C c[l][0..3].
__global__ void mma_fragments(const unsigned* a, const unsigned* b, const float* c, float* d, int bf16) {
    const int lane = threadIdx.x;
    float acc[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
    qd_emu::mma_m16n8k16(acc, a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3],
                         b[2 * lane], b[2 * lane + 1], bf16 != 0);
    for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

// Dynamic shared memory: poisoned (0xFF) at every block start, shared by the block.
__global__ void dynamic_shared(unsigned* out) {
    extern __shared__ unsigned buf[];
    const int tid = threadIdx.x;
    const int n = blockDim.x;
    const long long o = (long long)blockIdx.x * 2 * n;
    out[o + tid] = buf[tid];  // before any write: the poison
    buf[tid] = 1000u * blockIdx.x + tid;
    __syncthreads();
    out[o + n + tid] = buf[(tid + 1) % n];
}

// Static shared memory and a block barrier: a block-wide reversal.
__global__ void reverse_block(const int* in, int* out) {
    __shared__ int tile[256];
    const int tid = threadIdx.x;
    const int base = blockIdx.x * blockDim.x;
    tile[tid] = in[base + tid];
    __syncthreads();
    out[base + tid] = tile[blockDim.x - 1 - tid];
}

// Block 1 deadlocks: its odd threads wait at __syncthreads, its even threads at a
// full-warp shuffle that needs the odd lanes.
__global__ void deadlock(int* out) {
    const int tid = threadIdx.x;
    if (blockIdx.x == 1 && (tid & 1)) {
        __syncthreads();
    } else {
        out[tid] = __shfl_sync(0xffffffffu, tid, 0);
    }
}

// Two different __syncthreads: a barrier inside divergent code.
__global__ void divergent_barrier(int* out) {
    const int tid = threadIdx.x;
    if (tid < 32) {
        __syncthreads();
        out[tid] = 1;
    } else {
        __syncthreads();
        out[tid] = 2;
    }
}

__global__ void mma_with_exited_lanes(float* d) {
    if (threadIdx.x >= 16) return;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    qd_emu::mma_m16n8k16(acc, 0u, 0u, 0u, 0u, 0u, 0u, false);
    d[threadIdx.x] = acc[0];
}

__global__ void three_args(int* out, long long a, int b) { out[threadIdx.x] = (int)a + b; }

__global__ void bad_width(int* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0, 12); }

// ldmatrix.x4 (and cp.async staging): 32 rows of 8 halves are staged into shared
// memory by 16-byte cp.async copies (rows >= live_rows zero-filled); lane l gives
// the address of row rows[l] (+ misalign halves); out[4 * lane + j] = its r[j].
__global__ void ldmatrix_x4(const unsigned short* m, const int* rows, int trans, int live_rows,
                            int misalign, unsigned* out) {
    __shared__ __align__(16) unsigned short sm[32 * 8 + 8];
    const int lane = threadIdx.x;
    qd_emu::cp_async(&sm[8 * lane], m + 8 * lane, 16, lane < live_rows ? 16 : 0);
    __syncthreads();
    unsigned r[4];
    qd_emu::ldmatrix_x4(r, &sm[8 * rows[lane] + misalign], trans != 0);
    for (int j = 0; j < 4; ++j) out[4 * lane + j] = r[j];
}

// Deliberate races for the run-order check (tests/test_cuda_emulated_races.py).
// Every thread writes its id to one shared int in the same barrier interval (a
// __syncthreads, or with warp_only a __syncwarp inside one warp); thread 0 stores
// what it reads after the barrier: the last writer, which depends on the run order.
__global__ void racy_last_writer(int* out, int warp_only) {
    __shared__ int last;
    last = threadIdx.x;
    if (warp_only) __syncwarp();
    else __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = last;
}

// The same race through cp.async (performed at issue by the emulator): thread t
// reads slot t + 1 of a shared buffer that thread t + 1 fills by cp.async in the
// same barrier interval (the wait and the barrier come too late).
__global__ void racy_cp_async(const int* in, int* out) {
    __shared__ __align__(16) int buf[257];
    const int t = threadIdx.x;
    if (t == 0) buf[0] = -1;
    buf[t + 1] = -1;
    __syncthreads();
    qd_emu::cp_async(&buf[t], in + t, 4, 4);
    out[blockIdx.x * blockDim.x + t] = buf[t + 1];
    __syncthreads();
}

// Reads for the AddressSanitizer build (tests/test_cuda_emulated_asan.py): thread t
// reads element t + past of a buffer of blockDim.x elements; past = 0 stays inside,
// past = 1 reads one element past the end (global, static shared, dynamic shared).
__global__ void read_global(const float* in, float* out, int past) {
    const int t = threadIdx.x;
    out[t] = in[t + past];
}

__global__ void read_static_shared(float* out, int past) {
    __shared__ float buf[64];
    const int t = threadIdx.x;
    buf[t] = 0.5f * t;
    __syncthreads();
    out[t] = buf[t + past];
}

__global__ void read_dynamic_shared(float* out, int past) {
    extern __shared__ float dyn[];
    const int t = threadIdx.x;
    dyn[t] = 0.5f * t;
    __syncthreads();
    out[t] = dyn[t + past];
}

// A 16-byte load `offset` words into a buffer (tests/test_cuda_emulated_asan.py):
// aligned when offset % 4 == 0, else misaligned (a GPU faults on it).
__global__ void read_uint4(const unsigned* in, unsigned* out, int offset) {
    const uint4 v = *reinterpret_cast<const uint4*>(in + offset);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}
