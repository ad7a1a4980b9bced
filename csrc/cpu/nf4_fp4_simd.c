/* nf4_fp4_simd.c: AVX2 and AVX-512 variants of the 4-bit kernels (nf4_fp4.c has the
 * reference). Each is compiled for its target with a function attribute, chosen at
 * run time by dispatch.c, and bit-identical to the reference for (de)quantize.
 *
 * How they stay bit-identical:
 * - dequantize: per group, the 16 possible outputs table[code] * absmax are computed
 *   once (the same float32 products the reference forms element by element) and
 *   rounded to the output dtype (RNE, as convert.h); the codes then only index that
 *   16-entry table with a permute (vpermps / vpermw) or a byte shuffle (vpshufb).
 * - quantize: the group's absmax is the max of |x| bits (as the reference), the
 *   reciprocal is the same scalar division, each x * recip is one float32 multiply,
 *   and the code is the count of midpoints below it, found by a branch-free binary
 *   search over the sorted midpoints (same answer as counting: they are strictly
 *   increasing).
 * Tails (a last partial group, an odd n, a range that starts or ends mid-row) use
 * masked loads/stores (AVX-512) or the scalar rules of nf4_fp4_tables.h (AVX2).
 * Linear sums in another order than the reference and agrees to float32 rounding.
 */
#include <stdint.h>
#include <string.h>

#include "../kernels.h"
#include "convert.h"
#include "nf4_fp4_tables.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define CQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define CQ_INLINE static inline __attribute__((always_inline))

/* Outputs at least this large are written with non-temporal (streaming) stores: they
 * cannot stay in cache anyway, and streaming skips the read-for-ownership of each
 * line, which is a third of the traffic of a plain store. */
#define CQ_STREAM_MIN_BYTES ((int64_t)16 << 20)

static inline int use_stream_stores(const void *y, int64_t bytes, int align) {
    return bytes >= CQ_STREAM_MIN_BYTES && ((uintptr_t)y % (uintptr_t)align) == 0;
}

/* Code of element i (high nibble first) and the group bounds of group g. */
static inline uint8_t code_at(const uint8_t *packed, int64_t i) {
    uint8_t b = packed[i >> 1];
    return (i & 1) ? (uint8_t)(b & 0xF) : (uint8_t)(b >> 4);
}

static inline int64_t group_end(int64_t g, int64_t group, int64_t n) {
    int64_t end = (g + 1) * group;
    return end < n ? end : n;
}

/* ================================================================== AVX-512 */

/* ---------------------------------------------------------------- helpers */
/* 16 dword indices, in element order, of the codes in 8 packed bytes: the low dword of
 * each qword is b >> 4 (element 2j), the high dword b itself, whose low nibble is
 * element 2j+1; vpermps reads only bits 0-3 of an index. */
CQ_INLINE CQ_AVX512 __m512i codes16_from_qwords_avx512(__m512i q) {
    return _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
}

CQ_INLINE CQ_AVX512 __m512i codes16_avx512(const uint8_t *p) {
    return codes16_from_qwords_avx512(_mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)p)));
}

/* Same for the first `bytes` (< 8) bytes only, without reading past them. */
CQ_INLINE CQ_AVX512 __m512i codes16_partial_avx512(const uint8_t *p, int64_t bytes) {
    __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << bytes) - 1), p);
    return codes16_from_qwords_avx512(_mm512_cvtepu8_epi64(b));
}

/* 32 word indices, in element order, of the codes in 16 packed bytes (the low word of
 * each dword b >> 4, the high word b); vpermw reads bits 0-4, so its table holds the
 * 16 entries twice. */
CQ_INLINE CQ_AVX512 __m512i codes32_avx512(const uint8_t *p) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}

/* float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (convert.h). */
CQ_INLINE CQ_AVX512 __m256i f32_to_bf16_avx512(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* float32 -> float16 bits with F16C, round to nearest even (= convert.h). */
CQ_INLINE CQ_AVX512 __m256i f32_to_f16_avx512(__m512 v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

CQ_INLINE CQ_AVX512 void store_ps_avx512(float *p, __m512 v, int stream) {
    if (stream)
        _mm512_stream_ps(p, v);
    else
        _mm512_storeu_ps(p, v);
}

CQ_INLINE CQ_AVX512 void store_si512_avx512(void *p, __m512i v, int stream) {
    if (stream)
        _mm512_stream_si512((__m512i *)p, v);
    else
        _mm512_storeu_si512(p, v);
}

/* 16 values of x (dtype dt) from element i as float32; masked lanes read as 0. */
CQ_INLINE CQ_AVX512 __m512 load16_avx512(const void *x, int dt, int64_t i) {
    if (dt == CQ_F32)
        return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    if (dt == CQ_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

CQ_INLINE CQ_AVX512 __m512 load16_mask_avx512(const void *x, int dt, int64_t i, __mmask16 m) {
    if (dt == CQ_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)x + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i);
    if (dt == CQ_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Nearest NF4 code of each s: the number of midpoints below s, by binary search. */
CQ_INLINE CQ_AVX512 __m512i nf4_codes_avx512(__m512 s, __m512 mids, __m512 mid7) {
    __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, mid7, _CMP_GT_OQ), _mm512_set1_epi32(8));
    for (int step = 4; step >= 1; step >>= 1) {
        __m512 m = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mids);
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, m, _CMP_GT_OQ), c, _mm512_set1_epi32(step));
    }
    return c;
}

/* Nearest FP4 code: magnitude bucket by binary search, its 3-bit code, bit 3 iff s < 0. */
CQ_INLINE CQ_AVX512 __m512i fp4_codes_avx512(__m512 s, __m512 mids, __m512 mid3, __m512i magcode) {
    __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(0x7fffffff)));
    __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, mid3, _CMP_GT_OQ), _mm512_set1_epi32(4));
    for (int step = 2; step >= 1; step >>= 1) {
        __m512 m = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mids);
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, m, _CMP_GT_OQ), c, _mm512_set1_epi32(step));
    }
    c = _mm512_permutexvar_epi32(c, magcode);
    __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(c, neg, c, _mm512_set1_epi32(8));
}

/* 16 codes (dwords) -> 8 bytes, even element in the high nibble. */
CQ_INLINE CQ_AVX512 __m512i pair_codes_avx512(__m512i c) {
    return _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
}

/* ---------------------------------------------------------------- quantize */
typedef struct {
    __m512 mids, mid_first; /* NF4: mids16, mid[7]; FP4: mids8, mid[3] */
    __m512i magcode;
} codes_ctx_avx512;

CQ_INLINE CQ_AVX512 __m512i codes_avx512(__m512 s, const codes_ctx_avx512 *cc, int codebook) {
    return codebook == CQ_NF4 ? nf4_codes_avx512(s, cc->mids, cc->mid_first)
                              : fp4_codes_avx512(s, cc->mids, cc->mid_first, cc->magcode);
}

/* quantize_4bit_avx512: as quantize_4bit_ref (formats.h layout); dt and codebook are
 * compile-time constants in each instance. */
CQ_INLINE CQ_AVX512 int quantize_groups_avx512(const void *x, const int dt, uint8_t *packed,
                                               float *absmax, int64_t n, int64_t group,
                                               const int codebook, int64_t g0, int64_t g1,
                                               int64_t *bad_group) {
    codes_ctx_avx512 cc;
    if (codebook == CQ_NF4) {
        /* 15 midpoints; the search never reads slot 15 (nor slot 7 of FP4's 7) */
        cc.mids = _mm512_maskz_loadu_ps(0x7fff, cq_nf4_midpoints);
        cc.mid_first = _mm512_set1_ps(cq_nf4_midpoints[7]);
        cc.magcode = _mm512_setzero_si512();
    } else {
        cc.mids = _mm512_maskz_loadu_ps(0x7f, cq_fp4_midpoints);
        cc.mid_first = _mm512_set1_ps(cq_fp4_midpoints[3]);
        cc.magcode = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)cq_fp4_mag_code));
    }
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    for (int64_t g = g0; g < g1; g++) {
        int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
        __m512i amax = _mm512_setzero_si512();
        for (; i + 16 <= len; i += 16) {
            __m512i b = _mm512_and_si512(_mm512_castps_si512(load16_avx512(x, dt, start + i)), abs_mask);
            amax = _mm512_max_epu32(amax, b);
        }
        __mmask16 tail = (__mmask16)((1u << (len - i)) - 1);
        if (i < len) {
            __m512 v = load16_mask_avx512(x, dt, start + i, tail);
            amax = _mm512_max_epu32(amax, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
        }
        uint32_t amax_bits = _mm512_reduce_max_epu32(amax);
        if (amax_bits >= 0x7f800000u) {
            *bad_group = g;
            return CQ_ENONFINITE;
        }
        float a = cq_bits_f32(amax_bits);
        float recip = a > 0.0f ? 1.0f / a : 0.0f;
        absmax[g] = a;
        const __m512 r = _mm512_set1_ps(recip);
        uint8_t *out = packed + (start >> 1);
        for (i = 0; i + 16 <= len; i += 16) {
            __m512i c = codes_avx512(_mm512_mul_ps(load16_avx512(x, dt, start + i), r), &cc, codebook);
            _mm_storel_epi64((__m128i *)(out + i / 2), _mm512_cvtepi64_epi8(pair_codes_avx512(c)));
        }
        if (i < len) {
            /* masked lanes read 0.0, whose code pads an odd n's last low nibble */
            __m512 s = _mm512_mul_ps(load16_mask_avx512(x, dt, start + i, tail), r);
            __m512i c = codes_avx512(s, &cc, codebook);
            __mmask8 bytes = (__mmask8)((1u << ((len - i + 1) / 2)) - 1);
            _mm512_mask_cvtepi64_storeu_epi8(out + i / 2, bytes, pair_codes_avx512(c));
        }
    }
    return CQ_OK;
}

static CQ_AVX512 int quantize_4bit_avx512(const void *restrict x, int x_dtype,
                                          uint8_t *restrict packed, float *restrict absmax,
                                          int64_t n, int64_t group, int codebook, int64_t g0,
                                          int64_t g1, int64_t *restrict bad_group) {
#define Q(dt, cb) quantize_groups_avx512(x, dt, packed, absmax, n, group, cb, g0, g1, bad_group)
    int nf4 = codebook == CQ_NF4;
    switch (x_dtype) {
    case CQ_F32:
        return nf4 ? Q(CQ_F32, CQ_NF4) : Q(CQ_F32, CQ_FP4);
    case CQ_F16:
        return nf4 ? Q(CQ_F16, CQ_NF4) : Q(CQ_F16, CQ_FP4);
    case CQ_BF16:
        return nf4 ? Q(CQ_BF16, CQ_NF4) : Q(CQ_BF16, CQ_FP4);
    default:
        return CQ_EINVAL;
    }
#undef Q
}

/* ---------------------------------------------------------------- dequantize */
/* dequantize_4bit_avx512: y = table[code] * absmax rounded to y_dtype, bit-identical to
 * dequantize_4bit_ref; a per-group 16-entry table is indexed by vpermps / vpermw. */
static CQ_AVX512 int dequantize_4bit_avx512(const uint8_t *restrict packed,
                                            const float *restrict absmax, void *restrict y,
                                            int y_dtype, int64_t n, int64_t group, int codebook,
                                            int64_t g0, int64_t g1) {
    const __m512 table = _mm512_loadu_ps(cq_table_4bit(codebook));
    const int stream = use_stream_stores(y, n * cq_dtype_size(y_dtype), 64);
    if (y_dtype == CQ_F32) {
        for (int64_t g = g0; g < g1; g++) {
            int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
            const uint8_t *p = packed + (start >> 1);
            float *out = (float *)y + start;
            const __m512 tab = _mm512_mul_ps(table, _mm512_set1_ps(absmax[g]));
            for (; i + 32 <= len; i += 32) {
                __m512 v0 = _mm512_permutexvar_ps(codes16_avx512(p + i / 2), tab);
                __m512 v1 = _mm512_permutexvar_ps(codes16_avx512(p + i / 2 + 8), tab);
                store_ps_avx512(out + i, v0, stream);
                store_ps_avx512(out + i + 16, v1, stream);
            }
            for (; i < len; i += 16) {
                int64_t r = len - i < 16 ? len - i : 16;
                __m512i c = r == 16 ? codes16_avx512(p + i / 2) : codes16_partial_avx512(p + i / 2, (r + 1) / 2);
                _mm512_mask_storeu_ps(out + i, (__mmask16)((1u << r) - 1), _mm512_permutexvar_ps(c, tab));
            }
        }
    } else if (y_dtype == CQ_BF16 || y_dtype == CQ_F16) {
        const int bf16 = y_dtype == CQ_BF16;
        for (int64_t g = g0; g < g1; g++) {
            int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
            const uint8_t *p = packed + (start >> 1);
            uint16_t *out = (uint16_t *)y + start;
            const __m512 prod = _mm512_mul_ps(table, _mm512_set1_ps(absmax[g]));
            const __m256i half = bf16 ? f32_to_bf16_avx512(prod) : f32_to_f16_avx512(prod);
            const __m512i tab = _mm512_broadcast_i64x4(half); /* 16 entries, twice */
            for (; i + 32 <= len; i += 32)
                store_si512_avx512(out + i, _mm512_permutexvar_epi16(codes32_avx512(p + i / 2), tab), stream);
            if (i < len) {
                int64_t r = len - i; /* < 32: only in the last group */
                uint8_t bytes[16] = {0};
                memcpy(bytes, p + i / 2, (size_t)((r + 1) / 2));
                __m512i v = _mm512_permutexvar_epi16(codes32_avx512(bytes), tab);
                _mm512_mask_storeu_epi16(out + i, (__mmask32)((1ull << r) - 1), v);
            }
        }
    } else {
        return CQ_EINVAL;
    }
    if (stream)
        _mm_sfence();
    return CQ_OK;
}

/* ---------------------------------------------------------------- linear */
/* One output column n for rows [m0, m0 + MT) of x: walks row n of W in segments that
 * share a group, decodes 16 weights with one vpermps on the group's scaled table and
 * accumulates them into MT x 2 independent accumulators. MT is a constant per instance. */
CQ_INLINE CQ_AVX512 void linear_column_avx512(const float *x, const uint8_t *packed,
                                              const float *absmax, const float *bias, float *y,
                                              const float *table_s, __m512 table, int64_t N,
                                              int64_t K, int64_t group, int64_t n, int64_t m0,
                                              const int MT) {
    __m512 acc[8][2]; /* MT <= 8; fixed size so that the unrolled loops keep them in registers */
    float lone[8];    /* products of a weight that starts on an odd (low) nibble */
    for (int m = 0; m < MT; m++) {
        acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        lone[m] = 0.0f;
    }
    const float *xr = x + m0 * K;
    int64_t base = n * K;
    for (int64_t k = 0; k < K;) {
        int64_t g = (base + k) / group;
        int64_t kend = (g + 1) * group - base < K ? (g + 1) * group - base : K;
        float a = absmax[g];
        if ((base + k) & 1) {
            float w = table_s[code_at(packed, base + k)] * a;
            for (int m = 0; m < MT; m++)
                lone[m] += xr[m * K + k] * w;
            if (++k == kend)
                continue;
        }
        const __m512 tab = _mm512_mul_ps(table, _mm512_set1_ps(a));
        const uint8_t *p = packed + ((base + k) >> 1);
        int64_t len = kend - k, j = 0;
        for (; j + 32 <= len; j += 32) {
            __m512 w0 = _mm512_permutexvar_ps(codes16_avx512(p + j / 2), tab);
            __m512 w1 = _mm512_permutexvar_ps(codes16_avx512(p + j / 2 + 8), tab);
            for (int m = 0; m < MT; m++) {
                const float *xm = xr + m * K + k + j;
                acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
            }
        }
        for (; j < len; j += 16) {
            int64_t r = len - j < 16 ? len - j : 16;
            __mmask16 mask = (__mmask16)((1u << r) - 1);
            __m512i c = r == 16 ? codes16_avx512(p + j / 2) : codes16_partial_avx512(p + j / 2, (r + 1) / 2);
            __m512 w = _mm512_permutexvar_ps(c, tab);
            for (int m = 0; m < MT; m++) {
                __m512 xv = _mm512_maskz_loadu_ps(mask, xr + m * K + k + j);
                acc[m][0] = _mm512_mask3_fmadd_ps(w, xv, acc[m][0], mask);
            }
        }
        k = kend;
    }
    for (int m = 0; m < MT; m++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + lone[m];
        y[(m0 + m) * N + n] = bias ? s + bias[n] : s;
    }
}

/* linear_4bit_avx512: columns [n0, n1) of y = x W^T (+ bias), float32; W read once per
 * tile of up to 8 rows of x. */
static CQ_AVX512 int linear_4bit_avx512(const float *restrict x, const uint8_t *restrict packed,
                                        const float *restrict absmax, const float *bias,
                                        float *restrict y, int64_t M, int64_t N, int64_t K,
                                        int64_t group, int codebook, int64_t n0, int64_t n1) {
    const float *table_s = cq_table_4bit(codebook);
    const __m512 table = _mm512_loadu_ps(table_s);
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
#define COL(MT) linear_column_avx512(x, packed, absmax, bias, y, table_s, table, N, K, group, n, m0, MT)
        for (; m0 + 8 <= M; m0 += 8)
            COL(8);
        CQ_ROW_TILES_4_2_1(m0, M, COL); /* at most one tile of 4 is left */
#undef COL
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- double quantization */
/* dequantize_absmax_avx512: absmax[i] = map[codes[i]] * nested[i / 256] + offset, two
 * float32 roundings as the reference; map lookups by gather. */
static CQ_AVX512 int dequantize_absmax_avx512(const uint8_t *restrict codes,
                                              const float *restrict nested,
                                              const float *restrict map, float offset,
                                              float *restrict absmax, int64_t i0, int64_t i1) {
    const __m512 off = _mm512_set1_ps(offset);
    for (int64_t i = i0; i < i1;) {
        int64_t b = i / CQ_DQ_BLOCK, bend = (b + 1) * CQ_DQ_BLOCK < i1 ? (b + 1) * CQ_DQ_BLOCK : i1;
        const __m512 nb = _mm512_set1_ps(nested[b]);
        for (; i < bend; i += 16) {
            int64_t r = bend - i < 16 ? bend - i : 16;
            __mmask16 m = (__mmask16)((1u << r) - 1);
            __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + i));
            __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, map, 4);
            _mm512_mask_storeu_ps(absmax + i, m, _mm512_add_ps(_mm512_mul_ps(v, nb), off));
        }
        i = bend;
    }
    return CQ_OK;
}

/* ================================================================== AVX2 */

/* ---------------------------------------------------------------- helpers */
/* 8 dword indices of the codes in 4 packed bytes (as codes16_avx512). */
CQ_INLINE CQ_AVX2 __m256i codes8_avx2(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(w));
    return _mm256_or_si256(_mm256_srli_epi64(q, 4), _mm256_slli_epi64(q, 32));
}

/* table[idx & 15] from a 16-entry float table held as two halves: vpermps reads bits
 * 0-2, bit 3 moved to the sign picks the half. */
CQ_INLINE CQ_AVX2 __m256 lookup16_avx2(__m256i idx, __m256 lo, __m256 hi) {
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
}

CQ_INLINE CQ_AVX2 __m256i f32_to_bf16_avx2(__m256 v) { /* 8 results in the low halves of dwords */
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, q, nan);
}

/* The 16 entries of a 16-bit table split into low bytes and high bytes, each in both
 * 128-bit lanes, for vpshufb. */
CQ_INLINE CQ_AVX2 void byte_tables_avx2(__m256 lo, __m256 hi, int bf16, __m256i *tl, __m256i *th) {
    __m128i a, b;
    if (bf16) {
        __m256i w = _mm256_packus_epi32(f32_to_bf16_avx2(lo), f32_to_bf16_avx2(hi));
        w = _mm256_permute4x64_epi64(w, 0xD8); /* entries 0-7 | 8-15 */
        a = _mm256_castsi256_si128(w);
        b = _mm256_extracti128_si256(w, 1);
    } else {
        a = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        b = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    a = _mm_shuffle_epi8(a, split);
    b = _mm_shuffle_epi8(b, split);
    *tl = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(a, b));
    *th = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(a, b));
}

/* 32 16-bit outputs of the codes in 16 packed bytes, stored at out[0..31]. */
CQ_INLINE CQ_AVX2 void lookup32_u16_avx2(const uint8_t *p, __m256i tl, __m256i th, uint16_t *out) {
    __m256i d = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i c = _mm256_or_si256(_mm256_srli_epi16(d, 4),
                                _mm256_slli_epi16(_mm256_and_si256(d, _mm256_set1_epi16(0xF)), 8));
    __m256i lb = _mm256_shuffle_epi8(tl, c), hb = _mm256_shuffle_epi8(th, c);
    __m256i o0 = _mm256_unpacklo_epi8(lb, hb), o1 = _mm256_unpackhi_epi8(lb, hb);
    _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(o0, o1, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(o0, o1, 0x31));
}

CQ_INLINE CQ_AVX2 __m256 load8_avx2(const void *x, int dt, int64_t i) {
    if (dt == CQ_F32)
        return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dt == CQ_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Nearest NF4 code: first step against mid[7] picks the half, three more steps search
 * it (two permutes and a blend pick each lane's half). */
CQ_INLINE CQ_AVX2 __m256i nf4_codes_avx2(__m256 s, __m256 mlo, __m256 mhi, __m256 mid7) {
    __m256 upper = _mm256_cmp_ps(s, mid7, _CMP_GT_OQ);
    __m256i c = _mm256_and_si256(_mm256_castps_si256(upper), _mm256_set1_epi32(8));
    for (int step = 4; step >= 1; step >>= 1) {
        __m256i idx = _mm256_add_epi32(c, _mm256_set1_epi32(step - 1));
        __m256 m = _mm256_blendv_ps(_mm256_permutevar8x32_ps(mlo, idx), _mm256_permutevar8x32_ps(mhi, idx), upper);
        __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_GT_OQ));
        c = _mm256_add_epi32(c, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
    }
    return c;
}

CQ_INLINE CQ_AVX2 __m256i fp4_codes_avx2(__m256 s, __m256 mids, __m256i magcode) {
    __m256 a = _mm256_and_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    __m256i c = _mm256_setzero_si256();
    for (int step = 4; step >= 1; step >>= 1) {
        __m256 m = _mm256_permutevar8x32_ps(mids, _mm256_add_epi32(c, _mm256_set1_epi32(step - 1)));
        __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(a, m, _CMP_GT_OQ));
        c = _mm256_add_epi32(c, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
    }
    c = _mm256_permutevar8x32_epi32(magcode, c);
    __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(c, _mm256_and_si256(neg, _mm256_set1_epi32(8)));
}

/* 8 codes (dwords) -> 4 bytes, even element in the high nibble. */
CQ_INLINE CQ_AVX2 uint32_t pair_codes_avx2(__m256i c) {
    __m256i p = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
    const __m256i gather = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    p = _mm256_shuffle_epi8(p, gather);
    uint32_t lo = (uint32_t)_mm256_cvtsi256_si32(p) & 0xffffu;
    uint32_t hi = (uint32_t)_mm256_extract_epi32(p, 4) & 0xffffu;
    return lo | hi << 16;
}

/* ---------------------------------------------------------------- quantize */
/* quantize_4bit_avx2: as quantize_4bit_ref, 8 lanes; a last group's tail in scalar. */
CQ_INLINE CQ_AVX2 int quantize_groups_avx2(const void *x, const int dt, uint8_t *packed,
                                           float *absmax, int64_t n, int64_t group,
                                           const int codebook, int64_t g0, int64_t g1,
                                           int64_t *bad_group) {
    const uint8_t zero_code = codebook == CQ_NF4 ? CQ_NF4_ZERO_CODE : CQ_FP4_ZERO_CODE;
    const __m256i seven_lanes = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0);
    __m256 mlo, mhi, mid_first;
    __m256i magcode = _mm256_setzero_si256();
    if (codebook == CQ_NF4) {
        /* mids 0-7 and 8-14; the search never reads the missing slot 15 (nor FP4's 7) */
        mlo = _mm256_loadu_ps(cq_nf4_midpoints);
        mhi = _mm256_maskload_ps(cq_nf4_midpoints + 8, seven_lanes);
        mid_first = _mm256_set1_ps(cq_nf4_midpoints[7]);
    } else {
        mlo = mhi = _mm256_maskload_ps(cq_fp4_midpoints, seven_lanes);
        mid_first = mlo;
        magcode = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)cq_fp4_mag_code));
    }
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    for (int64_t g = g0; g < g1; g++) {
        int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
        __m256i amax = _mm256_setzero_si256();
        for (; i + 8 <= len; i += 8) {
            __m256i b = _mm256_and_si256(_mm256_castps_si256(load8_avx2(x, dt, start + i)), abs_mask);
            amax = _mm256_max_epu32(amax, b);
        }
        uint32_t lanes[8], amax_bits = 0;
        _mm256_storeu_si256((__m256i *)lanes, amax);
        for (int l = 0; l < 8; l++)
            amax_bits = lanes[l] > amax_bits ? lanes[l] : amax_bits;
        for (int64_t t = i; t < len; t++) {
            uint32_t b = cq_f32_bits(cq_load_f32(x, dt, start + t)) & 0x7fffffffu;
            amax_bits = b > amax_bits ? b : amax_bits;
        }
        if (amax_bits >= 0x7f800000u) {
            *bad_group = g;
            return CQ_ENONFINITE;
        }
        float a = cq_bits_f32(amax_bits);
        float recip = a > 0.0f ? 1.0f / a : 0.0f;
        absmax[g] = a;
        const __m256 r = _mm256_set1_ps(recip);
        uint8_t *out = packed + (start >> 1);
        for (i = 0; i + 8 <= len; i += 8) {
            __m256 s = _mm256_mul_ps(load8_avx2(x, dt, start + i), r);
            __m256i c = codebook == CQ_NF4 ? nf4_codes_avx2(s, mlo, mhi, mid_first)
                                           : fp4_codes_avx2(s, mlo, magcode);
            uint32_t four = pair_codes_avx2(c);
            memcpy(out + i / 2, &four, 4);
        }
        for (; i < len; i += 2) {
            uint8_t hi = cq_code_4bit(cq_load_f32(x, dt, start + i) * recip, codebook);
            uint8_t lo = i + 1 < len ? cq_code_4bit(cq_load_f32(x, dt, start + i + 1) * recip, codebook)
                                     : zero_code;
            out[i / 2] = (uint8_t)(hi << 4 | lo);
        }
    }
    return CQ_OK;
}

static CQ_AVX2 int quantize_4bit_avx2(const void *restrict x, int x_dtype, uint8_t *restrict packed,
                                      float *restrict absmax, int64_t n, int64_t group,
                                      int codebook, int64_t g0, int64_t g1,
                                      int64_t *restrict bad_group) {
#define Q(dt, cb) quantize_groups_avx2(x, dt, packed, absmax, n, group, cb, g0, g1, bad_group)
    int nf4 = codebook == CQ_NF4;
    switch (x_dtype) {
    case CQ_F32:
        return nf4 ? Q(CQ_F32, CQ_NF4) : Q(CQ_F32, CQ_FP4);
    case CQ_F16:
        return nf4 ? Q(CQ_F16, CQ_NF4) : Q(CQ_F16, CQ_FP4);
    case CQ_BF16:
        return nf4 ? Q(CQ_BF16, CQ_NF4) : Q(CQ_BF16, CQ_FP4);
    default:
        return CQ_EINVAL;
    }
#undef Q
}

/* ---------------------------------------------------------------- dequantize */
/* dequantize_4bit_avx2: as dequantize_4bit_avx512 with vpermps pairs (float32) and
 * vpshufb byte tables (16-bit outputs); a last group's tail in scalar. */
static CQ_AVX2 int dequantize_4bit_avx2(const uint8_t *restrict packed, const float *restrict absmax,
                                        void *restrict y, int y_dtype, int64_t n, int64_t group,
                                        int codebook, int64_t g0, int64_t g1) {
    const float *table_s = cq_table_4bit(codebook);
    const __m256 tlo = _mm256_loadu_ps(table_s), thi = _mm256_loadu_ps(table_s + 8);
    const int stream = use_stream_stores(y, n * cq_dtype_size(y_dtype), 32);
    if (y_dtype == CQ_F32) {
        for (int64_t g = g0; g < g1; g++) {
            int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
            const uint8_t *p = packed + (start >> 1);
            float *out = (float *)y + start;
            const __m256 a = _mm256_set1_ps(absmax[g]);
            const __m256 lo = _mm256_mul_ps(tlo, a), hi = _mm256_mul_ps(thi, a);
            for (; i + 8 <= len; i += 8) {
                __m256 v = lookup16_avx2(codes8_avx2(p + i / 2), lo, hi);
                if (stream)
                    _mm256_stream_ps(out + i, v);
                else
                    _mm256_storeu_ps(out + i, v);
            }
            if (i < len) {
                float t[16];
                _mm256_storeu_ps(t, lo);
                _mm256_storeu_ps(t + 8, hi);
                for (; i < len; i++)
                    out[i] = t[code_at(p, i)];
            }
        }
    } else if (y_dtype == CQ_BF16 || y_dtype == CQ_F16) {
        for (int64_t g = g0; g < g1; g++) {
            int64_t start = g * group, len = group_end(g, group, n) - start, i = 0;
            const uint8_t *p = packed + (start >> 1);
            uint16_t *out = (uint16_t *)y + start;
            const __m256 a = _mm256_set1_ps(absmax[g]);
            __m256i tl, th;
            byte_tables_avx2(_mm256_mul_ps(tlo, a), _mm256_mul_ps(thi, a), y_dtype == CQ_BF16, &tl, &th);
            for (; i + 32 <= len; i += 32)
                lookup32_u16_avx2(p + i / 2, tl, th, out + i);
            if (i < len) {
                uint8_t bytes[16] = {0};
                uint16_t t[32];
                memcpy(bytes, p + i / 2, (size_t)((len - i + 1) / 2));
                lookup32_u16_avx2(bytes, tl, th, t);
                memcpy(out + i, t, (size_t)(len - i) * 2);
            }
        }
    } else {
        return CQ_EINVAL;
    }
    if (stream)
        _mm_sfence();
    return CQ_OK;
}

/* ---------------------------------------------------------------- linear */
/* One output column for MT rows of x, as linear_column_avx512 with 8 lanes. */
CQ_INLINE CQ_AVX2 void linear_column_avx2(const float *x, const uint8_t *packed, const float *absmax,
                                          const float *bias, float *y, const float *table_s,
                                          __m256 tlo, __m256 thi, int64_t N, int64_t K,
                                          int64_t group, int64_t n, int64_t m0, const int MT) {
    __m256 acc[4][2]; /* MT <= 4 */
    float lone[4];
    for (int m = 0; m < MT; m++) {
        acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        lone[m] = 0.0f;
    }
    const float *xr = x + m0 * K;
    int64_t base = n * K;
    for (int64_t k = 0; k < K;) {
        int64_t g = (base + k) / group;
        int64_t kend = (g + 1) * group - base < K ? (g + 1) * group - base : K;
        float a = absmax[g];
        if ((base + k) & 1) {
            float w = table_s[code_at(packed, base + k)] * a;
            for (int m = 0; m < MT; m++)
                lone[m] += xr[m * K + k] * w;
            if (++k == kend)
                continue;
        }
        const __m256 av = _mm256_set1_ps(a);
        const __m256 lo = _mm256_mul_ps(tlo, av), hi = _mm256_mul_ps(thi, av);
        const uint8_t *p = packed + ((base + k) >> 1);
        int64_t len = kend - k, j = 0;
        for (; j + 16 <= len; j += 16) {
            __m256 w0 = lookup16_avx2(codes8_avx2(p + j / 2), lo, hi);
            __m256 w1 = lookup16_avx2(codes8_avx2(p + j / 2 + 4), lo, hi);
            for (int m = 0; m < MT; m++) {
                const float *xm = xr + m * K + k + j;
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
            }
        }
        for (; j + 8 <= len; j += 8) {
            __m256 w = lookup16_avx2(codes8_avx2(p + j / 2), lo, hi);
            for (int m = 0; m < MT; m++)
                acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + m * K + k + j), acc[m][0]);
        }
        for (; j < len; j++) {
            float w = table_s[code_at(p, j)] * a;
            for (int m = 0; m < MT; m++)
                lone[m] += xr[m * K + k + j] * w;
        }
        k = kend;
    }
    for (int m = 0; m < MT; m++) {
        __m256 v = _mm256_add_ps(acc[m][0], acc[m][1]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h) + lone[m];
        y[(m0 + m) * N + n] = bias ? s + bias[n] : s;
    }
}

/* linear_4bit_avx2: columns [n0, n1) of y = x W^T (+ bias), float32, tiles of 4 rows. */
static CQ_AVX2 int linear_4bit_avx2(const float *restrict x, const uint8_t *restrict packed,
                                    const float *restrict absmax, const float *bias,
                                    float *restrict y, int64_t M, int64_t N, int64_t K,
                                    int64_t group, int codebook, int64_t n0, int64_t n1) {
    const float *table_s = cq_table_4bit(codebook);
    const __m256 tlo = _mm256_loadu_ps(table_s), thi = _mm256_loadu_ps(table_s + 8);
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
#define COL(MT) linear_column_avx2(x, packed, absmax, bias, y, table_s, tlo, thi, N, K, group, n, m0, MT)
        CQ_ROW_TILES_4_2_1(m0, M, COL);
#undef COL
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- double quantization */
/* dequantize_absmax_avx2: as dequantize_absmax_avx512, 8 lanes, scalar tail. */
static CQ_AVX2 int dequantize_absmax_avx2(const uint8_t *restrict codes, const float *restrict nested,
                                          const float *restrict map, float offset,
                                          float *restrict absmax, int64_t i0, int64_t i1) {
    const __m256 off = _mm256_set1_ps(offset);
    for (int64_t i = i0; i < i1;) {
        int64_t b = i / CQ_DQ_BLOCK, bend = (b + 1) * CQ_DQ_BLOCK < i1 ? (b + 1) * CQ_DQ_BLOCK : i1;
        const float nbs = nested[b];
        const __m256 nb = _mm256_set1_ps(nbs);
        for (; i + 8 <= bend; i += 8) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
            __m256 v = _mm256_i32gather_ps(map, idx, 4);
            _mm256_storeu_ps(absmax + i, _mm256_add_ps(_mm256_mul_ps(v, nb), off));
        }
        for (; i < bend; i++) {
            float v = map[codes[i]] * nbs;
            absmax[i] = v + offset;
        }
    }
    return CQ_OK;
}

const cq_cpu_kernels cq_nf4_fp4_avx2 = {
    .name = "avx2",
    .quantize_4bit = quantize_4bit_avx2,
    .dequantize_4bit = dequantize_4bit_avx2,
    .linear_4bit = linear_4bit_avx2,
    .dequantize_absmax = dequantize_absmax_avx2,
};
const cq_cpu_kernels cq_nf4_fp4_avx512 = {
    .name = "avx512",
    .quantize_4bit = quantize_4bit_avx512,
    .dequantize_4bit = dequantize_4bit_avx512,
    .linear_4bit = linear_4bit_avx512,
    .dequantize_absmax = dequantize_absmax_avx512,
};

#else /* not x86-64 GCC/Clang: the reference serves every level */
const cq_cpu_kernels cq_nf4_fp4_avx2 = {.name = "avx2"};
const cq_cpu_kernels cq_nf4_fp4_avx512 = {.name = "avx512"};
#endif
