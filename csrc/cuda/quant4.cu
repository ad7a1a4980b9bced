/* quant4.cu: bnb_nf4 / bnb_fp4 quantize and dequantize, and bitsandbytes' nested
 * absmax, on the GPU (layout and rounding: formats.h). Bit-identical to the CPU
 * *_ref kernels: one float32 rounding per operation (__fmul_rn, __fdiv_rn, no
 * contraction), NaN-propagating integer max for absmax, round-to-nearest-even
 * conversions. Both are bandwidth-bound: wide, coalesced loads and stores. */
#include "launchers.cuh"

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

/* quant4_kernel: 8 values a thread; group / 8 threads share a group (at least 4).
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

template <typename InT>
static int quantize_4bit_t(const InT *x, uint8_t *packed, float *absmax, int64_t n, int log2_group,
                           int codebook, cudaStream_t stream) {
    const int tpg = 1 << (log2_group - 3);
    const int block = tpg > 256 ? tpg : 256;
    const int64_t threads = (n + 7) / 8;
    if (aligned16(x))
        quant4_kernel<InT, true><<<grid_for(threads, block), block, 0, stream>>>(x, packed, absmax, n,
                                                                                log2_group, codebook);
    else
        quant4_kernel<InT, false><<<grid_for(threads, block), block, 0, stream>>>(x, packed, absmax, n,
                                                                                 log2_group, codebook);
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
