/* dispatch.c: which SIMD levels this CPU runs, and the merged kernel table of a level.
 * One build runs on any x86-64: variants are compiled per function with target
 * attributes and chosen here at run time from the CPU's features. */
#include "../kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

/* AVX512-BF16: CPUID leaf 7 subleaf 1, EAX bit 5. Read directly: older compilers'
 * __builtin_cpu_supports does not know the name. The OS's saving of zmm state is
 * already checked by the avx512 level below it (libgcc tests XCR0 for avx512f). */
static int cpu_has_avx512bf16(void) {
    unsigned int eax, ebx, ecx, edx;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    return (eax >> 5) & 1u;
}
#endif

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
    case CQ_CPU_AVX512_BF16:
        /* the 4-bit decoder also uses VBMI's vpmultishiftqb (nf4_fp4_bf16.c) */
        return cq_cpu_level_supported(CQ_CPU_AVX512_VNNI) && cpu_has_avx512bf16() &&
               __builtin_cpu_supports("avx512vbmi");
#endif
    default:
        return 0;
    }
}

const char *const cq_cpu_level_names[CQ_CPU_LEVELS] = {"ref", "avx2", "avx512", "avx512vnni",
                                                        "avx512bf16"};

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
    TAKE(linear_4bit_bf16);
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
        {&cq_nf4_fp4_avx512bf16, NULL}, /* BF16 serves only linear_4bit_bf16 */
    };
    *out = (cq_cpu_kernels){0};
    for (int l = 0; l <= level && l < CQ_CPU_LEVELS; l++)
        for (int f = 0; f < 2; f++)
            overlay(out, families[l][f]);
    out->name = cq_cpu_level_names[level < CQ_CPU_LEVELS ? level : CQ_CPU_LEVELS - 1];
}
