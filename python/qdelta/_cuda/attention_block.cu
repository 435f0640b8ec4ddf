// Block attention for ring attention: one query block against one key/value
// block, returning the exact partial (out, lse) in fp32 so blocks can be merged
// (python/qdelta/ring/merge.py). Online softmax over key tiles held in shared
// memory. Three kernels: attention_block (below, CUDA cores only),
// attention_block_mma (further down: tensor cores through inline-PTX
// mma.sync, sm_80+) and attention_block_mma2 (last: the same with cp.async
// double buffering and ldmatrix fragment loads; the default). None uses
// <mma.h> or the WMMA API: no headers are included (see below).
//
// Layout: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] contiguous, fp16 (DT = 0) or
// bf16 (DT = 1) passed as their 16-bit patterns;
// out [B, Hq, Sq, D] fp32, lse [B, Hq, Sq] fp32 (natural log). GQA: query head
// h reads kv head h / (Hq / Hkv). Query i may see key j when
// (!causal || q_start + i >= kv_start + j) and (window == 0 ||
// (q_start + i) - (kv_start + j) < window: a sliding window, also without
// causal) and (no segment ids || q_seg[i] == kv_seg[j]); segment ids are int32
// [Bs, S] with Bs = 1 or B. softcap > 0 turns each scaled score s into
// softcap * tanh(s / softcap) before masking and softmax (0: no capping).
// A row that sees no key gets out = 0 and lse = -inf.
// Key tiles wholly before the window of a block's first row are never loaded
// (work follows the window, not Sk); tiles the window cuts take the masked path.
//
// attention_block threads: 4 per query row (each owns D/4 consecutive dims),
// 32 rows per 128-thread block; grid (ceil(Sq / 32), Hq, B). (The mma
// kernel's launch shape is described at its definition.)
//
// No headers are included (conversions are a bit shift and one PTX cvt), so
// the file compiles the same under cupy and under plain NVRTC.
//
// qdelta-instantiate: attention_block<0, 64>
// qdelta-instantiate: attention_block<0, 128>
// qdelta-instantiate: attention_block<1, 64>
// qdelta-instantiate: attention_block<1, 128>

namespace {

constexpr int kThreadsPerRow = 4;
constexpr int kRows = 32;
constexpr int kThreads = kRows * kThreadsPerRow;
constexpr int kTileKeys = 64;
constexpr int kSubKeys = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
typedef unsigned short u16;

// Logit soft-capping of x = s * log2e (log2 units): c * tanh(s / c) * log2e, with
// c2 = c * log2e, inv_c = 1 / c2 (so x * inv_c = s / c). tanhf, not tanh.approx:
// the latter's 2^-11 relative error is 0.02 on a capped score of 50.
__device__ __forceinline__ float cap_log2(float x, float c2, float inv_c) {
  return c2 * tanhf(x * inv_c);
}

// The first key tile (index, a multiple of tile) a query block whose first row is
// at position first_q may see through the window: keys before
// first_q - window + 1 are hidden from all its rows. sk when none is visible.
__device__ __forceinline__ int window_first_tile(long long first_q, long long kv_start,
                                                 long long window, int sk, int tile) {
  if (window <= 0) return 0;
  const long long lo = first_q - window + 1 - kv_start;  // first key index row 0 sees
  if (lo <= 0) return 0;
  return lo >= sk ? sk : (int)(lo / tile) * tile;
}

// 16-bit pattern -> fp32: DT 0 = IEEE half, DT 1 = bfloat16.
template <int DT>
__device__ __forceinline__ float to_float(u16 x) {
  if (DT == 1) return __int_as_float(((unsigned int)x) << 16);
#ifdef QDELTA_EMULATE
  return qd_emu::f16_to_f32(x);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
#endif
}

}  // namespace

template <int DT, int D>
__global__ void __launch_bounds__(kThreads) attention_block(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse,
    const int* __restrict__ q_seg, const int* __restrict__ kv_seg, int seg_batched,
    int hq, int hkv, int sq, int sk, float scale, int causal,
    long long q_start, long long kv_start, long long window, float softcap) {
  static_assert(D % (2 * kThreadsPerRow) == 0, "head dim must split into half pairs");
  constexpr int kPart = D / kThreadsPerRow;  // dims owned by one thread

  __shared__ u16 k_tile[kTileKeys][D];
  __shared__ u16 v_tile[kTileKeys][D];

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int h_kv = h / (hq / hkv);
  const int tid = threadIdx.x;
  const int row = tid / kThreadsPerRow;
  const int part = tid % kThreadsPerRow;
  const int qi = blockIdx.x * kRows + row;
  const bool valid = qi < sq;

  const u16* q_row = q + ((long long)(b * hq + h) * sq + (valid ? qi : 0)) * D + part * kPart;
  const u16* k_head = k + (long long)(b * hkv + h_kv) * sk * D;
  const u16* v_head = v + (long long)(b * hkv + h_kv) * sk * D;
  const int* q_seg_b = q_seg ? q_seg + (seg_batched ? (long long)b * sq : 0) : nullptr;
  const int* kv_seg_b = kv_seg ? kv_seg + (seg_batched ? (long long)b * sk : 0) : nullptr;

  // Scores in log2 units: exp2(s * log2e) == exp(s).
  float qf[kPart];
  float acc[kPart];
  const float qscale = scale * kLog2e;
#pragma unroll
  for (int i = 0; i < kPart; ++i) {
    qf[i] = valid ? to_float<DT>(q_row[i]) * qscale : 0.f;
    acc[i] = 0.f;
  }
  const long long q_pos = q_start + qi;
  const int my_seg = (valid && q_seg_b) ? q_seg_b[qi] : 0;
  float m = neg_inf();
  float l = 0.f;

  // Last query position in this block: key tiles beyond it are masked for all rows.
  const long long last_q = q_start + min(sq, (int)(blockIdx.x + 1) * kRows) - 1;
  const float c2 = softcap * kLog2e;
  const float inv_c = softcap > 0.f ? 1.f / c2 : 0.f;

  const int t_begin =
      window_first_tile(q_start + (long long)blockIdx.x * kRows, kv_start, window, sk, kTileKeys);
  for (int t0 = t_begin; t0 < sk; t0 += kTileKeys) {
    if (causal && kv_start + t0 > last_q) break;
    for (int idx = tid; idx < kTileKeys * D; idx += kThreads) {
      const int j = idx / D;
      const int d = idx % D;
      const bool in = t0 + j < sk;
      k_tile[j][d] = in ? k_head[(long long)(t0 + j) * D + d] : (u16)0;
      v_tile[j][d] = in ? v_head[(long long)(t0 + j) * D + d] : (u16)0;
    }
    __syncthreads();

    // Sub-tiles of kSubKeys keys keep the score array in registers (fully
    // unrolled) without unrolling the whole tile.
#pragma unroll 1
    for (int j0 = 0; j0 < kTileKeys; j0 += kSubKeys) {
      float s[kSubKeys];
      float sub_max = neg_inf();
#pragma unroll
      for (int j = 0; j < kSubKeys; ++j) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kPart; ++i) dot += qf[i] * to_float<DT>(k_tile[j0 + j][part * kPart + i]);
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        const int kj = t0 + j0 + j;
        bool ok = valid && kj < sk;
        if (causal) ok = ok && q_pos >= kv_start + kj;
        if (window > 0) ok = ok && q_pos - (kv_start + kj) < window;
        if (kv_seg_b && kj < sk) ok = ok && kv_seg_b[kj] == my_seg;
        s[j] = ok ? dot : neg_inf();
      }
      // Soft-capping in one uniform branch; masked scores stay -inf.
      if (softcap > 0.f) {
#pragma unroll
        for (int j = 0; j < kSubKeys; ++j) {
          s[j] = s[j] == neg_inf() ? s[j] : cap_log2(s[j], c2, inv_c);
        }
      }
#pragma unroll
      for (int j = 0; j < kSubKeys; ++j) sub_max = fmaxf(sub_max, s[j]);
      const float m_new = fmaxf(m, sub_max);
      if (m_new != neg_inf()) {
        const float corr = exp2f(m - m_new);  // m == -inf gives 0
        l *= corr;
#pragma unroll
        for (int i = 0; i < kPart; ++i) acc[i] *= corr;
#pragma unroll
        for (int j = 0; j < kSubKeys; ++j) {
          const float p = exp2f(s[j] - m_new);
          l += p;
#pragma unroll
          for (int i = 0; i < kPart; ++i) acc[i] += p * to_float<DT>(v_tile[j0 + j][part * kPart + i]);
        }
        m = m_new;
      }
    }
    __syncthreads();
  }

  if (!valid) return;
  const long long o = ((long long)(b * hq + h) * sq + qi);
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < kPart; ++i) out[o * D + part * kPart + i] = acc[i] * inv;
  if (part == 0) lse[o] = l > 0.f ? (m + log2f(l)) * kLn2 : neg_inf();
}

// ---------------------------------------------------------------------------
// attention_block_mma: the same contract on tensor cores (FlashAttention-2
// style). 4 warps per block, each owning 16 query rows (64 rows per block);
// K/V tiles of 64 keys staged through shared memory (rows padded by 8
// halves so fragment reads hit distinct banks); S = Q K^T and O += P V by
// mma.sync.m16n8k16 (fp32 accumulate) in inline PTX; online softmax in fp32
// registers (log2 units). Tiles fully masked by the causal offsets end the
// loop, tiles wholly before the window of the block's first row are not
// visited; masks are applied per element only on tiles that need them.
// Fragment layouts (PTX ISA, m16n8k16): g = lane / 4, t = lane % 4;
// A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// B: b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g);
// C: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1).
// Needs sm_80+. Grid (ceil(Sq / 64), Hq, B), 128 threads; q/k/v 16-byte aligned.
//
// qdelta-instantiate: attention_block_mma<0, 64>
// qdelta-instantiate: attention_block_mma<0, 128>
// qdelta-instantiate: attention_block_mma<1, 64>
// qdelta-instantiate: attention_block_mma<1, 128>

namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 16 * kMmaWarps;
constexpr int kMmaKeys = 64;
constexpr int kPad = 8;

struct alignas(16) U128 {
  unsigned int x, y, z, w;
};

// Two fp32 -> packed 16-bit pair, lo in the low half (the lower index).
template <int DT>
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
#ifdef QDELTA_EMULATE
  return DT == 1 ? qd_emu::f32x2_to_bf16x2(lo, hi) : qd_emu::f32x2_to_f16x2(lo, hi);
#else
  unsigned int r;
  if (DT == 1) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
#endif
}

template <int DT>
__device__ __forceinline__ void mma16816(float* c, unsigned int a0, unsigned int a1,
                                         unsigned int a2, unsigned int a3, unsigned int b0,
                                         unsigned int b1) {
#ifdef QDELTA_EMULATE
  qd_emu::mma_m16n8k16(c, a0, a1, a2, a3, b0, b1, DT == 1);
#else
  if (DT == 1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ unsigned int pair_u16(u16 lo, u16 hi) {
  return (unsigned int)lo | ((unsigned int)hi << 16);
}

// Epilogue of the tensor-core kernels: row sums over the quad (the 4 lanes that
// share rows r0 and r1), then out = o / l and lse = (m + log2 l) ln 2, or 0 and
// -inf for a row that saw no key. o holds the C fragments of D / 8 n-tiles.
template <int D>
__device__ __forceinline__ void store_rows(float* __restrict__ out, float* __restrict__ lse,
                                           const float (&o)[D / 8][4], float l0, float l1,
                                           float m0, float m1, long long row_base, int r0,
                                           int r1, bool v0, bool v1, int t) {
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
  const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int c = i * 8 + 2 * t;
    if (v0) {
      *reinterpret_cast<float2*>(out + (row_base + r0) * D + c) =
          make_float2(o[i][0] * inv0, o[i][1] * inv0);
    }
    if (v1) {
      *reinterpret_cast<float2*>(out + (row_base + r1) * D + c) =
          make_float2(o[i][2] * inv1, o[i][3] * inv1);
    }
  }
  if (t == 0) {
    if (v0) lse[row_base + r0] = l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : neg_inf();
    if (v1) lse[row_base + r1] = l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : neg_inf();
  }
}

}  // namespace

template <int DT, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) attention_block_mma(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse,
    const int* __restrict__ q_seg, const int* __restrict__ kv_seg, int seg_batched,
    int hq, int hkv, int sq, int sk, float scale, int causal,
    long long q_start, long long kv_start, long long window, float softcap) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  constexpr int kStride = D + kPad;      // u16 per shared row
  constexpr int kKSteps = D / 16;        // k-steps of S = Q K^T
  constexpr int kOTiles = D / 8;         // n-tiles of O
  constexpr int kSTiles = kMmaKeys / 8;  // n-tiles of S
  constexpr int kVec = 8;                // u16 per 16-byte load

  __shared__ __align__(16) u16 k_s[kMmaKeys * kStride];
  __shared__ __align__(16) u16 v_s[kMmaKeys * kStride];
  __shared__ int seg_s[kMmaKeys];

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int h_kv = h / (hq / hkv);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int block_row0 = blockIdx.x * kMmaRows;
  const int r0 = block_row0 + warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  const int r1 = r0 + 8;
  const bool v0 = r0 < sq;
  const bool v1 = r1 < sq;

  const u16* q_head = q + (long long)(b * hq + h) * sq * D;
  const u16* k_head = k + (long long)(b * hkv + h_kv) * sk * D;
  const u16* v_head = v + (long long)(b * hkv + h_kv) * sk * D;
  const int* q_seg_b = q_seg ? q_seg + (seg_batched ? (long long)b * sq : 0) : nullptr;
  const int* kv_seg_b = kv_seg ? kv_seg + (seg_batched ? (long long)b * sk : 0) : nullptr;
  const int seg0 = (q_seg_b && v0) ? q_seg_b[r0] : 0;
  const int seg1 = (q_seg_b && v1) ? q_seg_b[r1] : 0;
  const long long pos0 = q_start + r0;
  const long long pos1 = q_start + r1;

  // Q fragments for all k-steps, straight from global memory (zero past Sq).
  unsigned int qa[kKSteps][4];
  {
    const unsigned int* q0 = reinterpret_cast<const unsigned int*>(q_head + (long long)r0 * D);
    const unsigned int* q1 = reinterpret_cast<const unsigned int*>(q_head + (long long)r1 * D);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int w = (ks * 16 + 2 * t) / 2;
      qa[ks][0] = v0 ? q0[w] : 0u;
      qa[ks][1] = v1 ? q1[w] : 0u;
      qa[ks][2] = v0 ? q0[w + 4] : 0u;
      qa[ks][3] = v1 ? q1[w + 4] : 0u;
    }
  }

  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = neg_inf(), m1 = neg_inf();  // running row max (log2 units), quad-uniform
  float l0 = 0.f, l1 = 0.f;              // this thread's share of the row sums
  const float qscale = scale * kLog2e;

  const float c2 = softcap * kLog2e;
  const float inv_c = softcap > 0.f ? 1.f / c2 : 0.f;
  const float sscale = softcap > 0.f ? 1.f : qscale;  // capped scores are scaled already

  const long long last_q = q_start + min(sq, block_row0 + kMmaRows) - 1;
  const long long first_q = q_start + block_row0;

  for (int t0 = window_first_tile(first_q, kv_start, window, sk, kMmaKeys); t0 < sk;
       t0 += kMmaKeys) {
    if (causal && kv_start + t0 > last_q) break;  // this and later tiles: all masked
    // Unmasked needs every row to see every key: for the window, the last row the first key.
    const bool need_mask = (t0 + kMmaKeys > sk) || kv_seg_b != nullptr ||
                           (causal && kv_start + t0 + kMmaKeys - 1 > first_q) ||
                           block_row0 + kMmaRows > sq ||
                           (window > 0 && last_q - (kv_start + t0) >= window);

    // Stage K and V (zeros past Sk so P * V never meets garbage).
    for (int idx = tid; idx < kMmaKeys * (D / kVec); idx += kMmaWarps * 32) {
      const int j = idx / (D / kVec);
      const int c = (idx % (D / kVec)) * kVec;
      U128 kv = {0u, 0u, 0u, 0u};
      U128 vv = {0u, 0u, 0u, 0u};
      if (t0 + j < sk) {
        kv = *reinterpret_cast<const U128*>(k_head + (long long)(t0 + j) * D + c);
        vv = *reinterpret_cast<const U128*>(v_head + (long long)(t0 + j) * D + c);
      }
      *reinterpret_cast<U128*>(&k_s[j * kStride + c]) = kv;
      *reinterpret_cast<U128*>(&v_s[j * kStride + c]) = vv;
    }
    if (kv_seg_b && tid < kMmaKeys) seg_s[tid] = (t0 + tid < sk) ? kv_seg_b[t0 + tid] : 0;
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[kSTiles][4];
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const u16* krow = &k_s[(n * 8 + g) * kStride + 2 * t];
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const unsigned int b0 = *reinterpret_cast<const unsigned int*>(krow + ks * 16);
        const unsigned int b1 = *reinterpret_cast<const unsigned int*>(krow + ks * 16 + 8);
        mma16816<DT>(s[n], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], b0, b1);
      }
    }

    // Soft-capping in one uniform branch (then the scores are scaled already).
    if (softcap > 0.f) {
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = cap_log2(s[n][e] * qscale, c2, inv_c);
      }
    }

    // Scale, mask, and the new row maxima.
    float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * sscale;
        if (need_mask) {
          const int jl = n * 8 + 2 * t + (e & 1);
          const int kj = t0 + jl;
          const bool row1 = e >= 2;
          bool ok = kj < sk && (row1 ? v1 : v0);
          if (causal) ok = ok && (row1 ? pos1 : pos0) >= kv_start + kj;
          if (window > 0) ok = ok && (row1 ? pos1 : pos0) - (kv_start + kj) < window;
          if (kv_seg_b) ok = ok && seg_s[jl] == (row1 ? seg1 : seg0);
          if (!ok) x = neg_inf();
        }
        s[n][e] = x;
        if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0);
    const float mn1 = fmaxf(m1, mx1);
    // A row that has seen only masked keys keeps max -inf: subtract 0 instead.
    const float base0 = mn0 == neg_inf() ? 0.f : mn0;
    const float base1 = mn1 == neg_inf() ? 0.f : mn1;
    const float corr0 = exp2f(m0 - base0);  // m == -inf gives 0
    const float corr1 = exp2f(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    l0 *= corr0;
    l1 *= corr1;
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) {
      o[i][0] *= corr0;
      o[i][1] *= corr0;
      o[i][2] *= corr1;
      o[i][3] *= corr1;
    }

    // P = exp2(S - max) and O += P V, 16 keys (one k-step) at a time.
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      float* sa = s[2 * kk];
      float* sb = s[2 * kk + 1];
      const float p00 = exp2f(sa[0] - base0), p01 = exp2f(sa[1] - base0);
      const float p02 = exp2f(sa[2] - base1), p03 = exp2f(sa[3] - base1);
      const float p10 = exp2f(sb[0] - base0), p11 = exp2f(sb[1] - base0);
      const float p12 = exp2f(sb[2] - base1), p13 = exp2f(sb[3] - base1);
      l0 += p00 + p01 + p10 + p11;
      l1 += p02 + p03 + p12 + p13;
      const unsigned int a0 = pack2<DT>(p00, p01);
      const unsigned int a1 = pack2<DT>(p02, p03);
      const unsigned int a2 = pack2<DT>(p10, p11);
      const unsigned int a3 = pack2<DT>(p12, p13);
      const u16* vk0 = &v_s[(kk * 16 + 2 * t) * kStride + g];
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) {
        const u16* vp = vk0 + i * 8;
        const unsigned int b0 = pair_u16(vp[0], vp[kStride]);
        const unsigned int b1 = pair_u16(vp[8 * kStride], vp[9 * kStride]);
        mma16816<DT>(o[i], a0, a1, a2, a3, b0, b1);
      }
    }
    __syncthreads();
  }

  store_rows<D>(out, lse, o, l0, l1, m0, m1, (long long)(b * hq + h) * sq, r0, r0 + 8, v0, v1, t);
}

// ---------------------------------------------------------------------------
// attention_block_mma2: the same contract, FlashAttention-2 style with the
// shared-memory traffic of attention_block_mma cut down:
// * K and V tiles (64 keys, rows padded by 8 halves) are double buffered in
//   dynamic shared memory and staged by cp.async (16 bytes per copy, zero-fill
//   past Sk): tile t + 1 is in flight while tile t computes; one __syncthreads
//   per tile (wait for tile t, then reuse the other buffer for tile t + 1).
// * B fragments by ldmatrix.x4: S = Q K^T takes b0, b1 of two k-steps from one
//   ldmatrix (K rows as stored), O += P V takes those of two n-tiles from one
//   ldmatrix.trans (V is [key][dim] in shared memory, B wants [dim][key]).
// * Scores stay raw (no per-element multiply): the row max is scaled once and
//   P = exp2(s * scale * log2e - max) is one fma and one ex2.approx.ftz.
//   A negative scale is folded into Q's signs and a zero scale into Q = 0
//   (the host refuses NaN and infinite scales), so the scale used is positive
//   and raw maxima scale to scaled maxima.
// * Per-warp tile decisions: a warp skips a tile whose keys are all past the
//   causal diagonal for its 16 rows (and warps with no row inside Sq skip all
//   tiles), and applies per-element masks only when some of its own 16 rows
//   need them (ragged Sk end, segment ids, causal diagonal). Rows past Sq are
//   not masked: Q is zero there and those rows are never stored.
// * Sliding window: the block loads no tile wholly before the window of its
//   first row; a warp skips tiles before its first row's window and masks
//   (a compare per element, like the diagonal) those its last row's window cuts.
// * Soft-capping (softcap > 0): raw scores become capped log2-unit scores in
//   place (one tanhf each), then the loop runs with scale 1.
// * Causal launches visit query blocks last to first (the blocks with the
//   most key tiles start first).
// Shape: 4 warps (64 query rows) per block, grid (ceil(Sq / 64), Hq, B),
// registers capped for 3 blocks per SM at D = 64 (160 used on sm_90) and 2 at
// D = 128 (219); no spills. (8 warps / 128 rows for D = 64 would need <= 128
// registers for 2 blocks per SM: ptxas spills there; 3 blocks at D = 128 spill
// 8 bytes.) Dynamic shared memory: 2 stages x (K, V) x 64 x (D + 8) halves +
// 2 x 64 int32 segment ids (37376 bytes for D = 64, 70144 for D = 128: the
// launcher opts in above 48 KB; cuda_block.shared_bytes mirrors kSmemBytes).
// Fragment layouts as for attention_block_mma. Needs sm_80+; q/k/v 16-byte
// aligned.
//
// qdelta-instantiate: attention_block_mma2<0, 64>
// qdelta-instantiate: attention_block_mma2<0, 128>
// qdelta-instantiate: attention_block_mma2<1, 64>
// qdelta-instantiate: attention_block_mma2<1, 128>

namespace {

template <int D>
struct Mma2Shape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kKeys = 64;
  static constexpr int kStride = D + kPad;        // u16 per shared row
  static constexpr int kTile = kKeys * kStride;   // u16 per K or V tile
  static constexpr int kSmemBytes = 2 * 2 * kTile * 2 + 2 * kKeys * 4;
  // Blocks per SM the register budget is set for (ptxas: no spills).
  static constexpr int kMinBlocks = D == 64 ? 3 : 2;
};

// Shared-memory operands of ldmatrix / cp.async: a byte address in the shared
// window on the GPU, a plain pointer under the emulator.
#ifdef QDELTA_EMULATE
typedef const u16* SPtr;
__device__ __forceinline__ SPtr sptr(const u16* p) { return p; }
__device__ __forceinline__ SPtr sptr_add(SPtr p, int halves) { return p + halves; }
#else
typedef unsigned int SPtr;
__device__ __forceinline__ SPtr sptr(const u16* p) {
  unsigned int a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ SPtr sptr_add(SPtr p, int halves) { return p + 2u * halves; }
#endif

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the rows of matrix j.
__device__ __forceinline__ void ldsm_x4(unsigned int* r, SPtr row) {
#ifdef QDELTA_EMULATE
  qd_emu::ldmatrix_x4(r, row, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned int* r, SPtr row) {
#ifdef QDELTA_EMULATE
  qd_emu::ldmatrix_x4(r, row, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#endif
}

// Asynchronous global -> shared copies; bytes past src_bytes are zero-filled.
__device__ __forceinline__ void cp_async16(SPtr dst, const void* src, int src_bytes) {
#ifdef QDELTA_EMULATE
  qd_emu::cp_async(const_cast<u16*>(dst), src, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async4(SPtr dst, const void* src, int src_bytes) {
#ifdef QDELTA_EMULATE
  qd_emu::cp_async(const_cast<u16*>(dst), src, 4, src_bytes);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef QDELTA_EMULATE
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#ifndef QDELTA_EMULATE
  asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// 2^x, denormal results flushed to zero (one MUFU.EX2); 2^-inf = 0.
__device__ __forceinline__ float ex2(float x) {
#ifdef QDELTA_EMULATE
  const float r = exp2f(x);
  return r < 1.17549435e-38f ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

}  // namespace

template <int DT, int D>
__global__ void __launch_bounds__(Mma2Shape<D>::kThreads, Mma2Shape<D>::kMinBlocks)
    attention_block_mma2(const u16* __restrict__ q, const u16* __restrict__ k,
                         const u16* __restrict__ v, float* __restrict__ out,
                         float* __restrict__ lse, const int* __restrict__ q_seg,
                         const int* __restrict__ kv_seg, int seg_batched, int hq, int hkv,
                         int sq, int sk, float scale, int causal, long long q_start,
                         long long kv_start, long long window, float softcap) {
  typedef Mma2Shape<D> Shape;
  static_assert(D % 32 == 0, "head dim must be a multiple of 32 (k-step pairs, n-tile pairs)");
  constexpr int kThreads = Shape::kThreads;
  constexpr int kRows = Shape::kRows;
  constexpr int kKeys = Shape::kKeys;
  constexpr int kStride = Shape::kStride;
  constexpr int kTile = Shape::kTile;
  constexpr int kKSteps = D / 16;     // k-steps of S = Q K^T
  constexpr int kOTiles = D / 8;      // n-tiles of O
  constexpr int kSTiles = kKeys / 8;  // n-tiles of S
  constexpr int kChunks = D / 8;      // 16-byte chunks per K/V row
  constexpr int kCopies = kKeys * kChunks / kThreads;  // per thread, per tile, for K and for V
  static_assert(kKeys * kChunks % kThreads == 0 && kKeys <= kThreads, "tile copy split");

  // [stage][K, V][key][kStride] halves, then [stage][key] segment ids.
  extern __shared__ __align__(16) u16 smem_mma2[];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

#ifdef QDELTA_EMULATE
  if (qd_emu::dyn_smem_bytes() < (unsigned int)Shape::kSmemBytes) {
    qd_emu::kernel_error("expected " + std::to_string(Shape::kSmemBytes) +
                         " bytes of dynamic shared memory, found " +
                         std::to_string(qd_emu::dyn_smem_bytes()));
  }
#endif

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int h_kv = h / (hq / hkv);
  // Causal: the last query block (the most key tiles) is launched first.
  const int qblock = causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
  const int block_row0 = qblock * kRows;
  const int warp_row0 = block_row0 + warp * 16;
  const int r0 = warp_row0 + g;  // this thread's rows: r0 and r0 + 8
  const int r1 = r0 + 8;
  const bool v0 = r0 < sq;
  const bool v1 = r1 < sq;

  const u16* q_head = q + (long long)(b * hq + h) * sq * D;
  const u16* k_head = k + (long long)(b * hkv + h_kv) * sk * D;
  const u16* v_head = v + (long long)(b * hkv + h_kv) * sk * D;
  const int* q_seg_b = q_seg ? q_seg + (seg_batched ? (long long)b * sq : 0) : nullptr;
  const int* kv_seg_b = kv_seg ? kv_seg + (seg_batched ? (long long)b * sk : 0) : nullptr;
  const int seg0 = (q_seg_b && v0) ? q_seg_b[r0] : 0;
  const int seg1 = (q_seg_b && v1) ? q_seg_b[r1] : 0;
  // Causal in int offsets: key j is visible to row r when j - r <= diag, with
  // diag = q_start - kv_start clamped to [-(rows + 1), sk] (the same answers for
  // every j < sk and r < the block's end, which is what the loop asks).
  const int diag = (int)max((long long)-(block_row0 + kRows + 1),
                            min(q_start - kv_start, (long long)sk));
  const int lim0 = diag + r0;  // row r0 sees keys j <= lim0, row r1 keys j <= lim0 + 8
  // Window in int offsets: key j is visible to row r when j >= wlo + r, with
  // wlo = q_start - kv_start - window + 1 clamped to [-(rows), sk] (same answers
  // for j < sk and r < the block's end); no window: -(rows), every key visible.
  const int wlo = (int)max((long long)-(block_row0 + kRows),
                           window > 0 ? min(q_start - kv_start - window + 1, (long long)sk)
                                      : (long long)-(block_row0 + kRows));

  // The scale the loop uses is positive: a negative one flips Q's signs
  // (exact), a zero one zeroes Q (every score 0, as s * 0 would give). The host
  // refuses NaN and infinite scales (qdelta.ring.block.check_inputs).
  float qscale = scale * kLog2e;
  unsigned int qxor = 0u, qand = 0xffffffffu;
  if (qscale < 0.f) {
    qscale = -qscale;
    qxor = 0x80008000u;
  } else if (!(qscale > 0.f)) {
    qscale = 1.f;
    qand = 0u;
  }
  // Soft-capping turns the raw scores into capped log2 units in place, so the
  // loop's scale (sscale) becomes 1; kcap * raw = scaled score / softcap.
  const float c2 = softcap * kLog2e;
  const float kcap = softcap > 0.f ? qscale / c2 : 0.f;
  const float sscale = softcap > 0.f ? 1.f : qscale;

  // Q fragments for all k-steps, straight from global memory (zero past Sq).
  unsigned int qa[kKSteps][4];
  {
    const unsigned int* q0 = reinterpret_cast<const unsigned int*>(q_head + (long long)r0 * D);
    const unsigned int* q1 = reinterpret_cast<const unsigned int*>(q_head + (long long)r1 * D);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int w = (ks * 16 + 2 * t) / 2;
      qa[ks][0] = v0 ? (q0[w] ^ qxor) & qand : 0u;
      qa[ks][1] = v1 ? (q1[w] ^ qxor) & qand : 0u;
      qa[ks][2] = v0 ? (q0[w + 4] ^ qxor) & qand : 0u;
      qa[ks][3] = v1 ? (q1[w + 4] ^ qxor) & qand : 0u;
    }
  }

  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = neg_inf(), m1 = neg_inf();  // running row max (scaled, log2 units), quad-uniform
  float l0 = 0.f, l1 = 0.f;              // this thread's share of the row sums

  // Key tiles the block visits: all of them, or up to the causal diagonal of
  // its last row. A warp computes a tile unless its own rows see none of it.
  // (Offsets from diag: the last key the block's last row sees, the last key the
  // warp's last row sees, the last key the warp's first row sees.)
  int n_tiles = (sk + kKeys - 1) / kKeys;
  if (causal) {
    const int reach = diag + min(sq, block_row0 + kRows) - 1;
    n_tiles = reach < 0 ? 0 : min(n_tiles, reach / kKeys + 1);
  }
  const bool warp_has_rows = warp_row0 < sq;
  const int warp_reach = causal ? diag + min(sq, warp_row0 + 16) - 1 : sk;
  const int warp_full = causal ? diag + warp_row0 : sk;
  // Window: tiles before the first key of the block's first row are not loaded;
  // a warp skips tiles before its first row's first key and masks those before
  // its last row's (all 16 rows: the padding rows past Sq too, as for causal).
  const int block_lo = wlo + block_row0;
  const int first_it = block_lo <= 0 ? 0 : block_lo >= sk ? n_tiles : block_lo / kKeys;
  const int warp_lo = wlo + warp_row0;
  const int warp_lo_all = warp_lo + 15;

  const SPtr smem0 = sptr(smem_mma2);
  const SPtr seg_base = sptr_add(smem0, 4 * kTile);
  const int* seg_s0 = reinterpret_cast<const int*>(smem_mma2 + 4 * kTile);

  // Stage tile `it` into buffer it % 2 (one commit group). Copy c of a thread:
  // key row copy_row + c * kCopyRows of the tile, halves copy_col.. + 7.
  constexpr int kCopyRows = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0, "whole rows per copy round");
  const int copy_row = tid / kChunks;
  const int copy_col = (tid % kChunks) * 8;
  const u16* k_src = k_head + copy_row * D + copy_col;
  const u16* v_src = v_head + copy_row * D + copy_col;
  const int copy_dst = copy_row * kStride + copy_col;
  auto load_tile = [&](int it) {
    const int t0 = it * kKeys;
    const SPtr ks = sptr_add(smem0, (it & 1) * 2 * kTile + copy_dst);
    const long long off = (long long)t0 * D;
#pragma unroll
    for (int c = 0; c < kCopies; ++c) {
      const bool in = t0 + copy_row + c * kCopyRows < sk;
      const int rel = c * kCopyRows * D;
      // Past Sk nothing is read (src-size 0: zero-fill), as CUTLASS's zfill copies.
      cp_async16(sptr_add(ks, c * kCopyRows * kStride), k_src + off + rel, in ? 16 : 0);
      cp_async16(sptr_add(ks, kTile + c * kCopyRows * kStride), v_src + off + rel, in ? 16 : 0);
    }
    if (kv_seg_b && tid < kKeys) {
      const bool in = t0 + tid < sk;
      cp_async4(sptr_add(seg_base, 2 * ((it & 1) * kKeys + tid)), kv_seg_b + (in ? t0 + tid : 0),
                in ? 4 : 0);
    }
    cp_async_commit();
  };

  // Per-lane ldmatrix row offsets (halves). K, matrix j = lane / 8: keys
  // 8(n + j / 2) + lane % 8, dims 16ks + 8(j % 2) (b0, b1 of n-tiles n, n + 1). V, matrix j:
  // keys 16kk + 8(j % 2) + lane % 8, dims 8(i + j / 2) (b0, b1 of n-tiles i, i + 1).
  const int k_lane = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  const int v_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;

  if (first_it < n_tiles) load_tile(first_it);
  for (int it = first_it; it < n_tiles; ++it) {
    cp_async_wait_all();
    __syncthreads();  // tile it is in for every thread; every warp is done with tile it - 1
    if (it + 1 < n_tiles) load_tile(it + 1);

    const int t0 = it * kKeys;
    // The warp's rows see none of the tile: skip it.
    if (!warp_has_rows || t0 > warp_reach || min(sk, t0 + kKeys) - 1 < warp_lo) continue;
    const bool need_mask = (t0 + kKeys > sk) || kv_seg_b != nullptr ||
                           t0 + kKeys - 1 > warp_full || t0 < warp_lo_all;
    const SPtr ks = sptr_add(smem0, (it & 1) * 2 * kTile);
    const SPtr vs = sptr_add(ks, kTile);
    const SPtr k_row = sptr_add(ks, k_lane);
    const SPtr v_row = sptr_add(vs, v_lane);
    const int* seg_s = seg_s0 + (it & 1) * kKeys;

    // S = Q K^T (raw) for this warp's 16 rows and the tile's 64 keys.
    float s[kSTiles][4];
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int n = 0; n < kSTiles; n += 2) {
        unsigned int kb[4];
        ldsm_x4(kb, sptr_add(k_row, n * 8 * kStride + ks * 16));
        mma16816<DT>(s[n], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], kb[0], kb[1]);
        mma16816<DT>(s[n + 1], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], kb[2], kb[3]);
      }
    }

    // Soft-capping before the mask (a masked -inf must stay -inf).
    if (softcap > 0.f) {
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = cap_log2(s[n][e], c2, kcap);
      }
    }

    // Mask (raw -inf): element (n, e) is key t0 + 2t + 8n + (e & 1) of row
    // r0 (e < 2) or r1; it is kept when lo <= 8n + (e & 1) <= hi (the row's
    // first and last visible key, relative) and, with segment ids, the segments
    // match.
    if (need_mask) {
      const int kbase = t0 + 2 * t;
      const int hi0 = (causal ? min(sk - 1, lim0) : sk - 1) - kbase;
      const int hi1 = (causal ? min(sk - 1, lim0 + 8) : sk - 1) - kbase;
      if (window > 0) {
        const int lo0 = wlo + r0 - kbase;
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + (e & 1);
            if (c > (e < 2 ? hi0 : hi1) || c < (e < 2 ? lo0 : lo0 + 8)) s[n][e] = neg_inf();
          }
        }
      } else {
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (n * 8 + (e & 1) > (e < 2 ? hi0 : hi1)) s[n][e] = neg_inf();
          }
        }
      }
      if (kv_seg_b) {
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
          const int2 ks2 = *reinterpret_cast<const int2*>(seg_s + n * 8 + 2 * t);
          if (ks2.x != seg0) s[n][0] = neg_inf();
          if (ks2.y != seg0) s[n][1] = neg_inf();
          if (ks2.x != seg1) s[n][2] = neg_inf();
          if (ks2.y != seg1) s[n][3] = neg_inf();
        }
      }
    }
    // The new row maxima (raw).
    float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) {
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0 * sscale);  // sscale > 0: the max of the scaled scores
    const float mn1 = fmaxf(m1, mx1 * sscale);
    // A row that has seen only masked keys keeps max -inf: subtract 0 instead.
    const float base0 = mn0 == neg_inf() ? 0.f : mn0;
    const float base1 = mn1 == neg_inf() ? 0.f : mn1;
    const float corr0 = ex2(m0 - base0);  // m == -inf gives 0
    const float corr1 = ex2(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    l0 *= corr0;
    l1 *= corr1;
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) {
      o[i][0] *= corr0;
      o[i][1] *= corr0;
      o[i][2] *= corr1;
      o[i][3] *= corr1;
    }
    const float nb0 = -base0, nb1 = -base1;

    // P = exp2(s * sscale - max) and O += P V, 16 keys (one k-step) at a time.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const float* sa = s[2 * kk];
      const float* sb = s[2 * kk + 1];
      const float p00 = ex2(fmaf(sa[0], sscale, nb0)), p01 = ex2(fmaf(sa[1], sscale, nb0));
      const float p02 = ex2(fmaf(sa[2], sscale, nb1)), p03 = ex2(fmaf(sa[3], sscale, nb1));
      const float p10 = ex2(fmaf(sb[0], sscale, nb0)), p11 = ex2(fmaf(sb[1], sscale, nb0));
      const float p12 = ex2(fmaf(sb[2], sscale, nb1)), p13 = ex2(fmaf(sb[3], sscale, nb1));
      l0 += (p00 + p01) + (p10 + p11);
      l1 += (p02 + p03) + (p12 + p13);
      const unsigned int a0 = pack2<DT>(p00, p01);
      const unsigned int a1 = pack2<DT>(p02, p03);
      const unsigned int a2 = pack2<DT>(p10, p11);
      const unsigned int a3 = pack2<DT>(p12, p13);
#pragma unroll
      for (int i = 0; i < kOTiles; i += 2) {
        unsigned int vb[4];
        ldsm_x4_trans(vb, sptr_add(v_row, kk * 16 * kStride + i * 8));
        mma16816<DT>(o[i], a0, a1, a2, a3, vb[0], vb[1]);
        mma16816<DT>(o[i + 1], a0, a1, a2, a3, vb[2], vb[3]);
      }
    }
  }

  if (!warp_has_rows) return;
  int row0 = r0;
#ifndef QDELTA_EMULATE
  // Opaque to the compiler: the store addresses are computed here, not kept
  // live (in registers, or spilled) through the loop.
  asm volatile("" : "+r"(row0));
#endif
  store_rows<D>(out, lse, o, l0, l1, m0, m1, (long long)(b * hq + h) * sq, row0, row0 + 8, v0, v1,
                t);
}
