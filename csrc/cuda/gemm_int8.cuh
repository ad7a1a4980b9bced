/* gemm_int8.cuh: the W8A8 GEMM arguments shared by gemm_int8.cu (dispatch, sm_80 and
 * small-M kernels) and gemm_int8_sm90.cu (wgmma kernel). */
#ifndef COMFY_QUANT_CUDA_GEMM_INT8_CUH
#define COMFY_QUANT_CUDA_GEMM_INT8_CUH

#include "common.cuh"

namespace cq {

/* y[M, N] (T) = sum_g dot_g * (xs[m, g*] * ws[n / gn, g]) + bias (kernels.h). */
template <typename T> struct GemmInt8Args {
    const int8_t *xq;  /* [M, K] */
    const float *xs;   /* [M, xs_groups] */
    const int8_t *wq;  /* [N, K] */
    const float *ws;   /* [ceil(N / gn), ceil(K / gk)] */
    const T *bias;     /* [N] or NULL */
    T *y;              /* [M, N] */
    int64_t M, N, K, xs_groups, gn, gk;
    void *workspace;         /* K-split scratch (launch.h), or NULL */
    int64_t workspace_bytes;
};

/* Whether the sm_90a kernel was built and takes this shape. */
CQ_HIDDEN bool gemm_int8_sm90_supported(int64_t M, int64_t N, int64_t K, int64_t gk);
template <typename T>
CQ_HIDDEN int gemm_int8_sm90(const DeviceInfo &dev, const GemmInt8Args<T> &a, cudaStream_t stream);

} /* namespace cq */

#endif
