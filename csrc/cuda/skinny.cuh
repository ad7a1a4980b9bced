/* skinny.cuh: pieces of the small-M ("skinny") GEMM kernels of linear4.cu and int8.cu.
 *
 * A warp computes y[16 tokens, 8 NT rows of W] with mma.sync m16n8k16 (bf16/f16) or
 * m16n8k32 (s8) on tensor cores, reading W once, straight from global memory in its
 * own layout: lane (r = lane/4, t = lane%4) loads a contiguous run of row r's bytes,
 * and the K order inside a chunk is permuted so that those bytes are exactly the
 * lane's B fragment; the A fragment (tokens) is read with the same permutation.
 * The split of K over the blocks of a thread-block cluster (sm_90) keeps ~4 blocks
 * per SM busy when N is small; partial sums meet in distributed shared memory and
 * are added in rank order (deterministic).
 */
#ifndef COMFY_QUANT_CUDA_SKINNY_CUH
#define COMFY_QUANT_CUDA_SKINNY_CUH

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

namespace cq {

/* D = A B + C, 16x8x16, bf16 or f16 operands, float32 accumulate. */
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (sizeof(T) == 2 && DtypeOf<T>::code == CQ_BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

/* D = A B + C, 16x8x32, s8 operands, int32 accumulate (exact). */
__device__ __forceinline__ void mma_16832_s8(int d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

/* Loads `BYTES` (4, 8, 16) bytes as 32-bit words. */
template <int BYTES>
__device__ __forceinline__ void load_words(const void *p, uint32_t *w) {
    if constexpr (BYTES == 16) {
        uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
        w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
    } else if constexpr (BYTES == 8) {
        uint2 u = __ldg(reinterpret_cast<const uint2 *>(p));
        w[0] = u.x; w[1] = u.y;
    } else {
        w[0] = __ldg(reinterpret_cast<const uint32_t *>(p));
    }
}

/* Loads `BYTES` (4, 8, 16) bytes of shared memory as 32-bit words. */
template <int BYTES>
__device__ __forceinline__ void load_words_smem(const void *p, uint32_t *w) {
    if constexpr (BYTES == 16) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
    } else if constexpr (BYTES == 8) {
        const uint2 u = *reinterpret_cast<const uint2 *>(p);
        w[0] = u.x; w[1] = u.y;
    } else {
        w[0] = *reinterpret_cast<const uint32_t *>(p);
    }
}

/* Cluster split-K: partial sums part[16][R] of each block of the cluster are added
 * in rank order, with bias, into y rows [m0, m0 + mv) and columns [n0, n0 + R). */
template <typename T>
__device__ __forceinline__ void cluster_reduce_store(float *part, int R, int S, const T *bias, T *y,
                                                     int64_t m0, int mv, int64_t n0, int64_t N) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int rank = (int)cluster.block_rank();
    for (int e = rank * blockDim.x + threadIdx.x; e < mv * R; e += S * blockDim.x) {
        int m = e / R, r = e - m * R;
        int64_t n = n0 + r;
        if (n >= N)
            continue;
        float acc = 0.0f;
        for (int s = 0; s < S; s++)
            acc += cluster.map_shared_rank(part, s)[m * R + r];
        if (bias)
            acc += to_f32(bias[n]);
        y[(m0 + m) * N + n] = from_f32<T>(acc);
    }
    cluster.sync();
#endif
}

/* The end of a warp's share of a skinny row tile: its C fragments acc[NT][4] (16 tokens
 * x NT tiles of 8 rows from n_warp) go to y with bias when K is not split (S == 1), else
 * through part[16][R] (the block's R rows from n0) and the cluster's rank-ordered sum. */
template <typename T, int NT>
__device__ __forceinline__ void skinny_store(const float (&acc)[NT][4], float *part, int R, int S, const T *bias,
                                             T *y, int64_t m0, int mv, int64_t n0, int64_t n_warp, int64_t N) {
    const int lane = threadIdx.x & 31, r = lane >> 2, t = lane & 3;
    if (S == 1) {
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int m = r + (e >> 1) * 8;
                int64_t n = n_warp + j * 8 + 2 * t + (e & 1);
                if (m < mv && n < N) {
                    float v = acc[j][e];
                    if (bias)
                        v += to_f32(bias[n]);
                    y[(m0 + m) * N + n] = from_f32<T>(v);
                }
            }
        return;
    }
    const int nl = (int)(n_warp - n0);
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            part[(r + (e >> 1) * 8) * R + nl + j * 8 + 2 * t + (e & 1)] = acc[j][e];
    cluster_reduce_store<T>(part, R, S, bias, y, m0, mv, n0, N);
}

/* Launches `kernel` on grid (S, gy, gz) with clusters of S blocks along x (S > 1
 * needs sm_90) and `smem` bytes of dynamic shared memory; early: programmatic dependent
 * launch (cluster_launch_config). */
template <typename Kernel, typename... Args>
static int launch_clustered_smem(Kernel kernel, int S, unsigned gy, unsigned gz, int threads, size_t smem, bool early,
                                 cudaStream_t stream, const char *where, Args... args) {
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = cluster_launch_config(dim3((unsigned)S, gy, gz), threads, smem, stream,
                                                         (unsigned)S, attr, early);
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err != cudaSuccess) {
        set_error(where, err);
        return CQ_ECUDA;
    }
    return check_launch(where);
}

template <typename Kernel, typename... Args>
static int launch_clustered(Kernel kernel, int S, unsigned gy, unsigned gz, int threads, bool early,
                            cudaStream_t stream, const char *where, Args... args) {
    return launch_clustered_smem(kernel, S, gy, gz, threads, 0, early, stream, where, args...);
}

/* Split of K over a cluster: about 4 blocks per SM in all, at most 8 blocks a
 * cluster (the portable limit), each taking a whole number of chunks. */
static inline int choose_split(const DeviceInfo &dev, int64_t blocks, int64_t chunks) {
    int forced = knob(KNOB_SPLIT_K);
    int S = 1;
    if (dev.cc >= 90) {
        int64_t want = (4 * (int64_t)dev.sms + blocks - 1) / blocks;
        S = (int)(want < 8 ? want : 8);
        if (forced > 0)
            S = forced < 8 ? forced : 8;
        if (S < 1)
            S = 1;
        while (S > 1 && (chunks % S != 0 || chunks / S < 2))
            S--;
    }
    return S;
}

} /* namespace cq */

#endif
