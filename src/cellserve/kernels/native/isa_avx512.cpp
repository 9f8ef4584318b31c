/* AVX-512 path (F, BW, VL; VNNI's vpdpbusd for int8). fp32 tiles: 12 rows x 32 columns, 24 zmm
 * accumulators, the shape MLAS's AVX-512 SGEMM kernel also uses. Compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512vnni -mfma; chosen at run time only where the CPU has all of them. */
#include <immintrin.h>

#include <utility>

#define VL 16
#define VMIN(a, b) ((vf)_mm512_min_ps((__m512)(a), (__m512)(b)))
#define VMAX(a, b) ((vf)_mm512_max_ps((__m512)(a), (__m512)(b)))
#define MR 12
#include "kernels.inc"

namespace {

/* int8 and low-bit tiles, one template. Per group of 4 k, each half panel (16 columns) is one 64-byte
 * vector of weight bytes and one vpdpbusd per row (4 products of an unsigned and a signed byte summed into
 * each int32 lane).
 *   int8: activations are the unsigned operand, as signed codes + 128; the column's 128 * sum q (packed
 *         once) is subtracted at the end.
 *   below 8 bits: a 64-byte load holds G = 8/bits groups in bit fields. The fields u >= 0 are the unsigned
 *         operand and the activations the signed one, so the tile sums u*x directly; with q = a*u + b
 *         (lowbit_affine) the product is a*sum u*x + b*sum x, the row's code sum coming with its
 *         quantization. The weights never exist as int8 in memory: each field is shifted and masked out of
 *         the loaded bytes in a register. (Masking fields in place, one accumulator set per bit position,
 *         saves the shift but measured 7% slower in batch-1 products.)
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

    auto chunk = [&](int c, auto cu_const) __attribute__((always_inline)) {
        constexpr int cu = decltype(cu_const)::value;
        __m512i v[NP * 2];
#pragma GCC unroll 4
        for (int h = 0; h < NP * 2; h++)
            v[h] = _mm512_load_si512((const void *)(b + (h / 2) * stride + (size_t)c * NR * 4 + (h % 2) * 64));
        for_each_index(std::make_integer_sequence<int, G>{}, [&](auto field) __attribute__((always_inline)) {
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
                for (int h = 0; h < NP * 2; h++)
                    acc[u][i][h] = bits == 8 ? _mm512_dpbusd_epi32(acc[u][i][h], av, wv[h])
                                             : _mm512_dpbusd_epi32(acc[u][i][h], wv[h], av);
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
        for_each_index(std::make_integer_sequence<int, CU>{}, [&](auto cu) __attribute__((always_inline)) { chunk(c + decltype(cu)::value, cu); });
    }
    for (; c < chunks; c++) chunk(c, std::integral_constant<int, 0>{});

    int fa, fb;
    lowbit_affine(bits, &fa, &fb);
    for (int np = 0; np < NP; np++) {
        alignas(64) int32_t sums[mr * NR];
        const int32_t *colsum = w->colsum128 + (p + np) * NR;
        for (int i = 0; i < mr; i++) {
            __m512i s[2];
            for (int h = 0; h < 2; h++) {
                s[h] = acc[0][i][2 * np + h];
                for (int u = 1; u < U; u++) s[h] = _mm512_add_epi32(s[h], acc[u][i][2 * np + h]);
                if (bits == 8)
                    s[h] = _mm512_sub_epi32(s[h], _mm512_loadu_si512((const void *)(colsum + 16 * h)));
                else
                    s[h] = _mm512_add_epi32(_mm512_mullo_epi32(s[h], _mm512_set1_epi32(fa)),
                                            _mm512_set1_epi32(fb * g->act.sums[m0 + i]));
                _mm512_store_si512((void *)(sums + i * NR + 16 * h), s[h]);
            }
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

/* Binary weights by table lookup (T-MAC, Wei et al. 2025), exact. A 1-bit byte of the panel layout holds
 * fields 0-7 of one column at one k offset kk in its chunk; its low nibble indexes fields 0-3, its high
 * nibble fields 4-7. For each group of 4 activations those nibbles can select, the 16 sums
 * T[idx] = sum_j bit_j(idx) * x_j (+ 512, so that 0 <= T < 1024) are tabulated once per call and row, as a
 * low and a high byte table. One vpermb then looks up 64 entries at once (16 columns x 4 offsets kk, the
 * offset in index bits 4-5), and vpdpbusd with ones sums each column's 4 bytes: 512 weight products per
 * two lookups and two vpdpbusd, against eight vpdpbusd and fifteen shift/mask operations unpacking the
 * bits. Measured 1.8x faster than that at batch 1 on Zen 4; 2-bit and wider weights would need one
 * lookup per bit and lose to vpdpbusd (see README, "Low-bit kernels"). Needs AVX512-VBMI (vpermb). */
#define LUT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

/* Tables of m rows of (signed) activation codes: per 16 codes (one nibble's 4 fields x 4 offsets
 * kk), 64 low bytes then 64 high bytes; entry 16*kk + idx. */
LUT_TARGET void lut1_tables(const uint8_t *codes, int m, int kpad, uint8_t *tables) {
    alignas(64) uint8_t pattern[64], gather[4][64];
    for (int e = 0; e < 64; e++) {
        pattern[e] = (uint8_t)(((e / 4) >> (e % 4)) & 1);    /* dword idx, byte j: bit j of idx */
        for (int kk = 0; kk < 4; kk++) gather[kk][e] = (uint8_t)(4 * (e % 4) + kk);
    }
    const __m512i bits = _mm512_load_si512(pattern), bias = _mm512_set1_epi32(512);
    for (int r = 0; r < m; r++)
        for (int q = 0; q < kpad / 16; q++) {
            const __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(codes + (size_t)r * kpad + 16 * q)));
            uint8_t *t = tables + ((size_t)r * (kpad / 16) + q) * 128;
            for (int kk = 0; kk < 4; kk++) {
                const __m512i sums = _mm512_dpbusd_epi32(bias, bits, _mm512_shuffle_epi8(x, _mm512_load_si512(gather[kk])));
                _mm_store_si128((__m128i *)(t + 16 * kk), _mm512_cvtepi32_epi8(sums));
                _mm_store_si128((__m128i *)(t + 64 + 16 * kk), _mm512_cvtepi32_epi8(_mm512_srli_epi32(sums, 8)));
            }
        }
}

template <int mr, int NP>
LUT_TARGET void tile_lut1(const qgemm_t *g, const uint8_t *tables, int m0, int p) {
    const packed_t *w = g->w;
    const int chunks = w->kpad / 32;
    const size_t stride = w->panel_stride, row_tables = (size_t)w->kpad * 8;
    const uint8_t *b = (const uint8_t *)w->data + (size_t)p * stride;
    alignas(64) uint8_t offsets[64];
    for (int e = 0; e < 64; e++) offsets[e] = (uint8_t)((e % 4) << 4);
    const __m512i ones = _mm512_set1_epi8(1), nibble = _mm512_set1_epi8(0x0F), offset = _mm512_load_si512(offsets);
    __m512i lo[mr][NP * 2], hi[mr][NP * 2];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int h = 0; h < NP * 2; h++) lo[i][h] = hi[i][h] = _mm512_setzero_si512();
    for (int c = 0; c < chunks; c++) {
        if (mr <= 2)
#pragma GCC unroll 2
            for (int h = 0; h < NP; h++) {
                __builtin_prefetch(b + h * stride + (size_t)(c + 24) * 128);
                __builtin_prefetch(b + h * stride + (size_t)(c + 24) * 128 + 64);
            }
#pragma GCC unroll 4
        for (int h = 0; h < NP * 2; h++) {
            const __m512i v = _mm512_load_si512((const void *)(b + (h / 2) * stride + (size_t)c * 128 + (h % 2) * 64));
            const __m512i low = _mm512_ternarylogic_epi32(v, nibble, offset, 0xEA);  /* (v & 0x0F) | offset */
            const __m512i high = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, offset, 0xEA);
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) {
                const uint8_t *t = tables + (size_t)(m0 + i) * row_tables + (size_t)c * 256;
                lo[i][h] = _mm512_dpbusd_epi32(lo[i][h], _mm512_permutexvar_epi8(low, _mm512_load_si512(t)), ones);
                hi[i][h] = _mm512_dpbusd_epi32(hi[i][h], _mm512_permutexvar_epi8(low, _mm512_load_si512(t + 64)), ones);
                lo[i][h] = _mm512_dpbusd_epi32(lo[i][h], _mm512_permutexvar_epi8(high, _mm512_load_si512(t + 128)), ones);
                hi[i][h] = _mm512_dpbusd_epi32(hi[i][h], _mm512_permutexvar_epi8(high, _mm512_load_si512(t + 192)), ones);
            }
        }
    }
    const __m512i table_bias = _mm512_set1_epi32(512 * (w->kpad / 4));
    for (int np = 0; np < NP; np++) {
        alignas(64) int32_t sums[mr * NR];
        for (int i = 0; i < mr; i++) {
            const __m512i x_sum = _mm512_set1_epi32(g->act.sums[m0 + i]);
            for (int h = 0; h < 2; h++) {  /* sum u*x, then q = 2u - 1: 2 * sum u*x - sum x */
                __m512i s = _mm512_sub_epi32(_mm512_add_epi32(lo[i][2 * np + h], _mm512_slli_epi32(hi[i][2 * np + h], 8)),
                                             table_bias);
                _mm512_store_si512((void *)(sums + i * NR + 16 * h), _mm512_sub_epi32(_mm512_slli_epi32(s, 1), x_sum));
            }
        }
        store_s8_tile(g, m0, mr, p + np, sums);
    }
}

LUT_TARGET void gemm_lut1_panels(const qgemm_t *g, int p0, int p1) {
    const int kpad = g->w->kpad;
    uint8_t *tables = (uint8_t *)scratch(SLOT_LUT, (size_t)g->m * kpad * 8);
    lut1_tables(g->act.codes, g->m, kpad, tables);
    const int block = panels_per_block(g->w->panel_stride);
    for (int b0 = p0; b0 < p1; b0 += block) {
        const int b1 = b0 + block < p1 ? b0 + block : p1;
        for (int m0 = 0; m0 < g->m; m0 += 4) {
            const int rows = g->m - m0 < 4 ? g->m - m0 : 4;
            for (int p = b0; p < b1;) {
                if (rows <= 2 && p + 1 < b1) {
                    if (rows == 1) tile_lut1<1, 2>(g, tables, m0, p);
                    else tile_lut1<2, 2>(g, tables, m0, p);
                    p += 2;
                    continue;
                }
                switch (rows) {
                    case 1: tile_lut1<1, 1>(g, tables, m0, p); break;
                    case 2: tile_lut1<2, 1>(g, tables, m0, p); break;
                    case 3: tile_lut1<3, 1>(g, tables, m0, p); break;
                    default: tile_lut1<4, 1>(g, tables, m0, p); break;
                }
                p++;
            }
        }
    }
}

/* 8-bit weights and two or more row tiles: panel outer, blocks of KB_S8 chunks (4 k each; 128 chunks are
 * 16 KB of the panel, which stays in L1), every row tile inner, as the fp32 product orders it (kernels.inc,
 * f32_panels_kblocked): the panel is read from L1 by every tile, and only a tile's rows of A come from L2. A
 * tile's int32 sums pass between k blocks through a per-thread M x NR buffer. */
constexpr int KB_S8 = 128;

template <int mr>
void tile_s8_kblock(const qgemm_t *g, int m0, int p, int c0, int32_t *sums) {
    const packed_t *w = g->w;
    const int chunks = w->kpad / 4, c1 = c0 + KB_S8 < chunks ? c0 + KB_S8 : chunks;
    const uint8_t *b = (const uint8_t *)w->data + (size_t)p * w->panel_stride;
    const uint8_t *a = g->act.codes + (ptrdiff_t)m0 * w->kpad;
    int32_t *tile = sums + (ptrdiff_t)m0 * NR;
    __m512i acc[mr][2];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = c0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512((const void *)(tile + i * NR + 16 * h));
    for (int c = c0; c < c1; c++) {
        const __m512i v0 = _mm512_load_si512((const void *)(b + (size_t)c * NR * 4));
        const __m512i v1 = _mm512_load_si512((const void *)(b + (size_t)c * NR * 4 + 64));
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            int32_t four;
            memcpy(&four, a + i * w->kpad + c * 4, 4);
            const __m512i av = _mm512_set1_epi32(four);
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, v0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, v1);
        }
    }
    if (c1 < chunks) {
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
            for (int h = 0; h < 2; h++) _mm512_store_si512((void *)(tile + i * NR + 16 * h), acc[i][h]);
        return;
    }
    const int32_t *colsum = w->colsum128 + p * NR;  /* (activations are codes + 128) */
    alignas(64) int32_t out[mr * NR];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 2; h++)
            _mm512_store_si512((void *)(out + i * NR + 16 * h),
                               _mm512_sub_epi32(acc[i][h], _mm512_loadu_si512((const void *)(colsum + 16 * h))));
    store_s8_tile(g, m0, mr, p, out);
}

void gemm_s8_panels_kblocked(const qgemm_t *g, int p0, int p1) {
    int32_t *sums = (int32_t *)scratch(SLOT_TILE_SUMS, (size_t)g->m * NR * sizeof(int32_t));
    if (!sums) return;
    const int chunks = g->w->kpad / 4;
    for (int p = p0; p < p1; p++)
        for (int c0 = 0; c0 < chunks; c0 += KB_S8)
            for (int m0 = 0; m0 < g->m; m0 += MR_S8) {
                switch (g->m - m0 < MR_S8 ? g->m - m0 : MR_S8) {
                    case 1: tile_s8_kblock<1>(g, m0, p, c0, sums); break;
                    case 2: tile_s8_kblock<2>(g, m0, p, c0, sums); break;
                    case 3: tile_s8_kblock<3>(g, m0, p, c0, sums); break;
                    case 4: tile_s8_kblock<4>(g, m0, p, c0, sums); break;
                    case 5: tile_s8_kblock<5>(g, m0, p, c0, sums); break;
                    case 6: tile_s8_kblock<6>(g, m0, p, c0, sums); break;
                    case 7: tile_s8_kblock<7>(g, m0, p, c0, sums); break;
                    default: tile_s8_kblock<MR_S8>(g, m0, p, c0, sums); break;
                }
            }
}

/* Panel blocks outer, then row tiles, then the block's panels (see panels_per_block in kernels.inc). */
void gemm_s8_panels(const qgemm_t *g, int p0, int p1) {
    const int bits = g->w->bits;
    if (bits == 8 && g->m > MR_S8) return gemm_s8_panels_kblocked(g, p0, p1);
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

/* The VBMI path: binary weights by table lookup, everything else as above. */
void gemm_s8_panels_vbmi(const qgemm_t *g, int p0, int p1) {
    if (g->w->bits == 1) gemm_lut1_panels(g, p0, p1);
    else gemm_s8_panels(g, p0, p1);
}


/* bf16 tiles on AVX512-BF16: vdpbf16ps multiplies 16 pairs of bf16 and adds both products of a pair into
 * one fp32 lane, 32 multiply-adds an instruction (an fp32 FMA does 16). Per pair of k: the panel's two
 * vectors (32 columns x 2 k), and per row one broadcast pair word of a, folded into the instruction.
 * With few rows, U independent accumulator sets hide its latency, as in the fp32 tiles. */
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

template <int mr>
BF16_TARGET void tile_dpbf16(const gemm_t *g, const uint32_t *a, int m0, int p) {
    constexpr int U = unroll_for(mr);
    const packed_t *w = g->w;
    const int pairs = w->kpad / 2;
    const uint32_t *b = (const uint32_t *)((const uint16_t *)w->data + (size_t)p * w->panel_stride);
    __m512 acc[U][mr][2];
#pragma GCC unroll 8
    for (int u = 0; u < U; u++)
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) acc[u][i][0] = acc[u][i][1] = _mm512_setzero_ps();
    auto pair = [&](int c, int u) __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16"))) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(b + (size_t)c * NR));
        const __m512bh w1 = (__m512bh)_mm512_load_si512((const void *)(b + (size_t)c * NR + 16));
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) {
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[c * mr + i]);
            acc[u][i][0] = _mm512_dpbf16_ps(acc[u][i][0], av, w0);
            acc[u][i][1] = _mm512_dpbf16_ps(acc[u][i][1], av, w1);
        }
    };
    int c = 0;
    for (; c + U <= pairs; c += U) {
        if (mr <= 3)
#pragma GCC unroll 8
            for (int u = 0; u < U; u++) {
                __builtin_prefetch(b + (size_t)(c + u + 32) * NR);
                __builtin_prefetch(b + (size_t)(c + u + 32) * NR + 16);
            }
#pragma GCC unroll 8
        for (int u = 0; u < U; u++) pair(c + u, u);
    }
    for (; c < pairs; c++) pair(c, 0);
    vf sum[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            __m512 s = acc[0][i][j];
#pragma GCC unroll 8
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][i][j]);
            sum[i][j] = (vf)s;
        }
    store_tile<mr>(g, m0, p, sum);
}

BF16_TARGET void rows_dpbf16(const gemm_t *g, const uint32_t *a, int m0, int rows, int p) {
    switch (rows) {
#define CASE(r) case r: tile_dpbf16<(r <= MR ? r : 1)>(g, a, m0, p); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
        default: break;
    }
}

/* A rounded to bf16 by vcvtne2ps2bf16 (32 floats to 16 pair words), written pair-major per tile. */
BF16_TARGET void pack_rows_dpbf16(const float *a, ptrdiff_t lda, int rows, int k, uint32_t *dst) {
    alignas(64) uint32_t words[16];
    for (int i = 0; i < rows; i++) {
        const float *row = a + i * lda;
        int kk = 0;
        for (; kk + 32 <= k; kk += 32) {
            const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + kk + 16), _mm512_loadu_ps(row + kk));
            _mm512_store_si512((void *)words, (__m512i)v);
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) dst[(kk / 2 + j) * rows + i] = words[j];
        }
        for (; kk < k; kk += 2) dst[(kk / 2) * rows + i] = bf16_pair(row, kk, k);
    }
}

/* The dpbf16 loop: blocks of panels that fit in L2 outer, row tiles, then the block's panels. a is A packed
 * tile by tile (pack_rows_dpbf16). */
struct Dpbf16Job {
    const gemm_t *g;
    const uint32_t *a;
};

BF16_TARGET void dpbf16_panels(void *ctx, int tid, int nth) {
    const Dpbf16Job *job = (const Dpbf16Job *)ctx;
    const gemm_t *g = job->g;
    const int panels = g->w->panels, tiles = tile_count(g->m), pairs = g->w->kpad / 2;
    const int p0 = (int)((long long)panels * tid / nth), p1 = (int)((long long)panels * (tid + 1) / nth);
    const int block = panels_per_block(g->w->panel_stride * sizeof(uint16_t));
    for (int b0 = p0; b0 < p1; b0 += block) {
        const int b1 = b0 + block < p1 ? b0 + block : p1;
        for (int t = 0, m0 = 0; t < tiles; t++) {
            const int rows = tile_rows(g->m, m0, t, tiles);
            for (int p = b0; p < b1; p++) rows_dpbf16(g, job->a + (ptrdiff_t)m0 * pairs, m0, rows, p);
            m0 += rows;
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

int avx512_bf16_supported() { return supported() && __builtin_cpu_supports("avx512bf16"); }
/* x rounded to bf16 and packed once per call (M*K against M*K*N multiply-adds), then the tiles. */
void avx512_bf16_gemm(const gemm_t *g, int threads) {
    const int pairs = g->w->kpad / 2, tiles = tile_count(g->m);
    uint32_t *packed = (uint32_t *)scratch(SLOT_PACKED_A, (size_t)g->m * pairs * sizeof(uint32_t));
    if (!packed) return;
    for (int t = 0, m0 = 0; t < tiles; t++) {
        const int rows = tile_rows(g->m, m0, t, tiles);
        pack_rows_dpbf16(g->a + (ptrdiff_t)m0 * g->lda, g->lda, rows, g->w->k, packed + (ptrdiff_t)m0 * pairs);
        m0 += rows;
    }
    Dpbf16Job job = {g, packed};
    pool_run(threads, dpbf16_panels, &job);
}
int avx512_vbmi_supported() { return supported() && __builtin_cpu_supports("avx512vbmi"); }
void avx512_vbmi_gemm_s8(const qgemm_t *g, int threads) {
    pool_run(threads, split_panels<gemm_s8_panels_vbmi>, (void *)g);
}

extern const isa_t ISA_AVX512 = {"avx512", supported, gemm_f32, gemm_bsr, gemm_s8, gemm_bf16, 1, quantize_rows,
                                 lstm_gates, gru_gates, sru_scan, qrnn_scan, max_sumexp_rows,
                               child_sum_gates};
