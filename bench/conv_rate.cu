/* conv_rate.cu: issue rate of the int32 -> float32 conversion against the instructions
 * an exact "magic number" conversion uses instead, one SM's clock, all SMs busy. The
 * W8A8 promotion (gemm_int8_sm90.cu) converts every int32 sum once a K-group.
 *     nvcc -O3 -arch=sm_90a bench/conv_rate.cu -o /tmp/conv_rate && /tmp/conv_rate
 * Each thread keeps 8 independent chains; every loop step changes each chain's int once
 * (a LOP3), so the conversion cannot be hoisted. Rates are per SM per clock (warp lanes);
 * "base" is the same loop without the conversion, and "cost" subtracts it. */
#include <cstdio>
#include <cuda_runtime.h>

constexpr int CHAINS = 8, STEPS = 4096;

template <int MODE>
__global__ void __launch_bounds__(1024) conv(int seed, float *out, long long *cycles) {
    int x[CHAINS];
    float acc[CHAINS];
#pragma unroll
    for (int j = 0; j < CHAINS; j++) {
        x[j] = seed * (j + 1) + threadIdx.x;
        acc[j] = 0.0f;
    }
    __syncthreads();
    const long long t0 = clock64();
    for (int i = 0; i < STEPS; i++) {
#pragma unroll
        for (int j = 0; j < CHAINS; j++) {
            if (MODE == 0) /* base: the bits as a float */
                acc[j] += __int_as_float(x[j] & 0x3fffff);
            else if (MODE == 1) /* cvt.rn.f32.s32 (I2FP on sm_90) */
                acc[j] += (float)(x[j] & 0x3fffff);
            else if (MODE == 2) /* exact for |v| < 2^22: add the magic to the int, subtract it as a float */
                acc[j] += __int_as_float((x[j] & 0x3fffff) + 0x4B400000) - 12582912.0f;
            else /* the magic's float subtraction left out (folded elsewhere) */
                acc[j] += __int_as_float((x[j] & 0x3fffff) + 0x4B400000);
            x[j] ^= i;
        }
    }
    __syncthreads();
    const long long t1 = clock64();
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < CHAINS; j++)
        s += acc[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
    if (threadIdx.x == 0)
        cycles[blockIdx.x] = t1 - t0;
}

template <int MODE> static double rate(int sms, float *out, long long *cyc, long long *h) {
    conv<MODE><<<sms, 1024>>>(1, out, cyc); /* warm */
    conv<MODE><<<sms, 1024>>>(3, out, cyc);
    cudaMemcpy(h, cyc, sms * sizeof(long long), cudaMemcpyDeviceToHost);
    long long mx = 0;
    for (int b = 0; b < sms; b++)
        mx = h[b] > mx ? h[b] : mx;
    return (double)mx / ((double)STEPS * CHAINS * 1024 / 32); /* cycles a warp instruction-step, per SM */
}

int main() {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    float *out;
    long long *cyc, h[1024];
    cudaMalloc(&out, sms * 1024 * sizeof(float));
    cudaMalloc(&cyc, sms * sizeof(long long));
    const double base = rate<0>(sms, out, cyc, h), i2f = rate<1>(sms, out, cyc, h), magic = rate<2>(sms, out, cyc, h),
                 magic1 = rate<3>(sms, out, cyc, h);
    printf("SM cycles per warp-wide element (32 lanes), %d SMs x 32 warps:\n", sms);
    printf("  base (LOP3 + FADD)          %.3f\n", base);
    printf("  + I2FP                      %.3f  (cost %.3f: %.1f lanes/clk/SM)\n", i2f, i2f - base, 32 / (i2f - base));
    printf("  + IADD + FADD (magic)       %.3f  (cost %.3f)\n", magic, magic - base);
    printf("  + IADD (magic, no FADD)     %.3f  (cost %.3f)\n", magic1, magic1 - base);
    cudaError_t e = cudaDeviceSynchronize();
    printf("%s\n", cudaGetErrorString(e));
    return e != cudaSuccess;
}
