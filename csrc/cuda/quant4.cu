/* quant4.cu: bnb_nf4 / bnb_fp4 quantize and dequantize, and bitsandbytes' nested
 * absmax, on the GPU (layout and rounding: formats.h). Bit-identical to the CPU
 * *_ref kernels: one float32 rounding per operation (__fmul_rn, __fdiv_rn, no
 * contraction), NaN-propagating integer max for absmax, round-to-nearest-even
 * conversions. Both are bandwidth-bound: wide, coalesced loads and stores. */
#include "launchers.cuh"
#include "quant_stream.cuh"

namespace cq {

__constant__ float c_table[2][16] = {CQ_NF4_TABLE_INIT, CQ_FP4_TABLE_INIT};
__constant__ float c_nf4_mid[15] = CQ_NF4_MID_INIT;
__constant__ float c_fp4_mid[7] = CQ_FP4_MID_INIT;

/* ---------------------------------------------------------------- dequantize */
/* dequant4_vec: 8 values (4 packed bytes) per chunk; a warp loads 128 contiguous bytes
 * and stores 512 (bf16/f16) contiguous ones, so every sector is written whole. Each
 * thread takes UNROLL chunks a blockDim apart (more loads in flight). A chunk is
 * 8-aligned, so it lies in one group (group >= 32, a power of two). The 16-entry
 * table sits in 16 distinct shared-memory banks: lookups never conflict. */
constexpr int DQ4_UNROLL = 4;

template <typename OutT>
__global__ void __launch_bounds__(256)
dequant4_vec(const uint32_t *__restrict__ packed, const float *__restrict__ absmax, OutT *__restrict__ y,
             int64_t chunks, int log2_group, int codebook) {
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = c_table[codebook][threadIdx.x];
    __syncthreads();
    const int64_t c0 = blockIdx.x * (int64_t)blockDim.x * DQ4_UNROLL + threadIdx.x;
    uint32_t w[DQ4_UNROLL];
    float a[DQ4_UNROLL];
#pragma unroll
    for (int u = 0; u < DQ4_UNROLL; u++) {
        const int64_t c = c0 + u * (int64_t)blockDim.x;
        w[u] = c < chunks ? __ldg(packed + c) : 0u;
        a[u] = c < chunks ? __ldg(absmax + ((c * 8) >> log2_group)) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < DQ4_UNROLL; u++) {
        const int64_t c = c0 + u * (int64_t)blockDim.x;
        if (c >= chunks)
            break;
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t byte = (w[u] >> (8 * j)) & 0xffu;
            v[2 * j] = __fmul_rn(table[byte >> 4], a[u]);
            v[2 * j + 1] = __fmul_rn(table[byte & 15u], a[u]);
        }
        if constexpr (sizeof(OutT) == 4) {
            float4 *o = reinterpret_cast<float4 *>(y + c * 8);
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            *reinterpret_cast<uint4 *>(y + c * 8) = make_uint4(pack2<OutT>(v[0], v[1]), pack2<OutT>(v[2], v[3]),
                                                               pack2<OutT>(v[4], v[5]), pack2<OutT>(v[6], v[7]));
        }
    }
}

/* dequant4_scalar: one value a thread, elements [i0, n): tails and unaligned tensors. */
template <typename OutT>
__global__ void dequant4_scalar(const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
                                OutT *__restrict__ y, int64_t i0, int64_t n, int log2_group, int codebook) {
    int64_t i = i0 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    uint8_t byte = packed[i >> 1];
    uint8_t code = (i & 1) ? (byte & 15) : (byte >> 4);
    y[i] = from_f32<OutT>(__fmul_rn(c_table[codebook][code], absmax[i >> log2_group]));
}

static int log2_exact(int64_t v) {
    int l = 0;
    while ((int64_t(1) << l) < v)
        l++;
    return l;
}

template <typename OutT>
static int dequantize_4bit_t(const uint8_t *packed, const float *absmax, OutT *y, int64_t n,
                             int log2_group, int codebook, cudaStream_t stream) {
    int64_t done = 0;
    if ((reinterpret_cast<uintptr_t>(packed) & 3u) == 0 && aligned16(y)) {
        int64_t chunks = n / 8;
        if (chunks > 0) {
            dequant4_vec<OutT><<<grid_for(chunks, 256 * DQ4_UNROLL), 256, 0, stream>>>(
                reinterpret_cast<const uint32_t *>(packed), absmax, y, chunks, log2_group, codebook);
            int st = check_launch("dequantize_4bit");
            if (st)
                return st;
        }
        done = chunks * 8;
    }
    if (done < n) {
        dequant4_scalar<OutT><<<grid_for(n - done, 256), 256, 0, stream>>>(packed, absmax, y, done, n,
                                                                        log2_group, codebook);
        return check_launch("dequantize_4bit (tail)");
    }
    return CQ_OK;
}

int launch_dequantize_4bit(const uint8_t *packed, const float *absmax, void *y, int y_dtype, int64_t n,
                           int64_t group, int codebook, cudaStream_t stream) {
    if (n <= 0 || group < 32 || (group & (group - 1)) || (codebook != CQ_NF4 && codebook != CQ_FP4))
        return CQ_EINVAL;
    int lg = log2_exact(group);
    return CQ_DISPATCH_FLOAT(y_dtype, T,
                             dequantize_4bit_t<T>(packed, absmax, static_cast<T *>(y), n, lg, codebook, stream));
}

/* ---------------------------------------------------------------- quantize */
/* Nearest code of s = x * (1/absmax): the count of midpoints below s (NF4), or of
 * |s| with the sign in bit 3 (FP4), found by binary search (formats.h). The first
 * levels compare with constants; the rest read the midpoints from shared memory,
 * where at most 16 distinct words lie in distinct banks. */
__device__ __forceinline__ uint32_t nf4_code(float s, const float *mid) {
    uint32_t c = s > c_nf4_mid[7] ? 8u : 0u;
    float t = c ? c_nf4_mid[11] : c_nf4_mid[3];
    c += s > t ? 4u : 0u;
    c += s > mid[c + 1] ? 2u : 0u;
    c += s > mid[c] ? 1u : 0u;
    return c;
}

__device__ __forceinline__ uint32_t fp4_code(float s, const float *mid) {
    float a = fabsf(s);
    uint32_t c = a > c_fp4_mid[3] ? 4u : 0u;
    c += a > mid[c + 1] ? 2u : 0u;
    c += a > mid[c] ? 1u : 0u;
    /* magnitude rank -> 3-bit code: {0, 1, 6, 7, 4, 5, 2, 3} as nibbles */
    uint32_t code = (0x32547610u >> (4 * c)) & 7u;
    return code | (s < 0.0f ? 8u : 0u);
}

/* quant4_kernel: 8 values a thread; group / 8 threads share a group (at least 4). It
 * serves groups over 256 values, unaligned input and the last < 256 values of a tensor
 * (quant_stream_kernel the rest).
 * Groups of up to 256 values reduce inside a warp; larger ones across the warps of
 * the block, which then has max(256, group / 8) threads. */
template <typename InT, bool VEC>
__global__ void __launch_bounds__(512)
quant4_kernel(const InT *__restrict__ x, uint8_t *__restrict__ packed, float *__restrict__ absmax,
              int64_t n, int log2_group, int codebook) {
    __shared__ float mid[16];
    __shared__ uint32_t warp_amax[16];
    if (threadIdx.x < 16)
        mid[threadIdx.x] = codebook == CQ_NF4 ? (threadIdx.x < 15 ? c_nf4_mid[threadIdx.x] : 2.0f)
                                              : (threadIdx.x < 7 ? c_fp4_mid[threadIdx.x] : 2.0f);
    const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t i0 = t * 8;
    float v[8];
    if (VEC && i0 + 8 <= n) {
        load8(x + i0, v);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            v[j] = i0 + j < n ? to_f32(x[i0 + j]) : 0.0f;
    }
    uint32_t amax = 0;
#pragma unroll
    for (int j = 0; j < 8; j++)
        amax = max(amax, abs_bits(v[j]));
    const int tpg = 1 << (log2_group - 3); /* threads per group */
    if (tpg <= 32) {
        amax = warp_max_u32(amax, tpg);
        __syncthreads(); /* mid[] */
    } else {
        amax = warp_max_u32(amax, 32);
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0)
            warp_amax[warp] = amax;
        __syncthreads();
        const int wpg = tpg >> 5, first = warp / wpg * wpg;
        for (int w = first; w < first + wpg; w++)
            amax = max(amax, warp_amax[w]);
    }
    const float a = __uint_as_float(amax);
    if ((i0 & ((int64_t(1) << log2_group) - 1)) == 0 && i0 < n)
        absmax[i0 >> log2_group] = a;
    const float recip = a > 0.0f ? __fdiv_rn(1.0f, a) : 0.0f;
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
        float s0 = __fmul_rn(v[j], recip), s1 = __fmul_rn(v[j + 1], recip);
        uint32_t c0 = codebook == CQ_NF4 ? nf4_code(s0, mid) : fp4_code(s0, mid);
        uint32_t c1 = codebook == CQ_NF4 ? nf4_code(s1, mid) : fp4_code(s1, mid);
        word |= (c0 << 4 | c1) << (4 * j);
    }
    const int64_t b0 = i0 >> 1, nbytes = (n + 1) >> 1;
    if (b0 + 4 <= nbytes && (reinterpret_cast<uintptr_t>(packed + b0) & 3u) == 0) {
        *reinterpret_cast<uint32_t *>(packed + b0) = word;
    } else {
        for (int j = 0; j < 4; j++)
            if (b0 + j < nbytes)
                packed[b0 + j] = (uint8_t)(word >> (8 * j));
    }
}

/* Nearest code by one table lookup (quant_stream_kernel). cell(s) = 8 mantissa bits of
 * fma(s, 1/4, 3): for |s| < 4 (|s| <= 1 + 2^-23 here) it is monotone in s, and a cell is
 * 1/32 wide, narrower than any gap between two midpoints (NF4 0.080, FP4 magnitudes
 * 0.083), so it holds at most one. Entry j of the table is (the midpoint m_j whose cell
 * is j, else 8; the count of midpoints in lower cells). Monotony puts every midpoint of a
 * lower cell below s and of a higher cell above it, so the code (the count of midpoints
 * below s, formats.h; FP4: of |s|) is count_j + (s > m_j): one lookup and one compare
 * where the binary search took two lookups, four compares and their selects (the 4-bit
 * quantize was instruction-bound at 42-43% of copy bandwidth on the H200). Built on the
 * device with its own fma, so the table and the lookup round alike; bit-identical to the
 * search (tests/test_cuda.py). */
__device__ __forceinline__ uint32_t code_cell(float s) {
    return (__float_as_uint(fmaf(s, 0.25f, 3.0f)) >> 15) & 255u;
}

/* The 4-bit op of quant_stream_kernel: absmax over G / 8 lanes, the nearest code of each
 * value by its cell, 4 bytes of codes a lane (packed 4-byte aligned). */
template <int CODEBOOK>
struct Quant4Op {
    uint8_t *packed;
    float *absmax;
    int log2_group;
    __device__ __forceinline__ void setup(float2 *table) const {
        const uint32_t j = threadIdx.x;
        const int mids = CODEBOOK == CQ_NF4 ? 15 : 7;
        float m = 8.0f;
        uint32_t below = 0; /* midpoints in lower cells: the code rank below m */
        for (int i = 0; i < mids; i++) {
            const float mi = CODEBOOK == CQ_NF4 ? c_nf4_mid[i] : c_fp4_mid[i];
            const uint32_t c = code_cell(mi);
            below += c < j;
            m = c == j ? mi : m;
        }
        table[j] = make_float2(m, __uint_as_float(below));
    }
    /* the count of midpoints below s (FP4: below |s|, a magnitude rank -> code, sign) */
    __device__ __forceinline__ uint32_t code(float s, const float2 *table) const {
        if constexpr (CODEBOOK == CQ_NF4) {
            const float2 e = table[code_cell(s)];
            return __float_as_uint(e.y) + (s > e.x ? 1u : 0u);
        } else {
            const float a = fabsf(s);
            const float2 e = table[code_cell(a)];
            const uint32_t rank = __float_as_uint(e.y) + (a > e.x ? 1u : 0u);
            /* ranks -> 3-bit codes {0, 1, 6, 7, 4, 5, 2, 3}, as nibbles */
            return ((0x32547610u >> (4 * rank)) & 7u) | (s < 0.0f ? 8u : 0u);
        }
    }
    __device__ __forceinline__ void operator()(int64_t i0, const float v[8], int lane, const float2 *table) const {
        const float a = __uint_as_float(lane_group_amax(v, log2_group));
        if ((i0 & ((int64_t(1) << log2_group) - 1)) == 0)
            absmax[i0 >> log2_group] = a;
        const float recip = a > 0.0f ? __fdiv_rn(1.0f, a) : 0.0f;
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            const uint32_t q0 = code(__fmul_rn(v[j], recip), table), q1 = code(__fmul_rn(v[j + 1], recip), table);
            word |= (q0 << 4 | q1) << (4 * j);
        }
        *reinterpret_cast<uint32_t *>(packed + (i0 >> 1)) = word;
    }
};

template <typename InT>
static int quantize_4bit_t(const InT *x, uint8_t *packed, float *absmax, int64_t n, int log2_group,
                           int codebook, cudaStream_t stream) {
    const int tpg = 1 << (log2_group - 3);
    int64_t done = 0;
    if (tpg <= 32 && aligned16(x) && (reinterpret_cast<uintptr_t>(packed) & 3u) == 0 && n >= 256) {
        /* whole 256-value items streamed; the rest (< 256 values) by the kernel below */
        const int64_t items = n / 256;
        auto run = [&](auto op, int *per_sm) {
            unsigned grid = 0;
            int st = stream_grid(quant_stream_kernel<InT, decltype(op)>, items, per_sm, &grid, "quantize_4bit");
            if (st)
                return st;
            quant_stream_kernel<InT, decltype(op)><<<grid, 256, 0, stream>>>(x, items, op);
            return check_launch("quantize_4bit");
        };
        static int per_sm[2];
        int st = codebook == CQ_NF4 ? run(Quant4Op<CQ_NF4>{packed, absmax, log2_group}, &per_sm[0])
                                    : run(Quant4Op<CQ_FP4>{packed, absmax, log2_group}, &per_sm[1]);
        if (st || items * 256 == n)
            return st;
        done = items * 256;
    }
    x += done;
    packed += done / 2;
    absmax += done >> log2_group;
    n -= done;
    const int block = tpg > 256 ? tpg : 256;
    const unsigned grid = grid_for((n + 7) / 8, block);
    if (aligned16(x))
        quant4_kernel<InT, true><<<grid, block, 0, stream>>>(x, packed, absmax, n, log2_group, codebook);
    else
        quant4_kernel<InT, false><<<grid, block, 0, stream>>>(x, packed, absmax, n, log2_group, codebook);
    return check_launch("quantize_4bit");
}

int launch_quantize_4bit(const void *x, int x_dtype, uint8_t *packed, float *absmax, int64_t n,
                         int64_t group, int codebook, cudaStream_t stream) {
    if (n <= 0 || group < 32 || group > 4096 || (group & (group - 1)) ||
        (codebook != CQ_NF4 && codebook != CQ_FP4))
        return CQ_EINVAL;
    int lg = log2_exact(group);
    return CQ_DISPATCH_FLOAT(x_dtype, T,
                             quantize_4bit_t<T>(static_cast<const T *>(x), packed, absmax, n, lg, codebook, stream));
}

/* ---------------------------------------------------------------- nested absmax */
/* absmax[i] = map[codes[i]] * nested[i / 256] + offset: two float32 roundings. */
__global__ void dequant_absmax_kernel(const uint8_t *__restrict__ codes, const float *__restrict__ nested,
                                      const float *__restrict__ map, float offset,
                                      float *__restrict__ absmax, int64_t G) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < G)
        absmax[i] = __fadd_rn(__fmul_rn(map[codes[i]], nested[i / CQ_DQ_BLOCK]), offset);
}

int launch_dequantize_absmax(const uint8_t *codes, const float *nested, const float *map, float offset,
                             float *absmax, int64_t G, cudaStream_t stream) {
    if (G <= 0)
        return CQ_EINVAL;
    dequant_absmax_kernel<<<grid_for(G, 256), 256, 0, stream>>>(codes, nested, map, offset, absmax, G);
    return check_launch("dequantize_absmax");
}

} /* namespace cq */
