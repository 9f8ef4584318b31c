/* cellserve.kernels._native: the Python face of the native kernel core.
 *
 * Plain CPython C API with METH_FASTCALL and the buffer protocol: no build dependency beyond a C++
 * compiler, and about 0.1 us per call (a batch-1 cell step of a small model takes 10-20 us, so call
 * overhead matters). Callers allocate outputs (numpy arrays); this module never imports numpy. It checks
 * arguments and calls packing.cpp and drivers.cpp; every call releases the GIL while it computes, so the
 * server's event loop keeps running.
 *
 * ISA paths (platform.cpp): the best the CPU supports (avx512-vbmi-bf16 > avx512-bf16 > avx512-vbmi > avx512 > avx2 > portable) is chosen
 * at import; CELLSERVE_ISA=<a path's name> forces one, and set_isa() switches at run time
 * (tests).
 *
 * Why one file of ~580 lines: it is one concern, the CPython surface. Most of it is argument checking,
 * each of the 16 entry points naming its own array shapes in its error messages, over shared buffer helpers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "native.h"

namespace {

/* ---------------------------------------------------------------- packed matrices */

typedef struct {
    PyObject_HEAD
    packed_t p;
} PackedObject;

void packed_dealloc(PackedObject *self) {
    packed_free(&self->p);
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

bool get_float(PyObject *obj, float *out) {
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return false;
    *out = (float)v;
    return true;
}

/* ---------------------------------------------------------------- packing */

PyObject *packed_or_error(PackedObject *obj, int rc) {
    if (rc == 0) return (PyObject *)obj;
    Py_DECREF(obj);
    return PyErr_NoMemory();
}

/* An fp32 (n, k) weight packed by `pack` (pack_f32, pack_bsr or pack_bf16). */
PyObject *pack_fp32(PyObject *const *args, Py_ssize_t nargs, const char *fname,
                    int (*pack)(packed_t *, const float *, ptrdiff_t, int, int)) {
    Buf w;
    if (!check_args(nargs, 1, 1, fname) || !get_buf(args[0], w, 'f', 2, false, "weight")) return nullptr;
    PackedObject *obj = new_packed();
    if (!obj) return nullptr;
    return packed_or_error(obj, pack(&obj->p, w.data<float>(), w.ld(), (int)w.dim(0), (int)w.dim(1)));
}

/* pack_f32(weight (n, k) float32) */
PyObject *py_pack_f32(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    return pack_fp32(args, nargs, "pack_f32", pack_f32);
}

/* pack_bf16(weight (n, k) float32): rounded to the nearest even bf16, in the bf16 panel layout. */
PyObject *py_pack_bf16(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    return pack_fp32(args, nargs, "pack_bf16", pack_bf16);
}

/* pack_bsr(weight (n, k) float32): a block-sparse matrix (all-zero blocks of BR rows x 1 column dropped). */
PyObject *py_pack_bsr(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    return pack_fp32(args, nargs, "pack_bsr", pack_bsr);
}

/* pack_s8(codes, scales, act_scale, bits=8): int8 codes q (n, k), or codes of a 4/2/1-bit grid. */
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
    const int n = (int)q.dim(0), k = (int)q.dim(1);
    if (!check_len(s, n, "scales")) return nullptr;
    const long off = off_grid(q.data<int8_t>(), q.ld(), n, k, (int)bits);
    if (off >= 0)
        return PyErr_Format(PyExc_ValueError, "code %d at (%ld, %ld) is not on the %ld-bit grid",
                            (int)q.data<int8_t>()[(off / k) * q.ld() + off % k], off / k, off % k, bits);
    PackedObject *obj = new_packed();
    if (!obj) return nullptr;
    return packed_or_error(obj, pack_s8(&obj->p, q.data<int8_t>(), q.ld(), n, k, s.data<float>(), (float)act_scale,
                                        (int)bits));
}

/* Packed.unpack(out): the (n, k) matrix back, fp32 weights or int8 codes. */
PyObject *py_unpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_args(nargs, 1, 1, "unpack")) return nullptr;
    const packed_t &p = ((PackedObject *)self)->p;
    Buf out;
    if (!get_buf(args[0], out, p.kind == PACK_S8 ? 'b' : 'f', 2, true, "out") || !check_shape2(out, p.n, p.k, "out"))
        return nullptr;
    unpack(&p, out.view.buf, out.ld());
    Py_RETURN_NONE;
}

PyObject *packed_get_n(PackedObject *self, void *) { return PyLong_FromLong(self->p.n); }
PyObject *packed_get_k(PackedObject *self, void *) { return PyLong_FromLong(self->p.k); }
PyObject *packed_get_kind(PackedObject *self, void *) {
    static const char *names[] = {"f32", "s8", "bsr", "bf16"};
    return PyUnicode_FromString(names[self->p.kind]);
}
PyObject *packed_get_act_scale(PackedObject *self, void *) { return PyFloat_FromDouble(self->p.act_scale); }
PyObject *packed_get_bits(PackedObject *self, void *) { return PyLong_FromLong(self->p.kind == PACK_F32 ? 32 : self->p.bits); }
PyObject *packed_get_nbytes(PackedObject *self, void *) { return PyLong_FromSize_t(packed_nbytes(&self->p)); }

/* ---------------------------------------------------------------- products */

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
    gemm_s32(w, x.data<int8_t>(), x.ld(), (int)m, out.data<int32_t>(), out.ld());
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
    quantize(x.data<float>(), x.ld(), (int)x.dim(0), (int)x.dim(1), (float)static_scale, codes.data<uint8_t>(),
             scales.data<float>());
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- recurrences */

/* A gated cell's packed weights, checked: w_ih (G*H, in) (unless wi_obj is null) and w_hh (G*H, H). */
bool get_cell_weights(PyObject *wi_obj, PyObject *wh_obj, int gates, ptrdiff_t hidden, const char *cell,
                      const packed_t **wi, const packed_t **wh) {
    *wi = wi_obj ? get_packed(wi_obj, "w_ih") : nullptr;
    if (wi_obj && !*wi) return false;
    *wh = get_packed(wh_obj, "w_hh");
    if (!*wh) return false;
    if ((*wh)->n != gates * hidden || (*wh)->k != hidden || (*wi && (*wi)->n != gates * hidden)) {
        PyErr_Format(PyExc_ValueError, "%s weights must be (%dH, in) and (%dH, H) with H = %zd", cell, gates, gates,
                     hidden);
        return false;
    }
    return true;
}

/* One step's x (B, in) and h (B, H), and the cell's weights checked against them. */
struct StepArgs {
    Buf x, h;
    const packed_t *wi, *wh;
    ptrdiff_t batch, hidden;
};

bool get_step(PyObject *x, PyObject *h, PyObject *wi, PyObject *wh, int gates, const char *cell, StepArgs &a) {
    if (!get_buf(x, a.x, 'f', 2, false, "x") || !get_buf(h, a.h, 'f', 2, false, "h")) return false;
    a.batch = a.x.dim(0);
    a.hidden = a.h.dim(1);
    return get_cell_weights(wi, wh, gates, a.hidden, cell, &a.wi, &a.wh) && check_shape2(a.x, a.batch, a.wi->k, "x") &&
           check_shape2(a.h, a.batch, a.hidden, "h");
}

/* A sequence's gi_all (T, B, G*H) input projections, h0 (B, H) and hs (T, B, H), with w_hh checked. */
struct SequenceArgs {
    Buf gi, h0, hs;
    const packed_t *wh;
    ptrdiff_t steps, batch, hidden;
};

bool get_sequence(PyObject *gi, PyObject *wh, PyObject *h0, PyObject *hs, int gates, const char *cell,
                  SequenceArgs &a) {
    const packed_t *unused;
    if (!get_buf(gi, a.gi, 'f', 3, false, "gi_all") || !get_buf(h0, a.h0, 'f', 2, false, "h0") ||
        !get_buf(hs, a.hs, 'f', 3, true, "hs"))
        return false;
    a.steps = a.gi.dim(0);
    a.batch = a.gi.dim(1);
    a.hidden = a.h0.dim(1);
    if (!get_cell_weights(nullptr, wh, gates, a.hidden, cell, &unused, &a.wh)) return false;
    if (a.gi.dim(2) != gates * a.hidden || a.hs.dim(0) != a.steps || a.hs.dim(1) != a.batch || a.hs.dim(2) != a.hidden) {
        PyErr_Format(PyExc_ValueError, "%s sequence: inconsistent shapes", cell);
        return false;
    }
    return check_shape2(a.h0, a.batch, a.hidden, "h0");
}

/* lstm_step(x, h, c, w_ih, w_hh, bias, h_out, c_out, cell_step, cell_limit): one step for a batch. */
PyObject *py_lstm_step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    StepArgs a;
    Buf c, bias, h_out, c_out;
    float cell_step, cell_limit;
    if (!check_args(nargs, 10, 10, "lstm_step") || !get_step(args[0], args[1], args[3], args[4], 4, "LSTM", a) ||
        !get_buf(args[2], c, 'f', 2, false, "c") || !get_buf(args[5], bias, 'f', 1, false, "bias") ||
        !get_buf(args[6], h_out, 'f', 2, true, "h_out") || !get_buf(args[7], c_out, 'f', 2, true, "c_out") ||
        !get_float(args[8], &cell_step) || !get_float(args[9], &cell_limit) ||
        !check_shape2(c, a.batch, a.hidden, "c") || !check_len(bias, 4 * a.hidden, "bias") ||
        !check_shape2(h_out, a.batch, a.hidden, "h_out") || !check_shape2(c_out, a.batch, a.hidden, "c_out"))
        return nullptr;
    if (c_out.data<float>() != c.data<float>() && c_out.ld() != c.ld())
        return PyErr_Format(PyExc_ValueError, "c and c_out must have the same row stride");
    Py_BEGIN_ALLOW_THREADS
    lstm_step(a.wi, a.wh, a.x.data<float>(), a.x.ld(), a.h.data<float>(), a.h.ld(), c.data<float>(), c.ld(),
              bias.data<float>(), h_out.data<float>(), h_out.ld(), c_out.data<float>(), (int)a.batch, cell_step,
              cell_limit);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* lstm_sequence(gi_all, w_hh, bias, h0, c, hs, cell_step, cell_limit): T steps; c (B, H) in place. */
PyObject *py_lstm_sequence(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    SequenceArgs a;
    Buf bias, c;
    float cell_step, cell_limit;
    if (!check_args(nargs, 8, 8, "lstm_sequence") || !get_sequence(args[0], args[1], args[3], args[5], 4, "LSTM", a) ||
        !get_buf(args[2], bias, 'f', 1, false, "bias") || !get_buf(args[4], c, 'f', 2, true, "c") ||
        !get_float(args[6], &cell_step) || !get_float(args[7], &cell_limit) ||
        !check_shape2(c, a.batch, a.hidden, "c") || !check_len(bias, 4 * a.hidden, "bias"))
        return nullptr;
    Py_BEGIN_ALLOW_THREADS
    lstm_sequence(a.wh, a.gi.data<float>(), bias.data<float>(), a.h0.data<float>(), a.h0.ld(), c.data<float>(), c.ld(),
                  a.hs.data<float>(), (int)a.steps, (int)a.batch, cell_step, cell_limit);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gru_step(x, h, w_ih, w_hh, b_ih, b_hh, h_out) */
PyObject *py_gru_step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    StepArgs a;
    Buf b_ih, b_hh, h_out;
    if (!check_args(nargs, 7, 7, "gru_step") || !get_step(args[0], args[1], args[2], args[3], 3, "GRU", a) ||
        !get_buf(args[4], b_ih, 'f', 1, false, "b_ih") || !get_buf(args[5], b_hh, 'f', 1, false, "b_hh") ||
        !get_buf(args[6], h_out, 'f', 2, true, "h_out") || !check_len(b_ih, 3 * a.hidden, "b_ih") ||
        !check_len(b_hh, 3 * a.hidden, "b_hh") || !check_shape2(h_out, a.batch, a.hidden, "h_out"))
        return nullptr;
    Py_BEGIN_ALLOW_THREADS
    gru_step(a.wi, a.wh, a.x.data<float>(), a.x.ld(), a.h.data<float>(), a.h.ld(), b_ih.data<float>(),
             b_hh.data<float>(), h_out.data<float>(), h_out.ld(), (int)a.batch);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gru_sequence(gi_all, w_hh, b_ih, b_hh, h0, hs): gi_all (T, B, 3H) = x W_ih^T without bias. */
PyObject *py_gru_sequence(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    SequenceArgs a;
    Buf b_ih, b_hh;
    if (!check_args(nargs, 6, 6, "gru_sequence") || !get_sequence(args[0], args[1], args[4], args[5], 3, "GRU", a) ||
        !get_buf(args[2], b_ih, 'f', 1, false, "b_ih") || !get_buf(args[3], b_hh, 'f', 1, false, "b_hh") ||
        !check_len(b_ih, 3 * a.hidden, "b_ih") || !check_len(b_hh, 3 * a.hidden, "b_hh"))
        return nullptr;
    Py_BEGIN_ALLOW_THREADS
    gru_sequence(a.wh, a.gi.data<float>(), b_ih.data<float>(), b_hh.data<float>(), a.h0.data<float>(), a.h0.ld(),
                 a.hs.data<float>(), (int)a.steps, (int)a.batch);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* sru_steps(xs, w, v_f, v_r, b_f, b_r, c, hs, use_tanh): k steps of an SRU layer for a batch; xs (T, B, in)
 * C-contiguous; w (3H or 4H, in); c (B, H) updated in place; hs (T, B, H). */
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
    sru_steps(w, xs.data<float>(), v_f.data<float>(), v_r.data<float>(), b_f.data<float>(), b_r.data<float>(),
              c.data<float>(), hs.data<float>(), (int)steps, (int)batch, (int)hidden, use_tanh);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* qrnn_steps(windowed, w, bias, c, hs): k steps of a QRNN layer. */
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
    qrnn_steps(w, xs.data<float>(), bias.data<float>(), c.data<float>(), hs.data<float>(), (int)steps, (int)batch,
               (int)hidden);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- settings */

PyObject *py_set_threads(PyObject *, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 1 || n > 256) return PyErr_Format(PyExc_ValueError, "threads must be in [1, 256], got %ld", n);
    native_threads = (int)n;
    Py_RETURN_NONE;
}

PyObject *py_get_threads(PyObject *, PyObject *) { return PyLong_FromLong(native_threads); }

PyObject *py_isa(PyObject *, PyObject *) { return PyUnicode_FromString(platform()->name); }

PyObject *py_isas(PyObject *, PyObject *) {
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < platform_count(); i++) {
        if (!platform_path(i)->supported()) continue;
        PyObject *name = PyUnicode_FromString(platform_path(i)->name);
        if (!name || PyList_Append(list, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(list);
            return nullptr;
        }
        Py_DECREF(name);
    }
    return list;
}

bool select_isa(const char *name) {
    const int rc = platform_select(name);
    if (rc == -1) {
        PyErr_Format(PyExc_ValueError, "unknown ISA path %s (choose portable, avx2, avx512, avx512-vbmi, avx512-bf16 or avx512-vbmi-bf16)", name);
        return false;
    }
    if (rc == -2) {
        PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the %s path", name);
        return false;
    }
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
    {"kind", (getter)packed_get_kind, nullptr, "'f32', 'bsr', 'bf16' or 's8'", nullptr},
    {"act_scale", (getter)packed_get_act_scale, nullptr, "int8: fixed activation step (0: dynamic)", nullptr},
    {"bits", (getter)packed_get_bits, nullptr, "bits per weight: 32, 16 (bf16), 8, 4, 2 or 1", nullptr},
    {"nbytes", (getter)packed_get_nbytes, nullptr, "bytes held, panels padded", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, doc}
PyMethodDef METHODS[] = {
    FAST(pack_f32, "pack_f32(weight (n, k) float32) -> Packed"),
    FAST(pack_bf16, "pack_bf16(weight (n, k) float32) -> Packed: bf16 weights, products accumulating in fp32"),
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
    {"set_isa", py_set_isa, METH_O, "switch the instruction-set path (a name from isas)"},
    {nullptr, nullptr, 0, nullptr}};
#undef FAST

const packed_t *packed_of(void *obj) {
    PyObject *o = (PyObject *)obj;
    return PyObject_TypeCheck(o, &PackedType) ? &((PackedObject *)o)->p : nullptr;
}

void set_threads_of_caller(int n) { native_threads = n < 1 ? 1 : n; }

const native_api_t API = {CELLSERVE_API_VERSION, packed_of, linear, lstm_step, gru_step, set_threads_of_caller,
                          rows_max_sumexp, lstm_sequence, gru_sequence, tree_gates,
                          sru_steps, qrnn_steps};

PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", "cellserve's native kernel core", -1, METHODS};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
    PackedType.tp_name = "cellserve.kernels._native.Packed";
    PackedType.tp_basicsize = sizeof(PackedObject);
    PackedType.tp_dealloc = (destructor)packed_dealloc;
    PackedType.tp_flags = Py_TPFLAGS_DEFAULT;
    PackedType.tp_doc = "A weight matrix packed once into the panel layout the micro-kernels stream.";
    PackedType.tp_methods = PACKED_METHODS;
    PackedType.tp_getset = PACKED_GETSET;
    if (PyType_Ready(&PackedType) < 0) return nullptr;

    const char *forced = getenv("CELLSERVE_ISA");
    if (forced && *forced && !select_isa(forced)) return nullptr;

    PyObject *m = PyModule_Create(&MODULE);
    if (!m) return nullptr;
    Py_INCREF(&PackedType);
    PyObject *api = PyCapsule_New((void *)&API, CELLSERVE_API_CAPSULE, nullptr);
    if (!api || PyModule_AddObject(m, "_C_API", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return nullptr;
    }
    if (PyModule_AddObject(m, "Packed", (PyObject *)&PackedType) < 0 || PyModule_AddIntConstant(m, "NR", NR) < 0) {
        Py_DECREF(&PackedType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
