/* kernels.h: the CPU kernel contract and the one dispatch table.
 *
 * Every kernel works on a range of independent work units [begin, end) so that the
 * thread pool (cpu/threads.c) can split any call without changing its result: the
 * chunking never splits a quantization group. Parameter order: inputs, outputs,
 * scales, sizes, range. Pointers are restrict and non-null unless said; all
 * counts are int64_t. Each returns a cq_status and never touches Python.
 *
 * Variants: *_ref (portable scalar C, canonical, always built), *_avx2, *_avx512,
 * *_avx512vnni, *_avx512bf16.
 * A variant that is not compiled for this machine is NULL in its table and the
 * reference fills in. Quantize and dequantize variants are bit-identical to *_ref;
 * linear variants agree to float32 rounding (summation order differs).
 */
#ifndef COMFY_QUANT_KERNELS_H
#define COMFY_QUANT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "formats.h"

#if defined(_MSC_VER)
#define CQ_RESTRICT __restrict
#else
#define CQ_RESTRICT restrict
#endif

/* 4-bit quantize, groups [g0, g1): x (dtype x_dtype: CQ_F32/F16/BF16) has n values;
 * writes packed bytes of those groups and absmax[g0..g1). Group size is even, so
 * groups never share a byte. CQ_ENONFINITE (and *bad_group) on NaN/Inf. */
typedef int (*cq_quantize_4bit_fn)(const void *CQ_RESTRICT x, int x_dtype,
                                   uint8_t *CQ_RESTRICT packed, float *CQ_RESTRICT absmax,
                                   int64_t n, int64_t group, int codebook,
                                   int64_t g0, int64_t g1, int64_t *CQ_RESTRICT bad_group);

/* 4-bit dequantize, groups [g0, g1): y (dtype y_dtype) = table[code] * absmax. */
typedef int (*cq_dequantize_4bit_fn)(const uint8_t *CQ_RESTRICT packed,
                                     const float *CQ_RESTRICT absmax,
                                     void *CQ_RESTRICT y, int y_dtype,
                                     int64_t n, int64_t group, int codebook,
                                     int64_t g0, int64_t g1);

/* Fused 4-bit linear, output columns [n0, n1): y[M, N] = x[M, K] W^T (+ bias), float32
 * x, bias (may be NULL) and y; W [N, K] in the 4-bit layout (groups over the
 * flattened index, so a group may straddle rows). For small M: reads W once. */
typedef int (*cq_linear_4bit_fn)(const float *CQ_RESTRICT x, const uint8_t *CQ_RESTRICT packed,
                                 const float *CQ_RESTRICT absmax, const float *bias,
                                 float *CQ_RESTRICT y,
                                 int64_t M, int64_t N, int64_t K, int64_t group, int codebook,
                                 int64_t n0, int64_t n1);

/* Fused 4-bit linear for bfloat16 activations, output columns [n0, n1): y[M, N] (bf16) =
 * x[M, K] (bf16) W^T (+ bias, float32, may be NULL), each weight rounded to bf16 as
 * dequantize_4bit writes it, float32 accumulation, y rounded once (RNE). Only level
 * avx512bf16 has one (vdpbf16ps); it is NULL below, and ops.py then runs linear_4bit on
 * float32 x. Results never depend on the chunking; [n0, n1) on multiples of 32 keeps
 * its panels whole. */
typedef int (*cq_linear_4bit_bf16_fn)(const uint16_t *CQ_RESTRICT x, const uint8_t *CQ_RESTRICT packed,
                                      const float *CQ_RESTRICT absmax, const float *bias,
                                      uint16_t *CQ_RESTRICT y,
                                      int64_t M, int64_t N, int64_t K, int64_t group, int codebook,
                                      int64_t n0, int64_t n1);

/* int8 quantize over tiles of gn x gk, tile rows [r0, r1) (units of gn rows):
 * x [N, K] -> q int8 [N, K], scale [ceil(N/gn), ceil(K/gk)]. Serves weights
 * (block, lode, row) and activations (gn = 1). CQ_ENONFINITE (and *bad_group =
 * flat tile index) on NaN/Inf. */
typedef int (*cq_quantize_int8_fn)(const void *CQ_RESTRICT x, int x_dtype,
                                   int8_t *CQ_RESTRICT q, float *CQ_RESTRICT scale,
                                   int64_t N, int64_t K, int64_t gn, int64_t gk,
                                   int64_t r0, int64_t r1, int64_t *CQ_RESTRICT bad_group);

/* int8 dequantize, tile rows [r0, r1): y = q * scale[tile] in y_dtype. */
typedef int (*cq_dequantize_int8_fn)(const int8_t *CQ_RESTRICT q, const float *CQ_RESTRICT scale,
                                     void *CQ_RESTRICT y, int y_dtype,
                                     int64_t N, int64_t K, int64_t gn, int64_t gk,
                                     int64_t r0, int64_t r1);

/* W8A8 GEMM, output columns [n0, n1): y[m, n] = sum_g dot_g * (xs[m, g*] * ws[n/gn, g]) (+ bias[n]),
 * dot_g the exact int32 dot over weight K-group g (width gk), g* = g when xs has
 * one scale per weight K-group (xs_groups = ceil(K/gk)) and 0 when per token
 * (xs_groups = 1). Groups are added in order g = 0, 1, ... in float32. */
typedef int (*cq_gemm_int8_fn)(const int8_t *CQ_RESTRICT xq, const float *CQ_RESTRICT xs,
                               const int8_t *CQ_RESTRICT wq, const float *CQ_RESTRICT ws,
                               const float *bias, float *CQ_RESTRICT y,
                               int64_t M, int64_t N, int64_t K, int64_t xs_groups,
                               int64_t gn, int64_t gk, int64_t n0, int64_t n1);

/* Weight-only int8 linear, output columns [n0, n1): y = x W^T (+ bias), float32 x/y/bias. */
typedef int (*cq_linear_int8_fn)(const float *CQ_RESTRICT x, const int8_t *CQ_RESTRICT wq,
                                 const float *CQ_RESTRICT ws, const float *bias,
                                 float *CQ_RESTRICT y,
                                 int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk,
                                 int64_t n0, int64_t n1);

/* bitsandbytes double-quantized absmax, entries [i0, i1):
 * absmax[i] = map[codes[i]] * nested[i / CQ_DQ_BLOCK] + offset (two float32 roundings). */
typedef int (*cq_dequantize_absmax_fn)(const uint8_t *CQ_RESTRICT codes,
                                       const float *CQ_RESTRICT nested,
                                       const float *CQ_RESTRICT map, float offset,
                                       float *CQ_RESTRICT absmax, int64_t i0, int64_t i1);

typedef struct cq_cpu_kernels {
    const char *name; /* "ref", "avx2", "avx512" */
    cq_quantize_4bit_fn quantize_4bit;
    cq_dequantize_4bit_fn dequantize_4bit;
    cq_linear_4bit_fn linear_4bit;
    cq_linear_4bit_bf16_fn linear_4bit_bf16;
    cq_quantize_int8_fn quantize_int8;
    cq_dequantize_int8_fn dequantize_int8;
    cq_gemm_int8_fn gemm_int8;
    cq_linear_int8_fn linear_int8;
    cq_dequantize_absmax_fn dequantize_absmax;
} cq_cpu_kernels;

/* Tables of each family; an entry is NULL where the variant has no own version. */
extern const cq_cpu_kernels cq_nf4_fp4_ref, cq_nf4_fp4_avx2, cq_nf4_fp4_avx512, cq_nf4_fp4_avx512bf16;
extern const cq_cpu_kernels cq_int8_ref, cq_int8_avx2, cq_int8_avx512, cq_int8_avx512vnni;

/* Level names in increasing order; cq_cpu_level_supported() says what this CPU runs.
 * avx512vnni is avx512 plus VNNI (vpdpbusd), which only the int8 GEMM uses.
 * avx512bf16 is avx512vnni plus AVX512-BF16 (vdpbf16ps) and VBMI (vpmultishiftqb), which
 * only linear_4bit_bf16 uses. A level rather than a separate flag: every CPU with
 * AVX512-BF16 also has VNNI (and all but Cooper Lake, which stays at avx512vnni, VBMI:
 * Sapphire Rapids and later, Zen 4 and later), so the ladder stays linear,
 * COMFY_QUANT_CPU / set_cpu_level stay the one knob, and forcing avx512vnni on such a
 * CPU runs (and tests) the float32 fallback. */
enum cq_cpu_level {
    CQ_CPU_REF = 0,
    CQ_CPU_AVX2 = 1,
    CQ_CPU_AVX512 = 2,
    CQ_CPU_AVX512_VNNI = 3,
    CQ_CPU_AVX512_BF16 = 4,
    CQ_CPU_LEVELS = 5
};
extern const char *const cq_cpu_level_names[CQ_CPU_LEVELS]; /* "ref", ..., "avx512bf16" */
int cq_cpu_level_supported(int level);
/* Fill *out with the kernels of `level`, each NULL entry taken from the next lower level. */
void cq_cpu_kernels_for_level(int level, cq_cpu_kernels *out);

/* Thread pool (cpu/threads.c): run fn(ctx, begin, end) over [0, units) on at most
 * nthreads threads, split into contiguous chunks (up to 4 per thread, each of about
 * min_units_per_thread units or more) whose bounds are multiples of `align` units. Returns
 * the first non-OK status. Safe to call from several Python threads at once. */
typedef int (*cq_range_fn)(void *ctx, int64_t begin, int64_t end);
int cq_parallel_for(int64_t units, int64_t align, int nthreads, int64_t min_units_per_thread,
                    cq_range_fn fn, void *ctx);
void cq_threads_shutdown(void);

/* Scalar element conversions shared by every variant (cpu/convert.h). */
#endif /* COMFY_QUANT_KERNELS_H */
