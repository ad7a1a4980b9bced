/* async_sm90.cuh: mbarriers and the bulk copy engine (sm_90+), shared by the kernels that
 * stream global memory into a ring of shared-memory stages (gemm_int8_sm90.cu,
 * linear4.cu). Every helper compiles to nothing below sm_90; its callers are launched
 * only on compute capability 9.0 and newer. */
#ifndef COMFY_QUANT_CUDA_ASYNC_SM90_CUH
#define COMFY_QUANT_CUDA_ASYNC_SM90_CUH

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CQ_ASYNC_DEVICE 1
#endif

namespace cq {

__device__ __forceinline__ uint32_t s_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#ifdef CQ_ASYNC_DEVICE
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
#endif
}
/* the inits, visible to the async proxy (bulk copies complete on these barriers) */
__device__ __forceinline__ void mbar_init_fence() {
#ifdef CQ_ASYNC_DEVICE
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
#ifdef CQ_ASYNC_DEVICE
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifdef CQ_ASYNC_DEVICE
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef CQ_ASYNC_DEVICE
    uint32_t done = 0;
    do {
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
#endif
}
/* `bytes` (a multiple of 16; both addresses 16-byte aligned) global -> shared by the bulk
 * copy engine; credited to mbarrier `bar` as they land */
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
#ifdef CQ_ASYNC_DEVICE
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}

} /* namespace cq */

#endif
