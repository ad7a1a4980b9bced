/* linear4.cu: fused 4-bit linear y[M, N] = x[M, K] W^T + bias, W in the bnb_nf4 /
 * bnb_fp4 layout (formats.h), for small M (tokens): each weight byte is read once.
 *
 * linear4_stream (sm_90, bf16/f16, 1-16 tokens, K a multiple of 4 groups, where the
 * tokens fit: staged in shared memory, or in registers with K split over a cluster):
 * the dispatcher's first choice there; whole rows streamed by the bulk copy engine, one
 * persistent block an SM (see its comment).
 * linear4_staged (sm_80+, bf16/f16, K a multiple of the chunk): the other small-M cases;
 * tensor cores via skinny.cuh, weights, absmax and tokens streamed through shared memory.
 * In both, a chunk of CK = 8 * BYTES consecutive k of one row lies in one group
 * (CK <= group), so the lane sums table[code] * x over the chunk on tensor cores and
 * scales the partial sum by absmax once per chunk. Codes become bf16/f16 pairs
 * through a 256-entry table of byte -> (table[hi], table[lo]) kept once per lane
 * (32 copies: every lookup hits the lane's own bank). Table values are rounded to
 * bf16/f16 before the product with absmax, so y matches the dequantize-then-GEMM
 * result to bf16/f16 rounding of the weight.
 * linear4_generic: every other case (float32, odd K, sm_75, unaligned): one warp per
 * output column, weights decoded exactly in float32.
 */
#include "async_sm90.cuh"
#include "launchers.cuh"
#include "skinny.cuh"

namespace cq {

__constant__ float c_table4[2][16] = {CQ_NF4_TABLE_INIT, CQ_FP4_TABLE_INIT};

/* Byte `B` of `w` as the byte offset of its entry in the lane-private table
 * (entry * 128 + lane * 4): one shift and one LOP3 (and-or) before the LDS. */
template <int B>
__device__ __forceinline__ uint32_t lut_offset(uint32_t w, uint32_t lane4) {
    constexpr int sh = 8 * B;
    const uint32_t v = sh >= 7 ? (w >> (sh - 7)) : (w << (7 - sh));
    return (v & 0x7f80u) | lane4;
}

/* ------------------------------------------------------------------ staged skinny */
/* Split of K over a cluster (sm_90): the largest S <= 8 that keeps blocks * S within the
 * resident blocks (no second, thin wave waiting on DRAM latency alone: run 5) and divides
 * K into whole stages where it can; a forced S (knob) wins. */
static inline int skinny_split_for(const DeviceInfo &dev, int64_t blocks, int64_t chunks, int U,
                                   int64_t resident) {
    const int forced = knob(KNOB_SPLIT_K);
    if (dev.cc < 90)
        return 1;
    const int64_t units = chunks % U == 0 ? chunks / U : chunks;
    int S = forced > 0 ? (forced < 8 ? forced : 8) : 8;
    if (forced <= 0)
        while (S > 1 && blocks * S > resident)
            S--;
    while (S > 1 && (units % S != 0 || units / S < 2))
        S--;
    return S;
}
template <int NT, int BYTES, int MH>
struct StagedShape {
    static constexpr int R = 4 * NT * 8;              /* rows of a block tile */
    static constexpr int CK = BYTES * 8;              /* k of a chunk */
    static constexpr int CB = 4 * BYTES;              /* bytes of a row in a chunk */
    static constexpr int U = 128 / CB;                /* chunks a stage: 128 bytes a row */
    static constexpr int RS = U * CB + CB;            /* row stride: one chunk of padding
                                                         makes the fragment LDS conflict-free */
    static constexpr int XR = MH > 1 ? 16 : 8;        /* token rows staged */
    static constexpr int XRS = U * CK * 2 + 16;       /* their stride (padded likewise) */
    static constexpr int STAGES = 2;                  /* 4 ran slower: 2 blocks an SM, not 3 */
    static constexpr int WST = R * RS;                /* weight bytes of a stage */
    static constexpr int AST = U * R * 4;             /* absmax bytes of a stage */
    static constexpr int XST = XR * XRS;              /* token bytes of a stage */
    static constexpr int SMEM = 256 * 32 * 4 + STAGES * (WST + AST + XST) + 16 * R * 4;
};

/* linear4_staged: a block of 4 warps takes R rows and a K slice; its weights, absmax and
 * tokens come through shared memory by cp.async in STAGES stages of U chunks, so the
 * bytes in flight cost no registers and every operand of the decode is a short LDS
 * away. (Runs 5-8: a version that kept two batches of weights in registers held 11
 * warps an SM and waited on the token loads from L1 each chunk; 0.72x bf16 at M = 1,
 * 3072 -> 12288, against 0.58x here.) The weights bypass L1 (.cg). */
template <typename T, int NT, int BYTES, int MH>
__global__ void __launch_bounds__(128)
linear4_staged(const T *__restrict__ x, const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
               const T *__restrict__ bias, T *__restrict__ y, int M, int64_t N, int64_t K, int log2_group,
               int codebook, int S, int probe) {
    using SH = StagedShape<NT, BYTES, MH>;
    constexpr int R = SH::R, CK = SH::CK, CB = SH::CB, U = SH::U, RS = SH::RS, STAGES = SH::STAGES;
    constexpr int XRS = SH::XRS;
    constexpr int STEPS = BYTES / 2, XW = BYTES, WORDS = BYTES / 4;
    constexpr int WCOPIES = R * U * CB / 16 / 128; /* 16-byte weight copies a thread a stage */
    constexpr int ACOPIES = (U * R + 127) / 128;   /* absmax copies a thread a stage (at most) */
    static_assert(WCOPIES * 128 * 16 == R * U * CB && 128 % R == 0, "copies");
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t *lut = reinterpret_cast<uint32_t *>(smem);
    unsigned char *wst = smem + 256 * 32 * 4;
    float *ast = reinterpret_cast<float *>(wst + STAGES * SH::WST);
    unsigned char *xst = reinterpret_cast<unsigned char *>(ast + STAGES * U * R);
    float *part = reinterpret_cast<float *>(xst + STAGES * SH::XST);
    __shared__ float table[16];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const uint32_t lane4 = (uint32_t)lane * 4u;
    const char *lut_bytes = reinterpret_cast<const char *>(lut);
    const int64_t row_tiles = (N + R - 1) / R;
    const int64_t kslice = udiv(K, S), k_begin = blockIdx.x * kslice;
    const int nchunks = (int)(kslice / CK), nstage = (nchunks + U - 1) / U;
    /* this thread's copies: weight rows/parts and one absmax column (128 % R == 0) */
    const int a_col = threadIdx.x % R, a_u0 = threadIdx.x / R;
    bool lut_ready = false;

    for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
        __syncthreads(); /* the previous tile's stages and partial sums are read */
        const uint8_t *wsrc[WCOPIES];
        int wdst[WCOPIES];
#pragma unroll
        for (int c = 0; c < WCOPIES; c++) {
            const int i = threadIdx.x + c * 128, row = i / (U * CB / 16), piece = i % (U * CB / 16);
            int64_t n = tile * R + row;
            n = n < N ? n : N - 1; /* rows past N: read a valid row, never stored */
            wsrc[c] = packed + ((n * K + k_begin) >> 1) + piece * 16;
            wdst[c] = row * RS + piece * 16;
        }
        const int64_t m0 = (int64_t)blockIdx.z * 16;
        const int mv = M - m0 < 16 ? (int)(M - m0) : 16;
        int64_t acolk;
        {
            int64_t c = tile * R + a_col;
            acolk = (c < N ? c : N - 1) * K + k_begin;
        }
        auto produce = [&](int st) {
            unsigned char *wb = wst + (st % STAGES) * SH::WST;
            float *ab = ast + (st % STAGES) * U * R;
            const int c0 = st * U;
#pragma unroll
            for (int c = 0; c < WCOPIES; c++) {
                const int piece = wdst[c] % RS / 16; /* chunk u = piece / (CB / 16) */
                if (c0 + piece / (CB / 16) < nchunks)
                    cp_async16(smem_u32(wb + wdst[c]), wsrc[c] + (int64_t)c0 * (CK / 2));
            }
#pragma unroll
            for (int c = 0; c < ACOPIES; c++) {
                const int u = a_u0 + c * (128 / R);
                if (u < U && c0 + u < nchunks)
                    cp_async4(smem_u32(ab + u * R + a_col), absmax + ((acolk + (int64_t)(c0 + u) * CK) >> log2_group));
            }
            /* the tokens of the stage: mv rows of U * CK values (run 6: read from L1 chunk by
             * chunk they serialized each warp's loop on their latency) */
            unsigned char *xb = xst + (st % STAGES) * SH::XST;
            for (int i = threadIdx.x; i < mv * (U * CK / 8); i += 128) {
                const int row = i / (U * CK / 8), piece = i % (U * CK / 8);
                if (c0 + piece * 8 / CK < nchunks)
                    cp_async16(smem_u32(xb + row * XRS + piece * 16),
                               x + (m0 + row) * K + k_begin + (int64_t)c0 * CK + piece * 8);
            }
        };
#pragma unroll
        for (int st = 0; st < STAGES - 1; st++) {
            if (st < nstage)
                produce(st);
            cp_async_commit();
        }
        if (!lut_ready) { /* built while the first stages are in flight */
            if (threadIdx.x < 16)
                table[threadIdx.x] = c_table4[codebook][threadIdx.x];
            __syncthreads();
            for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
                const int b = i >> 3;
                const uint32_t v = pack2<T>(table[b >> 4], table[b & 15]);
                reinterpret_cast<uint4 *>(lut)[i] = make_uint4(v, v, v, v);
            }
            lut_ready = true; /* visible after the first stage's barrier */
        }

        const int64_t n_warp = tile * R + warp * NT * 8;
        const bool row0 = r < mv, row1 = MH > 1 && r + 8 < mv;
        /* this lane's tokens of chunk u in a stage: rows r and r + 8, CK / 4 values at t */
        auto load_x = [&](const unsigned char *xb, int u, uint32_t (&xr0)[XW], uint32_t (&xr1)[MH > 1 ? XW : 1]) {
#pragma unroll
            for (int i = 0; i < XW; i += 4) {
                uint4 u0 = row0 ? *reinterpret_cast<const uint4 *>(xb + r * XRS + (u * CK + t * (CK / 4)) * 2 + i * 4)
                                : make_uint4(0, 0, 0, 0);
                xr0[i] = u0.x; xr0[i + 1] = u0.y; xr0[i + 2] = u0.z; xr0[i + 3] = u0.w;
                if constexpr (MH > 1) {
                    uint4 u1 = row1 ? *reinterpret_cast<const uint4 *>(xb + (r + 8) * XRS +
                                                                       (u * CK + t * (CK / 4)) * 2 + i * 4)
                                    : make_uint4(0, 0, 0, 0);
                    xr1[i] = u1.x; xr1[i + 1] = u1.y; xr1[i + 2] = u1.z; xr1[i + 3] = u1.w;
                }
            }
        };

        float acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++)
            acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        const int wrow = warp * NT * 8 + r; /* this lane's weight row in the tile (j = 0) */
        const int acol0 = warp * NT * 8 + 2 * t;

        for (int st = 0; st < nstage; st++) {
            cp_async_wait<STAGES - 2>(); /* this thread's copies of stage st landed */
            __syncthreads();             /* everyone's; stage st - 1 is consumed */
            if (st + STAGES - 1 < nstage)
                produce(st + STAGES - 1);
            cp_async_commit();
            const unsigned char *wb = wst + (st % STAGES) * SH::WST;
            const float *ab = ast + (st % STAGES) * U * R;
            const unsigned char *xb = xst + (st % STAGES) * SH::XST;
            const int c0 = st * U;
            /* chunk u of the stage. The NT tiles' MMAs interleaved, two accumulators each
             * (even and odd steps): 2 * NT independent chains instead of one chain of
             * STEPS * NT (run 7: the decode was latency-bound, ~3 warps a scheduler) */
            uint32_t xa0[XW], xa1[MH > 1 ? XW : 1]; /* chunk u's tokens (load_x) */
            auto chunk = [&](int u) {
                uint32_t ww[NT][WORDS];
                float2 am[NT];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const unsigned char *wr = wb + (wrow + j * 8) * RS + u * CB + t * BYTES;
                    if constexpr (WORDS == 4) {
                        uint4 v = *reinterpret_cast<const uint4 *>(wr);
                        ww[j][0] = v.x; ww[j][1] = v.y; ww[j][2] = v.z; ww[j][3] = v.w;
                    } else if constexpr (WORDS == 2) {
                        uint2 v = *reinterpret_cast<const uint2 *>(wr);
                        ww[j][0] = v.x; ww[j][1] = v.y;
                    } else {
                        ww[j][0] = *reinterpret_cast<const uint32_t *>(wr);
                    }
                    am[j] = *reinterpret_cast<const float2 *>(ab + u * R + acol0 + j * 8);
                }
                float tmp[NT][2][4];
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        tmp[j][0][e] = tmp[j][1][e] = 0.0f;
#pragma unroll
                for (int s = 0; s < STEPS; s++) {
                    uint32_t a[4];
                    a[0] = xa0[2 * s];
                    a[2] = xa0[2 * s + 1];
                    a[1] = MH > 1 ? xa1[MH > 1 ? 2 * s : 0] : 0u;
                    a[3] = MH > 1 ? xa1[MH > 1 ? 2 * s + 1 : 0] : 0u;
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        const uint32_t w = ww[j][s >> 1];
                        const uint32_t o0 = (s & 1) ? lut_offset<2>(w, lane4) : lut_offset<0>(w, lane4);
                        const uint32_t o1 = (s & 1) ? lut_offset<3>(w, lane4) : lut_offset<1>(w, lane4);
                        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(lut_bytes + o0);
                        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(lut_bytes + o1);
                        mma_16816<T>(tmp[j][s & 1], a, b0, b1);
                    }
                }
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    acc[j][0] = fmaf(tmp[j][0][0] + tmp[j][1][0], am[j].x, acc[j][0]);
                    acc[j][1] = fmaf(tmp[j][0][1] + tmp[j][1][1], am[j].y, acc[j][1]);
                    acc[j][2] = fmaf(tmp[j][0][2] + tmp[j][1][2], am[j].x, acc[j][2]);
                    acc[j][3] = fmaf(tmp[j][0][3] + tmp[j][1][3], am[j].y, acc[j][3]);
                }
            };
            /* 9-16 tokens: a whole stage without a branch a chunk, so that the chunks' MMA
             * chains interleave (a break a chunk kept them apart, run 105's finding in the
             * streamed kernel; on the H200, forced: -9% to -14%, runs 123-125). 1-8 tokens,
             * and the last, partial stage: chunk by chunk (1-8 tokens a whole stage: +1% to
             * +8%, run 123) */
            if (MH > 1 && !probe && c0 + U <= nchunks) {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    load_x(xb, u, xa0, xa1);
                    chunk(u);
                }
                continue;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (c0 + u >= nchunks)
                    break;
                load_x(xb, u, xa0, xa1);
                if (probe) { /* benchmark probe: the stream alone, no decode or MMA */
#pragma unroll
                    for (int j = 0; j < NT; j++)
                        acc[j][0] += __uint_as_float(*reinterpret_cast<const uint32_t *>(
                                         wb + (wrow + j * 8) * RS + u * CB + t * BYTES) & 0x007fffffu) +
                                     ab[u * R + acol0 + j * 8] + __uint_as_float(xa0[0] & 0x007fffffu);
                    continue;
                }
                chunk(u);
            }
        }
        cp_async_wait<0>();

        skinny_store<T, NT>(acc, part, R, S, bias, y, m0, mv, tile * R, n_warp, N);
    } /* row tiles */
}

template <typename T, int NT, int BYTES, int MH>
static int run_staged_mh(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax,
                         const T *bias, T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook,
                         cudaStream_t stream) {
    using SH = StagedShape<NT, BYTES, MH>;
    constexpr int R = SH::R, CK = SH::CK;
    if (SH::SMEM > dev.smem_optin)
        return CQ_EUNSUPPORTED;
    const int64_t row_tiles = (N + R - 1) / R;
    const unsigned gz = (unsigned)((M + 15) / 16);
    /* blocks resident on an SM: shared memory (228 KB a card of this generation, 1 KB a
     * block reserved), at most 4 */
    int per_sm = (int)((dev.smem_optin + 1024) / (SH::SMEM + 1024));
    per_sm = per_sm < 1 ? 1 : (per_sm > 4 ? 4 : per_sm);
    const int64_t resident = (int64_t)per_sm * dev.sms;
    /* clusters of at most 4: 8 ran slower than 4 at 12288 -> 3072 (run 6: the reduction and
     * the co-scheduling of 8 blocks cost more than the extra blocks gained) */
    const int S = skinny_split_for(dev, row_tiles * gz, K / CK, SH::U, resident < 4 * row_tiles * gz ? resident : 4 * row_tiles * gz);
    const int64_t slots = resident / ((int64_t)S * gz) > 0 ? resident / ((int64_t)S * gz) : 1;
    const int64_t rounds = (row_tiles + slots - 1) / slots;
    const unsigned gy = (unsigned)((row_tiles + rounds - 1) / rounds);
    auto kernel = linear4_staged<T, NT, BYTES, MH>;
    static unsigned long long smem_set; /* bit per device (raise_smem_limit) */
    const int st = raise_smem_limit(reinterpret_cast<const void *>(kernel), SH::SMEM, &smem_set,
                                    "linear_4bit (staged smem)");
    if (st)
        return st;
    /* the kernel reads M only through min(M - m0, 16) */
    return launch_clustered_smem(kernel, S, gy, gz, 128, (size_t)SH::SMEM, false, stream, "linear_4bit (staged)", x,
                                 packed, absmax, bias, y, (int)(M < INT32_MAX ? M : INT32_MAX), N, K, lg, codebook,
                                 S, knob(KNOB_SKINNY_PROBE));
}

template <typename T, int NT, int BYTES>
static int run_staged(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    if (M <= 8)
        return run_staged_mh<T, NT, BYTES, 1>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    return run_staged_mh<T, NT, BYTES, 2>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
}

/* ------------------------------------------------------------------ streamed skinny (sm_90) */
/* linear4_stream (sm_90, M <= 16): one persistent block an SM (or a cluster of blocks,
 * each a slice of K) streams a contiguous run of 8-row octets of W, whole rows (the octets
 * of the weight are one contiguous run of bytes, and so are their absmax), through a ring
 * of shared-memory stages filled by the bulk copy engine. One producer warp issues a stage
 * (16 rows x up to 4096 k) as 16 weight row copies (rows padded by one chunk's bytes, so
 * that the fragment loads are conflict-free) and the rows' absmax: one copy where a stage
 * is whole rows of 1-8 tokens (ab_whole), else 16 rows padded by 16 bytes;
 * 8 consumer warps split each stage's k between them and meet once a
 * 16-row tile in shared memory (added in warp order: deterministic). Every consumer
 * thread releases a stage it has read (compute-sanitizer's racecheck flagged the reuse of
 * a stage released by lane 0 after __syncwarp: docs/CUDA_NOTES.md, runs 42-44).
 * The tokens are staged once (1-8 tokens), or held in registers (XREG, below).
 * Transposed against linear4_staged: y^T = W x^T, so the 16 rows of the MMA are weight
 * rows (A, decoded by a lane-private table like linear4_staged's, with 256-byte entries:
 * lut256_offset) and its 8 columns are tokens (B): no padding of 1-8 tokens to 16, half
 * the MMAs; 9-16 tokens are two such tiles on one decoded A fragment.
 * Why (runs 5-9 and 20 of docs/CUDA_NOTES.md): linear4_staged streams short K slices with
 * cp.async, 2 stages deep, and waits about one memory latency a stage; here 3-8 stages are
 * in flight an SM, issued by one thread, and there is no split-K between blocks but that
 * of a cluster (stream_split). What bounds it now (runs 105-121 of docs/CUDA_NOTES.md): the
 * decode's table lookups, one shared-memory wavefront for 32 bytes of weights where DRAM
 * brings 32 bytes a cycle an SM (a tile runs at ~56% of shared-memory bandwidth and ~49% of
 * the issue slots, ~464 instructions a warp), and a call's fixed part (~1.5 us between
 * kernels, the first stage ~1.5 us into the kernel where every SM asks at once). */
/* Tokens in registers (XREG): where a tile is one stage (at most 48 chunks of K, K split
 * over a cluster of 2-8 blocks where a row is longer), a consumer warp works on the same
 * chunks of every tile, so it loads their B fragments from global memory once, at the
 * start, instead of from staged tokens every chunk: no tokens in shared memory, and 9-16
 * tokens (NT = 2 tiles of 8) fit beside the stages. At most STREAM_XCHUNKS / CW chunks a
 * warp: 6 x BYTES x NT registers of tokens. */
/* consumer warps: 8, with staged tokens (runs 82-83: 3-6% faster than 16 at 1-8 tokens, 4
 * between; 24 and 30 were slower than 16, run 29; half the partial-sum buffer of 16 leaves
 * room for larger stages: 4 tokens at 12288 -> 3072 32.5 -> 18.2 us) and with tokens in
 * registers (runs 105-107: 16 warps of 3 chunks spent ~120 of a tile's ~290 instructions a warp
 * on the stage's and the tile's bookkeeping; 8 warps of 6 chunks halve that, and their
 * register limit, 168 instead of 96, holds 6 chunks of 16 tokens) */
constexpr int STREAM_CW = 8;
constexpr int STREAM_XCHUNKS = 48; /* tokens in registers: chunks of a row's slice of K at most,
                                      STREAM_XCHUNKS / CW a warp */
constexpr int STREAM_MAX_STAGES = 8;
constexpr int STREAM_KSL = 4096;     /* k of a stage at most (32 KB of 16 weight rows); 2048 or
                                        1024 where 3 stages of that do not fit */

struct StreamLayout {
    int ksl;         /* k of a stage (a tile's last stage may be shorter) */
    int J;           /* stages a tile */
    int S;           /* stages in the ring */
    int rs;          /* bytes between staged weight rows: ksl / 2 + 4 BYTES (16 bytes of padding
                        left the 8- and 16-byte fragment loads 2-way conflicted: run 30) */
    int as;          /* floats between staged absmax rows: ksl / group, + 4 unless ab_whole */
    int xs;          /* bytes between staged token rows: 2 K / ksplit + 16 */
    int off_red;     /* partial sums [2][CW][8 NT tokens][16 rows] floats (after the 64 KB table) */
    int off_x;       /* tokens [M][xs bytes] (none with XREG) */
    int off_st;      /* stages [S][16 rs + 64 as bytes] */
    int stage_bytes;
    int ksplit;      /* blocks of a cluster, each a K / ksplit slice of the same rows */
    int off_part;    /* ksplit > 1: the block's sums [tiles][16 tokens][16 rows] floats */
    /* set at launch, so that the kernel divides nothing: three 64-bit divisions (a call of
     * ~70 dependent instructions each) were on the path to the first copy */
    int kl;          /* K / ksplit, a block's slice of K */
    int oct_q, oct_r; /* octets a group: oct_q, one more for the first oct_r groups */
    int early;       /* launched early (knob pdl = 2): the table before the wait for x */
    int half_first;  /* a block's one-octet tile first (knob stream_half = 1: last) */
    /* last: with it between `as` and `xs`, nvcc 13 (sm_90a) kept the 16-token kernel's shared
     * base in a vector register and added it to each decode-table load (an IMAD a load,
     * 52 more; the lookups lost their [R + UR] form): 16 tokens 2-5% slower, runs 99-101.
     * tests/test_sass.py checks the loads' form in CI. */
    int ab_whole;    /* a stage is whole rows (J = 1, ksplit = 1), 1-8 tokens: its absmax in one
                        copy, unpadded (its reads 4-way conflicted; 16 tokens, decode-bound,
                        were no faster with it: run 95) */
};

/* a count known at compile time, for a generic lambda (linear4_stream's chunk_set) */
template <int N>
struct Count {
    static constexpr int value = N;
};

/* Byte B of w as the offset of its entry in linear4_stream's decode table (entry * 256 +
 * lane * 4; entries 256 bytes apart, half of each unused, so that one PRMT places the byte,
 * where linear4_staged's 128-byte entries take a shift and a LOP3). */
template <int B>
__device__ __forceinline__ uint32_t lut256_offset(uint32_t w, uint32_t lane4) {
    return __byte_perm(lane4, w, 0x1100u | ((4u + B) << 4));
}

template <typename T, int BYTES, int NT, bool XREG>
__global__ void __launch_bounds__(32 * (STREAM_CW + 1), 1)
linear4_stream(const T *__restrict__ x, const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
               const T *__restrict__ bias, T *__restrict__ y, int M, int64_t N, int64_t K, int log2_group,
               int codebook, StreamLayout L, int probe) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int CK = BYTES * 8, CB = BYTES * 4, STEPS = BYTES / 2, WORDS = BYTES / 4, CW = STREAM_CW;
    extern __shared__ __align__(16) unsigned char smem[];
    uint64_t *bars = reinterpret_cast<uint64_t *>(smem); /* full[S], empty[S], tokens: <= 136 bytes */
    float *table = reinterpret_cast<float *>(smem + 192); /* no static shared memory: the dynamic
                                                             part may take the card's whole limit */
    const char *lut_bytes = reinterpret_cast<const char *>(smem + 256);
    float *red = reinterpret_cast<float *>(smem + L.off_red);
    unsigned char *xst = smem + L.off_x;
    unsigned char *st = smem + L.off_st;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    /* probe 4 (benchmark): block 0's timeline, the SM's clock at 8 points, into y as words */
    auto mark = [&](int i) {
        if (probe == 4 && blockIdx.x == 0)
            reinterpret_cast<volatile uint32_t *>(y)[i] = (uint32_t)clock64();
    };
    /* probe 6 (benchmark): every block's start and end on the global timer (ns), words
     * 2b and 2b + 1 of y: the launch's skew and the blocks' imbalance */
    auto block_time = [&](int i) {
        if (probe == 6) {
            uint64_t ns;
            asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(ns));
            reinterpret_cast<volatile uint32_t *>(y)[2 * blockIdx.x + i] = (uint32_t)ns;
        }
    };
    if (threadIdx.x == 0) {
        mark(0);
        block_time(0);
    }
    /* the block's octets: a contiguous run (every gridDim.x-th instead was no faster: run
     * 27), its cluster's with K split; a tile is two octets */
    const int KS = L.ksplit;
    int rank = 0, grp = blockIdx.x;
    if (KS > 1) {
        asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
        asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(grp));
    }
    const int64_t Kl = L.kl, k_off = rank * Kl; /* this block's slice of K */
    const int64_t o_begin = (int64_t)grp * L.oct_q + (grp < L.oct_r ? grp : L.oct_r);
    const int n_oct = L.oct_q + (grp < L.oct_r);
    const int tiles = (n_oct + 1) / 2;
    /* a block with an odd count of octets has one tile of one octet (rows 0-7): first
     * (its stage, half the copies, comes in sooner), or last (knob stream_half = 1) */
    const int one_octet_tile = (n_oct & 1) ? (L.half_first ? 0 : tiles - 1) : -1;
    /* weight row `row` (0-15) of tile `tile`, or -1 past the block's octets or N */
    auto tile_row = [&](int tile, int row) -> int64_t {
        const int64_t i = 2 * (int64_t)tile - (one_octet_tile >= 0 && tile > one_octet_tile) + (row >> 3);
        const int64_t n = 8 * (o_begin + i) + (row & 7);
        return i < n_oct && n < N && !(tile == one_octet_tile && row >= 8) ? n : -1;
    };
    /* K split over the cluster: the blocks' sums of each row meet here, added in rank order
     * (deterministic) by the block of rank tile % KS, with bias */
    float *part = reinterpret_cast<float *>(smem + L.off_part);
    auto cluster_sum_store = [&]() {
        asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
        for (int tile = rank; tile < tiles; tile += KS)
            for (int e = threadIdx.x; e < M * 16; e += blockDim.x) {
                const int m = e >> 4, row = e & 15;
                const int64_t n = tile_row(tile, row);
                if (n < 0)
                    continue;
                const uint32_t off = s_addr(part + (tile * 16 + m) * 16 + row);
                float v = 0.0f;
                for (int b = 0; b < KS; b++) {
                    uint32_t remote;
                    float pv;
                    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(off), "r"(b));
                    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(pv) : "r"(remote) : "memory");
                    v += pv;
                }
                if (bias)
                    v += to_f32(bias[n]);
                if (probe < 4)
                    y[(int64_t)m * N + n] = from_f32<T>(v);
            }
        if (threadIdx.x == 0)
            mark(7); /* y stored */
        /* no block leaves while another still reads its sums */
        asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
    };
    auto full = [&](int s) { return s_addr(bars + s); };
    auto empty = [&](int s) { return s_addr(bars + L.S + s); };
    const uint32_t xbar = s_addr(bars + 2 * L.S);
    /* the producer sets the barriers and goes on to its copies; the consumers meet it at
     * named barrier 2 before their first wait on one (no block-wide barrier on the path to
     * the first copy): the producer arrives, the consumers wait */
    auto barriers_set_arrive = [] { asm volatile("bar.arrive 2, %0;\n" ::"n"(32 * (CW + 1)) : "memory"); };
    auto barriers_set = [] { asm volatile("bar.sync 2, %0;\n" ::"n"(32 * (CW + 1)) : "memory"); };

    /* launched early (knob pdl = 2): the previous kernel may still run until pdl_wait; until
     * then only shared memory and constants (an L2 prefetch of the first stages before the
     * wait made every shape slower: 3072^2 at M = 1 5.9 -> 7.3 us, run 75) */
    if (warp == CW) { /* the producer: lanes 0-15 copy weight rows, lanes 16-31 absmax rows */
        if (lane == 0) {
            for (int s = 0; s < L.S; s++) {
                mbar_init(full(s), 1);
                mbar_init(empty(s), 32 * CW); /* every consumer thread releases the stage */
            }
            mbar_init(xbar, 1);
            mbar_init_fence();
            mark(1);
        }
        __syncwarp();
        barriers_set_arrive();
        pdl_wait();
        pdl_release();
        if constexpr (!XREG) {
            if (lane == 0) /* the tokens' slice of K only */
                mbar_expect_tx(xbar, M * (int)Kl * 2);
            __syncwarp();
            if (lane < M)
                bulk_load(s_addr(xst + lane * L.xs), x + (int64_t)lane * K + k_off, (uint32_t)(Kl * 2), xbar);
        }
        int s = 0;
        uint32_t phase = 0;
        for (int tile = 0; tile < tiles; tile++) {
            const int row = lane & 15;
            const int64_t n = tile_row(tile, row);
            const int rows = __popc(__ballot_sync(0xffffffffu, lane < 16 && n >= 0));
            for (int j = 0; j < L.J; j++) {
                const int64_t k0 = (int64_t)j * L.ksl;
                const int kl = Kl - k0 < L.ksl ? (int)(Kl - k0) : L.ksl;
                const int abytes = probe == 2 ? 0 : (kl >> log2_group) * 4; /* a row's absmax */
                /* every lane that copies into the stage acquires its release itself */
                mbar_wait(empty(s), phase ^ 1u);
                if (lane == 0)
                    mbar_expect_tx(full(s), probe == 3 ? 0 : rows * (kl / 2 + abytes));
                __syncwarp();
                unsigned char *sb = st + s * L.stage_bytes;
                if (n >= 0 && probe != 3) {
                    const int64_t e = n * K + k_off + k0; /* first element of the row's slice */
                    if (lane < 16)
                        bulk_load(s_addr(sb + row * L.rs), packed + (e >> 1), (uint32_t)(kl / 2), full(s));
                    else if (NT == 1 && abytes && L.ab_whole) { /* rows 0 .. rows - 1: one copy */
                        if (lane == 16)
                            bulk_load(s_addr(sb + 16 * L.rs), absmax + (e >> log2_group), (uint32_t)(rows * abytes),
                                      full(s));
                    } else if (abytes)
                        bulk_load(s_addr(sb + 16 * L.rs + row * L.as * 4), absmax + (e >> log2_group),
                                  (uint32_t)abytes, full(s));
                }
                if (++s == L.S) {
                    s = 0;
                    phase ^= 1u;
                }
            }
        }
        if (lane == 0)
            mark(2); /* every load issued */
        if (KS > 1)
            cluster_sum_store(); /* every thread of the cluster takes part */
        return;
    }

    /* consumers: the tokens (XREG) and the codebook are requested first and come while the
     * lane-private decode table (linear4_staged's) is built; launched early, the table is
     * built before the wait for the kernel that writes x */
    auto consumers_sync = [] { asm volatile("bar.sync 1, %0;\n" ::"n"(32 * CW) : "memory"); };
    /* lane (r, t): weight rows r and r + 8 of the tile (A), tokens r + 8 nt (B; zero past
     * M); its C fragments: rows r and r + 8, tokens 8 nt + 2t and 8 nt + 2t + 1 */
    const int r = lane >> 2, t = lane & 3;
    const uint32_t lane4 = (uint32_t)lane * 4u;
    /* XREG: the B fragments of this warp's chunks (a tile is one stage, so the same
     * chunks every tile), from global memory once */
    constexpr int XCPW = XREG ? STREAM_XCHUNKS / CW : 1; /* a warp's chunks at most */
    uint32_t xr[XCPW][NT][BYTES];
    auto load_tokens = [&] {
        pdl_wait();
        pdl_release();
        if constexpr (XREG) {
            const int chunks = (int)(Kl / CK), c_lo = warp * chunks / CW, c_hi = (warp + 1) * chunks / CW;
#pragma unroll
            for (int cc = 0; cc < XCPW; cc++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int m = r + 8 * nt, c = c_lo + cc;
                    const T *src = x + (int64_t)m * K + k_off + c * CK + t * (CK / 4);
#pragma unroll
                    for (int i = 0; i < BYTES; i += 4) {
                        const uint4 u = m < M && c < c_hi ? __ldg(reinterpret_cast<const uint4 *>(src) + i / 4)
                                                          : make_uint4(0, 0, 0, 0);
                        xr[cc][nt][i] = u.x; xr[cc][nt][i + 1] = u.y; xr[cc][nt][i + 2] = u.z;
                        xr[cc][nt][i + 3] = u.w;
                    }
                }
        }
    };
    const float code = threadIdx.x < 16 ? c_table4[codebook][threadIdx.x] : 0.0f;
    if (!L.early)
        load_tokens();
    if (threadIdx.x < 16)
        table[threadIdx.x] = code;
    consumers_sync();
    for (int i = threadIdx.x; i < 256 * 8; i += 32 * CW) {
        const int b = i >> 3;
        const uint32_t v = pack2<T>(table[b >> 4], table[b & 15]);
        reinterpret_cast<uint4 *>(smem + 256 + b * 256)[i & 7] = make_uint4(v, v, v, v);
    }
    consumers_sync();
    if (L.early)
        load_tokens();
    if (threadIdx.x == 0)
        mark(3); /* decode table built */
    barriers_set();
    if constexpr (!XREG)
        mbar_wait(xbar, 0);
    if (threadIdx.x == 0)
        mark(4); /* tokens in */
    const bool x_ok = r < M;
    const unsigned char *xrow = xst + r * L.xs + t * (CK / 4) * 2;
    int s = 0, rb = 0;
    uint32_t phase = 0;
    for (int tile = 0; tile < tiles; tile++, rb ^= 1) {
        float acc[NT][4] = {};
        /* with tokens in registers a tile is one stage of the whole slice: its bounds are
         * the same every tile (J and kl known here, so they leave the loop) */
        const int J = XREG ? 1 : L.J;
        for (int j = 0; j < J; j++) {
            const int64_t k0 = (int64_t)j * L.ksl;
            const int kl = XREG ? (int)Kl : Kl - k0 < L.ksl ? (int)(Kl - k0) : L.ksl;
            const int chunks = kl / CK, c_lo = warp * chunks / CW, c_hi = (warp + 1) * chunks / CW;
            const unsigned char *sb = st + s * L.stage_bytes;
            const unsigned char *w0 = sb + r * L.rs + t * BYTES, *w1 = w0 + 8 * L.rs;
            const float *ab0 = reinterpret_cast<const float *>(sb + 16 * L.rs) + r * L.as, *ab1 = ab0 + 8 * L.as;
            const unsigned char *xk = xrow + k0 * 2;
            mbar_wait(full(s), phase);
            if (threadIdx.x == 0 && tile == 0 && j == 0)
                mark(5); /* first stage in */
            /* IL chunks from c_first at once, without a branch a chunk: their MMA chains
             * interleave (a branch a chunk kept them apart, each chunk's FFMAs waiting out
             * its chain before the next chunk's loads issued: run 105). token(i, nt, w): word
             * w of chunk i's B fragment. A slot at or past c_end reads chunk 0 and must have
             * zero tokens, so that its products are exactly 0; it takes no absmax (an inf
             * one would make 0 * inf). One MMA chain a chunk and token tile: two chains
             * (linear4_staged's) cost an FADD per accumulator and were no faster (run 30). */
            auto chunk_set = [&](auto il, auto half, int c_first, int c_end, auto &&token) {
                constexpr int IL = decltype(il)::value;
                constexpr bool HALF = decltype(half)::value; /* rows 8-15 absent: not decoded */
                uint32_t wa[IL][WORDS], wb[IL][WORDS] = {};
                float am0[IL], am1[IL] = {};
#pragma unroll
                for (int i = 0; i < IL; i++) {
                    const bool ok = c_first + i < c_end;
                    const int c = ok ? c_first + i : 0;
                    load_words_smem<BYTES>(w0 + c * CB, wa[i]);
                    const int g = (c * CK) >> log2_group;
                    am0[i] = ok ? ab0[g] : 0.0f;
                    if constexpr (!HALF) {
                        load_words_smem<BYTES>(w1 + c * CB, wb[i]);
                        am1[i] = ok ? ab1[g] : 0.0f;
                    }
                }
                float tmp[IL][NT][4] = {};
#pragma unroll
                for (int q = 0; q < STEPS; q++)
#pragma unroll
                    for (int i = 0; i < IL; i++) {
                        const uint32_t ua = wa[i][q >> 1], ub = wb[i][q >> 1];
                        uint32_t a[4];
                        a[0] = *reinterpret_cast<const uint32_t *>(
                            lut_bytes + ((q & 1) ? lut256_offset<2>(ua, lane4) : lut256_offset<0>(ua, lane4)));
                        a[1] = HALF ? 0u
                                    : *reinterpret_cast<const uint32_t *>(
                                          lut_bytes + ((q & 1) ? lut256_offset<2>(ub, lane4) : lut256_offset<0>(ub, lane4)));
                        a[2] = *reinterpret_cast<const uint32_t *>(
                            lut_bytes + ((q & 1) ? lut256_offset<3>(ua, lane4) : lut256_offset<1>(ua, lane4)));
                        a[3] = HALF ? 0u
                                    : *reinterpret_cast<const uint32_t *>(
                                          lut_bytes + ((q & 1) ? lut256_offset<3>(ub, lane4) : lut256_offset<1>(ub, lane4)));
#pragma unroll
                        for (int nt = 0; nt < NT; nt++)
                            mma_16816<T>(tmp[i][nt], a, token(i, nt, 2 * q), token(i, nt, 2 * q + 1));
                    }
#pragma unroll
                for (int i = 0; i < IL; i++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
                        acc[nt][0] = fmaf(tmp[i][nt][0], am0[i], acc[nt][0]);
                        acc[nt][1] = fmaf(tmp[i][nt][1], am0[i], acc[nt][1]);
                        if constexpr (!HALF) {
                            acc[nt][2] = fmaf(tmp[i][nt][2], am1[i], acc[nt][2]);
                            acc[nt][3] = fmaf(tmp[i][nt][3], am1[i], acc[nt][3]);
                        }
                    }
            };
            const bool probe_loads = probe == 1 || probe == 2; /* probes: the stream alone */
            /* half: the tile is one octet (one_octet_tile): rows 8-15 neither loaded nor
             * looked up (384 octets on 132 SMs: most blocks hold 3, so 1.5 tiles of lookups
             * instead of 2). Not with 9-16 tokens: the second copy of the decode spilled
             * there (168 registers) */
            const bool half = NT == 1 && tile == one_octet_tile;
            auto decode_set = [&](auto il, int c_first, int c_end, auto &&token) {
                if (half)
                    chunk_set(il, Count<1>(), c_first, c_end, token);
                else
                    chunk_set(il, Count<0>(), c_first, c_end, token);
            };
            if constexpr (XREG) {
                /* a warp's six chunks in one set with 1-8 tokens (two sets of three: within
                 * the spread, -1% at 1 token, run 118), three with 9-16 (their kernel is at
                 * its 168 registers), one with 16-byte chunks (more spilled beside 96
                 * registers of tokens); a slot past c_hi has zero tokens (xr) */
                constexpr int IL = BYTES >= 16 ? 1 : (NT == 1 ? 6 : 3);
                static_assert(XCPW % IL == 0, "whole sets of chunks");
#pragma unroll
                for (int c0 = 0; c0 < XCPW; c0 += IL) {
                    if (probe_loads || c_lo + c0 >= c_hi)
                        break;
                    decode_set(Count<IL>(), c_lo + c0, c_hi,
                               [&](int i, int nt, int w) { return xr[c0 + i][nt][w]; });
                }
            } else {
                /* sets of four chunks (16-byte chunks: two), then one of two and one of one
                 * for the rest: every slot a chunk of the warp's (sets of four with empty
                 * slots were 2% slower at 8 tokens, 12288 -> 3072, run 108) */
                constexpr int IL = BYTES >= 16 ? 2 : 4;
                auto staged_set = [&](auto il, int c) {
                    constexpr int N = decltype(il)::value;
                    uint32_t xv[N][BYTES];
#pragma unroll
                    for (int i = 0; i < N; i++)
#pragma unroll
                        for (int e = 0; e < BYTES; e += 4) {
                            const uint4 u = x_ok ? *reinterpret_cast<const uint4 *>(xk + (c + i) * CK * 2 + e * 4)
                                                 : make_uint4(0, 0, 0, 0);
                            xv[i][e] = u.x; xv[i][e + 1] = u.y; xv[i][e + 2] = u.z; xv[i][e + 3] = u.w;
                        }
                    decode_set(il, c, c + N, [&](int i, int, int w) { return xv[i][w]; });
                };
                const int c_end = probe_loads ? c_lo : c_hi;
                int c = c_lo;
                for (; c + IL <= c_end; c += IL)
                    staged_set(Count<IL>(), c);
                if (IL > 2 && c + 2 <= c_end) {
                    staged_set(Count<2>(), c);
                    c += 2;
                }
                if (c < c_end)
                    staged_set(Count<1>(), c);
            }
            mbar_arrive(empty(s)); /* this thread's reads of the stage are done */
            if (++s == L.S) {
                s = 0;
                phase ^= 1u;
            }
        }
        if (threadIdx.x == 0 && tile == tiles - 1)
            mark(6); /* last tile's products done */
        /* the warps' partial sums of this tile, added in warp order */
        constexpr int TOK = 8 * NT;
        float *rr = red + rb * (CW * TOK * 16);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int m = 8 * nt + 2 * t;
            if (m < M) {
                rr[(warp * TOK + m) * 16 + r] = acc[nt][0];
                rr[(warp * TOK + m) * 16 + r + 8] = acc[nt][2];
            }
            if (m + 1 < M) {
                rr[(warp * TOK + m + 1) * 16 + r] = acc[nt][1];
                rr[(warp * TOK + m + 1) * 16 + r + 8] = acc[nt][3];
            }
        }
        consumers_sync(); /* rr is complete; the other buffer's readers are done */
        if (threadIdx.x < M * 16) {
            const int m = threadIdx.x >> 4, row = threadIdx.x & 15;
            const int64_t n = tile_row(tile, row);
            if (n >= 0) { /* rows of this block only */
                float v = 0.0f;
#pragma unroll 4
                for (int w = 0; w < CW; w++)
                    v += rr[(w * TOK + m) * 16 + row];
                if (KS > 1) {
                    part[(tile * 16 + m) * 16 + row] = v;
                } else {
                    if (bias)
                        v += to_f32(bias[n]);
                    if (probe < 4)
                        y[(int64_t)m * N + n] = from_f32<T>(v);
                }
            }
            if (threadIdx.x == 0 && tile == tiles - 1 && KS == 1)
                mark(7); /* y stored */
        }
    }
    if (KS > 1)
        cluster_sum_store();
    if (threadIdx.x == 0)
        block_time(1);
#endif
}

/* k of a stage: Kl in equal whole-quad-group stages of at most cap */
static inline int64_t stream_ksl(int64_t Kl, int64_t cap, int64_t q) {
    const int64_t J = (Kl + cap - 1) / cap;
    return ((Kl + J - 1) / J + q - 1) / q * q;
}

/* The layout of linear4_stream for (M, K, group), or false where it does not apply:
 * bulk copies need 16-byte rows and offsets (K a multiple of 4 groups), and at least 3
 * stages must fit in shared memory beside the tokens (none with XREG, where a tile is
 * one stage of a K / ksplit slice) and, with ksplit > 1, the sums of `tiles` tiles. */
static bool stream_layout(const DeviceInfo &dev, int64_t M, int64_t K, int lg, int cw, int bytes, int nt,
                          bool xreg, int ksplit, int64_t tiles, StreamLayout *L, int *smem) {
    const int64_t g = int64_t(1) << lg, q = 4 * g, Kl = K / ksplit;
    if (dev.cc < 90 || M > 8 * nt || K % ksplit != 0 || Kl % q != 0)
        return false;
    L->ksplit = ksplit;
    L->xs = (int)(2 * Kl + 16); /* a block stages its slice of the tokens */
    L->off_red = 256 + 256 * 256; /* after the 64 KB decode table */
    L->off_x = L->off_red + 2 * cw * 8 * nt * 16 * 4;
    L->off_part = L->off_x + (xreg ? 0 : (int)(M * L->xs));
    L->off_st = (int)((L->off_part + (ksplit > 1 ? tiles * 16 * 16 * 4 : 0) + 127) / 128 * 128);
    const int64_t room = (int64_t)dev.smem_optin - L->off_st;
    int64_t S = 0;
    /* shorter stages (down to 1024 k) where 3 do not fit; XREG: the whole slice */
    for (int64_t cap = xreg ? Kl : STREAM_KSL;; cap /= 2) {
        const int64_t ksl = stream_ksl(Kl, cap, q), J = (Kl + ksl - 1) / ksl;
        L->ksl = (int)ksl;
        L->J = (int)J;
        L->rs = (int)(ksl / 2 + 4 * bytes);
        /* a stage of whole rows (one stage a tile, no split) takes its 16 rows' absmax,
         * contiguous in memory, in one copy, unpadded: a bulk copy costs ~55 cycles of the
         * SM's copy engine whatever its size, and 16 absmax rows a stage took 25% of the
         * stream's time at 3072 -> 12288 (run 93) */
        L->ab_whole = J == 1 && ksplit == 1 && nt == 1 && knob(KNOB_STREAM_AB) != 1;
        L->as = (int)((ksl >> lg) + (L->ab_whole ? 0 : 4));
        L->stage_bytes = 16 * L->rs + 64 * L->as;
        S = room > 0 ? room / L->stage_bytes : 0;
        if (xreg || S >= 3 || cap / 2 < 1024 || cap / 2 < q)
            break;
    }
    S = S > STREAM_MAX_STAGES ? STREAM_MAX_STAGES : S;
    if (S < 3 || (xreg && L->J != 1))
        return false;
    const int forced = knob(KNOB_STREAM_STAGES);
    if (forced >= 2 && forced < S)
        S = forced;
    L->S = (int)S;
    *smem = L->off_st + L->S * L->stage_bytes;
    return true;
}

/* K split over a cluster of KS blocks, each a K / KS slice of the same rows, their sums
 * added through distributed shared memory: the smallest KS (1, 2, 4, 8) that divides K into
 * whole groups and, with tokens in registers (max_chunks > 0), keeps a slice within a
 * warp's chunks; a forced KS (knob split_k, 1-8) where it fits. 0: none fits. A larger KS
 * does not even out the blocks' work: a stage costs about the same whatever its length
 * (12 stages of half the k took 1.9x the time of 6 whole ones at 3072 -> 12288,
 * runs 89-92), so more, shorter tiles are slower; the tokens staged take a split only where
 * it lengthens their stages (run_stream_variant). */
/* KS divides K into whole groups of 4 (bulk copies) and, with max_chunks > 0, leaves a slice
 * of at most max_chunks chunks of ck k */
static bool stream_split_fits(int64_t K, int lg, int ck, int max_chunks, int ks) {
    const int64_t q = int64_t(4) << lg;
    return K % ks == 0 && (K / ks) % q == 0 && (max_chunks == 0 || K / ks / ck <= max_chunks);
}
static int stream_split(int64_t K, int lg, int ck, int max_chunks, int *forced_out) {
    auto fits = [&](int ks) { return stream_split_fits(K, lg, ck, max_chunks, ks); };
    const int forced = knob(KNOB_SPLIT_K);
    *forced_out = forced >= 1 && forced <= 8 && fits(forced);
    if (*forced_out)
        return forced;
    for (int ks = 1; ks <= 8; ks *= 2)
        if (fits(ks))
            return ks;
    return 0;
}

template <typename T, int BYTES, int NT, bool XREG>
static int run_stream_variant(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax,
                              const T *bias, T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook,
                              cudaStream_t stream) {
    constexpr int CK = 8 * BYTES, CW = STREAM_CW;
    if (!aligned16(x) || !aligned16(packed) || !aligned16(absmax))
        return CQ_EUNSUPPORTED;
    int forced = 0;
    int KS = stream_split(K, lg, CK, XREG ? STREAM_XCHUNKS : 0, &forced);
    if (KS == 0)
        return CQ_EUNSUPPORTED;
    const int64_t octets = (N + 7) / 8;
    int64_t groups = 0;
    StreamLayout L;
    int smem = 0;
    auto layout = [&] { /* tiles: a group's at most */
        return stream_layout(dev, M, K, lg, CW, BYTES, NT, XREG, KS, ((octets + groups - 1) / groups + 1) / 2, &L,
                             &smem);
    };
    auto layout_for = [&](int ks) {
        KS = ks;
        groups = dev.sms / KS < octets ? dev.sms / KS : octets;
        return layout();
    };
    bool ok = layout_for(KS);
    /* tokens staged: where they leave room for short stages only (or none), a split that
     * stages a slice of them and lengthens the stages (4 tokens at 12288 -> 3072: 2048-k
     * stages 18.5 us, a split in 2 14.3 us, run 89) */
    if (!XREG && !forced) {
        const int64_t q = int64_t(4) << lg;
        int best = ok ? KS : 0, best_ksl = ok ? L.ksl : 0;
        for (int ks = 2 * KS; ks <= 8 && (best == 0 || best_ksl < stream_ksl(K / best, STREAM_KSL, q)); ks *= 2)
            if (stream_split_fits(K, lg, CK, 0, ks) && layout_for(ks) && L.ksl > best_ksl) {
                best = ks;
                best_ksl = L.ksl;
            }
        if (best == 0)
            return CQ_EUNSUPPORTED;
        ok = layout_for(best);
    }
    if (!ok)
        return CQ_EUNSUPPORTED;
    auto kernel = linear4_stream<T, BYTES, NT, XREG>;
    static unsigned long long smem_set; /* bit per device: the limit is the card's, once */
    const int st = raise_smem_limit(reinterpret_cast<const void *>(kernel), dev.smem_optin, &smem_set,
                                    "linear_4bit (streamed smem)");
    if (st)
        return st;
    cudaLaunchAttribute attr[2];
    cudaLaunchConfig_t cfg = cluster_launch_config(dim3((unsigned)(groups * KS), 1, 1), 32 * (CW + 1), (size_t)smem,
                                                   stream, (unsigned)KS, attr, knob(KNOB_PDL) == 2);
    if (KS > 1) { /* only as many clusters as are resident at once: a second wave would double the time */
        int active = 0;
        CQ_CUDA_TRY(cudaOccupancyMaxActiveClusters(&active, kernel, &cfg), "linear_4bit (streamed clusters)");
        if (active <= 0)
            return CQ_EUNSUPPORTED;
        if (active < groups) { /* more tiles a group: more room for their sums */
            groups = active;
            if (!layout())
                return CQ_EUNSUPPORTED;
            cfg.dynamicSmemBytes = (size_t)smem;
        }
    }
    if (octets / groups > INT32_MAX)
        return CQ_EUNSUPPORTED;
    cfg.gridDim = dim3((unsigned)(groups * KS), 1, 1);
    L.kl = (int)(K / KS);
    L.oct_q = (int)(octets / groups);
    L.oct_r = (int)(octets % groups);
    L.early = knob(KNOB_PDL) == 2;
    L.half_first = knob(KNOB_STREAM_HALF) != 1;
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, x, packed, absmax, bias, y, (int)M, N, K, lg, codebook, L,
                                         knob(KNOB_SKINNY_PROBE));
    if (err != cudaSuccess) {
        set_error("linear_4bit (streamed)", err);
        return CQ_ECUDA;
    }
    return check_launch("linear_4bit (streamed)");
}

/* 1-8 tokens: in registers where a row is at most 48 chunks, else staged in shared memory
 * (their slice of K, split over a cluster where whole they leave short stages only), else
 * in registers with K split over a cluster; 9-16 tokens (group 64 or less: at most 8 BYTES
 * registers of them): in registers. Knob stream_xreg = 1 forces the staged tokens, 2 the
 * registers. */
template <typename T, int BYTES>
static int run_stream_bytes(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax,
                            const T *bias, T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook,
                            cudaStream_t stream) {
    const int mode = knob(KNOB_STREAM_XREG);
    int st = CQ_EUNSUPPORTED;
    /* rows of at most 48 chunks (no K split): tokens in registers first (2-20%
     * faster than staged at 1-8 tokens and K = 3072, runs 95 and 100) */
    if (mode == 0 && M <= 8 && stream_split_fits(K, lg, 8 * BYTES, STREAM_XCHUNKS, 1)) {
        st = run_stream_variant<T, BYTES, 1, true>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
        if (st != CQ_EUNSUPPORTED)
            return st;
    }
    if (mode != 2 && M <= 8)
        st = run_stream_variant<T, BYTES, 1, false>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    if (st != CQ_EUNSUPPORTED || mode == 1)
        return st;
    if (M <= 8)
        return run_stream_variant<T, BYTES, 1, true>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    if constexpr (BYTES <= 8)
        return run_stream_variant<T, BYTES, 2, true>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    return CQ_EUNSUPPORTED;
}

template <typename T>
static int run_stream(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    if (lg >= 7)
        return run_stream_bytes<T, 16>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    if (lg == 6)
        return run_stream_bytes<T, 8>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    return run_stream_bytes<T, 4>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
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
    warp_column_store<T>(acc, bias, y, m0, M, n, N);
}

template <typename T, int NT>
static int pick_bytes(const DeviceInfo &dev, const T *x, const uint8_t *packed, const float *absmax, const T *bias,
                      T *y, int64_t M, int64_t N, int64_t K, int lg, int codebook, cudaStream_t stream) {
    if (lg >= 7)
        return run_staged<T, NT, 16>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    if (lg == 6)
        return run_staged<T, NT, 8>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
    return run_staged<T, NT, 4>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
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
    if (path == 3 || (path == 0 && skinny_ok && dev.cc >= 90)) {
        int st = CQ_EUNSUPPORTED;
        if constexpr (sizeof(T) == 2)
            if (skinny_ok)
                st = run_stream<T>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
        /* unsupported (the tokens or the groups do not fit): staged, unless forced (tests) */
        if (st != CQ_EUNSUPPORTED || path != 0)
            return st;
    }
    if (path == 0)
        path = skinny_ok ? 2 : 1;
    if (path == 2 && skinny_ok) {
        if constexpr (sizeof(T) == 2) {
            int st, nt = knob(KNOB_SKINNY_TILE);
            if (nt == 1)
                st = pick_bytes<T, 1>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
            else if (nt == 4)
                st = pick_bytes<T, 4>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
            else
                st = pick_bytes<T, 2>(dev, x, packed, absmax, bias, y, M, N, K, lg, codebook, stream);
            if (st != CQ_EUNSUPPORTED) /* else too little shared memory on this card (NT = 4 on
                                          sm_86/89): the generic kernel */
                return st;
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
