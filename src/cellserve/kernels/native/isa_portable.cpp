/* Portable path: plain C++ with 16-byte generic vectors, built with the compiler's baseline flags,
 * so it runs on any x86-64 (SSE2) and builds on other architectures (NEON on ARM64). */
#define VL 4
#define MR 2
#include "kernels.inc"

namespace {

void gemm_s8_panels(const qgemm_t *g, int p0, int p1) {
    const packed_t *w = g->w;
    const int groups = w->kpad / 4;
    for (int p = p0; p < p1; p++) {
        const int8_t *b = int8_panel(w, p);
        for (int m = 0; m < g->m; m++) {
            const int8_t *a = (const int8_t *)g->act.codes + (ptrdiff_t)m * w->kpad;
            int32_t sums[NR] = {0};
            for (int kk = 0; kk < groups; kk++)
                for (int c = 0; c < NR; c++)
                    for (int t = 0; t < 4; t++) sums[c] += (int32_t)a[kk * 4 + t] * (int32_t)b[(kk * NR + c) * 4 + t];
            store_s8_tile(g, m, 1, p, sums);
        }
    }
}

int supported() { return 1; }

}  // namespace

extern const isa_t ISA_PORTABLE = {"portable", supported, gemm_f32, gemm_bsr, gemm_s8, gemm_bf16, 0, quantize_rows,
                                   lstm_gates, gru_gates, sru_scan, qrnn_scan, max_sumexp_rows,
                               child_sum_gates};
