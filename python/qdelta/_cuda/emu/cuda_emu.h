// cuda_emu.h: a CPU emulator for the CUDA subset used by qdelta/_cuda/*.cu, so the real
// kernel sources run (and are tested) on machines without a GPU.
//
// Execution model (docs/CUDA.md, "Running the kernels without a GPU"):
// * The blocks of a grid run one after another on the calling OS thread; the
//   threads of a block are cooperative fibers (ucontext), switched only at
//   barriers and warp collectives. Runs are deterministic.
// * The run order (Order): at every scheduling round the runnable fibers of a
//   block are resumed in thread order (Forward, the default), in reverse thread
//   order (Reverse) or in a pseudo-random order drawn per round from a seed
//   (Shuffle), lanes of a warp included. A kernel whose results differ between
//   orders has a race inside a barrier interval (tests/test_cuda_emulated_races.py).
// * threadIdx / blockIdx / blockDim / gridDim are globals the scheduler sets on
//   every switch into a fiber.
// * __syncthreads() is a block barrier, the warp intrinsics (shuffles, votes,
//   __syncwarp, mma) are barriers over the lanes of the mask that have not
//   exited; threads that returned no longer count toward any barrier.
// * A block in which every live thread waits and no barrier can complete (a
//   deadlock), threads waiting at __syncthreads on different source lines
//   (divergent barriers), mismatched warp collectives or mma with exited lanes
//   stop the launch with an error naming the kernel and the block.
// * __shared__ variables are function statics (blocks run one at a time on one
//   OS thread); dynamic shared memory (`extern __shared__ T x[];`) is rewritten
//   by python/qdelta/kernels/emulator.py into a pointer to a per-launch buffer
//   filled with 0xFF bytes (NaN as fp32 / fp16) at every block start.
// Not modelled: timing, memory-model races between threads of a block (a thread
// runs until its next barrier; only races whose values depend on the run order
// show up, by comparing orders). Out-of-bounds accesses are caught only when the
// module is built with AddressSanitizer (QDELTA_EMU_SANITIZE=address): then every
// switch between stacks is announced to it and the bytes around dynamic shared
// memory are poisoned.
//
// The kernel sources include no headers; their inline-PTX helpers have a
// `#ifdef QDELTA_EMULATE` branch calling the equivalents below.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define QD_EMU_ASAN 1
#endif

// ---------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time on one OS thread, so a function static is exactly
// one block's shared memory.
#define __shared__ static
#define __constant__ static

// ---------------------------------------------------------------------------
// Vector types (CUDA's sizes and alignments)
// ---------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(8) int2 {
    int x, y;
};
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 layout");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// Set by the scheduler on every switch into a fiber. External linkage (C++17
// inline variables), so the compiler reloads them after the context switch.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Bit-exact conversions (round to nearest even; NaN becomes the canonical NaN
// 0x7FFF, as the GPU's cvt.rn does)
// ---------------------------------------------------------------------------
namespace qd_emu {

inline uint32_t f2u(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float u2f(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    const uint32_t x = f2u(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;               // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
    const uint32_t e = ax >> 23;
    if (e < 113) {  // below 2^-14: a half subnormal (or zero)
        const uint32_t m = (ax & 0x7fffffu) | (e ? 0x800000u : 0u);
        const uint32_t s = 126 - e;  // value = m * 2^(e-150) = (m >> s) * 2^-24
        if (s > 31 || e == 0) return (uint16_t)sign;
        const uint32_t q = m >> s;
        const uint32_t rem = m & ((1u << s) - 1u);
        const uint32_t half = 1u << (s - 1);
        const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
        return (uint16_t)(sign | r);
    }
    const uint32_t mant = ax & 0x7fffffu;
    uint32_t h = ((e - 112) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return (uint16_t)(sign | h);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0) {
        // zero or subnormal: m * 2^-24, exact in fp32
        const float v = (float)m * 5.9604644775390625e-08f;
        return u2f(f2u(v) | sign);
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16(float f) {
    const uint32_t x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

// Packed pairs: `lo` goes to the low 16 bits (cvt.rn.f16x2.f32 d, hi, lo).
inline uint32_t f32x2_to_f16x2(float lo, float hi) {
    return (uint32_t)f32_to_f16(lo) | ((uint32_t)f32_to_f16(hi) << 16);
}
inline uint32_t f32x2_to_bf16x2(float lo, float hi) {
    return (uint32_t)f32_to_bf16(lo) | ((uint32_t)f32_to_bf16(hi) << 16);
}

}  // namespace qd_emu

// ---------------------------------------------------------------------------
// Intrinsics and math
// ---------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
// CUDA __funnelshift_r: the low 32 bits of {hi:lo} >> (shift & 31).
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    const uint64_t v = ((uint64_t)hi << 32) | lo;
    return (unsigned int)(v >> (shift & 31u));
}
// PTX prmt.b32 (default mode): result byte i is byte (s_i & 7) of {y:x}
// (x = bytes 0-3, y = bytes 4-7); with bit 3 of s_i set, that byte's sign bit
// replicated over the byte.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned int sel = (s >> (4 * i)) & 0xfu;
        unsigned int b = (unsigned int)(v >> (8 * (sel & 7u))) & 0xffu;
        if (sel & 8u) b = (b & 0x80u) ? 0xffu : 0u;
        r |= b << (8 * i);
    }
    return r;
}
inline float __uint_as_float(unsigned int u) { return qd_emu::u2f(u); }
inline unsigned int __float_as_uint(float f) { return qd_emu::f2u(f); }
inline float __int_as_float(int i) { return qd_emu::u2f((uint32_t)i); }
inline int __float_as_int(float f) { return (int)qd_emu::f2u(f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// One OS thread runs every fiber and fibers switch only at barriers: a plain
// read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
    const T old = *p;
    if (v > old) *p = v;
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    const T old = *p;
    if (v < old) *p = v;
    return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
    const T old = *p;
    *p = v;
    return old;
}

// CUDA's min / max overloads for the integer mixes (a mix with unsigned is
// unsigned, with long long is long long), and floats.
#define QD_EMU_MINMAX(RT, A, B)                                          \
    inline RT min(A a, B b) { return (RT)a < (RT)b ? (RT)a : (RT)b; }    \
    inline RT max(A a, B b) { return (RT)a > (RT)b ? (RT)a : (RT)b; }
QD_EMU_MINMAX(int, int, int)
QD_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
QD_EMU_MINMAX(unsigned int, int, unsigned int)
QD_EMU_MINMAX(unsigned int, unsigned int, int)
QD_EMU_MINMAX(long long, long long, long long)
QD_EMU_MINMAX(long long, long long, int)
QD_EMU_MINMAX(long long, int, long long)
QD_EMU_MINMAX(long long, long long, unsigned int)
QD_EMU_MINMAX(long long, unsigned int, long long)
QD_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
QD_EMU_MINMAX(unsigned long long, unsigned long long, long long)
QD_EMU_MINMAX(unsigned long long, long long, unsigned long long)
QD_EMU_MINMAX(unsigned long long, unsigned long long, int)
QD_EMU_MINMAX(unsigned long long, int, unsigned long long)
QD_EMU_MINMAX(unsigned long long, unsigned long long, unsigned int)
QD_EMU_MINMAX(unsigned long long, unsigned int, unsigned long long)
#undef QD_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------
namespace qd_emu {

enum class State : uint8_t { Run, Block, Warp, Done };
enum class Op : uint8_t { None, Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, Mma, Ldmatrix };

inline const char* op_name(Op op) {
    switch (op) {
        case Op::Shfl: return "__shfl_sync";
        case Op::ShflUp: return "__shfl_up_sync";
        case Op::ShflDown: return "__shfl_down_sync";
        case Op::ShflXor: return "__shfl_xor_sync";
        case Op::Ballot: return "__ballot_sync";
        case Op::Any: return "__any_sync";
        case Op::All: return "__all_sync";
        case Op::SyncWarp: return "__syncwarp";
        case Op::Mma: return "mma.m16n8k16";
        case Op::Ldmatrix: return "ldmatrix.m8n8.x4";
        default: return "?";
    }
}

struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    void* fake_stack = nullptr;  // ASan's state of this fiber's stack while it is switched out
    State state = State::Done;
    int line = 0;  // __syncthreads source line
    // warp collective: what this lane deposited, and its result
    Op op = Op::None;
    uint32_t mask = 0;
    uint64_t value = 0;
    int param = 0;
    int width = 32;
    uint64_t result = 0;
    uint32_t mma_a[4] = {0, 0, 0, 0};
    uint32_t mma_b[2] = {0, 0};
    float* mma_d = nullptr;
    bool mma_bf16 = false;
    const void* ld_addr = nullptr;  // ldmatrix: this lane's row address
    uint32_t* ld_out = nullptr;     // ... and its four result registers
    bool ld_trans = false;
};

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;  // overflowing a fiber stack faults instead of corrupting
constexpr size_t kCanaryBytes = 256;  // checked after every block: writes past dynamic shared memory
constexpr unsigned char kCanaryByte = 0xA5;

// The order in which a scheduling round resumes the runnable fibers of a block.
enum class Order : int { Forward = 0, Reverse = 1, Shuffle = 2 };

// splitmix64: the Shuffle order's generator (one stream per block, seeded per launch).
inline uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// AddressSanitizer's view of the stacks: every swapcontext between the scheduler
// and a fiber is announced (start before, finish after), else ASan checks a
// fiber's accesses against the wrong stack. No-ops in a plain build.
inline void asan_leave(void** fake_stack, const void* bottom, size_t size) {
#ifdef QD_EMU_ASAN
    __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
    (void)fake_stack, (void)bottom, (void)size;
#endif
}
inline void asan_arrive(void* fake_stack, const void** old_bottom, size_t* old_size) {
#ifdef QD_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
    (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}
// Bytes no kernel may touch (around dynamic shared memory): an access is an ASan report.
inline void asan_poison(const void* p, size_t n, bool poisoned) {
#ifdef QD_EMU_ASAN
    if (poisoned) __asan_poison_memory_region(p, n);
    else __asan_unpoison_memory_region(p, n);
#else
    (void)p, (void)n, (void)poisoned;
#endif
}

struct Scheduler {
    std::vector<Fiber> fibers;
    Order order = Order::Forward;
    uint64_t seed = 0;
    std::vector<int> perm;  // this round's order (Reverse, Shuffle)
    ucontext_t main_ctx;
    void* main_fake_stack = nullptr;  // ASan's state of the scheduler's stack while a fiber runs
    const void* main_bottom = nullptr;  // the scheduler's stack, as ASan reported it
    size_t main_size = 0;
    int current = -1;
    int nthreads = 0;
    uint3 block{0, 0, 0};
    dim3 bdim, gdim;
    void (*invoke)(void*) = nullptr;
    void* call = nullptr;
    std::string error;
    const char* kernel_name = "";
    std::vector<unsigned char> dyn_smem;  // 16-byte aligned start below, then a canary
    size_t dyn_bytes = 0;                 // the launch's dynamic shared memory
    unsigned char* dyn_base = nullptr;
};

inline Scheduler& sched() {
    static Scheduler s;
    return s;
}
inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

inline void* dyn_smem() { return sched().dyn_base; }
// Bytes of dynamic shared memory this launch has (PTX %dynamic_smem_size).
inline unsigned int dyn_smem_bytes() {
    const Scheduler& s = sched();
    return (unsigned int)s.dyn_bytes;
}

// cp.async: an immediate copy of src_bytes, zeros up to cp_bytes.
inline void cp_async(void* dst, const void* src, int cp_bytes, int src_bytes) {
    unsigned char* d = static_cast<unsigned char*>(dst);
    const unsigned char* p = static_cast<const unsigned char*>(src);
    for (int i = 0; i < cp_bytes; ++i) d[i] = i < src_bytes ? p[i] : 0;
}

inline std::string block_str(const Scheduler& s) {
    char b[96];
    std::snprintf(b, sizeof b, "block (%u, %u, %u)", s.block.x, s.block.y, s.block.z);
    return b;
}

inline void set_indices(int tid) {
    Scheduler& s = sched();
    threadIdx.x = tid % s.bdim.x;
    threadIdx.y = (tid / s.bdim.x) % s.bdim.y;
    threadIdx.z = tid / (s.bdim.x * s.bdim.y);
    blockIdx = s.block;
    blockDim = s.bdim;
    gridDim = s.gdim;
}

// Back to the scheduler from the running fiber.
__attribute__((noinline)) inline void yield_to_scheduler() {
    Scheduler& s = sched();
    Fiber& f = s.fibers[s.current];
    asm volatile("" ::: "memory");
    asan_leave(&f.fake_stack, s.main_bottom, s.main_size);
    swapcontext(&f.ctx, &s.main_ctx);
    asan_arrive(f.fake_stack, &s.main_bottom, &s.main_size);
    asm volatile("" ::: "memory");
    set_indices(s.current);  // (the scheduler set them already; cheap, and robust)
}

inline void fail_in_fiber(const std::string& msg) {
    Scheduler& s = sched();
    if (s.error.empty()) s.error = msg;
    s.fibers[s.current].state = State::Done;
    for (;;) yield_to_scheduler();  // never resumed: the launch stops
}

// A check in a kernel's QDELTA_EMULATE branch failed: stop the launch with `what`.
inline void kernel_error(const std::string& what) {
    Scheduler& s = sched();
    fail_in_fiber(std::string(s.kernel_name) + " " + block_str(s) + ": " + what);
}

inline void fiber_entry() {
    Scheduler& s = sched();
    asan_arrive(nullptr, &s.main_bottom, &s.main_size);
    s.invoke(s.call);
    s.fibers[s.current].state = State::Done;
    asan_leave(nullptr, s.main_bottom, s.main_size);  // this stack is done with
    swapcontext(&s.fibers[s.current].ctx, &s.main_ctx);
    std::abort();  // a finished fiber is never resumed
}

inline void syncthreads_at(int line) {
    Scheduler& s = sched();
    Fiber& f = s.fibers[s.current];
    f.state = State::Block;
    f.line = line;
    yield_to_scheduler();
}

inline uint64_t warp_op(Op op, uint32_t mask, uint64_t value, int param, int width) {
    Scheduler& s = sched();
    Fiber& f = s.fibers[s.current];
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail_in_fiber(std::string(op_name(op)) + " in " + s.kernel_name + " " + block_str(s) +
                      ": width " + std::to_string(width) + " is not a power of two in 1..32");
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.param = param;
    f.width = width;
    f.state = State::Warp;
    yield_to_scheduler();
    return f.result;
}

// The mma m16n8k16 .row.col collective; d is this lane's C in, D out.
inline void mma_m16n8k16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                         uint32_t b1, bool bf16) {
    Scheduler& s = sched();
    Fiber& f = s.fibers[s.current];
    f.mma_a[0] = a0;
    f.mma_a[1] = a1;
    f.mma_a[2] = a2;
    f.mma_a[3] = a3;
    f.mma_b[0] = b0;
    f.mma_b[1] = b1;
    f.mma_d = d;
    f.mma_bf16 = bf16;
    warp_op(Op::Mma, 0xffffffffu, 0, 0, 32);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the
// row addresses (16 bytes each, 16-byte aligned) of 8x8 matrix j; r[j] of lane
// (g = lane / 4, t = lane % 4) is (row g, cols 2t, 2t+1) of matrix j, or with
// .trans (row 2t, col g), (row 2t+1, col g); the lower index in the low half.
inline void ldmatrix_x4(uint32_t* r, const void* row_addr, bool trans) {
    Scheduler& s = sched();
    Fiber& f = s.fibers[s.current];
    f.ld_addr = row_addr;
    f.ld_out = r;
    f.ld_trans = trans;
    warp_op(Op::Ldmatrix, 0xffffffffu, 0, 0, 32);
}

inline std::string complete_ldmatrix(Fiber* lanes) {
    for (int lane = 0; lane < 32; ++lane) {
        if (lanes[lane].ld_trans != lanes[0].ld_trans) return ": ldmatrix lanes disagree on .trans";
        if (reinterpret_cast<uintptr_t>(lanes[lane].ld_addr) % 16 != 0) {
            char b[96];
            std::snprintf(b, sizeof b, ": ldmatrix row address of lane %d is not 16-byte aligned", lane);
            return b;
        }
    }
    uint32_t res[32][4];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int j = 0; j < 4; ++j) {
            uint16_t lo, hi;
            if (lanes[0].ld_trans) {
                lo = static_cast<const uint16_t*>(lanes[8 * j + 2 * t].ld_addr)[g];
                hi = static_cast<const uint16_t*>(lanes[8 * j + 2 * t + 1].ld_addr)[g];
            } else {
                const uint16_t* row = static_cast<const uint16_t*>(lanes[8 * j + g].ld_addr);
                lo = row[2 * t];
                hi = row[2 * t + 1];
            }
            res[lane][j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
    for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j) lanes[lane].ld_out[j] = res[lane][j];
    return "";
}

inline float half_bits(uint32_t v, bool bf16) {
    const uint16_t h = (uint16_t)(v & 0xffffu);
    return bf16 ? bf16_to_f32(h) : f16_to_f32(h);
}

inline void complete_mma(Fiber* lanes) {
    // A[16][16], B[16][8] (k, n), C[16][8] from the PTX ISA fragment layouts.
    double A[16][16], B[16][8], C[16][8];
    const bool bf16 = lanes[0].mma_bf16;
    for (int lane = 0; lane < 32; ++lane) {
        const Fiber& f = lanes[lane];
        const int g = lane / 4, t = lane % 4;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = half_bits(f.mma_a[0] >> (16 * h), bf16);
            A[g + 8][2 * t + h] = half_bits(f.mma_a[1] >> (16 * h), bf16);
            A[g][2 * t + 8 + h] = half_bits(f.mma_a[2] >> (16 * h), bf16);
            A[g + 8][2 * t + 8 + h] = half_bits(f.mma_a[3] >> (16 * h), bf16);
            B[2 * t + h][g] = half_bits(f.mma_b[0] >> (16 * h), bf16);
            B[2 * t + 8 + h][g] = half_bits(f.mma_b[1] >> (16 * h), bf16);
        }
        C[g][2 * t] = f.mma_d[0];
        C[g][2 * t + 1] = f.mma_d[1];
        C[g + 8][2 * t] = f.mma_d[2];
        C[g + 8][2 * t + 1] = f.mma_d[3];
    }
    // Products of 16-bit floats are exact in double; the sum is rounded once to fp32.
    float D[16][8];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
            D[i][j] = (float)acc;
        }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        float* d = lanes[lane].mma_d;
        d[0] = D[g][2 * t];
        d[1] = D[g][2 * t + 1];
        d[2] = D[g + 8][2 * t];
        d[3] = D[g + 8][2 * t + 1];
    }
}

// Try to complete a warp collective in warp w. Returns true when lanes were
// released; sets s.error on a mismatch.
inline bool try_complete_warp(Scheduler& s, int w) {
    const int first = w * 32;
    const int nl = std::min(32, s.nthreads - first);
    Fiber* lanes = &s.fibers[first];
    uint32_t live = 0, waiting = 0;
    for (int l = 0; l < nl; ++l) {
        if (lanes[l].state != State::Done) live |= 1u << l;
        if (lanes[l].state == State::Warp) waiting |= 1u << l;
    }
    // Each waiting lane's group is its mask over the live lanes; a group completes
    // once every lane in it waits at a warp collective.
    bool released = false;
    uint32_t pending = waiting;
    while (pending) {
        const int lead = __builtin_ctz(pending);
        const uint32_t group = lanes[lead].mask & live;
        pending &= ~(group | (1u << lead));
        if (!(group >> lead & 1u)) {
            s.error = std::string(op_name(lanes[lead].op)) + " in " + s.kernel_name + " " + block_str(s) +
                      ": the calling lane is not in its own mask";
            return false;
        }
        if ((group & waiting) != group) continue;
        const Op op = lanes[lead].op;
        for (int l = 0; l < nl; ++l) {
            if (!(group >> l & 1u)) continue;
            if (lanes[l].op != op || lanes[l].mask != lanes[lead].mask) {
                char b[256];
                std::snprintf(b, sizeof b, "warp %d lanes %d and %d meet at different collectives (%s mask %08x, %s mask %08x)",
                              w, lead, l, op_name(op), lanes[lead].mask, op_name(lanes[l].op), lanes[l].mask);
                s.error = std::string(s.kernel_name) + " " + block_str(s) + ": " + b;
                return false;
            }
        }
        if (op == Op::Mma) {
            if (group != 0xffffffffu) {
                char b[160];
                std::snprintf(b, sizeof b, ": mma.m16n8k16 needs all 32 lanes of warp %d, live lanes %08x", w, group);
                s.error = std::string(s.kernel_name) + " " + block_str(s) + b;
                return false;
            }
            complete_mma(lanes);
        } else if (op == Op::Ldmatrix) {
            if (group != 0xffffffffu) {
                char b[160];
                std::snprintf(b, sizeof b, ": ldmatrix needs all 32 lanes of warp %d, live lanes %08x", w, group);
                s.error = std::string(s.kernel_name) + " " + block_str(s) + b;
                return false;
            }
            const std::string bad = complete_ldmatrix(lanes);
            if (!bad.empty()) {
                s.error = std::string(s.kernel_name) + " " + block_str(s) + bad;
                return false;
            }
        } else if (op == Op::Ballot || op == Op::Any || op == Op::All || op == Op::SyncWarp) {
            uint32_t votes = 0;
            for (int l = 0; l < nl; ++l)
                if ((group >> l & 1u) && lanes[l].value) votes |= 1u << l;
            for (int l = 0; l < nl; ++l) {
                if (!(group >> l & 1u)) continue;
                if (op == Op::Ballot) lanes[l].result = votes;
                else if (op == Op::Any) lanes[l].result = votes != 0;
                else if (op == Op::All) lanes[l].result = votes == group;
            }
        } else {
            uint64_t res[32];
            for (int l = 0; l < nl; ++l) {
                if (!(group >> l & 1u)) continue;
                const Fiber& f = lanes[l];
                const int width = f.width;
                const int seg = l & ~(width - 1);
                int src = l;
                switch (op) {
                    case Op::Shfl: src = seg + (f.param & (width - 1)); break;
                    case Op::ShflUp: src = (l - f.param >= seg) ? l - f.param : l; break;
                    case Op::ShflDown: src = (l + f.param < seg + width) ? l + f.param : l; break;
                    case Op::ShflXor: src = ((l ^ f.param) < seg + width) ? (l ^ f.param) : l; break;
                    default: break;
                }
                // Reading a lane outside the group is undefined on the GPU: give the own value.
                res[l] = (src < nl && (group >> src & 1u)) ? lanes[src].value : f.value;
            }
            for (int l = 0; l < nl; ++l)
                if (group >> l & 1u) lanes[l].result = res[l];
        }
        for (int l = 0; l < nl; ++l)
            if (group >> l & 1u) lanes[l].state = State::Run;
        waiting &= ~group;
        released = true;
    }
    return released;
}

// What the live threads of the block wait on, e.g. " 16 threads wait at __syncthreads (line 12);".
inline std::string waiting_summary(const Scheduler& s) {
    std::string r;
    int done = 0;
    std::vector<std::pair<int, int>> lines;  // (line, count)
    int warp_counts[16] = {0};
    for (int i = 0; i < s.nthreads; ++i) {
        const Fiber& f = s.fibers[i];
        if (f.state == State::Done) {
            ++done;
        } else if (f.state == State::Block) {
            bool found = false;
            for (auto& p : lines)
                if (p.first == f.line) {
                    ++p.second;
                    found = true;
                }
            if (!found) lines.push_back({f.line, 1});
        } else if (f.state == State::Warp) {
            ++warp_counts[(int)f.op];
        }
    }
    char b[128];
    for (auto& p : lines) {
        std::snprintf(b, sizeof b, " %d threads wait at __syncthreads (line %d);", p.second, p.first);
        r += b;
    }
    for (int i = 0; i < 16; ++i)
        if (warp_counts[i]) {
            std::snprintf(b, sizeof b, " %d threads wait at %s;", warp_counts[i], op_name((Op)i));
            r += b;
        }
    std::snprintf(b, sizeof b, " %d threads have exited", done);
    return r + b;
}

inline std::string deadlock_report(const Scheduler& s) {
    return std::string(s.kernel_name) + " " + block_str(s) + ": deadlock, no barrier can complete;" +
           waiting_summary(s);
}

// Run one block to completion (or to an error).
inline bool run_block(Scheduler& s) {
    for (int i = 0; i < s.nthreads; ++i) {
        Fiber& f = s.fibers[i];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack + kGuardBytes;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_entry, 0);
        f.state = State::Run;
        f.op = Op::None;
    }
    if (s.dyn_bytes) {
        std::memset(s.dyn_base, 0xff, s.dyn_bytes);
        asan_poison(s.dyn_base + s.dyn_bytes, kCanaryBytes, false);
        std::memset(s.dyn_base + s.dyn_bytes, kCanaryByte, kCanaryBytes);
        asan_poison(s.dyn_base + s.dyn_bytes, kCanaryBytes, true);  // a kernel's access is a report
    }
    int live = s.nthreads;
    const int nwarps = (s.nthreads + 31) / 32;
    // Reverse and Shuffle resume the fibers through s.perm; Forward is thread order.
    uint64_t rng = s.seed ^ (0x632be59bd9b4e019ull * (1 + s.block.x + (uint64_t)s.gdim.x *
                                                          (s.block.y + (uint64_t)s.gdim.y * s.block.z)));
    s.perm.resize(s.nthreads);
    for (int i = 0; i < s.nthreads; ++i) s.perm[i] = s.order == Order::Reverse ? s.nthreads - 1 - i : i;
    while (live > 0) {
        bool progress = false;
        if (s.order == Order::Shuffle)
            for (int i = s.nthreads - 1; i > 0; --i)  // Fisher-Yates over the previous order
                std::swap(s.perm[i], s.perm[(int)(splitmix64(rng) % (uint64_t)(i + 1))]);
        for (int j = 0; j < s.nthreads; ++j) {
            const int i = s.order == Order::Forward ? j : s.perm[j];
            Fiber& f = s.fibers[i];
            if (f.state != State::Run) continue;
            s.current = i;
            set_indices(i);
            asan_leave(&s.main_fake_stack, f.stack + kGuardBytes, kStackBytes);
            swapcontext(&s.main_ctx, &f.ctx);
            {
                const void* bottom;
                size_t size;
                asan_arrive(s.main_fake_stack, &bottom, &size);
            }
            s.current = -1;
            progress = true;
            if (!s.error.empty()) return false;
            if (f.state == State::Done) --live;
            if (f.state == State::Warp || f.state == State::Done) {
                try_complete_warp(s, i / 32);
                if (!s.error.empty()) return false;
            }
        }
        if (live == 0) break;
        // Block barrier: every live thread waits at __syncthreads.
        int at_block = 0;
        int line = -1;
        bool same_line = true;
        for (int i = 0; i < s.nthreads; ++i)
            if (const Fiber& f = s.fibers[i]; f.state == State::Block) {
                ++at_block;
                if (line < 0) line = f.line;
                else if (f.line != line) same_line = false;
            }
        if (at_block == live) {
            if (!same_line) {
                s.error = std::string(s.kernel_name) + " " + block_str(s) +
                          ": divergent __syncthreads, the threads wait at different barriers;" +
                          waiting_summary(s);
                return false;
            }
            for (int i = 0; i < s.nthreads; ++i)
                if (s.fibers[i].state == State::Block) s.fibers[i].state = State::Run;
            continue;
        }
        if (!progress) {
            bool any = false;
            for (int w = 0; w < nwarps; ++w) {
                any = try_complete_warp(s, w) || any;
                if (!s.error.empty()) return false;
            }
            if (!any) {
                s.error = deadlock_report(s);
                return false;
            }
        }
    }
    // A write just past the end of dynamic shared memory (on a GPU: another block's
    // memory, or a fault) lands in the canary (under ASan, one within its 8-byte
    // granule of the end; any other is reported at once).
    if (s.dyn_bytes) asan_poison(s.dyn_base + s.dyn_bytes, kCanaryBytes, false);
    for (size_t i = 0; i < (s.dyn_bytes ? kCanaryBytes : 0); ++i)
        if (s.dyn_base[s.dyn_bytes + i] != kCanaryByte) {
            s.error = std::string(s.kernel_name) + " " + block_str(s) + ": wrote byte " +
                      std::to_string(s.dyn_bytes + i) + " of " + std::to_string(s.dyn_bytes) +
                      " bytes of dynamic shared memory (past its end)";
            return false;
        }
    return true;
}

inline int run_grid(const char* name, dim3 grid, dim3 block, size_t shared_mem, void (*invoke)(void*), void* call,
                    char* err, size_t errlen, int order = 0, uint64_t seed = 0) {
    std::lock_guard<std::mutex> guard(launch_mutex());
    Scheduler& s = sched();
    auto fail = [&](const std::string& msg) {
        if (err && errlen) std::snprintf(err, errlen, "%s", msg.c_str());
        return 1;
    };
    if (order < 0 || order > 2) return fail(std::string(name) + ": run order " + std::to_string(order) +
                                            " (expected 0 forward, 1 reverse, 2 shuffle)");
    s.order = (Order)order;
    s.seed = seed;
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64)
        return fail(std::string(name) + ": block of " + std::to_string(nthreads) + " threads (expected 1..1024)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        return fail(std::string(name) + ": grid outside what CUDA can launch");
    if (shared_mem > 227 * 1024)
        return fail(std::string(name) + ": " + std::to_string(shared_mem) +
                    " bytes of dynamic shared memory (at most 227 KB per block)");
    if (s.fibers.size() < nthreads) {
        const size_t old = s.fibers.size();
        s.fibers.resize(nthreads);
        for (size_t i = old; i < nthreads; ++i) {
            void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return fail("emulator: cannot allocate fiber stacks");
            mprotect(p, kGuardBytes, PROT_NONE);  // the stack grows down into the guard page
            s.fibers[i].stack = static_cast<char*>(p);
        }
    }
    // (Vector growth moved no contexts: fibers are re-made at every block start.)
    s.nthreads = (int)nthreads;
    s.bdim = block;
    s.gdim = grid;
    s.invoke = invoke;
    s.call = call;
    s.error.clear();
    s.kernel_name = name;
    s.dyn_bytes = shared_mem;
    asan_poison(s.dyn_smem.data(), s.dyn_smem.size(), false);
    s.dyn_smem.assign(shared_mem ? shared_mem + 16 + kCanaryBytes : 0, 0xff);
    if (shared_mem) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(s.dyn_smem.data());
        s.dyn_base = reinterpret_cast<unsigned char*>((a + 15) & ~uintptr_t(15));
        asan_poison(s.dyn_smem.data(), s.dyn_base - s.dyn_smem.data(), true);  // the alignment slack
    } else {
        s.dyn_base = nullptr;
    }
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                s.block = uint3{x, y, z};
                if (!run_block(s)) {
                    std::string msg = s.error;
                    s.error.clear();
                    return fail(msg);
                }
            }
    return 0;
}

template <class... A>
struct Call {
    void (*kernel)(A...);
    std::tuple<A...> args;
    static void invoke(void* p) {
        Call* c = static_cast<Call*>(p);
        std::apply(c->kernel, c->args);
    }
};

template <size_t I, class... A>
inline bool unpack(std::tuple<A...>& t, void** args, const size_t* sizes, char* err, size_t errlen, const char* name) {
    if constexpr (I == sizeof...(A)) {
        return true;
    } else {
        using T = std::tuple_element_t<I, std::tuple<A...>>;
        static_assert(std::is_trivially_copyable_v<T>, "kernel arguments are copied bytewise");
        if (sizes[I] != sizeof(T)) {
            std::snprintf(err, errlen, "%s: argument %zu: expected %zu bytes, found %zu", name, I, sizeof(T), sizes[I]);
            return false;
        }
        std::memcpy(&std::get<I>(t), args[I], sizeof(T));
        return unpack<I + 1, A...>(t, args, sizes, err, errlen, name);
    }
}

// Launch `kernel` over `grid` x `block` with the argument bytes args[i] (sizes[i]
// each, checked against the kernel's parameter types). 0 or non-zero with err set.
// `order` is an Order (0 forward, 1 reverse, 2 shuffle with `seed`).
template <class... A>
inline int launch(void (*kernel)(A...), const char* name, dim3 grid, dim3 block, size_t shared_mem, void** args,
                  const size_t* sizes, int nargs, char* err, size_t errlen, int order = 0, uint64_t seed = 0) {
    if (nargs != (int)sizeof...(A)) {
        std::snprintf(err, errlen, "%s: expected %zu arguments, found %d", name, sizeof...(A), nargs);
        return 1;
    }
    Call<A...> call{kernel, {}};
    if (!unpack<0, A...>(call.args, args, sizes, err, errlen, name)) return 1;
    return run_grid(name, grid, block, shared_mem, &Call<A...>::invoke, &call, err, errlen, order, seed);
}

// The signature the brief documents (kernel name unknown: "kernel").
template <class... A>
inline int launch(void (*kernel)(A...), dim3 grid, dim3 block, size_t shared_mem, void** args, const size_t* sizes,
                  int nargs, char* err, size_t errlen) {
    return launch(kernel, "kernel", grid, block, shared_mem, args, sizes, nargs, err, errlen);
}

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

}  // namespace qd_emu

// ---------------------------------------------------------------------------
// Barriers and warp collectives
// ---------------------------------------------------------------------------
#define __syncthreads() ::qd_emu::syncthreads_at(__LINE__)

template <class T>
inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
    return qd_emu::from_bits<T>(qd_emu::warp_op(qd_emu::Op::Shfl, mask, qd_emu::to_bits(v), src, width));
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return qd_emu::from_bits<T>(qd_emu::warp_op(qd_emu::Op::ShflUp, mask, qd_emu::to_bits(v), (int)delta, width));
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return qd_emu::from_bits<T>(qd_emu::warp_op(qd_emu::Op::ShflDown, mask, qd_emu::to_bits(v), (int)delta, width));
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    return qd_emu::from_bits<T>(qd_emu::warp_op(qd_emu::Op::ShflXor, mask, qd_emu::to_bits(v), lane_mask, width));
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
    return (unsigned int)qd_emu::warp_op(qd_emu::Op::Ballot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned int mask, int pred) {
    return (int)qd_emu::warp_op(qd_emu::Op::Any, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned int mask, int pred) {
    return (int)qd_emu::warp_op(qd_emu::Op::All, mask, pred != 0, 0, 32);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) { qd_emu::warp_op(qd_emu::Op::SyncWarp, mask, 0, 0, 32); }
