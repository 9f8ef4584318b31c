/* The native kernel core of cellserve: shared declarations.
 *
 * Weights are packed once, at model load, into panels of NR output columns: panel p holds columns
 * [p*NR, p*NR + NR) for every k, so a micro-kernel streams one contiguous block per panel.
 *   fp32: panel[k][NR] floats.
 *   int8: panel[k/4][NR][4] bytes (4 consecutive k of one column side by side, the operand order of
 *         VNNI's vpdpbusd), K zero-padded to a multiple of 4, plus per-column scales and code sums.
 *   4/2/1-bit: the int8 layout with G = 8/bits consecutive [NR][4] groups sharing each byte (group t in
 *         bit field t), so one 64-byte load holds G groups; a field u stands for the code q = a*u + b
 *         (lowbit_affine). K is padded to a multiple of 4*G with u = 0.
 * The layout is the same on every ISA path, so a packed matrix can be used by any of them.
 *
 * The core is split as MLAS splits its own: bindings.cpp (the CPython face), packing.cpp, drivers.cpp
 * (products, recurrences, threading decisions), platform.cpp (dispatch, settings, scratch), pool.cpp
 * (threads), and the kernels: kernels.inc compiled once per ISA path (isa_*.cpp). */
#ifndef CELLSERVE_NATIVE_H
#define CELLSERVE_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define NR 32       /* columns per packed panel */
#define ALIGN 64    /* bytes: panels start on cache lines */

#define BR 16      /* rows of W (output columns) per block of a block-sparse matrix */

enum { PACK_F32 = 0, PACK_S8 = 1, PACK_BSR = 2, PACK_BF16 = 3 };  /* fp32, int8/low-bit, block-sparse fp32, bf16 */

typedef struct {
    int kind;            /* PACK_F32, PACK_S8, PACK_BSR or PACK_BF16 */
    int bits;            /* 32, 16 (bf16), PACK_S8: 8, or 4/2/1 (fields packed several to a byte) */
    int n, k;            /* logical shape: the matrix is (n, k), computed as x @ W^T */
    int panels;          /* ceil(n / NR) */
    int kpad;            /* k rounded up: to 4 for int8, 2 for bf16, k itself for fp32 */
    size_t panel_stride; /* elements (floats, bf16 or bytes) per panel */
    void *data;
    float *scale;        /* int8: per column, padded to panels * NR */
    int32_t *colsum128;  /* int8: 128 x each column's sum of stored fields u: the correction for VNNI's
                            activations + 128 */
    float act_scale;     /* int8: fixed activation grid step; 0 = dynamic per row (max|x| / 127) */
    /* block-sparse fp32 (PACK_BSR): W in blocks of BR consecutive rows x 1 column; only nonzero blocks are
     * kept, per group of BR rows in CSR order: blocks bptr[g]..bptr[g+1] have columns bidx[] and values
     * bvals[BR * block] */
    int32_t *bptr, *bidx;
    float *bvals;
    int nnz;
} packed_t;

/* c (m x n, stride ldc) = [addend +] a @ w^T [+ bias], a (m x w->k, row stride lda). */
typedef struct {
    const float *a;
    ptrdiff_t lda;
    const packed_t *w;
    int m;
    float *c;
    ptrdiff_t ldc;
    const float *addend;  /* optional m x n matrix added to the product (may be c itself) */
    ptrdiff_t ld_addend;
    const float *bias;    /* optional, length n */
} gemm_t;

/* Quantized activations of an int8 product, prepared once per call. */
typedef struct {
    const uint8_t *codes;  /* m x kpad, row stride kpad: s8 codes, or s8 + 128 (u8) for VNNI */
    const float *scales;   /* m */
    const int32_t *sums;   /* m: each row's sum of (signed) codes, for low-bit weights' offsets */
    int is_unsigned;
} qact_t;

/* A low-bit field u stands for the weight code q = a*u + b (u = 0 pads): 4-bit q in [-7, 7] is u - 8,
 * ternary q in {-1, 0, 1} is u - 1, binary q in {-1, 1} is 2u - 1; int8 stores q itself. */
static inline void lowbit_affine(int bits, int *a, int *b) {
    *a = bits == 1 ? 2 : 1;
    *b = bits == 4 ? -8 : (bits == 8 ? 0 : -1);
}

typedef struct {
    const packed_t *w;
    qact_t act;
    int m;
    float *c;              /* fp32 output: [addend +] deq(acc) [+ bias], or NULL */
    int32_t *c32;          /* raw int32 output (exact), or NULL */
    ptrdiff_t ldc;
    const float *addend;
    ptrdiff_t ld_addend;
    const float *bias;
} qgemm_t;

typedef struct {
    const char *name;
    int (*supported)(void);
    /* products, their panels split across `threads` threads (the pool below) */
    void (*gemm_f32)(const gemm_t *g, int threads);
    void (*gemm_bsr)(const gemm_t *g, int threads);
    void (*gemm_s8)(const qgemm_t *g, int threads);
    void (*gemm_bf16)(const gemm_t *g, int threads); /* bf16 weights; a is fp32, rounded to bf16 on the way in */
    /* int8 activations: codes as this path's kernel wants them (signed, or +128 for VNNI) */
    int s8_unsigned;      /* its kernel for int8 weights wants activation codes + 128 (VNNI); low-bit weights
                             always take signed codes */
    void (*quantize)(const float *x, ptrdiff_t ldx, int m, int k, int kpad, float static_scale, int is_unsigned,
                     uint8_t *codes, float *scales, int32_t *sums);
    /* fused gate math over a batch (see kernels.inc) */
    void (*lstm_gates)(const float *gates, int batch, int hidden, const float *c_prev, ptrdiff_t ldc_prev,
                       float *h_out, ptrdiff_t ldh, float *c_out, float cell_step, float cell_limit);
    void (*gru_gates)(const float *gi, ptrdiff_t ldgi, const float *gh, const float *b_ih, const float *b_hh,
                      const float *h_prev, ptrdiff_t ldh_prev, int batch, int hidden, float *h_out, ptrdiff_t ldh);
    void (*sru_scan)(const float *u, int width, const float *x, int steps, int batch, int hidden, const float *v_f,
                     const float *v_r, const float *b_f, const float *b_r, int use_tanh, float *c, float *h_out);
    void (*qrnn_scan)(const float *u, int steps, int batch, int hidden, const float *bias, float *c, float *h_out);
    /* per row: max, its first index, and the sum of exp(x - max) (decoding: argmax, log-softmax) */
    void (*rows_max_sumexp)(const float *x, ptrdiff_t ld, int m, int n, float *max, int32_t *argmax, float *sumexp);
    /* a child-sum TreeLSTM's gates over a batch of nodes */
    void (*tree_gates)(const float *gx, const float *bias, const float *gh, const float *fh, const float *c_kids,
                       const int *kid_row, int kids, int nodes, int hidden, float *h_out, float *c_out);
} isa_t;

/* The ISA paths (isa_*.cpp), each a full table of its kernels. */
extern const isa_t ISA_PORTABLE;
#if defined(__x86_64__) || defined(_M_X64)
extern const isa_t ISA_AVX2;
extern const isa_t ISA_AVX512;
/* Kernels of a path that overrides only some of another path's (isa_avx512.cpp): AVX-512 VBMI adds a
 * table-lookup kernel for binary weights (platform.cpp puts it over the AVX-512 table). */
int avx512_vbmi_supported(void);
void avx512_vbmi_gemm_s8(const qgemm_t *g, int threads);
/* AVX512-BF16 (Cooper Lake, Sapphire Rapids and later Xeons, Zen 4) adds vdpbf16ps: its bf16 product is put
 * over the AVX-512 table. */
int avx512_bf16_supported(void);
void avx512_bf16_gemm(const gemm_t *g, int threads);
/* AMX (isa_amx.cpp): the bf16 and int8 products on tiles, put over the AVX-512 VBMI table. amx_present() says
 * whether the CPU has AMX-BF16 and AMX-INT8 and the OS granted this process the tile state; where so, the
 * packers pad k to a whole tile row (32 bf16, 64 int8). */
int amx_present(void);
void amx_gemm_bf16(const gemm_t *g, int threads);
void amx_gemm_s8(const qgemm_t *g, int threads);
#endif

/* fp32 -> bf16, rounded to nearest even as vcvtneps2bf16 does (a NaN stays a quiet NaN). */
static inline uint16_t to_bf16(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline int unsigned_codes(const isa_t *isa, const packed_t *w) { return isa->s8_unsigned && w->bits == 8; }

/* ---- platform.cpp: per-kernel dispatch (MLAS's way: the best path's table, with the kernels a newer
 * extension adds put over it), the calling thread's thread count, per-thread scratch */
const isa_t *platform(void);           /* the dispatch table in use */
int k_block_rows(void);                /* the k-blocked products' rows of a panel per block, for this CPU */
int platform_select(const char *name); /* 0, or -1 unknown name, -2 not supported by this CPU */
int platform_count(void);              /* the paths, best first */
const isa_t *platform_path(int i);
extern thread_local int native_threads;
void *aligned_zeros(size_t bytes);
/* per-thread scratch buffers, 64-byte aligned, grown on demand; NULL when out of memory */
enum { SLOT_GATES = 0, SLOT_GATES2, SLOT_CODES, SLOT_SCALES, SLOT_SUMS, SLOT_PACKED_A, SLOT_TILE_SUMS, SLOT_PANEL,
       SLOT_LUT, NUM_SLOTS };
void *scratch(int slot, size_t bytes);

/* ---- pool.cpp: run fn(ctx, tid, nthreads) on nthreads threads, the caller being tid 0 */
typedef void (*task_fn)(void *ctx, int tid, int nthreads);
void pool_run(int nthreads, task_fn fn, void *ctx);

/* ---- packing.cpp: weights into the panel layouts above, once at load. Each returns 0, or -1 when out of
 * memory (the packed_t then holds what was allocated: packed_free it). */
int pack_f32(packed_t *p, const float *w, ptrdiff_t ld, int n, int k);
int pack_bsr(packed_t *p, const float *w, ptrdiff_t ld, int n, int k);
int pack_bf16(packed_t *p, const float *w, ptrdiff_t ld, int n, int k); /* rounded to nearest even */
long off_grid(const int8_t *codes, ptrdiff_t ld, int n, int k, int bits); /* first code not on the grid, or -1 */
int pack_s8(packed_t *p, const int8_t *codes, ptrdiff_t ld, int n, int k, const float *scales, float act_scale,
            int bits);
void unpack(const packed_t *p, void *out, ptrdiff_t ld); /* fp32 weights (bf16 ones widened), or int8 codes */
size_t packed_nbytes(const packed_t *p);
void packed_free(packed_t *p);

/* ---- drivers.cpp: products and recurrences on raw arrays (shapes checked by the caller). Row strides
 * (ld) are in elements. */
void linear(const packed_t *w, const float *x, ptrdiff_t ldx, int m, float *c, ptrdiff_t ldc, const float *addend,
            ptrdiff_t ld_add, const float *bias);
void gemm_s32(const packed_t *w, const int8_t *x, ptrdiff_t ldx, int m, int32_t *out, ptrdiff_t ldo);
void quantize(const float *x, ptrdiff_t ldx, int m, int k, float static_scale, uint8_t *codes, float *scales);
void lstm_step(const packed_t *wi, const packed_t *wh, const float *x, ptrdiff_t ldx, const float *h, ptrdiff_t ldh,
               const float *c, ptrdiff_t ldc, const float *bias, float *h_out, ptrdiff_t ldh_out, float *c_out,
               int batch, float cell_step, float cell_limit);
void lstm_sequence(const packed_t *wh, const float *gi, const float *bias, const float *h0, ptrdiff_t ldh0, float *c,
                   ptrdiff_t ldc, float *hs, int steps, int batch, float cell_step, float cell_limit);
void gru_step(const packed_t *wi, const packed_t *wh, const float *x, ptrdiff_t ldx, const float *h, ptrdiff_t ldh,
              const float *b_ih, const float *b_hh, float *h_out, ptrdiff_t ldh_out, int batch);
void gru_sequence(const packed_t *wh, const float *gi, const float *b_ih, const float *b_hh, const float *h0,
                  ptrdiff_t ldh0, float *hs, int steps, int batch);
void sru_steps(const packed_t *w, const float *xs, const float *v_f, const float *v_r, const float *b_f,
               const float *b_r, float *c, float *hs, int steps, int batch, int hidden, int use_tanh);
void qrnn_steps(const packed_t *w, const float *xs, const float *bias, float *c, float *hs, int steps, int batch,
                int hidden);
void rows_max_sumexp(const float *x, ptrdiff_t ld, int m, int n, float *max, int32_t *argmax, float *sumexp);
void tree_gates(const float *gx, const float *bias, const float *gh, const float *fh, const float *c_kids,
                const int *kid_row, int kids, int nodes, int hidden, float *h_out, float *c_out);


#endif
