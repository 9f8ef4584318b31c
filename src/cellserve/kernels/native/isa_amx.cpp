/* AMX path (Sapphire Rapids and later Xeons): the bf16 and int8 products on the tile matrix engines, put
 * over the AVX-512 table by platform.cpp. Compiled with -mamx-tile -mamx-bf16 -mamx-int8 and AVX-512; chosen
 * only where the CPU has AMX and Linux grants this process the tile state (arch_prctl).
 *
 * The panels need no layout of their own: a bf16 panel (panel[k/2][32][2]) is, per 16 pairs of k, two B tiles
 * side by side (columns 0-15 and 16-31, 64 bytes each, rows 128 bytes apart), and an int8 panel
 * (panel[k/4][32][4]) likewise per 16 quads. Where AMX is present the packers pad k to a whole tile row
 * (amx_present), so no k tail remains. A is packed per call into whole tiles (row tile outer, k inner: 1 KB
 * each, contiguous), rounded to bf16 or copied as int8 codes, its rows padded to a multiple of 16.
 *
 * Every tile is 16 rows x 64 bytes: tmm0-3 accumulate a 32 x 32 block of c (2 row tiles x 2 column tiles),
 * tmm4-5 hold A's two row tiles, tmm6-7 the panel's two column tiles. Per tile row of k, 4 loads feed 4
 * tile products, each load used twice (the blocking oneDNN's AMX kernels use). */
#include <immintrin.h>
#include <string.h>

#include <type_traits>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "native.h"

namespace {

constexpr int TILE_ROWS = 16, TILE_BYTES = 64, PANEL_ROW_BYTES = NR * 4;  /* a pair (quad) row of a panel */
constexpr int A_TILE_BYTES = TILE_ROWS * TILE_BYTES, B_STEP_BYTES = TILE_ROWS * PANEL_ROW_BYTES;

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Once per pool task: the tile configuration is per thread, and loading it zeroes the tiles. */
void configure_tiles() {
    TileConfig cfg = {};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = TILE_BYTES;
        cfg.rows[t] = TILE_ROWS;
    }
    _tile_loadconfig(&cfg);
}

/* tmm c += tmm a x tmm b, int8 (unsigned by signed bytes into int32) or bf16 pairs (into fp32). A macro:
 * GCC's tile intrinsics paste their tile numbers into the instruction's text, so they must be literals. */
#define TILE_PRODUCT(c, a, b)                  \
    do {                                       \
        if (int8) _tile_dpbusd(c, a, b);       \
        else _tile_dpbf16ps(c, a, b);          \
    } while (0)

/* A 32 x 32 (row_tiles = 2) or 16 x 32 block of c over `steps` tile rows of k, added to the block's sums so
 * far (first: from zero). a: A's tile of the block's first row tile at the first step (the second row tile
 * lies row_tile_bytes further on); b: the panel at the first step; sums: 32 x 32 (fp32 or int32, 128-byte
 * rows), read and written by the tiles. */
template <int row_tiles, bool int8>
void tile_block(const uint8_t *a, size_t row_tile_bytes, const uint8_t *b, int steps, bool first, void *sums) {
    char *o = (char *)sums;
    if (first) {
        _tile_zero(0);
        _tile_zero(1);
        if (row_tiles == 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
    } else {
        _tile_loadd(0, o, PANEL_ROW_BYTES);
        _tile_loadd(1, o + TILE_BYTES, PANEL_ROW_BYTES);
        if (row_tiles == 2) {
            _tile_loadd(2, o + TILE_ROWS * PANEL_ROW_BYTES, PANEL_ROW_BYTES);
            _tile_loadd(3, o + TILE_ROWS * PANEL_ROW_BYTES + TILE_BYTES, PANEL_ROW_BYTES);
        }
    }
    for (int s = 0; s < steps; s++) {
        const uint8_t *bs = b + (size_t)s * B_STEP_BYTES;
        _tile_loadd(6, bs, PANEL_ROW_BYTES);
        _tile_loadd(7, bs + TILE_BYTES, PANEL_ROW_BYTES);
        _tile_loadd(4, a + (size_t)s * A_TILE_BYTES, TILE_BYTES);
        TILE_PRODUCT(0, 4, 6);
        TILE_PRODUCT(1, 4, 7);
        if (row_tiles == 2) {
            _tile_loadd(5, a + row_tile_bytes + (size_t)s * A_TILE_BYTES, TILE_BYTES);
            TILE_PRODUCT(2, 5, 6);
            TILE_PRODUCT(3, 5, 7);
        }
    }
    _tile_stored(0, o, PANEL_ROW_BYTES);
    _tile_stored(1, o + TILE_BYTES, PANEL_ROW_BYTES);
    if (row_tiles == 2) {
        _tile_stored(2, o + TILE_ROWS * PANEL_ROW_BYTES, PANEL_ROW_BYTES);
        _tile_stored(3, o + TILE_ROWS * PANEL_ROW_BYTES + TILE_BYTES, PANEL_ROW_BYTES);
    }
}

/* Masks of a panel's two halves of 16 columns, for its first ncols columns. */
inline void column_masks(int ncols, __mmask16 *lo, __mmask16 *hi) {
    *lo = ncols >= 16 ? 0xFFFF : (__mmask16)((1u << ncols) - 1);
    *hi = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1);
}

/* Rows [m0, m0 + rows) of panel p's columns of c from a block of fp32 sums: [+ bias] [+ addend], as the fp32
 * tiles store (kernels.inc, store_tile). */
void store_rows(const gemm_t *g, int m0, int rows, int p, const float *sums) {
    const int col0 = p * NR;
    __mmask16 lo, hi;
    column_masks(g->w->n - col0, &lo, &hi);
    const __m512 b0 = g->bias ? _mm512_maskz_loadu_ps(lo, g->bias + col0) : _mm512_setzero_ps();
    const __m512 b1 = g->bias ? _mm512_maskz_loadu_ps(hi, g->bias + col0 + 16) : _mm512_setzero_ps();
    for (int i = 0; i < rows; i++) {
        __m512 v0 = _mm512_add_ps(_mm512_load_ps(sums + i * NR), b0);
        __m512 v1 = _mm512_add_ps(_mm512_load_ps(sums + i * NR + 16), b1);
        if (g->addend) {
            const float *add = g->addend + (ptrdiff_t)(m0 + i) * g->ld_addend + col0;
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, add));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, add + 16));
        }
        float *c = g->c + (ptrdiff_t)(m0 + i) * g->ldc + col0;
        _mm512_mask_storeu_ps(c, lo, v0);
        _mm512_mask_storeu_ps(c + 16, hi, v1);
    }
}

/* The same for the int32 sums of an int8 product: minus the columns' +128 correction, then raw (c32) or
 * dequantized, [+ addend] [+ bias], as kernels.inc's store_s8_tile computes them. */
void store_rows(const qgemm_t *g, int m0, int rows, int p, const int32_t *sums) {
    const int col0 = p * NR;
    __mmask16 lo, hi;
    column_masks(g->w->n - col0, &lo, &hi);
    const int32_t *colsum = g->w->colsum128 + col0;
    const __m512i s0 = _mm512_loadu_si512((const void *)colsum), s1 = _mm512_loadu_si512((const void *)(colsum + 16));
    const __m512 w0 = _mm512_loadu_ps(g->w->scale + col0), w1 = _mm512_loadu_ps(g->w->scale + col0 + 16);
    for (int i = 0; i < rows; i++) {
        const __m512i q0 = _mm512_sub_epi32(_mm512_load_si512((const void *)(sums + i * NR)), s0);
        const __m512i q1 = _mm512_sub_epi32(_mm512_load_si512((const void *)(sums + i * NR + 16)), s1);
        if (g->c32) {
            int32_t *c = g->c32 + (ptrdiff_t)(m0 + i) * g->ldc + col0;
            _mm512_mask_storeu_epi32(c, lo, q0);
            _mm512_mask_storeu_epi32(c + 16, hi, q1);
            continue;
        }
        const __m512 xs = _mm512_set1_ps(g->act.scales[m0 + i]);
        __m512 v0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), xs), w0);
        __m512 v1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), xs), w1);
        if (g->addend) {
            const float *add = g->addend + (ptrdiff_t)(m0 + i) * g->ld_addend + col0;
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, add));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, add + 16));
        }
        if (g->bias) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, g->bias + col0));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, g->bias + col0 + 16));
        }
        float *c = g->c + (ptrdiff_t)(m0 + i) * g->ldc + col0;
        _mm512_mask_storeu_ps(c, lo, v0);
        _mm512_mask_storeu_ps(c + 16, hi, v1);
    }
}

/* A pool task's share of panels: panel outer, then blocks of K_BLOCK_STEPS tile rows of k (2 KB of the panel
 * each: 16 KB, which stays in L1), then every block of 32 rows, as the fp32 product orders it (kernels.inc):
 * the panel's block is read from L1 by every row block, and only A's tiles come from L2. A row block's sums
 * pass between k blocks through a per-thread buffer of M x 32. */
constexpr int K_BLOCK_STEPS = 8;

struct AmxJob {
    const void *g;         /* gemm_t (bf16) or qgemm_t (int8) */
    const uint8_t *a;      /* A in tiles: row tile t, step s at (t * steps + s) * A_TILE_BYTES */
    int m, steps, panels;  /* steps: tile rows of k */
    const uint8_t *w;      /* the panels */
    size_t panel_bytes;
};

int padded_rows(int m, int rows) { return (m + rows - 1) / rows * rows; }

template <bool int8>
void amx_panels(void *ctx, int tid, int nth) {
    const AmxJob *job = (const AmxJob *)ctx;
    const int p0 = (int)((long long)job->panels * tid / nth), p1 = (int)((long long)job->panels * (tid + 1) / nth);
    if (p0 >= p1) return;
    using Sum = std::conditional_t<int8, int32_t, float>;
    using Gemm = std::conditional_t<int8, qgemm_t, gemm_t>;
    Sum *sums = (Sum *)scratch(SLOT_TILE_SUMS, (size_t)padded_rows(job->m, 2 * TILE_ROWS) * NR * sizeof(Sum));
    if (!sums) return;
    configure_tiles();
    const size_t row_tile_bytes = (size_t)job->steps * A_TILE_BYTES;
    for (int p = p0; p < p1; p++) {
        const uint8_t *panel = job->w + (size_t)p * job->panel_bytes;
        for (int s0 = 0; s0 < job->steps; s0 += K_BLOCK_STEPS) {
            const int count = job->steps - s0 < K_BLOCK_STEPS ? job->steps - s0 : K_BLOCK_STEPS;
            const bool first = s0 == 0, last = s0 + count == job->steps;
            const uint8_t *b = panel + (size_t)s0 * B_STEP_BYTES;
            for (int m0 = 0; m0 < job->m; m0 += 2 * TILE_ROWS) {
                const int rows = job->m - m0 < 2 * TILE_ROWS ? job->m - m0 : 2 * TILE_ROWS;
                const uint8_t *a = job->a + (size_t)(m0 / TILE_ROWS) * row_tile_bytes + (size_t)s0 * A_TILE_BYTES;
                Sum *block = sums + (size_t)m0 * NR;
                if (rows > TILE_ROWS) tile_block<2, int8>(a, row_tile_bytes, b, count, first, block);
                else tile_block<1, int8>(a, row_tile_bytes, b, count, first, block);
                if (last) store_rows((const Gemm *)job->g, m0, rows, p, block);
            }
        }
    }
    _tile_release();  /* the kernel then need not save 8 KB of tile state at each context switch */
}

/* fp32 rows of A to bf16 (nearest even, as to_bf16) in tiles: kpad columns (zeros past k), rows past m zero. */
void pack_a_bf16(const gemm_t *g, uint8_t *dst) {
    const int k = g->w->k, steps = g->w->kpad / 32, rows = padded_rows(g->m, TILE_ROWS);
    for (int i = 0; i < rows; i++)
        for (int s = 0; s < steps; s++) {
            uint16_t *out = (uint16_t *)(dst + ((size_t)(i / TILE_ROWS) * steps + s) * A_TILE_BYTES + (i % TILE_ROWS) * TILE_BYTES);
            const int k0 = s * 32;
            if (i < g->m && k0 + 32 <= k) {
                const float *row = g->a + (ptrdiff_t)i * g->lda + k0;
                _mm512_store_si512((void *)out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row)));
                continue;
            }
            for (int j = 0; j < 32; j++)
                out[j] = i < g->m && k0 + j < k ? to_bf16(g->a[(ptrdiff_t)i * g->lda + k0 + j]) : 0;
        }
}

/* int8 codes (m x kpad, row-major) into tiles, rows past m zero. */
void pack_a_s8(const qgemm_t *g, uint8_t *dst) {
    const int kpad = g->w->kpad, steps = kpad / TILE_BYTES, rows = padded_rows(g->m, TILE_ROWS);
    for (int i = 0; i < rows; i++)
        for (int s = 0; s < steps; s++) {
            uint8_t *out = dst + ((size_t)(i / TILE_ROWS) * steps + s) * A_TILE_BYTES + (i % TILE_ROWS) * TILE_BYTES;
            if (i < g->m) memcpy(out, g->act.codes + (size_t)i * kpad + s * TILE_BYTES, TILE_BYTES);
            else memset(out, 0, TILE_BYTES);
        }
}

/* Below this many rows the int8 product on VNNI (the AVX-512 VBMI table) runs faster: at M = 1 a tile of
 * 16 rows computes mostly padding, and VNNI measured 1.04-1.12x AMX at 256 x 1024 and 512 x 2048 (1 thread,
 * medians of 5 interleaved rounds; equal at 1024 x 4096, where the weights' stream from memory bounds
 * both). From M = 2 AMX leads (1.0-3.2x at M = 2-16). The bf16 product on AMX led at every M, 1.6x at M = 1 on
 * 256 x 1024 and equal at 1024 x 4096. */
constexpr int AMX_MIN_ROWS_S8 = 2;

}  // namespace

int amx_present(void) {
    static const int granted = []() -> int {
        unsigned eax, ebx, ecx, edx;
        __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
        const int tiles = (edx >> 24) & 1, bf16 = (edx >> 22) & 1, int8 = (edx >> 25) & 1;
        if (!(tiles && bf16 && int8 && avx512_vbmi_supported() && avx512_bf16_supported())) return 0;
#if defined(__linux__)
        /* Linux hands out the 8 KB tile state only on request, once per process (ARCH_REQ_XCOMP_PERM). */
        return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
        return 0;
#endif
    }();
    return granted;
}

void amx_gemm_bf16(const gemm_t *g, int threads) {
    const packed_t *w = g->w;
    if (w->kpad % (TILE_BYTES / 2)) return ISA_AVX512.gemm_bf16(g, threads);
    const int steps = w->kpad / (TILE_BYTES / 2);
    uint8_t *a = (uint8_t *)scratch(SLOT_PACKED_A, (size_t)padded_rows(g->m, TILE_ROWS) * steps * TILE_BYTES);
    if (!a) return;
    pack_a_bf16(g, a);
    AmxJob job = {g, a, g->m, steps, w->panels, (const uint8_t *)w->data, w->panel_stride * sizeof(uint16_t)};
    pool_run(threads, amx_panels<false>, &job);
}

/* int8 weights on tdpbusd (unsigned activations, codes + 128, by signed weights: VNNI's operands); low-bit
 * weights stay on the AVX-512 VBMI kernels. */
void amx_gemm_s8(const qgemm_t *g, int threads) {
    const packed_t *w = g->w;
    if (w->bits != 8 || !g->act.is_unsigned || w->kpad % TILE_BYTES || g->m < AMX_MIN_ROWS_S8)
        return avx512_vbmi_gemm_s8(g, threads);
    const int steps = w->kpad / TILE_BYTES;
    uint8_t *a = (uint8_t *)scratch(SLOT_PACKED_A, (size_t)padded_rows(g->m, TILE_ROWS) * steps * TILE_BYTES);
    if (!a) return;
    pack_a_s8(g, a);
    AmxJob job = {g, a, g->m, steps, w->panels, (const uint8_t *)w->data, w->panel_stride};
    pool_run(threads, amx_panels<true>, &job);
}
