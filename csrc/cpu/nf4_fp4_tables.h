/* nf4_fp4_tables.h: the 4-bit tables of formats.h as C arrays, and the scalar
 * nearest-code rule every CPU variant uses for its tails. */
#ifndef COMFY_QUANT_NF4_FP4_TABLES_H
#define COMFY_QUANT_NF4_FP4_TABLES_H

#include <stdint.h>

#include "../formats.h"

static const float cq_nf4_table[16] = CQ_NF4_TABLE_INIT;
static const float cq_fp4_table[16] = CQ_FP4_TABLE_INIT;
static const uint8_t cq_fp4_mag_code[8] = CQ_FP4_MAG_CODE_INIT;

static const float cq_nf4_midpoints[15] = CQ_NF4_MID_INIT;
static const float cq_fp4_midpoints[7] = CQ_FP4_MID_INIT;

static inline const float *cq_table_4bit(int codebook) {
    return codebook == CQ_NF4 ? cq_nf4_table : cq_fp4_table;
}

/* Nearest code of a normalized value s = x * (1/absmax): NF4 counts the midpoints
 * below s; FP4 does the same on |s| and sets bit 3 iff s < 0. */
static inline uint8_t cq_code_4bit(float s, int codebook) {
    uint8_t c = 0;
    if (codebook == CQ_NF4) {
        for (int j = 0; j < 15; j++)
            c += s > cq_nf4_midpoints[j];
        return c;
    }
    float a = s < 0.0f ? -s : s;
    for (int j = 0; j < 7; j++)
        c += a > cq_fp4_midpoints[j];
    return (uint8_t)(cq_fp4_mag_code[c] | (s < 0.0f ? 8 : 0));
}

/* TILE(MT) for the rows m0 .. M of x in tiles of 4, then 2, then 1 (m0 advances past
 * them): the row tiling of the CPU 4-bit linears, whose column kernels are unrolled for
 * these tile heights (AVX-512 float32 takes tiles of 8 first). */
#define CQ_ROW_TILES_4_2_1(m0, M, TILE)     \
    do {                                    \
        for (; (m0) + 4 <= (M); (m0) += 4)  \
            TILE(4);                        \
        if ((m0) + 2 <= (M)) {              \
            TILE(2);                        \
            (m0) += 2;                      \
        }                                   \
        if ((m0) < (M))                     \
            TILE(1);                        \
    } while (0)

#endif
