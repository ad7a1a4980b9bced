/* int8.c: int8_blockwise / int8_lodewise / int8_tensorwise kernels (layout: formats.h),
 * reference scalar versions. One family serves the three layouts as tiles of
 * gn x gk: block (B, B), lode (1, B), row (1, K); activations use gn = 1.
 * SIMD variants of the same functions live in int8_simd.c. */
#include <math.h>

#include "../kernels.h"
#include "convert.h"

/* ---------------------------------------------------------------- quantize */
/* quantize_int8_ref: tile rows [r0, r1): scale = amax / 127 per tile,
 * q = round-half-even(x / scale) (0 where scale == 0), NaN/Inf rejected. */
static int quantize_int8_ref(const void *restrict x, int x_dtype, int8_t *restrict q,
                             float *restrict scale, int64_t N, int64_t K, int64_t gn, int64_t gk,
                             int64_t r0, int64_t r1, int64_t *restrict bad_group) {
    const int64_t kb = CQ_CDIV(K, gk);
    for (int64_t tr = r0; tr < r1; tr++) {
        int64_t n_lo = tr * gn, n_hi = n_lo + gn < N ? n_lo + gn : N;
        for (int64_t j = 0; j < kb; j++) {
            int64_t k_lo = j * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
            uint32_t amax_bits = 0; /* max |x| as bits: finite < Inf < NaN */
            for (int64_t n = n_lo; n < n_hi; n++)
                for (int64_t k = k_lo; k < k_hi; k++) {
                    uint32_t b = cq_f32_bits(cq_load_f32(x, x_dtype, n * K + k)) & 0x7fffffffu;
                    amax_bits = b > amax_bits ? b : amax_bits;
                }
            if (amax_bits >= 0x7f800000u) {
                *bad_group = tr * kb + j;
                return CQ_ENONFINITE;
            }
            float s = cq_bits_f32(amax_bits) / (float)CQ_INT8_QMAX;
            scale[tr * kb + j] = s;
            for (int64_t n = n_lo; n < n_hi; n++)
                for (int64_t k = k_lo; k < k_hi; k++) {
                    float v = s > 0.0f ? rintf(cq_load_f32(x, x_dtype, n * K + k) / s) : 0.0f;
                    v = v > CQ_INT8_QMAX ? CQ_INT8_QMAX : (v < -CQ_INT8_QMAX ? -CQ_INT8_QMAX : v);
                    q[n * K + k] = (int8_t)v;
                }
        }
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- dequantize */
/* dequantize_int8_ref: tile rows [r0, r1): y = q * scale, float32 then y_dtype. */
static int dequantize_int8_ref(const int8_t *restrict q, const float *restrict scale,
                               void *restrict y, int y_dtype, int64_t N, int64_t K, int64_t gn,
                               int64_t gk, int64_t r0, int64_t r1) {
    const int64_t kb = CQ_CDIV(K, gk);
    int64_t n_end = r1 * gn < N ? r1 * gn : N;
    for (int64_t n = r0 * gn; n < n_end; n++) {
        const float *s = scale + (n / gn) * kb;
        for (int64_t k = 0; k < K; k++)
            cq_store_f32(y, y_dtype, n * K + k, (float)q[n * K + k] * s[k / gk]);
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- W8A8 GEMM */
/* gemm_int8_ref: columns [n0, n1): y = sum_g dot_g * (xs * ws) + bias, groups in order. */
static int gemm_int8_ref(const int8_t *restrict xq, const float *restrict xs,
                         const int8_t *restrict wq, const float *restrict ws, const float *bias,
                         float *restrict y, int64_t M, int64_t N, int64_t K, int64_t xs_groups,
                         int64_t gn, int64_t gk, int64_t n0, int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk);
    for (int64_t n = n0; n < n1; n++) {
        const float *w_s = ws + (n / gn) * kb;
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < kb; g++) {
                int64_t k_lo = g * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
                int32_t dot = 0;
                for (int64_t k = k_lo; k < k_hi; k++)
                    dot += (int32_t)xq[m * K + k] * (int32_t)wq[n * K + k];
                float x_s = xs[m * xs_groups + (xs_groups > 1 ? g : 0)];
                acc += (float)dot * (x_s * w_s[g]);
            }
            y[m * N + n] = bias ? acc + bias[n] : acc;
        }
    }
    return CQ_OK;
}

/* ---------------------------------------------------------------- weight-only linear */
/* linear_int8_ref: columns [n0, n1): y = x (q * scale)^T + bias in float32, k in order. */
static int linear_int8_ref(const float *restrict x, const int8_t *restrict wq,
                           const float *restrict ws, const float *bias, float *restrict y,
                           int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk, int64_t n0,
                           int64_t n1) {
    const int64_t kb = CQ_CDIV(K, gk);
    for (int64_t n = n0; n < n1; n++) {
        const float *w_s = ws + (n / gn) * kb;
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += x[m * K + k] * ((float)wq[n * K + k] * w_s[k / gk]);
            y[m * N + n] = bias ? acc + bias[n] : acc;
        }
    }
    return CQ_OK;
}

const cq_cpu_kernels cq_int8_ref = {
    .name = "ref",
    .quantize_int8 = quantize_int8_ref,
    .dequantize_int8 = dequantize_int8_ref,
    .gemm_int8 = gemm_int8_ref,
    .linear_int8 = linear_int8_ref,
};
