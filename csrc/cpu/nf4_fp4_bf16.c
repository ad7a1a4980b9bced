/* nf4_fp4_bf16.c: the 4-bit linear for bfloat16 activations with AVX512-BF16
 * (vdpbf16ps) and VBMI (vpmultishiftqb), level avx512bf16 (contract: kernels.h,
 * cq_linear_4bit_bf16_fn; layout: formats.h). Other levels have no such kernel and
 * ops.py runs linear_4bit on float32 x.
 *
 * Semantics: each weight is table[code] * absmax in float32 rounded to bfloat16 (RNE),
 * exactly what dequantize_4bit writes for a bf16 output; x . w in float32 by vdpbf16ps
 * (each lane adds a pair of exact bf16 x bf16 products; the instruction reads bf16
 * denormals as zero and flushes float32 denormal results); + float32 bias; y rounded
 * once to bf16 (RNE). Agrees with "dequantize to bf16, F.linear in float32" to float32
 * rounding; the summation order is fixed by M alone (never by the thread chunking).
 *
 * Decoding: the flattened weight is read in chunks of 32 codes (16 bytes) aligned to the
 * flat index; group sizes are multiples of 32, so a chunk lies in one group. The codes
 * are spread to words (vpmovzxwq + vpmultishiftqb), then one vpermw on the group's 16
 * bf16 values (held twice: vpermw reads 5 index bits) turns a chunk into a zmm of 32
 * bf16 weights in k order, i.e. the 16 (k, k+1) pairs vdpbf16ps wants.
 * A row that starts or ends inside a chunk (K not a multiple of 32, odd K, a group
 * straddling rows) masks the lanes outside it, in the weights and in x.
 *
 * Two shapes of work, by the number of rows M:
 * - M < GEMM_MIN_M: per output column, chunks go straight from the codes into
 *   vdpbf16ps against up to GEMV_MR rows of x, four accumulators a row (GEMV); codes
 *   are prefetched ahead of the decoder. Where rows are whole 64-blocks (K % 64 == 0,
 *   group >= 64) a cheaper decode runs against x permuted once (gemv_column_blocks).
 * - else: a panel of PANEL_N columns x PANEL_K k is decoded once into scratch, its
 *   rows transposed to k-pair-major order (one dword = the (k, k+1) pair of one
 *   column), and an outer-product micro-kernel broadcasts x's (k, k+1) pairs against
 *   it, GEMM_MR rows x 32 columns (24 accumulators); partial sums of the k-blocks
 *   wait in a float32 scratch. Each weight is decoded once per call.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels.h"
#include "convert.h"
#include "nf4_fp4_tables.h"

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
                            (defined(__clang__) && __clang_major__ >= 9))
#include <immintrin.h>

#define CQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")))
#define CQ_INLINE static inline __attribute__((always_inline))
#define AS_BH(v) ((__m512bh)(v))

#ifndef GEMM_MIN_M
#define GEMM_MIN_M 8 /* rows from which the decoded-panel GEMM beats the streaming GEMV */
#endif
#define GEMV_MR 4    /* GEMV: rows of x per pass over a column */
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 2048 /* GEMV: bytes of codes fetched ahead of the decoder */
#endif
#define GEMM_MR 12   /* GEMM micro-tile rows: 12 x 2 accumulators + 2 weights + 1 broadcast */
#define PANEL_N 32   /* GEMM panel columns: two zmm of float32 lanes */
#ifndef PANEL_K
#define PANEL_K 256  /* GEMM panel k: 256 x 32 bf16 = 16 KiB, with the row scratch in L1 */
#endif
#define ROW_PAD 32   /* bf16 slack before and after each scratch row for masked chunk stores */
#define ROW_STRIDE (PANEL_K + 2 * ROW_PAD)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* 64-byte aligned scratch of at least `bytes` (never a zero-size request). */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes / 64 + 1) * 64); }

/* ---------------------------------------------------------------- helpers */
/* The group's 16 bf16 weights table[c] * a, in words 0-15 and again in 16-31.
 * vcvtne2ps2bf16 rounds to nearest even as dequantize_4bit does (convert.h), NaN to a
 * quiet NaN, but flushes float32 denormal products (|table[c] * a| < 2^-126) to zero
 * (checked on Zen 4): where RNE gives a bf16 denormal, vdpbf16ps reads that as zero
 * anyway; only a product just below 2^-126 loses its rounding up to 2^-126. */
CQ_INLINE CQ_BF16 __m512i group_table(__m512 table, float a) {
    const __m512 prod = _mm512_mul_ps(table, _mm512_set1_ps(a));
    return (__m512i)_mm512_cvtne2ps_pbh(prod, prod);
}

/* float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (= convert.h), 16
 * results in words. Integer ops for y: vcvtneps2bf16 would flush a denormal result. */
CQ_INLINE CQ_BF16 __m256i f32_to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

/* vpermw indices of the 32 codes of 16 packed bytes, in element order. vpermw reads the
 * low 5 bits of each word, so a word only needs the code in its low nibble (bit 4 picks
 * the table's second copy). Each qword takes two bytes b0 b1 (vpmovzxwq) and one
 * vpmultishiftqb puts bits 4-11 (b0's high nibble: element 0), 0-7 (b0: element 1),
 * 12-19 (b1's high nibble: element 2) and 8-15 (b1: element 3) in its four words. */
CQ_INLINE CQ_BF16 __m512i codes_from_bytes(__m128i b) {
    const __m512i shifts = _mm512_set1_epi64(0x0008000C00000004ll); /* bytes 0, 2, 4, 6: 4, 0, 12, 8 */
    return _mm512_multishift_epi64_epi8(shifts, _mm512_cvtepu16_epi64(b));
}

/* Codes of chunk c (flat elements [32c, 32c + 32)); the weight's last chunk may have
 * fewer than 16 bytes, and nothing past them is read. */
CQ_INLINE CQ_BF16 __m512i chunk_codes(const uint8_t *packed, int64_t c, int64_t nbytes) {
    const uint8_t *p = packed + 16 * c;
    if (16 * c + 16 <= nbytes)
        return codes_from_bytes(_mm_loadu_si128((const __m128i *)p));
    return codes_from_bytes(_mm_maskz_loadu_epi8((__mmask16)((1u << (nbytes - 16 * c)) - 1), p));
}

/* Lanes of chunk c inside the flat range [s, e) (s < e, the range overlaps the chunk). */
static inline __mmask32 chunk_mask(int64_t c, int64_t s, int64_t e) {
    int64_t lo = s - 32 * c, hi = e - 32 * c; /* lo < 32, hi > 0 */
    uint32_t m = 0xffffffffu;
    if (lo > 0)
        m &= 0xffffffffu << lo;
    if (hi < 32)
        m &= (1u << hi) - 1;
    return (__mmask32)m;
}

/* p + i elements of 2 bytes, as an address (i may be negative for a masked access whose
 * active lanes are inside the array; the arithmetic stays out of C pointer rules). */
static inline const void *at16(const uint16_t *p, int64_t i) {
    return (const void *)((uintptr_t)p + (uintptr_t)(i * 2));
}

/* bf16 of y = acc + bias, round to nearest even. */
static inline uint16_t finish(float acc, const float *bias, int64_t n) {
    return cq_f32_to_bf16(bias ? acc + bias[n] : acc);
}

/* ---------------------------------------------------------------- GEMV (few rows) */
/* Column n for rows [m0, m0 + MT): its flat range [nK, nK + K) chunk by chunk. The
 * first and last chunk are masked to the row; interior chunks (whole, and never the
 * weight's last) go four at a time into four accumulators a row, the group table
 * refreshed where a chunk starts a new group. */
CQ_INLINE CQ_BF16 void gemv_column(const uint16_t *x, const uint8_t *packed, const float *absmax,
                                   __m512 table, const float *bias, uint16_t *y, int64_t N, int64_t K,
                                   int cshift, int64_t n, int64_t m0, const int MT) {
    __m512 acc[GEMV_MR][4];
    for (int m = 0; m < MT; m++)
        acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    const int64_t s = n * K, e = s + K, nbytes = (N * K + 1) / 2;
    const uint16_t *xr = x + m0 * K;
    int64_t c = s / 32;
    const int64_t c_last = (e - 1) / 32;
    int64_t gcur = c >> cshift;
    __m512i tab = group_table(table, absmax[gcur]);
#define TAB(cc)                                         \
    if (((cc) >> cshift) != gcur) {                     \
        gcur = (cc) >> cshift;                          \
        tab = group_table(table, absmax[gcur]);         \
    }
    /* first chunk, masked where the row starts inside it or ends in it */
    {
        __mmask32 mask = chunk_mask(c, s, e);
        __m512i w = _mm512_maskz_permutexvar_epi16(mask, chunk_codes(packed, c, nbytes), tab);
        for (int m = 0; m < MT; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, at16(xr, m * K + 32 * c - s));
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], AS_BH(xv), AS_BH(w));
        }
        c++;
    }
    /* interior chunks [c, c_last): x lane 0 of chunk c is row element 32c - s >= 0 */
    const uint8_t *pc = packed + 16 * c;
    const uint16_t *xc = xr + (32 * c - s);
    for (; c + 4 <= c_last; c += 4, pc += 64, xc += 128) {
        _mm_prefetch((const char *)pc + GEMV_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(absmax + gcur) + GEMV_PREFETCH / 8, _MM_HINT_T0);
        __m512i w[4];
        for (int i = 0; i < 4; i++) {
            TAB(c + i);
            w[i] = _mm512_permutexvar_epi16(codes_from_bytes(_mm_loadu_si128((const __m128i *)(pc + 16 * i))), tab);
        }
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++)
                acc[m][i] = _mm512_dpbf16_ps(acc[m][i], AS_BH(_mm512_loadu_si512(xc + m * K + 32 * i)), AS_BH(w[i]));
    }
    for (; c < c_last; c++, pc += 16, xc += 32) {
        TAB(c);
        __m512i w = _mm512_permutexvar_epi16(codes_from_bytes(_mm_loadu_si128((const __m128i *)pc)), tab);
        for (int m = 0; m < MT; m++)
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], AS_BH(_mm512_loadu_si512(xc + m * K)), AS_BH(w));
    }
    /* last chunk (when it is not the first), masked at the row's end */
    if (c == c_last) {
        TAB(c);
        __mmask32 mask = chunk_mask(c, s, e);
        __m512i w = _mm512_maskz_permutexvar_epi16(mask, chunk_codes(packed, c, nbytes), tab);
        for (int m = 0; m < MT; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, at16(xr, m * K + 32 * c - s));
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], AS_BH(xv), AS_BH(w));
        }
    }
#undef TAB
    for (int m = 0; m < MT; m++) {
        __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        y[(m0 + m) * N + n] = finish(_mm512_reduce_add_ps(t), bias, n);
    }
}

/* ---------------------------------------------------------------- GEMV, whole 64-blocks */
/* Where K is a multiple of 64 and a group holds whole 64-code blocks (group >= 64), every
 * row is a run of whole, aligned 64-blocks and a cheaper decode applies: one vpmovzxbw
 * spreads a block's 32 bytes to words; a word indexes its byte's odd element (low nibble)
 * as it is and, shifted right by 4, the even one, so two vpermw give the block's weights
 * as [32 even | 32 odd] with no other shuffle. x is permuted the same way once per call
 * (permute_x_even_odd); vdpbf16ps then pairs (2j, 2j + 2) instead of (2j, 2j + 1): the
 * same products, summed in another order. */
static CQ_BF16 void permute_x_even_odd(const uint16_t *x, uint16_t *xe, int64_t n) {
    __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
    uint16_t ie[32], io[32];
    for (int i = 0; i < 32; i++) {
        ie[i] = (uint16_t)(2 * i); /* vpermt2w: 0-31 from the first source, 32-63 from the second */
        io[i] = (uint16_t)(2 * i + 1);
    }
    even = _mm512_loadu_si512(ie);
    odd = _mm512_loadu_si512(io);
    for (int64_t i = 0; i < n; i += 64) {
        const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_storeu_si512(xe + i, _mm512_permutex2var_epi16(a, even, b));
        _mm512_storeu_si512(xe + i + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
}

/* Column n for rows [m0, m0 + MT) of the permuted xe: two blocks a step, four accumulators
 * a row. bshift: block -> group is b >> bshift. */
CQ_INLINE CQ_BF16 void gemv_column_blocks(const uint16_t *xe, const uint8_t *packed, const float *absmax,
                                          __m512 table, const float *bias, uint16_t *y, int64_t N,
                                          int64_t K, int bshift, int64_t n, int64_t m0, const int MT) {
    __m512 acc[GEMV_MR][4];
    for (int m = 0; m < MT; m++)
        acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    const int64_t b0 = n * K / 64, nblk = K / 64;
    const uint8_t *pb = packed + 32 * b0;
    const uint16_t *xr = xe + m0 * K;
    int64_t gcur = b0 >> bshift;
    __m512i tab = group_table(table, absmax[gcur]);
    int64_t b = 0;
    for (; b < nblk; b += 2) {
        _mm_prefetch((const char *)(pb + 32 * b) + GEMV_PREFETCH, _MM_HINT_T0);
        const int two = b + 2 <= nblk;
        __m512i we[2], wo[2];
        for (int i = 0; i < 2; i++) {
            if (i == 1 && !two) {
                we[1] = wo[1] = _mm512_setzero_si512();
                break;
            }
            if (((b0 + b + i) >> bshift) != gcur) {
                gcur = (b0 + b + i) >> bshift;
                tab = group_table(table, absmax[gcur]);
            }
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(pb + 32 * (b + i))));
            we[i] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab);
            wo[i] = _mm512_permutexvar_epi16(w, tab);
        }
        for (int m = 0; m < MT; m++) {
            const uint16_t *xm = xr + m * K + 64 * b;
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], AS_BH(_mm512_loadu_si512(xm)), AS_BH(we[0]));
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], AS_BH(_mm512_loadu_si512(xm + 32)), AS_BH(wo[0]));
            if (two) {
                acc[m][2] = _mm512_dpbf16_ps(acc[m][2], AS_BH(_mm512_loadu_si512(xm + 64)), AS_BH(we[1]));
                acc[m][3] = _mm512_dpbf16_ps(acc[m][3], AS_BH(_mm512_loadu_si512(xm + 96)), AS_BH(wo[1]));
            }
        }
    }
    for (int m = 0; m < MT; m++) {
        __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        y[(m0 + m) * N + n] = finish(_mm512_reduce_add_ps(t), bias, n);
    }
}

static CQ_BF16 void linear_gemv(const uint16_t *x, const uint8_t *packed, const float *absmax,
                                __m512 table, const float *bias, uint16_t *y, int64_t M, int64_t N,
                                int64_t K, int cshift, int64_t n0, int64_t n1) {
    /* whole 64-blocks: x permuted once into scratch (no scratch: the general path) */
    uint16_t *xe = K % 64 == 0 && cshift >= 1 ? alloc64((size_t)(M * K) * 2) : NULL;
    if (xe)
        permute_x_even_odd(x, xe, M * K);
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
#define COL(MT)                                                                                  \
    do {                                                                                         \
        if (xe)                                                                                  \
            gemv_column_blocks(xe, packed, absmax, table, bias, y, N, K, cshift - 1, n, m0, MT); \
        else                                                                                     \
            gemv_column(x, packed, absmax, table, bias, y, N, K, cshift, n, m0, MT);             \
    } while (0)
        CQ_ROW_TILES_4_2_1(m0, M, COL);
#undef COL
    }
    free(xe);
}

/* ---------------------------------------------------------------- GEMM (more rows) */
/* Rows [nb, nb + nw) of W, k in [kb, kb + kl), as bf16 into rows (row j at
 * rows + j * ROW_STRIDE), zero from kl up to the next multiple of 32; rows j >= nw zero. */
static CQ_BF16 void decode_panel(const uint8_t *packed, const float *absmax, __m512 table,
                                 uint16_t *rows, int64_t N, int64_t K, int cshift, int64_t nb,
                                 int64_t nw, int64_t kb, int64_t kl) {
    const int64_t nbytes = (N * K + 1) / 2, kl32 = CQ_CDIV(kl, 32) * 32;
    for (int64_t j = 0; j < PANEL_N; j++) {
        uint16_t *row = rows + j * ROW_STRIDE;
        if (j >= nw) {
            memset(row, 0, (size_t)kl32 * 2);
            continue;
        }
        const int64_t s = (nb + j) * K + kb, e = s + kl;
        /* The 32 rows are 32 strided streams, more than the hardware prefetchers follow:
         * fetch this row's next block (or the next panel's first) while this one decodes. */
        const int64_t next = e < (nb + j + 1) * K ? e : (nb + j + PANEL_N) * K;
        if (next < N * K) {
            const char *q = (const char *)packed + next / 2;
            _mm_prefetch(q, _MM_HINT_T0);
            _mm_prefetch(q + 64, _MM_HINT_T0);
            _mm_prefetch(q + 127, _MM_HINT_T0);
            _mm_prefetch((const char *)(absmax + (next >> (cshift + 5))), _MM_HINT_T0);
        }
        /* first and last chunk masked to [s, e); whole chunks between them as they are */
        int64_t c = s / 32, g = c >> cshift;
        const int64_t c_last = (e - 1) / 32;
        __m512i tab = group_table(table, absmax[g]);
        _mm512_mask_storeu_epi16((void *)at16(row, 32 * c - s), chunk_mask(c, s, e),
                                 _mm512_permutexvar_epi16(chunk_codes(packed, c, nbytes), tab));
        uint16_t *out = row + (32 * ++c - s);
        for (const uint8_t *pc = packed + 16 * c; c < c_last; c++, pc += 16, out += 32) {
            if ((c >> cshift) != g) {
                g = c >> cshift;
                tab = group_table(table, absmax[g]);
            }
            __m512i codes = codes_from_bytes(_mm_loadu_si128((const __m128i *)pc));
            _mm512_storeu_si512(out, _mm512_permutexvar_epi16(codes, tab));
        }
        if (c == c_last) {
            if ((c >> cshift) != g)
                tab = group_table(table, absmax[c >> cshift]);
            _mm512_mask_storeu_epi16(out, chunk_mask(c, s, e),
                                     _mm512_permutexvar_epi16(chunk_codes(packed, c, nbytes), tab));
        }
        memset(row + kl, 0, (size_t)(kl32 - kl) * 2);
    }
}

/* 16 x 16 dword transpose: r[i] holds row i; afterwards r[i] holds column i. */
CQ_INLINE CQ_BF16 void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) { /* lane L of a[2i]: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1] */
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* lane L of b[4i + c]: rows 4i..4i+3 at column 4L + c */
        b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) { /* column 4L + c = lane L of b[c], b[4 + c], b[8 + c], b[12 + c] */
        __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
        __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* rows (PANEL_N rows of bf16, kl32 = kl rounded up to 32) -> panel[p][j] = the dword of
 * row j's elements (2p, 2p + 1): k-pair-major, one 128-byte line of 32 columns a pair. */
static CQ_BF16 void interleave_panel(const uint16_t *rows, uint32_t *panel, int64_t kl) {
    const int64_t blocks = CQ_CDIV(kl, 32); /* 16 pairs each */
    for (int64_t blk = 0; blk < blocks; blk++)
        for (int h = 0; h < PANEL_N / 16; h++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_load_si512(rows + (16 * h + i) * ROW_STRIDE + 32 * blk);
            transpose16(r);
            for (int i = 0; i < 16; i++)
                _mm512_store_si512(panel + (16 * blk + i) * PANEL_N + 16 * h, r[i]);
        }
}

/* Rows [m0, m0 + MR) x the panel's 32 columns over k in [kb, kb + kl): partial sums from
 * and to cacc (row stride PANEL_N), or y (bf16, + bias) after the last k-block. */
CQ_INLINE CQ_BF16 void gemm_tile(const uint16_t *x, const uint32_t *panel, float *cacc,
                                 const float *bias, uint16_t *y, int64_t N, int64_t K, int64_t kb,
                                 int64_t kl, int64_t nb, int64_t nw, int64_t m0, int first, int last,
                                 const int MR) {
    __m512 acc[GEMM_MR][2];
    for (int r = 0; r < MR; r++) {
        if (first) {
            acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        } else {
            acc[r][0] = _mm512_load_ps(cacc + (m0 + r) * PANEL_N);
            acc[r][1] = _mm512_load_ps(cacc + (m0 + r) * PANEL_N + 16);
        }
    }
    const uint16_t *xp = x + m0 * K + kb;
    const int64_t pairs = kl / 2;
    for (int64_t p = 0; p < pairs; p++) {
        const __m512i w0 = _mm512_load_si512(panel + p * PANEL_N);
        const __m512i w1 = _mm512_load_si512(panel + p * PANEL_N + 16);
        for (int r = 0; r < MR; r++) {
            int32_t pair;
            memcpy(&pair, xp + r * K + 2 * p, 4);
            const __m512i xb = _mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], AS_BH(xb), AS_BH(w0));
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], AS_BH(xb), AS_BH(w1));
        }
    }
    if (kl & 1) { /* odd K: the last k alone; its pair's second weight is the zero padding */
        const __m512i w0 = _mm512_load_si512(panel + pairs * PANEL_N);
        const __m512i w1 = _mm512_load_si512(panel + pairs * PANEL_N + 16);
        for (int r = 0; r < MR; r++) {
            const __m512i xb = _mm512_set1_epi32((int32_t)xp[r * K + 2 * pairs]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], AS_BH(xb), AS_BH(w0));
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], AS_BH(xb), AS_BH(w1));
        }
    }
    if (!last) {
        for (int r = 0; r < MR; r++) {
            _mm512_store_ps(cacc + (m0 + r) * PANEL_N, acc[r][0]);
            _mm512_store_ps(cacc + (m0 + r) * PANEL_N + 16, acc[r][1]);
        }
        return;
    }
    const __mmask16 m_lo = (__mmask16)(nw >= 16 ? 0xffff : (1u << nw) - 1);
    const __mmask16 m_hi = (__mmask16)(nw <= 16 ? 0 : nw >= 32 ? 0xffff : (1u << (nw - 16)) - 1);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias) {
        b0 = _mm512_maskz_loadu_ps(m_lo, bias + nb);
        b1 = _mm512_maskz_loadu_ps(m_hi, bias + nb + 16);
    }
    for (int r = 0; r < MR; r++) {
        uint16_t *yr = y + (m0 + r) * N + nb;
        __m256i h0 = f32_to_bf16(_mm512_add_ps(acc[r][0], b0));
        __m256i h1 = f32_to_bf16(_mm512_add_ps(acc[r][1], b1));
        _mm256_mask_storeu_epi16(yr, m_lo, h0);
        _mm256_mask_storeu_epi16(yr + 16, m_hi, h1);
    }
}

static CQ_BF16 int linear_gemm(const uint16_t *x, const uint8_t *packed, const float *absmax,
                               __m512 table, const float *bias, uint16_t *y, int64_t M, int64_t N,
                               int64_t K, int cshift, int64_t n0, int64_t n1) {
    uint16_t *rows = alloc64((size_t)PANEL_N * ROW_STRIDE * 2);
    uint32_t *panel = alloc64((size_t)(PANEL_K / 2) * PANEL_N * 4);
    float *cacc = K > PANEL_K ? alloc64((size_t)M * PANEL_N * 4) : NULL;
    if (!rows || !panel || (K > PANEL_K && !cacc)) {
        free(rows);
        free(panel);
        free(cacc);
        return CQ_ENOMEM;
    }
    uint16_t *row0 = rows + ROW_PAD; /* row j's element k at row0[j * ROW_STRIDE + k] */
    for (int64_t nb = n0; nb < n1; nb += PANEL_N) {
        const int64_t nw = min64(PANEL_N, n1 - nb);
        for (int64_t kb = 0; kb < K; kb += PANEL_K) {
            const int64_t kl = min64(PANEL_K, K - kb);
            const int first = kb == 0, last = kb + kl == K;
            decode_panel(packed, absmax, table, row0, N, K, cshift, nb, nw, kb, kl);
            interleave_panel(row0, panel, kl);
            int64_t m0 = 0;
#define TILE(MR) gemm_tile(x, panel, cacc, bias, y, N, K, kb, kl, nb, nw, m0, first, last, MR)
            for (; m0 + GEMM_MR <= M; m0 += GEMM_MR)
                TILE(GEMM_MR);
            switch (M - m0) {
            case 11: TILE(11); break;
            case 10: TILE(10); break;
            case 9: TILE(9); break;
            case 8: TILE(8); break;
            case 7: TILE(7); break;
            case 6: TILE(6); break;
            case 5: TILE(5); break;
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            case 1: TILE(1); break;
            default: break;
            }
#undef TILE
        }
    }
    free(rows);
    free(panel);
    free(cacc);
    return CQ_OK;
}

/* linear_4bit_bf16_avx512bf16: columns [n0, n1) of y = x W^T (+ bias), bf16 x and y,
 * float32 bias, W rounded to bf16 as dequantize_4bit writes it (contract: kernels.h). */
static CQ_BF16 int linear_4bit_bf16_avx512bf16(const uint16_t *restrict x, const uint8_t *restrict packed,
                                               const float *restrict absmax, const float *bias,
                                               uint16_t *restrict y, int64_t M, int64_t N, int64_t K,
                                               int64_t group, int codebook, int64_t n0, int64_t n1) {
    if (group < 32 || (group & (group - 1)) != 0)
        return CQ_EINVAL; /* formats.h: groups are powers of two >= 32 */
    const int cshift = __builtin_ctzll((unsigned long long)group) - 5; /* chunk -> group: c >> cshift */
    const __m512 table = _mm512_loadu_ps(cq_table_4bit(codebook));
    if (M < GEMM_MIN_M) {
        linear_gemv(x, packed, absmax, table, bias, y, M, N, K, cshift, n0, n1);
        return CQ_OK;
    }
    return linear_gemm(x, packed, absmax, table, bias, y, M, N, K, cshift, n0, n1);
}

const cq_cpu_kernels cq_nf4_fp4_avx512bf16 = {
    .name = "avx512bf16",
    .linear_4bit_bf16 = linear_4bit_bf16_avx512bf16,
};

#else /* no AVX512-BF16 in this compiler or target: ops.py keeps the float32 linear */
const cq_cpu_kernels cq_nf4_fp4_avx512bf16 = {.name = "avx512bf16"};
#endif
