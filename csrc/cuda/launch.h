/* launch.h: the CUDA launcher contract, shared by the .cu files of csrc/cuda and csrc/module.c.
 *
 * The CUDA kernels build into their own shared object (_cuda_kernels.so) with
 * no link to libtorch; module.c dlopen()s it and asks cq_cuda_get_api() for this
 * table, so the CPU module loads on machines without CUDA. Every launcher:
 *   - runs on `stream` (torch's current cudaStream_t, passed from Python as an int);
 *   - never allocates, never synchronizes (capturable in CUDA graphs): torch
 *     allocates every output and workspace in ops.py;
 *   - checks cudaGetLastError() after each launch and returns CQ_ECUDA with the
 *     message kept for cq_cuda_last_error();
 *   - takes the same arguments as the CPU kernel of the same name (kernels.h), on
 *     whole tensors, plus dtype codes where the GPU path keeps bf16/fp16 end to end.
 * Quantize launchers do not report NaN/Inf: a non-finite group gets a non-finite
 * absmax/scale (the amax reduction propagates NaN), which ops.py checks.
 */
#ifndef COMFY_QUANT_CUDA_LAUNCH_H
#define COMFY_QUANT_CUDA_LAUNCH_H

#include <stdint.h>

#include "../formats.h"

/* Bytes of gemm_int8's workspace that let a GPU of `sms` multiprocessors split the K of
 * its last, partly filled round of tiles: one 128 x 256 int32 partial tile and one flag
 * a multiprocessor (gemm_int8_sm90.cu). */
#define CQ_GEMM_WORKSPACE_BYTES(sms) ((int64_t)(sms) * (128 * 256 * 4 + 4))

#ifdef __cplusplus
#define CQ_EXTERN_C extern "C"
#else
#define CQ_EXTERN_C
#endif

/* Bumped whenever the table below changes; module.c refuses a mismatched .so. */
#define CQ_CUDA_API_VERSION 1

typedef void *cq_stream; /* a cudaStream_t */

typedef struct cq_cuda_api {
    int version;
    /* x [n] (F32/F16/BF16) -> packed uint8 [ceil(n/2)], absmax [ceil(n/group)] */
    int (*quantize_4bit)(const void *x, int x_dtype, uint8_t *packed, float *absmax, int64_t n,
                         int64_t group, int codebook, cq_stream stream);
    /* packed, absmax -> y [n] in y_dtype */
    int (*dequantize_4bit)(const uint8_t *packed, const float *absmax, void *y, int y_dtype,
                           int64_t n, int64_t group, int codebook, cq_stream stream);
    /* y[M, N] = x[M, K] W^T + bias; x, bias (or NULL), y all of `dtype` */
    int (*linear_4bit)(const void *x, int dtype, const uint8_t *packed, const float *absmax,
                       const void *bias, void *y, int64_t M, int64_t N, int64_t K, int64_t group,
                       int codebook, cq_stream stream);
    /* x [N, K] -> q int8 [N, K], scale [ceil(N/gn), ceil(K/gk)] */
    int (*quantize_int8)(const void *x, int x_dtype, int8_t *q, float *scale, int64_t N,
                         int64_t K, int64_t gn, int64_t gk, cq_stream stream);
    int (*dequantize_int8)(const int8_t *q, const float *scale, void *y, int y_dtype, int64_t N,
                           int64_t K, int64_t gn, int64_t gk, cq_stream stream);
    /* W8A8: y[M, N] (y_dtype, bias of y_dtype or NULL) from int8 xq [M, K], xs
     * [M, xs_groups], wq [N, K], ws [ceil(N/gn), ceil(K/gk)]; see kernels.h. workspace
     * (device memory of workspace_bytes, or NULL): scratch for K-split partial tiles;
     * CQ_GEMM_WORKSPACE_BYTES(sms) lets every kernel use it, less (or NULL) only turns
     * the K split off. */
    int (*gemm_int8)(const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
                     const void *bias, void *y, int y_dtype, int64_t M, int64_t N, int64_t K,
                     int64_t xs_groups, int64_t gn, int64_t gk, void *workspace,
                     int64_t workspace_bytes, cq_stream stream);
    /* weight-only int8: y = x (q * scale)^T + bias, x/bias/y of `dtype` */
    int (*linear_int8)(const void *x, int dtype, const int8_t *wq, const float *ws,
                       const void *bias, void *y, int64_t M, int64_t N, int64_t K, int64_t gn,
                       int64_t gk, cq_stream stream);
    /* absmax[i] = map[codes[i]] * nested[i / 256] + offset, i < G */
    int (*dequantize_absmax)(const uint8_t *codes, const float *nested, const float *map,
                             float offset, float *absmax, int64_t G, cq_stream stream);
    /* Message of the last CQ_ECUDA on this thread. */
    const char *(*last_error)(void);
} cq_cuda_api;

/* The one exported symbol of _cuda_kernels.so. */
CQ_EXTERN_C const cq_cuda_api *cq_cuda_get_api(void);

#endif /* COMFY_QUANT_CUDA_LAUNCH_H */
