/* api.cu: the launcher table that _cuda_kernels.so exports (launch.h), the error
 * message store and the cached device facts. */
#include <stdio.h>
#include <string.h>

#include "launchers.cuh"

namespace cq {

static thread_local char error_message[512];

void set_error_msg(const char *where, const char *msg) {
    snprintf(error_message, sizeof error_message, "%s: %s", where, msg);
}

void set_error(const char *where, cudaError_t err) {
    snprintf(error_message, sizeof error_message, "%s: %s (%s)", where, cudaGetErrorString(err),
             cudaGetErrorName(err));
}

const char *last_error() { return error_message[0] ? error_message : "no CUDA error recorded"; }

/* Facts per device index; filled on first use. A race between two threads fills the
 * same values twice, which is harmless. */
enum { MAX_DEVICES = 64 };
static DeviceInfo device_cache[MAX_DEVICES];
static int device_cached[MAX_DEVICES];

int device_info(DeviceInfo *out) {
    int dev = 0;
    CQ_CUDA_TRY(cudaGetDevice(&dev), "cudaGetDevice");
    if (dev >= 0 && dev < MAX_DEVICES && __atomic_load_n(&device_cached[dev], __ATOMIC_ACQUIRE)) {
        *out = device_cache[dev];
        return CQ_OK;
    }
    DeviceInfo d;
    int major = 0, minor = 0;
    d.index = dev;
    CQ_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "device attribute");
    CQ_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "device attribute");
    CQ_CUDA_TRY(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "device attribute");
    CQ_CUDA_TRY(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                "device attribute");
    d.cc = 10 * major + minor;
    if (dev >= 0 && dev < MAX_DEVICES) {
        device_cache[dev] = d;
        __atomic_store_n(&device_cached[dev], 1, __ATOMIC_RELEASE);
    }
    *out = d;
    return CQ_OK;
}

static int knobs[KNOB_COUNT];

int knob(int which) { return which >= 0 && which < KNOB_COUNT ? __atomic_load_n(&knobs[which], __ATOMIC_RELAXED) : 0; }

static int api_quantize_4bit(const void *x, int x_dtype, uint8_t *packed, float *absmax, int64_t n,
                             int64_t group, int codebook, cq_stream stream) {
    return launch_quantize_4bit(x, x_dtype, packed, absmax, n, group, codebook, (cudaStream_t)stream);
}
static int api_dequantize_4bit(const uint8_t *packed, const float *absmax, void *y, int y_dtype,
                               int64_t n, int64_t group, int codebook, cq_stream stream) {
    return launch_dequantize_4bit(packed, absmax, y, y_dtype, n, group, codebook, (cudaStream_t)stream);
}
static int api_linear_4bit(const void *x, int dtype, const uint8_t *packed, const float *absmax,
                           const void *bias, void *y, int64_t M, int64_t N, int64_t K, int64_t group,
                           int codebook, cq_stream stream) {
    return launch_linear_4bit(x, dtype, packed, absmax, bias, y, M, N, K, group, codebook,
                              (cudaStream_t)stream);
}
static int api_quantize_int8(const void *x, int x_dtype, int8_t *q, float *scale, int64_t N, int64_t K,
                             int64_t gn, int64_t gk, cq_stream stream) {
    return launch_quantize_int8(x, x_dtype, q, scale, N, K, gn, gk, (cudaStream_t)stream);
}
static int api_dequantize_int8(const int8_t *q, const float *scale, void *y, int y_dtype, int64_t N,
                               int64_t K, int64_t gn, int64_t gk, cq_stream stream) {
    return launch_dequantize_int8(q, scale, y, y_dtype, N, K, gn, gk, (cudaStream_t)stream);
}
static int api_gemm_int8(const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
                         const void *bias, void *y, int y_dtype, int64_t M, int64_t N, int64_t K,
                         int64_t xs_groups, int64_t gn, int64_t gk, void *workspace, int64_t workspace_bytes,
                         cq_stream stream) {
    return launch_gemm_int8(xq, xs, wq, ws, bias, y, y_dtype, M, N, K, xs_groups, gn, gk, workspace,
                            workspace_bytes, (cudaStream_t)stream);
}
static int api_linear_int8(const void *x, int dtype, const int8_t *wq, const float *ws, const void *bias,
                           void *y, int64_t M, int64_t N, int64_t K, int64_t gn, int64_t gk,
                           cq_stream stream) {
    return launch_linear_int8(x, dtype, wq, ws, bias, y, M, N, K, gn, gk, (cudaStream_t)stream);
}
static int api_dequantize_absmax(const uint8_t *codes, const float *nested, const float *map, float offset,
                                 float *absmax, int64_t G, cq_stream stream) {
    return launch_dequantize_absmax(codes, nested, map, offset, absmax, G, (cudaStream_t)stream);
}

static const cq_cuda_api api_table = {
    CQ_CUDA_API_VERSION,
    api_quantize_4bit,
    api_dequantize_4bit,
    api_linear_4bit,
    api_quantize_int8,
    api_dequantize_int8,
    api_gemm_int8,
    api_linear_int8,
    api_dequantize_absmax,
    last_error,
};

} /* namespace cq */

extern "C" __attribute__((visibility("default"))) const cq_cuda_api *cq_cuda_get_api(void) {
    return &cq::api_table;
}

/* Benchmarks and tests force a kernel variant (common.cuh Knob); 0 restores the
 * automatic choice. Returns the previous value, or -1 for an unknown knob. Reached
 * through ctypes on the same loaded file; not part of the launcher table. */
extern "C" __attribute__((visibility("default"))) int cq_cuda_set_variant(int which, int value) {
    if (which < 0 || which >= cq::KNOB_COUNT)
        return -1;
    return __atomic_exchange_n(&cq::knobs[which], value, __ATOMIC_RELAXED);
}
