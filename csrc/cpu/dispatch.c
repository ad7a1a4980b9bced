/* dispatch.c: which SIMD levels this CPU runs, and the merged kernel table of a level.
 * One build runs on any x86-64: variants are compiled per function with target
 * attributes and chosen here at run time from the CPU's features. */
#include "../kernels.h"

int cq_cpu_level_supported(int level) {
    switch (level) {
    case CQ_CPU_REF:
        return 1;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case CQ_CPU_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case CQ_CPU_AVX512:
        __builtin_cpu_init();
        return cq_cpu_level_supported(CQ_CPU_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case CQ_CPU_AVX512_VNNI:
        __builtin_cpu_init();
        return cq_cpu_level_supported(CQ_CPU_AVX512) && __builtin_cpu_supports("avx512vnni");
#endif
    default:
        return 0;
    }
}

/* Overlay the non-NULL entries of `t` (if any) on `out`. */
static void overlay(cq_cpu_kernels *out, const cq_cpu_kernels *t) {
    if (!t)
        return;
#define TAKE(f) \
    if (t->f)   \
    out->f = t->f
    TAKE(quantize_4bit);
    TAKE(dequantize_4bit);
    TAKE(linear_4bit);
    TAKE(quantize_int8);
    TAKE(dequantize_int8);
    TAKE(gemm_int8);
    TAKE(linear_int8);
    TAKE(dequantize_absmax);
#undef TAKE
}

void cq_cpu_kernels_for_level(int level, cq_cpu_kernels *out) {
    static const cq_cpu_kernels *const families[CQ_CPU_LEVELS][2] = {
        {&cq_nf4_fp4_ref, &cq_int8_ref},
        {&cq_nf4_fp4_avx2, &cq_int8_avx2},
        {&cq_nf4_fp4_avx512, &cq_int8_avx512},
        {NULL, &cq_int8_avx512vnni}, /* VNNI serves only the int8 GEMM */
    };
    static const char *const names[CQ_CPU_LEVELS] = {"ref", "avx2", "avx512", "avx512vnni"};
    *out = (cq_cpu_kernels){0};
    for (int l = 0; l <= level && l < CQ_CPU_LEVELS; l++)
        for (int f = 0; f < 2; f++)
            overlay(out, families[l][f]);
    out->name = names[level < CQ_CPU_LEVELS ? level : CQ_CPU_LEVELS - 1];
}
