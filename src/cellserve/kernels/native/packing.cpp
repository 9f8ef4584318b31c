/* Weights into the panel layouts of native.h, once at model load, and back (unpack). */
#include <stdlib.h>
#include <string.h>

#include "native.h"

/* k rounded up to a multiple of `unit`, or of a whole AMX tile row of `tile_k` where the AMX kernels may run
 * (their loops then have no k tail; the other kernels add the zeros). */
static int padded_k(int k, int unit, int tile_k) {
#if defined(__x86_64__) || defined(_M_X64)
    if (amx_present()) unit = tile_k;
#else
    (void)tile_k;
#endif
    return (k + unit - 1) / unit * unit;
}

void packed_free(packed_t *p) {
    free(p->data);
    free(p->scale);
    free(p->colsum128);
    free(p->bptr);
    free(p->bidx);
    free(p->bvals);
    memset(p, 0, sizeof *p);
}

int pack_f32(packed_t *p, const float *w, ptrdiff_t ld, int n, int k) {
    p->kind = PACK_F32;
    p->bits = 32;
    p->n = n;
    p->k = k;
    p->kpad = k;
    p->panels = (n + NR - 1) / NR;
    p->panel_stride = (size_t)k * NR;
    p->data = aligned_zeros(p->panels * p->panel_stride * sizeof(float));
    if (!p->data) return -1;
    float *dst = (float *)p->data;
    for (int col = 0; col < n; col++) {
        float *panel = dst + (size_t)(col / NR) * p->panel_stride + col % NR;
        const float *row = w + col * ld;
        for (int kk = 0; kk < k; kk++) panel[(size_t)kk * NR] = row[kk];
    }
    return 0;
}

/* Where weight (col, kk) of a bf16 matrix sits: its panel, its pair row, its column, its half. */
static size_t bf16_at(const packed_t *p, int col, int kk) {
    return (size_t)(col / NR) * p->panel_stride + (size_t)(kk / 2) * NR * 2 + (col % NR) * 2 + kk % 2;
}

int pack_bf16(packed_t *p, const float *w, ptrdiff_t ld, int n, int k) {
    p->kind = PACK_BF16;
    p->bits = 16;
    p->n = n;
    p->k = k;
    p->kpad = padded_k(k, 2, 32);
    p->panels = (n + NR - 1) / NR;
    p->panel_stride = (size_t)p->kpad * NR;
    p->data = aligned_zeros(p->panels * p->panel_stride * sizeof(uint16_t));
    if (!p->data) return -1;
    uint16_t *dst = (uint16_t *)p->data;
    for (int col = 0; col < n; col++)
        for (int kk = 0; kk < k; kk++) dst[bf16_at(p, col, kk)] = to_bf16(w[col * ld + kk]);
    return 0;
}

/* Blocks of BR rows x 1 column that are all zero are dropped; the product visits only the others. */
int pack_bsr(packed_t *p, const float *w, ptrdiff_t ld, int n, int k) {
    const int groups = (n + BR - 1) / BR;
    p->kind = PACK_BSR;
    p->bits = 32;
    p->n = n;
    p->k = k;
    p->kpad = k;
    p->panels = groups;
    p->bptr = (int32_t *)aligned_zeros((groups + 1) * sizeof(int32_t));
    size_t nnz = 0;
    for (int g = 0; g < groups; g++)
        for (int kk = 0; kk < k; kk++)
            for (int r = g * BR; r < g * BR + BR && r < n; r++)
                if (w[r * ld + kk] != 0.0f) {
                    nnz++;
                    break;
                }
    p->nnz = (int)nnz;
    p->bidx = (int32_t *)aligned_zeros(nnz * sizeof(int32_t) + 4);
    p->bvals = (float *)aligned_zeros(nnz * BR * sizeof(float) + 4);
    if (!p->bptr || !p->bidx || !p->bvals) return -1;
    size_t b = 0;
    for (int g = 0; g < groups; g++) {
        p->bptr[g] = (int32_t)b;
        for (int kk = 0; kk < k; kk++) {
            bool any = false;
            for (int r = g * BR; r < g * BR + BR && r < n; r++) any |= w[r * ld + kk] != 0.0f;
            if (!any) continue;
            p->bidx[b] = kk;
            for (int r = g * BR; r < g * BR + BR && r < n; r++) p->bvals[b * BR + (r - g * BR)] = w[r * ld + kk];
            b++;
        }
    }
    p->bptr[groups] = (int32_t)b;
    return 0;
}

/* The symmetric grids: int8 [-127, 127], 4-bit [-7, 7], ternary {-1, 0, 1}, binary {-1, 1}. */
static bool on_grid(int v, int bits) {
    switch (bits) {
        case 8: return v >= -127;
        case 4: return v >= -7 && v <= 7;
        case 2: return v >= -1 && v <= 1;
        default: return v == -1 || v == 1;
    }
}

long off_grid(const int8_t *codes, ptrdiff_t ld, int n, int k, int bits) {
    for (int col = 0; col < n; col++)
        for (int kk = 0; kk < k; kk++)
            if (!on_grid(codes[col * ld + kk], bits)) return (long)col * k + kk;
    return -1;
}

/* int8 codes q (n, k), or codes of a 4/2/1-bit grid (see lowbit_affine) stored as fields several to a byte. */
int pack_s8(packed_t *p, const int8_t *codes, ptrdiff_t ld, int n, int k, const float *scales, float act_scale,
            int bits) {
    const int groups = 8 / bits;
    int fa, fb;
    lowbit_affine(bits, &fa, &fb);
    p->kind = PACK_S8;
    p->bits = bits;
    p->n = n;
    p->k = k;
    p->kpad = bits == 8 ? padded_k(k, 4, 64) : padded_k(k, 4 * groups, 4 * groups);
    p->panels = (n + NR - 1) / NR;
    p->panel_stride = (size_t)p->kpad * NR / groups;
    p->act_scale = act_scale;
    p->data = aligned_zeros(p->panels * p->panel_stride);
    p->scale = (float *)aligned_zeros(p->panels * NR * sizeof(float));
    p->colsum128 = (int32_t *)aligned_zeros(p->panels * NR * sizeof(int32_t));
    if (!p->data || !p->scale || !p->colsum128) return -1;
    uint8_t *dst = (uint8_t *)p->data;
    for (int col = 0; col < n; col++) {
        uint8_t *panel = dst + (size_t)(col / NR) * p->panel_stride + (col % NR) * 4;
        const int8_t *row = codes + col * ld;
        int32_t sum = 0;
        for (int kk = 0; kk < k; kk++) {
            const int group = kk / 4, field = group % groups;
            const int u = bits == 8 ? row[kk] : (row[kk] - fb) / fa;
            panel[(size_t)(group / groups) * NR * 4 + kk % 4] |= (uint8_t)((u & ((1 << bits) - 1)) << (field * bits));
            sum += u;
        }
        p->colsum128[col] = 128 * sum;
        p->scale[col] = scales[col];
    }
    return 0;
}

void unpack(const packed_t *p, void *out, ptrdiff_t ld) {
    if (p->kind == PACK_BSR) {
        float *o = (float *)out;
        for (int r = 0; r < p->n; r++) memset(o + r * ld, 0, p->k * sizeof(float));
        for (int g = 0; g < p->panels; g++)
            for (int b = p->bptr[g]; b < p->bptr[g + 1]; b++)
                for (int r = g * BR; r < g * BR + BR && r < p->n; r++)
                    o[r * ld + p->bidx[b]] = p->bvals[(size_t)b * BR + (r - g * BR)];
        return;
    }
    for (int col = 0; col < p->n; col++) {
        if (p->kind == PACK_BF16) {
            float *row = (float *)out + col * ld;
            for (int kk = 0; kk < p->k; kk++) {
                const uint32_t bits = (uint32_t)((const uint16_t *)p->data)[bf16_at(p, col, kk)] << 16;
                memcpy(row + kk, &bits, 4);
            }
        } else if (p->kind == PACK_F32) {
            const float *panel = (const float *)p->data + (size_t)(col / NR) * p->panel_stride + col % NR;
            float *row = (float *)out + col * ld;
            for (int kk = 0; kk < p->k; kk++) row[kk] = panel[(size_t)kk * NR];
        } else {
            const int groups = 8 / p->bits, mask = (1 << p->bits) - 1;
            int fa, fb;
            lowbit_affine(p->bits, &fa, &fb);
            const uint8_t *panel = (const uint8_t *)p->data + (size_t)(col / NR) * p->panel_stride + (col % NR) * 4;
            int8_t *row = (int8_t *)out + col * ld;
            for (int kk = 0; kk < p->k; kk++) {
                const int group = kk / 4;
                const uint8_t byte = panel[(size_t)(group / groups) * NR * 4 + kk % 4];
                row[kk] = p->bits == 8 ? (int8_t)byte : (int8_t)(fa * ((byte >> ((group % groups) * p->bits)) & mask) + fb);
            }
        }
    }
}

size_t packed_nbytes(const packed_t *p) {
    if (p->kind == PACK_BSR)
        return (size_t)p->nnz * (BR * sizeof(float) + sizeof(int32_t)) + (p->panels + 1) * sizeof(int32_t);
    size_t bytes = p->panels * p->panel_stride * (p->kind == PACK_F32 ? sizeof(float) : p->kind == PACK_BF16 ? 2 : 1);
    if (p->kind == PACK_S8) bytes += p->panels * NR * (sizeof(float) + sizeof(int32_t));
    return bytes;
}
