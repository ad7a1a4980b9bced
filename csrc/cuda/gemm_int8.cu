/* gemm_int8.cu: W8A8 GEMM y[M, N] = sum_g dot_g * (xs[m, g*] * ws[n / gn, g]) + bias
 * (kernels.h: int32 dot over weight K-group g of width gk; g* = g when xs has one
 * scale per K-group, else 0), on int8 tensor cores with int32 accumulation.
 *
 *   gemm_int8_skinny   small M: mma.sync m16n8k32 straight from global memory, each
 *                      weight byte read once (skinny.cuh), K split over a cluster.
 *   gemm_int8_sm90     large M on sm_90a: wgmma + TMA (gemm_int8_sm90.cu).
 *   gemm_int8_mma80    large M elsewhere (sm_80+): mma.sync m16n8k32, 4-stage cp.async
 *                      pipeline, ldmatrix from XOR-swizzled shared memory.
 *   gemm_int8_generic  any shape and card: a warp per output column; the same
 *                      float32 operations in the same order as the CPU reference.
 * With one K-group (int8_tensorwise) the scales go to the epilogue; with several, each
 * group's int32 sum is converted and scaled when the group ends ("promotion").
 */
#include "gemm_int8.cuh"
#include "launchers.cuh"
#include "skinny.cuh"

namespace cq {

/* ---------------------------------------------------------------- generic */
template <typename T>
__global__ void __launch_bounds__(256)
gemm_int8_generic(const int8_t *__restrict__ xq, const float *__restrict__ xs, const int8_t *__restrict__ wq,
                  const float *__restrict__ ws, const T *__restrict__ bias, T *__restrict__ y, int64_t M,
                  int64_t N, int64_t K, int64_t xs_groups, int64_t gn, int64_t gk) {
    const int lane = threadIdx.x & 31;
    const int64_t n = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int64_t m0 = blockIdx.y * 8;
    if (n >= N)
        return;
    const int64_t kb = (K + gk - 1) / gk;
    const float *w_s = ws + (n / gn) * kb;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t g = 0; g < kb; g++) {
        const int64_t k_lo = g * gk, k_hi = k_lo + gk < K ? k_lo + gk : K;
        int dot[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = k_lo + lane; k < k_hi; k += 32) {
            int w = wq[n * K + k];
#pragma unroll
            for (int m = 0; m < 8; m++)
                if (m0 + m < M)
                    dot[m] += (int)xq[(m0 + m) * K + k] * w;
        }
#pragma unroll
        for (int m = 0; m < 8; m++) {
            int d = dot[m];
            for (int o = 16; o > 0; o >>= 1)
                d += __shfl_xor_sync(0xffffffffu, d, o);
            if (m0 + m < M) {
                float x_s = xs[(m0 + m) * xs_groups + (xs_groups > 1 ? g : 0)];
                acc[m] = __fadd_rn(acc[m], __fmul_rn((float)d, __fmul_rn(x_s, w_s[g])));
            }
        }
    }
    if (lane == 0)
        for (int m = 0; m < 8 && m0 + m < M; m++) {
            float v = acc[m];
            if (bias)
                v = __fadd_rn(v, to_f32(bias[n]));
            y[(m0 + m) * N + n] = from_f32<T>(v);
        }
}

/* ---------------------------------------------------------------- skinny (small M) */
/* Lane (r, t) reads BYTES consecutive bytes of weight row r and of token rows r and
 * r + 8 a chunk (CK = 4 * BYTES values of k); step s of the chunk feeds words 2s and
 * 2s + 1 to m16n8k32 as b0/b1 and a0/a2 (a1/a3 from row r + 8). */
template <typename T, int NT, int BYTES, int MH>
__global__ void __launch_bounds__(128)
gemm_int8_skinny(const int8_t *__restrict__ xq, const float *__restrict__ xs, const int8_t *__restrict__ wq,
                 const float *__restrict__ ws, const T *__restrict__ bias, T *__restrict__ y, int M, int64_t N,
                 int64_t K, int xs_groups, int64_t gn, int64_t gk, int S) {
    constexpr int W = 4, R = W * NT * 8, CK = 4 * BYTES, WORDS = BYTES / 4, STEPS = BYTES / 8;
    __shared__ float part[16 * R];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const int64_t n_warp = (int64_t)blockIdx.y * R + warp * NT * 8;
    const int64_t m0 = (int64_t)blockIdx.z * 16;
    const int mv = M - m0 < 16 ? (int)(M - m0) : 16;
    /* 32-bit divisions (udiv): seven 64-bit ones, a call each, ran before the first load */
    const int64_t kslice = udiv(K, S), k_begin = blockIdx.x * kslice, k_end = k_begin + kslice;
    const int64_t kb = udiv(K + gk - 1, gk);
    /* launched early after the activation quantize (PDL): its xq, xs, and y's memory, are
     * ready only after the wait */
    pdl_wait();

    const int8_t *wp[NT];
    const float *wsc[NT][2];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        int64_t n = n_warp + j * 8 + r;
        wp[j] = wq + (n < N ? n : N - 1) * K + t * BYTES;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int64_t c = n_warp + j * 8 + 2 * t + e;
            wsc[j][e] = ws + udiv(c < N ? c : N - 1, gn) * kb;
        }
    }
    const bool row0 = r < mv, row1 = MH > 1 && r + 8 < mv;
    const int8_t *xp0 = xq + (m0 + (row0 ? r : 0)) * K + t * BYTES;
    const int8_t *xp1 = xq + (m0 + (row1 ? r + 8 : 0)) * K + t * BYTES;
    const float *xs0 = xs + (m0 + (row0 ? r : 0)) * xs_groups;
    const float *xs1 = xs + (m0 + (row1 ? r + 8 : 0)) * xs_groups;

    float acc[NT][4];
    int tmp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            acc[j][e] = 0.0f;
            tmp[j][e] = 0;
        }
    /* K-groups inside this block's slice (the split never cuts a group) */
    const int64_t chunks_per_group = gk < K ? gk / CK : INT64_MAX;
    int64_t chunks_in_group = 0, group = gk < K ? udiv(k_begin, gk) : 0;
    /* U chunks of weights requested before any is used (memory latency, see linear4.cu) */
    constexpr int U = 4;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += U * CK) {
        uint32_t ww[U][NT][WORDS];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (k0 + u * CK < k_end)
#pragma unroll
                for (int j = 0; j < NT; j++)
                    load_words<BYTES>(wp[j] + k0 + u * CK, ww[u][j]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t k = k0 + u * CK;
            if (k >= k_end)
                break;
            uint32_t cx0[WORDS], cx1[WORDS];
            if (row0)
                load_words<BYTES>(xp0 + k, cx0);
            else
#pragma unroll
                for (int i = 0; i < WORDS; i++)
                    cx0[i] = 0;
#pragma unroll
            for (int i = 0; i < WORDS; i++)
                cx1[i] = 0;
            if (MH > 1 && row1)
                load_words<BYTES>(xp1 + k, cx1);
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int s = 0; s < STEPS; s++) {
                    uint32_t a[4] = {cx0[2 * s], cx1[2 * s], cx0[2 * s + 1], cx1[2 * s + 1]};
                    mma_16832_s8(tmp[j], a, ww[u][j][2 * s], ww[u][j][2 * s + 1]);
                }
            if (++chunks_in_group == chunks_per_group || k + CK == k_end) { /* the K-group (or this block's part) ends */
                const int64_t g = group++;
                chunks_in_group = 0;
                const float x0 = __ldg(xs0 + (xs_groups > 1 ? g : 0));
                const float x1 = MH > 1 ? __ldg(xs1 + (xs_groups > 1 ? g : 0)) : 0.0f;
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const float w0 = __ldg(wsc[j][0] + g), w1 = __ldg(wsc[j][1] + g);
                    acc[j][0] = fmaf((float)tmp[j][0], x0 * w0, acc[j][0]);
                    acc[j][1] = fmaf((float)tmp[j][1], x0 * w1, acc[j][1]);
                    acc[j][2] = fmaf((float)tmp[j][2], x1 * w0, acc[j][2]);
                    acc[j][3] = fmaf((float)tmp[j][3], x1 * w1, acc[j][3]);
                    tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0;
                }
            }
        }
    }
    skinny_store<T, NT>(acc, part, R, S, bias, y, m0, mv, (int64_t)blockIdx.y * R, n_warp, N);
}

template <typename T, int BYTES>
static int run_skinny_int8(const DeviceInfo &dev, const GemmInt8Args<T> &a, cudaStream_t stream) {
    constexpr int NT = 2, R = 4 * NT * 8, CK = 4 * BYTES;
    const unsigned gy = (unsigned)((a.N + R - 1) / R), gz = (unsigned)((a.M + 15) / 16);
    /* the split must not cut a K-group in two unless the group is the whole row */
    int64_t chunks = a.K / CK;
    int S = choose_split(dev, (int64_t)gy * gz, chunks);
    while (S > 1 && a.gk < a.K && (a.K / S) % a.gk != 0)
        S--;
    const int M = (int)(a.M < INT32_MAX ? a.M : INT32_MAX);
    const bool early = dev.cc >= 90; /* after the activation quantize (PDL) */
    if (a.M <= 8)
        return launch_clustered(gemm_int8_skinny<T, NT, BYTES, 1>, S, gy, gz, 128, early, stream, "gemm_int8 (skinny)",
                                a.xq, a.xs, a.wq, a.ws, a.bias, a.y, M, a.N, a.K, (int)a.xs_groups, a.gn, a.gk, S);
    return launch_clustered(gemm_int8_skinny<T, NT, BYTES, 2>, S, gy, gz, 128, early, stream, "gemm_int8 (skinny)",
                            a.xq, a.xs, a.wq, a.ws, a.bias, a.y, M, a.N, a.K, (int)a.xs_groups, a.gn, a.gk, S);
}

/* ---------------------------------------------------------------- sm_80 tiled */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

constexpr int MMA80_BM = 128, MMA80_BN = 128, MMA80_BK = 64, MMA80_STAGES = 4;
constexpr int MMA80_SMEM = MMA80_STAGES * (MMA80_BM + MMA80_BN) * MMA80_BK;

/* byte offset of 16-byte chunk `ch` of tile row `row` (64-byte rows, XOR swizzle so
 * that 8 consecutive rows at one chunk hit 8 distinct 16-byte bank groups) */
__device__ __forceinline__ int swz(int row, int ch) { return row * 64 + ((ch ^ ((row >> 1) & 3)) << 4); }

template <typename T, bool ONE_GROUP>
__global__ void __launch_bounds__(256)
gemm_int8_mma80(const int8_t *__restrict__ xq, const float *__restrict__ xs, const int8_t *__restrict__ wq,
                const float *__restrict__ ws, const T *__restrict__ bias, T *__restrict__ y, int64_t M, int64_t N,
                int64_t K, int64_t xs_groups, int64_t gn, int64_t gk) {
    constexpr int BM = MMA80_BM, BN = MMA80_BN, BK = MMA80_BK, STAGES = MMA80_STAGES;
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t *sA = smem, *sB = smem + STAGES * BM * BK;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3; /* warp tile 64 (M) x 32 (N) */
    const int64_t m_base = (int64_t)blockIdx.x * BM, n_base = (int64_t)blockIdx.y * BN;
    const int64_t ktiles = (K + BK - 1) / BK;

    auto load_tile = [&](int stage, int64_t kt) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int c = tid + i * 256, row = c >> 2, ch = c & 3;
            const int64_t k = kt * BK + ch * 16;
            const int64_t gm = m_base + row, gnr = n_base + row;
            const bool ka = k < K;
            cp_async16(smem_u32(sA + stage * BM * BK + swz(row, ch)), ka && gm < M ? xq + gm * K + k : xq,
                       ka && gm < M ? 16 : 0);
            cp_async16(smem_u32(sB + stage * BN * BK + swz(row, ch)), ka && gnr < N ? wq + gnr * K + k : wq,
                       ka && gnr < N ? 16 : 0);
        }
    };

    int tmp[4][4][4];
    float acc[ONE_GROUP ? 1 : 4][ONE_GROUP ? 1 : 4][ONE_GROUP ? 1 : 4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                tmp[i][j][e] = 0;
    if constexpr (!ONE_GROUP) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[i][j][e] = 0.0f;
    }
    const int64_t kb = (K + gk - 1) / gk;
    /* scale rows of this thread's 8 tokens and 8 columns, found once */
    const float *xs_row[4][2], *ws_col[4][2];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t m = m_base + wm * 64 + i * 16 + (lane >> 2) + 8 * h;
            xs_row[i][h] = xs + (m < M ? m : M - 1) * xs_groups;
        }
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int64_t n = n_base + wn * 32 + j * 8 + 2 * (lane & 3) + e;
            ws_col[j][e] = ws + ((n < N ? n : N - 1) / gn) * kb;
        }
    const int tiles_per_group = ONE_GROUP ? 1 : (int)(gk / BK);
    int tiles_in_group = 0;
    int64_t group = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles)
            load_tile(s, s);
        cp_async_commit();
    }
    for (int64_t kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < ktiles)
            load_tile((int)((kt + STAGES - 1) % STAGES), kt + STAGES - 1);
        cp_async_commit();
        const int stage = (int)(kt % STAGES);
        const uint8_t *a_s = sA + stage * BM * BK, *b_s = sB + stage * BN * BK;
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            uint32_t af[4][4], bf[2][4];
#pragma unroll
            for (int i = 0; i < 4; i++)
                ldmatrix_x4(af[i], smem_u32(a_s + swz(wm * 64 + i * 16 + (lane & 15), 2 * ks + (lane >> 4))));
#pragma unroll
            for (int jj = 0; jj < 2; jj++)
                ldmatrix_x4(bf[jj], smem_u32(b_s + swz(wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                       2 * ks + ((lane >> 3) & 1))));
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    mma_16832_s8(tmp[i][j], af[i], bf[j >> 1][2 * (j & 1)], bf[j >> 1][2 * (j & 1) + 1]);
        }
        if constexpr (!ONE_GROUP) {
            if (++tiles_in_group == tiles_per_group || kt == ktiles - 1) {
                float xsv[4][2], wsv[4][2];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        xsv[i][h] = __ldg(xs_row[i][h] + (xs_groups > 1 ? group : 0));
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        wsv[j][e] = __ldg(ws_col[j][e] + group);
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            acc[i][j][e] = fmaf((float)tmp[i][j][e], xsv[i][e >> 1] * wsv[j][e & 1], acc[i][j][e]);
                            tmp[i][j][e] = 0;
                        }
                tiles_in_group = 0;
                group++;
            }
        }
    }
    cp_async_wait<0>();

    /* epilogue: C fragment e = (row lane/4 + 8 (e >> 1), column 2 (lane % 4) + (e & 1)) */
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t m = m_base + wm * 64 + i * 16 + (lane >> 2) + 8 * h;
            if (m >= M)
                continue;
            const float x_s = ONE_GROUP ? __ldg(xs_row[i][h]) : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int64_t n = n_base + wn * 32 + j * 8 + 2 * (lane & 3) + e;
                    if (n >= N)
                        continue;
                    float v;
                    if constexpr (ONE_GROUP)
                        v = __fmul_rn((float)tmp[i][j][2 * h + e], __fmul_rn(x_s, __ldg(ws_col[j][e])));
                    else
                        v = acc[i][j][2 * h + e];
                    if (bias)
                        v = __fadd_rn(v, to_f32(bias[n]));
                    y[m * N + n] = from_f32<T>(v);
                }
        }
}

template <typename T>
static int run_mma80(const GemmInt8Args<T> &a, cudaStream_t stream) {
    const bool one = a.gk >= a.K;
    auto kernel = one ? gemm_int8_mma80<T, true> : gemm_int8_mma80<T, false>;
    static unsigned long long smem_set[2]; /* per kernel (one or grouped), bit per device */
    int st = raise_smem_limit(reinterpret_cast<const void *>(kernel), MMA80_SMEM, &smem_set[one],
                              "gemm_int8 (sm80) shared memory");
    if (st)
        return st;
    dim3 grid((unsigned)((a.M + MMA80_BM - 1) / MMA80_BM), (unsigned)((a.N + MMA80_BN - 1) / MMA80_BN));
    kernel<<<grid, 256, MMA80_SMEM, stream>>>(a.xq, a.xs, a.wq, a.ws, a.bias, a.y, a.M, a.N, a.K, a.xs_groups, a.gn,
                                              a.gk);
    return check_launch("gemm_int8 (sm80)");
}

/* ---------------------------------------------------------------- dispatch */
enum { PATH_AUTO = 0, PATH_GENERIC = 1, PATH_SKINNY = 2, PATH_MMA80 = 3, PATH_SM90 = 4, PATH_SM90_MCAST = 5 };

template <typename T>
static int gemm_int8_t(const GemmInt8Args<T> &a, cudaStream_t stream) {
    DeviceInfo dev;
    int st = device_info(&dev);
    if (st)
        return st;
    const bool one = a.gk >= a.K;
    const bool al = aligned16(a.xq) && aligned16(a.wq);
    /* skinny: chunk of 64 (or 32) k inside one K-group */
    const int skinny_bytes = (one ? a.K % 64 == 0 : a.gk % 64 == 0) ? 16 : ((one ? a.K : a.gk) % 32 == 0 ? 8 : 0);
    const bool skinny_ok = dev.cc >= 80 && al && skinny_bytes && a.K % (4 * skinny_bytes) == 0 && a.gn >= 1;
    const bool mma80_ok = dev.cc >= 80 && al && a.K % 16 == 0 && (one || a.gk % MMA80_BK == 0) &&
                          (a.M + MMA80_BM - 1) / MMA80_BM <= INT32_MAX && (a.N + MMA80_BN - 1) / MMA80_BN <= 65535;
    const bool sm90_ok = sizeof(T) == 2 && dev.cc == 90 && gemm_int8_sm90_supported(a.M, a.N, a.K, a.gk) && al;
    int path = knob(KNOB_GEMM_INT8);
    if (path == PATH_AUTO) {
        if (a.M <= 16 && skinny_ok)
            path = PATH_SKINNY;
        else if (sm90_ok)
            path = PATH_SM90;
        else if (mma80_ok)
            path = PATH_MMA80;
        else if (skinny_ok)
            path = PATH_SKINNY;
        else
            path = PATH_GENERIC;
    }
    if ((path == PATH_SM90 || path == PATH_SM90_MCAST) && sm90_ok)
        return gemm_int8_sm90<T>(dev, a, stream);
    if (path == PATH_MMA80 && mma80_ok)
        return run_mma80<T>(a, stream);
    if (path == PATH_SKINNY && skinny_ok && (a.M + 15) / 16 <= 65535) {
        if (skinny_bytes == 16)
            return run_skinny_int8<T, 16>(dev, a, stream);
        return run_skinny_int8<T, 8>(dev, a, stream);
    }
    if ((a.M + 7) / 8 > 65535)
        return CQ_EUNSUPPORTED;
    dim3 grid((unsigned)((a.N + 7) / 8), (unsigned)((a.M + 7) / 8));
    gemm_int8_generic<T><<<grid, 256, 0, stream>>>(a.xq, a.xs, a.wq, a.ws, a.bias, a.y, a.M, a.N, a.K, a.xs_groups,
                                                   a.gn, a.gk);
    return check_launch("gemm_int8 (generic)");
}

int launch_gemm_int8(const int8_t *xq, const float *xs, const int8_t *wq, const float *ws, const void *bias, void *y,
                     int y_dtype, int64_t M, int64_t N, int64_t K, int64_t xs_groups, int64_t gn, int64_t gk,
                     void *workspace, int64_t workspace_bytes, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || K <= 0 || gn <= 0 || gk <= 0)
        return CQ_EINVAL;
    if (xs_groups != 1 && xs_groups != (K + gk - 1) / gk)
        return CQ_EINVAL;
    return CQ_DISPATCH_FLOAT(y_dtype, T, [&] {
        GemmInt8Args<T> a{xq, xs, wq, ws, static_cast<const T *>(bias), static_cast<T *>(y), M, N, K, xs_groups,
                          gn, gk, workspace, workspace ? workspace_bytes : 0};
        return gemm_int8_t<T>(a, stream);
    }());
}

} /* namespace cq */
