/* int8.cu: int8_blockwise / int8_lodewise / int8_tensorwise quantize and dequantize,
 * and the weight-only int8 linear, on the GPU (layout and rounding: formats.h).
 * One family serves the three layouts as tiles of gn x gk (block (B, B), lode (1, B),
 * row (1, K)); activations are gn = 1. Bit-identical to the CPU *_ref kernels:
 * scale = amax / 127 by IEEE division (__fdiv_rn), the IEEE quotient x / scale (quant8
 * gets it without a division a value) rounded half to even, amax by an integer max on
 * |x| bits so NaN propagates. */
#include "launchers.cuh"
#include "quant_stream.cuh"

namespace cq {

__device__ __forceinline__ int8_t quant_one(float v, float s) {
    if (!(s > 0.0f))
        return 0;
    int q = __float2int_rn(__fdiv_rn(v, s));
    q = q > CQ_INT8_QMAX ? CQ_INT8_QMAX : (q < -CQ_INT8_QMAX ? -CQ_INT8_QMAX : q);
    return (int8_t)q;
}

/* Eight values quantized with scale s, packed little-endian, bit-identical to quant_one
 * but without a division a value. With r = rn(1 / s) and q0 = rn(v r), two correction
 * steps q <- rn(q + rn(v - q s) r) (FMAs) give the IEEE quotient fl(v / s), as the
 * division's own fast path does; the first is needed because q0 can be 1.2 ulp off near
 * the top of a binade, and the second then has an exact remainder (Markstein). s in
 * [2^-100, 2^100] keeps every step normal. Checked against numpy's division on 191 M
 * values of bf16, fp16 and float32 groups (none differed, and none after one step).
 * Adding 1.5 * 2^23 rounds the quotient to an integer, ties to even as __float2int_rn,
 * in the low mantissa bits, whose low byte is the code. No clamp: callers pass
 * s = fl(amax / 127) for the amax of these values' own group, so |fl(v / s)| < 127.0001.
 * This keeps the quarter-rate MUFU.RCP and F2I of quant_one off the per-value path.
 * Other s (zero, tiny, huge, Inf, NaN) take quant_one. */
__device__ __forceinline__ uint2 quant8(const float v[8], float s) {
    uint32_t b[8];
    if (s >= 0x1p-100f && s <= 0x1p100f) {
        const float r = __fdiv_rn(1.0f, s);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float q = __fmul_rn(v[j], r);
            q = __fmaf_rn(__fmaf_rn(-q, s, v[j]), r, q);
            q = __fmaf_rn(__fmaf_rn(-q, s, v[j]), r, q);
            b[j] = __float_as_uint(__fadd_rn(q, 0x1.8p23f));
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            b[j] = (uint32_t)(uint8_t)quant_one(v[j], s);
    }
    return make_uint2(__byte_perm(__byte_perm(b[0], b[1], 0x40), __byte_perm(b[2], b[3], 0x40), 0x5410),
                      __byte_perm(__byte_perm(b[4], b[5], 0x40), __byte_perm(b[6], b[7], 0x40), 0x5410));
}

template <typename T, bool VEC>
__device__ __forceinline__ void load_row8(const T *row, int64_t k, int64_t K, float v[8]) {
    if (VEC && k + 8 <= K) {
        load8(row + k, v);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            v[j] = k + j < K ? to_f32(row[k + j]) : 0.0f;
    }
}

template <bool VEC>
__device__ __forceinline__ void store_row8(int8_t *row, int64_t k, int64_t K, uint2 q) {
    if (VEC && k + 8 <= K) {
        *reinterpret_cast<uint2 *>(row + k) = q;
    } else {
        for (int j = 0; j < 8; j++)
            if (k + j < K)
                row[k + j] = (int8_t)((j < 4 ? q.x : q.y) >> (8 * (j & 3)));
    }
}

/* Scale of a group of 2^log2_g values (32-256) held 8 a lane by consecutive lanes:
 * amax / 127 over the group's lanes, the same in each. */
__device__ __forceinline__ float lane_group_scale(const float v[8], int log2_g) {
    return __fdiv_rn(__uint_as_float(lane_group_amax(v, log2_g)), (float)CQ_INT8_QMAX);
}

/* ---------------------------------------------------------------- quantize, gn == 1 */
/* quant_int8_spans: tiles of one row, gk a power of two <= 256: a warp takes 256
 * consecutive values of a row (8 a lane), tiles reduce over gk / 8 lanes. */
template <typename T, bool VEC>
__global__ void __launch_bounds__(256)
quant_int8_spans(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N, int64_t K,
                 int log2_gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    const int64_t spans = (K + 255) / 256;
    const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= N * spans) /* whole warp leaves together */
        return;
    const int64_t n = udiv(w, spans), k = (w - n * spans) * 256 + lane * 8;
    const T *row = x + n * K;
    float v[8];
    load_row8<T, VEC>(row, k, K, v);
    const float s = lane_group_scale(v, log2_gk);
    const int64_t kb = (K + (int64_t(1) << log2_gk) - 1) >> log2_gk;
    if ((k & ((int64_t(1) << log2_gk) - 1)) == 0 && k < K)
        scale[n * kb + (k >> log2_gk)] = s;
    if (k < K)
        store_row8<VEC>(q + n * K, k, K, quant8(v, s));
}

/* The int8 op of quant_stream_kernel (int8_lodewise, rows a multiple of 256 wide, so
 * the groups tile the flat array): scale = amax / 127 over G / 8 lanes, 8 codes a lane
 * (q 8-byte aligned). */
struct QuantInt8FlatOp {
    int8_t *q;
    float *scale;
    int log2_group;
    __device__ __forceinline__ void setup(float2 *) const {}
    __device__ __forceinline__ void operator()(int64_t i0, const float v[8], int lane, const float2 *) const {
        const float s = lane_group_scale(v, log2_group);
        if ((i0 & ((int64_t(1) << log2_group) - 1)) == 0)
            scale[i0 >> log2_group] = s;
        *reinterpret_cast<uint2 *>(q + i0) = quant8(v, s);
    }
};

/* Scale of a tile quantized by one block of up to 256 threads (whole warps): amax / 127
 * over every thread's amax bits (through warp_amax[8] in shared memory), the same value
 * in every thread. */
__device__ __forceinline__ float block_scale(uint32_t amax, uint32_t *warp_amax) {
    amax = warp_max_u32(amax, 32);
    if ((threadIdx.x & 31) == 0)
        warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0;
    const int warps = (int)(blockDim.x >> 5);
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (i < warps)
            amax = max(amax, warp_amax[i]);
    return __fdiv_rn(__uint_as_float(amax), (float)CQ_INT8_QMAX);
}

/* quant_int8_rowraw: a block per tile of one row (whole rows of activations and of
 * int8_tensorwise weights), 16-bit values, 16-byte aligned rows, width a multiple of 8.
 * Every thread issues its P 16-byte loads before using any and keeps them raw (8 values
 * in 4 registers, not 8 floats), so blocks stay small (P chunks a thread, blockDim
 * sized to the width) and many fit an SM: the loads of ~6 rows an SM are in flight
 * while other rows reduce and divide. One pass: amax over the block, then quantize. */
template <typename T, int P>
__global__ void __launch_bounds__(256)
quant_int8_rowraw(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N,
                  int64_t K, int64_t gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    __shared__ uint32_t warp_amax[8];
    const int64_t kb = (K + gk - 1) / gk;
    const int64_t n = blockIdx.y, g = blockIdx.x;
    const int64_t k0 = g * gk + threadIdx.x * 8; /* this thread's first value */
    const int left = (int)((g * gk + gk < K ? g * gk + gk : K) - k0); /* values of the tile from k0 */
    const int step = (int)blockDim.x * 8;
    const T *src = x + n * K + k0;
    uint4 raw[P];
#pragma unroll
    for (int p = 0; p < P; p++)
        raw[p] = p * step < left ? __ldg(reinterpret_cast<const uint4 *>(src + p * step)) : make_uint4(0, 0, 0, 0);
    uint32_t amax = 0; /* zero padding leaves the max alone */
#pragma unroll
    for (int p = 0; p < P; p++) {
        const T *h = reinterpret_cast<const T *>(&raw[p]);
#pragma unroll
        for (int j = 0; j < 8; j++)
            amax = max(amax, abs_bits(to_f32(h[j])));
    }
    /* opaque to the compiler: the floats of the amax pass are not kept for the second
     * (that would hold 8 P floats a thread), they are converted again from raw */
#pragma unroll
    for (int p = 0; p < P; p++)
        asm volatile("" : "+r"(raw[p].x), "+r"(raw[p].y), "+r"(raw[p].z), "+r"(raw[p].w));
    const float s = block_scale(amax, warp_amax);
    if (threadIdx.x == 0)
        scale[n * kb + g] = s;
    int8_t *dst = q + n * K + k0;
#pragma unroll
    for (int p = 0; p < P; p++) {
        if (p * step < left) {
            const T *h = reinterpret_cast<const T *>(&raw[p]);
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                v[j] = to_f32(h[j]);
            *reinterpret_cast<uint2 *>(dst + p * step) = quant8(v, s);
        }
    }
}

/* quant_int8_rowblock: a block of 256 threads per tile of one row up to 16384 wide
 * (whole rows of activations and int8_tensorwise weights): one pass, the tile kept in
 * registers (8 values a thread per 2048), amax over the block. */
constexpr int ROWBLOCK_MAX = 16384;
constexpr int ROWRAW_MAX = 8 * 8 * 256; /* P = 8 chunks of 8 values, 256 threads */

template <typename T, bool VEC, int P>
__global__ void __launch_bounds__(256)
quant_int8_rowblock(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N,
                    int64_t K, int64_t gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    __shared__ uint32_t warp_amax[8];
    const int64_t kb = (K + gk - 1) / gk;
    const int64_t n = blockIdx.y, g = blockIdx.x;
    const int64_t k_lo = g * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
    const T *row = x + n * K;
    float v[P][8]; /* P * 2048 >= the tile width; few registers keep many blocks resident */
    uint32_t amax = 0;
#pragma unroll
    for (int p = 0; p < P; p++) {
        const int64_t k = k_lo + p * 2048 + threadIdx.x * 8;
        if (k < k_hi) {
            load_row8<T, VEC>(row, k, k_hi, v[p]);
#pragma unroll
            for (int j = 0; j < 8; j++)
                amax = max(amax, abs_bits(v[p][j]));
        }
    }
    const float s = block_scale(amax, warp_amax);
    if (threadIdx.x == 0)
        scale[n * kb + g] = s;
#pragma unroll
    for (int p = 0; p < P; p++) {
        const int64_t k = k_lo + p * 2048 + threadIdx.x * 8;
        if (k < k_hi)
            store_row8<VEC>(q + n * K, k, k_hi, quant8(v[p], s));
    }
}

/* quant_int8_wide: a warp per tile of one row, any width gk (whole rows included);
 * amax in a first pass, quantize in a second (the tile is then in L1/L2). */
template <typename T, bool VEC>
__global__ void __launch_bounds__(256)
quant_int8_wide(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N, int64_t K,
                int64_t gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    const int64_t kb = (K + gk - 1) / gk;
    const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= N * kb)
        return;
    const int64_t n = udiv(w, kb), g = w - n * kb;
    const int64_t k_lo = g * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
    const T *row = x + n * K;
    uint32_t amax = 0;
    for (int64_t k = k_lo + lane * 8; k < k_hi; k += 256) {
        float v[8];
        load_row8<T, VEC>(row, k, k_hi, v);
#pragma unroll
        for (int j = 0; j < 8; j++)
            amax = max(amax, abs_bits(v[j]));
    }
    amax = warp_max_u32(amax, 32);
    const float s = __fdiv_rn(__uint_as_float(amax), (float)CQ_INT8_QMAX);
    if (lane == 0)
        scale[n * kb + g] = s;
    for (int64_t k = k_lo + lane * 8; k < k_hi; k += 256) {
        float v[8];
        load_row8<T, VEC>(row, k, k_hi, v);
        store_row8<VEC>(q + n * K, k, k_hi, quant8(v, s));
    }
}

/* ---------------------------------------------------------------- quantize, gn > 1 */
/* quant_int8_tileraw: a block of 256 threads per gn x gk tile of up to 2048 * P values
 * (int8_blockwise 128 x 128: P = 8), 16-bit values, rows a multiple of 8 wide and
 * 16-byte aligned. A thread takes 8 values of P rows (a row segment is gk / 8 threads),
 * issues all P loads before using any and keeps them raw: one pass, amax over the block,
 * then quantize from registers. The two-pass quant_int8_tiles below, a load at a time,
 * reached 46% of copy bandwidth (H200). */
template <typename T, int P>
__global__ void __launch_bounds__(256, 4) /* 4 blocks an SM: at most 64 registers */
quant_int8_tileraw(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N,
                   int64_t K, int64_t gn, int64_t gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    __shared__ uint32_t warp_amax[8];
    const int64_t kb = (K + gk - 1) / gk;
    const int64_t tile_n = blockIdx.y, tile_k = blockIdx.x;
    const int64_t n_lo = tile_n * gn, n_hi = n_lo + gn < N ? n_lo + gn : N;
    const int64_t k_lo = tile_k * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
    const int tps = (int)(gk / 8); /* threads along a row segment */
    const int rows_per_pass = 256 / tps;
    const int tr = threadIdx.x / tps, tc = threadIdx.x - tr * tps;
    /* rows of this tile (the last tile row may be short); chunk p is row tr + p * rows_per_pass */
    const int rows = (int)((gn < n_hi - n_lo ? gn : n_hi - n_lo));
    const bool col_live = tr < rows_per_pass && k_lo + tc * 8 < k_hi;
    const int64_t offset = (n_lo + tr) * K + k_lo + tc * 8, stride = (int64_t)rows_per_pass * K;
    Raw8<T> raw[P];
#pragma unroll
    for (int p = 0; p < P; p++)
        raw[p] = col_live && tr + p * rows_per_pass < rows ? load_raw8(x + offset + p * stride) : zero_raw8<T>();
    uint32_t amax = 0; /* zero padding leaves the max alone */
#pragma unroll
    for (int p = 0; p < P; p++) {
        float v[8];
        unpack8(raw[p], v);
#pragma unroll
        for (int j = 0; j < 8; j++)
            amax = max(amax, abs_bits(v[j]));
    }
    /* opaque to the compiler: the floats of the amax pass are not kept for the second */
#pragma unroll
    for (int p = 0; p < P; p++)
        asm volatile("" : "+r"(raw[p].w[0].x), "+r"(raw[p].w[0].y), "+r"(raw[p].w[0].z), "+r"(raw[p].w[0].w));
    const float s = block_scale(amax, warp_amax);
    if (threadIdx.x == 0)
        scale[tile_n * kb + tile_k] = s;
#pragma unroll
    for (int p = 0; p < P; p++) {
        if (col_live && tr + p * rows_per_pass < rows) {
            float v[8];
            unpack8(raw[p], v);
            *reinterpret_cast<uint2 *>(q + offset + p * stride) = quant8(v, s);
        }
    }
}

/* quant_int8_tiles: a block of 256 threads per gn x gk tile; each thread 8 values a
 * pass; amax over the block, then a second pass quantizes. */
template <typename T, bool VEC>
__global__ void __launch_bounds__(256)
quant_int8_tiles(const T *__restrict__ x, int8_t *__restrict__ q, float *__restrict__ scale, int64_t N, int64_t K,
                 int64_t gn, int64_t gk) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    __shared__ uint32_t warp_amax[8];
    const int64_t kb = (K + gk - 1) / gk;
    const int64_t tile_n = blockIdx.y, tile_k = blockIdx.x;
    const int64_t n_lo = tile_n * gn, n_hi = n_lo + gn < N ? n_lo + gn : N;
    const int64_t k_lo = tile_k * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
    const int tps = (int)(gk / 8 < 256 ? gk / 8 : 256); /* threads along a row segment */
    const int rows_per_pass = 256 / tps;
    const int tr = threadIdx.x / tps, tc = threadIdx.x - tr * tps;
    uint32_t amax = 0;
    if (tr < rows_per_pass)
        for (int64_t n = n_lo + tr; n < n_hi; n += rows_per_pass)
            for (int64_t k = k_lo + tc * 8; k < k_hi; k += tps * 8) {
                float v[8];
                load_row8<T, VEC>(x + n * K, k, k_hi, v);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    amax = max(amax, abs_bits(v[j]));
            }
    const float s = block_scale(amax, warp_amax);
    if (threadIdx.x == 0)
        scale[tile_n * kb + tile_k] = s;
    if (tr < rows_per_pass)
        for (int64_t n = n_lo + tr; n < n_hi; n += rows_per_pass)
            for (int64_t k = k_lo + tc * 8; k < k_hi; k += tps * 8) {
                float v[8];
                load_row8<T, VEC>(x + n * K, k, k_hi, v);
                store_row8<VEC>(q + n * K, k, k_hi, quant8(v, s));
            }
}

static bool pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
static int log2i(int64_t v) {
    int l = 0;
    while ((int64_t(1) << l) < v)
        l++;
    return l;
}

template <typename T>
static int quantize_int8_t(const T *x, int8_t *q, float *scale, int64_t N, int64_t K, int64_t gn, int64_t gk,
                           cudaStream_t stream) {
    /* 16-byte loads need every row start aligned: K a multiple of 8 values */
    const bool vec = aligned16(x) && K % 8 == 0 && (reinterpret_cast<uintptr_t>(q) & 7u) == 0 &&
                     (gk % 8 == 0 || gk >= K);
    if (gn == 1 && pow2(gk) && gk >= 32 && gk <= 256 && K % 256 == 0 && vec) {
        static int per_sm;
        const int64_t items = N * K / 256;
        unsigned grid = 0;
        int st = stream_grid(quant_stream_kernel<T, QuantInt8FlatOp>, items, &per_sm, &grid, "quantize_int8");
        if (st)
            return st;
        quant_stream_kernel<T, QuantInt8FlatOp><<<grid, 256, 0, stream>>>(x, items,
                                                                         QuantInt8FlatOp{q, scale, log2i(gk)});
    } else if (gn == 1 && pow2(gk) && gk >= 32 && gk <= 256) {
        const int64_t warps = N * ((K + 255) / 256);
        const unsigned grid = grid_for(warps * 32, 256);
        if (vec)
            quant_int8_spans<T, true><<<grid, 256, 0, stream>>>(x, q, scale, N, K, log2i(gk));
        else
            quant_int8_spans<T, false><<<grid, 256, 0, stream>>>(x, q, scale, N, K, log2i(gk));
    } else if (gn == 1 && sizeof(T) == 2 && vec && (gk < K ? gk : K) <= ROWRAW_MAX && N <= 65535) {
        /* P chunks of 8 a thread: 4 up to 8192 wide (blocks of <= 256 threads), else 8 */
        const int64_t width = gk < K ? gk : K, chunks = (width + 7) / 8;
        const int P = chunks <= 1024 ? 4 : 8;
        const unsigned threads = (unsigned)((chunks + P - 1) / P + 31) / 32 * 32;
        dim3 grid((unsigned)((K + gk - 1) / gk), (unsigned)N);
        if constexpr (sizeof(T) == 2) {
            if (P == 4)
                quant_int8_rowraw<T, 4><<<grid, threads, 0, stream>>>(x, q, scale, N, K, gk);
            else
                quant_int8_rowraw<T, 8><<<grid, threads, 0, stream>>>(x, q, scale, N, K, gk);
        }
    } else if (gn == 1 && (gk < K ? gk : K) <= ROWBLOCK_MAX && N <= 65535) {
        dim3 grid((unsigned)((K + gk - 1) / gk), (unsigned)N);
        const int64_t width = gk < K ? gk : K;
        auto run = [&](auto kernel) { kernel<<<grid, 256, 0, stream>>>(x, q, scale, N, K, gk); };
        if (width <= 2048)
            vec ? run(quant_int8_rowblock<T, true, 1>) : run(quant_int8_rowblock<T, false, 1>);
        else if (width <= 4096)
            vec ? run(quant_int8_rowblock<T, true, 2>) : run(quant_int8_rowblock<T, false, 2>);
        else if (width <= 8192)
            vec ? run(quant_int8_rowblock<T, true, 4>) : run(quant_int8_rowblock<T, false, 4>);
        else
            vec ? run(quant_int8_rowblock<T, true, 8>) : run(quant_int8_rowblock<T, false, 8>);
    } else if (gn == 1) {
        const int64_t warps = N * ((K + gk - 1) / gk);
        const unsigned grid = grid_for(warps * 32, 256);
        if (vec)
            quant_int8_wide<T, true><<<grid, 256, 0, stream>>>(x, q, scale, N, K, gk);
        else
            quant_int8_wide<T, false><<<grid, 256, 0, stream>>>(x, q, scale, N, K, gk);
    } else {
        if (gk < 8 || (gk % 8) != 0)
            return CQ_EUNSUPPORTED;
        dim3 grid((unsigned)((K + gk - 1) / gk), (unsigned)((N + gn - 1) / gn));
        if (grid.y > 65535)
            return CQ_EUNSUPPORTED;
        /* rows of the tile a thread holds in the one-pass kernel: gn / (256 / (gk / 8)) */
        const int64_t rows_a_thread = gk <= 2048 ? (gn + 256 / (gk / 8) - 1) / (256 / (gk / 8)) : 0;
        if constexpr (sizeof(T) == 2) {
            if (vec && rows_a_thread > 0 && rows_a_thread <= 8) {
                auto run = [&](auto kernel) { kernel<<<grid, 256, 0, stream>>>(x, q, scale, N, K, gn, gk); };
                if (rows_a_thread <= 1)
                    run(quant_int8_tileraw<T, 1>);
                else if (rows_a_thread <= 2)
                    run(quant_int8_tileraw<T, 2>);
                else if (rows_a_thread <= 4)
                    run(quant_int8_tileraw<T, 4>);
                else
                    run(quant_int8_tileraw<T, 8>);
                return check_launch("quantize_int8");
            }
        }
        if (vec)
            quant_int8_tiles<T, true><<<grid, 256, 0, stream>>>(x, q, scale, N, K, gn, gk);
        else
            quant_int8_tiles<T, false><<<grid, 256, 0, stream>>>(x, q, scale, N, K, gn, gk);
    }
    return check_launch("quantize_int8");
}

int launch_quantize_int8(const void *x, int x_dtype, int8_t *q, float *scale, int64_t N, int64_t K, int64_t gn,
                         int64_t gk, cudaStream_t stream) {
    if (N <= 0 || K <= 0 || gn <= 0 || gk <= 0)
        return CQ_EINVAL;
    return CQ_DISPATCH_FLOAT(x_dtype, T,
                             quantize_int8_t<T>(static_cast<const T *>(x), q, scale, N, K, gn, gk, stream));
}

/* ---------------------------------------------------------------- dequantize */
/* dequant_int8_vec: 16 values of one row a thread (K % 16 == 0); a 16-run lies in
 * one k-group (gk a power of two >= 16, or the whole row: lg_gk < 0). gn is a power
 * of two; the index arithmetic is 32-bit where the sizes allow (udiv32). */
template <typename OutT>
__global__ void __launch_bounds__(256)
dequant_int8_vec(const int8_t *__restrict__ q, const float *__restrict__ scale, OutT *__restrict__ y, int64_t N,
                 int64_t K, int lg_gn, int lg_gk) {
    const int64_t runs_per_row = K / 16;
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= N * runs_per_row)
        return;
    const int64_t n = udiv(i, runs_per_row), k = (i - n * runs_per_row) * 16;
    const int64_t kb = lg_gk < 0 ? 1 : (K + (int64_t(1) << lg_gk) - 1) >> lg_gk;
    const float s = __ldg(scale + (n >> lg_gn) * kb + (lg_gk < 0 ? 0 : k >> lg_gk));
    uint4 u = __ldg(reinterpret_cast<const uint4 *>(q + n * K + k));
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
    float v[16];
#pragma unroll
    for (int j = 0; j < 16; j++)
        v[j] = __fmul_rn((float)(int8_t)(words[j >> 2] >> (8 * (j & 3))), s);
    OutT *o = y + n * K + k;
    if constexpr (sizeof(OutT) == 4) {
#pragma unroll
        for (int j = 0; j < 4; j++)
            reinterpret_cast<float4 *>(o)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
        for (int j = 0; j < 2; j++)
            reinterpret_cast<uint4 *>(o)[j] =
                make_uint4(pack2<OutT>(v[8 * j], v[8 * j + 1]), pack2<OutT>(v[8 * j + 2], v[8 * j + 3]),
                           pack2<OutT>(v[8 * j + 4], v[8 * j + 5]), pack2<OutT>(v[8 * j + 6], v[8 * j + 7]));
    }
}

template <typename OutT>
__global__ void dequant_int8_scalar(const int8_t *__restrict__ q, const float *__restrict__ scale,
                                    OutT *__restrict__ y, int64_t N, int64_t K, int64_t gn, int64_t gk) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= N * K)
        return;
    const int64_t n = i / K, k = i - n * K, kb = (K + gk - 1) / gk;
    y[i] = from_f32<OutT>(__fmul_rn((float)q[i], scale[(n / gn) * kb + k / gk]));
}

template <typename OutT>
static int dequantize_int8_t(const int8_t *q, const float *scale, OutT *y, int64_t N, int64_t K, int64_t gn,
                             int64_t gk, cudaStream_t stream) {
    if (K % 16 == 0 && ((pow2(gk) && gk >= 16) || gk >= K) && pow2(gn) && aligned16(q) && aligned16(y)) {
        dequant_int8_vec<OutT><<<grid_for(N * (K / 16), 256), 256, 0, stream>>>(q, scale, y, N, K, log2i(gn),
                                                                               gk >= K ? -1 : log2i(gk));
    } else {
        dequant_int8_scalar<OutT><<<grid_for(N * K, 256), 256, 0, stream>>>(q, scale, y, N, K, gn, gk);
    }
    return check_launch("dequantize_int8");
}

int launch_dequantize_int8(const int8_t *q, const float *scale, void *y, int y_dtype, int64_t N, int64_t K,
                           int64_t gn, int64_t gk, cudaStream_t stream) {
    if (N <= 0 || K <= 0 || gn <= 0 || gk <= 0)
        return CQ_EINVAL;
    return CQ_DISPATCH_FLOAT(y_dtype, T,
                             dequantize_int8_t<T>(q, scale, static_cast<T *>(y), N, K, gn, gk, stream));
}

/* ---------------------------------------------------------------- weight-only linear */
/* linear_int8_generic: warp per (column n, 8 tokens); exact float32 weights q * scale.
 * Serves small M (ops.py dequantizes + cuBLAS above FUSED_MAX_M). */
template <typename T>
__global__ void __launch_bounds__(256)
linear_int8_generic(const T *__restrict__ x, const int8_t *__restrict__ wq, const float *__restrict__ ws,
                    const T *__restrict__ bias, T *__restrict__ y, int64_t M, int64_t N, int64_t K, int64_t gn,
                    int64_t gk) {
    const int lane = threadIdx.x & 31;
    const int64_t n = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int64_t m0 = blockIdx.y * 8;
    if (n >= N)
        return;
    const int64_t kb = (K + gk - 1) / gk;
    const float *s = ws + (n / gn) * kb;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = lane; k < K; k += 32) {
        float w = (float)wq[n * K + k] * __ldg(s + k / gk);
#pragma unroll
        for (int m = 0; m < 8; m++)
            if (m0 + m < M)
                acc[m] = fmaf(to_f32(x[(m0 + m) * K + k]), w, acc[m]);
    }
    warp_column_store<T>(acc, bias, y, m0, M, n, N);
}

int launch_linear_int8(const void *x, int dtype, const int8_t *wq, const float *ws, const void *bias, void *y,
                       int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || K <= 0 || gn <= 0 || gk <= 0 || (M + 7) / 8 > 65535)
        return CQ_EINVAL;
    return CQ_DISPATCH_FLOAT(dtype, T, [&] {
        dim3 grid((unsigned)((N + 7) / 8), (unsigned)((M + 7) / 8));
        linear_int8_generic<T><<<grid, 256, 0, stream>>>(static_cast<const T *>(x), wq, ws,
                                                         static_cast<const T *>(bias), static_cast<T *>(y), M, N,
                                                         K, gn, gk);
        return check_launch("linear_int8");
    }());
}

} /* namespace cq */
