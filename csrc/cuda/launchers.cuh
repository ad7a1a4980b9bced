/* launchers.cuh: the launchers behind cq_cuda_api (launch.h), one family per .cu file.
 * Each takes the arguments of its table entry; api.cu fills the table with them. */
#ifndef COMFY_QUANT_CUDA_LAUNCHERS_CUH
#define COMFY_QUANT_CUDA_LAUNCHERS_CUH

#include "common.cuh"

namespace cq {

/* quant4.cu */
CQ_HIDDEN int launch_quantize_4bit(const void *x, int x_dtype, uint8_t *packed, float *absmax,
                                   int64_t n, int64_t group, int codebook, cudaStream_t stream);
CQ_HIDDEN int launch_dequantize_4bit(const uint8_t *packed, const float *absmax, void *y,
                                     int y_dtype, int64_t n, int64_t group, int codebook,
                                     cudaStream_t stream);
CQ_HIDDEN int launch_dequantize_absmax(const uint8_t *codes, const float *nested,
                                       const float *map, float offset, float *absmax, int64_t G,
                                       cudaStream_t stream);
/* linear4.cu */
CQ_HIDDEN int launch_linear_4bit(const void *x, int dtype, const uint8_t *packed,
                                 const float *absmax, const void *bias, void *y, int64_t M,
                                 int64_t N, int64_t K, int64_t group, int codebook,
                                 cudaStream_t stream);
/* int8.cu */
CQ_HIDDEN int launch_quantize_int8(const void *x, int x_dtype, int8_t *q, float *scale,
                                   int64_t N, int64_t K, int64_t gn, int64_t gk,
                                   cudaStream_t stream);
CQ_HIDDEN int launch_dequantize_int8(const int8_t *q, const float *scale, void *y, int y_dtype,
                                     int64_t N, int64_t K, int64_t gn, int64_t gk,
                                     cudaStream_t stream);
CQ_HIDDEN int launch_linear_int8(const void *x, int dtype, const int8_t *wq, const float *ws,
                                 const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                                 int64_t gn, int64_t gk, cudaStream_t stream);
/* gemm_int8.cu */
CQ_HIDDEN int launch_gemm_int8(const int8_t *xq, const float *xs, const int8_t *wq,
                               const float *ws, const void *bias, void *y, int y_dtype,
                               int64_t M, int64_t N, int64_t K, int64_t xs_groups, int64_t gn,
                               int64_t gk, void *workspace, int64_t workspace_bytes,
                               cudaStream_t stream);

} /* namespace cq */

#endif
