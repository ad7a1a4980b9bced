/* int8_simd.c: AVX2, AVX-512 and AVX-512 VNNI variants of the int8 kernels of int8.c
 * (layout: formats.h; contract: kernels.h). Compiled per function with target
 * attributes and chosen at run time by dispatch.c, so one build runs on any x86-64.
 *
 * Bit-exactness with *_ref: quantize and dequantize do the reference's float32
 * operations lane by lane (IEEE division by the scale, round-half-even, the same
 * bf16/f16 rounding); gemm_int8 computes each K-group's int32 dot exactly and applies
 * the reference's float epilogue in the same order. linear_int8 sums in another order
 * (FMA over vector lanes) and agrees to float32 rounding.
 *
 * GEMM: a panel of 32 weight rows (columns of y) is repacked so that one vector holds
 * the same K-slice of 16 rows; each activation row's slice is broadcast against it,
 * GEMM_MR rows at a time. VNNI (vpdpbusd, u8 x s8) takes the weights as the unsigned
 * operand, stored as w + 128, and subtracts 128 * sum(x) per (row, group); without
 * VNNI, both operands are sign-extended to int16 pairs for vpmaddwd. Both are exact
 * for every int8 value (the int32 sums wrap exactly as the reference's do).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels.h"
#include "convert.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define T_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

#define GEMM_MR 4  /* activation rows per GEMM micro-tile */
#define PANEL_N 32 /* weight rows per packed GEMM panel */
#define GEMM_SMALL_M 2 /* VNNI GEMM: up to this many rows, no packing (groups >= 64) */
#define LIN_MR 4   /* weight-only linear: activation rows per tile (AVX-512; AVX2 below) */
#define LIN_NR 4   /* weight rows per tile */
#define LIN_SCRATCH_M 8 /* weight-only linear: above this many rows, dequantize blocks to scratch */

/* ================================================================== shared scalar pieces */
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The reference's per-element rule: round-half-even(v / s), clamped to +-127. */
static inline int8_t quantize_one(float v, float s) {
    float r = s > 0.0f ? rintf(v / s) : 0.0f;
    r = r > CQ_INT8_QMAX ? CQ_INT8_QMAX : (r < -CQ_INT8_QMAX ? -CQ_INT8_QMAX : r);
    return (int8_t)r;
}

/* Scale of a tile from its max |x| bits; CQ_ENONFINITE for Inf/NaN. */
static inline int tile_scale(uint32_t amax_bits, float *s) {
    if (amax_bits >= 0x7f800000u)
        return CQ_ENONFINITE;
    *s = cq_bits_f32(amax_bits) / (float)CQ_INT8_QMAX;
    return CQ_OK;
}

/* 64-byte aligned scratch of at least `bytes` (never a zero-size request). */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes / 64 + 1) * 64); }

/* Activation rows per GEMM chunk: the chunk's int8 rows (~512 KiB) stay in L2 while every
 * weight panel passes over them; each panel is repacked once per chunk. */
static inline int64_t gemm_chunk_rows(int64_t K) {
    int64_t rows = (512 * 1024 / K) / GEMM_MR * GEMM_MR;
    return rows < 64 ? 64 : rows;
}

/* -128 * sum, modulo 2^32: the VNNI correction of one (row, group). */
static inline int32_t vnni_correction(int64_t sum) {
    return (int32_t)(uint32_t)((uint64_t)(-sum) * 128u);
}

/* ================================================================== AVX2 */
INLINE T_AVX2 __m256 load8_avx2(const void *x, int dt, int64_t i) {
    if (dt == CQ_F32)
        return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dt == CQ_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* float32 -> bf16 bits, round to nearest even, NaN kept quiet (as cq_f32_to_bf16). */
INLINE T_AVX2 __m128i f32_to_bf16_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

INLINE T_AVX2 void store8_avx2(void *y, int dt, int64_t i, __m256 v) {
    if (dt == CQ_F32)
        _mm256_storeu_ps((float *)y + i, v);
    else if (dt == CQ_BF16)
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), f32_to_bf16_avx2(v));
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* 8 int8 -> 8 float32 */
INLINE T_AVX2 __m256 i8x8_to_f32_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Low `n` (< 8) floats of p, the rest zero. */
INLINE T_AVX2 __m256 load_partial_f32_avx2(const float *p, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane));
}

INLINE T_AVX2 float hsum8_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Transpose 8x8 int32: r[c] becomes column c of the input rows. */
INLINE T_AVX2 void transpose8_epi32(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x31);
    }
}

/* ------------------------------------------------------------------ AVX2 quantize */
/* quantize_int8_avx2: as quantize_int8_ref (tile amax/127, x / scale round-half-even). */
INLINE T_AVX2 int quantize_int8_avx2_dt(const void *x, int dt, int8_t *q, float *scale, int64_t N,
                                        int64_t K, int64_t gn, int64_t gk, int64_t r0, int64_t r1,
                                        int64_t *bad_group) {
    const int64_t kb = CQ_CDIV(K, gk);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    for (int64_t tr = r0; tr < r1; tr++) {
        int64_t n_lo = tr * gn, n_hi = min64(n_lo + gn, N);
        for (int64_t j = 0; j < kb; j++) {
            int64_t k_lo = j * gk, k_hi = min64(k_lo + gk, K), k_vec = k_lo + (k_hi - k_lo) / 8 * 8;
            __m256i amax = _mm256_setzero_si256();
            uint32_t amax_tail = 0;
            for (int64_t n = n_lo; n < n_hi; n++) {
                for (int64_t k = k_lo; k < k_vec; k += 8) {
                    __m256i b = _mm256_and_si256(_mm256_castps_si256(load8_avx2(x, dt, n * K + k)), abs_mask);
                    amax = _mm256_max_epu32(amax, b);
                }
                for (int64_t k = k_vec; k < k_hi; k++) {
                    uint32_t b = cq_f32_bits(cq_load_f32(x, dt, n * K + k)) & 0x7fffffffu;
                    amax_tail = b > amax_tail ? b : amax_tail;
                }
            }
            __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(amax), _mm256_extracti128_si256(amax, 1));
            m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4e));
            m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xb1));
            uint32_t amax_bits = (uint32_t)_mm_cvtsi128_si32(m4);
            amax_bits = amax_tail > amax_bits ? amax_tail : amax_bits;
            float s;
            if (tile_scale(amax_bits, &s) != CQ_OK) {
                *bad_group = tr * kb + j;
                return CQ_ENONFINITE;
            }
            scale[tr * kb + j] = s;
            const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-CQ_INT8_QMAX),
                         hi = _mm256_set1_ps(CQ_INT8_QMAX);
            for (int64_t n = n_lo; n < n_hi; n++) {
                int8_t *qr = q + n * K;
                if (!(s > 0.0f)) {
                    memset(qr + k_lo, 0, (size_t)(k_hi - k_lo));
                    continue;
                }
                for (int64_t k = k_lo; k < k_vec; k += 8) {
                    __m256 r = _mm256_round_ps(_mm256_div_ps(load8_avx2(x, dt, n * K + k), vs),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
                    __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
                    _mm_storel_epi64((__m128i *)(qr + k), _mm_packs_epi16(p16, p16));
                }
                for (int64_t k = k_vec; k < k_hi; k++)
                    qr[k] = quantize_one(cq_load_f32(x, dt, n * K + k), s);
            }
        }
    }
    return CQ_OK;
}

static T_AVX2 int quantize_int8_avx2(const void *restrict x, int x_dtype, int8_t *restrict q,
                                     float *restrict scale, int64_t N, int64_t K, int64_t gn,
                                     int64_t gk, int64_t r0, int64_t r1, int64_t *restrict bad_group) {
    switch (x_dtype) {
    case CQ_BF16:
        return quantize_int8_avx2_dt(x, CQ_BF16, q, scale, N, K, gn, gk, r0, r1, bad_group);
    case CQ_F16:
        return quantize_int8_avx2_dt(x, CQ_F16, q, scale, N, K, gn, gk, r0, r1, bad_group);
    default:
        return quantize_int8_avx2_dt(x, CQ_F32, q, scale, N, K, gn, gk, r0, r1, bad_group);
    }
}

/* ------------------------------------------------------------------ AVX2 dequantize */
/* dequantize_int8_avx2: as dequantize_int8_ref (q * scale in float32, then y_dtype). */
INLINE T_AVX2 void dequantize_int8_avx2_dt(const int8_t *q, const float *scale, void *y, int dt,
                                           int64_t N, int64_t K, int64_t gn, int64_t gk, int64_t r0,
                                           int64_t r1) {
    const int64_t kb = CQ_CDIV(K, gk), n_end = min64(r1 * gn, N);
    for (int64_t n = r0 * gn; n < n_end; n++) {
        const float *s = scale + (n / gn) * kb;
        const int8_t *qr = q + n * K;
        for (int64_t g = 0; g < kb; g++) {
            int64_t k_lo = g * gk, k_hi = min64(k_lo + gk, K), k_vec = k_lo + (k_hi - k_lo) / 8 * 8;
            const __m256 vs = _mm256_set1_ps(s[g]);
            for (int64_t k = k_lo; k < k_vec; k += 8)
                store8_avx2(y, dt, n * K + k, _mm256_mul_ps(i8x8_to_f32_avx2(qr + k), vs));
            for (int64_t k = k_vec; k < k_hi; k++)
                cq_store_f32(y, dt, n * K + k, (float)qr[k] * s[g]);
        }
    }
}

static T_AVX2 int dequantize_int8_avx2(const int8_t *restrict q, const float *restrict scale,
                                       void *restrict y, int y_dtype, int64_t N, int64_t K,
                                       int64_t gn, int64_t gk, int64_t r0, int64_t r1) {
    switch (y_dtype) {
    case CQ_BF16:
        dequantize_int8_avx2_dt(q, scale, y, CQ_BF16, N, K, gn, gk, r0, r1);
        break;
    case CQ_F16:
        dequantize_int8_avx2_dt(q, scale, y, CQ_F16, N, K, gn, gk, r0, r1);
        break;
    default:
        dequantize_int8_avx2_dt(q, scale, y, CQ_F32, N, K, gn, gk, r0, r1);
    }
    return CQ_OK;
}

/* ------------------------------------------------------------------ AVX2 W8A8 GEMM (int16 pairs) */
/* Pack weight rows [nb, nb+ncols) as int16 pairs: pair t of row c at panel[(t*16 + c)*4],
 * (w[2t], w[2t+1]) sign-extended; zero past K and past ncols. */
INLINE T_AVX2 void pack_panel_i16_avx2(const int8_t *wq, int64_t K, int64_t nb, int64_t ncols,
                                       uint8_t *panel) {
    for (int64_t k = 0; k < K; k += 16) {
        int64_t len = min64(16, K - k);
        for (int h = 0; h < 2; h++) {
            __m256i r[8];
            for (int i = 0; i < 8; i++) {
                int64_t c = h * 8 + i;
                int8_t buf[16] = {0};
                const int8_t *src = wq + (nb + c) * K + k;
                if (c >= ncols)
                    src = buf;
                else if (len < 16)
                    src = memcpy(buf, src, (size_t)len);
                r[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src));
            }
            transpose8_epi32(r);
            for (int t = 0; t < 8; t++)
                _mm256_store_si256((__m256i *)(panel + ((k / 2 + t) * 16 + h * 8) * 4), r[t]);
        }
    }
}

/* Activation rows [m0, m0+mr) sign-extended to int16, zero-padded to `kpad` (multiple of 16). */
INLINE T_AVX2 void widen_rows_avx2(const int8_t *xq, int64_t K, int64_t m0, int mr, int64_t kpad,
                                   int16_t *x16) {
    for (int i = 0; i < mr; i++)
        for (int64_t k = 0; k < kpad; k += 16) {
            int8_t buf[16] = {0};
            const int8_t *src = xq + (m0 + i) * K + k;
            if (K - k < 16)
                src = memcpy(buf, src, (size_t)(K - k));
            _mm256_storeu_si256((__m256i *)(x16 + i * kpad + k),
                                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src)));
        }
}

/* Bias + masked store of 8 outputs (lanes [0, n)). */
INLINE T_AVX2 void store_out8_avx2(float *y, const float *bias, __m256 v, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), lane);
    if (bias)
        v = _mm256_add_ps(v, _mm256_maskload_ps(bias, m));
    _mm256_maskstore_ps(y, m, v);
}

/* mr rows x 16 columns: y = sum_g dot_g * (xs * ws) (+ bias), groups in order. */
INLINE T_AVX2 void gemm_tile_avx2(int mr, const uint8_t *panel, const float *wsc, const int16_t *x16,
                                  int64_t kpad, const float *xs, int64_t xs_groups, const float *bias,
                                  float *y, int64_t m0, int64_t N, int64_t K, int64_t kb, int64_t gk,
                                  int64_t nb, int64_t ncols) {
    __m256 yf[GEMM_MR][2];
    for (int i = 0; i < mr; i++)
        yf[i][0] = yf[i][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < kb; g++) {
        int64_t t_lo = g * gk / 2, t_hi = CQ_CDIV(min64(g * gk + gk, K), 2);
        __m256i acc[GEMM_MR][2];
        for (int i = 0; i < mr; i++)
            acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (int64_t t = t_lo; t < t_hi; t++) {
            const __m256i *p = (const __m256i *)(panel + t * 64);
            __m256i w0 = _mm256_load_si256(p), w1 = _mm256_load_si256(p + 1);
            for (int i = 0; i < mr; i++) {
                int32_t pair;
                memcpy(&pair, x16 + i * kpad + 2 * t, 4);
                __m256i xb = _mm256_set1_epi32(pair);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(w0, xb));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(w1, xb));
            }
        }
        __m256 ws0 = _mm256_load_ps(wsc + g * 16), ws1 = _mm256_load_ps(wsc + g * 16 + 8);
        for (int i = 0; i < mr; i++) {
            __m256 xsv = _mm256_set1_ps(xs[(m0 + i) * xs_groups + (xs_groups > 1 ? g : 0)]);
            yf[i][0] = _mm256_add_ps(yf[i][0], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), _mm256_mul_ps(xsv, ws0)));
            yf[i][1] = _mm256_add_ps(yf[i][1], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), _mm256_mul_ps(xsv, ws1)));
        }
    }
    for (int i = 0; i < mr; i++) {
        float *yr = y + (m0 + i) * N + nb;
        store_out8_avx2(yr, bias ? bias + nb : NULL, yf[i][0], ncols);
        if (ncols > 8)
            store_out8_avx2(yr + 8, bias ? bias + nb + 8 : NULL, yf[i][1], ncols - 8);
    }
}

/* gemm_int8_avx2: as gemm_int8_ref, int32 dots by vpmaddwd on int16 pairs; bit-identical. */
static T_AVX2 int gemm_int8_avx2(const int8_t *restrict xq, const float *restrict xs,
                                 const int8_t *restrict wq, const float *restrict ws, const float *bias,
                                 float *restrict y, int64_t M, int64_t N, int64_t K, int64_t xs_groups,
                                 int64_t gn, int64_t gk, int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk), kpad = CQ_CDIV(K, 16) * 16;
    if (kb > 1 && gk % 2) /* pairs would straddle groups */
        return cq_int8_ref.gemm_int8(xq, xs, wq, ws, bias, y, M, N, K, xs_groups, gn, gk, n0, n1);
    uint8_t *panel = alloc64((size_t)kpad / 2 * 64);
    float *wsc = alloc64((size_t)kb * 16 * sizeof(float));
    int16_t *x16 = alloc64((size_t)GEMM_MR * kpad * sizeof(int16_t));
    int status = CQ_OK;
    if (!panel || !wsc || !x16) {
        status = CQ_ENOMEM;
        goto done;
    }
    for (int64_t mc = 0; mc < M; mc += gemm_chunk_rows(K))
    for (int64_t nb = n0; nb < n1; nb += 16) {
        int64_t ncols = min64(16, n1 - nb), m_end = min64(M, mc + gemm_chunk_rows(K));
        pack_panel_i16_avx2(wq, K, nb, ncols, panel);
        for (int64_t g = 0; g < kb; g++)
            for (int64_t c = 0; c < 16; c++)
                wsc[g * 16 + c] = c < ncols ? ws[((nb + c) / gn) * kb + g] : 0.0f;
        for (int64_t m0 = mc; m0 < m_end; m0 += GEMM_MR) {
            int mr = (int)min64(GEMM_MR, m_end - m0);
            widen_rows_avx2(xq, K, m0, mr, kpad, x16);
#define TILE(R) gemm_tile_avx2(R, panel, wsc, x16, kpad, xs, xs_groups, bias, y, m0, N, K, kb, gk, nb, ncols)
            switch (mr) {
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1);
            }
#undef TILE
        }
    }
done:
    free(panel);
    free(wsc);
    free(x16);
    return status;
}

/* ------------------------------------------------------------------ AVX2 weight-only linear */
#define LIN_MR_AVX2 2 /* 16 ymm registers: 2 x 4 accumulators + 2 x 4 group partials */

/* Row stride of the float32 weight scratch: K rounded up to a 16-float vector, plus one
 * vector, so that rows do not share L1 sets when K is a multiple of 1024. */
static inline int64_t scratch_stride(int64_t K) { return CQ_CDIV(K, 16) * 16 + 16; }

/* Weight row of tile slot j: rows nb .. nb+nr-1, slots past nr repeat the last valid row
 * (their results are never stored). */
static inline int64_t tile_row(int64_t nb, int nr, int j) { return nb + (j < nr ? j : nr - 1); }

/* The int8 rows and scale rows of a tile's LIN_NR weight slots. */
INLINE void tile_rows(const int8_t *wq, const float *ws, int64_t nb, int nr, int64_t K, int64_t gn, int64_t kb,
                      const int8_t *wr[LIN_NR], const float *sr[LIN_NR]) {
    for (int j = 0; j < LIN_NR; j++) {
        int64_t n = tile_row(nb, nr, j);
        wr[j] = wq + n * K;
        sr[j] = ws + (n / gn) * kb;
    }
}

/* y[m0+i, nb+j] = hsum(acc[i][j]) (+ bias), j < nr; constant indices keep acc in registers. */
INLINE T_AVX2 void store_tile_avx2(int mr, int nr, __m256 acc[LIN_MR_AVX2][LIN_NR], const float *bias,
                                   float *y, int64_t m0, int64_t nb, int64_t N) {
    for (int i = 0; i < mr; i++) {
        float v[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            v[j] = hsum8_avx2(acc[i][j]);
        for (int j = 0; j < nr; j++)
            y[(m0 + i) * N + nb + j] = bias ? v[j] + bias[nb + j] : v[j];
    }
}

/* mr rows x LIN_NR weight rows (the last valid row repeats past nr): y = x (q*s)^T + bias,
 * as sum over groups of s * (x . q); each group sums into fresh registers (see AVX-512). */
INLINE T_AVX2 void linear_tile_avx2(int mr, int nr, const float *x, const int8_t *wq, const float *ws,
                                    const float *bias, float *y, int64_t m0, int64_t nb, int64_t N,
                                    int64_t K, int64_t gn, int64_t gk, int64_t kb) {
    const int8_t *wr[LIN_NR];
    const float *sr[LIN_NR];
    tile_rows(wq, ws, nb, nr, K, gn, kb, wr, sr);
    __m256 acc[LIN_MR_AVX2][LIN_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < LIN_NR; j++)
            acc[i][j] = _mm256_setzero_ps();
    const float *x0 = x + m0 * K;
    for (int64_t g = 0; g < kb; g++) {
        int64_t k_hi = min64(g * gk + gk, K), k = g * gk;
        __m256 part[LIN_MR_AVX2][LIN_NR], w[LIN_NR];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < LIN_NR; j++)
                part[i][j] = _mm256_setzero_ps();
        for (; k + 8 <= k_hi; k += 8) {
            for (int j = 0; j < LIN_NR; j++)
                w[j] = i8x8_to_f32_avx2(wr[j] + k);
            for (int i = 0; i < mr; i++) {
                __m256 xv = _mm256_loadu_ps(x0 + i * K + k);
                for (int j = 0; j < LIN_NR; j++)
                    part[i][j] = _mm256_fmadd_ps(xv, w[j], part[i][j]);
            }
        }
        if (k < k_hi) {
            for (int j = 0; j < LIN_NR; j++) {
                int8_t buf[8] = {0};
                memcpy(buf, wr[j] + k, (size_t)(k_hi - k));
                w[j] = i8x8_to_f32_avx2(buf);
            }
            for (int i = 0; i < mr; i++) {
                __m256 xv = load_partial_f32_avx2(x0 + i * K + k, k_hi - k);
                for (int j = 0; j < LIN_NR; j++)
                    part[i][j] = _mm256_fmadd_ps(xv, w[j], part[i][j]);
            }
        }
        for (int j = 0; j < LIN_NR; j++) {
            __m256 vs = _mm256_set1_ps(sr[j][g]);
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm256_fmadd_ps(part[i][j], vs, acc[i][j]);
        }
    }
    store_tile_avx2(mr, nr, acc, bias, y, m0, nb, N);
}

/* mr rows x LIN_NR float32 weight rows of the scratch wf: y = x wf^T + bias. */
INLINE T_AVX2 void linear_tile_f32_avx2(int mr, int nr, const float *x, const float *wf,
                                        const float *bias, float *y, int64_t m0, int64_t nb,
                                        int64_t N, int64_t K) {
    __m256 acc[LIN_MR_AVX2][LIN_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < LIN_NR; j++)
            acc[i][j] = _mm256_setzero_ps();
    const float *x0 = x + m0 * K;
    const int64_t ldw = scratch_stride(K);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            w[j] = _mm256_loadu_ps(wf + j * ldw + k);
        for (int i = 0; i < mr; i++) {
            __m256 xv = _mm256_loadu_ps(x0 + i * K + k);
            for (int j = 0; j < LIN_NR; j++)
                acc[i][j] = _mm256_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    if (k < K) { /* the scratch is zero-padded, only x needs a mask */
        __m256 w[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            w[j] = _mm256_loadu_ps(wf + j * ldw + k);
        for (int i = 0; i < mr; i++) {
            __m256 xv = load_partial_f32_avx2(x0 + i * K + k, K - k);
            for (int j = 0; j < LIN_NR; j++)
                acc[i][j] = _mm256_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    store_tile_avx2(mr, nr, acc, bias, y, m0, nb, N);
}

/* Dequantize weight rows nb..nb+LIN_NR-1 (the last valid row repeats past nr) to the
 * float32 scratch, q * s as the reference computes it, zero-padded to the stride. */
INLINE T_AVX2 void dequantize_block_avx2(const int8_t *wq, const float *ws, int64_t nb, int nr, int64_t K,
                                         int64_t gn, int64_t gk, int64_t kb, float *wf) {
    for (int j = 0; j < LIN_NR; j++) {
        int64_t n = tile_row(nb, nr, j);
        float *row = wf + j * scratch_stride(K);
        dequantize_int8_avx2_dt(wq + n * K, ws + (n / gn) * kb, row, CQ_F32, 1, K, 1, gk, 0, 1);
        memset(row + K, 0, (size_t)(scratch_stride(K) - K) * sizeof(float));
    }
}

/* linear_int8_avx2: as linear_int8_ref, FMA over 8 lanes (agrees to float32 rounding).
 * Up to LIN_MR_AVX2 rows it converts the weight in registers (one pass over it); above,
 * each block of LIN_NR weight rows is dequantized once into scratch for every tile. */
static T_AVX2 int linear_int8_avx2(const float *restrict x, const int8_t *restrict wq,
                                   const float *restrict ws, const float *bias, float *restrict y,
                                   int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk,
                                   int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk);
    float *wf = NULL;
    if (M > LIN_SCRATCH_M && !(wf = alloc64((size_t)LIN_NR * scratch_stride(K) * sizeof(float))))
        return CQ_ENOMEM;
    for (int64_t nb = n0; nb < n1; nb += LIN_NR) {
        int nr = (int)min64(LIN_NR, n1 - nb);
        if (wf)
            dequantize_block_avx2(wq, ws, nb, nr, K, gn, gk, kb, wf);
        for (int64_t m0 = 0; m0 < M; m0 += LIN_MR_AVX2) {
            int mr = (int)min64(LIN_MR_AVX2, M - m0);
            if (wf)
                mr == 2 ? linear_tile_f32_avx2(2, nr, x, wf, bias, y, m0, nb, N, K)
                        : linear_tile_f32_avx2(1, nr, x, wf, bias, y, m0, nb, N, K);
            else
                mr == 2 ? linear_tile_avx2(2, nr, x, wq, ws, bias, y, m0, nb, N, K, gn, gk, kb)
                        : linear_tile_avx2(1, nr, x, wq, ws, bias, y, m0, nb, N, K, gn, gk, kb);
        }
    }
    free(wf);
    return CQ_OK;
}

/* ================================================================== AVX-512 */
INLINE T_AVX512 __mmask16 mask16(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n > 0 ? n : 0)) - 1);
}

INLINE T_AVX512 __mmask32 mask32(int64_t n) {
    return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (n > 0 ? n : 0)) - 1);
}

INLINE T_AVX512 __mmask64 mask64(int64_t n) {
    return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n > 0 ? n : 0)) - 1);
}

/* 16 elements of x (dtype dt) from element i as float32 (exact), lanes outside m zero. */
INLINE T_AVX512 __m512 load16_avx512(const void *x, int dt, int64_t i, __mmask16 m) {
    if (dt == CQ_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)x + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i);
    if (dt == CQ_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* float32 -> bf16 bits, round to nearest even, NaN kept quiet (as cq_f32_to_bf16). */
INLINE T_AVX512 __m256i f32_to_bf16_avx512(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

INLINE T_AVX512 void store16_avx512(void *y, int dt, int64_t i, __m512 v, __mmask16 m) {
    if (dt == CQ_F32)
        _mm512_mask_storeu_ps((float *)y + i, m, v);
    else if (dt == CQ_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)y + i, m, f32_to_bf16_avx512(v));
    else
        _mm256_mask_storeu_epi16((uint16_t *)y + i, m,
                                 _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* Transpose 16x16 int32: r[c] becomes column c of the input rows. */
INLINE T_AVX512 void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i+c] lane L: column 4L+c of rows 4i..4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) { /* gather lane L of the four row groups */
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
    }
}

/* ------------------------------------------------------------------ AVX-512 quantize */
/* max |x| as float32 bits over rows [n_lo, n_hi) x cols [k_lo, k_hi): finite < Inf < NaN. */
INLINE T_AVX512 uint32_t tile_amax_bits_avx512(const void *x, int dt, int64_t K, int64_t n_lo,
                                               int64_t n_hi, int64_t k_lo, int64_t k_hi) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    for (int64_t n = n_lo; n < n_hi; n++) {
        int64_t k = k_lo;
        for (; k + 32 <= k_hi; k += 32) {
            __m512 v0 = load16_avx512(x, dt, n * K + k, 0xffff), v1 = load16_avx512(x, dt, n * K + k + 16, 0xffff);
            a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_castps_si512(v0), abs_mask));
            a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_castps_si512(v1), abs_mask));
        }
        for (; k < k_hi; k += 16) {
            __m512 v = load16_avx512(x, dt, n * K + k, mask16(k_hi - k));
            a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
        }
    }
    return _mm512_reduce_max_epu32(_mm512_max_epu32(a0, a1));
}

/* q = clamp(round-half-even(x / s)) over one tile, s > 0. */
INLINE T_AVX512 void tile_quantize_avx512(const void *x, int dt, int8_t *q, float s, int64_t K,
                                          int64_t n_lo, int64_t n_hi, int64_t k_lo, int64_t k_hi) {
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-CQ_INT8_QMAX), hi = _mm512_set1_ps(CQ_INT8_QMAX);
    for (int64_t n = n_lo; n < n_hi; n++)
        for (int64_t k = k_lo; k < k_hi; k += 16) {
            __mmask16 m = mask16(k_hi - k);
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16_avx512(x, dt, n * K + k, m), vs),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            _mm_mask_storeu_epi8(q + n * K + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
        }
}

/* quantize_int8_avx512: as quantize_int8_ref (tile amax/127, x / scale round-half-even). */
INLINE T_AVX512 int quantize_int8_avx512_dt(const void *x, int dt, int8_t *q, float *scale, int64_t N,
                                            int64_t K, int64_t gn, int64_t gk, int64_t r0, int64_t r1,
                                            int64_t *bad_group) {
    const int64_t kb = CQ_CDIV(K, gk);
    for (int64_t tr = r0; tr < r1; tr++) {
        int64_t n_lo = tr * gn, n_hi = min64(n_lo + gn, N);
        for (int64_t j = 0; j < kb; j++) {
            int64_t k_lo = j * gk, k_hi = min64(k_lo + gk, K);
            float s;
            if (tile_scale(tile_amax_bits_avx512(x, dt, K, n_lo, n_hi, k_lo, k_hi), &s) != CQ_OK) {
                *bad_group = tr * kb + j;
                return CQ_ENONFINITE;
            }
            scale[tr * kb + j] = s;
            if (s > 0.0f)
                tile_quantize_avx512(x, dt, q, s, K, n_lo, n_hi, k_lo, k_hi);
            else
                for (int64_t n = n_lo; n < n_hi; n++)
                    memset(q + n * K + k_lo, 0, (size_t)(k_hi - k_lo));
        }
    }
    return CQ_OK;
}

static T_AVX512 int quantize_int8_avx512(const void *restrict x, int x_dtype, int8_t *restrict q,
                                         float *restrict scale, int64_t N, int64_t K, int64_t gn,
                                         int64_t gk, int64_t r0, int64_t r1, int64_t *restrict bad_group) {
    switch (x_dtype) {
    case CQ_BF16:
        return quantize_int8_avx512_dt(x, CQ_BF16, q, scale, N, K, gn, gk, r0, r1, bad_group);
    case CQ_F16:
        return quantize_int8_avx512_dt(x, CQ_F16, q, scale, N, K, gn, gk, r0, r1, bad_group);
    default:
        return quantize_int8_avx512_dt(x, CQ_F32, q, scale, N, K, gn, gk, r0, r1, bad_group);
    }
}

/* ------------------------------------------------------------------ AVX-512 dequantize */
/* dequantize_int8_avx512: as dequantize_int8_ref (q * scale in float32, then y_dtype). */
INLINE T_AVX512 void dequantize_int8_avx512_dt(const int8_t *q, const float *scale, void *y, int dt,
                                               int64_t N, int64_t K, int64_t gn, int64_t gk,
                                               int64_t r0, int64_t r1) {
    const int64_t kb = CQ_CDIV(K, gk), n_end = min64(r1 * gn, N);
    for (int64_t n = r0 * gn; n < n_end; n++) {
        const float *s = scale + (n / gn) * kb;
        const int8_t *qr = q + n * K;
        for (int64_t g = 0; g < kb; g++) {
            int64_t k_lo = g * gk, k_hi = min64(k_lo + gk, K);
            const __m512 vs = _mm512_set1_ps(s[g]);
            for (int64_t k = k_lo; k < k_hi; k += 16) {
                __mmask16 m = mask16(k_hi - k);
                __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, qr + k)));
                store16_avx512(y, dt, n * K + k, _mm512_mul_ps(v, vs), m);
            }
        }
    }
}

static T_AVX512 int dequantize_int8_avx512(const int8_t *restrict q, const float *restrict scale,
                                           void *restrict y, int y_dtype, int64_t N, int64_t K,
                                           int64_t gn, int64_t gk, int64_t r0, int64_t r1) {
    switch (y_dtype) {
    case CQ_BF16:
        dequantize_int8_avx512_dt(q, scale, y, CQ_BF16, N, K, gn, gk, r0, r1);
        break;
    case CQ_F16:
        dequantize_int8_avx512_dt(q, scale, y, CQ_F16, N, K, gn, gk, r0, r1);
        break;
    default:
        dequantize_int8_avx512_dt(q, scale, y, CQ_F32, N, K, gn, gk, r0, r1);
    }
    return CQ_OK;
}

/* ------------------------------------------------------------------ AVX-512 W8A8 GEMM, shared */
/* Scales of the panel's columns per group: wsc[g*32 + c] (0 past ncols). */
static void panel_scales(const float *ws, int64_t nb, int64_t ncols, int64_t gn, int64_t kb, float *wsc) {
    for (int64_t g = 0; g < kb; g++)
        for (int64_t c = 0; c < PANEL_N; c++)
            wsc[g * PANEL_N + c] = c < ncols ? ws[((nb + c) / gn) * kb + g] : 0.0f;
}

/* y += dot * (xs * ws) for one row's two 16-column halves (the reference's epilogue). */
INLINE T_AVX512 void epilogue_avx512(__m512 yf[2], const __m512i acc[2], float x_s, const float *wsc_g) {
    __m512 xsv = _mm512_set1_ps(x_s);
    yf[0] = _mm512_add_ps(yf[0], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[0]), _mm512_mul_ps(xsv, _mm512_load_ps(wsc_g))));
    yf[1] = _mm512_add_ps(yf[1], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[1]), _mm512_mul_ps(xsv, _mm512_load_ps(wsc_g + 16))));
}

/* (+ bias) and store one row's 32 columns, lanes [0, ncols). */
INLINE T_AVX512 void store_row_avx512(float *yr, const float *bias, const __m512 yf[2], int64_t ncols) {
    for (int h = 0; h < 2; h++) {
        __mmask16 m = mask16(ncols - 16 * h);
        __m512 v = yf[h];
        if (bias)
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + 16 * h));
        _mm512_mask_storeu_ps(yr + 16 * h, m, v);
    }
}

/* ------------------------------------------------------------------ AVX-512 GEMM (int16 pairs) */
/* Pack weight rows [nb, nb+ncols) as int16 pairs: pair t of row c at panel[(t*32 + c)*4]. */
INLINE T_AVX512 void pack_panel_i16_avx512(const int8_t *wq, int64_t K, int64_t nb, int64_t ncols,
                                           uint8_t *panel) {
    for (int64_t k = 0; k < K; k += 32) {
        __mmask32 m = mask32(K - k);
        for (int h = 0; h < 2; h++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                int64_t c = h * 16 + i;
                r[i] = c < ncols ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, wq + (nb + c) * K + k))
                                 : _mm512_setzero_si512();
            }
            transpose16_epi32(r);
            for (int t = 0; t < 16; t++)
                _mm512_store_si512(panel + ((k / 2 + t) * PANEL_N + h * 16) * 4, r[t]);
        }
    }
}

/* Activation rows [m0, m0+mr) sign-extended to int16, zero-padded to kpad (multiple of 32). */
INLINE T_AVX512 void widen_rows_avx512(const int8_t *xq, int64_t K, int64_t m0, int mr, int64_t kpad,
                                       int16_t *x16) {
    for (int i = 0; i < mr; i++)
        for (int64_t k = 0; k < kpad; k += 32)
            _mm512_store_si512(x16 + i * kpad + k,
                               _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask32(K - k), xq + (m0 + i) * K + k)));
}

INLINE T_AVX512 void gemm_tile_i16_avx512(int mr, const uint8_t *panel, const float *wsc,
                                          const int16_t *x16, int64_t kpad, const float *xs,
                                          int64_t xs_groups, const float *bias, float *y, int64_t m0,
                                          int64_t N, int64_t K, int64_t kb, int64_t gk, int64_t nb,
                                          int64_t ncols) {
    __m512 yf[GEMM_MR][2];
    for (int i = 0; i < mr; i++)
        yf[i][0] = yf[i][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < kb; g++) {
        int64_t t_lo = g * gk / 2, t_hi = CQ_CDIV(min64(g * gk + gk, K), 2);
        __m512i acc[GEMM_MR][2];
        for (int i = 0; i < mr; i++)
            acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        for (int64_t t = t_lo; t < t_hi; t++) {
            const uint8_t *p = panel + t * PANEL_N * 4;
            __m512i w0 = _mm512_load_si512(p), w1 = _mm512_load_si512(p + 64);
            for (int i = 0; i < mr; i++) {
                int32_t pair;
                memcpy(&pair, x16 + i * kpad + 2 * t, 4);
                __m512i xb = _mm512_set1_epi32(pair);
                acc[i][0] = _mm512_add_epi32(acc[i][0], _mm512_madd_epi16(w0, xb));
                acc[i][1] = _mm512_add_epi32(acc[i][1], _mm512_madd_epi16(w1, xb));
            }
        }
        for (int i = 0; i < mr; i++)
            epilogue_avx512(yf[i], acc[i], xs[(m0 + i) * xs_groups + (xs_groups > 1 ? g : 0)], wsc + g * PANEL_N);
    }
    for (int i = 0; i < mr; i++)
        store_row_avx512(y + (m0 + i) * N + nb, bias ? bias + nb : NULL, yf[i], ncols);
}

/* gemm_int8_avx512: as gemm_int8_ref, int32 dots by vpmaddwd on int16 pairs; bit-identical. */
static T_AVX512 int gemm_int8_avx512(const int8_t *restrict xq, const float *restrict xs,
                                     const int8_t *restrict wq, const float *restrict ws,
                                     const float *bias, float *restrict y, int64_t M, int64_t N,
                                     int64_t K, int64_t xs_groups, int64_t gn, int64_t gk, int64_t n0,
                                     int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk), kpad = CQ_CDIV(K, 32) * 32;
    if (kb > 1 && gk % 2)
        return cq_int8_ref.gemm_int8(xq, xs, wq, ws, bias, y, M, N, K, xs_groups, gn, gk, n0, n1);
    uint8_t *panel = alloc64((size_t)kpad / 2 * PANEL_N * 4);
    float *wsc = alloc64((size_t)kb * PANEL_N * sizeof(float));
    int16_t *x16 = alloc64((size_t)GEMM_MR * kpad * sizeof(int16_t));
    int status = CQ_OK;
    if (!panel || !wsc || !x16) {
        status = CQ_ENOMEM;
        goto done;
    }
    for (int64_t mc = 0; mc < M; mc += gemm_chunk_rows(K))
    for (int64_t nb = n0; nb < n1; nb += PANEL_N) {
        int64_t ncols = min64(PANEL_N, n1 - nb), m_end = min64(M, mc + gemm_chunk_rows(K));
        pack_panel_i16_avx512(wq, K, nb, ncols, panel);
        panel_scales(ws, nb, ncols, gn, kb, wsc);
        for (int64_t m0 = mc; m0 < m_end; m0 += GEMM_MR) {
            int mr = (int)min64(GEMM_MR, m_end - m0);
            widen_rows_avx512(xq, K, m0, mr, kpad, x16);
#define TILE(R) gemm_tile_i16_avx512(R, panel, wsc, x16, kpad, xs, xs_groups, bias, y, m0, N, K, kb, gk, nb, ncols)
            switch (mr) {
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1);
            }
#undef TILE
        }
    }
done:
    free(panel);
    free(wsc);
    free(x16);
    return status;
}

/* ------------------------------------------------------------------ AVX-512 weight-only linear */
/* y[m0+i, nb+j] = sum of acc[i][j]'s lanes (+ bias), j < nr. Every acc is reduced
 * with constant indices so that the array stays in registers. */
INLINE T_AVX512 void store_tile_avx512(int mr, int nr, __m512 acc[LIN_MR][LIN_NR], const float *bias,
                                       float *y, int64_t m0, int64_t nb, int64_t N) {
    for (int i = 0; i < mr; i++) {
        float v[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            v[j] = _mm512_reduce_add_ps(acc[i][j]);
        for (int j = 0; j < nr; j++)
            y[(m0 + i) * N + nb + j] = bias ? v[j] + bias[nb + j] : v[j];
    }
}

/* LIN_NR weight rows' 16 int8 values from k as float32 (lanes outside m zero). */
INLINE T_AVX512 void widen16_rows_avx512(const int8_t *const wr[LIN_NR], int64_t k, __mmask16 m,
                                         __m512 w[LIN_NR]) {
    for (int j = 0; j < LIN_NR; j++)
        w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, wr[j] + k)));
}

/* mr rows x LIN_NR weight rows (the last valid row repeats past nr): y = x (q*s)^T + bias,
 * as sum over groups of s * (x . q). Each group sums into fresh registers: an
 * accumulator live across groups is spilled by GCC on every step (the int8 loads may
 * alias it). */
INLINE T_AVX512 void linear_tile_avx512(int mr, int nr, const float *x, const int8_t *wq, const float *ws,
                                        const float *bias, float *y, int64_t m0, int64_t nb, int64_t N,
                                        int64_t K, int64_t gn, int64_t gk, int64_t kb) {
    const int8_t *wr[LIN_NR];
    const float *sr[LIN_NR];
    tile_rows(wq, ws, nb, nr, K, gn, kb, wr, sr);
    __m512 acc[LIN_MR][LIN_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < LIN_NR; j++)
            acc[i][j] = _mm512_setzero_ps();
    const float *x0 = x + m0 * K;
    for (int64_t g = 0; g < kb; g++) {
        int64_t k_hi = min64(g * gk + gk, K), k = g * gk;
        __m512 part[LIN_MR][LIN_NR], w[LIN_NR];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < LIN_NR; j++)
                part[i][j] = _mm512_setzero_ps();
        for (; k + 16 <= k_hi; k += 16) {
            widen16_rows_avx512(wr, k, 0xffff, w);
            for (int i = 0; i < mr; i++) {
                __m512 xv = _mm512_loadu_ps(x0 + i * K + k);
                for (int j = 0; j < LIN_NR; j++)
                    part[i][j] = _mm512_fmadd_ps(xv, w[j], part[i][j]);
            }
        }
        if (k < k_hi) {
            __mmask16 m = mask16(k_hi - k);
            widen16_rows_avx512(wr, k, m, w);
            for (int i = 0; i < mr; i++) {
                __m512 xv = _mm512_maskz_loadu_ps(m, x0 + i * K + k);
                for (int j = 0; j < LIN_NR; j++)
                    part[i][j] = _mm512_fmadd_ps(xv, w[j], part[i][j]);
            }
        }
        for (int j = 0; j < LIN_NR; j++) {
            __m512 vs = _mm512_set1_ps(sr[j][g]);
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm512_fmadd_ps(part[i][j], vs, acc[i][j]);
        }
    }
    store_tile_avx512(mr, nr, acc, bias, y, m0, nb, N);
}

/* Dequantize weight rows nb..nb+LIN_NR-1 (the last valid row repeats past nr) to
 * float32 wf[j*ldw + k] = q * s, the reference's product. */
INLINE T_AVX512 void dequantize_block_avx512(const int8_t *wq, const float *ws, int64_t nb, int nr,
                                             int64_t K, int64_t gn, int64_t gk, int64_t kb, float *wf) {
    for (int j = 0; j < LIN_NR; j++) {
        int64_t n = tile_row(nb, nr, j);
        float *row = wf + j * scratch_stride(K);
        dequantize_int8_avx512_dt(wq + n * K, ws + (n / gn) * kb, row, CQ_F32, 1, K, 1, gk, 0, 1);
        memset(row + K, 0, (size_t)(scratch_stride(K) - K) * sizeof(float));
    }
}

/* mr rows x LIN_NR float32 weight rows wf (row j at wf + j*scratch_stride(K)): y = x wf^T + bias. */
INLINE T_AVX512 void linear_tile_f32_avx512(int mr, int nr, const float *x, const float *wf,
                                            const float *bias, float *y, int64_t m0, int64_t nb,
                                            int64_t N, int64_t K) {
    __m512 acc[LIN_MR][LIN_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < LIN_NR; j++)
            acc[i][j] = _mm512_setzero_ps();
    const float *x0 = x + m0 * K;
    const int64_t ldw = scratch_stride(K);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) { /* unmasked: masked loads are slower here */
        __m512 w[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            w[j] = _mm512_loadu_ps(wf + j * ldw + k);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_loadu_ps(x0 + i * K + k);
            for (int j = 0; j < LIN_NR; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    if (k < K) { /* the scratch is zero-padded, only x needs a mask */
        __mmask16 m = mask16(K - k);
        __m512 w[LIN_NR];
        for (int j = 0; j < LIN_NR; j++)
            w[j] = _mm512_maskz_loadu_ps(m, wf + j * ldw + k);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x0 + i * K + k);
            for (int j = 0; j < LIN_NR; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    store_tile_avx512(mr, nr, acc, bias, y, m0, nb, N);
}

/* linear_int8_avx512: as linear_int8_ref, FMA over 16 lanes (agrees to float32 rounding).
 * Up to LIN_MR rows it dequantizes in registers (one pass over the weight); above, each
 * block of LIN_NR weight rows is dequantized once into scratch and reused by every tile. */
static T_AVX512 int linear_int8_avx512(const float *restrict x, const int8_t *restrict wq,
                                       const float *restrict ws, const float *bias, float *restrict y,
                                       int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk,
                                       int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk);
    float *wf = NULL;
    if (M > LIN_SCRATCH_M && !(wf = alloc64((size_t)LIN_NR * scratch_stride(K) * sizeof(float))))
        return CQ_ENOMEM;
    for (int64_t nb = n0; nb < n1; nb += LIN_NR) {
        int nr = (int)min64(LIN_NR, n1 - nb);
        if (wf)
            dequantize_block_avx512(wq, ws, nb, nr, K, gn, gk, kb, wf);
        for (int64_t m0 = 0; m0 < M; m0 += LIN_MR) {
#define TILE(R)                                                                         \
    (wf ? linear_tile_f32_avx512(R, nr, x, wf, bias, y, m0, nb, N, K)                   \
        : linear_tile_avx512(R, nr, x, wq, ws, bias, y, m0, nb, N, K, gn, gk, kb))
            switch (min64(LIN_MR, M - m0)) {
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1);
            }
#undef TILE
        }
    }
    free(wf);
    return CQ_OK;
}

/* ================================================================== AVX-512 VNNI GEMM */
/* Pack weight rows [nb, nb+ncols) for vpdpbusd: quad t (k = 4t..4t+3) of row c at
 * panel[(t*32 + c)*4] as w + 128 (u8); zero past K and past ncols, where it meets
 * zero-padded activations, so it adds nothing. */
INLINE T_VNNI void pack_panel_vnni(const int8_t *wq, int64_t K, int64_t nb, int64_t ncols, uint8_t *panel) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t k = 0; k < K; k += 64) {
        __mmask64 m = mask64(K - k);
        for (int h = 0; h < 2; h++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                int64_t c = h * 16 + i;
                r[i] = c < ncols ? _mm512_maskz_mov_epi8(m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, wq + (nb + c) * K + k), flip))
                                 : _mm512_setzero_si512();
            }
            transpose16_epi32(r);
            for (int t = 0; t < 16; t++)
                _mm512_store_si512(panel + ((k / 4 + t) * PANEL_N + h * 16) * 4, r[t]);
        }
    }
}

/* corr[m*kb + g] = -128 * sum of xq[m, group g] (mod 2^32), for rows [0, M). */
INLINE T_VNNI void vnni_corrections(const int8_t *xq, int64_t M, int64_t K, int64_t gk, int64_t kb,
                                    int32_t *corr) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < kb; g++) {
            int64_t k_lo = g * gk, k_hi = min64(k_lo + gk, K);
            __m512i acc = zero; /* sums of x + 128 as u8, 8 lanes of u64 */
            for (int64_t k = k_lo; k < k_hi; k += 64) {
                __mmask64 m8 = mask64(k_hi - k);
                __m512i v = _mm512_maskz_mov_epi8(m8, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m8, xq + m * K + k), flip));
                acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, zero));
            }
            int64_t sum = (int64_t)_mm512_reduce_add_epi64(acc) - 128 * (k_hi - k_lo);
            corr[m * kb + g] = vnni_correction(sum);
        }
}

/* acc += per dword, sum of 4 products u8 w * s8 x (vpdpbusd). GCC 12 copies the
 * accumulator twice around each _mm512_dpbusd_epi32 in a loop, so GCC gets asm. */
INLINE T_VNNI __m512i dpbusd(__m512i acc, __m512i w, __m512i x) {
#if defined(__clang__)
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
#endif
}

/* Activation quad t of row xr (4 bytes; zero past k_end). */
INLINE T_VNNI __m512i x_quad(const int8_t *xr, int64_t t, int64_t k_end) {
    int32_t v = 0;
    memcpy(&v, xr + 4 * t, (size_t)min64(4, k_end - 4 * t));
    return _mm512_set1_epi32(v);
}

INLINE T_VNNI void gemm_tile_vnni(int mr, const uint8_t *panel, const float *wsc, const int8_t *xq,
                                  const float *xs, int64_t xs_groups, const int32_t *corr,
                                  const float *bias, float *y, int64_t m0, int64_t N, int64_t K,
                                  int64_t kb, int64_t gk, int64_t nb, int64_t ncols) {
    __m512 yf[GEMM_MR][2];
    const int8_t *xr[GEMM_MR];
    for (int i = 0; i < mr; i++) {
        yf[i][0] = yf[i][1] = _mm512_setzero_ps();
        xr[i] = xq + (m0 + i) * K;
    }
    for (int64_t g = 0; g < kb; g++) {
        int64_t k_hi = min64(g * gk + gk, K), t_lo = g * gk / 4, t_full = k_hi / 4;
        __m512i acc[GEMM_MR][2];
        for (int i = 0; i < mr; i++)
            acc[i][0] = acc[i][1] = _mm512_set1_epi32(corr[(m0 + i) * kb + g]);
        for (int64_t t = t_lo; t < t_full; t++) {
            const uint8_t *p = panel + t * PANEL_N * 4;
            __m512i w0 = _mm512_load_si512(p), w1 = _mm512_load_si512(p + 64);
            for (int i = 0; i < mr; i++) {
                int32_t quad;
                memcpy(&quad, xr[i] + 4 * t, 4);
                __m512i xb = _mm512_set1_epi32(quad);
                acc[i][0] = dpbusd(acc[i][0], w0, xb);
                acc[i][1] = dpbusd(acc[i][1], w1, xb);
            }
        }
        if (t_full * 4 < k_hi) { /* K ends inside a quad: read only its bytes */
            const uint8_t *p = panel + t_full * PANEL_N * 4;
            __m512i w0 = _mm512_load_si512(p), w1 = _mm512_load_si512(p + 64);
            for (int i = 0; i < mr; i++) {
                __m512i xb = x_quad(xr[i], t_full, k_hi);
                acc[i][0] = dpbusd(acc[i][0], w0, xb);
                acc[i][1] = dpbusd(acc[i][1], w1, xb);
            }
        }
        for (int i = 0; i < mr; i++)
            epilogue_avx512(yf[i], acc[i], xs[(m0 + i) * xs_groups + (xs_groups > 1 ? g : 0)], wsc + g * PANEL_N);
    }
    for (int i = 0; i < mr; i++)
        store_row_avx512(y + (m0 + i) * N + nb, bias ? bias + nb : NULL, yf[i], ncols);
}

/* Lane r of the result = sum of the 16 lanes of a[r] (int32, wrapping): 45 ops. */
INLINE T_VNNI __m512i reduce16_epi32(const __m512i a[16]) {
    __m512i u[8], v[4];
    for (int i = 0; i < 8; i++) /* 128-bit lane L: [a0+a2, b0+b2, a1+a3, b1+b3] of rows 2i, 2i+1 */
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]),
                                _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* lane L: the lane-L sums of rows 4i..4i+3 */
        v[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * i], u[2 * i + 1]),
                                _mm512_unpackhi_epi64(u[2 * i], u[2 * i + 1]));
    __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x88), _mm512_shuffle_i32x4(v[0], v[1], 0xdd));
    __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2], v[3], 0x88), _mm512_shuffle_i32x4(v[2], v[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xdd));
}

/* Small M without packing: 16 weight rows at a time, each row's K-slice dotted with the
 * activation row (weights as the unsigned operand, w ^ 0x80), the 16 accumulators
 * reduced to one vector of 16 row dots per group, then the reference's epilogue. */
static T_VNNI int gemm_small_m_vnni(const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
                                    const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                                    int64_t xs_groups, int64_t gn, int64_t gk, int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    float *wsc = alloc64((size_t)kb * 16 * sizeof(float));
    int32_t *corr = alloc64((size_t)M * kb * sizeof(int32_t));
    if (!wsc || !corr) {
        free(wsc);
        free(corr);
        return CQ_ENOMEM;
    }
    vnni_corrections(xq, M, K, gk, kb, corr);
    for (int64_t nb = n0; nb < n1; nb += 16) {
        int64_t ncols = min64(16, n1 - nb);
        const int8_t *wr[16];
        for (int r = 0; r < 16; r++)
            wr[r] = wq + (nb + (r < ncols ? r : ncols - 1)) * K;
        for (int64_t g = 0; g < kb; g++)
            for (int r = 0; r < 16; r++)
                wsc[g * 16 + r] = r < ncols ? ws[((nb + r) / gn) * kb + g] : 0.0f;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xr = xq + m * K;
            __m512 yf = _mm512_setzero_ps();
            for (int64_t g = 0; g < kb; g++) {
                int64_t k = g * gk, k_hi = min64(k + gk, K);
                __m512i acc[16];
                for (int r = 0; r < 16; r++)
                    acc[r] = _mm512_setzero_si512();
                for (; k + 64 <= k_hi; k += 64) {
                    __m512i xv = _mm512_loadu_si512(xr + k);
                    for (int r = 0; r < 16; r++)
                        acc[r] = dpbusd(acc[r], _mm512_xor_si512(_mm512_loadu_si512(wr[r] + k), flip), xv);
                }
                if (k < k_hi) { /* x is zero past k_hi, so the weight bytes there add nothing */
                    __mmask64 m8 = mask64(k_hi - k);
                    __m512i xv = _mm512_maskz_loadu_epi8(m8, xr + k);
                    for (int r = 0; r < 16; r++)
                        acc[r] = dpbusd(acc[r], _mm512_xor_si512(_mm512_maskz_loadu_epi8(m8, wr[r] + k), flip), xv);
                }
                __m512i dot = _mm512_add_epi32(reduce16_epi32(acc), _mm512_set1_epi32(corr[m * kb + g]));
                __m512 xsv = _mm512_set1_ps(xs[m * xs_groups + (xs_groups > 1 ? g : 0)]);
                yf = _mm512_add_ps(yf, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(xsv, _mm512_load_ps(wsc + g * 16))));
            }
            __mmask16 mk = mask16(ncols);
            if (bias)
                yf = _mm512_add_ps(yf, _mm512_maskz_loadu_ps(mk, bias + nb));
            _mm512_mask_storeu_ps(y + m * N + nb, mk, yf);
        }
    }
    free(wsc);
    free(corr);
    return CQ_OK;
}

/* gemm_int8_avx512vnni: as gemm_int8_ref, int32 dots by vpdpbusd (w + 128, minus
 * 128 * sum x); bit-identical. */
static T_VNNI int gemm_int8_avx512vnni(const int8_t *restrict xq, const float *restrict xs,
                                       const int8_t *restrict wq, const float *restrict ws,
                                       const float *bias, float *restrict y, int64_t M, int64_t N,
                                       int64_t K, int64_t xs_groups, int64_t gn, int64_t gk,
                                       int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk), quads = CQ_CDIV(K, 64) * 16;
    /* packing costs more than it saves; with narrow groups the per-group reduction of
     * the direct path wins only for one row */
    if (M == 1 || (M <= GEMM_SMALL_M && (gk >= 64 || kb == 1)))
        return gemm_small_m_vnni(xq, xs, wq, ws, bias, y, M, N, K, xs_groups, gn, gk, n0, n1);
    if (kb > 1 && gk % 4) /* quads would straddle groups */
        return cq_int8_ref.gemm_int8(xq, xs, wq, ws, bias, y, M, N, K, xs_groups, gn, gk, n0, n1);
    uint8_t *panel = alloc64((size_t)quads * PANEL_N * 4);
    float *wsc = alloc64((size_t)kb * PANEL_N * sizeof(float));
    int32_t *corr = alloc64((size_t)M * kb * sizeof(int32_t));
    int status = CQ_OK;
    if (!panel || !wsc || !corr) {
        status = CQ_ENOMEM;
        goto done;
    }
    vnni_corrections(xq, M, K, gk, kb, corr);
    for (int64_t mc = 0; mc < M; mc += gemm_chunk_rows(K))
    for (int64_t nb = n0; nb < n1; nb += PANEL_N) {
        int64_t ncols = min64(PANEL_N, n1 - nb), m_end = min64(M, mc + gemm_chunk_rows(K));
        pack_panel_vnni(wq, K, nb, ncols, panel);
        panel_scales(ws, nb, ncols, gn, kb, wsc);
        for (int64_t m0 = mc; m0 < m_end; m0 += GEMM_MR) {
#define TILE(R) gemm_tile_vnni(R, panel, wsc, xq, xs, xs_groups, corr, bias, y, m0, N, K, kb, gk, nb, ncols)
            switch (min64(GEMM_MR, m_end - m0)) {
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1);
            }
#undef TILE
        }
    }
done:
    free(panel);
    free(wsc);
    free(corr);
    return status;
}

const cq_cpu_kernels cq_int8_avx2 = {
    .name = "avx2",
    .quantize_int8 = quantize_int8_avx2,
    .dequantize_int8 = dequantize_int8_avx2,
    .gemm_int8 = gemm_int8_avx2,
    .linear_int8 = linear_int8_avx2,
};
const cq_cpu_kernels cq_int8_avx512 = {
    .name = "avx512",
    .quantize_int8 = quantize_int8_avx512,
    .dequantize_int8 = dequantize_int8_avx512,
    .gemm_int8 = gemm_int8_avx512,
    .linear_int8 = linear_int8_avx512,
};
const cq_cpu_kernels cq_int8_avx512vnni = {
    .name = "avx512vnni",
    .gemm_int8 = gemm_int8_avx512vnni,
};

#else /* not x86-64 GCC/Clang: the reference serves every level */
const cq_cpu_kernels cq_int8_avx2 = {.name = "avx2"};
const cq_cpu_kernels cq_int8_avx512 = {.name = "avx512"};
const cq_cpu_kernels cq_int8_avx512vnni = {.name = "avx512vnni"};
#endif
