/* AVX-512 path (F, BW, VL; VNNI's vpdpbusd for int8). fp32 tiles: 12 rows x 32 columns, 24 zmm
 * accumulators, the shape MLAS's AVX-512 SGEMM kernel also uses. Compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512vnni -mfma; chosen at run time only where the CPU has all of them. */
#include <immintrin.h>

#include <utility>

#define VL 16
#define MR 12
#include "kernels.inc"

namespace {

/* int8 tile: per 4 k, two 64-byte loads of the panel feed 2*mr vpdpbusd (u8 activations x s8
 * weights, 4 products summed into each int32 lane). Activations are the signed codes + 128;
 * 128 * (sum of the column's codes) is subtracted at the end, so the result is exact. */
constexpr int MR_S8 = 8;

template <int mr>
void tile_s8(const qgemm_t *g, int m0, int p) {
    constexpr int U = 2 * mr >= 8 ? 1 : (8 + 2 * mr - 1) / (2 * mr);
    const packed_t *w = g->w;
    const int groups = w->kpad / 4;
    const int8_t *b = (const int8_t *)w->data + (size_t)p * w->panel_stride;
    const uint8_t *a = g->act.codes + (ptrdiff_t)m0 * w->kpad;
    __m512i acc[U][mr][2];
    for (int u = 0; u < U; u++)
        for (int i = 0; i < mr; i++) acc[u][i][0] = acc[u][i][1] = _mm512_set1_epi32(0);
    int kk = 0;
    for (; kk + U <= groups; kk += U) {
        if (mr <= 3) __builtin_prefetch(b + (kk + 16) * NR * 4);
#pragma GCC unroll 8
        for (int u = 0; u < U; u++) {
            const __m512i b0 = _mm512_load_si512((const void *)(b + (kk + u) * NR * 4));
            const __m512i b1 = _mm512_load_si512((const void *)(b + (kk + u) * NR * 4 + 64));
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) {
                int32_t four;
                memcpy(&four, a + i * w->kpad + (kk + u) * 4, 4);
                const __m512i av = _mm512_set1_epi32(four);
                acc[u][i][0] = _mm512_dpbusd_epi32(acc[u][i][0], av, b0);
                acc[u][i][1] = _mm512_dpbusd_epi32(acc[u][i][1], av, b1);
            }
        }
    }
    for (; kk < groups; kk++) {
        const __m512i b0 = _mm512_load_si512((const void *)(b + kk * NR * 4));
        const __m512i b1 = _mm512_load_si512((const void *)(b + kk * NR * 4 + 64));
        for (int i = 0; i < mr; i++) {
            int32_t four;
            memcpy(&four, a + i * w->kpad + kk * 4, 4);
            const __m512i av = _mm512_set1_epi32(four);
            acc[0][i][0] = _mm512_dpbusd_epi32(acc[0][i][0], av, b0);
            acc[0][i][1] = _mm512_dpbusd_epi32(acc[0][i][1], av, b1);
        }
    }
    alignas(64) int32_t sums[mr * NR];
    const __m512i c0 = _mm512_loadu_si512((const void *)(w->colsum128 + p * NR));
    const __m512i c1 = _mm512_loadu_si512((const void *)(w->colsum128 + p * NR + 16));
    for (int i = 0; i < mr; i++) {
        __m512i s0 = acc[0][i][0], s1 = acc[0][i][1];
        for (int u = 1; u < U; u++) {
            s0 = _mm512_add_epi32(s0, acc[u][i][0]);
            s1 = _mm512_add_epi32(s1, acc[u][i][1]);
        }
        _mm512_store_si512((void *)(sums + i * NR), _mm512_sub_epi32(s0, c0));
        _mm512_store_si512((void *)(sums + i * NR + 16), _mm512_sub_epi32(s1, c1));
    }
    store_s8_tile(g, m0, mr, p, sums);
}

/* Panel blocks outer, then row tiles, then the block's panels (see panels_per_block in kernels.inc). */
/* Low-bit tile: one 64-byte load per half panel holds G = 8/bits groups of 4 k; each group's fields are
 * shifted and masked into bytes in registers (the weights never exist as int8 in memory) and go through
 * the same vpdpbusd. With u the field and a, b its affine map (q = a*u + b), the exact dot product is
 * a*(sum (x+128)*u - 128*sum u) + b*sum x: the column's field sum is packed once, the row's code sum
 * comes with its quantization. */
template <int... T, class F>
inline __attribute__((always_inline)) void for_fields(std::integer_sequence<int, T...>, F f) {
    (f(std::integral_constant<int, T>{}), ...);
}

template <int mr, int bits>
void tile_lowbit(const qgemm_t *g, int m0, int p) {
    constexpr int G = 8 / bits;
    constexpr int U = mr <= 2 ? (G < 4 ? G : 4) : 1;  /* independent accumulators hide vpdpbusd latency */
    const packed_t *w = g->w;
    const int chunks = w->kpad / (4 * G);
    const uint8_t *b = (const uint8_t *)w->data + (size_t)p * w->panel_stride;
    const uint8_t *a = g->act.codes + (ptrdiff_t)m0 * w->kpad;
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i acc[U][mr][2];
    for (int u = 0; u < U; u++)
        for (int i = 0; i < mr; i++) acc[u][i][0] = acc[u][i][1] = _mm512_set1_epi32(0);
    for (int c = 0; c < chunks; c++) {
        if (mr <= 3) {
            __builtin_prefetch(b + (c + 48) * NR * 4);
            __builtin_prefetch(b + (c + 48) * NR * 4 + 64);
        }
        const __m512i v0 = _mm512_load_si512((const void *)(b + c * NR * 4));
        const __m512i v1 = _mm512_load_si512((const void *)(b + c * NR * 4 + 64));
        for_fields(std::make_integer_sequence<int, G>{}, [&](auto field) {
            constexpr int t = decltype(field)::value, u = t % U, shift = t * bits;
            const __m512i w0 = _mm512_and_si512(shift ? _mm512_srli_epi16(v0, shift) : v0, mask);
            const __m512i w1 = _mm512_and_si512(shift ? _mm512_srli_epi16(v1, shift) : v1, mask);
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) {
                int32_t four;
                memcpy(&four, a + i * w->kpad + (c * G + t) * 4, 4);
                const __m512i av = _mm512_set1_epi32(four);
                acc[u][i][0] = _mm512_dpbusd_epi32(acc[u][i][0], av, w0);
                acc[u][i][1] = _mm512_dpbusd_epi32(acc[u][i][1], av, w1);
            }
        });
    }
    int fa, fb;
    lowbit_affine(bits, &fa, &fb);
    alignas(64) int32_t sums[mr * NR];
    const __m512i c0 = _mm512_loadu_si512((const void *)(w->colsum128 + p * NR));
    const __m512i c1 = _mm512_loadu_si512((const void *)(w->colsum128 + p * NR + 16));
    const __m512i scale_a = _mm512_set1_epi32(fa);
    for (int i = 0; i < mr; i++) {
        __m512i s0 = acc[0][i][0], s1 = acc[0][i][1];
        for (int u = 1; u < U; u++) {
            s0 = _mm512_add_epi32(s0, acc[u][i][0]);
            s1 = _mm512_add_epi32(s1, acc[u][i][1]);
        }
        const __m512i offset = _mm512_set1_epi32(fb * g->act.sums[m0 + i]);
        s0 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_sub_epi32(s0, c0), scale_a), offset);
        s1 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_sub_epi32(s1, c1), scale_a), offset);
        _mm512_store_si512((void *)(sums + i * NR), s0);
        _mm512_store_si512((void *)(sums + i * NR + 16), s1);
    }
    store_s8_tile(g, m0, mr, p, sums);
}

template <int bits>
void lowbit_rows(const qgemm_t *g, int m0, int rows, int p) {
    switch (rows) {
        case 1: tile_lowbit<1, bits>(g, m0, p); break;
        case 2: tile_lowbit<2, bits>(g, m0, p); break;
        case 3: tile_lowbit<3, bits>(g, m0, p); break;
        case 4: tile_lowbit<4, bits>(g, m0, p); break;
        case 5: tile_lowbit<5, bits>(g, m0, p); break;
        case 6: tile_lowbit<6, bits>(g, m0, p); break;
        case 7: tile_lowbit<7, bits>(g, m0, p); break;
        default: tile_lowbit<MR_S8, bits>(g, m0, p); break;
    }
}

void gemm_s8_panels(const qgemm_t *g, int p0, int p1) {
    const int bits = g->w->bits;
    if (bits != 8) {
        const int block = panels_per_block(g->w->panel_stride);
        for (int b0 = p0; b0 < p1; b0 += block) {
            const int b1 = b0 + block < p1 ? b0 + block : p1;
            for (int m0 = 0; m0 < g->m; m0 += MR_S8) {
                const int rows = g->m - m0 < MR_S8 ? g->m - m0 : MR_S8;
                for (int p = b0; p < b1; p++) {
                    if (bits == 4) lowbit_rows<4>(g, m0, rows, p);
                    else if (bits == 2) lowbit_rows<2>(g, m0, rows, p);
                    else lowbit_rows<1>(g, m0, rows, p);
                }
            }
        }
        return;
    }
    const int block = panels_per_block(g->w->panel_stride);
    for (int b0 = p0; b0 < p1; b0 += block) {
        const int b1 = b0 + block < p1 ? b0 + block : p1;
        for (int m0 = 0; m0 < g->m; m0 += MR_S8) {
            const int rows = g->m - m0 < MR_S8 ? g->m - m0 : MR_S8;
            for (int p = b0; p < b1; p++) switch (rows) {
                    case 1: tile_s8<1>(g, m0, p); break;
                    case 2: tile_s8<2>(g, m0, p); break;
                    case 3: tile_s8<3>(g, m0, p); break;
                    case 4: tile_s8<4>(g, m0, p); break;
                    case 5: tile_s8<5>(g, m0, p); break;
                    case 6: tile_s8<6>(g, m0, p); break;
                    case 7: tile_s8<7>(g, m0, p); break;
                    default: tile_s8<MR_S8>(g, m0, p); break;
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

extern const isa_t ISA_AVX512 = {"avx512", supported, gemm_f32, gemm_s8, 1, quantize_rows,
                                 lstm_gates, gru_gates, sru_scan, qrnn_scan};
