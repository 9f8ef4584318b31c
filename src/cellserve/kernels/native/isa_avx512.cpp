/* AVX-512 path (F, BW, VL; VNNI's vpdpbusd for int8). fp32 tiles: 12 rows x 32 columns, 24 zmm
 * accumulators, the shape MLAS's AVX-512 SGEMM kernel also uses. Compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512vnni -mfma; chosen at run time only where the CPU has all of them. */
#include <immintrin.h>

#include <utility>

#define VL 16
#define MR 12
#include "kernels.inc"

namespace {

/* int8 and low-bit tiles, one template. Per group of 4 k, each half panel (16 columns) is one 64-byte
 * vector of weight bytes and one vpdpbusd per row (u8 activations x s8 weights, 4 products summed into
 * each int32 lane). Activations are the signed codes + 128.
 *
 * Below 8 bits a 64-byte load holds G = 8/bits groups; each group's fields are shifted and masked into
 * bytes in registers (the weights never exist as int8 in memory) and go through the same vpdpbusd. With u
 * the stored field and q = a*u + b its code (lowbit_affine; int8: u = q), the exact dot product is
 * a*(sum (x+128)*u - 128*sum u) + b*sum x: the column's field sum is packed once, the row's code sum comes
 * with its quantization.
 *
 * A tile is mr rows x NP panels. With few rows (batch-1 GEMV), two panels per tile share each activation
 * broadcast and the tile's fixed costs, and U independent accumulator sets hide vpdpbusd's latency. */
constexpr int MR_S8 = 8;

template <int... T, class F>
inline __attribute__((always_inline)) void for_each_index(std::integer_sequence<int, T...>, F f) {
    (f(std::integral_constant<int, T>{}), ...);
}

template <int mr, int bits, int NP>
void tile_q(const qgemm_t *g, int m0, int p) {
    constexpr int G = 8 / bits;
    constexpr int CHAINS = mr * NP * 2;
    constexpr int U = CHAINS >= 8 ? 1 : (8 + CHAINS - 1) / CHAINS;  /* accumulator sets */
    constexpr int CU = U > G ? U / G : 1;                             /* chunks per loop step */
    const packed_t *w = g->w;
    const int chunks = w->kpad / (4 * G);
    const uint8_t *b = (const uint8_t *)w->data + (size_t)p * w->panel_stride;
    const size_t stride = w->panel_stride;
    const uint8_t *a = g->act.codes + (ptrdiff_t)m0 * w->kpad;
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i acc[U][mr][NP * 2];
    for (int u = 0; u < U; u++)
        for (int i = 0; i < mr; i++)
            for (int h = 0; h < NP * 2; h++) acc[u][i][h] = _mm512_set1_epi32(0);

    auto chunk = [&](int c, auto cu_const) {
        constexpr int cu = decltype(cu_const)::value;
        __m512i v[NP * 2];
#pragma GCC unroll 4
        for (int h = 0; h < NP * 2; h++)
            v[h] = _mm512_load_si512((const void *)(b + (h / 2) * stride + (size_t)c * NR * 4 + (h % 2) * 64));
        for_each_index(std::make_integer_sequence<int, G>{}, [&](auto field) {
            constexpr int t = decltype(field)::value, u = (cu * G + t) % U, shift = t * bits;
            __m512i wv[NP * 2];
#pragma GCC unroll 4
            for (int h = 0; h < NP * 2; h++)
                wv[h] = bits == 8 ? v[h] : _mm512_and_si512(shift ? _mm512_srli_epi16(v[h], shift) : v[h], mask);
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) {
                int32_t four;
                memcpy(&four, a + i * w->kpad + (c * G + t) * 4, 4);
                const __m512i av = _mm512_set1_epi32(four);
#pragma GCC unroll 4
                for (int h = 0; h < NP * 2; h++) acc[u][i][h] = _mm512_dpbusd_epi32(acc[u][i][h], av, wv[h]);
            }
        });
    };
    int c = 0;
    for (; c + CU <= chunks; c += CU) {
        if (mr <= 3)
            for (int h = 0; h < NP; h++) {
                __builtin_prefetch(b + h * stride + (size_t)(c + 48) * NR * 4);
                __builtin_prefetch(b + h * stride + (size_t)(c + 48) * NR * 4 + 64);
            }
        for_each_index(std::make_integer_sequence<int, CU>{}, [&](auto cu) { chunk(c + decltype(cu)::value, cu); });
    }
    for (; c < chunks; c++) chunk(c, std::integral_constant<int, 0>{});

    int fa, fb;
    lowbit_affine(bits, &fa, &fb);
    for (int np = 0; np < NP; np++) {
        alignas(64) int32_t sums[mr * NR];
        const int32_t *colsum = w->colsum128 + (p + np) * NR;
        const __m512i c0 = _mm512_loadu_si512((const void *)colsum), c1 = _mm512_loadu_si512((const void *)(colsum + 16));
        for (int i = 0; i < mr; i++) {
            __m512i s0 = acc[0][i][2 * np], s1 = acc[0][i][2 * np + 1];
            for (int u = 1; u < U; u++) {
                s0 = _mm512_add_epi32(s0, acc[u][i][2 * np]);
                s1 = _mm512_add_epi32(s1, acc[u][i][2 * np + 1]);
            }
            s0 = _mm512_sub_epi32(s0, c0);
            s1 = _mm512_sub_epi32(s1, c1);
            if (bits != 8) {
                const __m512i scale = _mm512_set1_epi32(fa), offset = _mm512_set1_epi32(fb * g->act.sums[m0 + i]);
                s0 = _mm512_add_epi32(_mm512_mullo_epi32(s0, scale), offset);
                s1 = _mm512_add_epi32(_mm512_mullo_epi32(s1, scale), offset);
            }
            _mm512_store_si512((void *)(sums + i * NR), s0);
            _mm512_store_si512((void *)(sums + i * NR + 16), s1);
        }
        store_s8_tile(g, m0, mr, p + np, sums);
    }
}

template <int bits>
void rows_q(const qgemm_t *g, int m0, int rows, int p, int p1) {
    if (bits != 1 && rows <= 2 && p + 1 < p1) {  /* two panels per tile for GEMV-shaped products (binary
                                                      weights measured faster with one: 8 fields a load) */
        if (rows == 1) tile_q<1, bits, 2>(g, m0, p);
        else tile_q<2, bits, 2>(g, m0, p);
        return;
    }
    switch (rows) {
        case 1: tile_q<1, bits, 1>(g, m0, p); break;
        case 2: tile_q<2, bits, 1>(g, m0, p); break;
        case 3: tile_q<3, bits, 1>(g, m0, p); break;
        case 4: tile_q<4, bits, 1>(g, m0, p); break;
        case 5: tile_q<5, bits, 1>(g, m0, p); break;
        case 6: tile_q<6, bits, 1>(g, m0, p); break;
        case 7: tile_q<7, bits, 1>(g, m0, p); break;
        default: tile_q<MR_S8, bits, 1>(g, m0, p); break;
    }
}

/* Panel blocks outer, then row tiles, then the block's panels (see panels_per_block in kernels.inc). */
void gemm_s8_panels(const qgemm_t *g, int p0, int p1) {
    const int bits = g->w->bits;
    const int block = panels_per_block(g->w->panel_stride);
    for (int b0 = p0; b0 < p1; b0 += block) {
        const int b1 = b0 + block < p1 ? b0 + block : p1;
        for (int m0 = 0; m0 < g->m; m0 += MR_S8) {
            const int rows = g->m - m0 < MR_S8 ? g->m - m0 : MR_S8;
            const int step = bits != 1 && rows <= 2 ? 2 : 1;
            for (int p = b0; p < b1; p += step) {
                if (bits == 8) rows_q<8>(g, m0, rows, p, b1);
                else if (bits == 4) rows_q<4>(g, m0, rows, p, b1);
                else if (bits == 2) rows_q<2>(g, m0, rows, p, b1);
                else rows_q<1>(g, m0, rows, p, b1);
            }
        }
    }
}

int supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma");
}

}  // namespace

extern const isa_t ISA_AVX512 = {"avx512", supported, gemm_f32, gemm_bsr, gemm_s8, 1, quantize_rows,
                                 lstm_gates, gru_gates, sru_scan, qrnn_scan};
