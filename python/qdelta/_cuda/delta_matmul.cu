// Binary-delta matmul on tensor cores:  y[m, n] (+)= sum_p alpha[t, p(, n)] * x[m, :] . S[t, p, n, :]
// with t = tenant_ids[m] (-1 = no delta), S = +-1 sign planes in the project's
// bit layout (docs/FORMAT.md: packed along K, u32 LSB first, bit 1 = -1).
//
// How it works (docs/CUDA.md has the long form):
// * qd_prep_x copies x into a fragment-ordered scratch xp[split][m][chunk][16]
//   (u32 pairs): slot s of a 32-column chunk holds (x[15 - s], x[31 - s]).
//   fp32 inputs are split into three bf16 parts (hi + mid + lo == x exactly).
// * qd_delta_mm builds mma.m16n8k16 A fragments (16 output features x 16 k)
//   straight from packed words in registers: ((w << s) & 0x80008000) | ONE
//   puts bits (15 - s, 31 - s) into the sign bits of a +-1.0 half2, which
//   matches slot s of xp. +-1 times a 16-bit x is exact; accumulation is fp32;
//   alpha is applied in fp32 per plane and feature, so the only rounding is
//   the fp32 sum and the final cast.
// * A warp owns FT feature tiles x NT row tiles (8 rows each); KS warps split
//   K and reduce through shared memory. A warp loops over the distinct tenants
//   of its rows, masking the other rows' x fragments to zero.
// * Tenant ids outside [-1, T) produce NaN rows (never silent garbage).
// The "mma" kernel above is kept as a fallback path; the default paths are the
// lookup-table decode kernel (qd_delta_lut + qd_lut_finish) and, for many rows,
// the dense expansion (qd_expand) followed by cuBLAS; see the end of this file.
// No headers are included: conversions and mma are inline PTX, so the file
// compiles the same under cupy and under plain NVRTC.
//
// qdelta-instantiate: qd_prep_x<0>
// qdelta-instantiate: qd_prep_x<1>
// qdelta-instantiate: qd_prep_x<2>
// qdelta-instantiate: qd_delta_mm<0, 2, 1, 1, 1, 8>
// qdelta-instantiate: qd_delta_mm<1, 2, 1, 1, 1, 8>
// qdelta-instantiate: qd_delta_mm<2, 2, 1, 1, 1, 8>
// qdelta-instantiate: qd_delta_mm<0, 2, 4, 2, 2, 1>
// qdelta-instantiate: qd_delta_mm<1, 2, 4, 2, 2, 1>
// qdelta-instantiate: qd_delta_mm<2, 2, 4, 2, 2, 1>
// qdelta-instantiate: qd_delta_lut<0, 1, 0>
// qdelta-instantiate: qd_delta_lut<1, 1, 0>
// qdelta-instantiate: qd_delta_lut<2, 1, 0>
// qdelta-instantiate: qd_delta_lut<0, 2, 0>
// qdelta-instantiate: qd_delta_lut<1, 2, 0>
// qdelta-instantiate: qd_delta_lut<2, 2, 0>
// qdelta-instantiate: qd_delta_lut<0, 4, 0>
// qdelta-instantiate: qd_delta_lut<1, 4, 0>
// qdelta-instantiate: qd_delta_lut<2, 4, 0>
// qdelta-instantiate: qd_delta_lut<0, 1, 1>
// qdelta-instantiate: qd_delta_lut<1, 1, 1>
// qdelta-instantiate: qd_delta_lut<2, 1, 1>
// qdelta-instantiate: qd_delta_lut<0, 2, 1>
// qdelta-instantiate: qd_delta_lut<1, 2, 1>
// qdelta-instantiate: qd_delta_lut<2, 2, 1>
// qdelta-instantiate: qd_delta_lut<0, 4, 1>
// qdelta-instantiate: qd_delta_lut<1, 4, 1>
// qdelta-instantiate: qd_delta_lut<2, 4, 1>
// qdelta-instantiate: qd_lut_finish<0>
// qdelta-instantiate: qd_lut_finish<1>
// qdelta-instantiate: qd_lut_finish<2>
// qdelta-instantiate: qd_expand<0>
// qdelta-instantiate: qd_expand<1>
// qdelta-instantiate: qd_expand<2>
// qdelta-instantiate: qd_expand_rows<0>
// qdelta-instantiate: qd_expand_rows<1>
// qdelta-instantiate: qd_expand_rows<2>
// qdelta-instantiate: qd_delta_gemm<0, 8>
// qdelta-instantiate: qd_delta_gemm<1, 8>
// qdelta-instantiate: qd_delta_gemm<0, 4>
// qdelta-instantiate: qd_delta_gemm<1, 4>

typedef unsigned int qd_u32;
typedef unsigned short qd_u16;

#define QD_FULL_MASK 0xffffffffu
#define QD_NO_TENANT 0x7fffffff

// DT: 0 = float16, 1 = bfloat16, 2 = float32 (computed as 3 bf16 splits).
template <int DT> struct QdSplits { enum { value = 1 }; };
template <> struct QdSplits<2> { enum { value = 3 }; };

__device__ __forceinline__ float qd_f16_to_f32(qd_u16 h) {
#ifdef QDELTA_EMULATE
    return qd_emu::f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ qd_u16 qd_f32_to_f16(float f) {
#ifdef QDELTA_EMULATE
    return qd_emu::f32_to_f16(f);
#else
    qd_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}
__device__ __forceinline__ float qd_bf16_to_f32(qd_u16 h) {
    return __uint_as_float(((qd_u32)h) << 16);
}
__device__ __forceinline__ qd_u16 qd_f32_to_bf16(float f) {
#ifdef QDELTA_EMULATE
    return qd_emu::f32_to_bf16(f);
#else
    qd_u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

template <int DT>
__device__ __forceinline__ float qd_load(const void* p, long long i) {
    if (DT == 2) return static_cast<const float*>(p)[i];
    qd_u16 h = static_cast<const qd_u16*>(p)[i];
    return DT == 0 ? qd_f16_to_f32(h) : qd_bf16_to_f32(h);
}

template <int DT>
__device__ __forceinline__ void qd_store(void* p, long long i, float v) {
    if (DT == 2) {
        static_cast<float*>(p)[i] = v;
    } else {
        static_cast<qd_u16*>(p)[i] = DT == 0 ? qd_f32_to_f16(v) : qd_f32_to_bf16(v);
    }
}

// x [M, K] (row stride ldx) -> xp [splits][M][W][16] u32, zero past K.
template <int DT>
__global__ void qd_prep_x(const void* __restrict__ x, long long ldx, int M, int K, int W,
                          qd_u32* __restrict__ xp) {
    const long long total = (long long)M * W * 16;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int s = (int)(i & 15);
        const long long cw = i >> 4;
        const int c = (int)(cw % W);
        const long long m = cw / W;
        const int k0 = 32 * c + 15 - s;
        const int k1 = 32 * c + 31 - s;
        if (DT != 2) {
            const qd_u16* xs = static_cast<const qd_u16*>(x);
            const qd_u32 lo = k0 < K ? xs[m * ldx + k0] : 0u;
            const qd_u32 hi = k1 < K ? xs[m * ldx + k1] : 0u;
            xp[i] = lo | (hi << 16);
        } else {
            const float* xs = static_cast<const float*>(x);
            float r0 = k0 < K ? xs[m * ldx + k0] : 0.0f;
            float r1 = k1 < K ? xs[m * ldx + k1] : 0.0f;
#pragma unroll
            for (int sp = 0; sp < 3; ++sp) {
                const qd_u16 b0 = qd_f32_to_bf16(r0);
                const qd_u16 b1 = qd_f32_to_bf16(r1);
                xp[sp * total + i] = (qd_u32)b0 | ((qd_u32)b1 << 16);
                r0 -= qd_bf16_to_f32(b0);
                r1 -= qd_bf16_to_f32(b1);
            }
        }
    }
}

template <int DT>
__device__ __forceinline__ void qd_mma(float (&d)[4], qd_u32 a0, qd_u32 a1, qd_u32 a2, qd_u32 a3,
                                       qd_u32 b0, qd_u32 b1) {
#ifdef QDELTA_EMULATE
    qd_emu::mma_m16n8k16(d, a0, a1, a2, a3, b0, b1, DT != 0);
#else
    if (DT == 0) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#endif
}

// +-1.0 pair from bits (15 - s, 31 - s) of the word; `ws` is already shifted by 4*t.
template <int DT>
__device__ __forceinline__ qd_u32 qd_signs(qd_u32 ws, int sh) {
    const qd_u32 one = DT == 0 ? 0x3C003C00u : 0x3F803F80u;
    return ((ws << sh) & 0x80008000u) | one;
}

__device__ __forceinline__ int qd_warp_min(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(QD_FULL_MASK, v, o));
    return v;
}

// Four 16-bit x values from k0 (zeros at k >= K), as two u32 pairs.
__device__ __forceinline__ uint2 qd_x4(const qd_u16* __restrict__ row, int k0, int K, int x_vec) {
    if (x_vec && k0 + 3 < K) return __ldg(reinterpret_cast<const uint2*>(row + k0));
    qd_u32 e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) e[i] = k0 + i < K ? (qd_u32)__ldg(row + k0 + i) : 0u;
    return make_uint2(e[0] | (e[1] << 16), e[2] | (e[3] << 16));
}

// What qd_prep_x stores for slots 4*t4 .. 4*t4+3 of a chunk, built from x itself:
// slot s = (x[32c + 15 - s], x[32c + 31 - s]); k0 = 32c + 12 - 4*t4, so slot
// 4*t4 + j takes element 3 - j of the runs at k0 and k0 + 16.
__device__ __forceinline__ uint4 qd_x_fragment(const qd_u16* __restrict__ row, int k0, int K,
                                               int x_vec) {
    const uint2 lo = qd_x4(row, k0, K, x_vec);
    const uint2 hi = qd_x4(row, k0 + 16, K, x_vec);
    return make_uint4(__byte_perm(lo.y, hi.y, 0x7632), __byte_perm(lo.y, hi.y, 0x5410),
                      __byte_perm(lo.x, hi.x, 0x7632), __byte_perm(lo.x, hi.x, 0x5410));
}

// Words c .. c+G-1 of the warp tile's 2*FT feature rows (zeros past ce or N).
template <int FT, int G>
__device__ __forceinline__ void qd_mm_load_words(qd_u32 (&wv)[FT][2][G],
                                                 const qd_u32* const (&wrow)[FT][2], int c,
                                                 int ce, int vec_ok) {
#pragma unroll
    for (int f = 0; f < FT; ++f)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const qd_u32* src = wrow[f][h];
#pragma unroll
            for (int q4 = 0; q4 < G; q4 += 4) {
                const int c4 = c + q4;
                if (src == nullptr || c4 >= ce) {
#pragma unroll
                    for (int v = 0; v < 4; ++v) wv[f][h][q4 + v] = 0u;
                } else if (vec_ok) {  // ce is a multiple of 4 or W: the 16 bytes exist
                    const uint4 q = __ldg(reinterpret_cast<const uint4*>(src + c4));
                    wv[f][h][q4 + 0] = q.x;
                    wv[f][h][q4 + 1] = q.y;
                    wv[f][h][q4 + 2] = q.z;
                    wv[f][h][q4 + 3] = q.w;
                } else {
#pragma unroll
                    for (int v = 0; v < 4; ++v)
                        wv[f][h][q4 + v] = c4 + v < ce ? __ldg(src + c4 + v) : 0u;
                }
            }
        }
}

// One block: WF x WM warp tiles, each split over KS warps along K.
// Warp tile: 16*FT features x 8*NT rows. Grid: x = row tiles, y = feature tiles.
template <int DT, int FT, int NT, int WF, int WM, int KS>
__global__ void __launch_bounds__(32 * WF * WM * KS)
qd_delta_mm(const qd_u32* __restrict__ xp,      // [splits][M][W][16]
            const qd_u32* __restrict__ planes,  // [T][P][N][W]
            const float* __restrict__ scales,   // [T][P] or [T][P][N]
            const long long* __restrict__ ids,  // [M], or null: every row is tenant 0
            const void* base, long long ldb,    // [M][N] added to the result, or null
            void* y, long long ldy,             // [M][N]; may alias base
            int M, int N, int W, int T, int P, int P_use, int row_scales, int vec_ok,
            const qd_u16* __restrict__ xd, long long ldx, int K, int x_vec) {
    // xp == null: 16-bit x is read straight from xd [M][ldx] (no qd_prep_x launch);
    // x_vec: its rows allow 8-byte loads.
    constexpr int SPLITS = QdSplits<DT>::value;
    constexpr int ACC = FT * NT * 4;
    constexpr bool DIRECT_X = DT != 2 && NT == 1;  // the host sends xp == null only then
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int ks = warp % KS;
    const int wtile = warp / KS;
    const int wf = wtile % WF;
    const int wm = wtile / WF;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int n0 = (blockIdx.y * WF + wf) * 16 * FT;
    const long long m0 = ((long long)blockIdx.x * WM + wm) * 8 * NT;

    // Lane i < 8*NT holds the tenant of row m0 + i; bad ids poison their row.
    int my_id = -1;
    int my_bad = 0;
    if (lane < 8 * NT && m0 + lane < M) {
        const long long v = ids ? ids[m0 + lane] : 0;
        if (v >= 0 && v < T) my_id = (int)v;
        else if (v != -1) my_bad = 1;
    }

    // This warp's share of the K chunks (a multiple of 4 words for 128-bit loads).
    const int per = (((W + KS - 1) / KS) + 3) & ~3;
    const int cb = ks * per;
    const int ce = min(W, cb + per);

    float acc[FT][NT][4];
#pragma unroll
    for (int f = 0; f < FT; ++f)
#pragma unroll
        for (int r = 0; r < NT; ++r)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[f][r][i] = 0.0f;

    int cur = -1;
    while (true) {
        const int tenant = qd_warp_min(my_id > cur ? my_id : QD_NO_TENANT);
        if (tenant == QD_NO_TENANT) break;
        cur = tenant;
        bool use[NT];
        long long xrow[NT];
#pragma unroll
        for (int r = 0; r < NT; ++r) {
            use[r] = __shfl_sync(QD_FULL_MASK, my_id, r * 8 + g) == tenant;
            xrow[r] = m0 + r * 8 + g;
        }
        for (int p = 0; p < P_use; ++p) {
            float part[FT][NT][4];
#pragma unroll
            for (int f = 0; f < FT; ++f)
#pragma unroll
                for (int r = 0; r < NT; ++r)
#pragma unroll
                    for (int i = 0; i < 4; ++i) part[f][r][i] = 0.0f;

            const qd_u32* plane = planes + (long long)(tenant * P + p) * N * W;
            const qd_u32* wrow[FT][2];
#pragma unroll
            for (int f = 0; f < FT; ++f)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = n0 + 16 * f + 8 * h + g;
                    wrow[f][h] = n < N ? plane + (long long)n * W : nullptr;
                }

            // Each group of 4 words used to wait a full DRAM latency before its first
            // mma. One-row tiles (decode) load 8 words per row at once: half a warp's
            // K share at K = 4096 (16 words would take it in one, but needs more than
            // 128 registers: half the blocks per SM, or spills); wider tiles, short of
            // registers, load 4 and prefetch the next 4 while this group's mmas run.
            constexpr int G = NT == 1 ? 8 : 4;
            constexpr bool PREFETCH = NT != 1;
            qd_u32 wv[FT][2][G];
            qd_u32 wn[FT][2][PREFETCH ? G : 1];
            if (PREFETCH && cb < ce) qd_mm_load_words<FT, G>(wv, wrow, cb, ce, vec_ok);
            for (int c = cb; c < ce; c += G) {
                if constexpr (PREFETCH) {
                    if (c + G < ce) qd_mm_load_words<FT, G>(wn, wrow, c + G, ce, vec_ok);
                } else {
                    qd_mm_load_words<FT, G>(wv, wrow, c, ce, vec_ok);
                }
#pragma unroll
                for (int v = 0; v < G; ++v) {
                    const int chunk = c + v;
                    if (chunk >= ce) break;
                    qd_u32 b[SPLITS][NT][4];
#pragma unroll
                    for (int sp = 0; sp < SPLITS; ++sp)
#pragma unroll
                        for (int r = 0; r < NT; ++r) {
                            uint4 q = make_uint4(0u, 0u, 0u, 0u);
                            if (use[r]) {
                                if (DIRECT_X && xp == nullptr) {
                                    q = qd_x_fragment(xd + xrow[r] * ldx,
                                                      32 * chunk + 12 - 4 * t4, K, x_vec);
                                } else {
                                    q = __ldg(reinterpret_cast<const uint4*>(
                                        xp + (((long long)sp * M + xrow[r]) * W + chunk) * 16 +
                                        4 * t4));
                                }
                            }
                            b[sp][r][0] = q.x;
                            b[sp][r][1] = q.y;
                            b[sp][r][2] = q.z;
                            b[sp][r][3] = q.w;
                        }
#pragma unroll
                    for (int f = 0; f < FT; ++f) {
                        const qd_u32 lo = wv[f][0][v] << (4 * t4);
                        const qd_u32 hi = wv[f][1][v] << (4 * t4);
#pragma unroll
                        for (int mk = 0; mk < 2; ++mk) {
                            const qd_u32 a0 = qd_signs<DT>(lo, 2 * mk);
                            const qd_u32 a1 = qd_signs<DT>(hi, 2 * mk);
                            const qd_u32 a2 = qd_signs<DT>(lo, 2 * mk + 1);
                            const qd_u32 a3 = qd_signs<DT>(hi, 2 * mk + 1);
#pragma unroll
                            for (int sp = 0; sp < SPLITS; ++sp)
#pragma unroll
                                for (int r = 0; r < NT; ++r)
                                    qd_mma<DT>(part[f][r], a0, a1, a2, a3, b[sp][r][2 * mk],
                                               b[sp][r][2 * mk + 1]);
                        }
                    }
                }
                if constexpr (PREFETCH) {
#pragma unroll
                    for (int f = 0; f < FT; ++f)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
#pragma unroll
                            for (int v = 0; v < G; ++v) wv[f][h][v] = wn[f][h][v];
                }
            }
            // Scale this plane's partial sums by alpha[tenant, p(, feature)] in fp32.
#pragma unroll
            for (int f = 0; f < FT; ++f)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = n0 + 16 * f + 8 * h + g;
                    float alpha = 0.0f;
                    if (n < N) {
                        const long long tp = (long long)tenant * P + p;
                        alpha = row_scales ? scales[tp * N + n] : scales[tp];
                    }
#pragma unroll
                    for (int r = 0; r < NT; ++r) {
                        acc[f][r][2 * h] += alpha * part[f][r][2 * h];
                        acc[f][r][2 * h + 1] += alpha * part[f][r][2 * h + 1];
                    }
                }
        }
    }

    if (KS > 1) {
        __shared__ float red[(KS > 1 ? KS : 1) * WF * WM * ACC * 32];
        float* mine = red + ((wtile * KS + ks) * ACC) * 32;
#pragma unroll
        for (int f = 0; f < FT; ++f)
#pragma unroll
            for (int r = 0; r < NT; ++r)
#pragma unroll
                for (int i = 0; i < 4; ++i) mine[((f * NT + r) * 4 + i) * 32 + lane] = acc[f][r][i];
        __syncthreads();
        if (ks != 0) return;
#pragma unroll
        for (int f = 0; f < FT; ++f)
#pragma unroll
            for (int r = 0; r < NT; ++r)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float s = 0.0f;
                    for (int k = 0; k < KS; ++k)
                        s += red[((wtile * KS + k) * ACC + (f * NT + r) * 4 + i) * 32 + lane];
                    acc[f][r][i] = s;
                }
    }

    // C fragment: c0/c1 = feature g, rows 2*t4 and 2*t4+1; c2/c3 = feature g + 8.
#pragma unroll
    for (int r = 0; r < NT; ++r)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int row_lane = r * 8 + 2 * t4 + j;
            const int bad = __shfl_sync(QD_FULL_MASK, my_bad, row_lane);
            const long long m = m0 + row_lane;
            if (m >= M) continue;
#pragma unroll
            for (int f = 0; f < FT; ++f)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = n0 + 16 * f + 8 * h + g;
                    if (n >= N) continue;
                    float v = bad ? __uint_as_float(0x7fc00000u) : acc[f][r][2 * h + j];
                    if (base != nullptr) v += qd_load<DT>(base, m * ldb + n);
                    qd_store<DT>(y, m * ldy + n, v);
                }
        }
}

// ---------------------------------------------------------------------------
// Decode path: lookup tables instead of tensor cores (few rows per tenant).
//
// For a byte of 8 sign bits b0..b7 covering x[k0 .. k0+8), the contribution is
// sum_j (1 - 2 b_j) x[k0 + j]: one of 256 values. A block builds, per x row,
// a table of all 256 for every byte of an 8-word K slice (32 bytes x 256
// entries, fp32, 32 KB) and then streams packed words: one SHF (rotate), one
// LOP3 (address), one LDS and one FADD per 8 weights.
//
// Lanes: w = lane & 7 picks the word of the slice, q = lane >> 3 the output
// feature (4 per warp instruction). Table layout lut[r][v][j][w] (index
// r*8192 + v*32 + j*8 + w) and lane q looking up byte j = (jj + q) & 3 at step
// jj put the 32 lanes on 32 distinct banks whatever the byte values: no bank
// conflicts. Building writes a warp's 32 byte-groups at one v: conflict-free too.
//
// Grid: x = feature tiles of nb rows, y = candidate group leader row g, z =
// plane * kch + K chunk. A block whose row g is not the first of a group of up
// to R rows of one tenant exits at once; a group's planes are read once for
// all of its rows. Each block writes alpha-scaled partial sums to
// part[z][m][n]; qd_lut_finish adds them in a fixed order (deterministic),
// adds base and casts. Rows with id -1 get base (or 0), bad ids NaN.
// ---------------------------------------------------------------------------

#define QD_LUT_WORDS 8                      // words per K slice
#define QD_LUT_PER_ROW (256 * 4 * QD_LUT_WORDS)  // floats per x row: 8192
#define QD_LUT_THREADS 256

__device__ __forceinline__ long long qd_tenant_of(const long long* ids, int i) {
    return ids ? ids[i] : 0;
}

// 32-bit read-only load that asks L2 to fetch the whole 128-byte line: a
// row's next three slices (32 bytes each) then come from L2 instead of three
// more scattered 32-byte DRAM reads.
__device__ __forceinline__ qd_u32 qd_ldg_l2_128(const qd_u32* p) {
#ifdef QDELTA_EMULATE
    return *p;
#else
    qd_u32 v;
    asm("ld.global.nc.L2::128B.u32 %0, [%1];" : "=r"(v) : "l"(p));  // planes are read-only
    return v;
#endif
}

// One slice's plane words for a lane: feature n0 + 32 * s at step s, word w of the slice.
template <int STEPS>
__device__ __forceinline__ void qd_lut_load(qd_u32 (&wv)[STEPS],
                                            const qd_u32* __restrict__ plane, int sl, int W,
                                            int n0, int n_end, int w, int stride, int l2_line) {
    const int wd = sl * QD_LUT_WORDS + w;
    const bool word_ok = wd < W;
    const qd_u32* rowp = plane + (long long)n0 * W + wd;
    if (l2_line) {
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const bool ok = word_ok && n0 + s * 32 < n_end;
            wv[s] = ok ? qd_ldg_l2_128(rowp + s * stride) : 0u;
        }
    } else {
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const bool ok = word_ok && n0 + s * 32 < n_end;
            wv[s] = ok ? __ldg(rowp + s * stride) : 0u;
        }
    }
}

// PF = 1: the next slice's plane words are loaded while this slice's lookups run
// (twice the load registers; the latency of a block's later slices is hidden by
// a whole slice of work instead of by the table build alone).
template <int DT, int R, int PF>
__global__ void __launch_bounds__(QD_LUT_THREADS, 2)
qd_delta_lut(const void* __restrict__ x, long long ldx, int K,
             const qd_u32* __restrict__ planes,  // [T][P][N][W]
             const float* __restrict__ scales,   // [T][P] or [T][P][N]
             const long long* __restrict__ ids,  // [M] or null (every row tenant 0)
             float* __restrict__ part,           // [gridDim.z][M][N]
             int M, int N, int W, int T, int P, int row_scales, int nb, int spc, int kch,
             int load_flags) {
    constexpr int STEPS = 32 / R;  // feature steps of 32 (8 warps x 4) per block
    extern __shared__ float lut[];  // R * QD_LUT_PER_ROW floats (dynamic)
    __shared__ int s_rows[R];
    __shared__ int s_nrows;
    __shared__ int s_tenant;

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = blockIdx.y;

    // Warp 0: is row g the first of a group (rank among its tenant's rows % R == 0)?
    if (warp == 0) {
        const long long tg = qd_tenant_of(ids, g);
        int n_found = 0;
        if (tg >= 0 && tg < T) {
            int rank = 0;
            for (int b = 0; b < g; b += 32) {
                const int i = b + lane;
                const bool eq = i < g && qd_tenant_of(ids, i) == tg;
                rank += __popc(__ballot_sync(QD_FULL_MASK, eq));
            }
            if (rank % R == 0) {
                for (int b = g; b < M && n_found < R; b += 32) {
                    const int i = b + lane;
                    const bool eq = i < M && qd_tenant_of(ids, i) == tg;
                    qd_u32 mask = __ballot_sync(QD_FULL_MASK, eq);
                    while (mask != 0u && n_found < R) {
                        const int bit = __ffs(mask) - 1;
                        if (lane == 0) s_rows[n_found] = b + bit;
                        ++n_found;
                        mask &= mask - 1u;
                    }
                }
            }
        }
        if (lane == 0) {
            s_nrows = n_found;
            s_tenant = (int)(n_found > 0 ? tg : 0);
        }
    }
    __syncthreads();
    const int nr = s_nrows;
    if (nr == 0) return;  // block-uniform
    const int tenant = s_tenant;

    const int z = blockIdx.z;
    const int p = z / kch;
    const int kc = z - p * kch;
    const int nslices = (W + QD_LUT_WORDS - 1) / QD_LUT_WORDS;
    const int sl_begin = kc * spc;
    const int sl_end = min(nslices, sl_begin + spc);
    const int n_begin = blockIdx.x * nb;
    const int n_end = min(N, n_begin + nb);
    const long long tp = (long long)tenant * P + p;
    const qd_u32* plane = planes + tp * N * W;

    const int w = lane & 7;
    const int q = lane >> 3;
    // Byte address of entry (v = byte j of the word, j, w) is v * 128 + (j * 8 + w) * 4:
    // rotating the word right by 8j - 7 (mod 32) puts byte j at bits 7-14, so one
    // SHF (rotate) and one LOP3 ((rot & 0x7f80) | lane offset) make the address.
    qd_u32 rot[4], offb[4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
        const int j = (jj + q) & 3;
        rot[jj] = (qd_u32)((8 * j + 25) & 31);
        offb[jj] = (qd_u32)((j * 8 + w) * 4);
    }
    const char* lut_bytes = reinterpret_cast<const char*>(lut);

    float acc[R][STEPS];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int s = 0; s < STEPS; ++s) acc[r][s] = 0.0f;

    // Plane words of one slice: every load in flight at once. Step offsets within
    // the tile (< 1024 * W words) stay 32-bit to keep register pressure low.
    qd_u32 wv[STEPS];
    qd_u32 wn[PF ? STEPS : 1];  // PF: the next slice's words, in flight during the lookups
    const int stride = 32 * W;
    const int n_lane = n_begin + warp * 4 + q;  // this lane's feature at step 0
    const int live_steps = (n_end - n_begin + 31) / 32;  // steps with a feature in the tile
    const int l2_line = load_flags & 1;  // bit 0: 128-byte L2 fetches
    if (PF && sl_begin < sl_end)
        qd_lut_load<STEPS>(wv, plane, sl_begin, W, n_lane, n_end, w, stride, l2_line);

    for (int sl = sl_begin; sl < sl_end; ++sl) {
        // PF = 0: this slice's loads overlap the table build below. (Issuing them
        // after the build measured no faster on an H200 and spills at sm_90.)
        if (!PF) qd_lut_load<STEPS>(wv, plane, sl, W, n_lane, n_end, w, stride, l2_line);
        __syncthreads();  // the previous slice's lookups are done
        {
            // Thread = (byte-group gi = lane, high nibbles h = 2*warp + {0, 1}).
            const int gi = lane;
            const int kb = sl * (32 * QD_LUT_WORDS) + gi * 8;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r >= nr) break;
                const long long xrow = (long long)s_rows[r] * ldx;
                float xv[8];
#pragma unroll
                for (int b = 0; b < 8; ++b) xv[b] = kb + b < K ? qd_load<DT>(x, xrow + kb + b) : 0.0f;
                // L[l] = sum_{b<4} (bit b of l ? -x_b : x_b) = A[l & 3] + B[l >> 2].
                float A[4], B[4], L[16];
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    A[a] = ((a & 1) ? -xv[0] : xv[0]) + ((a & 2) ? -xv[1] : xv[1]);
                    B[a] = ((a & 1) ? -xv[2] : xv[2]) + ((a & 2) ? -xv[3] : xv[3]);
                }
#pragma unroll
                for (int l = 0; l < 16; ++l) L[l] = A[l & 3] + B[l >> 2];
                float* dst = lut + r * QD_LUT_PER_ROW + (gi & 3) * 8 + (gi >> 2);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int h = warp * 2 + hh;
                    float H = 0.0f;
#pragma unroll
                    for (int b = 0; b < 4; ++b) H += ((h >> b) & 1) ? -xv[4 + b] : xv[4 + b];
#pragma unroll
                    for (int l = 0; l < 16; ++l) dst[(h * 16 + l) * 32] = H + L[l];
                }
            }
        }
        __syncthreads();

        if (PF && sl + 1 < sl_end)
            qd_lut_load<PF ? STEPS : 1>(wn, plane, sl + 1, W, n_lane, n_end, w, stride, l2_line);
        // Only a block-uniform branch per step (steps past the tile's last
        // feature): a word past W was loaded as 0 and the table of k >= K is all
        // zeros (x read as 0 there), so it adds exactly 0. The branch also keeps
        // ptxas from hoisting every step's lookups at once, which would spill the
        // accumulators at 128 registers.
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            if (s >= live_steps) break;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const qd_u32 at = (__funnelshift_r(wv[s], wv[s], rot[jj]) & 0x7f80u) | offb[jj];
#pragma unroll
                for (int r = 0; r < R; ++r)
                    if (r == 0 || r < nr)  // nr >= 1: row 0 needs no test
                        acc[r][s] += *reinterpret_cast<const float*>(
                            lut_bytes + r * (QD_LUT_PER_ROW * 4) + at);
            }
        }
        if (PF) {
#pragma unroll
            for (int s = 0; s < (PF ? STEPS : 1); ++s) wv[s] = wn[s];
        }
    }

    // Sum the 8 word lanes of each feature; lane w == 0 writes alpha * sum.
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
        const int n = n_begin + s * 32 + warp * 4 + q;
        float alpha = 0.0f;
        if (w == 0 && n < n_end) alpha = row_scales ? scales[tp * N + n] : scales[tp];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float v = acc[r][s];
            v += __shfl_xor_sync(QD_FULL_MASK, v, 1);
            v += __shfl_xor_sync(QD_FULL_MASK, v, 2);
            v += __shfl_xor_sync(QD_FULL_MASK, v, 4);
            if (w == 0 && n < n_end && r < nr)
                part[((long long)z * M + s_rows[r]) * N + n] = alpha * v;
        }
    }
}

// y[m, n] = base[m, n] + sum_z part[z][m][n] for rows with a valid tenant;
// base (or 0) for id -1; NaN for ids outside [-1, T).
template <int DT>
__global__ void qd_lut_finish(const float* __restrict__ part, int Z,
                              const long long* __restrict__ ids, int T,
                              const void* base, long long ldb, void* y, long long ldy, int M, int N) {
    const long long total = (long long)M * N;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int m = (int)(i / N);
        const int n = (int)(i - (long long)m * N);
        const long long t = qd_tenant_of(ids, m);
        float v = 0.0f;
        if (t >= 0 && t < T) {
            for (int zz = 0; zz < Z; ++zz) v += part[(long long)zz * total + i];
        } else if (t != -1) {
            v = __uint_as_float(0x7fc00000u);
        }
        if (base != nullptr) v += qd_load<DT>(base, m * ldb + n);
        qd_store<DT>(y, m * ldy + n, v);
    }
}

// ---------------------------------------------------------------------------
// Prefill path: expand one tenant's planes into a dense [N][ldd] matrix of
// sum_p alpha_p * (+-1) in the input dtype (alpha summed in fp32, one rounding
// at the store), for cuBLAS. Thread = (feature n, byte-group c8 of 8 columns):
// a 16-byte store for 16-bit types (two for fp32), consecutive threads write
// consecutive bytes. ldd = 32 * W (a multiple of 32): every store is aligned
// and inside the row; columns >= K hold padding values the GEMM never reads.
// ---------------------------------------------------------------------------
// qd_expand_rows: same output as qd_expand, laid out for bandwidth. Grid y walks
// the feature rows (grid-stride when N > 65535), grid x the byte-groups of a
// row: no 64-bit division per thread (qd_expand spent more on `i / (4 * W)`
// than on its stores). One plane (the common case) stores +-alpha by flipping
// the sign bit of alpha rounded once to the output type: the same bits as
// rounding +-alpha, since round-to-nearest is symmetric.
template <int DT>
__global__ void qd_expand_rows(const qd_u32* __restrict__ planes,  // [P][N][W] (one tenant)
                               const float* __restrict__ scales,   // [P] or [P][N]
                               int N, int W, int P_use, int row_scales, void* __restrict__ dense) {
    const int c8 = blockIdx.x * blockDim.x + threadIdx.x;  // byte-group within the row
    if (c8 >= 4 * W) return;
    const int wd = c8 >> 2;
    const int sh = 8 * (c8 & 3);
    const long long ldd = 32LL * W;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const long long o = (long long)n * ldd + 8LL * c8;  // first element of this group
        if (P_use == 1) {
            const qd_u32 byte = (__ldg(planes + (long long)n * W + wd) >> sh) & 0xFFu;
            const float alpha = row_scales ? scales[n] : scales[0];
            if (DT == 2) {
                const qd_u32 a = __float_as_uint(alpha);
                qd_u32 f[8];
#pragma unroll
                for (int b = 0; b < 8; ++b) f[b] = a ^ (((byte >> b) & 1u) << 31);
                float4* d = reinterpret_cast<float4*>(static_cast<float*>(dense) + o);
                d[0] = make_float4(__uint_as_float(f[0]), __uint_as_float(f[1]),
                                   __uint_as_float(f[2]), __uint_as_float(f[3]));
                d[1] = make_float4(__uint_as_float(f[4]), __uint_as_float(f[5]),
                                   __uint_as_float(f[6]), __uint_as_float(f[7]));
            } else {
                const qd_u32 a = DT == 0 ? qd_f32_to_f16(alpha) : qd_f32_to_bf16(alpha);
                const qd_u32 a2 = a | (a << 16);
                qd_u32 h[4];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const qd_u32 two = byte >> (2 * b);
                    h[b] = a2 ^ (((two & 1u) << 15) | ((two & 2u) << 30));
                }
                *reinterpret_cast<uint4*>(static_cast<qd_u16*>(dense) + o) =
                    make_uint4(h[0], h[1], h[2], h[3]);
            }
            continue;
        }
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = 0.0f;
        for (int p = 0; p < P_use; ++p) {
            const qd_u32 byte = (__ldg(planes + ((long long)p * N + n) * W + wd) >> sh) & 0xFFu;
            const float alpha = row_scales ? scales[(long long)p * N + n] : scales[p];
#pragma unroll
            for (int b = 0; b < 8; ++b) v[b] += ((byte >> b) & 1u) ? -alpha : alpha;
        }
        if (DT == 2) {
            float4* d = reinterpret_cast<float4*>(static_cast<float*>(dense) + o);
            d[0] = make_float4(v[0], v[1], v[2], v[3]);
            d[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            qd_u32 h[4];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const qd_u16 lo = DT == 0 ? qd_f32_to_f16(v[2 * b]) : qd_f32_to_bf16(v[2 * b]);
                const qd_u16 hi = DT == 0 ? qd_f32_to_f16(v[2 * b + 1]) : qd_f32_to_bf16(v[2 * b + 1]);
                h[b] = (qd_u32)lo | ((qd_u32)hi << 16);
            }
            *reinterpret_cast<uint4*>(static_cast<qd_u16*>(dense) + o) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

template <int DT>
__global__ void qd_expand(const qd_u32* __restrict__ planes,  // [P][N][W] (one tenant)
                          const float* __restrict__ scales,   // [P] or [P][N]
                          int N, int W, int P_use, int row_scales, void* __restrict__ dense) {
    const long long groups = (long long)N * W * 4;
    const long long step = (long long)gridDim.x * blockDim.x;
    const long long ldd = 32LL * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += step) {
        const long long n = i / (4LL * W);
        const int c8 = (int)(i - n * 4LL * W);  // byte-group within the row
        const int wd = c8 >> 2;
        const int sh = 8 * (c8 & 3);
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = 0.0f;
        for (int p = 0; p < P_use; ++p) {
            const qd_u32 byte = (__ldg(planes + ((long long)p * N + n) * W + wd) >> sh) & 0xFFu;
            const float alpha = row_scales ? scales[(long long)p * N + n] : scales[p];
#pragma unroll
            for (int b = 0; b < 8; ++b) v[b] += ((byte >> b) & 1u) ? -alpha : alpha;
        }
        const long long o = n * ldd + 8LL * c8;  // first element of this group
        if (DT == 2) {
            float4* d = reinterpret_cast<float4*>(static_cast<float*>(dense) + o);
            d[0] = make_float4(v[0], v[1], v[2], v[3]);
            d[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            qd_u32 h[4];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const qd_u16 lo = DT == 0 ? qd_f32_to_f16(v[2 * b]) : qd_f32_to_bf16(v[2 * b]);
                const qd_u16 hi = DT == 0 ? qd_f32_to_f16(v[2 * b + 1]) : qd_f32_to_bf16(v[2 * b + 1]);
                h[b] = (qd_u32)lo | ((qd_u32)hi << 16);
            }
            *reinterpret_cast<uint4*>(static_cast<qd_u16*>(dense) + o) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

// ---------------------------------------------------------------------------
// Fused prefill (qd_delta_gemm): y = base + sum_p alpha_p * x S_p^T as one
// tensor-core GEMM that never writes the dense delta. The expand path writes
// and re-reads N x K values per tenant (33.7 us of bandwidth alone at 8192 on
// an H200, more than the 1.3x-of-dense budget leaves); here the 1-bit words go
// from global memory to shared memory and the signs become mma A fragments in
// registers.
//
// Block: 128 output features x 16*NT x-rows, 4 warps (2 x 2), warp tile 64 x 8*NT
// (4 x NT mma tiles of m16n8k16, fp32 accumulators). NT = 8 (128 rows: each A
// fragment feeds 8 mmas) or NT = 4 (64 rows: twice the blocks for small M). K runs in stages of 4
// packed words (128 k) through a 3-deep cp.async pipeline:
// * x rows (gathered through `rows`: the tenant-sorted row order) are copied
//   16 bytes at a time into rows padded to 136 halves, so ldmatrix.x4 reads
//   8 rows x 16 bytes on 32 distinct banks. Past K the copy zero-fills (the
//   format's padding bits are 0 = +1, so x must be 0 there).
// * each thread copies its own feature's 4 words per plane; after the wait it
//   permutes their bits in place (qd_gemm_bits) so that lane t's A fragments
//   in natural k order are again one shift and one LOP3 per register pair
//   (qd_signs), as in qd_delta_mm; one barrier per stage.
// With one plane, A = +-1 exactly and alpha multiplies the fp32 sums in the
// epilogue. With several planes the planes share the accumulators, so plane
// p's A is +-alpha_p rounded to the input type (the expand path rounds the
// summed alpha once instead; both are within the dtype's tolerance).
// fp16 / bf16 only (fp32 keeps the expand path). x: 16-byte aligned rows
// (ldx % 8 == 0; the host pads other layouts). Rows with tenant -1 or a bad
// id are not in any tile: the host writes them (base, 0 or NaN).
// ---------------------------------------------------------------------------

#define QG_BN 128                       // output features per block
#define QG_THREADS 128                  // 4 warps: 2 (features) x 2 (rows)
#define QG_FT 4                         // 16-feature mma tiles per warp
#define QG_KC 4                         // packed words (32 k each) per stage
#define QG_STAGES 3
#define QG_XSTRIDE (QG_KC * 32 + 8)     // halves per staged x row (+8: conflict-free ldmatrix)

// Shared-memory window address of a generic pointer, for cp.async and ldmatrix.
// (Only the PTX forms below use it; the emulated forms take the pointer itself.)
__device__ __forceinline__ qd_u32 qd_smem_addr(const void* p) {
#ifdef QDELTA_EMULATE
    return (qd_u32)(unsigned long long)p;
#else
    qd_u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#endif
}

// 16 bytes global -> shared, zero-filled past `bytes` (0..16); asynchronous on sm_80+.
__device__ __forceinline__ void qd_cp_async16(void* dst, const void* src, int bytes) {
#ifdef QDELTA_EMULATE
    qd_emu::cp_async(dst, src, 16, bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(qd_smem_addr(dst)), "l"(src),
                 "r"(bytes));
#endif
}

// 4 bytes global -> shared, zero when `bytes` is 0.
__device__ __forceinline__ void qd_cp_async4(void* dst, const void* src, int bytes) {
#ifdef QDELTA_EMULATE
    qd_emu::cp_async(dst, src, 4, bytes);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(qd_smem_addr(dst)), "l"(src),
                 "r"(bytes));
#endif
}

__device__ __forceinline__ void qd_cp_async_commit() {
#ifndef QDELTA_EMULATE
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight (the emulator copies at once).
template <int N>
__device__ __forceinline__ void qd_cp_async_wait() {
#ifndef QDELTA_EMULATE
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ldmatrix.x4: lane i names row i % 8 of matrix i / 8; each lane receives the u32 at
// (row lane / 4, halves 2 * (lane % 4), +1) of each of the four 8 x 8 matrices.
__device__ __forceinline__ void qd_ldmatrix_x4(qd_u32 (&r)[4], const qd_u16* row) {
#ifdef QDELTA_EMULATE
    qd_emu::ldmatrix_x4(r, row, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(qd_smem_addr(row)));
#endif
}

__device__ __forceinline__ qd_u32 qd_delta_swap(qd_u32 v, qd_u32 mask, int delta) {
    const qd_u32 t = ((v >> delta) ^ v) & mask;
    return v ^ t ^ (t << delta);
}

// Bit k = 16*mk + 8*jj + 2*t + e of a packed word moves to 16*e + 15 - (4*t + 2*mk + jj):
// then qd_signs(w << 4t, 2*mk + jj) gives lane t's A register for k-step mk (jj = 0: a0/a1,
// jj = 1: a2/a3) with x in natural k order. As an index map it is
// (mk, jj, t1, t0, e) -> (e, ~t1, ~t0, ~mk, ~jj): a bit reversal (all five complemented),
// one pair swap (e back) and four index-bit swaps.
__device__ __forceinline__ qd_u32 qd_gemm_bits(qd_u32 w) {
    w = __brev(w);
    w = ((w >> 1) & 0x55555555u) | ((w & 0x55555555u) << 1);
    w = qd_delta_swap(w, 0x0000AAAAu, 15);
    w = qd_delta_swap(w, 0x00F000F0u, 4);
    w = qd_delta_swap(w, 0x0C0C0C0Cu, 2);
    w = qd_delta_swap(w, 0x22222222u, 1);
    return w;
}

// One stage's copies: 16 x-row segments and P_use x 4 plane words per thread.
template <int BM>
__device__ __forceinline__ void qd_gemm_stage(qd_u16* xs, qd_u32* ps, const qd_u16* __restrict__ x,
                                              long long ldx, int K, const int* s_rows,
                                              const qd_u32* __restrict__ plane0, long long plane_stride,
                                              int n, int N, int W, int P_use, int vec_ok, int st) {
    const int tid = threadIdx.x;
    const int seg = tid & 15;
    const int k = st * (QG_KC * 32) + seg * 8;
    const int bytes = max(0, min(16, 2 * (K - k)));
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) {
        const int r = (tid >> 4) + 8 * i;
        const int gr = s_rows[r];
        const int b = gr >= 0 ? bytes : 0;
        const qd_u16* src = b > 0 ? x + (long long)gr * ldx + k : x;
        qd_cp_async16(xs + r * QG_XSTRIDE + seg * 8, src, b);
    }
    const int c0 = st * QG_KC;
    for (int p = 0; p < P_use; ++p) {
        qd_u32* dst = ps + (p * QG_BN + tid) * QG_KC;
        const qd_u32* src = plane0 + p * plane_stride + (long long)n * W + c0;
        if (vec_ok) {  // W % 4 == 0 and 16-byte aligned planes: one copy per feature
            qd_cp_async16(dst, n < N ? src : plane0, n < N ? 16 : 0);
        } else {
#pragma unroll
            for (int c = 0; c < QG_KC; ++c) {
                const bool ok = n < N && c0 + c < W;
                qd_cp_async4(dst + c, ok ? src + c : plane0, ok ? 4 : 0);
            }
        }
    }
}

// One plane's mmas for one packed word (32 k) of the stage: the warp's 4 x NT tiles.
// `pw` points at the plane's word of this chunk for feature 0 of the block (stride
// QG_KC); `alpha` is null for one plane (+-1 exactly, `one`) or the plane's alpha pairs.
template <int DT, int NT>
__device__ __forceinline__ void qd_gemm_plane(float (&acc)[QG_FT][NT][4], const qd_u32 (&bf)[NT][4],
                                              const qd_u32* pw, const qd_u32* alpha, qd_u32 one,
                                              int wf, int g, int t4) {
#pragma unroll
    for (int f = 0; f < QG_FT; ++f) {
        const int fl = wf * 64 + f * 16 + g;  // features fl and fl + 8 of the block
        const qd_u32 lo = pw[fl * QG_KC] << (4 * t4);
        const qd_u32 hi = pw[(fl + 8) * QG_KC] << (4 * t4);
        const qd_u32 c_lo = alpha ? alpha[fl] : one;
        const qd_u32 c_hi = alpha ? alpha[fl + 8] : one;
#pragma unroll
        for (int mk = 0; mk < 2; ++mk) {
            const qd_u32 a0 = ((lo << (2 * mk)) & 0x80008000u) ^ c_lo;
            const qd_u32 a1 = ((hi << (2 * mk)) & 0x80008000u) ^ c_hi;
            const qd_u32 a2 = ((lo << (2 * mk + 1)) & 0x80008000u) ^ c_lo;
            const qd_u32 a3 = ((hi << (2 * mk + 1)) & 0x80008000u) ^ c_hi;
#pragma unroll
            for (int rt = 0; rt < NT; ++rt)
                qd_mma<DT>(acc[f][rt], a0, a1, a2, a3, bf[rt][2 * mk], bf[rt][2 * mk + 1]);
        }
    }
}

template <int DT, int NT>
__global__ void __launch_bounds__(QG_THREADS)
qd_delta_gemm(const qd_u16* __restrict__ x, long long ldx, int K,
              const qd_u32* __restrict__ planes,  // [T][P][N][W]
              const float* __restrict__ scales,   // [T][P] or [T][P][N]
              const int* __restrict__ rows,       // [M] tenant-sorted row order, or null (identity)
              const int* __restrict__ tiles,      // [grid y][3] (tenant, start, count)
              const void* base, long long ldb, void* y, long long ldy,
              int N, int W, int P, int P_use, int row_scales, int vec_ok) {
    constexpr int BM = 16 * NT;  // x rows per block: 2 warps x NT tiles of 8
    extern __shared__ __align__(16) qd_u32 qg_smem[];  // [STAGES] x rows, [STAGES] plane words, alpha pairs
    __shared__ int s_rows[BM];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wf = warp & 1;
    const int wm = warp >> 1;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int n0 = blockIdx.x * QG_BN;

    const int tenant = tiles[3 * blockIdx.y];
    const int start = tiles[3 * blockIdx.y + 1];
    const int count = tiles[3 * blockIdx.y + 2];
    if (tid < BM) s_rows[tid] = tid < count ? (rows ? rows[start + tid] : start + tid) : -1;

    qd_u16* xs = reinterpret_cast<qd_u16*>(qg_smem);
    constexpr int XS_WORDS = BM * QG_XSTRIDE / 2;  // u32 per x stage
    const int ps_words = P_use * QG_BN * QG_KC;        // u32 per plane stage
    qd_u32* ps = qg_smem + QG_STAGES * XS_WORDS;
    qd_u32* s_alpha = ps + QG_STAGES * ps_words;       // [P_use][BN] +-alpha pairs (P_use > 1)
#ifdef QDELTA_EMULATE
    // The launch must give the layout above its bytes (the host's gemm_shared_bytes).
    const unsigned int needed = 4u * (QG_STAGES * (XS_WORDS + ps_words) + P_use * QG_BN);
    if (qd_emu::dyn_smem_bytes() < needed) {
        qd_emu::kernel_error("expected " + std::to_string(needed) + " bytes of dynamic shared memory, found " +
                             std::to_string(qd_emu::dyn_smem_bytes()));
        return;
    }
#endif

    const long long tp0 = (long long)tenant * P;
    const qd_u32 one = DT == 0 ? 0x3C003C00u : 0x3F803F80u;
    if (P_use > 1) {
        for (int p = 0; p < P_use; ++p) {
            const int n = n0 + tid;
            const float a = n < N ? (row_scales ? scales[(tp0 + p) * N + n] : scales[tp0 + p]) : 0.0f;
            const qd_u32 h = DT == 0 ? qd_f32_to_f16(a) : qd_f32_to_bf16(a);
            s_alpha[p * QG_BN + tid] = h | (h << 16);
        }
    }
    __syncthreads();

    const long long plane_stride = (long long)N * W;
    const qd_u32* plane0 = planes + tp0 * plane_stride;
    const int my_n = n0 + tid;  // the feature whose words this thread stages
    const int nst = (W + QG_KC - 1) / QG_KC;

#pragma unroll
    for (int s = 0; s < QG_STAGES - 1; ++s) {
        if (s < nst)
            qd_gemm_stage<BM>(xs + s * BM * QG_XSTRIDE, ps + s * ps_words, x, ldx, K, s_rows, plane0,
                          plane_stride, my_n, N, W, P_use, vec_ok, s);
        qd_cp_async_commit();
    }

    float acc[QG_FT][NT][4];
#pragma unroll
    for (int f = 0; f < QG_FT; ++f)
#pragma unroll
        for (int r = 0; r < NT; ++r)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[f][r][i] = 0.0f;

    for (int st = 0; st < nst; ++st) {
        qd_cp_async_wait<QG_STAGES - 2>();
        const int b = st % QG_STAGES;
        qd_u32* psb = ps + b * ps_words;
        for (int p = 0; p < P_use; ++p) {  // this thread's own words: no barrier needed before
#pragma unroll
            for (int c = 0; c < QG_KC; ++c) {
                qd_u32* w = psb + (p * QG_BN + tid) * QG_KC + c;
                *w = qd_gemm_bits(*w);
            }
        }
        __syncthreads();  // stage st visible to all; stage st - 1's buffers are free
        {
            const int nx = st + QG_STAGES - 1;
            if (nx < nst) {
                const int bx = nx % QG_STAGES;
                qd_gemm_stage<BM>(xs + bx * BM * QG_XSTRIDE, ps + bx * ps_words, x, ldx, K, s_rows,
                              plane0, plane_stride, my_n, N, W, P_use, vec_ok, nx);
            }
            qd_cp_async_commit();
        }

        const qd_u16* xsb = xs + b * BM * QG_XSTRIDE;
        const int chunks = min(QG_KC, W - st * QG_KC);
        for (int c = 0; c < chunks; ++c) {
            qd_u32 bf[NT][4];
#pragma unroll
            for (int rt = 0; rt < NT; ++rt)
                qd_ldmatrix_x4(bf[rt], xsb + (wm * 8 * NT + rt * 8 + (lane & 7)) * QG_XSTRIDE + c * 32 +
                                           8 * (lane >> 3));
            if (P_use == 1) {  // the common case: no alpha reads in the loop
                qd_gemm_plane<DT, NT>(acc, bf, psb + c, nullptr, one, wf, g, t4);
            } else {
                for (int p = 0; p < P_use; ++p)
                    qd_gemm_plane<DT, NT>(acc, bf, psb + p * QG_BN * QG_KC + c, s_alpha + p * QG_BN,
                                          0u, wf, g, t4);
            }
        }
    }
    qd_cp_async_wait<0>();  // nothing may still be writing shared memory at exit

    // C fragment: d0, d1 = feature g, rows 2*t4 and 2*t4 + 1; d2, d3 = feature g + 8.
#pragma unroll
    for (int f = 0; f < QG_FT; ++f)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + wf * 64 + f * 16 + 8 * h + g;
            if (n >= N) continue;
            float scale = 1.0f;
            if (P_use == 1) scale = row_scales ? scales[tp0 * N + n] : scales[tp0];
#pragma unroll
            for (int rt = 0; rt < NT; ++rt)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int gr = s_rows[wm * 8 * NT + rt * 8 + 2 * t4 + j];
                    if (gr < 0) continue;
                    float v = acc[f][rt][2 * h + j] * scale;
                    if (base != nullptr) v += qd_load<DT>(base, gr * ldb + n);
                    qd_store<DT>(y, gr * ldy + n, v);
                }
        }
}
