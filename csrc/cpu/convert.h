/* convert.h: scalar float32 <-> bfloat16 / float16 conversions, round to nearest even,
 * bit-identical to torch's .to(dtype). Header-only so that every variant inlines them. */
#ifndef COMFY_QUANT_CONVERT_H
#define COMFY_QUANT_CONVERT_H

#include <stdint.h>
#include <string.h>

#include "../formats.h"

static inline uint32_t cq_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float cq_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float cq_bf16_to_f32(uint16_t h) { return cq_bits_f32((uint32_t)h << 16); }

static inline uint16_t cq_f32_to_bf16(float f) {
    uint32_t u = cq_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet, keep the sign */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float cq_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) /* Inf / NaN */
        return cq_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return cq_bits_f32(sign);
        /* subnormal: value = man * 2^-24, exact in float32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return cq_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t cq_f32_to_f16(float f) {
    uint32_t u = cq_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to >= 65520: Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        /* Adding 0.5 moves the value's bits to the units of 2^-24 with one RNE rounding. */
        float v = cq_bits_f32(a) + 0.5f;
        return (uint16_t)(sign | (uint16_t)(cq_f32_bits(v) - 0x3f000000u));
    }
    uint32_t mant_odd = (a >> 13) & 1u;
    a += 0xc8000fffu + mant_odd; /* rebias exponent (-112 << 23) and round to nearest even */
    return (uint16_t)(sign | (uint16_t)(a >> 13));
}

/* Element i of a float tensor of dtype code `dt` as float32. */
static inline float cq_load_f32(const void *p, int dt, int64_t i) {
    switch (dt) {
    case CQ_F16:
        return cq_f16_to_f32(((const uint16_t *)p)[i]);
    case CQ_BF16:
        return cq_bf16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

static inline void cq_store_f32(void *p, int dt, int64_t i, float v) {
    switch (dt) {
    case CQ_F16:
        ((uint16_t *)p)[i] = cq_f32_to_f16(v);
        break;
    case CQ_BF16:
        ((uint16_t *)p)[i] = cq_f32_to_bf16(v);
        break;
    default:
        ((float *)p)[i] = v;
    }
}

static inline int cq_dtype_size(int dt) {
    switch (dt) {
    case CQ_F32:
    case CQ_I32:
        return 4;
    case CQ_F16:
    case CQ_BF16:
        return 2;
    case CQ_U8:
    case CQ_I8:
        return 1;
    default:
        return 0;
    }
}

#endif /* COMFY_QUANT_CONVERT_H */
