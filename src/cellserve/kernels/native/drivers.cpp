/* Drivers: the products and recurrences the bindings call, on raw arrays. They decide threading (how many
 * of the calling thread's threads a product gets), quantize int8 activations on the way in, and loop
 * over time steps inside one call; the kernels they call come from the platform's dispatch table. */
#include "native.h"

namespace {

/* Products smaller than this many multiply-adds run on one thread: waking a worker costs more. */
constexpr double PARALLEL_MIN_MACS = 1 << 18;

int threads_for(double macs, int panels) {
    const int t = native_threads;
    if (t <= 1 || macs < PARALLEL_MIN_MACS) return 1;
    return t < panels ? t : panels;
}

void run_qgemm(const isa_t *isa, const qgemm_t *q) {
    isa->gemm_s8(q, threads_for((double)q->m * q->w->n * q->w->kpad / 4, q->w->panels));
}

/* gates = x @ W_ih^T + h @ W_hh^T + bias, as two passes: at batch 1 each matrix then streams from memory
 * in one sequential run, measured 1.4x faster than alternating the two matrices panel by panel. */
void two_linear(const packed_t *wi, const float *x, ptrdiff_t ldx, const packed_t *wh, const float *h, ptrdiff_t ldh,
                int m, float *gates, const float *bias) {
    linear(wi, x, ldx, m, gates, wi->n, nullptr, 0, nullptr);
    linear(wh, h, ldh, m, gates, wh->n, gates, wh->n, bias);
}

/* The time loop of a recurrence: step(t, h_prev, ld_prev, h_t) for t = 0..steps-1, where h_prev is h0 and
 * then the previous step's row of hs (T, B, H), and h_t the step's own row. */
template <typename Step>
void over_time(const float *h0, ptrdiff_t ldh0, float *hs, int steps, int batch, int hidden, Step step) {
    const float *h_prev = h0;
    ptrdiff_t ld_prev = ldh0;
    for (int t = 0; t < steps; t++) {
        float *h_t = hs + (size_t)t * batch * hidden;
        step(t, h_prev, ld_prev, h_t);
        h_prev = h_t;
        ld_prev = hidden;
    }
}

}  // namespace

/* c = [addend +] x @ W^T [+ bias] for fp32, block-sparse, bf16 or int8 W (x rounded to bf16, or quantized per
 * row, on the way in). */
void linear(const packed_t *w, const float *x, ptrdiff_t ldx, int m, float *c, ptrdiff_t ldc, const float *addend,
            ptrdiff_t ld_add, const float *bias) {
    if (m == 0) return;
    const isa_t *isa = platform();
    if (w->kind != PACK_S8) {
        gemm_t g = {x, ldx, w, m, c, ldc, addend, ld_add, bias};
        if (w->kind == PACK_BSR)
            isa->gemm_bsr(&g, threads_for((double)m * w->nnz * BR, w->panels));
        else if (w->kind == PACK_BF16)
            isa->gemm_bf16(&g, threads_for((double)m * w->n * w->k, w->panels));
        else
            isa->gemm_f32(&g, threads_for((double)m * w->n * w->k, w->panels));
        return;
    }
    uint8_t *codes = (uint8_t *)scratch(SLOT_CODES, (size_t)m * w->kpad);
    float *scales = (float *)scratch(SLOT_SCALES, (size_t)m * sizeof(float));
    int32_t *sums = (int32_t *)scratch(SLOT_SUMS, (size_t)m * sizeof(int32_t));
    const int is_unsigned = unsigned_codes(isa, w);
    isa->quantize(x, ldx, m, w->k, w->kpad, w->act_scale, is_unsigned, codes, scales, sums);
    qgemm_t q = {w, {codes, scales, sums, is_unsigned}, m, c, nullptr, ldc, addend, ld_add, bias};
    run_qgemm(isa, &q);
}

/* out = codes @ Q^T in exact int32 (int8 matrices; tests the integer kernels). */
void gemm_s32(const packed_t *w, const int8_t *x, ptrdiff_t ldx, int m, int32_t *out, ptrdiff_t ldo) {
    const isa_t *isa = platform();
    uint8_t *codes = (uint8_t *)scratch(SLOT_CODES, (size_t)m * w->kpad + 1);
    int32_t *sums = (int32_t *)scratch(SLOT_SUMS, (size_t)m * sizeof(int32_t) + 4);
    const int is_unsigned = unsigned_codes(isa, w);
    const uint8_t flip = is_unsigned ? 0x80 : 0;
    for (int r = 0; r < m; r++) {
        const int8_t *row = x + r * ldx;
        uint8_t *dst = codes + (size_t)r * w->kpad;
        int32_t sum = 0;
        for (int kk = 0; kk < w->kpad; kk++) {
            const int8_t v = kk < w->k ? row[kk] : 0;
            sum += v;
            dst[kk] = (uint8_t)v ^ flip;
        }
        sums[r] = sum;
    }
    qgemm_t q = {w, {codes, nullptr, sums, is_unsigned}, m, nullptr, out, ldo, nullptr, 0, nullptr};
    run_qgemm(isa, &q);
}

/* int8 codes per row (scale = static_scale, or max|x| / 127 when it is 0): the rule every int8 product uses. */
void quantize(const float *x, ptrdiff_t ldx, int m, int k, float static_scale, uint8_t *codes, float *scales) {
    platform()->quantize(x, ldx, m, k, k, static_scale, 0, codes, scales, nullptr);
}

void lstm_step(const packed_t *wi, const packed_t *wh, const float *x, ptrdiff_t ldx, const float *h, ptrdiff_t ldh,
               const float *c, ptrdiff_t ldc, const float *bias, float *h_out, ptrdiff_t ldh_out, float *c_out,
               int batch, float cell_step, float cell_limit) {
    const int hidden = wh->k;
    float *gates = (float *)scratch(SLOT_GATES, (size_t)batch * 4 * hidden * sizeof(float));
    two_linear(wi, x, ldx, wh, h, ldh, batch, gates, bias);
    platform()->lstm_gates(gates, batch, hidden, c, ldc, h_out, ldh_out, c_out, cell_step, cell_limit);
}

/* T steps; gi (T, B, 4H) holds the input projections, hs (T, B, H) receives every h; c (B, H) in place. */
void lstm_sequence(const packed_t *wh, const float *gi, const float *bias, const float *h0, ptrdiff_t ldh0, float *c,
                   ptrdiff_t ldc, float *hs, int steps, int batch, float cell_step, float cell_limit) {
    const int hidden = wh->k;
    const isa_t *isa = platform();
    float *gates = (float *)scratch(SLOT_GATES, (size_t)batch * 4 * hidden * sizeof(float));
    over_time(h0, ldh0, hs, steps, batch, hidden, [&](int t, const float *h_prev, ptrdiff_t ld_prev, float *h_t) {
        const float *gi_t = gi + (size_t)t * batch * 4 * hidden;
        linear(wh, h_prev, ld_prev, batch, gates, 4 * hidden, gi_t, 4 * hidden, bias);
        isa->lstm_gates(gates, batch, hidden, c, ldc, h_t, hidden, c, cell_step, cell_limit);
    });
}

void gru_step(const packed_t *wi, const packed_t *wh, const float *x, ptrdiff_t ldx, const float *h, ptrdiff_t ldh,
              const float *b_ih, const float *b_hh, float *h_out, ptrdiff_t ldh_out, int batch) {
    const int hidden = wh->k;
    float *gi = (float *)scratch(SLOT_GATES, (size_t)batch * 3 * hidden * sizeof(float));
    float *gh = (float *)scratch(SLOT_GATES2, (size_t)batch * 3 * hidden * sizeof(float));
    linear(wi, x, ldx, batch, gi, 3 * hidden, nullptr, 0, nullptr);
    linear(wh, h, ldh, batch, gh, 3 * hidden, nullptr, 0, nullptr);
    platform()->gru_gates(gi, 3 * hidden, gh, b_ih, b_hh, h, ldh, batch, hidden, h_out, ldh_out);
}

/* gi (T, B, 3H) = x W_ih^T without bias; hs (T, B, H) receives every h. */
void gru_sequence(const packed_t *wh, const float *gi, const float *b_ih, const float *b_hh, const float *h0,
                  ptrdiff_t ldh0, float *hs, int steps, int batch) {
    const int hidden = wh->k;
    const isa_t *isa = platform();
    float *gh = (float *)scratch(SLOT_GATES2, (size_t)batch * 3 * hidden * sizeof(float));
    over_time(h0, ldh0, hs, steps, batch, hidden, [&](int t, const float *h_prev, ptrdiff_t ld_prev, float *h_t) {
        linear(wh, h_prev, ld_prev, batch, gh, 3 * hidden, nullptr, 0, nullptr);
        isa->gru_gates(gi + (size_t)t * batch * 3 * hidden, 3 * hidden, gh, b_ih, b_hh, h_prev, ld_prev, batch, hidden,
                       h_t, hidden);
    });
}

/* k steps of an SRU layer: the input projections of all k steps are one product (the weights are read once
 * per k steps), then the scan. xs (T, B, in) C-contiguous; c (B, H) in place; hs (T, B, H). */
void sru_steps(const packed_t *w, const float *xs, const float *v_f, const float *v_r, const float *b_f,
               const float *b_r, float *c, float *hs, int steps, int batch, int hidden, int use_tanh) {
    const int rows = steps * batch;
    float *u = (float *)scratch(SLOT_GATES, (size_t)rows * w->n * sizeof(float));
    linear(w, xs, w->k, rows, u, w->n, nullptr, 0, nullptr);
    platform()->sru_scan(u, w->n, xs, steps, batch, hidden, v_f, v_r, b_f, b_r, use_tanh, c, hs);
}

/* k steps of a QRNN layer; xs (T, B, window*in) holds [x_{t-1}, x_t] (window 2) or x_t, so the gates of all
 * k steps are one product. */
void qrnn_steps(const packed_t *w, const float *xs, const float *bias, float *c, float *hs, int steps, int batch,
                int hidden) {
    const int rows = steps * batch;
    float *u = (float *)scratch(SLOT_GATES, (size_t)rows * w->n * sizeof(float));
    linear(w, xs, w->k, rows, u, w->n, nullptr, 0, nullptr);
    platform()->qrnn_scan(u, steps, batch, hidden, bias, c, hs);
}

/* Per row of scores: the maximum, its first index and (sumexp not NULL) the sum of exp(x - max). */
void rows_max_sumexp(const float *x, ptrdiff_t ld, int m, int n, float *max, int32_t *argmax, float *sumexp) {
    platform()->rows_max_sumexp(x, ld, m, n, max, argmax, sumexp);
}

/* The child-sum TreeLSTM's gate math for a batch of nodes (kernels.inc). */
void tree_gates(const float *gx, const float *bias, const float *gh, const float *fh, const float *c_kids,
                const int *kid_row, int kids, int nodes, int hidden, float *h_out, float *c_out) {
    platform()->tree_gates(gx, bias, gh, fh, c_kids, kid_row, kids, nodes, hidden, h_out, c_out);
}
