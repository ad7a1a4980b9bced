/* linear4.cu: fused 4-bit linear y[M, N] = x[M, K] W^T + bias, W in the bnb_nf4 /
 * bnb_fp4 layout (formats.h), for small M (tokens): each weight byte is read once.
 *
 * linear4_skinny (sm_80+, bf16/f16, K a multiple of the chunk): tensor cores via
 * skinny.cuh. A chunk of CK = 8 * BYTES consecutive k of one row lies in one group
 * (CK <= group), so the lane sums table[code] * x over the chunk on tensor cores and
 * scales the partial sum by absmax once per chunk. Codes become bf16/f16 pairs
 * through a 256-entry table of byte -> (table[hi], table[lo]) kept once per lane
 * (32 copies: every lookup hits the lane's own bank). Table values are rounded to
 * bf16/f16 before the product with absmax, so y matches the dequantize-then-GEMM
 * result to bf16/f16 rounding of the weight.
 * linear4_generic: every other case (float32, odd K, sm_75, unaligned): one warp per
 * output column, weights decoded exactly in float32.
 */
#include "launchers.cuh"
#include "skinny.cuh"

namespace cq {

__constant__ float c_table4[2][16] = {CQ_NF4_TABLE_INIT, CQ_FP4_TABLE_INIT};

template <typename T, int NT, int BYTES, int MH>
__global__ void __launch_bounds__(128)
linear4_skinny(const T *__restrict__ x, const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
               const T *__restrict__ bias, T *__restrict__ y, int M, int64_t N, int64_t K, int log2_group,
               int codebook, int S) {
    constexpr int W = 4, R = W * NT * 8;
    constexpr int CK = BYTES * 8;   /* k of one chunk: 4 lanes x BYTES x 2 codes */
    constexpr int STEPS = BYTES / 2; /* m16n8k16 steps a chunk */
    constexpr int XW = BYTES;        /* 32-bit words of x per lane, row and chunk */
    __shared__ uint32_t lut[256 * 32];
    __shared__ float part[16 * R];
    __shared__ float table[16];
    /* (constant memory serializes lane-divergent reads: stage the 16 values first) */
    if (threadIdx.x < 16)
        table[threadIdx.x] = c_table4[codebook][threadIdx.x];
    __syncthreads();
    for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
        int b = i >> 5; /* one entry per warp-iteration: broadcast reads */
        lut[i] = pack2<T>(table[b >> 4], table[b & 15]);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const int64_t row_tiles = (N + R - 1) / R;
    /* the table costs a block ~an eighth of its work: each block takes several row tiles */
    for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t n_warp = tile * R + warp * NT * 8;
    const int64_t m0 = (int64_t)blockIdx.z * 16;
    const int mv = M - m0 < 16 ? (int)(M - m0) : 16;
    const int64_t kslice = K / S, k_begin = blockIdx.x * kslice, k_end = k_begin + kslice;
    const uint32_t *my_lut = lut + lane;

    const uint8_t *wp[NT];
    int64_t acol[NT][2]; /* flat index of (column, 0) of this lane's C columns */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        int64_t n = n_warp + j * 8 + r;
        n = n < N ? n : N - 1; /* rows past N: read a valid row, never stored */
        wp[j] = packed + ((n * K) >> 1) + t * BYTES;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int64_t c = n_warp + j * 8 + 2 * t + e;
            acol[j][e] = (c < N ? c : N - 1) * K;
        }
    }
    const bool row0 = r < mv, row1 = MH > 1 && r + 8 < mv;
    const T *xp0 = x + (m0 + (row0 ? r : 0)) * K + t * (CK / 4);
    const T *xp1 = x + (m0 + (row1 ? r + 8 : 0)) * K + t * (CK / 4);

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    /* U chunks of weights and absmax are requested before any is used: a warp keeps
     * U * NT * BYTES bytes a lane in flight (one chunk alone left the kernel waiting on
     * memory latency, run 1/2). Tokens come from L1 (all warps of the block read them). */
    constexpr int U = BYTES == 16 ? 4 : 8;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += U * CK) {
        uint32_t ww[U][NT][BYTES / 4];
        float am[U][NT][2];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t k = k0 + u * CK;
            if (k < k_end) {
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    load_words<BYTES>(wp[j] + (k >> 1), ww[u][j]);
                    am[u][j][0] = __ldg(absmax + ((acol[j][0] + k) >> log2_group));
                    am[u][j][1] = __ldg(absmax + ((acol[j][1] + k) >> log2_group));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t k = k0 + u * CK;
            if (k >= k_end)
                break;
            uint32_t cx0[XW], cx1[XW];
#pragma unroll
            for (int i = 0; i < XW; i += 4) {
                uint4 u0 = row0 ? __ldg(reinterpret_cast<const uint4 *>(xp0 + k) + i / 4) : make_uint4(0, 0, 0, 0);
                cx0[i] = u0.x; cx0[i + 1] = u0.y; cx0[i + 2] = u0.z; cx0[i + 3] = u0.w;
                if (MH > 1) {
                    uint4 u1 = row1 ? __ldg(reinterpret_cast<const uint4 *>(xp1 + k) + i / 4) : make_uint4(0, 0, 0, 0);
                    cx1[i] = u1.x; cx1[i + 1] = u1.y; cx1[i + 2] = u1.z; cx1[i + 3] = u1.w;
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int s = 0; s < STEPS; s++) {
                    uint32_t a[4];
                    a[0] = cx0[2 * s];
                    a[2] = cx0[2 * s + 1];
                    a[1] = MH > 1 ? cx1[2 * s] : 0u;
                    a[3] = MH > 1 ? cx1[2 * s + 1] : 0u;
                    uint32_t w = ww[u][j][s >> 1];
                    uint32_t b0 = my_lut[((w >> (16 * (s & 1))) & 0xffu) << 5];
                    uint32_t b1 = my_lut[((w >> (16 * (s & 1) + 8)) & 0xffu) << 5];
                    mma_16816<T>(tmp, a, b0, b1);
                }
                acc[j][0] = fmaf(tmp[0], am[u][j][0], acc[j][0]);
                acc[j][1] = fmaf(tmp[1], am[u][j][1], acc[j][1]);
                acc[j][2] = fmaf(tmp[2], am[u][j][0], acc[j][2]);
                acc[j][3] = fmaf(tmp[3], am[u][j][1], acc[j][3]);
            }
        }
    }

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
        continue;
    }
    const int nl = warp * NT * 8;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            part[(r + (e >> 1) * 8) * R + nl + j * 8 + 2 * t + (e & 1)] = acc[j][e];
    cluster_reduce_store<T>(part, R, S, bias, y, m0, mv, tile * R, N);
    } /* row tiles */
}

/* linear4_generic: warp per (column n, 8 tokens); exact float32 weights. */
template <typename T>
__global__ void __launch_bounds__(256)
linear4_generic(const T *__restrict__ x, const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
                const T *__restrict__ bias, T *__restrict__ y, int64_t M, int64_t N, int64_t K, int log2_group,
                int codebook) {
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = c_table4[codebook][threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t n = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int64_t m0 = blockIdx.y * 8;
    if (n >= N)
        return;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = lane; k < K; k += 32) {
        int64_t i = n * K + k;
        uint8_t byte = packed[i >> 1];
        uint8_t code = (i & 1) ? (byte & 15) : (byte >> 4);
        float w = table[code] * absmax[i >> log2_group];
#pragma unroll
        for (int m = 0; m < 8; m++)
            if (m0 + m < M)
                acc[m] = fmaf(to_f32(x[(m0 + m) * K + k]), w, acc[m]);
    }
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

template <typename T, int NT, int BYTES>
static int run_skinny(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    constexpr int R = 4 * NT * 8, CK = BYTES * 8;
    const int64_t row_tiles = (N + R - 1) / R;
    const unsigned gz = (unsigned)((M + 15) / 16);
    const int S = choose_split(dev, row_tiles * gz, K / CK);
    /* about four blocks per SM in all; a block loops when there are more row tiles */
    int64_t want = (4 * (int64_t)dev.sms + (int64_t)S * gz - 1) / ((int64_t)S * gz);
    const unsigned gy = (unsigned)(row_tiles < want ? row_tiles : (want > 0 ? want : 1));
    if (M <= 8)
        return launch_clustered(linear4_skinny<T, NT, BYTES, 1>, S, gy, gz, 128, stream, "linear_4bit", x, packed,
                                absmax, bias, y, (int)(M < 16 ? M : 16), N, K, lg, codebook, S);
    /* the kernel reads M only through min(M - m0, 16) */
    return launch_clustered(linear4_skinny<T, NT, BYTES, 2>, S, gy, gz, 128, stream, "linear_4bit", x, packed,
                            absmax, bias, y, (int)(M < INT32_MAX ? M : INT32_MAX), N, K, lg, codebook, S);
}

template <typename T, int NT>
static int pick_bytes(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    if (lg >= 7)
        return run_skinny<T, NT, 16>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    if (lg == 6)
        return run_skinny<T, NT, 8>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    return run_skinny<T, NT, 4>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
}

template <typename T>
static int linear_4bit_t(const T *x, const uint8_t *packed, const float *absmax, const T *bias, T *y, int64_t M,
                         int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    DeviceInfo dev;
    int st = device_info(&dev);
    if (st)
        return st;
    const int chunk = lg >= 7 ? 128 : (lg == 6 ? 64 : 32);
    int path = knob(KNOB_LINEAR_4BIT);
    bool skinny_ok = sizeof(T) == 2 && dev.cc >= 80 && K % chunk == 0 && aligned16(x) && aligned16(packed) &&
                     M <= INT32_MAX;
    if (path == 0)
        path = skinny_ok ? 2 : 1;
    if (path == 2 && skinny_ok) {
        if constexpr (sizeof(T) == 2) {
            int nt = knob(KNOB_SKINNY_TILE);
            if (nt == 1)
                return pick_bytes<T, 1>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
            if (nt == 4)
                return pick_bytes<T, 4>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
            return pick_bytes<T, 2>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
        }
    }
    dim3 grid((unsigned)((N + 7) / 8), (unsigned)((M + 7) / 8));
    linear4_generic<T><<<grid, 256, 0, stream>>>(x, packed, absmax, bias, y, M, N, K, lg, codebook);
    return check_launch("linear_4bit (generic)");
}

int launch_linear_4bit(const void *x, int dtype, const uint8_t *packed, const float *absmax, const void *bias,
                       void *y, int64_t M, int64_t N, int64_t K, int64_t group, int codebook, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || K <= 0 || group < 32 || (group & (group - 1)) ||
        (codebook != CQ_NF4 && codebook != CQ_FP4) || (M + 7) / 8 > 65535)
        return CQ_EINVAL;
    int lg = 0;
    while ((int64_t(1) << lg) < group)
        lg++;
    return CQ_DISPATCH_FLOAT(dtype, T,
                             linear_4bit_t<T>(static_cast<const T *>(x), packed, absmax, static_cast<const T *>(bias),
                                              static_cast<T *>(y), M, N, K, lg, codebook, stream));
}

} /* namespace cq */
