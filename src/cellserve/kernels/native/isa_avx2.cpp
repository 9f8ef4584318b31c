/* AVX2 + FMA path. fp32 tiles: 2 rows x 32 columns (8 ymm accumulators: with 3 rows GCC spills one of
 * 16 registers). int8: weights sign-extended to 16 bits and multiplied with vpmaddwd (exact; vpmaddubsw
 * would saturate); low-bit weights are unpacked to int8 one panel at a time. */
#include <immintrin.h>

#define VL 8
#define VMIN(a, b) ((vf)_mm256_min_ps((__m256)(a), (__m256)(b)))
#define VMAX(a, b) ((vf)_mm256_max_ps((__m256)(a), (__m256)(b)))
#define MR 2
#include "kernels.inc"

namespace {

/* int8 tile of mr rows, 16 columns at a time: per 4 k, the 16 columns' 64 bytes are widened to 4
 * ymm of int16 ([col][k0..k3]) and multiplied with the row's 4 codes broadcast as int16; each int32
 * lane then holds a pair sum, and adjacent lanes are added at the end. */
template <int mr>
void tile_s8(const qgemm_t *g, int m0, int p, const int8_t *b) {
    const packed_t *w = g->w;
    const int groups = w->kpad / 4;
    const int8_t *a = (const int8_t *)g->act.codes + (ptrdiff_t)m0 * w->kpad;
    alignas(32) int32_t sums[mr * NR];
    for (int half = 0; half < 2; half++) {
        __m256i acc[mr][4];
        for (int i = 0; i < mr; i++)
            for (int c = 0; c < 4; c++) acc[i][c] = _mm256_setzero_si256();
        for (int kk = 0; kk < groups; kk++) {
            __m256i av[mr];
            for (int i = 0; i < mr; i++) {
                int32_t four;
                memcpy(&four, a + i * w->kpad + kk * 4, 4);
                av[i] = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(four)));
            }
            const int8_t *bk = b + kk * NR * 4 + half * 64;
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i w16 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(bk + c * 16)));
                for (int i = 0; i < mr; i++) acc[i][c] = _mm256_add_epi32(acc[i][c], _mm256_madd_epi16(w16, av[i]));
            }
        }
        for (int i = 0; i < mr; i++)
            for (int c = 0; c < 4; c++) {
                alignas(32) int32_t lanes[8];
                _mm256_store_si256((__m256i *)lanes, acc[i][c]);
                for (int l = 0; l < 4; l++) sums[i * NR + half * 16 + c * 4 + l] = lanes[2 * l] + lanes[2 * l + 1];
            }
    }
    store_s8_tile(g, m0, mr, p, sums);
}

void gemm_s8_panels(const qgemm_t *g, int p0, int p1) {
    for (int p = p0; p < p1; p++) {
        const int8_t *b = int8_panel(g->w, p);  /* low-bit panels are unpacked here, once per panel */
        int m0 = 0;
        for (; m0 + 2 <= g->m; m0 += 2) tile_s8<2>(g, m0, p, b);
        if (m0 < g->m) tile_s8<1>(g, m0, p, b);
    }
}

int supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace

extern const isa_t ISA_AVX2 = {"avx2", supported, gemm_f32, gemm_bsr, gemm_s8, gemm_bf16, 0, quantize_rows,
                               lstm_gates, gru_gates, sru_scan, qrnn_scan, max_sumexp_rows,
                               child_sum_gates};
