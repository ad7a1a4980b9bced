/* formats.h: the one definition of every weight layout comfy-quant-native knows.
 *
 * Compiles as C11 (csrc/cpu, csrc/module.c) and as CUDA (csrc/cuda). Agrees with
 * DESIGN.md "On-disk formats"; comfy_quant_native/layouts.py mirrors the numbers
 * and tests/test_abi.py checks the mirror against this file.
 *
 * Layer weight W has shape [N, K] (out, in). Scales are float32.
 *
 * bnb_nf4 / bnb_fp4 (layout nf4 / fp4): W is flattened row-major to n = N*K values and
 *   cut into groups of B consecutive values (B = group size, the last group may be
 *   partial, groups may straddle rows).
 *     absmax[g] = max |x| over group g                        float32 [ceil(n/B)]
 *     code(x)   = nearest table entry to x * (1/absmax[g])     (0 when absmax == 0)
 *     packed[j] = code(x[2j]) << 4 | code(x[2j+1])            uint8 [ceil(n/2)]
 *   i.e. element 2j in the HIGH nibble (bitsandbytes order); an odd n fills the last
 *   low nibble with the code of 0.0 (7 for NF4, 0 for FP4), as bitsandbytes does,
 *   which pads the tail with zeros before quantizing. Dequantized value: table[code] * absmax[g], in float32, then rounded
 *   to the output dtype. Effectively 4 + 32/B bits per weight (4.5 at B = 64).
 *   Double quantization (bitsandbytes compress_statistics) stores absmax as uint8
 *   codes of the signed 8-bit dynamic map in blocks of CQ_DQ_BLOCK, plus a float32
 *   absmax per block and one float32 offset (the mean): absmax = map[q]*nested + offset.
 *
 * int8_blockwise (int8_block): q int8 [N, K], scale [ceil(N/B), ceil(K/B)],
 *   tile (i, j) = rows [iB, iB+B) x cols [jB, jB+B).
 * int8_lodewise (int8_lode): q int8 [N, K], scale [N, ceil(K/B)] per (row, K-group).
 * int8_tensorwise per row (int8_row): q int8 [N, K], scale [N].
 *   All three: scale = amax / 127, q = round_half_even(x / scale) (0 when scale == 0),
 *   |q| <= 127, dequantized value q * scale in float32. One kernel family serves them
 *   as a tile of (group_n rows x group_k cols): block (B, B), lode (1, B), row (1, K).
 *   Effectively 8 + 32/B^2, 8 + 32/B and 8 + 32/K bits per weight.
 *
 * Rounding is always to nearest: 4-bit codes by float32 midpoints between sorted
 * table entries (a value exactly on a midpoint takes the entry nearer zero for FP4,
 * the lower entry for NF4); int8 by round-half-even. Never a truncating cast.
 */
#ifndef COMFY_QUANT_FORMATS_H
#define COMFY_QUANT_FORMATS_H

#include <stdint.h>

/* Element types crossing the Python boundary. Python mirror: layouts.DTYPE_CODES. */
enum cq_dtype {
    CQ_F32 = 0,
    CQ_F16 = 1,
    CQ_BF16 = 2,
    CQ_U8 = 3,
    CQ_I8 = 4,
    CQ_I32 = 5,
};

/* 4-bit codebooks. Python mirror: layouts.CODEBOOK_CODES. */
enum cq_codebook {
    CQ_NF4 = 0,
    CQ_FP4 = 1,
};

/* Kernel return status; module.c raise_status() maps each to a Python exception. */
enum cq_status {
    CQ_OK = 0,
    CQ_EINVAL = 1,       /* bad argument that the binding should have caught */
    CQ_ENOMEM = 2,       /* scratch allocation failed */
    CQ_ENONFINITE = 3,   /* NaN or Inf in a tensor being quantized */
    CQ_ECUDA = 4,        /* CUDA runtime error; message from cq_cuda_last_error() */
    CQ_EUNSUPPORTED = 5, /* no kernel for this combination */
};

/* Group sizes: powers of two in [MIN, MAX]. */
#define CQ_4BIT_GROUP_DEFAULT 64
#define CQ_4BIT_GROUP_MIN 32
#define CQ_4BIT_GROUP_MAX 4096
#define CQ_INT8_GROUP_DEFAULT 128
#define CQ_INT8_GROUP_MIN 32
#define CQ_INT8_GROUP_MAX 512
/* bitsandbytes double quantization: 8-bit dynamic map over blocks of 256 absmax. */
#define CQ_DQ_BLOCK 256
#define CQ_INT8_QMAX 127

/* NF4 (QLoRA) table, sorted, exact float32 values as bitsandbytes' get_4bit_type. */
#define CQ_NF4_TABLE_INIT {                                                   \
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f,                \
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,               \
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f,           \
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f }

/* bitsandbytes FP4 (not OCP E2M1): codes 0-7 below, bit 3 is the sign, so code 8
 * is -0.0 as in bitsandbytes' CUDA kernels (its CPU paths and Python quant_map give
 * +0.0; the two compare equal). Values are {0, 0.0625, 8, 12, 4, 6, 2, 3}/12.
 * Quantizing sets the sign bit iff x < 0. */
#define CQ_FP4_TABLE_INIT {                                                   \
    0.0f, 1.0f / 192.0f, 2.0f / 3.0f, 1.0f, 1.0f / 3.0f, 0.5f, 1.0f / 6.0f, 0.25f, \
    -0.0f, -1.0f / 192.0f, -2.0f / 3.0f, -1.0f, -1.0f / 3.0f, -0.5f, -1.0f / 6.0f, -0.25f }

/* FP4 magnitudes in increasing order and the 3-bit code of each. */
#define CQ_FP4_MAG_SORTED_INIT { 0.0f, 1.0f / 192.0f, 1.0f / 6.0f, 0.25f, 1.0f / 3.0f, 0.5f, 2.0f / 3.0f, 1.0f }
#define CQ_FP4_MAG_CODE_INIT { 0, 1, 6, 7, 4, 5, 2, 3 }
/* The code of 0.0, which pads an odd element count's last low nibble. */
#define CQ_NF4_ZERO_CODE 7
#define CQ_FP4_ZERO_CODE 0

/* Midpoint i between sorted entries i and i+1, as bitsandbytes computes it:
 * float32 sum, then halved (exact). A value x gets bucket = #{i : x > mid[i]}. */
#define CQ_MIDPOINT(a, b) (((a) + (b)) * 0.5f)

/* Midpoints between neighbouring sorted entries (NF4 table; FP4 magnitudes). */
#define CQ_NF4_MID_INIT { \
    CQ_MIDPOINT(-0x1p+0f, -0x1.647362p-1f), CQ_MIDPOINT(-0x1.647362p-1f, -0x1.0cd66p-1f), \
    CQ_MIDPOINT(-0x1.0cd66p-1f, -0x1.94654p-2f), CQ_MIDPOINT(-0x1.94654p-2f, -0x1.23449ap-2f), \
    CQ_MIDPOINT(-0x1.23449ap-2f, -0x1.7a6a7ep-3f), CQ_MIDPOINT(-0x1.7a6a7ep-3f, -0x1.74f0e2p-4f), \
    CQ_MIDPOINT(-0x1.74f0e2p-4f, 0x0p+0f), CQ_MIDPOINT(0x0p+0f, 0x1.45f5fep-4f), \
    CQ_MIDPOINT(0x1.45f5fep-4f, 0x1.4995c6p-3f), CQ_MIDPOINT(0x1.4995c6p-3f, 0x1.f809bap-3f), \
    CQ_MIDPOINT(0x1.f809bap-3f, 0x1.5a0674p-2f), CQ_MIDPOINT(0x1.5a0674p-2f, 0x1.c3497p-2f), \
    CQ_MIDPOINT(0x1.c3497p-2f, 0x1.200f56p-1f), CQ_MIDPOINT(0x1.200f56p-1f, 0x1.722766p-1f), \
    CQ_MIDPOINT(0x1.722766p-1f, 0x1p+0f) }
#define CQ_FP4_MID_INIT { \
    CQ_MIDPOINT(0.0f, 1.0f / 192.0f), CQ_MIDPOINT(1.0f / 192.0f, 1.0f / 6.0f), \
    CQ_MIDPOINT(1.0f / 6.0f, 0.25f), CQ_MIDPOINT(0.25f, 1.0f / 3.0f), \
    CQ_MIDPOINT(1.0f / 3.0f, 0.5f), CQ_MIDPOINT(0.5f, 2.0f / 3.0f), \
    CQ_MIDPOINT(2.0f / 3.0f, 1.0f) }

/* ceil(a / b) for positive b, on int64 counts. */
#define CQ_CDIV(a, b) (((a) + (b) - 1) / (b))

#endif /* COMFY_QUANT_FORMATS_H */
