/* module.c: comfy_quant_native._C, the CPython binding of the kernels.
 *
 * Tensors cross as raw integers: data pointers, sizes, dtype codes (formats.h), a
 * device (0 = CPU, 1 = CUDA), torch's current stream and a thread count. No libtorch:
 * one abi3 build serves every torch and every CPython >= 3.10 (DESIGN.md). Each
 * binding validates its arguments before any memory is touched, releases the GIL
 * around the kernel and maps a kernel status to a Python exception (raise_status).
 * ops.py has already checked shapes, dtypes and devices of the tensors and names
 * them in its messages; the checks here keep a direct call from crashing.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030a0000 /* abi3: one build for CPython >= 3.10 */
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#include <sys/mman.h>
#endif

#include "cpu/convert.h"
#include "cuda/launch.h"
#include "kernels.h"

enum { DEV_CPU = 0, DEV_CUDA = 1 };

typedef struct {
    cq_cpu_kernels kernels; /* the dispatch table, filled from CPU features */
    int cpu_level;
    const cq_cuda_api *cuda; /* NULL until load_cuda() succeeds */
    void *cuda_handle;
} module_state;

static module_state *get_state(PyObject *module) { return (module_state *)PyModule_GetState(module); }

/* "ref, avx2, ..." (cq_cpu_level_names), for messages; built once, under the GIL */
static const char *level_list(void) {
    static char list[128];
    if (!list[0])
        for (int i = 0; i < CQ_CPU_LEVELS; i++) {
            if (i)
                strcat(list, ", ");
            strcat(list, cq_cpu_level_names[i]);
        }
    return list;
}

static void set_level(module_state *st, int level) {
    cq_cpu_kernels_for_level(level, &st->kernels);
    st->cpu_level = level;
}

/* ------------------------------------------------------------------ errors */
static PyObject *raise_status(module_state *st, int status, const char *what, int64_t bad_group) {
    switch (status) {
    case CQ_OK:
        Py_RETURN_NONE;
    case CQ_ENOMEM:
        return PyErr_NoMemory();
    case CQ_ENONFINITE:
        return PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf (first in group %lld)", what,
                            (long long)bad_group);
    case CQ_ECUDA: {
        const char *msg = st->cuda && st->cuda->last_error ? st->cuda->last_error() : NULL;
        return PyErr_Format(PyExc_RuntimeError, "CUDA error in %s: %s", what,
                            msg ? msg : "unknown");
    }
    case CQ_EUNSUPPORTED:
        return PyErr_Format(PyExc_NotImplementedError, "%s: no kernel for these arguments", what);
    default:
        return PyErr_Format(PyExc_ValueError, "%s: invalid arguments (status %d)", what, status);
    }
}

/* ------------------------------------------------------------------ argument checks */
/* A pointer or stream handle: a Python int in [0, UINTPTR_MAX]. "K" would take -8 as
 * 2**64 - 8 and wrap anything wider than 64 bits; this says which argument was bad. Parsed
 * with "O&" into an arg_u64 whose name is set beforehand. */
typedef struct {
    const char *name;
    unsigned long long v;
} arg_u64;

static int parse_u64(PyObject *obj, void *out) {
    arg_u64 *a = out;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: a pointer must be an int, got %R", a->name, obj);
        return 0;
    }
    a->v = PyLong_AsUnsignedLongLong(obj); /* OverflowError for negative or too wide */
    if (a->v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return 0;
        PyErr_Clear();
        PyObject *zero = PyLong_FromLong(0);
        int negative = zero ? PyObject_RichCompareBool(obj, zero, Py_LT) : -1;
        Py_XDECREF(zero);
        if (negative < 0)
            return 0;
        if (negative)
            PyErr_Format(PyExc_ValueError, "%s: a pointer cannot be negative, got %R", a->name, obj);
        else
            PyErr_Format(PyExc_OverflowError, "%s: pointer %R does not fit in 64 bits", a->name, obj);
        return 0;
    }
    if (a->v > (unsigned long long)UINTPTR_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s: pointer %R does not fit in a %d-bit address", a->name,
                     obj, (int)(8 * sizeof(uintptr_t)));
        return 0;
    }
    return 1;
}

static int check_ptr(const arg_u64 *p, int dtype, int required) {
    if (p->v == 0) {
        if (!required)
            return 0;
        PyErr_Format(PyExc_ValueError, "%s: null data pointer", p->name);
        return -1;
    }
    int size = cq_dtype_size(dtype);
    if (size > 1 && p->v % (unsigned long long)size != 0) {
        /* %p: PyUnicode_FromFormat knows no %llx before Python 3.12 */
        PyErr_Format(PyExc_ValueError, "%s: pointer %p not aligned to its %d-byte elements", p->name,
                     (void *)(uintptr_t)p->v, size);
        return -1;
    }
    return 0;
}

static int check_float_dtype(int dtype, const char *name) {
    if (dtype == CQ_F32 || dtype == CQ_F16 || dtype == CQ_BF16)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: dtype code %d is not float32/float16/bfloat16", name, dtype);
    return -1;
}

static int check_positive(long long v, const char *name) {
    if (v > 0)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s must be positive, got %lld", name, v);
    return -1;
}

/* a * b fits int64 and the bytes of a*b elements of `elem` bytes do too */
static int check_product(long long a, long long b, int elem, const char *name) {
    if (a > 0 && b > 0 && a <= INT64_MAX / b / (elem > 0 ? elem : 1))
        return 0;
    PyErr_Format(PyExc_OverflowError, "%s: %lld x %lld elements overflow", name, a, b);
    return -1;
}

static int check_group_4bit(long long group) {
    if (group >= CQ_4BIT_GROUP_MIN && group <= CQ_4BIT_GROUP_MAX && (group & (group - 1)) == 0)
        return 0;
    PyErr_Format(PyExc_ValueError, "group size must be a power of two in [%d, %d], got %lld",
                 CQ_4BIT_GROUP_MIN, CQ_4BIT_GROUP_MAX, group);
    return -1;
}

static int check_codebook(int codebook) {
    if (codebook == CQ_NF4 || codebook == CQ_FP4)
        return 0;
    PyErr_Format(PyExc_ValueError, "codebook code must be %d (nf4) or %d (fp4), got %d", CQ_NF4,
                 CQ_FP4, codebook);
    return -1;
}

/* CPU kernels read and write float32 for the linear paths; CUDA keeps the dtype. */
static int check_device(module_state *st, int device, const char *what) {
    if (device == DEV_CPU)
        return 0;
    if (device == DEV_CUDA) {
        if (st->cuda)
            return 0;
        PyErr_Format(PyExc_RuntimeError, "%s: the CUDA kernels are not loaded", what);
        return -1;
    }
    PyErr_Format(PyExc_ValueError, "%s: device must be 0 (cpu) or 1 (cuda), got %d", what, device);
    return -1;
}

static int check_cpu_f32(int device, int dtype, const char *name) {
    if (device != DEV_CPU || dtype == CQ_F32)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: the CPU kernel takes float32 (code %d), got code %d", name,
                 CQ_F32, dtype);
    return -1;
}

#define PTR(p) ((void *)(uintptr_t)(p))
#define STREAM(s) ((cq_stream)(uintptr_t)(s))
/* enough work per thread that waking it pays off */
#define MIN_ELEMS_PER_THREAD 32768

/* Ask the kernel for transparent huge pages on a CPU output of >= 4 MiB that torch has
 * just allocated (a fresh mmap for anything over glibc's 32 MiB threshold): faulting it
 * in 4 KiB pages cost 3-4x the dequantize kernel itself (docs/BENCHMARKS.md "CPU
 * kernels"). A hint on the 2 MiB-aligned interior only: no memory is added, pages
 * already touched stay as they are, and nothing changes where THP is off. */
static void advise_huge_pages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (bytes < ((int64_t)4 << 20))
        return;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

static int64_t min_units(int64_t unit_elems) {
    return unit_elems >= MIN_ELEMS_PER_THREAD ? 1 : MIN_ELEMS_PER_THREAD / (unit_elems > 0 ? unit_elems : 1);
}

/* ------------------------------------------------------------------ 4-bit */
typedef struct {
    const cq_cpu_kernels *k;
    const void *x;
    int x_dtype;
    uint8_t *packed;
    float *absmax;
    void *y;
    int y_dtype;
    int64_t n, group;
    int codebook;
    int64_t bad_group;
} ctx_4bit;

static int range_quantize_4bit(void *p, int64_t g0, int64_t g1) {
    ctx_4bit *c = p;
    int64_t bad = -1;
    int st = c->k->quantize_4bit(c->x, c->x_dtype, c->packed, c->absmax, c->n, c->group, c->codebook,
                                 g0, g1, &bad);
    if (st == CQ_ENONFINITE)
        c->bad_group = bad; /* racy only between failing chunks; any one is a true answer */
    return st;
}

static int range_dequantize_4bit(void *p, int64_t g0, int64_t g1) {
    ctx_4bit *c = p;
    return c->k->dequantize_4bit(c->packed, c->absmax, c->y, c->y_dtype, c->n, c->group,
                                 c->codebook, g0, g1);
}

/* quantize_4bit(x, x_dtype, packed, absmax, n, group, codebook, device, stream, nthreads) */
static PyObject *py_quantize_4bit(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 x = {"x", 0}, packed = {"packed", 0}, absmax = {"absmax", 0}, stream = {"stream", 0};
    long long n, group;
    int x_dtype, codebook, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&iO&O&LLiiO&i", parse_u64, &x, &x_dtype, parse_u64, &packed,
                          parse_u64, &absmax, &n, &group, &codebook, &device, parse_u64, &stream,
                          &nthreads))
        return NULL;
    if (check_float_dtype(x_dtype, "x") || check_ptr(&x, x_dtype, 1) ||
        check_ptr(&packed, CQ_U8, 1) || check_ptr(&absmax, CQ_F32, 1) ||
        check_positive(n, "n") || check_product(n, 1, 4, "x") || check_group_4bit(group) ||
        check_codebook(codebook) || check_device(st, device, "quantize_4bit"))
        return NULL;
    int status;
    ctx_4bit c = {&st->kernels, PTR(x.v), x_dtype, PTR(packed.v), PTR(absmax.v), NULL, 0, n, group, codebook,
                  -1};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->quantize_4bit(c.x, x_dtype, c.packed, c.absmax, n, group, codebook,
                                         STREAM(stream.v));
    else
        status = cq_parallel_for(CQ_CDIV(n, group), 1, nthreads, min_units(group), range_quantize_4bit, &c);
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "x", c.bad_group);
}

/* dequantize_4bit(packed, absmax, y, y_dtype, n, group, codebook, device, stream, nthreads) */
static PyObject *py_dequantize_4bit(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 packed = {"packed", 0}, absmax = {"absmax", 0}, y = {"y", 0}, stream = {"stream", 0};
    long long n, group;
    int y_dtype, codebook, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&O&O&iLLiiO&i", parse_u64, &packed, parse_u64, &absmax, parse_u64, &y,
                          &y_dtype, &n, &group, &codebook, &device, parse_u64, &stream, &nthreads))
        return NULL;
    if (check_float_dtype(y_dtype, "y") || check_ptr(&packed, CQ_U8, 1) ||
        check_ptr(&absmax, CQ_F32, 1) || check_ptr(&y, y_dtype, 1) ||
        check_positive(n, "n") || check_product(n, 1, 4, "y") || check_group_4bit(group) ||
        check_codebook(codebook) || check_device(st, device, "dequantize_4bit"))
        return NULL;
    int status;
    ctx_4bit c = {&st->kernels, NULL, 0, PTR(packed.v), PTR(absmax.v), PTR(y.v), y_dtype, n, group, codebook,
                  -1};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->dequantize_4bit(c.packed, c.absmax, c.y, y_dtype, n, group, codebook,
                                           STREAM(stream.v));
    else {
        advise_huge_pages(c.y, n * cq_dtype_size(y_dtype));
        status = cq_parallel_for(CQ_CDIV(n, group), 1, nthreads, min_units(group), range_dequantize_4bit, &c);
    }
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "dequantize_4bit", -1);
}

typedef struct {
    const cq_cpu_kernels *k;
    const void *x;
    const void *packed; /* uint8 (4-bit) or int8 (int8) weight */
    const float *scale; /* absmax or int8 scales */
    const float *bias;
    void *y;
    int64_t M, N, K, group, gn, gk;
    int codebook;
} ctx_linear;

static int range_linear_4bit(void *p, int64_t n0, int64_t n1) {
    ctx_linear *c = p;
    return c->k->linear_4bit(c->x, c->packed, c->scale, c->bias, c->y, c->M, c->N, c->K, c->group,
                             c->codebook, n0, n1);
}

static int range_linear_4bit_bf16(void *p, int64_t n0, int64_t n1) {
    ctx_linear *c = p;
    return c->k->linear_4bit_bf16(c->x, c->packed, c->scale, c->bias, c->y, c->M, c->N, c->K,
                                  c->group, c->codebook, n0, n1);
}

/* CPU linear_4bit: float32 x and y, or bfloat16 where the level has linear_4bit_bf16. */
static int check_cpu_linear_4bit_dtype(module_state *st, int device, int dtype) {
    if (device != DEV_CPU || dtype == CQ_F32 || (dtype == CQ_BF16 && st->kernels.linear_4bit_bf16))
        return 0;
    PyErr_Format(PyExc_ValueError,
                 "x: the CPU kernel takes float32 (code %d), or bfloat16 (code %d) at CPU level "
                 "avx512bf16; got code %d at level %s",
                 CQ_F32, CQ_BF16, dtype, cq_cpu_level_names[st->cpu_level]);
    return -1;
}

/* linear_4bit(x, dtype, packed, absmax, bias, y, M, N, K, group, codebook, device, stream, nthreads)
 * bias may be 0. CUDA: x, bias and y in dtype. CPU: x and y float32, or bfloat16 where
 * cpu_kernels()["linear_4bit_bf16"] is set; bias float32. */
static PyObject *py_linear_4bit(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 x = {"x", 0}, packed = {"packed", 0}, absmax = {"absmax", 0}, bias = {"bias", 0},
            y = {"y", 0}, stream = {"stream", 0};
    long long M, N, K, group;
    int dtype, codebook, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&iO&O&O&O&LLLLiiO&i", parse_u64, &x, &dtype, parse_u64, &packed,
                          parse_u64, &absmax, parse_u64, &bias, parse_u64, &y, &M, &N, &K, &group,
                          &codebook, &device, parse_u64, &stream, &nthreads))
        return NULL;
    if (check_float_dtype(dtype, "x") || check_cpu_linear_4bit_dtype(st, device, dtype) ||
        check_ptr(&x, dtype, 1) || check_ptr(&packed, CQ_U8, 1) ||
        check_ptr(&absmax, CQ_F32, 1) || check_ptr(&bias, device == DEV_CPU ? CQ_F32 : dtype, 0) ||
        check_ptr(&y, dtype, 1) || check_positive(M, "M") || check_positive(N, "N") ||
        check_positive(K, "K") || check_product(M, K, 4, "x") || check_product(N, K, 1, "weight") ||
        check_product(M, N, 4, "y") || check_group_4bit(group) || check_codebook(codebook) ||
        check_device(st, device, "linear_4bit"))
        return NULL;
    int status;
    ctx_linear c = {&st->kernels, PTR(x.v), PTR(packed.v), PTR(absmax.v), PTR(bias.v), PTR(y.v),
                    M, N, K, group, 0, 0, codebook};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->linear_4bit(c.x, dtype, c.packed, c.scale, PTR(bias.v), PTR(y.v), M, N, K, group,
                                       codebook, STREAM(stream.v));
    else if (dtype == CQ_BF16) /* chunks on multiples of the kernel's 32-column panels */
        status = cq_parallel_for(N, 32, nthreads, min_units(M * K), range_linear_4bit_bf16, &c);
    else
        status = cq_parallel_for(N, 1, nthreads, min_units(M * K), range_linear_4bit, &c);
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "linear_4bit", -1);
}

/* ------------------------------------------------------------------ int8 */
typedef struct {
    const cq_cpu_kernels *k;
    const void *x;
    int x_dtype;
    int8_t *q;
    float *scale;
    void *y;
    int y_dtype;
    int64_t N, K, gn, gk;
    int64_t bad_group;
} ctx_int8;

static int range_quantize_int8(void *p, int64_t r0, int64_t r1) {
    ctx_int8 *c = p;
    int64_t bad = -1;
    int st = c->k->quantize_int8(c->x, c->x_dtype, c->q, c->scale, c->N, c->K, c->gn, c->gk, r0, r1, &bad);
    if (st == CQ_ENONFINITE)
        c->bad_group = bad;
    return st;
}

static int range_dequantize_int8(void *p, int64_t r0, int64_t r1) {
    ctx_int8 *c = p;
    return c->k->dequantize_int8(c->q, c->scale, c->y, c->y_dtype, c->N, c->K, c->gn, c->gk, r0, r1);
}

static int check_tile(long long N, long long K, long long gn, long long gk) {
    if (check_positive(N, "N") || check_positive(K, "K") || check_positive(gn, "group_n") ||
        check_positive(gk, "group_k") || check_product(N, K, 4, "tensor"))
        return -1;
    return 0;
}

/* quantize_int8(x, x_dtype, q, scale, N, K, gn, gk, device, stream, nthreads) */
static PyObject *py_quantize_int8(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 x = {"x", 0}, q = {"q", 0}, scale = {"scale", 0}, stream = {"stream", 0};
    long long N, K, gn, gk;
    int x_dtype, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&iO&O&LLLLiO&i", parse_u64, &x, &x_dtype, parse_u64, &q, parse_u64,
                          &scale, &N, &K, &gn, &gk, &device, parse_u64, &stream, &nthreads))
        return NULL;
    if (check_float_dtype(x_dtype, "x") || check_ptr(&x, x_dtype, 1) ||
        check_ptr(&q, CQ_I8, 1) || check_ptr(&scale, CQ_F32, 1) ||
        check_tile(N, K, gn, gk) || check_device(st, device, "quantize_int8"))
        return NULL;
    int status;
    ctx_int8 c = {&st->kernels, PTR(x.v), x_dtype, PTR(q.v), PTR(scale.v), NULL, 0, N, K, gn, gk, -1};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->quantize_int8(c.x, x_dtype, c.q, c.scale, N, K, gn, gk, STREAM(stream.v));
    else
        status = cq_parallel_for(CQ_CDIV(N, gn), 1, nthreads, min_units(gn * K), range_quantize_int8, &c);
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "x", c.bad_group);
}

/* dequantize_int8(q, scale, y, y_dtype, N, K, gn, gk, device, stream, nthreads) */
static PyObject *py_dequantize_int8(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 q = {"q", 0}, scale = {"scale", 0}, y = {"y", 0}, stream = {"stream", 0};
    long long N, K, gn, gk;
    int y_dtype, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&O&O&iLLLLiO&i", parse_u64, &q, parse_u64, &scale, parse_u64, &y,
                          &y_dtype, &N, &K, &gn, &gk, &device, parse_u64, &stream, &nthreads))
        return NULL;
    if (check_float_dtype(y_dtype, "y") || check_ptr(&q, CQ_I8, 1) ||
        check_ptr(&scale, CQ_F32, 1) || check_ptr(&y, y_dtype, 1) ||
        check_tile(N, K, gn, gk) || check_device(st, device, "dequantize_int8"))
        return NULL;
    int status;
    ctx_int8 c = {&st->kernels, NULL, 0, PTR(q.v), PTR(scale.v), PTR(y.v), y_dtype, N, K, gn, gk, -1};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->dequantize_int8(c.q, c.scale, c.y, y_dtype, N, K, gn, gk, STREAM(stream.v));
    else {
        advise_huge_pages(c.y, N * K * cq_dtype_size(y_dtype));
        status = cq_parallel_for(CQ_CDIV(N, gn), 1, nthreads, min_units(gn * K), range_dequantize_int8, &c);
    }
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "dequantize_int8", -1);
}

typedef struct {
    const cq_cpu_kernels *k;
    const int8_t *xq;
    const float *xs;
    const int8_t *wq;
    const float *ws;
    const float *bias;
    float *y;
    int64_t M, N, K, xs_groups, gn, gk;
} ctx_gemm;

static int range_gemm_int8(void *p, int64_t n0, int64_t n1) {
    ctx_gemm *c = p;
    return c->k->gemm_int8(c->xq, c->xs, c->wq, c->ws, c->bias, c->y, c->M, c->N, c->K, c->xs_groups,
                           c->gn, c->gk, n0, n1);
}

/* gemm_int8(xq, xs, wq, ws, bias, y, y_dtype, M, N, K, xs_groups, gn, gk, device, stream, nthreads
 *           [, workspace, workspace_bytes])
 * bias may be 0. CPU: y_dtype must be float32. workspace: CUDA scratch (launch.h), the CPU
 * ignores it. */
static PyObject *py_gemm_int8(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 xq = {"xq", 0}, xs = {"xs", 0}, wq = {"wq", 0}, ws = {"ws", 0}, bias = {"bias", 0},
            y = {"y", 0}, stream = {"stream", 0}, work = {"workspace", 0};
    long long M, N, K, xs_groups, gn, gk, work_bytes = 0;
    int y_dtype, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&O&O&O&O&O&iLLLLLLiO&i|O&L", parse_u64, &xq, parse_u64, &xs, parse_u64,
                          &wq, parse_u64, &ws, parse_u64, &bias, parse_u64, &y, &y_dtype, &M, &N, &K,
                          &xs_groups, &gn, &gk, &device, parse_u64, &stream, &nthreads, parse_u64, &work,
                          &work_bytes))
        return NULL;
    if (work_bytes < 0 || (work.v == 0 && work_bytes != 0)) {
        PyErr_Format(PyExc_ValueError, "workspace: %lld bytes at %p", work_bytes, (void *)(uintptr_t)work.v);
        return NULL;
    }
    if (check_float_dtype(y_dtype, "y") || check_cpu_f32(device, y_dtype, "y") ||
        check_ptr(&xq, CQ_I8, 1) || check_ptr(&xs, CQ_F32, 1) ||
        check_ptr(&wq, CQ_I8, 1) || check_ptr(&ws, CQ_F32, 1) ||
        check_ptr(&bias, y_dtype, 0) || check_ptr(&y, y_dtype, 1) ||
        check_positive(M, "M") || check_tile(N, K, gn, gk) || check_product(M, K, 4, "x") ||
        check_product(M, N, 4, "y") || check_device(st, device, "gemm_int8"))
        return NULL;
    if (xs_groups != 1 && xs_groups != CQ_CDIV(K, gk)) {
        PyErr_Format(PyExc_ValueError, "xs_groups must be 1 or ceil(K/gk) = %lld, got %lld",
                     (long long)CQ_CDIV(K, gk), xs_groups);
        return NULL;
    }
    int status;
    ctx_gemm c = {&st->kernels, PTR(xq.v), PTR(xs.v), PTR(wq.v), PTR(ws.v), PTR(bias.v), PTR(y.v),
                  M, N, K, xs_groups, gn, gk};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->gemm_int8(c.xq, c.xs, c.wq, c.ws, PTR(bias.v), PTR(y.v), y_dtype, M, N, K,
                                     xs_groups, gn, gk, PTR(work.v), work_bytes, STREAM(stream.v));
    else
        status = cq_parallel_for(N, 32, nthreads, min_units(M * K), range_gemm_int8, &c); /* 32: SIMD panel */
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "gemm_int8", -1);
}

static int range_linear_int8(void *p, int64_t n0, int64_t n1) {
    ctx_linear *c = p;
    return c->k->linear_int8(c->x, c->packed, c->scale, c->bias, c->y, c->M, c->N, c->K, c->gn, c->gk,
                             n0, n1);
}

/* linear_int8(x, dtype, wq, ws, bias, y, M, N, K, gn, gk, device, stream, nthreads)
 * weight-only; bias may be 0. CPU: dtype must be float32. */
static PyObject *py_linear_int8(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 x = {"x", 0}, wq = {"wq", 0}, ws = {"ws", 0}, bias = {"bias", 0}, y = {"y", 0},
            stream = {"stream", 0};
    long long M, N, K, gn, gk;
    int dtype, device, nthreads;
    if (!PyArg_ParseTuple(args, "O&iO&O&O&O&LLLLLiO&i", parse_u64, &x, &dtype, parse_u64, &wq,
                          parse_u64, &ws, parse_u64, &bias, parse_u64, &y, &M, &N, &K, &gn, &gk,
                          &device, parse_u64, &stream, &nthreads))
        return NULL;
    if (check_float_dtype(dtype, "x") || check_cpu_f32(device, dtype, "x") ||
        check_ptr(&x, dtype, 1) || check_ptr(&wq, CQ_I8, 1) ||
        check_ptr(&ws, CQ_F32, 1) || check_ptr(&bias, dtype, 0) ||
        check_ptr(&y, dtype, 1) || check_positive(M, "M") || check_tile(N, K, gn, gk) ||
        check_product(M, K, 4, "x") || check_product(M, N, 4, "y") ||
        check_device(st, device, "linear_int8"))
        return NULL;
    int status;
    ctx_linear c = {&st->kernels, PTR(x.v), PTR(wq.v), PTR(ws.v), PTR(bias.v), PTR(y.v), M, N, K, 0, gn, gk,
                    0};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->linear_int8(c.x, dtype, c.packed, c.scale, PTR(bias.v), PTR(y.v), M, N, K, gn, gk,
                                       STREAM(stream.v));
    else
        status = cq_parallel_for(N, 4, nthreads, min_units(M * K), range_linear_int8, &c); /* 4: SIMD tile */
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "linear_int8", -1);
}

/* ------------------------------------------------------------------ double quantization */
typedef struct {
    const cq_cpu_kernels *k;
    const uint8_t *codes;
    const float *nested, *map;
    float offset;
    float *absmax;
} ctx_absmax;

static int range_dequantize_absmax(void *p, int64_t i0, int64_t i1) {
    ctx_absmax *c = p;
    return c->k->dequantize_absmax(c->codes, c->nested, c->map, c->offset, c->absmax, i0, i1);
}

/* dequantize_absmax(codes, nested, map, offset, absmax, G, device, stream, nthreads) */
static PyObject *py_dequantize_absmax(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    arg_u64 codes = {"codes", 0}, nested = {"nested_absmax", 0}, map = {"quant_map", 0},
            absmax = {"absmax", 0}, stream = {"stream", 0};
    double offset;
    long long G;
    int device, nthreads;
    if (!PyArg_ParseTuple(args, "O&O&O&dO&LiO&i", parse_u64, &codes, parse_u64, &nested, parse_u64,
                          &map, &offset, parse_u64, &absmax, &G, &device, parse_u64, &stream,
                          &nthreads))
        return NULL;
    if (check_ptr(&codes, CQ_U8, 1) || check_ptr(&nested, CQ_F32, 1) ||
        check_ptr(&map, CQ_F32, 1) || check_ptr(&absmax, CQ_F32, 1) ||
        check_positive(G, "G") || check_product(G, 1, 4, "absmax") ||
        check_device(st, device, "dequantize_absmax"))
        return NULL;
    int status;
    ctx_absmax c = {&st->kernels, PTR(codes.v), PTR(nested.v), PTR(map.v), (float)offset, PTR(absmax.v)};
    Py_BEGIN_ALLOW_THREADS
    if (device == DEV_CUDA)
        status = st->cuda->dequantize_absmax(c.codes, c.nested, c.map, c.offset, c.absmax, G,
                                             STREAM(stream.v));
    else
        status = cq_parallel_for(G, CQ_DQ_BLOCK, nthreads, MIN_ELEMS_PER_THREAD, range_dequantize_absmax, &c);
    Py_END_ALLOW_THREADS
    return raise_status(st, status, "dequantize_absmax", -1);
}

/* ------------------------------------------------------------------ CPU levels, CUDA loading */
static PyObject *py_cpu_levels(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (int i = 0; i < CQ_CPU_LEVELS; i++) {
        if (!cq_cpu_level_supported(i))
            continue;
        PyObject *s = PyUnicode_FromString(cq_cpu_level_names[i]);
        if (!s || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(s);
    }
    return list;
}

static PyObject *py_cpu_level(PyObject *module, PyObject *unused) {
    (void)unused;
    return PyUnicode_FromString(cq_cpu_level_names[get_state(module)->cpu_level]);
}

/* cpu_kernels(): {entry: the level whose kernel serves it now, or None where no level up
 * to the current one has one (linear_4bit_bf16 below avx512bf16)}. */
static PyObject *py_cpu_kernels(PyObject *module, PyObject *unused) {
    (void)unused;
    module_state *st = get_state(module);
    cq_cpu_kernels lv[CQ_CPU_LEVELS];
    for (int l = 0; l <= st->cpu_level; l++)
        cq_cpu_kernels_for_level(l, &lv[l]);
#define ENTRY(f) {#f, offsetof(cq_cpu_kernels, f)}
    static const struct {
        const char *name;
        size_t offset;
    } entries[] = {ENTRY(quantize_4bit), ENTRY(dequantize_4bit), ENTRY(linear_4bit),
                   ENTRY(linear_4bit_bf16), ENTRY(quantize_int8), ENTRY(dequantize_int8),
                   ENTRY(gemm_int8), ENTRY(linear_int8), ENTRY(dequantize_absmax)};
#undef ENTRY
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        void *const *cur = (void *const *)((const char *)&st->kernels + entries[i].offset);
        int from = -1; /* the lowest level that already has the current pointer */
        for (int l = 0; l <= st->cpu_level && *cur; l++)
            if (*(void *const *)((const char *)&lv[l] + entries[i].offset) == *cur) {
                from = l;
                break;
            }
        PyObject *v = from < 0 ? Py_NewRef(Py_None) : PyUnicode_FromString(cq_cpu_level_names[from]);
        if (!v || PyDict_SetItemString(d, entries[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static int level_from_name(const char *name) {
    for (int i = 0; i < CQ_CPU_LEVELS; i++)
        if (strcmp(name, cq_cpu_level_names[i]) == 0)
            return i;
    return -1;
}

/* set_cpu_level(name): force a SIMD level (one of cq_cpu_level_names) for tests. */
static PyObject *py_set_cpu_level(PyObject *module, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    int level = level_from_name(name);
    if (level < 0)
        return PyErr_Format(PyExc_ValueError, "unknown CPU level %R; known: %s", PyTuple_GetItem(args, 0),
                            level_list());
    if (!cq_cpu_level_supported(level))
        return PyErr_Format(PyExc_ValueError, "this CPU does not support level %s", name);
    set_level(get_state(module), level);
    Py_RETURN_NONE;
}

/* load_cuda(path): dlopen the CUDA kernels; returns None or raises with the reason. */
static PyObject *py_load_cuda(PyObject *module, PyObject *args) {
    module_state *st = get_state(module);
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path))
        return NULL;
    if (st->cuda)
        Py_RETURN_NONE;
#ifdef _WIN32
    HMODULE h = LoadLibraryA(path);
    if (!h)
        return PyErr_Format(PyExc_OSError, "cannot load %s (error %lu)", path, GetLastError());
    const cq_cuda_api *(*get_api)(void) = (const cq_cuda_api *(*)(void))GetProcAddress(h, "cq_cuda_get_api");
#else
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return PyErr_Format(PyExc_OSError, "cannot load %s: %s", path, dlerror());
    const cq_cuda_api *(*get_api)(void);
    *(void **)(&get_api) = dlsym(h, "cq_cuda_get_api");
#endif
    const cq_cuda_api *api = get_api ? get_api() : NULL;
    if (!api || api->version != CQ_CUDA_API_VERSION) {
        PyErr_Format(PyExc_OSError, "%s: CUDA API version %d, this module needs %d (rebuild)", path,
                     api ? api->version : -1, CQ_CUDA_API_VERSION);
#ifdef _WIN32
        FreeLibrary(h);
#else
        dlclose(h);
#endif
        return NULL;
    }
    st->cuda = api;
    st->cuda_handle = h; /* kept loaded for the life of the process */
    Py_RETURN_NONE;
}

static PyObject *py_cuda_loaded(PyObject *module, PyObject *unused) {
    (void)unused;
    return PyBool_FromLong(get_state(module)->cuda != NULL);
}

/* constants(): the C enums and limits, for the Python mirror test. */
static PyObject *py_constants(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "CQ_F32", CQ_F32, "CQ_F16", CQ_F16, "CQ_BF16", CQ_BF16, "CQ_U8", CQ_U8, "CQ_I8", CQ_I8,
        "CQ_I32", CQ_I32, "CQ_NF4", CQ_NF4, "CQ_FP4", CQ_FP4, "CQ_OK", CQ_OK, "CQ_EINVAL", CQ_EINVAL,
        "CQ_ENOMEM", CQ_ENOMEM, "CQ_ENONFINITE", CQ_ENONFINITE, "CQ_ECUDA", CQ_ECUDA,
        "CQ_EUNSUPPORTED", CQ_EUNSUPPORTED, "CQ_4BIT_GROUP_MIN", CQ_4BIT_GROUP_MIN,
        "CQ_4BIT_GROUP_MAX", CQ_4BIT_GROUP_MAX, "CQ_4BIT_GROUP_DEFAULT", CQ_4BIT_GROUP_DEFAULT,
        "CQ_INT8_GROUP_MIN", CQ_INT8_GROUP_MIN, "CQ_INT8_GROUP_MAX", CQ_INT8_GROUP_MAX,
        "CQ_INT8_GROUP_DEFAULT", CQ_INT8_GROUP_DEFAULT, "CQ_DQ_BLOCK", CQ_DQ_BLOCK,
        "CQ_CUDA_API_VERSION", CQ_CUDA_API_VERSION);
}

static PyMethodDef module_methods[] = {
    {"quantize_4bit", py_quantize_4bit, METH_VARARGS, "4-bit quantize (see module.c)."},
    {"dequantize_4bit", py_dequantize_4bit, METH_VARARGS, "4-bit dequantize."},
    {"linear_4bit", py_linear_4bit, METH_VARARGS, "Fused 4-bit linear."},
    {"quantize_int8", py_quantize_int8, METH_VARARGS, "int8 quantize over gn x gk tiles."},
    {"dequantize_int8", py_dequantize_int8, METH_VARARGS, "int8 dequantize."},
    {"gemm_int8", py_gemm_int8, METH_VARARGS, "W8A8 GEMM with per-group scales."},
    {"linear_int8", py_linear_int8, METH_VARARGS, "Weight-only int8 linear."},
    {"dequantize_absmax", py_dequantize_absmax, METH_VARARGS, "bitsandbytes nested absmax."},
    {"cpu_levels", py_cpu_levels, METH_NOARGS, "SIMD levels this CPU runs."},
    {"cpu_level", py_cpu_level, METH_NOARGS, "The SIMD level in use."},
    {"cpu_kernels", py_cpu_kernels, METH_NOARGS, "Which level serves each kernel entry now."},
    {"set_cpu_level", py_set_cpu_level, METH_VARARGS, "Force a SIMD level (tests)."},
    {"load_cuda", py_load_cuda, METH_VARARGS, "Load the CUDA kernels shared object."},
    {"cuda_loaded", py_cuda_loaded, METH_NOARGS, "Whether the CUDA kernels are loaded."},
    {"constants", py_constants, METH_NOARGS, "C enums and limits."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    module_state *st = get_state(module);
    int level = CQ_CPU_LEVELS - 1;
    while (level > 0 && !cq_cpu_level_supported(level))
        level--;
    const char *forced = getenv("COMFY_QUANT_CPU");
    if (forced && *forced) {
        int f = level_from_name(forced);
        if (f < 0 || !cq_cpu_level_supported(f)) {
            PyErr_Format(PyExc_ImportError, "COMFY_QUANT_CPU=%s is not a level this CPU runs (%s)", forced,
                         level_list());
            return -1;
        }
        level = f;
    }
    set_level(st, level);
    st->cuda = NULL;
    st->cuda_handle = NULL;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "comfy_quant_native._C",
    "Native kernels of comfy-quant-native (C, no libtorch).",
    sizeof(module_state),
    module_methods,
    module_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
