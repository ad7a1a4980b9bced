/* gemm_int8_sm90.cu: W8A8 GEMM on Hopper (sm_90a) int8 tensor cores (gemm_int8.cu has
 * the contract). A CTA computes 128 x BN tiles of y (BN = 256 for one K-group, 192 for
 * per-group scales), one after another (persistent: one CTA an SM), with three
 * warpgroups:
 *   warpgroup 0, the producer: one thread streams 128 x 128 tiles of xq and BN x 128
 *     tiles of wq (K-major, 128-byte swizzle) through the bulk tensor copy engine into
 *     a ring of shared-memory stages, each guarded by a full and an empty mbarrier, and
 *     runs on into the next tile while the consumers finish this one; with per-K-group
 *     scales, warp 1 also copies each stage's BN weight scales and, with per-group
 *     token scales (blockwise), warp 3 the tile's 128 rows' token scales; warp 2 stages
 *     each tile's epilogue scales and bias in shared memory (two buffers);
 *   warpgroups 1 and 2, the consumers: 64 rows each, wgmma m64nBNk32 s8 -> s32 from
 *     shared memory. One K-group (int8_tensorwise): int32 over all K, scales in the
 *     epilogue. Several K-groups (lodewise, blockwise, group a multiple of 128): the
 *     group's int32 sum is converted and added into float32 accumulators with its
 *     scale ("promotion"); the two consumers drift apart, so one promotes while the
 *     other's wgmma runs. The epilogue scales the tile into a swizzled staging tile in
 *     shared memory, and the bulk copy engine stores it while the consumers start the
 *     next tile.
 * Built only into the sm_90a image (CQ_HAVE_SM90A, set by setup.py when 90a is a
 * target); the dispatcher calls it only on a compute-capability-9.0 device. */
#include <cuda.h>
#include <string.h>

#include <type_traits>
#include <cudaTypedefs.h>

#include "async_sm90.cuh"
#include "gemm_int8.cuh"
#include "wgmma_s8.cuh"

namespace cq {

#if defined(CQ_HAVE_SM90A)

constexpr int SM90_BM = 128, SM90_BK = 128;

template <int BN, bool PROMOTE, bool NARROW> struct Sm90Cfg {
    /* 3 x 48 KB (row), 4 x 40 KB (per-group scales, 192 wide) or 5 x 32 KB (128 wide) of
     * stages leave room for a staging tile of y that is not in the ring, which the
     * producer refills for the next tile while the consumers store this one. NARROW (row):
     * 4 x 48 KB of stages and a staging box of 64 columns, the tile stored box by box */
    static constexpr int STAGES = PROMOTE ? (BN > 128 ? 4 : 5) : (NARROW ? 4 : 3);
    /* 64-column boxes of y the staging tile holds */
    static constexpr int STG_BOXES = NARROW ? 1 : BN / 64;
    static constexpr int A_BYTES = SM90_BM * SM90_BK;
    static constexpr int B_BYTES = BN * SM90_BK;
    /* a stage's scales (per-group scales): BN weight scales, then with per-group token
     * scales the 128 rows' scales of the stage's K-group (at BN) */
    static constexpr int WS_FLOATS = PROMOTE ? BN + SM90_BM : 0;
    static constexpr int WS_BYTES = WS_FLOATS * 4;
    /* y staged as BN / 64 boxes of 128 rows x 128 bytes, 128-byte swizzle (the bulk tensor
     * store's layout; conflict-free for the accumulator layout's 4-byte stores) */
    static constexpr int STG_OFF = (STAGES * (A_BYTES + B_BYTES + WS_BYTES) + 1023) / 1024 * 1024;
    /* two buffers of the epilogue's per-column weight scales and bias and per-row token scales */
    static constexpr int EPI_FLOATS = 2 * BN + SM90_BM;
    static constexpr int EPI_OFF = STG_OFF + SM90_BM * 64 * STG_BOXES * 2;
    static constexpr int BARS_OFF = EPI_OFF + 2 * EPI_FLOATS * 4;
    /* knob gemm_probe = 4 (benchmark): CTA 0's consumers' clock at 4 points of each of
     * their first TL_REC K-tiles (per-group scales only) */
    static constexpr int TL_REC = 128;
    static constexpr int TL_OFF = BARS_OFF + (2 * STAGES + 4) * 8;
    static constexpr int SMEM = 1024 + TL_OFF + (PROMOTE ? 2 * TL_REC * 4 * 4 : 0);
    static_assert(SMEM <= 227 * 1024, "more than sm_90's 227 KB of shared memory a block");
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CQ_SM90_DEVICE 1
#endif

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1, uint32_t bar) {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
                 ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef CQ_SM90_DEVICE
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef CQ_SM90_DEVICE
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
#ifdef CQ_SM90_DEVICE
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* keeps the compiler from moving accumulator registers across async wgmma */
template <int R> __device__ __forceinline__ void fence_regs(int (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++)
        asm volatile("" : "+r"(d[i])::"memory");
}

/* shared -> global by the bulk tensor copy engine (asynchronous; bulk_group completion) */
__device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, uint32_t src, int c0, int c1) {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
/* this thread's bulk stores have read their shared memory (it may be written again) */
__device__ __forceinline__ void bulk_wait_read() {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}
/* this thread's shared-memory writes, visible to the bulk copy engine */
__device__ __forceinline__ void fence_async_shared() {
#ifdef CQ_SM90_DEVICE
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* byte offset of y's (row r, column c) in the staged tile (Sm90Cfg: 64-column boxes,
 * 128-byte rows, 16-byte chunks swizzled by r % 8) */
__device__ __forceinline__ int stg_offset(int r, int c) {
    return (c >> 6) * (SM90_BM * 128) + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4) + ((c & 7) << 1);
}

/* true in one lane of the (converged) warp; needs no lane index in a register (the
 * promotion kernels' consumers have none to spare with the K split: lane spilled) */
__device__ __forceinline__ bool elect_one() {
    uint32_t one = 0;
#ifdef CQ_SM90_DEVICE
    asm volatile("{\n.reg .pred p;\nelect.sync _|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(one));
#endif
    return one != 0;
}

/* the two consumer warpgroups (threads 128..383) only */
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

/* shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 B apart */
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(16 >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

template <int BN> __device__ __forceinline__ void wgmma_tile(int (&d)[BN / 2], uint64_t da, uint64_t db, int scale_d);
template <> __device__ __forceinline__ void wgmma_tile<128>(int (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    wgmma_m64n128k32_s8(d, da, db, scale_d);
}
template <> __device__ __forceinline__ void wgmma_tile<192>(int (&d)[96], uint64_t da, uint64_t db, int scale_d) {
    wgmma_m64n192k32_s8(d, da, db, scale_d);
}
template <> __device__ __forceinline__ void wgmma_tile<256>(int (&d)[128], uint64_t da, uint64_t db, int scale_d) {
    wgmma_m64n256k32_s8(d, da, db, scale_d);
}

/* mbarrier arrive on the barrier at the same shared-memory offset in cluster CTA `cta` */
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
#ifdef CQ_SM90_DEVICE
    asm volatile("{\n.reg .b32 remote;\n"
                 "mapa.shared::cluster.u32 remote, %0, %1;\n"
                 "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
                 "r"(cta)
                 : "memory");
#endif
}
/* the box lands at the same offset in every CTA of `mask`, each CTA's mbarrier there
 * is credited with the bytes it receives */
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                                      uint32_t bar, uint16_t mask) {
#ifdef CQ_SM90_DEVICE
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%4, %5}], [%2], %3;\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "h"(mask), "r"(c0), "r"(c1)
                 : "memory");
#endif
}
__device__ __forceinline__ void cluster_sync_all() {
#ifdef CQ_SM90_DEVICE
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

/* The K split of the last, partly filled round of tiles (the persistent grid of G CTAs,
 * work w on CTA w % G). Works 0 .. dp - 1 (dp a multiple of G) are whole
 * tiles; then the r tail tiles dp .. dp + r - 1 are each split into s K parts, item
 * part * r + t (work dp + item, so on CTA item) being part `part` of tail tile t. Every
 * CTA's item comes after its whole tiles, all at once, so the parts run side by side, and
 * they read the same K-tiles of A and B at about the same time, as whole tiles do. Part 0
 * adds the sums of parts 1 .. s - 1 from their slots (int32, or with per-group scales the
 * promoted float32) and stores y. No split: dp = ntiles, r = 1, s = 0. */
struct TailSplit {
    int dp, r, s;
    int *part;  /* [r * s items][BN / 8 pieces][256 consumer threads][4 registers] int32 (or float32 bits) */
    int *flags; /* [r * s items], zero at the launch, 1 when the item's slot is written */
};

__device__ __forceinline__ void flag_release(int *f) {
#ifdef CQ_SM90_DEVICE
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(f), "r"(1) : "memory");
#endif
}
__device__ __forceinline__ void flag_wait(const int *f) {
#ifdef CQ_SM90_DEVICE
    int v = 0;
    do {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(f) : "memory");
    } while (v == 0);
#endif
}

/* Persistent: a CTA takes tiles tile0, tile0 + step, ... (M-tile fastest, so the CTAs
 * at work together share B tiles in L2); the stage and barrier phases run on across
 * tiles, so the producer loads the next tile's first stages while the consumers store
 * this one. Producer warp 2 stages each tile's epilogue scales and bias in one of two
 * shared-memory buffers (epi_full / epi_empty), away from the consumers' path.
 * MCAST: two CTAs of a cluster take neighbouring 128-row tiles of xq and the same BN
 * columns of wq, one tile each (grid = all tiles); each loads its own A and one half of
 * B, multicast to both, which halves the L2 -> SM traffic of B. A stage is then refilled
 * only after the consumers of both CTAs released it (empty count 16). */
template <typename T, int BN, bool PROMOTE, bool XS_GROUPED, bool MCAST, bool NARROW>
__global__ void __launch_bounds__(384, 1)
gemm_int8_wgmma(const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmB,
                const __grid_constant__ CUtensorMap tmY, const float *__restrict__ xs, const float *__restrict__ ws,
                const T *__restrict__ bias, T *__restrict__ y, int64_t M, int64_t N, int64_t K, int64_t xs_groups,
                int64_t gn, int64_t gk, int mt_eff, int y_bulk, int probe, TailSplit tail) {
#ifdef CQ_SM90_DEVICE
    using Cfg = Sm90Cfg<BN, PROMOTE, NARROW>;
    constexpr int STG_BOXES = Cfg::STG_BOXES;
    constexpr int STAGES = Cfg::STAGES, A_BYTES = Cfg::A_BYTES, B_BYTES = Cfg::B_BYTES, HALF_B = BN / 2;
    constexpr int EPI_FLOATS = Cfg::EPI_FLOATS;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = s_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u; /* swizzled tiles need 1024-byte alignment */
    uint8_t *gbase = smem_raw + (base - raw);     /* same offset in both CTAs: same dynamic smem layout */
    const uint32_t sA = base, sB = base + STAGES * A_BYTES;
    float *wsm = reinterpret_cast<float *>(gbase + STAGES * (A_BYTES + B_BYTES)); /* [STAGES][WS_FLOATS] */
    constexpr int WS_FLOATS = Cfg::WS_FLOATS;
    uint8_t *stg = gbase + Cfg::STG_OFF;
    const uint32_t stg_s = base + Cfg::STG_OFF;
    float *epi = reinterpret_cast<float *>(gbase + Cfg::EPI_OFF);
    const uint32_t bars = base + Cfg::BARS_OFF;
    uint32_t *tl = reinterpret_cast<uint32_t *>(gbase + Cfg::TL_OFF); /* probe 4's timeline */
    auto full = [&](int s) { return bars + 8u * s; };
    auto empty = [&](int s) { return bars + 8u * (STAGES + s); };
    auto epi_full = [&](int b) { return bars + 8u * (2 * STAGES + b); };
    auto epi_empty = [&](int b) { return bars + 8u * (2 * STAGES + 2 + b); };

    const int tid = threadIdx.x, wg = tid >> 7, warp = tid >> 5, lane = tid & 31;
    const uint32_t rank = MCAST ? blockIdx.x & 1u : 0u; /* cluster (2, 1, 1) */
    const int tile0 = (int)(blockIdx.y * gridDim.x + blockIdx.x), step = (int)(gridDim.x * gridDim.y);
    const int ktiles = (int)((K + SM90_BK - 1) / SM90_BK);
    const int64_t kb = (K + gk - 1) / gk;
    /* work w -> its tile's first row and column (M-tile fastest) and K-tiles [kt0, kt1);
     * item >= 0 for a K-split item of the tail */
    struct Work {
        int64_t m0, n0;
        int kt0, kt1, item;
    };
    const int nworks = tail.dp + tail.r * tail.s;
    auto work = [&](int w) {
        Work k{0, 0, 0, ktiles, -1};
        int tile = w;
        if (w >= tail.dp) {
            k.item = w - tail.dp;
            const int part = k.item / tail.r;
            tile = tail.dp + k.item % tail.r;
            k.kt0 = part * ktiles / tail.s;
            k.kt1 = (part + 1) * ktiles / tail.s;
        }
        k.m0 = (int64_t)(tile % mt_eff) * SM90_BM;
        k.n0 = (int64_t)(tile / mt_eff) * BN;
        return k;
    };

    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full(s), 1 + (PROMOTE ? 32 : 0) + (PROMOTE && XS_GROUPED ? 32 : 0));
            mbar_init(empty(s), MCAST ? 16 : 8);
        }
        for (int b = 0; b < 2; b++) {
            mbar_init(epi_full(b), 32);
            mbar_init(epi_empty(b), 256);
        }
        mbar_init_fence();
    }
    if (MCAST)
        cluster_sync_all();
    else
        __syncthreads();
    /* launched early after the activation quantize (PDL): until here the previous kernel may
     * still run; xq, xs, the workspace and y's memory are its, or ready, after the wait */
    pdl_wait();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (warp == 0 && lane == 0) {
            int it = 0;
            for (int w = tile0; w < nworks; w += step) {
                const auto [m0, n0, kt0, kt1, item] = work(w);
                for (int kt = kt0; kt < kt1; kt++, it++) {
                    const int s = it % STAGES;
                    mbar_wait(empty(s), ((uint32_t)(it / STAGES) & 1u) ^ 1u);
                    mbar_expect_tx(full(s), A_BYTES + B_BYTES);
                    tma_load_2d(sA + s * A_BYTES, &tmA, kt * SM90_BK, (int)m0, full(s));
                    if (MCAST)
                        tma_load_2d_multicast(sB + s * B_BYTES + rank * HALF_B * SM90_BK, &tmB, kt * SM90_BK,
                                              (int)(n0 + rank * HALF_B), full(s), (uint16_t)3);
                    else
                        tma_load_2d(sB + s * B_BYTES, &tmB, kt * SM90_BK, (int)n0, full(s));
                }
            }
        } else if (PROMOTE && (warp == 1 || (XS_GROUPED && warp == 3))) {
            /* Each stage's scales for the consumers' promotion, staged as the stage's K-group
             * comes: warp 1 the BN columns' weight scales; warp 3 (blockwise: per-group token
             * scales) the tile's 128 rows' token scales, which the consumers' own loads cost
             * 0.03-0.07 ms of ~0.4 at 3072 -> 12288 (runs 61-62). Two warps, as warp 1's 40
             * registers had no room for both. per_work(m0, n0) returns fill(stage scales, g). */
            auto stage_scales = [&](auto &&per_work) {
                int it = 0;
                for (int w = tile0; w < nworks; w += step) {
                    const auto [m0, n0, kt0, kt1, item] = work(w);
                    auto fill = per_work(m0, n0);
                    /* K-group of tile kt, without a division a tile */
                    int64_t g = (int64_t)kt0 * SM90_BK / gk, k_next = (g + 1) * gk;
                    for (int kt = kt0; kt < kt1; kt++, it++) {
                        const int s = it % STAGES;
                        if ((int64_t)kt * SM90_BK >= k_next) {
                            g++;
                            k_next += gk;
                        }
                        mbar_wait(empty(s), ((uint32_t)(it / STAGES) & 1u) ^ 1u);
                        fill(wsm + s * WS_FLOATS, g);
                        mbar_arrive(full(s));
                    }
                }
            };
            if (warp == 1) {
                stage_scales([&](int64_t, int64_t n0) {
                    const float *wcol[BN / 32]; /* this lane's columns' scale rows */
#pragma unroll
                    for (int i = 0; i < BN / 32; i++) {
                        const int64_t n = n0 + lane + 32 * i;
                        wcol[i] = n < N ? ws + (n / gn) * kb : nullptr;
                    }
                    return [=](float *st, int64_t g) {
#pragma unroll
                        for (int i = 0; i < BN / 32; i++)
                            st[lane + 32 * i] = wcol[i] ? __ldg(wcol[i] + g) : 0.0f;
                    };
                });
            } else {
                stage_scales([&](int64_t m0, int64_t) {
                    const int rows = M - m0 < SM90_BM ? (int)(M - m0) : SM90_BM;
                    const float *xt = xs + m0 * xs_groups;
                    return [=](float *st, int64_t g) {
#pragma unroll
                        for (int i = 0; i < SM90_BM / 32; i++) { /* rows past M: 0 (never stored) */
                            const int r = lane + 32 * i;
                            st[BN + r] = r < rows ? __ldg(xt + g + r * (int)xs_groups) : 0.0f;
                        }
                    };
                });
            }
        } else if (warp == 2) {
            int lt = 0;
            for (int w = tile0; w < nworks; w += step, lt++) {
                const int b = lt & 1;
                const auto [m0, n0, kt0, kt1, item] = work(w);
                mbar_wait(epi_empty(b), ((uint32_t)(lt >> 1) & 1u) ^ 1u);
                float *e = epi + b * EPI_FLOATS;
                for (int c = lane; c < BN; c += 32) {
                    const int64_t n = n0 + c < N ? n0 + c : N - 1;
                    e[c] = PROMOTE ? 1.0f : __ldg(ws + (gn == 1 ? n : n / gn));
                    e[BN + c] = bias ? to_f32(bias[n]) : 0.0f;
                }
                for (int r = lane; r < SM90_BM; r += 32) {
                    const int64_t m = m0 + r < M ? m0 + r : M - 1;
                    e[2 * BN + r] = XS_GROUPED ? 1.0f : __ldg(xs + m * xs_groups);
                }
                mbar_arrive(epi_full(b));
            }
        }
        __syncwarp();
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int cw = wg - 1, wl = warp & 3, t = lane & 3;
        const int r0 = cw * 64 + wl * 16 + (lane >> 2); /* tile row of register set h = 0; and r0 + 8 */
        const int tiles_per_group = PROMOTE ? (int)(gk / SM90_BK) : 1;
        auto release = [&](int s) { /* this warp is done with stage s, in both CTAs */
            __syncwarp();
            if (MCAST && lane < 2)
                mbar_arrive_cluster(empty(s), (uint32_t)lane);
            else if (!MCAST && elect_one())
                mbar_arrive(empty(s));
        };
        auto issue = [&](int (&d)[BN / 2], int s, bool accumulate) {
            wgmma_fence();
            fence_regs(d);
#pragma unroll
            for (int kk = 0; kk < SM90_BK / 32; kk++) {
                const uint64_t da = smem_desc(sA + s * A_BYTES + cw * 64 * SM90_BK + kk * 32);
                const uint64_t db = smem_desc(sB + s * B_BYTES + kk * 32);
                wgmma_tile<BN>(d, da, db, (accumulate || kk > 0) ? 1 : 0);
            }
            wgmma_commit(); /* d is touched again only after a wait covers this group */
        };
        int acc[BN / 2];
        float accf[PROMOTE ? BN / 2 : 1];
        const bool storer = tid == 128; /* issues the bulk stores of y and waits for them */
        int it = 0, lt = 0;
        for (int w = tile0; w < nworks; w += step, lt++) {
            const auto [m0, n0, kt0, kt1, item] = work(w);
            if constexpr (!PROMOTE) {
                int s = 0;
                for (int kt = kt0; kt < kt1; kt++, it++) {
                    s = it % STAGES;
                    mbar_wait(full(s), (uint32_t)(it / STAGES) & 1u);
                    issue(acc, s, kt > kt0);
                    wgmma_wait<1>(); /* the previous tile's MMAs are done: release its stage */
                    fence_regs(acc);
                    if (kt > kt0)
                        release((it - 1) % STAGES);
                }
                wgmma_wait<0>();
                fence_regs(acc);
                release(s);
            } else {
                /* Promotion: at the end of each K-group the group's int32 sums become
                 * float32 with its scale. A warpgroup waits for its own MMAs, then
                 * promotes while the other warpgroup's MMAs run. What bounds it (run 126,
                 * the probe-4 timeline, 3072 -> 12288): a K-tile takes ~1550 cycles, where
                 * its MMAs need 768 (~800 without the promotion): a warpgroup's own chain,
                 * MMAs ~400, promotion ~600 (~350 of it without its scale loads), release
                 * to the next issue ~450, is far longer than the other warpgroup's ~384
                 * cycles of MMAs. The columns in two halves, one half's MMAs running
                 * while the other is promoted (runs 127-130), were no faster: the
                 * promotion's ~216 instructions a warp issue at ~2.8 cycles each. (Two
                 * int32 sets at 128 wide: slower, run 61; turns, a third warpgroup, a
                 * magic-number conversion: runs 19-20, 49-52.) */
                /* Block scales (per-group token scales, weight blocks gn wide, gn a multiple
                 * of 64 and >= 128): the tile's first wsplit columns lie in one weight block
                 * and the rest in the next; wsplit is 64, 128 or >= BN (n0 and gn are
                 * multiples of 64), so three unrolled copies with the block boundary known
                 * need four products of token and weight scales a group and no select (run
                 * 62: with a select per 8 columns, ptxas multiplied per 8 columns) */
                const bool two_blocks = XS_GROUPED && gn % 64 == 0 && gn >= 128;
                const int wsplit = two_blocks ? (int)(gn - n0 % gn) : BN;
                /* accf += acc x the group's scales (knob gemm_probe, benchmarks only: 1
                 * leaves the promotion out) */
                auto promote = [&](const float *wst) {
                    auto split = [&](auto split_c) {
                        constexpr int SPLIT = decltype(split_c)::value; /* columns in the first block */
                        const float xg0 = wst[BN + r0], xg1 = wst[BN + r0 + 8];
                        const float wa = wst[0], wb = wst[SPLIT < BN ? SPLIT : BN - 1];
                        const float sa0 = xg0 * wa, sa1 = xg1 * wa, sb0 = xg0 * wb, sb1 = xg1 * wb;
#pragma unroll
                        for (int i = 0; i < BN / 8; i++) {
                            const float s0 = 8 * i < SPLIT ? sa0 : sb0, s1 = 8 * i < SPLIT ? sa1 : sb1;
                            accf[4 * i + 0] = fmaf((float)acc[4 * i + 0], s0, accf[4 * i + 0]);
                            accf[4 * i + 1] = fmaf((float)acc[4 * i + 1], s0, accf[4 * i + 1]);
                            accf[4 * i + 2] = fmaf((float)acc[4 * i + 2], s1, accf[4 * i + 2]);
                            accf[4 * i + 3] = fmaf((float)acc[4 * i + 3], s1, accf[4 * i + 3]);
                        }
                    };
                    if (probe & 1)
                        return;
                    if (two_blocks) {
                        if (wsplit == 64)
                            split(std::integral_constant<int, 64>());
                        else if (wsplit == 128)
                            split(std::integral_constant<int, 128>());
                        else
                            split(std::integral_constant<int, BN>());
                        return;
                    }
                    const float xg0 = XS_GROUPED ? wst[BN + r0] : 1.0f;
                    const float xg1 = XS_GROUPED ? wst[BN + r0 + 8] : 1.0f;
#pragma unroll
                    for (int i = 0; i < BN / 8; i++) {
                        const float2 w2 = *reinterpret_cast<const float2 *>(wst + 8 * i + 2 * t);
                        const float s00 = XS_GROUPED ? xg0 * w2.x : w2.x, s01 = XS_GROUPED ? xg0 * w2.y : w2.y;
                        const float s10 = XS_GROUPED ? xg1 * w2.x : w2.x, s11 = XS_GROUPED ? xg1 * w2.y : w2.y;
                        accf[4 * i + 0] = fmaf((float)acc[4 * i + 0], s00, accf[4 * i + 0]);
                        accf[4 * i + 1] = fmaf((float)acc[4 * i + 1], s01, accf[4 * i + 1]);
                        accf[4 * i + 2] = fmaf((float)acc[4 * i + 2], s10, accf[4 * i + 2]);
                        accf[4 * i + 3] = fmaf((float)acc[4 * i + 3], s11, accf[4 * i + 3]);
                    }
                };
#pragma unroll
                for (int i = 0; i < BN / 2; i++)
                    accf[i] = 0.0f;
                /* probe 4: the first warp of each consumer warpgroup of CTA 0 stamps 4 points
                 * of each K-tile (bench/w8a8_parts.py --timeline names them) */
                const bool tl_rec = (probe & 4) && blockIdx.x == 0 && wl == 0 && lane == 0;
                auto stamp = [&](int j) {
                    if (tl_rec && it < Cfg::TL_REC) {
                        uint32_t c;
                        asm volatile("mov.u32 %0, %%clock;\n" : "=r"(c)::"memory");
                        tl[(cw * Cfg::TL_REC + it) * 4 + j] = c;
                    }
                };
                /* K-tile kt's place in its group, kept without a division a K-tile; a K part
                 * may start or end inside a group: its share of the group's sum takes the
                 * group's scale all the same */
                int in_group = kt0 % tiles_per_group;
                auto step_group = [&] {
                    if (++in_group == tiles_per_group)
                        in_group = 0;
                };
                for (int kt = kt0; kt < kt1; kt++, it++, step_group()) {
                    const int s = it % STAGES;
                    const bool last = in_group == tiles_per_group - 1 || kt == kt1 - 1;
                    mbar_wait(full(s), (uint32_t)(it / STAGES) & 1u);
                    stamp(0); /* stage ready */
                    issue(acc, s, in_group > 0 && kt > kt0);
                    stamp(1); /* MMAs issued */
                    wgmma_wait<0>();
                    fence_regs(acc);
                    stamp(2); /* MMAs done */
                    if (last)
                        promote(wsm + s * WS_FLOATS);
                    release(s);
                    stamp(3); /* promoted, stage released */
                }
            }

            /* the K split of the tail (tail.s parts a tile): int32 sums, or with the
             * promotion float32 sums (their bits), moved 16 bytes a register quad */
            auto piece = [&](int i) {
                if constexpr (PROMOTE)
                    return make_int4(__float_as_int(accf[4 * i]), __float_as_int(accf[4 * i + 1]),
                                     __float_as_int(accf[4 * i + 2]), __float_as_int(accf[4 * i + 3]));
                else
                    return make_int4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
            };
            auto add_piece = [&](int i, int4 v) {
                if constexpr (PROMOTE) {
                    accf[4 * i] += __int_as_float(v.x);
                    accf[4 * i + 1] += __int_as_float(v.y);
                    accf[4 * i + 2] += __int_as_float(v.z);
                    accf[4 * i + 3] += __int_as_float(v.w);
                } else {
                    acc[4 * i] += v.x;
                    acc[4 * i + 1] += v.y;
                    acc[4 * i + 2] += v.z;
                    acc[4 * i + 3] += v.w;
                }
            };
            if (item >= tail.r) {
                /* a later K part of a tail tile: its sums to this item's slot (4
                 * registers a 16-byte piece, pieces thread-minor, so a warp's stores
                 * are 512 contiguous bytes), then the flag; the epilogue buffer is
                 * taken and handed back unused */
                int4 *slot = reinterpret_cast<int4 *>(tail.part + (size_t)item * (BN / 2) * 256) + (tid - 128);
#pragma unroll
                for (int i = 0; i < BN / 8; i++)
                    __stcg(slot + i * 256, piece(i));
                __threadfence();
                const int b = lt & 1;
                mbar_wait(epi_full(b), (uint32_t)(lt >> 1) & 1u);
                mbar_arrive(epi_empty(b));
                consumers_sync();
                if (tid == 128)
                    flag_release(tail.flags + item);
                continue;
            }
            if (item >= 0) {
                /* the first K part of a tail tile: add the later parts' sums (int32:
                 * the same bits as one CTA's; float32: in part order, the same bits
                 * every call); they were computed first thing by CTAs that are
                 * resident (one a multiprocessor), so the wait is short */
                if (tid == 128)
                    for (int part = 1; part < tail.s; part++)
                        flag_wait(tail.flags + item + part * tail.r);
                consumers_sync();
                __threadfence();
                for (int part = 1; part < tail.s; part++) {
                    const int4 *slot =
                        reinterpret_cast<const int4 *>(tail.part + (size_t)(item + part * tail.r) * (BN / 2) * 256) +
                        (tid - 128);
#pragma unroll
                    for (int i = 0; i < BN / 8; i++)
                        add_piece(i, __ldcg(slot + i * 256));
                }
            }
            /* Epilogue. Register 4i + 2h + e holds (r0 + 8h, 8i + 2t + e) of the tile. The
             * scaled tile is staged in shared memory, then the bulk copy engine stores it
             * while the consumers go on to the next tile's MMAs. (Stored by the consumers,
             * all CTAs stored at once and the tensor cores waited: at ~2 TB/s of writes
             * that was ~4 us a tile round: docs/CUDA_NOTES.md, run 10.) */
            const int b = lt & 1;
            const float *e = epi + b * EPI_FLOATS;
            mbar_wait(epi_full(b), (uint32_t)(lt >> 1) & 1u);
            const float x_s[2] = {e[2 * BN + r0], e[2 * BN + r0 + 8]};
            /* STG_BOXES 64-column boxes at a time (all of them, or one with NARROW) */
#pragma unroll
            for (int bg = 0; bg < BN / 64; bg += STG_BOXES) {
                if (storer)
                    bulk_wait_read(); /* the previous store has left stg */
                consumers_sync();     /* ... and every consumer has copied it out (no-bulk path) */
#pragma unroll
                for (int i = 8 * bg; i < 8 * (bg + STG_BOXES); i++) {
                    const int cl = 8 * i + 2 * t; /* tile column */
                    const float2 w_s = *reinterpret_cast<const float2 *>(e + cl);
                    const float2 bb = *reinterpret_cast<const float2 *>(e + BN + cl);
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        float v[2];
#pragma unroll
                        for (int q = 0; q < 2; q++) {
                            if constexpr (PROMOTE)
                                v[q] = XS_GROUPED ? accf[4 * i + 2 * h + q] : accf[4 * i + 2 * h + q] * x_s[h];
                            else
                                v[q] = __fmul_rn((float)acc[4 * i + 2 * h + q], __fmul_rn(x_s[h], q ? w_s.y : w_s.x));
                            if (bias)
                                v[q] = __fadd_rn(v[q], q ? bb.y : bb.x);
                        }
                        *reinterpret_cast<uint32_t *>(stg + stg_offset(r0 + 8 * h, cl - 64 * bg)) =
                            pack2<T>(v[0], v[1]);
                    }
                }
                if (bg + STG_BOXES >= BN / 64)
                    mbar_arrive(epi_empty(b)); /* e read for the last time */
                fence_async_shared();
                consumers_sync();
                if (y_bulk) { /* the tensor map clips rows >= M and columns >= N */
                    if (storer) {
#pragma unroll
                        for (int box = bg; box < bg + STG_BOXES; box++)
                            if (n0 + 64 * box < N)
                                tma_store_2d(&tmY, stg_s + (box - bg) * (SM90_BM * 128), (int)(n0 + 64 * box),
                                             (int)m0);
                        bulk_commit();
                    }
                } else {
                    /* N % 8 != 0 or y not 16-byte aligned (no tensor map): 16-byte pieces of
                     * the staged rows, a warp per 32 consecutive pieces, element by element */
                    constexpr int PIECES = 8 * STG_BOXES;
                    for (int c = tid - 128; c < SM90_BM * PIECES; c += 256) {
                        const int r = c / PIECES, j = c - r * PIECES;
                        const int64_t grow = m0 + r, gcol = n0 + 64 * bg + 8 * j;
                        if (grow >= M || gcol >= N)
                            continue;
                        const uint4 piece = *reinterpret_cast<const uint4 *>(stg + stg_offset(r, 8 * j));
                        const uint32_t words[4] = {piece.x, piece.y, piece.z, piece.w};
                        uint16_t *d16 = reinterpret_cast<uint16_t *>(y + grow * N + gcol);
#pragma unroll
                        for (int q = 0; q < 8; q++)
                            if (gcol + q < N)
                                d16[q] = (uint16_t)(words[q >> 1] >> (16 * (q & 1)));
                    }
                }
            }
        }
        if (storer)
            bulk_wait_all(); /* stg must outlive the last store */
        if (PROMOTE && (probe & 4) && blockIdx.x == 0 && M >= 16 && N >= 192 && N % 2 == 0) {
            /* the timeline over the stored tile 0 (CTA 0's first work): 96 words a row of y */
            consumers_sync();
            for (int i = tid - 128; i < 2 * Cfg::TL_REC * 4; i += 256)
                reinterpret_cast<uint32_t *>(y + (int64_t)(i / 96) * N)[i % 96] = tl[i];
        }
    }
    /* the peer may still arrive on this CTA's barriers: leave together */
    if (MCAST) {
        __syncwarp();
        cluster_sync_all();
    }
#endif
}

/* ---------------------------------------------------------------- host side */
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    if (!fn) {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }
    return fn;
}

/* rows x K int8, row-major: boxes of box_rows x 128 bytes, 128-byte swizzle, zeros
 * outside the tensor */
static int make_map(CUtensorMap *map, const int8_t *p, int64_t rows, int64_t K, int box_rows) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) {
        set_error_msg("gemm_int8 (sm90)", "the driver has no cuTensorMapEncodeTiled");
        return CQ_ECUDA;
    }
    cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)K};
    cuuint32_t box[2] = {(cuuint32_t)SM90_BK, (cuuint32_t)box_rows};
    cuuint32_t elem[2] = {1, 1};
    CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t *>(p), dims, strides, box, elem,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        set_error_msg("gemm_int8 (sm90)", "cuTensorMapEncodeTiled failed");
        return CQ_ECUDA;
    }
    return CQ_OK;
}

/* y [M, N] 16-bit, row-major: boxes of 128 rows x 64 columns (128 bytes), 128-byte
 * swizzle, for the bulk stores of the epilogue; needs 16-byte row strides and base */
template <typename T> static int make_map_y(CUtensorMap *map, T *y, int64_t M, int64_t N) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) {
        set_error_msg("gemm_int8 (sm90)", "the driver has no cuTensorMapEncodeTiled");
        return CQ_ECUDA;
    }
    cuuint64_t dims[2] = {(cuuint64_t)N, (cuuint64_t)M};
    cuuint64_t strides[1] = {(cuuint64_t)N * 2};
    cuuint32_t box[2] = {64, (cuuint32_t)SM90_BM};
    cuuint32_t elem[2] = {1, 1};
    const CUtensorMapDataType dt =
        std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    CUresult r = encode(map, dt, 2, static_cast<void *>(y), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        set_error_msg("gemm_int8 (sm90)", "cuTensorMapEncodeTiled failed (y)");
        return CQ_ECUDA;
    }
    return CQ_OK;
}

template <typename T, int BN, bool PROMOTE, bool XS_GROUPED, bool MCAST, bool NARROW = false>
static int run_wgmma(const GemmInt8Args<T> &a, int sms, cudaStream_t stream) {
    using Cfg = Sm90Cfg<BN, PROMOTE, NARROW>;
    auto kernel = gemm_int8_wgmma<T, BN, PROMOTE, XS_GROUPED, MCAST, NARROW>;
    static unsigned long long smem_set; /* bit per device (raise_smem_limit) */
    int st0 = raise_smem_limit(reinterpret_cast<const void *>(kernel), Cfg::SMEM, &smem_set,
                               "gemm_int8 (sm90) shared memory");
    if (st0)
        return st0;
    CUtensorMap ma, mb;
    int st = make_map(&ma, a.xq, a.M, a.K, SM90_BM);
    if (!st)
        st = make_map(&mb, a.wq, a.N, a.K, MCAST ? BN / 2 : BN); /* with multicast each CTA of a pair loads half of B */
    if (st)
        return st;
    CUtensorMap my;
    memset(&my, 0, sizeof(my));
    const int y_bulk = a.N % 8 == 0 && (reinterpret_cast<uintptr_t>(a.y) & 15u) == 0;
    if (y_bulk && (st = make_map_y<T>(&my, a.y, a.M, a.N)) != CQ_OK)
        return st;
    const unsigned mt = (unsigned)((a.M + SM90_BM - 1) / SM90_BM), nt = (unsigned)((a.N + BN - 1) / BN);
    const unsigned mt_eff = MCAST ? mt + (mt & 1u) : mt; /* whole pairs */
    const int ntiles = (int)(mt_eff * nt);
    int grid = ntiles < sms ? ntiles : sms;
    TailSplit tail{ntiles, 1, 0, nullptr, nullptr};
    if (!MCAST && knob(KNOB_GEMM_TAIL) != 1) {
        /* The tiles of a partly filled round, each split into s K parts so that r * s CTAs
         * share them: the last round of several (M = 4608: 3072 x 3072 and 12288 x 3072
         * have 432 tiles, 3 rounds and 36 tiles in 3 parts; docs/CUDA_NOTES.md, runs 53-56;
         * per-group scales, 192 wide: 12288 x 3072 576 tiles, 48 in 2 parts, run 64), or the
         * only one when there are fewer tiles than SMs (M = 256, 12288 x 3072: 24 tiles in
         * 5 parts, on 120 SMs instead of 24). */
        const int ktiles = (int)((a.K + SM90_BK - 1) / SM90_BK);
        const int r = ntiles > sms ? ntiles % sms : ntiles;
        int s = r ? sms / r : 0;
        /* parts of at least 8 K-tiles: part 0 reads each later part's 128 KB of sums
         * from L2 in turn, ~1 us a part (3072 -> 12288 at M = 4608 in 11 parts of 2-3
         * K-tiles gained nothing: run 53) */
        s = s < ktiles / 8 ? s : ktiles / 8;
        const int64_t slots = (int64_t)r * s;
        if (r && s >= 2 && a.workspace && (reinterpret_cast<uintptr_t>(a.workspace) & 15u) == 0 &&
            a.workspace_bytes >= slots * (BN / 2) * 256 * 4 + slots * 4) {
            tail.dp = ntiles - r;
            tail.r = r;
            tail.s = s;
            tail.part = static_cast<int *>(a.workspace);
            tail.flags = tail.part + slots * (BN / 2) * 256;
            CQ_CUDA_TRY(cudaMemsetAsync(tail.flags, 0, (size_t)slots * 4, stream), "gemm_int8 (sm90) flags");
            if (tail.dp == 0)
                grid = (int)slots; /* one work a CTA */
        }
    }
    if (knob(KNOB_GEMM_TAIL) == 2 && tail.s == 0)
        return CQ_EUNSUPPORTED; /* the split was required (tests) but does not apply */
    /* early (PDL) after the activation quantize where the scales are per row: the op 2-7%
     * faster at M = 4608 (runs 76-78). With per-group scales (PROMOTE) the same launch made
     * the GEMM alone and the op 1-6% slower in the same runs, for a reason not found. */
    /* multicast: a CTA a tile, in pairs; else one persistent CTA an SM */
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = cluster_launch_config(MCAST ? dim3(mt_eff, nt, 1) : dim3((unsigned)grid, 1, 1),
                                                         384, Cfg::SMEM, stream, MCAST ? 2 : 1, attr, !PROMOTE);
    CQ_CUDA_TRY(cudaLaunchKernelEx(&cfg, kernel, ma, mb, my, a.xs, a.ws, a.bias, a.y, a.M, a.N, a.K, a.xs_groups,
                                   a.gn, a.gk, (int)mt_eff, y_bulk, knob(KNOB_GEMM_PROBE), tail),
                "gemm_int8 (sm90)");
    return check_launch("gemm_int8 (sm90)");
}

bool gemm_int8_sm90_supported(int64_t M, int64_t N, int64_t K, int64_t gk) {
    /* TMA: 16-byte row strides, int32 coordinates; int32 sums: 127^2 K < 2^31 */
    return K % 16 == 0 && K <= 131072 && M < INT32_MAX && N < INT32_MAX && (M + SM90_BM - 1) / SM90_BM <= INT32_MAX &&
           (N + 127) / 128 <= 65535 && ((M + SM90_BM - 1) / SM90_BM + 1) * ((N + 127) / 128) < INT32_MAX &&
           (gk >= K || gk % SM90_BK == 0);
}

template <typename T>
int gemm_int8_sm90(const DeviceInfo &dev, const GemmInt8Args<T> &a, cudaStream_t stream) {
    if constexpr (sizeof(T) != 2) {
        return CQ_EUNSUPPORTED;
    } else {
        /* multicast of B over CTA pairs (knob 5): fewer L2 reads, but it measured slower
         * on H100/H200 (docs/CUDA_NOTES.md), so one CTA per tile is the default */
        if (knob(KNOB_GEMM_INT8) == 5) {
            if (a.gk >= a.K)
                return run_wgmma<T, 256, false, false, true>(a, dev.sms, stream);
            if (a.xs_groups > 1)
                return run_wgmma<T, 128, true, true, true>(a, dev.sms, stream);
            return run_wgmma<T, 128, true, false, true>(a, dev.sms, stream);
        }
        if (a.gk >= a.K) {
            /* 4 stages with y stored box by box where K is long (run 58: 12288 x 3072 5-6%
             * faster), 3 stages with the whole tile of y staged where it is short (the
             * box-by-box epilogue's waits cost 0-4% at K = 3072); knob gemm_stages forces
             * 3 or 4 */
            const int forced = knob(KNOB_GEMM_STAGES);
            if (forced == 4 || (forced != 3 && a.K >= 8192))
                return run_wgmma<T, 256, false, false, false, true>(a, dev.sms, stream);
            return run_wgmma<T, 256, false, false, false, false>(a, dev.sms, stream);
        }
        /* per-group scales: 192-wide tiles, one int32 set, each warpgroup waiting for its
         * MMAs before it promotes (run 9: faster than 128 wide; run 61: also faster than
         * 128 wide with two int32 sets, each group promoted under the next one's MMAs) */
        if (a.xs_groups > 1)
            return run_wgmma<T, 192, true, true, false>(a, dev.sms, stream);
        return run_wgmma<T, 192, true, false, false>(a, dev.sms, stream);
    }
}

#else /* built without an sm_90a target */

bool gemm_int8_sm90_supported(int64_t, int64_t, int64_t, int64_t) { return false; }
template <typename T> int gemm_int8_sm90(const DeviceInfo &, const GemmInt8Args<T> &, cudaStream_t) {
    return CQ_EUNSUPPORTED;
}

#endif

template int gemm_int8_sm90<float>(const DeviceInfo &, const GemmInt8Args<float> &, cudaStream_t);
template int gemm_int8_sm90<__half>(const DeviceInfo &, const GemmInt8Args<__half> &, cudaStream_t);
template int gemm_int8_sm90<__nv_bfloat16>(const DeviceInfo &, const GemmInt8Args<__nv_bfloat16> &, cudaStream_t);

} /* namespace cq */
