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

/* Chunks a batch: 64 bytes of weights a lane over the NT row tiles, 2 to 4 chunks (even,
 * for the absmax pairs; more spills registers with two batches in flight). */
__host__ __device__ constexpr int skinny_batch(int nt, int bytes) {
    return 64 / (nt * bytes) < 2 ? 2 : (64 / (nt * bytes) > 4 ? 4 : 64 / (nt * bytes));
}

/* One batch of U chunks of this lane's weights (NT row tiles) and the absmax of its C
 * columns: what a warp has in flight while it computes the previous batch. */
template <int U, int NT, int WORDS>
struct SkinnyBatch {
    uint32_t w[U][NT][WORDS];
    float am[U][NT][2];
};

/* Byte `B` of `w` as the byte offset of its entry in the lane-private table
 * (entry * 128 + lane * 4): one shift and one LOP3 (and-or) before the LDS. */
template <int B>
__device__ __forceinline__ uint32_t lut_offset(uint32_t w, uint32_t lane4) {
    constexpr int sh = 8 * B;
    const uint32_t v = sh >= 7 ? (w >> (sh - 7)) : (w << (7 - sh));
    return (v & 0x7f80u) | lane4;
}

template <typename T, int NT, int BYTES, int MH>
__global__ void __launch_bounds__(128, 4)
linear4_skinny(const T *__restrict__ x, const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
               const T *__restrict__ bias, T *__restrict__ y, int M, int64_t N, int64_t K, int log2_group,
               int codebook, int S, int amv, int knob_probe) {
    constexpr int W = 4, R = W * NT * 8;
    constexpr int CK = BYTES * 8;    /* k of one chunk: 4 lanes x BYTES x 2 codes */
    constexpr int STEPS = BYTES / 2; /* m16n8k16 steps a chunk */
    constexpr int XW = BYTES;        /* 32-bit words of x per lane, row and chunk */
    constexpr int WORDS = BYTES / 4;
    constexpr int U = skinny_batch(NT, BYTES);
    __shared__ __align__(16) uint32_t lut[256 * 32];
    __shared__ float part[16 * R];
    __shared__ float table[16];
    /* (constant memory serializes lane-divergent reads: stage the 16 values first) */
    if (threadIdx.x < 16)
        table[threadIdx.x] = c_table4[codebook][threadIdx.x];
    __syncthreads();
    /* entry b (codes hi, lo of byte b) at words [32 b, 32 b + 32): one copy per lane, so
     * every lookup hits the lane's own bank; written 4 copies per 16-byte store */
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
        const int b = i >> 3;
        const uint32_t v = pack2<T>(table[b >> 4], table[b & 15]);
        reinterpret_cast<uint4 *>(lut)[i] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const uint32_t lane4 = (uint32_t)lane * 4u;
    const char *lut_bytes = reinterpret_cast<const char *>(lut);
    const int64_t row_tiles = (N + R - 1) / R;
    const int64_t kslice = K / S, k_begin = blockIdx.x * kslice;
    const int nchunks = (int)(kslice / CK), nbatch = (nchunks + U - 1) / U;
    const int probe = knob_probe;

    for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t n_warp = tile * R + warp * NT * 8;
    const int64_t m0 = (int64_t)blockIdx.z * 16;
    const int mv = M - m0 < 16 ? (int)(M - m0) : 16;

    const uint8_t *wp[NT];
    int64_t acol[NT][2]; /* flat index of (column, k_begin) of this lane's C columns */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        int64_t n = n_warp + j * 8 + r;
        n = n < N ? n : N - 1; /* rows past N: read a valid row, never stored */
        wp[j] = packed + ((n * K + k_begin) >> 1) + t * BYTES;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int64_t c = n_warp + j * 8 + 2 * t + e;
            acol[j][e] = (c < N ? c : N - 1) * K + k_begin;
        }
    }
    const bool row0 = r < mv, row1 = MH > 1 && r + 8 < mv;
    const T *xp0 = x + (m0 + (row0 ? r : 0)) * K + k_begin + t * (CK / 4);
    const T *xp1 = x + (m0 + (row1 ? r + 8 : 0)) * K + k_begin + t * (CK / 4);

    /* Requests batch `b` (U chunks of weights and absmax) without waiting for it. With
     * amv (chunk == group, batches group-aligned, absmax 16-byte aligned: the launcher
     * checks) the absmax of a column's U chunks are U consecutive floats. */
    auto request = [&](int b, SkinnyBatch<U, NT, WORDS> &bt) {
        const int ci0 = b * U;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const uint8_t *p = wp[j] + (int64_t)ci0 * (CK / 2);
#pragma unroll
            for (int u = 0; u < U; u++)
                if (ci0 + u < nchunks)
                    load_words<BYTES>(p + u * (CK / 2), bt.w[u][j]);
        }
        if (amv) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float *ap = absmax + (acol[j][e] >> log2_group) + ci0;
#pragma unroll
                    for (int u = 0; u < U; u += 2) {
                        float2 v = __ldg(reinterpret_cast<const float2 *>(ap + u));
                        bt.am[u][j][e] = v.x;
                        bt.am[u + 1][j][e] = v.y;
                    }
                }
        } else {
#pragma unroll
            for (int u = 0; u < U; u++)
                if (ci0 + u < nchunks)
#pragma unroll
                    for (int j = 0; j < NT; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            bt.am[u][j][e] = __ldg(absmax + ((acol[j][e] + (int64_t)(ci0 + u) * CK) >> log2_group));
        }
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    /* Tokens of chunk ci into xr0/xr1 (L1 hits: every warp of the block reads them). */
    auto load_x = [&](int ci, uint32_t (&xr0)[XW], uint32_t (&xr1)[MH > 1 ? XW : 1]) {
#pragma unroll
        for (int i = 0; i < XW; i += 4) {
            uint4 u0 = row0 ? __ldg(reinterpret_cast<const uint4 *>(xp0 + (int64_t)ci * CK) + i / 4)
                            : make_uint4(0, 0, 0, 0);
            xr0[i] = u0.x; xr0[i + 1] = u0.y; xr0[i + 2] = u0.z; xr0[i + 3] = u0.w;
            if constexpr (MH > 1) {
                uint4 u1 = row1 ? __ldg(reinterpret_cast<const uint4 *>(xp1 + (int64_t)ci * CK) + i / 4)
                                : make_uint4(0, 0, 0, 0);
                xr1[i] = u1.x; xr1[i + 1] = u1.y; xr1[i + 2] = u1.z; xr1[i + 3] = u1.w;
            }
        }
    };

    /* Computes batch `b`. One token row (M <= 8): the tokens of the next chunk are
     * requested before the MMAs of the current one; two rows would spill registers, and
     * the next batch's weights are in flight meanwhile anyway. */
    auto compute = [&](int b, const SkinnyBatch<U, NT, WORDS> &bt) {
        constexpr int XB = MH > 1 ? 1 : 2;
        const int ci0 = b * U;
        uint32_t xa0[XB][XW], xa1[XB][MH > 1 ? XW : 1];
        load_x(ci0, xa0[0], xa1[0]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (ci0 + u >= nchunks)
                break;
            if (XB == 1 && u > 0)
                load_x(ci0 + u, xa0[0], xa1[0]);
            if (XB == 2 && u + 1 < U && ci0 + u + 1 < nchunks)
                load_x(ci0 + u + 1, xa0[(u + 1) % XB], xa1[(u + 1) % XB]);
            const uint32_t *cx0 = xa0[u % XB], *cx1 = xa1[u % XB];
            if (probe) { /* benchmark probe: memory traffic alone, no decode or MMA */
#pragma unroll
                for (int j = 0; j < NT; j++)
                    acc[j][0] += __uint_as_float((bt.w[u][j][0] ^ cx0[0]) & 0x007fffffu) * bt.am[u][j][0] +
                                 bt.am[u][j][1];
                continue;
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int s = 0; s < STEPS; s++) {
                    uint32_t a[4];
                    a[0] = cx0[2 * s];
                    a[2] = cx0[2 * s + 1];
                    a[1] = MH > 1 ? cx1[MH > 1 ? 2 * s : 0] : 0u;
                    a[3] = MH > 1 ? cx1[MH > 1 ? 2 * s + 1 : 0] : 0u;
                    const uint32_t w = bt.w[u][j][s >> 1];
                    const uint32_t o0 = (s & 1) ? lut_offset<2>(w, lane4) : lut_offset<0>(w, lane4);
                    const uint32_t o1 = (s & 1) ? lut_offset<3>(w, lane4) : lut_offset<1>(w, lane4);
                    const uint32_t b0 = *reinterpret_cast<const uint32_t *>(lut_bytes + o0);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t *>(lut_bytes + o1);
                    mma_16816<T>(tmp, a, b0, b1);
                }
                acc[j][0] = fmaf(tmp[0], bt.am[u][j][0], acc[j][0]);
                acc[j][1] = fmaf(tmp[1], bt.am[u][j][1], acc[j][1]);
                acc[j][2] = fmaf(tmp[2], bt.am[u][j][0], acc[j][2]);
                acc[j][3] = fmaf(tmp[3], bt.am[u][j][1], acc[j][3]);
            }
        }
    };

    /* Two batches in registers: batch b + 1 is in flight while batch b is computed
     * (runs 1-4: one batch at a time left the warps waiting on memory latency). */
    SkinnyBatch<U, NT, WORDS> ba, bb;
    if (nbatch > 0)
        request(0, ba);
    for (int b = 0; b < nbatch; b += 2) {
        if (b + 1 < nbatch)
            request(b + 1, bb);
        compute(b, ba);
        if (b + 1 >= nbatch)
            break;
        if (b + 2 < nbatch)
            request(b + 2, ba);
        compute(b + 1, bb);
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

/* Blocks of the skinny kernel: four 128-thread blocks per SM are resident (registers
 * <= 128, 36 KB of shared memory each). The K split S (a cluster, sm_90) is the largest
 * that keeps every block resident at once, so that no second, thin wave waits on DRAM
 * latency alone (run 3: 576 block-tiles on 528 slots ran as two waves); it divides K
 * into whole batches where it can (then the absmax of a batch is one vector load). */
static inline int skinny_split(const DeviceInfo &dev, int64_t blocks, int64_t chunks, int U) {
    const int forced = knob(KNOB_SPLIT_K);
    if (dev.cc < 90)
        return 1;
    const int64_t units = chunks % U == 0 ? chunks / U : chunks;
    int S = forced > 0 ? (forced < 8 ? forced : 8) : 8;
    if (forced <= 0)
        while (S > 1 && blocks * S > 4 * (int64_t)dev.sms)
            S--;
    while (S > 1 && (units % S != 0 || units / S < 2))
        S--;
    return S;
}

template <typename T, int NT, int BYTES>
static int run_skinny(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    constexpr int R = 4 * NT * 8, CK = BYTES * 8, U = skinny_batch(NT, BYTES);
    const int64_t row_tiles = (N + R - 1) / R;
    const unsigned gz = (unsigned)((M + 15) / 16);
    const int S = skinny_split(dev, row_tiles * gz, K / CK, U);
    const int64_t kslice = K / S;
    const int amv = (int64_t(1) << lg) == CK && K % (U * CK) == 0 && kslice % (U * CK) == 0 &&
                    (reinterpret_cast<uintptr_t>(absmax) & 7u) == 0;
    /* all blocks resident at once; when there are more row tiles than that, each block
     * loops over the same number of them (give or take one) */
    const int64_t slots = 4 * (int64_t)dev.sms / ((int64_t)S * gz) > 0 ? 4 * (int64_t)dev.sms / ((int64_t)S * gz) : 1;
    const int64_t rounds = (row_tiles + slots - 1) / slots;
    const unsigned gy = (unsigned)((row_tiles + rounds - 1) / rounds);
    if (M <= 8)
        return launch_clustered(linear4_skinny<T, NT, BYTES, 1>, S, gy, gz, 128, stream, "linear_4bit", x, packed,
                                absmax, bias, y, (int)(M < 16 ? M : 16), N, K, lg, codebook, S, amv,
                                knob(KNOB_SKINNY_PROBE));
    /* the kernel reads M only through min(M - m0, 16) */
    return launch_clustered(linear4_skinny<T, NT, BYTES, 2>, S, gy, gz, 128, stream, "linear_4bit", x, packed,
                            absmax, bias, y, (int)(M < INT32_MAX ? M : INT32_MAX), N, K, lg, codebook, S, amv,
                            knob(KNOB_SKINNY_PROBE));
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
