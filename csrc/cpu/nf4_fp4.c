/* nf4_fp4.c: bnb_nf4 / bnb_fp4 kernels (layout: formats.h), reference scalar versions.
 * SIMD variants of the same functions live in nf4_fp4_simd.c. */
#include <math.h>

#include "../kernels.h"
#include "convert.h"
#include "nf4_fp4_tables.h"

/* ---------------------------------------------------------------- quantize */
/* quantize_4bit_ref: groups [g0, g1) of x -> packed nibbles (high = even element) and
 * absmax; code = nearest table entry to x * (1/absmax) (formats.h), NaN/Inf rejected. */
static int quantize_4bit_ref(const void *restrict x, int x_dtype, uint8_t *restrict packed,
                             float *restrict absmax, int64_t n, int64_t group, int codebook,
                             int64_t g0, int64_t g1, int64_t *restrict bad_group) {
    const uint8_t zero_code = codebook == CQ_NF4 ? CQ_NF4_ZERO_CODE : CQ_FP4_ZERO_CODE;
    for (int64_t g = g0; g < g1; g++) {
        int64_t start = g * group, end = start + group < n ? start + group : n;
        uint32_t amax_bits = 0; /* max of |x| as bits: orders finite < Inf < NaN */
        for (int64_t i = start; i < end; i++) {
            uint32_t b = cq_f32_bits(cq_load_f32(x, x_dtype, i)) & 0x7fffffffu;
            amax_bits = b > amax_bits ? b : amax_bits;
        }
        if (amax_bits >= 0x7f800000u) {
            *bad_group = g;
            return CQ_ENONFINITE;
        }
        float amax = cq_bits_f32(amax_bits);
        float recip = amax > 0.0f ? 1.0f / amax : 0.0f;
        absmax[g] = amax;
        for (int64_t i = start; i < end; i += 2) {
            uint8_t hi = cq_code_4bit(cq_load_f32(x, x_dtype, i) * recip, codebook);
            uint8_t lo = i + 1 < end ? cq_code_4bit(cq_load_f32(x, x_dtype, i + 1) * recip, codebook)
                                     : zero_code;
            packed[i >> 1] = (uint8_t)(hi << 4 | lo);
        }
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- dequantize */
/* dequantize_4bit_ref: groups [g0, g1): y = table[code] * absmax, float32 product
 * rounded once to y_dtype. */
static int dequantize_4bit_ref(const uint8_t *restrict packed, const float *restrict absmax,
                               void *restrict y, int y_dtype, int64_t n, int64_t group,
                               int codebook, int64_t g0, int64_t g1) {
    const float *table = cq_table_4bit(codebook);
    for (int64_t g = g0; g < g1; g++) {
        int64_t start = g * group, end = start + group < n ? start + group : n;
        float a = absmax[g];
        for (int64_t i = start; i < end; i++) {
            uint8_t byte = packed[i >> 1];
            uint8_t code = (i & 1) ? (byte & 0xF) : (byte >> 4);
            cq_store_f32(y, y_dtype, i, table[code] * a);
        }
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- linear */
/* linear_4bit_ref: output columns [n0, n1) of y[M, N] = x W^T + bias, float32,
 * weights decoded one element at a time; the sum runs over k in order. */
static int linear_4bit_ref(const float *restrict x, const uint8_t *restrict packed,
                           const float *restrict absmax, const float *bias, float *restrict y,
                           int64_t M, int64_t N, int64_t K, int64_t group, int codebook,
                           int64_t n0, int64_t n1) {
    const float *table = cq_table_4bit(codebook);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                int64_t i = n * K + k;
                uint8_t byte = packed[i >> 1];
                uint8_t code = (i & 1) ? (byte & 0xF) : (byte >> 4);
                acc += x[m * K + k] * (table[code] * absmax[i / group]);
            }
            y[m * N + n] = bias ? acc + bias[n] : acc;
        }
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- double quantization */
/* dequantize_absmax_ref: entries [i0, i1) of absmax = map[code] * nested + offset. */
static int dequantize_absmax_ref(const uint8_t *restrict codes, const float *restrict nested,
                                 const float *restrict map, float offset, float *restrict absmax,
                                 int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
        float v = map[codes[i]] * nested[i / CQ_DQ_BLOCK];
        absmax[i] = v + offset;
    }
    return CQ_OK;
}

const cq_cpu_kernels cq_nf4_fp4_ref = {
    .name = "ref",
    .quantize_4bit = quantize_4bit_ref,
    .dequantize_4bit = dequantize_4bit_ref,
    .linear_4bit = linear_4bit_ref,
    .dequantize_absmax = dequantize_absmax_ref,
};
