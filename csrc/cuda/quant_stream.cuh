/* quant_stream.cuh: the streaming quantize kernel of layouts whose groups tile the flat
 * array (group g, a power of two 32..256, has the values [g G, g G + G) and one scale):
 * bnb_nf4 / bnb_fp4, and int8_lodewise where the row width is a multiple of 256.
 *
 * A warp takes items of 256 consecutive values (8 a lane, a group reduces over G / 8
 * lanes) a grid of warps apart, persistent, and keeps the loads of its next
 * STREAM_DEPTH items in flight while it quantizes one. The one-shot kernels (a thread
 * loads, reduces, quantizes, exits) stayed at 41-49% of copy bandwidth on the H200
 * even with 4 loads a thread issued up front: their compute (a binary search or an
 * IEEE division a value) ran between loads instead of under them. */
#ifndef COMFY_QUANT_CUDA_QUANT_STREAM_CUH
#define COMFY_QUANT_CUDA_QUANT_STREAM_CUH

#include "common.cuh"

namespace cq {

constexpr int STREAM_DEPTH = 3;

/* Op: op.setup(table) fills entry threadIdx.x of a 256-entry shared table (blocks of
 * 256 threads), then op(i0, v, lane, table) quantizes the 8 values v of [i0, i0 + 8);
 * every lane of the warp calls it together (it may shuffle). */
template <typename T, typename Op>
__global__ void __launch_bounds__(256)
quant_stream_kernel(const T *__restrict__ x, int64_t items, Op op) {
    pdl_release(); /* a W8A8 GEMM launched early after it may take the SMs it leaves */
    __shared__ float2 table[256];
    op.setup(table);
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    const T *src = x + lane * 8;
    Raw8<T> buf[STREAM_DEPTH];
#pragma unroll
    for (int d = 0; d < STREAM_DEPTH; d++) {
        const int64_t it = warp + d * warps;
        buf[d] = it < items ? load_raw8(src + it * 256) : zero_raw8<T>();
    }
    for (int64_t base = warp; base < items; base += STREAM_DEPTH * warps) {
#pragma unroll
        for (int d = 0; d < STREAM_DEPTH; d++) {
            const int64_t it = base + d * warps;
            if (it >= items) /* the same for the whole warp */
                break;
            float v[8];
            unpack8(buf[d], v);
            const int64_t next = it + STREAM_DEPTH * warps;
            if (next < items)
                buf[d] = load_raw8(src + next * 256);
            op(it * 256 + lane * 8, v, lane, table);
        }
    }
}

/* Blocks of 256 threads for `items`: as many as stay resident on the device at once
 * (the kernel is persistent), fewer for small tensors. `per_sm` is the caller's cache
 * of the occupancy (0 until first asked). */
template <typename Kernel>
static int stream_grid(Kernel kernel, int64_t items, int *per_sm, unsigned *grid, const char *where) {
    DeviceInfo dev;
    int st = device_info(&dev);
    if (st)
        return st;
    int resident = __atomic_load_n(per_sm, __ATOMIC_RELAXED);
    if (resident <= 0) {
        CQ_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, 256, 0), where);
        if (resident <= 0)
            resident = 1;
        __atomic_store_n(per_sm, resident, __ATOMIC_RELAXED);
    }
    const int64_t want = (items + 7) / 8; /* a warp an item */
    const int64_t cap = (int64_t)dev.sms * resident;
    *grid = (unsigned)(want < cap ? want : cap);
    return CQ_OK;
}

} /* namespace cq */

#endif
