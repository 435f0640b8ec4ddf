// Block attention for ring attention: one query block against one key/value
// block, returning the exact partial (out, lse) in fp32 so blocks can be merged
// (python/qdelta/ring/merge.py). Online softmax over key tiles held in shared
// memory. Two kernels: attention_block (below, CUDA cores only) and
// attention_block_mma (further down: tensor cores through inline-PTX
// mma.sync, sm_80+). Neither uses <mma.h> or the WMMA API: no headers are
// included (see below).
//
// Layout: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] contiguous, fp16 (DT = 0) or
// bf16 (DT = 1) passed as their 16-bit patterns;
// out [B, Hq, Sq, D] fp32, lse [B, Hq, Sq] fp32 (natural log). GQA: query head
// h reads kv head h / (Hq / Hkv). Query i may see key j when
// (!causal || q_start + i >= kv_start + j) and (no segment ids ||
// q_seg[i] == kv_seg[j]); segment ids are int32 [Bs, S] with Bs = 1 or B.
// A row that sees no key gets out = 0 and lse = -inf.
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
    long long q_start, long long kv_start) {
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

  for (int t0 = 0; t0 < sk; t0 += kTileKeys) {
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
        if (kv_seg_b && kj < sk) ok = ok && kv_seg_b[kj] == my_seg;
        s[j] = ok ? dot : neg_inf();
        sub_max = fmaxf(sub_max, s[j]);
      }
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
// loop; masks are applied per element only on tiles that need them.
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

}  // namespace

template <int DT, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) attention_block_mma(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse,
    const int* __restrict__ q_seg, const int* __restrict__ kv_seg, int seg_batched,
    int hq, int hkv, int sq, int sk, float scale, int causal,
    long long q_start, long long kv_start) {
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

  const long long last_q = q_start + min(sq, block_row0 + kMmaRows) - 1;
  const long long first_q = q_start + block_row0;

  for (int t0 = 0; t0 < sk; t0 += kMmaKeys) {
    if (causal && kv_start + t0 > last_q) break;  // this and later tiles: all masked
    const bool need_mask = (t0 + kMmaKeys > sk) || kv_seg_b != nullptr ||
                           (causal && kv_start + t0 + kMmaKeys - 1 > first_q) ||
                           block_row0 + kMmaRows > sq;

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

    // Scale, mask, and the new row maxima.
    float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * qscale;
        if (need_mask) {
          const int jl = n * 8 + 2 * t + (e & 1);
          const int kj = t0 + jl;
          const bool row1 = e >= 2;
          bool ok = kj < sk && (row1 ? v1 : v0);
          if (causal) ok = ok && (row1 ? pos1 : pos0) >= kv_start + kj;
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

  // Row sums over the quad, then normalise and store.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
  const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const long long row_base = (long long)(b * hq + h) * sq;
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) {
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
