/* cellserve.kernels._native: the Python face of the native kernel core.
 *
 * Plain CPython C API with METH_FASTCALL and the buffer protocol: no build dependency beyond a C++
 * compiler, and about 0.1 us per call (a batch-1 cell step of a small model takes 10-20 us, so call
 * overhead matters). Callers allocate outputs (numpy arrays); this module never imports numpy.
 * Every call releases the GIL while it computes, so the server's event loop keeps running.
 *
 * ISA dispatch: the best path the CPU supports (avx512 > avx2 > portable) is chosen at import;
 * CELLSERVE_ISA=portable|avx2|avx512 forces one, and set_isa() switches at run time (tests). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "native.h"

namespace {

const isa_t *ISAS[] = {
#if defined(__x86_64__) || defined(_M_X64)
    &ISA_AVX512_VBMI, &ISA_AVX512, &ISA_AVX2,
#endif
    &ISA_PORTABLE};
constexpr int NUM_ISAS = sizeof ISAS / sizeof ISAS[0];

const isa_t *active = &ISA_PORTABLE;
thread_local int tls_threads = 1;

/* Products smaller than this many multiply-adds run on one thread: waking a worker costs more. */
constexpr double PARALLEL_MIN_MACS = 1 << 18;

void *aligned_zeros(size_t bytes) {
    bytes = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    void *p = aligned_alloc(ALIGN, bytes ? bytes : ALIGN);
    if (p) memset(p, 0, bytes);
    return p;
}

/* ---------------------------------------------------------------- packed matrices */

typedef struct {
    PyObject_HEAD
    packed_t p;
} PackedObject;

void packed_dealloc(PackedObject *self) {
    free(self->p.data);
    free(self->p.scale);
    free(self->p.colsum128);
    free(self->p.bptr);
    free(self->p.bidx);
    free(self->p.bvals);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject PackedType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PackedObject *new_packed() {
    PackedObject *obj = PyObject_New(PackedObject, &PackedType);
    if (obj) memset(&obj->p, 0, sizeof obj->p);
    return obj;
}

/* ---------------------------------------------------------------- buffers */

struct Buf {
    Py_buffer view;
    bool held = false;
    ~Buf() {
        if (held) PyBuffer_Release(&view);
    }
    ptrdiff_t ld() const { return view.ndim >= 2 ? view.strides[view.ndim - 2] / view.itemsize : 0; }
    ptrdiff_t dim(int i) const { return view.shape[i]; }
    template <typename T>
    T *data() const { return (T *)view.buf; }
};

char type_code(const Py_buffer &v) {
    const char *f = v.format ? v.format : "B";
    while (*f == '<' || *f == '=' || *f == '@') f++;
    char c = *f;
    if ((c == 'l' || c == 'q') && v.itemsize == 4) c = 'i';
    return c;
}

const char *type_name(char code) {
    switch (code) {
        case 'f': return "float32";
        case 'b': return "int8";
        case 'i': return "int32";
        default: return "?";
    }
}

/* A float32/int8/int32 array of ndim dimensions whose last dimension is contiguous. 3-D arrays must
 * be C-contiguous; 2-D ones may have any row stride (views such as gi_all[t] need no copy). */
bool get_buf(PyObject *obj, Buf &buf, char code, int ndim, bool writable, const char *name) {
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf.view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a %s%s array", name, writable ? "writable " : "", type_name(code));
        return false;
    }
    buf.held = true;
    const Py_buffer &v = buf.view;
    if (type_code(v) != code || v.itemsize != (code == 'b' ? 1 : 4)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got format '%s'", name, type_name(code), v.format);
        return false;
    }
    if (v.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim, v.ndim);
        return false;
    }
    if (v.strides[ndim - 1] != v.itemsize || (ndim == 2 && v.strides[0] % v.itemsize) ||
        (ndim == 3 && !PyBuffer_IsContiguous(&v, 'C'))) {
        PyErr_Format(PyExc_ValueError, "%s must be contiguous in its last dimension%s", name,
                     ndim == 3 ? " (and C-contiguous)" : "");
        return false;
    }
    if (ndim == 2 && v.shape[0] > 1 && v.strides[0] < v.shape[1] * v.itemsize) {
        PyErr_Format(PyExc_ValueError, "%s rows overlap", name);
        return false;
    }
    return true;
}

bool optional_buf(PyObject *obj, Buf &buf, char code, int ndim, bool writable, const char *name) {
    return obj == Py_None || get_buf(obj, buf, code, ndim, writable, name);
}

template <typename T>
T *optional_data(PyObject *obj, const Buf &buf) {
    return obj == Py_None ? nullptr : buf.data<T>();
}

bool check_len(const Buf &b, ptrdiff_t n, const char *name) {
    if (b.view.shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%s has length %zd, expected %zd", name, b.view.shape[0], n);
        return false;
    }
    return true;
}

bool check_shape2(const Buf &b, ptrdiff_t rows, ptrdiff_t cols, const char *name) {
    if (b.view.shape[0] != rows || b.view.shape[1] != cols) {
        PyErr_Format(PyExc_ValueError, "%s has shape (%zd, %zd), expected (%zd, %zd)", name, b.view.shape[0],
                     b.view.shape[1], rows, cols);
        return false;
    }
    return true;
}

const packed_t *get_packed(PyObject *obj, const char *name) {
    if (!PyObject_TypeCheck(obj, &PackedType)) {
        PyErr_Format(PyExc_TypeError, "%s must be a packed matrix (cellserve.kernels._native.Packed)", name);
        return nullptr;
    }
    return &((PackedObject *)obj)->p;
}

bool check_args(Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi, const char *fname) {
    if (nargs < lo || nargs > hi) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd arguments, got %zd", fname, lo, hi, nargs);
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------- drivers */

int threads_for(double macs, int panels) {
    int t = tls_threads;
    if (t <= 1 || macs < PARALLEL_MIN_MACS) return 1;
    return t < panels ? t : panels;
}

void run_gemm(const gemm_t *g) {
    if (g->w->kind == PACK_BSR) {
        active->gemm_bsr(g, threads_for((double)g->m * g->w->nnz * BR, g->w->panels));
        return;
    }
    active->gemm_f32(g, threads_for((double)g->m * g->w->n * g->w->k, g->w->panels));
}

void run_qgemm(const qgemm_t *q) {
    active->gemm_s8(q, threads_for((double)q->m * q->w->n * q->w->kpad / 4, q->w->panels));
}

/* c = [addend +] x @ W^T [+ bias] for fp32 or int8 W (x quantized per row on the way in). */
void linear(const packed_t *w, const float *x, ptrdiff_t ldx, int m, float *c, ptrdiff_t ldc, const float *addend,
            ptrdiff_t ld_add, const float *bias) {
    if (m == 0) return;
    if (w->kind != PACK_S8) {
        gemm_t g = {x, ldx, w, m, c, ldc, addend, ld_add, bias};
        run_gemm(&g);
        return;
    }
    const isa_t *isa = active;
    uint8_t *codes = (uint8_t *)scratch(SLOT_CODES, (size_t)m * w->kpad);
    float *scales = (float *)scratch(SLOT_SCALES, (size_t)m * sizeof(float));
    int32_t *sums = (int32_t *)scratch(SLOT_SUMS, (size_t)m * sizeof(int32_t));
    const int is_unsigned = unsigned_codes(isa, w);
    isa->quantize(x, ldx, m, w->k, w->kpad, w->act_scale, is_unsigned, codes, scales, sums);
    qgemm_t q = {w, {codes, scales, sums, is_unsigned}, m, c, nullptr, ldc, addend, ld_add, bias};
    run_qgemm(&q);
}

/* gates = x @ W_ih^T + h @ W_hh^T + bias, as two passes: at batch 1 each matrix then streams from memory
 * in one sequential run, measured 1.4x faster than alternating the two matrices panel by panel. */
void two_linear(const packed_t *wi, const float *x, ptrdiff_t ldx, const packed_t *wh, const float *h, ptrdiff_t ldh,
                int m, float *gates, const float *bias) {
    linear(wi, x, ldx, m, gates, wi->n, nullptr, 0, nullptr);
    linear(wh, h, ldh, m, gates, wh->n, gates, wh->n, bias);
}

/* ---------------------------------------------------------------- Python functions */

PyObject *py_pack_f32(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 1, 1, "pack_f32")) return nullptr;
    Buf w;
    if (!get_buf(args[0], w, 'f', 2, false, "weight")) return nullptr;
    const int n = (int)w.dim(0), k = (int)w.dim(1);
    PackedObject *obj = new_packed();
    if (!obj) return nullptr;
    packed_t &p = obj->p;
    p.kind = PACK_F32;
    p.bits = 32;
    p.n = n;
    p.k = k;
    p.kpad = k;
    p.panels = (n + NR - 1) / NR;
    p.panel_stride = (size_t)k * NR;
    p.data = aligned_zeros(p.panels * p.panel_stride * sizeof(float));
    if (!p.data) {
        Py_DECREF(obj);
        return PyErr_NoMemory();
    }
    float *dst = (float *)p.data;
    const float *src = w.data<float>();
    const ptrdiff_t ld = w.ld();
    for (int col = 0; col < n; col++) {
        float *panel = dst + (size_t)(col / NR) * p.panel_stride + col % NR;
        const float *row = src + col * ld;
        for (int kk = 0; kk < k; kk++) panel[(size_t)kk * NR] = row[kk];
    }
    return (PyObject *)obj;
}

/* pack_bsr(weight (n, k) float32): a block-sparse matrix: blocks of BR rows x 1 column that are all zero
 * are dropped; the product visits only the others. */
PyObject *py_pack_bsr(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 1, 1, "pack_bsr")) return nullptr;
    Buf w;
    if (!get_buf(args[0], w, 'f', 2, false, "weight")) return nullptr;
    const int n = (int)w.dim(0), k = (int)w.dim(1), groups = (n + BR - 1) / BR;
    const float *src = w.data<float>();
    const ptrdiff_t ld = w.ld();
    PackedObject *obj = new_packed();
    if (!obj) return nullptr;
    packed_t &p = obj->p;
    p.kind = PACK_BSR;
    p.bits = 32;
    p.n = n;
    p.k = k;
    p.kpad = k;
    p.panels = groups;
    p.bptr = (int32_t *)aligned_zeros((groups + 1) * sizeof(int32_t));
    size_t nnz = 0;
    for (int g = 0; g < groups; g++)
        for (int kk = 0; kk < k; kk++)
            for (int r = g * BR; r < g * BR + BR && r < n; r++)
                if (src[r * ld + kk] != 0.0f) {
                    nnz++;
                    break;
                }
    p.nnz = (int)nnz;
    p.bidx = (int32_t *)aligned_zeros(nnz * sizeof(int32_t) + 4);
    p.bvals = (float *)aligned_zeros(nnz * BR * sizeof(float) + 4);
    if (!p.bptr || !p.bidx || !p.bvals) {
        Py_DECREF(obj);
        return PyErr_NoMemory();
    }
    size_t b = 0;
    for (int g = 0; g < groups; g++) {
        p.bptr[g] = (int32_t)b;
        for (int kk = 0; kk < k; kk++) {
            bool any = false;
            for (int r = g * BR; r < g * BR + BR && r < n; r++) any |= src[r * ld + kk] != 0.0f;
            if (!any) continue;
            p.bidx[b] = kk;
            for (int r = g * BR; r < g * BR + BR && r < n; r++) p.bvals[b * BR + (r - g * BR)] = src[r * ld + kk];
            b++;
        }
    }
    p.bptr[groups] = (int32_t)b;
    return (PyObject *)obj;
}

/* The symmetric grids: int8 [-127, 127], 4-bit [-7, 7], ternary {-1, 0, 1}, binary {-1, 1}. */
bool on_grid(int v, int bits) {
    switch (bits) {
        case 8: return v >= -127;
        case 4: return v >= -7 && v <= 7;
        case 2: return v >= -1 && v <= 1;
        default: return v == -1 || v == 1;
    }
}

/* pack_s8(codes, scales, act_scale, bits=8): int8 codes q (n, k), or codes of a 4/2/1-bit grid (see
 * lowbit_affine) stored as fields several to a byte. */
PyObject *py_pack_s8(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 3, 4, "pack_s8")) return nullptr;
    Buf q, s;
    if (!get_buf(args[0], q, 'b', 2, false, "codes") || !get_buf(args[1], s, 'f', 1, false, "scales")) return nullptr;
    const double act_scale = PyFloat_AsDouble(args[2]);
    if (act_scale == -1.0 && PyErr_Occurred()) return nullptr;
    const long bits = nargs > 3 ? PyLong_AsLong(args[3]) : 8;
    if (bits == -1 && PyErr_Occurred()) return nullptr;
    if (bits != 8 && bits != 4 && bits != 2 && bits != 1)
        return PyErr_Format(PyExc_ValueError, "bits must be 8, 4, 2 or 1, got %ld", bits);
    const int n = (int)q.dim(0), k = (int)q.dim(1), groups = 8 / (int)bits;
    if (!check_len(s, n, "scales")) return nullptr;
    int fa, fb;
    lowbit_affine((int)bits, &fa, &fb);
    const int8_t *src = q.data<int8_t>();
    const ptrdiff_t ld = q.ld();
    for (int col = 0; col < n; col++)  /* every code must be one of the grid's values */
        for (int kk = 0; kk < k; kk++)
            if (!on_grid(src[col * ld + kk], (int)bits))
                return PyErr_Format(PyExc_ValueError, "code %d at (%d, %d) is not on the %ld-bit grid",
                                    (int)src[col * ld + kk], col, kk, bits);
    PackedObject *obj = new_packed();
    if (!obj) return nullptr;
    packed_t &p = obj->p;
    p.kind = PACK_S8;
    p.bits = (int)bits;
    p.n = n;
    p.k = k;
    p.kpad = (k + 4 * groups - 1) / (4 * groups) * (4 * groups);
    p.panels = (n + NR - 1) / NR;
    p.panel_stride = (size_t)p.kpad * NR / groups;
    p.act_scale = (float)act_scale;
    p.data = aligned_zeros(p.panels * p.panel_stride);
    p.scale = (float *)aligned_zeros(p.panels * NR * sizeof(float));
    p.colsum128 = (int32_t *)aligned_zeros(p.panels * NR * sizeof(int32_t));
    if (!p.data || !p.scale || !p.colsum128) {
        Py_DECREF(obj);
        return PyErr_NoMemory();
    }
    uint8_t *dst = (uint8_t *)p.data;
    for (int col = 0; col < n; col++) {
        uint8_t *panel = dst + (size_t)(col / NR) * p.panel_stride + (col % NR) * 4;
        const int8_t *row = src + col * ld;
        int32_t sum = 0;
        for (int kk = 0; kk < k; kk++) {
            const int group = kk / 4, field = group % groups;
            const int u = bits == 8 ? row[kk] : (row[kk] - fb) / fa;
            panel[(size_t)(group / groups) * NR * 4 + kk % 4] |= (uint8_t)((u & ((1 << bits) - 1)) << (field * bits));
            sum += u;
        }
        p.colsum128[col] = 128 * sum;
        p.scale[col] = s.data<float>()[col];
    }
    return (PyObject *)obj;
}

/* Packed.unpack(out): the (n, k) matrix back, fp32 weights or int8 codes. */
PyObject *py_unpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 1, 1, "unpack")) return nullptr;
    const packed_t &p = ((PackedObject *)self)->p;
    Buf out;
    if (!get_buf(args[0], out, p.kind == PACK_S8 ? 'b' : 'f', 2, true, "out") ||
        !check_shape2(out, p.n, p.k, "out"))
        return nullptr;
    const ptrdiff_t ld = out.ld();
    if (p.kind == PACK_BSR) {
        for (int r = 0; r < p.n; r++) memset(out.data<float>() + r * ld, 0, p.k * sizeof(float));
        for (int g = 0; g < p.panels; g++)
            for (int b = p.bptr[g]; b < p.bptr[g + 1]; b++)
                for (int r = g * BR; r < g * BR + BR && r < p.n; r++)
                    out.data<float>()[r * ld + p.bidx[b]] = p.bvals[(size_t)b * BR + (r - g * BR)];
        Py_RETURN_NONE;
    }
    for (int col = 0; col < p.n; col++) {
        if (p.kind == PACK_F32) {
            const float *panel = (const float *)p.data + (size_t)(col / NR) * p.panel_stride + col % NR;
            float *row = out.data<float>() + col * ld;
            for (int kk = 0; kk < p.k; kk++) row[kk] = panel[(size_t)kk * NR];
        } else {
            const int groups = 8 / p.bits, mask = (1 << p.bits) - 1;
            int fa, fb;
            lowbit_affine(p.bits, &fa, &fb);
            const uint8_t *panel = (const uint8_t *)p.data + (size_t)(col / NR) * p.panel_stride + (col % NR) * 4;
            int8_t *row = out.data<int8_t>() + col * ld;
            for (int kk = 0; kk < p.k; kk++) {
                const int group = kk / 4;
                const uint8_t byte = panel[(size_t)(group / groups) * NR * 4 + kk % 4];
                row[kk] = p.bits == 8 ? (int8_t)byte : (int8_t)(fa * ((byte >> ((group % groups) * p.bits)) & mask) + fb);
            }
        }
    }
    Py_RETURN_NONE;
}

PyObject *packed_get_n(PackedObject *self, void *) { return PyLong_FromLong(self->p.n); }
PyObject *packed_get_k(PackedObject *self, void *) { return PyLong_FromLong(self->p.k); }
PyObject *packed_get_kind(PackedObject *self, void *) {
    return PyUnicode_FromString(self->p.kind == PACK_F32 ? "f32" : self->p.kind == PACK_BSR ? "bsr" : "s8");
}
PyObject *packed_get_act_scale(PackedObject *self, void *) { return PyFloat_FromDouble(self->p.act_scale); }
PyObject *packed_get_bits(PackedObject *self, void *) { return PyLong_FromLong(self->p.kind == PACK_F32 ? 32 : self->p.bits); }
PyObject *packed_get_nbytes(PackedObject *self, void *) {
    const packed_t &p = self->p;
    if (p.kind == PACK_BSR)
        return PyLong_FromSize_t((size_t)p.nnz * (BR * sizeof(float) + sizeof(int32_t)) + (p.panels + 1) * sizeof(int32_t));
    size_t bytes = p.panels * p.panel_stride * (p.kind == PACK_F32 ? sizeof(float) : 1);
    if (p.kind == PACK_S8) bytes += p.panels * NR * (sizeof(float) + sizeof(int32_t));
    return PyLong_FromSize_t(bytes);
}

/* gemm(x, w, out, addend=None, bias=None): out = [addend +] x @ W^T [+ bias] */
PyObject *py_gemm(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 3, 5, "gemm")) return nullptr;
    const packed_t *w = get_packed(args[1], "w");
    if (!w) return nullptr;
    PyObject *addend_obj = nargs > 3 ? args[3] : Py_None, *bias_obj = nargs > 4 ? args[4] : Py_None;
    Buf x, out, addend, bias;
    if (!get_buf(args[0], x, 'f', 2, false, "x") || !get_buf(args[2], out, 'f', 2, true, "out") ||
        !optional_buf(addend_obj, addend, 'f', 2, false, "addend") || !optional_buf(bias_obj, bias, 'f', 1, false, "bias"))
        return nullptr;
    const ptrdiff_t m = x.dim(0);
    if (x.dim(1) != w->k) return PyErr_Format(PyExc_ValueError, "x has %zd columns, the matrix takes %d", x.dim(1), w->k);
    if (!check_shape2(out, m, w->n, "out")) return nullptr;
    if (addend_obj != Py_None && !check_shape2(addend, m, w->n, "addend")) return nullptr;
    if (bias_obj != Py_None && !check_len(bias, w->n, "bias")) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    linear(w, x.data<float>(), x.ld(), (int)m, out.data<float>(), out.ld(), optional_data<float>(addend_obj, addend),
           addend_obj == Py_None ? 0 : addend.ld(), optional_data<float>(bias_obj, bias));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gemm_s32(codes, w, out): out = codes @ Q^T in exact int32 (int8 matrices; tests the integer kernels). */
PyObject *py_gemm_s32(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 3, 3, "gemm_s32")) return nullptr;
    const packed_t *w = get_packed(args[1], "w");
    if (!w) return nullptr;
    if (w->kind != PACK_S8) return PyErr_Format(PyExc_TypeError, "gemm_s32 needs an int8 matrix");
    Buf x, out;
    if (!get_buf(args[0], x, 'b', 2, false, "codes") || !get_buf(args[2], out, 'i', 2, true, "out")) return nullptr;
    const ptrdiff_t m = x.dim(0);
    if (x.dim(1) != w->k) return PyErr_Format(PyExc_ValueError, "codes have %zd columns, the matrix takes %d", x.dim(1), w->k);
    if (!check_shape2(out, m, w->n, "out")) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    const isa_t *isa = active;
    uint8_t *codes = (uint8_t *)scratch(SLOT_CODES, (size_t)m * w->kpad + 1);
    int32_t *sums = (int32_t *)scratch(SLOT_SUMS, (size_t)m * sizeof(int32_t) + 4);
    const int is_unsigned = unsigned_codes(isa, w);
    const uint8_t flip = is_unsigned ? 0x80 : 0;
    for (ptrdiff_t r = 0; r < m; r++) {
        const int8_t *row = x.data<int8_t>() + r * x.ld();
        uint8_t *dst = codes + r * w->kpad;
        int32_t sum = 0;
        for (int kk = 0; kk < w->kpad; kk++) {
            const int8_t v = kk < w->k ? row[kk] : 0;
            sum += v;
            dst[kk] = (uint8_t)v ^ flip;
        }
        sums[r] = sum;
    }
    qgemm_t q = {w, {codes, nullptr, sums, is_unsigned}, (int)m, nullptr, out.data<int32_t>(), out.ld(), nullptr,
                 0, nullptr};
    run_qgemm(&q);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* quantize(x, static_scale, codes, scales): int8 codes per row, the rule every int8 product uses. */
PyObject *py_quantize(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 4, 4, "quantize")) return nullptr;
    Buf x, codes, scales;
    const double static_scale = PyFloat_AsDouble(args[1]);
    if (static_scale == -1.0 && PyErr_Occurred()) return nullptr;
    if (!get_buf(args[0], x, 'f', 2, false, "x") || !get_buf(args[2], codes, 'b', 2, true, "codes") ||
        !get_buf(args[3], scales, 'f', 1, true, "scales"))
        return nullptr;
    if (!check_shape2(codes, x.dim(0), x.dim(1), "codes") || !check_len(scales, x.dim(0), "scales")) return nullptr;
    if (codes.ld() != x.dim(1)) return PyErr_Format(PyExc_ValueError, "codes must be C-contiguous");
    Py_BEGIN_ALLOW_THREADS
    active->quantize(x.data<float>(), x.ld(), (int)x.dim(0), (int)x.dim(1), (int)x.dim(1), (float)static_scale, 0,
                     codes.data<uint8_t>(), scales.data<float>(), nullptr);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

bool get_float(PyObject *obj, float *out) {
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return false;
    *out = (float)v;
    return true;
}

bool check_lstm_weights(const packed_t *wi, const packed_t *wh, ptrdiff_t hidden) {
    if (wh->n != 4 * hidden || wh->k != hidden || (wi && wi->n != 4 * hidden)) {
        PyErr_Format(PyExc_ValueError, "LSTM weights must be (4H, in) and (4H, H) with H = %zd", hidden);
        return false;
    }
    return true;
}

/* lstm_step(x, h, c, w_ih, w_hh, bias, h_out, c_out, cell_step, cell_limit): one step for a batch. */
PyObject *py_lstm_step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 10, 10, "lstm_step")) return nullptr;
    const packed_t *wi = get_packed(args[3], "w_ih"), *wh = wi ? get_packed(args[4], "w_hh") : nullptr;
    if (!wh) return nullptr;
    Buf x, h, c, bias, h_out, c_out;
    float cell_step, cell_limit;
    if (!get_buf(args[0], x, 'f', 2, false, "x") || !get_buf(args[1], h, 'f', 2, false, "h") ||
        !get_buf(args[2], c, 'f', 2, false, "c") || !get_buf(args[5], bias, 'f', 1, false, "bias") ||
        !get_buf(args[6], h_out, 'f', 2, true, "h_out") || !get_buf(args[7], c_out, 'f', 2, true, "c_out") ||
        !get_float(args[8], &cell_step) || !get_float(args[9], &cell_limit))
        return nullptr;
    const ptrdiff_t batch = x.dim(0), hidden = h.dim(1);
    if (!check_lstm_weights(wi, wh, hidden) || !check_shape2(x, batch, wi->k, "x") ||
        !check_shape2(h, batch, hidden, "h") || !check_shape2(c, batch, hidden, "c") ||
        !check_len(bias, 4 * hidden, "bias") || !check_shape2(h_out, batch, hidden, "h_out") ||
        !check_shape2(c_out, batch, hidden, "c_out"))
        return nullptr;
    if (c_out.data<float>() != c.data<float>() && c_out.ld() != c.ld())
        return PyErr_Format(PyExc_ValueError, "c and c_out must have the same row stride");
    Py_BEGIN_ALLOW_THREADS
    float *gates = (float *)scratch(SLOT_GATES, (size_t)batch * 4 * hidden * sizeof(float));
    two_linear(wi, x.data<float>(), x.ld(), wh, h.data<float>(), h.ld(), (int)batch, gates, bias.data<float>());
    active->lstm_gates(gates, (int)batch, (int)hidden, c.data<float>(), c.ld(), h_out.data<float>(), h_out.ld(),
                       c_out.data<float>(), cell_step, cell_limit);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* lstm_sequence(gi_all, w_hh, bias, h0, c, hs, cell_step, cell_limit): T steps; gi_all (T, B, 4H) holds the
 * input projections, hs (T, B, H) receives every h; c (B, H) is updated in place. */
PyObject *py_lstm_sequence(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 8, 8, "lstm_sequence")) return nullptr;
    const packed_t *wh = get_packed(args[1], "w_hh");
    if (!wh) return nullptr;
    Buf gi, bias, h0, c, hs;
    float cell_step, cell_limit;
    if (!get_buf(args[0], gi, 'f', 3, false, "gi_all") || !get_buf(args[2], bias, 'f', 1, false, "bias") ||
        !get_buf(args[3], h0, 'f', 2, false, "h0") || !get_buf(args[4], c, 'f', 2, true, "c") ||
        !get_buf(args[5], hs, 'f', 3, true, "hs") || !get_float(args[6], &cell_step) ||
        !get_float(args[7], &cell_limit))
        return nullptr;
    const ptrdiff_t steps = gi.dim(0), batch = gi.dim(1), hidden = h0.dim(1);
    if (!check_lstm_weights(nullptr, wh, hidden) || gi.dim(2) != 4 * hidden || !check_shape2(h0, batch, hidden, "h0") ||
        !check_shape2(c, batch, hidden, "c") || !check_len(bias, 4 * hidden, "bias") || hs.dim(0) != steps ||
        hs.dim(1) != batch || hs.dim(2) != hidden) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "lstm_sequence: inconsistent shapes");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    float *gates = (float *)scratch(SLOT_GATES, (size_t)batch * 4 * hidden * sizeof(float));
    const float *h_prev = h0.data<float>();
    ptrdiff_t ld_prev = h0.ld();
    for (ptrdiff_t t = 0; t < steps; t++) {
        const float *gi_t = gi.data<float>() + t * batch * 4 * hidden;
        float *h_t = hs.data<float>() + t * batch * hidden;
        linear(wh, h_prev, ld_prev, (int)batch, gates, 4 * hidden, gi_t, 4 * hidden, bias.data<float>());
        active->lstm_gates(gates, (int)batch, (int)hidden, c.data<float>(), c.ld(), h_t, hidden, c.data<float>(),
                           cell_step, cell_limit);
        h_prev = h_t;
        ld_prev = hidden;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

bool check_gru_weights(const packed_t *wi, const packed_t *wh, ptrdiff_t hidden) {
    if (wh->n != 3 * hidden || wh->k != hidden || (wi && wi->n != 3 * hidden)) {
        PyErr_Format(PyExc_ValueError, "GRU weights must be (3H, in) and (3H, H) with H = %zd", hidden);
        return false;
    }
    return true;
}

/* gru_step(x, h, w_ih, w_hh, b_ih, b_hh, h_out) */
PyObject *py_gru_step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 7, 7, "gru_step")) return nullptr;
    const packed_t *wi = get_packed(args[2], "w_ih"), *wh = wi ? get_packed(args[3], "w_hh") : nullptr;
    if (!wh) return nullptr;
    Buf x, h, b_ih, b_hh, h_out;
    if (!get_buf(args[0], x, 'f', 2, false, "x") || !get_buf(args[1], h, 'f', 2, false, "h") ||
        !get_buf(args[4], b_ih, 'f', 1, false, "b_ih") || !get_buf(args[5], b_hh, 'f', 1, false, "b_hh") ||
        !get_buf(args[6], h_out, 'f', 2, true, "h_out"))
        return nullptr;
    const ptrdiff_t batch = x.dim(0), hidden = h.dim(1);
    if (!check_gru_weights(wi, wh, hidden) || !check_shape2(x, batch, wi->k, "x") ||
        !check_shape2(h, batch, hidden, "h") || !check_len(b_ih, 3 * hidden, "b_ih") ||
        !check_len(b_hh, 3 * hidden, "b_hh") || !check_shape2(h_out, batch, hidden, "h_out"))
        return nullptr;
    Py_BEGIN_ALLOW_THREADS
    float *gi = (float *)scratch(SLOT_GATES, (size_t)batch * 3 * hidden * sizeof(float));
    float *gh = (float *)scratch(SLOT_GATES2, (size_t)batch * 3 * hidden * sizeof(float));
    linear(wi, x.data<float>(), x.ld(), (int)batch, gi, 3 * hidden, nullptr, 0, nullptr);
    linear(wh, h.data<float>(), h.ld(), (int)batch, gh, 3 * hidden, nullptr, 0, nullptr);
    active->gru_gates(gi, 3 * hidden, gh, b_ih.data<float>(), b_hh.data<float>(), h.data<float>(), h.ld(), (int)batch,
                      (int)hidden, h_out.data<float>(), h_out.ld());
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gru_sequence(gi_all, w_hh, b_ih, b_hh, h0, hs): gi_all (T, B, 3H) = x W_ih^T without bias. */
PyObject *py_gru_sequence(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 6, 6, "gru_sequence")) return nullptr;
    const packed_t *wh = get_packed(args[1], "w_hh");
    if (!wh) return nullptr;
    Buf gi, b_ih, b_hh, h0, hs;
    if (!get_buf(args[0], gi, 'f', 3, false, "gi_all") || !get_buf(args[2], b_ih, 'f', 1, false, "b_ih") ||
        !get_buf(args[3], b_hh, 'f', 1, false, "b_hh") || !get_buf(args[4], h0, 'f', 2, false, "h0") ||
        !get_buf(args[5], hs, 'f', 3, true, "hs"))
        return nullptr;
    const ptrdiff_t steps = gi.dim(0), batch = gi.dim(1), hidden = h0.dim(1);
    if (!check_gru_weights(nullptr, wh, hidden) || gi.dim(2) != 3 * hidden || !check_shape2(h0, batch, hidden, "h0") ||
        !check_len(b_ih, 3 * hidden, "b_ih") || !check_len(b_hh, 3 * hidden, "b_hh") || hs.dim(0) != steps ||
        hs.dim(1) != batch || hs.dim(2) != hidden) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "gru_sequence: inconsistent shapes");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    float *gh = (float *)scratch(SLOT_GATES2, (size_t)batch * 3 * hidden * sizeof(float));
    const float *h_prev = h0.data<float>();
    ptrdiff_t ld_prev = h0.ld();
    for (ptrdiff_t t = 0; t < steps; t++) {
        float *h_t = hs.data<float>() + t * batch * hidden;
        linear(wh, h_prev, ld_prev, (int)batch, gh, 3 * hidden, nullptr, 0, nullptr);
        active->gru_gates(gi.data<float>() + t * batch * 3 * hidden, 3 * hidden, gh, b_ih.data<float>(),
                          b_hh.data<float>(), h_prev, ld_prev, (int)batch, (int)hidden, h_t, hidden);
        h_prev = h_t;
        ld_prev = hidden;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* sru_steps(xs, w, v_f, v_r, b_f, b_r, c, hs, use_tanh): k steps of an SRU layer for a batch. The input
 * projections of all k steps are one product (the weights are read once per k steps), then the scan.
 * xs (T, B, in) C-contiguous; w (3H or 4H, in); c (B, H) updated in place; hs (T, B, H). */
PyObject *py_sru_steps(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 9, 9, "sru_steps")) return nullptr;
    const packed_t *w = get_packed(args[1], "w");
    if (!w) return nullptr;
    Buf xs, v_f, v_r, b_f, b_r, c, hs;
    const int use_tanh = PyObject_IsTrue(args[8]);
    if (use_tanh < 0 || !get_buf(args[0], xs, 'f', 3, false, "xs") || !get_buf(args[2], v_f, 'f', 1, false, "v_f") ||
        !get_buf(args[3], v_r, 'f', 1, false, "v_r") || !get_buf(args[4], b_f, 'f', 1, false, "b_f") ||
        !get_buf(args[5], b_r, 'f', 1, false, "b_r") || !get_buf(args[6], c, 'f', 2, true, "c") ||
        !get_buf(args[7], hs, 'f', 3, true, "hs"))
        return nullptr;
    const ptrdiff_t steps = xs.dim(0), batch = xs.dim(1), hidden = c.dim(1);
    const bool highway_in_w = w->n == 4 * hidden;
    if (xs.dim(2) != w->k || (w->n != 3 * hidden && !highway_in_w) || (!highway_in_w && w->k != hidden) ||
        !check_shape2(c, batch, hidden, "c") || c.ld() != hidden || hs.dim(0) != steps || hs.dim(1) != batch ||
        hs.dim(2) != hidden || !check_len(v_f, hidden, "v_f") || !check_len(v_r, hidden, "v_r") ||
        !check_len(b_f, hidden, "b_f") || !check_len(b_r, hidden, "b_r")) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "sru_steps: inconsistent shapes");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    const ptrdiff_t rows = steps * batch;
    float *u = (float *)scratch(SLOT_GATES, (size_t)rows * w->n * sizeof(float));
    linear(w, xs.data<float>(), w->k, (int)rows, u, w->n, nullptr, 0, nullptr);
    active->sru_scan(u, w->n, xs.data<float>(), (int)steps, (int)batch, (int)hidden, v_f.data<float>(),
                     v_r.data<float>(), b_f.data<float>(), b_r.data<float>(), use_tanh, c.data<float>(),
                     hs.data<float>());
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* qrnn_steps(windowed, w, bias, c, hs): k steps of a QRNN layer; windowed (T, B, window*in) holds
 * [x_{t-1}, x_t] (window 2) or x_t, so the gates of all k steps are one product. */
PyObject *py_qrnn_steps(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 5, 5, "qrnn_steps")) return nullptr;
    const packed_t *w = get_packed(args[1], "w");
    if (!w) return nullptr;
    Buf xs, bias, c, hs;
    if (!get_buf(args[0], xs, 'f', 3, false, "windowed") || !get_buf(args[2], bias, 'f', 1, false, "bias") ||
        !get_buf(args[3], c, 'f', 2, true, "c") || !get_buf(args[4], hs, 'f', 3, true, "hs"))
        return nullptr;
    const ptrdiff_t steps = xs.dim(0), batch = xs.dim(1), hidden = c.dim(1);
    if (xs.dim(2) != w->k || w->n != 3 * hidden || !check_shape2(c, batch, hidden, "c") || c.ld() != hidden ||
        hs.dim(0) != steps || hs.dim(1) != batch || hs.dim(2) != hidden || !check_len(bias, 3 * hidden, "bias")) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "qrnn_steps: inconsistent shapes");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    const ptrdiff_t rows = steps * batch;
    float *u = (float *)scratch(SLOT_GATES, (size_t)rows * w->n * sizeof(float));
    linear(w, xs.data<float>(), w->k, (int)rows, u, w->n, nullptr, 0, nullptr);
    active->qrnn_scan(u, (int)steps, (int)batch, (int)hidden, bias.data<float>(), c.data<float>(), hs.data<float>());
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- settings */

PyObject *py_set_threads(PyObject *, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 1 || n > 256) return PyErr_Format(PyExc_ValueError, "threads must be in [1, 256], got %ld", n);
    tls_threads = (int)n;
    Py_RETURN_NONE;
}

PyObject *py_get_threads(PyObject *, PyObject *) { return PyLong_FromLong(tls_threads); }

PyObject *py_isa(PyObject *, PyObject *) { return PyUnicode_FromString(active->name); }

PyObject *py_isas(PyObject *, PyObject *) {
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < NUM_ISAS; i++) {
        if (!ISAS[i]->supported()) continue;
        PyObject *name = PyUnicode_FromString(ISAS[i]->name);
        if (!name || PyList_Append(list, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(list);
            return nullptr;
        }
        Py_DECREF(name);
    }
    return list;
}

const isa_t *find_isa(const char *name) {
    for (int i = 0; i < NUM_ISAS; i++)
        if (strcmp(ISAS[i]->name, name) == 0) return ISAS[i];
    return nullptr;
}

bool select_isa(const char *name) {
    const isa_t *isa = find_isa(name);
    if (!isa) {
        PyErr_Format(PyExc_ValueError, "unknown ISA path %s (choose portable, avx2 or avx512)", name);
        return false;
    }
    if (!isa->supported()) {
        PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the %s path", name);
        return false;
    }
    active = isa;
    return true;
}

PyObject *py_set_isa(PyObject *, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name || !select_isa(name)) return nullptr;
    Py_RETURN_NONE;
}

PyMethodDef PACKED_METHODS[] = {
    {"unpack", (PyCFunction)(void (*)(void))py_unpack, METH_FASTCALL,
     "unpack(out): write the (n, k) matrix (fp32 weights or int8 codes) into out"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef PACKED_GETSET[] = {
    {"n", (getter)packed_get_n, nullptr, "output features (rows of W)", nullptr},
    {"k", (getter)packed_get_k, nullptr, "input features (columns of W)", nullptr},
    {"kind", (getter)packed_get_kind, nullptr, "'f32' or 's8'", nullptr},
    {"act_scale", (getter)packed_get_act_scale, nullptr, "int8: fixed activation step (0: dynamic)", nullptr},
    {"bits", (getter)packed_get_bits, nullptr, "bits per weight: 32, 8, 4, 2 or 1", nullptr},
    {"nbytes", (getter)packed_get_nbytes, nullptr, "bytes held, panels padded", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, doc}
PyMethodDef METHODS[] = {
    FAST(pack_f32, "pack_f32(weight (n, k) float32) -> Packed"),
    FAST(pack_s8, "pack_s8(codes (n, k) int8, scales (n,) float32, act_scale, bits=8) -> Packed"),
    FAST(pack_bsr, "pack_bsr(weight (n, k) float32) -> Packed: all-zero blocks of 16 rows x 1 column dropped"),
    FAST(gemm, "gemm(x, w, out, addend=None, bias=None): out = [addend +] x @ W^T [+ bias]"),
    FAST(gemm_s32, "gemm_s32(codes int8, w int8-packed, out int32): exact integer product"),
    FAST(quantize, "quantize(x, static_scale, codes, scales): int8 codes per row (0: dynamic scale)"),
    FAST(lstm_step, "lstm_step(x, h, c, w_ih, w_hh, bias, h_out, c_out, cell_step, cell_limit)"),
    FAST(lstm_sequence, "lstm_sequence(gi_all, w_hh, bias, h0, c, hs, cell_step, cell_limit)"),
    FAST(gru_step, "gru_step(x, h, w_ih, w_hh, b_ih, b_hh, h_out)"),
    FAST(gru_sequence, "gru_sequence(gi_all, w_hh, b_ih, b_hh, h0, hs)"),
    FAST(sru_steps, "sru_steps(xs, w, v_f, v_r, b_f, b_r, c, hs, use_tanh)"),
    FAST(qrnn_steps, "qrnn_steps(windowed, w, bias, c, hs)"),
    {"set_threads", py_set_threads, METH_O, "threads for the products run by the calling thread (default 1)"},
    {"get_threads", py_get_threads, METH_NOARGS, "the calling thread's thread count"},
    {"isa", py_isa, METH_NOARGS, "the instruction-set path in use"},
    {"isas", py_isas, METH_NOARGS, "the paths this CPU can run, best first"},
    {"set_isa", py_set_isa, METH_O, "switch the instruction-set path (portable, avx2, avx512)"},
    {nullptr, nullptr, 0, nullptr}};
#undef FAST

PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", "cellserve's native kernel core", -1, METHODS};

}  // namespace

/* Per-thread scratch: a calling thread's gates, quantized activations and packed rows of A. */
namespace {
struct Scratch {
    void *ptr[NUM_SLOTS] = {};
    size_t size[NUM_SLOTS] = {};
    ~Scratch() {
        for (void *p : ptr) free(p);
    }
};
thread_local Scratch scratch_buffers;
}  // namespace

void *scratch(int slot, size_t bytes) {
    Scratch &s = scratch_buffers;
    if (bytes > s.size[slot]) {
        free(s.ptr[slot]);
        s.size[slot] = bytes + bytes / 2;
        s.ptr[slot] = aligned_zeros(s.size[slot]);
        if (!s.ptr[slot]) s.size[slot] = 0;
    }
    return s.ptr[slot];
}

PyMODINIT_FUNC PyInit__native(void) {
    PackedType.tp_name = "cellserve.kernels._native.Packed";
    PackedType.tp_basicsize = sizeof(PackedObject);
    PackedType.tp_dealloc = (destructor)packed_dealloc;
    PackedType.tp_flags = Py_TPFLAGS_DEFAULT;
    PackedType.tp_doc = "A weight matrix packed once into the panel layout the micro-kernels stream.";
    PackedType.tp_methods = PACKED_METHODS;
    PackedType.tp_getset = PACKED_GETSET;
    if (PyType_Ready(&PackedType) < 0) return nullptr;

    for (int i = 0; i < NUM_ISAS; i++)
        if (ISAS[i]->supported()) {
            active = ISAS[i];
            break;
        }
    const char *forced = getenv("CELLSERVE_ISA");
    if (forced && *forced && !select_isa(forced)) return nullptr;

    PyObject *m = PyModule_Create(&MODULE);
    if (!m) return nullptr;
    Py_INCREF(&PackedType);
    if (PyModule_AddObject(m, "Packed", (PyObject *)&PackedType) < 0 || PyModule_AddIntConstant(m, "NR", NR) < 0) {
        Py_DECREF(&PackedType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
