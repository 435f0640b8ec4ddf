// Block attention for ring attention: one query block against one key/value
// block, returning the exact partial (out, lse) in fp32 so blocks can be merged
// (python/qdelta/ring/merge.py). Online softmax over key tiles held in shared
// memory; no tensor-core intrinsics (the build has no <mma.h>).
//
// Layout: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] contiguous, fp16 (DT = 0) or
// bf16 (DT = 1) passed as their 16-bit patterns;
// out [B, Hq, Sq, D] fp32, lse [B, Hq, Sq] fp32 (natural log). GQA: query head
// h reads kv head h / (Hq / Hkv). Query i may see key j when
// (!causal || q_start + i >= kv_start + j) and (no segment ids ||
// q_seg[i] == kv_seg[j]); segment ids are int32 [Bs, S] with Bs = 1 or B.
// A row that sees no key gets out = 0 and lse = -inf.
//
// Threads: 4 per query row (each owns D/4 consecutive dims), 32 rows per
// 128-thread block; grid (ceil(Sq / 32), Hq, B).
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
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
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
