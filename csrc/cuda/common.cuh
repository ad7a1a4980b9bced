/* common.cuh: helpers shared by the .cu files of csrc/cuda (never exported).
 *
 * Error state: a launcher that sees a CUDA error stores its message (thread-local)
 * and returns CQ_ECUDA; cq_cuda_get_api()->last_error() hands it to module.c.
 * Element conversions round to nearest even, as csrc/cpu/convert.h does.
 */
#ifndef COMFY_QUANT_CUDA_COMMON_CUH
#define COMFY_QUANT_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"

#define CQ_HIDDEN __attribute__((visibility("hidden")))

namespace cq {

/* ------------------------------------------------------------------ errors */
CQ_HIDDEN void set_error(const char *where, cudaError_t err);
CQ_HIDDEN void set_error_msg(const char *where, const char *msg);
CQ_HIDDEN const char *last_error();

/* After a launch: CQ_OK, or CQ_ECUDA with the message kept. */
static inline int check_launch(const char *where) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess)
        return CQ_OK;
    set_error(where, err);
    return CQ_ECUDA;
}

#define CQ_CUDA_TRY(call, where)                                                               \
    do {                                                                                       \
        cudaError_t err_ = (call);                                                             \
        if (err_ != cudaSuccess) {                                                             \
            set_error(where, err_);                                                            \
            return CQ_ECUDA;                                                                   \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------ device facts */
struct DeviceInfo {
    int index;
    int cc;           /* 10 * major + minor */
    int sms;          /* multiprocessors */
    int smem_optin;   /* max dynamic shared memory per block after opt-in */
};
/* Facts of the current device (cached per device). CQ_OK or CQ_ECUDA. */
CQ_HIDDEN int device_info(DeviceInfo *out);

/* Benchmark/test knobs (cq_cuda_set_variant): 0 = automatic choice. */
enum Knob {
    KNOB_GEMM_INT8 = 0,  /* 1 generic, 2 skinny mma, 3 sm80 mma.sync, 4 sm90 wgmma, 5 sm90 + multicast */
    KNOB_LINEAR_4BIT = 1,/* 1 generic, 2 skinny mma (cp.async stages), 3 streamed (sm_90, bulk copies) */
    KNOB_SPLIT_K = 2,    /* force the split-K cluster size of the skinny kernels */
    KNOB_SKINNY_TILE = 3,/* n-tiles of 8 rows per warp in the skinny kernels: 1, 2, 4 */
    KNOB_LINEAR_INT8 = 4,/* weight-only: 1 generic, 2 skinny mma */
    KNOB_SKINNY_PROBE = 5,/* benchmark probe, wrong results: 1 = 4-bit skinny loads only; streamed: 2 = weights only, 3 = no loads (compute alone),
                             4 = block 0's timeline in y (bench/skinny_launch.py --timeline), 6 = every block's start
                             and end in y (--blocks) */
    KNOB_STREAM_STAGES = 6,/* at most this many stages in the streamed 4-bit kernel's ring (>= 2) */
    KNOB_STREAM_XREG = 7,/* streamed 4-bit kernel's tokens: 1 staged in shared memory, 2 in registers */
    KNOB_GEMM_PROBE = 8, /* benchmark probe, wrong results: sm90 W8A8 with per-group scales, bits: 1 = no
                            promotion, 4 = CTA 0's consumers' K-tile timeline in y (bench/w8a8_parts.py
                            --timeline) */
    KNOB_GEMM_TAIL = 9,  /* sm90 W8A8, one K-group, K split of the last round's tiles: 1 = off, 2 = required (else refused) */
    KNOB_GEMM_STAGES = 10,/* sm90 W8A8, one K-group: 3 = 3 stages and the whole tile of y staged, 4 = 4 stages and one 64-column box (default: 4 where K >= 8192) */
    KNOB_PDL = 11,       /* programmatic dependent launch (sm_90) of the W8A8 GEMMs (skinny; wgmma with row
                            scales) after our activation quantize: 1 = off, 2 = also the streamed 4-bit
                            linear (benchmark) */
    KNOB_STREAM_AB = 12, /* streamed 4-bit kernel: 1 = absmax copied row by row (benchmark; default: a stage of
                            whole rows takes its absmax in one copy) */
    KNOB_STREAM_HALF = 13,/* streamed 4-bit kernel: 1 = a block's one-octet tile last (benchmark; default: first) */
    KNOB_COUNT = 14
};
CQ_HIDDEN int knob(int which);

/* ------------------------------------------------------------------ elements */
/* float32 of element i of a tensor whose dtype is T (float, __half, __nv_bfloat16). */
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

/* Two float32 -> two packed 16-bit values (lo = a), round to nearest even. */
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* Eight consecutive elements as float32 (p aligned to 8 elements). */
__device__ __forceinline__ void load8(const float *p, float v[8]) {
    float4 a = __ldg(reinterpret_cast<const float4 *>(p));
    float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T *p, float v[8]) {
    uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
    const T *h = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++)
        v[i] = to_f32(h[i]);
}

/* Eight consecutive elements kept raw (4 registers for 16-bit types, 8 for float): a
 * kernel issues all its loads into these before converting any, so they are in flight
 * together (bandwidth-bound kernels are bound by the loads in flight). */
template <typename T> struct Raw8 { uint4 w[sizeof(T) / 2]; };
template <typename T> __device__ __forceinline__ Raw8<T> load_raw8(const T *p) {
    Raw8<T> r;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++)
        r.w[i] = __ldg(reinterpret_cast<const uint4 *>(p) + i);
    return r;
}
template <typename T> __device__ __forceinline__ Raw8<T> zero_raw8() {
    Raw8<T> r;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++)
        r.w[i] = make_uint4(0, 0, 0, 0);
    return r;
}
template <typename T> __device__ __forceinline__ void unpack8(const Raw8<T> &r, float v[8]) {
    const T *h = reinterpret_cast<const T *>(r.w);
#pragma unroll
    for (int i = 0; i < 8; i++)
        v[i] = to_f32(h[i]);
}

/* |x| as ordered bits: finite < Inf < NaN, so an integer max propagates NaN. */
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v, int width) {
    for (int o = width / 2; o > 0; o >>= 1)
        v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* amax bits of a group of 2^log2_g values (32-256) held 8 a lane by consecutive lanes,
 * the same in each of its lanes */
__device__ __forceinline__ uint32_t lane_group_amax(const float v[8], int log2_g) {
    uint32_t amax = 0;
#pragma unroll
    for (int j = 0; j < 8; j++)
        amax = max(amax, abs_bits(v[j]));
    return warp_max_u32(amax, 1 << (log2_g - 3));
}

/* A launch of `grid` blocks of `threads` with `smem` bytes of dynamic shared memory on
 * `stream`, in clusters of `cluster` blocks along x (> 1 needs sm_90); `attr` is kept by
 * the caller while cfg is in use. early: programmatic dependent launch (sm_90; the
 * kernel calls pdl_wait before it touches global memory), unless knob pdl = 1. */
static inline cudaLaunchConfig_t cluster_launch_config(dim3 grid, int threads, size_t smem, cudaStream_t stream,
                                                       unsigned cluster, cudaLaunchAttribute (&attr)[2],
                                                       bool early = false) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3((unsigned)threads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    if (cluster > 1) {
        attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
        attr[cfg.numAttrs].val.clusterDim.x = cluster;
        attr[cfg.numAttrs].val.clusterDim.y = 1;
        attr[cfg.numAttrs].val.clusterDim.z = 1;
        cfg.numAttrs++;
    }
    if (early && knob(KNOB_PDL) != 1) {
        attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
        cfg.numAttrs++;
    }
    return cfg;
}

/* a / b for non-negative a, b: 32-bit division where both fit (a 64-bit division is a call
 * of ~70 dependent instructions) */
__device__ __forceinline__ int64_t udiv(int64_t a, int64_t b) {
    return ((a | b) >> 32) == 0 ? (int64_t)((uint32_t)a / (uint32_t)b) : a / b;
}

/* Programmatic dependent launch (sm_90). A grid launched `early` may start while the
 * stream's previous kernel still runs: pdl_wait() returns once that kernel has finished
 * and its writes are visible, so every thread calls it before its first global-memory
 * access (an L2 prefetch changes no value and may come before). pdl_release() lets the
 * stream's next early kernel start its blocks as ours leave the SMs; its pdl_wait still
 * waits for the whole of this grid. Both are no-ops in a grid launched without the
 * attribute, and compile to nothing below sm_90. */
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* End of the generic small-M linears (a warp per column n and 8 tokens from m0): the
 * lanes' partial sums acc[8] are added across the warp; lane 0 stores y[m0 + m, n]. */
template <typename T>
__device__ __forceinline__ void warp_column_store(const float (&acc)[8], const T *bias, T *y, int64_t m0,
                                                  int64_t M, int64_t n, int64_t N) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < 8; m++) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && m0 + m < M) {
            if (bias)
                v += to_f32(bias[n]);
            y[(m0 + m) * N + n] = from_f32<T>(v);
        }
    }
}

/* Raises `kernel`'s dynamic shared-memory limit to `bytes` once per device: the limit
 * belongs to the kernel in one device's context (set once per process, a second GPU kept
 * the default: cudaErrorInvalidValue), and calling it on every launch put a driver call
 * on the hot path. `done` is the caller's static bitmask for this kernel (bit = device;
 * devices past 63 set it every time). A race sets it twice, which is harmless. */
static inline int raise_smem_limit(const void *kernel, int bytes, unsigned long long *done, const char *where) {
    int dev = 0;
    CQ_CUDA_TRY(cudaGetDevice(&dev), where);
    const unsigned long long bit = dev >= 0 && dev < 64 ? 1ull << dev : 0;
    if (bit && (__atomic_load_n(done, __ATOMIC_ACQUIRE) & bit))
        return CQ_OK;
    CQ_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), where);
    __atomic_fetch_or(done, bit, __ATOMIC_RELEASE);
    return CQ_OK;
}

/* ------------------------------------------------------------------ cp.async (sm_80+) */
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared, bypassing L1 (.cg); the first `bytes` are copied, the rest
 * zero-filled (0: a zero store, src is not read). */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int bytes = 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
#endif
}
/* 4 bytes global -> shared (4-byte copies must go through L1: .ca). */
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename T> struct DtypeOf;
template <> struct DtypeOf<float> { static constexpr int code = CQ_F32; };
template <> struct DtypeOf<__half> { static constexpr int code = CQ_F16; };
template <> struct DtypeOf<__nv_bfloat16> { static constexpr int code = CQ_BF16; };

static inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

static inline unsigned grid_for(int64_t threads, int block) {
    return (unsigned)((threads + block - 1) / block);
}

} /* namespace cq */

/* Calls f.template operator()<T>() with T the C++ type of float dtype code `dt`;
 * evaluates to CQ_EINVAL for any other code. */
#define CQ_DISPATCH_FLOAT(dt, T, ...)                                                          \
    [&]() -> int {                                                                             \
        switch (dt) {                                                                          \
        case CQ_F32: { using T = float; return __VA_ARGS__; }                                  \
        case CQ_F16: { using T = __half; return __VA_ARGS__; }                                 \
        case CQ_BF16: { using T = __nv_bfloat16; return __VA_ARGS__; }                         \
        default: return CQ_EINVAL;                                                             \
        }                                                                                      \
    }()

#endif /* COMFY_QUANT_CUDA_COMMON_CUH */
