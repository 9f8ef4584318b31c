/* cellserve.engine._steploop: the engine's step loop in native code, for token-sequence models (language
 * models, seq2seq with greedy decoding), frame-sequence streams (a recurrent core over feature frames: an
 * imported graph's, a stream model's) and child-sum TreeLSTMs. Layers: LSTM, GRU, SRU, QRNN, unidirectional.
 *
 * Why: on small models the Python work around each batched cell step (row windows, decode bookkeeping,
 * leaving rows) costs more than the step, and it holds the GIL the server's threads need. This loop keeps the
 * running set's arrays (states, tokens, positions, outputs, scores), gathers a step's rows, runs the fused cell
 * steps and the head through the kernel core's C face (kernels/native/api.h), decodes (argmax, EOS, length
 * limits, log-likelihood) and retires finished rows into a list, with the GIL released throughout.
 *
 * Two ways to drive it:
 *   run()     on the caller's thread (graph and none policies, Runner.step): every stage to completion in
 *             one call, padded; or one step of one stage.
 *   start()   cellular batching on a native worker thread that never waits for Python: requests join through
 *             an inbox between steps, finished ones leave through an outbox that collect() hands to Python,
 *             which meanwhile resolves futures and admits (BatchMaker's C++ scheduler thread). Each return
 *             to Python costs a GIL hand-over, measured at ~50 us on a loaded 2-core machine, more than a
 *             small model's step; the worker pays none of them.
 * Either way the stage pick, row windows and row order on leaving are engine/batch.py's and policies.py's, so
 * the Python loop (the families' Python runners) is the reference this loop must equal.
 *
 * A stage is one cell type's persistent batch: row r holds a request's state in one float block and its
 * bookkeeping in a Row. READ stages feed the request's own tokens (an encoder, or a language model scoring
 * with its head); GENERATE stages feed back their argmax (a greedy decoder); FRAMES stages feed the request's
 * float frames in blocks of up to `block` steps (engine/frames.py's StreamRunner: one input projection per
 * block) and hand back the top layer's outputs and the final state, for the front and head around the core
 * that stay in Python.
 *
 * A loop of trees (child-sum TreeLSTM, families/tree.py's TreeRunner) has two stages, LEAF and INTERNAL, whose
 * batches are queues of ready nodes rather than persistent rows: a tree's nodes keep their states in slots of
 * the loop's node pool, a node is ready once its children are done, and a tree leaves with its root's logits.
 *
 * Rows (and trees) are named by the runner's ids, which are never reused; each also carries the engine's ticket,
 * the index of its cancel flag. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <pthread.h>
#include <string.h>
#include <thread>
#include <unordered_map>
#include <vector>

#include "api.h"
#include "loop_face.h"

namespace {

const native_api_t *K = nullptr;  // the kernel core

// SRU: its activation; QRNN: its window (1: x_t, 2: [x_{t-1}, x_t])
enum { CELL_LSTM = 0, CELL_GRU = 1, CELL_SRU_TANH = 2, CELL_SRU_IDENTITY = 3, CELL_QRNN1 = 4, CELL_QRNN2 = 5 };
enum { READ = 0, GENERATE = 1, FRAMES = 2, LEAF = 3, INTERNAL = 4 };
enum { PICK_STAGE = 0, PICK_FULLEST = 1, PICK_OLDEST = 2, PICK_EARLIEST = 3 };
enum { LEFT_FINISHED = 0, LEFT_CANCELLED = 1 };

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Layer {
    int kind;
    const packed_t *wi, *wh;    // SRU, QRNN: their one matrix W, no w_hh
    std::vector<float> b1, b2;  // LSTM: bias (b_ih + b_hh); GRU: b_ih, b_hh; SRU: v_f, v_r, b_f, b_r; QRNN: bias
    float grid_step, grid_limit;
    int hidden, offset;         // h at offset, c (LSTM, SRU, QRNN) at offset + hidden, a window-2 QRNN's
                                // previous input after it, in the row's state
    bool sru() const { return kind == CELL_SRU_TANH || kind == CELL_SRU_IDENTITY; }
    bool qrnn() const { return kind == CELL_QRNN1 || kind == CELL_QRNN2; }
};

struct Row {
    long long id, ticket;
    double arrival;
    int pos = 0;                  // READ: the next token to feed
    std::vector<int64_t> tokens;  // READ: the request's tokens
    std::vector<int64_t> out;     // GENERATE: tokens produced
    int max_len = 0;
    bool stop = true;             // GENERATE: stop at EOS
    double score = 0.0;           // READ with a head: log-likelihood so far
    int64_t prev = 0;             // GENERATE: the token fed next
    bool trace = false;           // keep the numbers of the steps it takes part in (a traced request)
    std::vector<uint32_t> steps;
    int length = 0;               // FRAMES: frames to run
    std::vector<float> frames;    // FRAMES: length x dim
    std::vector<float> ys;        // FRAMES: the top layer's outputs, length x out_dim
    std::vector<float> initial;   // FRAMES: the state it starts from (empty: zeros), until it joins
    std::vector<int> marks;       // FRAMES: frame counts after which its state is kept (a message's chunks)
    std::vector<float> marked;    // FRAMES: those states, one after another
    std::vector<int64_t> parents; // a tree's (with its tokens, one per node), until it joins
};

/* A tree in a tree loop: its nodes' parents, children (CSR, in node order), children still to run, and the
 * slots of the loop's node pool that hold their states. */
struct Tree {
    long long ticket;
    double arrival;
    bool trace = false;
    std::vector<uint32_t> steps;
    std::vector<int64_t> tokens;
    std::vector<int> parent, kid_start, kids, waiting, slot;
};

struct Ready {  // a node whose children are done
    long long tree;
    int node;
    double arrival;  // its tree's (the oldest pick takes the stage of the oldest request; see families/tree.py)
};

/* The child-sum TreeLSTM cell (cells/treelstm.py): W_x rows [i, o, u, f], U_iou, U_f, bias (4H). */
struct TreeCell {
    const packed_t *wx = nullptr, *u_iou = nullptr, *u_f = nullptr;
    std::vector<float> bias;
    int hidden = 0;
};

struct Stage {
    int kind;
    std::vector<Layer> layers;
    std::vector<float> embedding;
    int vocab, dim;
    const packed_t *head = nullptr;
    std::vector<float> head_bias;
    int next = -1;                      // READ without a head: the stage a finished row moves to
    int64_t start_token = 0, eos = -1;  // GENERATE
    int block = 1, out_dim = 0;         // FRAMES: most steps per cell call, the top layer's width
    std::vector<Row> rows;
    std::deque<Ready> ready;            // LEAF, INTERNAL: nodes in the order they became ready
    std::vector<float> state;           // capacity x width
    int cursor = 0;
    long long last_run = 0;
};

struct Left {
    long long id;
    int code;
    bool has_tokens;
    std::vector<int64_t> tokens;
    double score;
    long long next_token;
    std::vector<uint32_t> steps;  // a traced request's steps
    bool has_frames = false;      // FRAMES: the outputs and the final state
    std::vector<float> ys, state, marked;
    bool has_logits = false;      // a tree: its root's logits, in ys
};

/* One step: its stage, rows, padding rows, the loop's busy time for it (bookkeeping since the previous step
 * included), the part inside the model's compute, and when it ended (CLOCK_MONOTONIC seconds, Python's
 * time.perf_counter). */
struct StepRecord {
    int32_t stage, rows, padded;
    double seconds, kernel, end;
    int64_t number;  // the loop's count of steps: what a traced row's `steps` name
};
/* Python reads the records as one bytes object of these structs (engine/steps.py's STEP_RECORD): a tuple of
 * seven objects per step cost the engine's thread more per request at one client than its decoding. */
static_assert(sizeof(StepRecord) == 48 && offsetof(StepRecord, seconds) == 16 && offsetof(StepRecord, number) == 40,
              "STEP_RECORD in engine/steps.py reads this layout");

/* The engine's policy settings for a run() call (max_rows, pad_to) or the worker (the rest too). */
struct Plan {
    int max_rows = 1, pad_to = 0, pick = PICK_STAGE, max_wait_steps = 8, max_running = 1, threads = 1;
    const bool *cancel = nullptr;
    Py_ssize_t cancel_len = 0;
    const int64_t *queued = nullptr;  // the engine's queue length (the worker's pick)
};

struct Core {
    int capacity, width = 0;
    std::vector<Stage> stages;
    std::vector<PyObject *> refs;                            // the Packed objects whose matrices we use
    std::unordered_map<long long, std::pair<int, int>> where;  // id -> (stage, row)
    long long steps = 0;
    double kernel_seconds = 0.0;
    std::atomic<int> active{0};                              // requests held: stage rows and inbox
    std::vector<float> x, logits, row_max, row_sum;
    std::vector<int32_t> row_best;
    std::vector<float> xs, gi, hs[2], gathered;  // a FRAMES block's frames, projections, outputs, states
    std::vector<float> scan_x, scan_c;

    /* An SRU or QRNN layer over t steps of m rows: one product for the t steps, then the scan (cells/sru.py,
     * cells/qrnn.py). Inputs (t, m) rows with stride ldin; h, c (and a window-2 QRNN's previous input) in the
     * rows of `state`; outputs into out (t, m, H). The scan reads its inputs contiguous: an SRU's highway is x
     * itself when its input is as wide as it, a QRNN's window-2 rows are [x_{t-1}, x_t]. */
    void scan_layer(const Layer &l, const float *in, ptrdiff_t ldin, float *state, int t, int m,
                    std::vector<float> &out) {
        const int hidden = l.hidden, window = l.kind == CELL_QRNN2 ? 2 : 1, k = l.wi->k / window;
        float *h = state + l.offset, *prev = h + 2 * hidden;
        const float *x = in;
        if (ldin != k || window == 2) {
            scan_x.resize((size_t)t * m * window * k);
            for (int j = 0; j < t; j++)
                for (int i = 0; i < m; i++) {
                    float *row = &scan_x[((size_t)j * m + i) * window * k];
                    if (window == 2)
                        memcpy(row, j ? in + ((size_t)(j - 1) * m + i) * ldin : prev + (size_t)i * width,
                               k * sizeof(float));
                    memcpy(row + (window - 1) * k, in + ((size_t)j * m + i) * ldin, k * sizeof(float));
                }
            x = scan_x.data();
        }
        scan_c.resize((size_t)m * hidden);
        for (int i = 0; i < m; i++)
            memcpy(&scan_c[(size_t)i * hidden], h + (size_t)i * width + hidden, hidden * sizeof(float));
        out.resize((size_t)t * m * hidden);
        const float *b = l.b1.data();
        if (l.sru())
            K->sru_steps(l.wi, x, b, b + hidden, b + 2 * hidden, b + 3 * hidden, scan_c.data(), out.data(), t, m,
                         hidden, l.kind == CELL_SRU_TANH);
        else
            K->qrnn_steps(l.wi, x, b, scan_c.data(), out.data(), t, m, hidden);
        for (int i = 0; i < m; i++) {
            memcpy(h + (size_t)i * width, &out[((size_t)(t - 1) * m + i) * hidden], hidden * sizeof(float));
            memcpy(h + (size_t)i * width + hidden, &scan_c[(size_t)i * hidden], hidden * sizeof(float));
            if (window == 2)
                memcpy(prev + (size_t)i * width, in + ((size_t)(t - 1) * m + i) * ldin, k * sizeof(float));
        }
    }

    /* A tree loop (stages LEAF, INTERNAL): its cell, head and trees. */
    bool trees = false;
    TreeCell tree_cell;
    std::unordered_map<long long, Tree> forest;
    std::vector<float> node_h, node_c;  // capacity node slots x hidden: no allocation per tree
    std::vector<int> free_slots;
    float *h_of(const Tree &t, int node) { return &node_h[(size_t)t.slot[node] * tree_cell.hidden]; }
    float *c_of(const Tree &t, int node) { return &node_c[(size_t)t.slot[node] * tree_cell.hidden]; }

    /* A tree leaves: its slots go back to the pool. */
    void forget(std::unordered_map<long long, Tree>::iterator it) {
        free_slots.insert(free_slots.end(), it->second.slot.begin(), it->second.slot.end());
        forest.erase(it);
    }
    std::vector<Ready> taken;                   // a step's nodes
    std::vector<Tree *> taken_tree;             // and their trees (stable: the step erases none before the end)
    std::vector<float> gx, gh, hsum, child_h, child_c, fh, roots_h;
    std::vector<int> child_row;

    /* Rows (or ready nodes, for trees) waiting in stage s. */
    size_t count(int s) const { return trees ? stages[s].ready.size() : stages[s].rows.size(); }

    /* Between Python and whoever steps (run()'s caller or the worker), under io. */
    std::mutex io;
    std::condition_variable wake_worker, wake_collector;
    std::vector<std::pair<int, Row>> inbox;                  // (stage, row) admitted, not yet in a stage
    std::vector<long long> drops;                            // ids to take out without a result
    std::vector<Left> outbox;
    std::vector<StepRecord> out_records;
    bool stopping = false, kicked = false;
    /* A native front end's listener (loop_face.h): its rows (ids >= listen_from) leave through on_left, called
     * under listen_mu (never with io), so listen() can wait out a call under way. */
    std::mutex listen_mu;
    cs_loop_on_left on_left = nullptr;
    void *on_left_ctx = nullptr;
    std::atomic<long long> listen_from{-1};
    cs_loop_face_t face{};
    std::thread worker;
    Plan worker_plan;
    Py_buffer worker_cancel, worker_queued;
    std::atomic<bool> worker_running{false};  // (read by a front end's threads: loop_face.h's running)

    /* Take rows out (sorted, unique); the stage's last rows move into the holes, as engine/batch.py does. */
    void remove(int s, const std::vector<int> &gone) {
        Stage &st = stages[s];
        const int n = (int)st.rows.size(), k = (int)gone.size();
        if (!k) return;
        for (int r : gone) {  // a row that moved on to another stage is placed there already
            auto it = where.find(st.rows[r].id);
            if (it != where.end() && it->second.first == s) where.erase(it);
        }
        std::vector<char> leaving(n, 0);
        for (int r : gone) leaving[r] = 1;
        int mover = n - k;
        for (int r : gone) {
            if (r >= n - k) break;
            while (leaving[mover]) mover++;
            memcpy(&st.state[(size_t)r * width], &st.state[(size_t)mover * width], width * sizeof(float));
            st.rows[r] = std::move(st.rows[mover]);
            where[st.rows[r].id] = {s, r};
            mover++;
        }
        st.rows.resize(n - k);
    }

    int append(int s, Row &&row) {
        Stage &st = stages[s];
        const int r = (int)st.rows.size();
        where[row.id] = {s, r};
        st.rows.push_back(std::move(row));
        return r;
    }

    /* Admitted rows join their stages (state zeroed) and dropped ones leave; a stage never holds more than
     * capacity rows (Python admits at most that many: the engine's running bound is within it). */
    void apply(std::vector<std::pair<int, Row>> &in, std::vector<long long> &gone) {
        if (trees) return apply_trees(in, gone);
        for (long long id : gone) {
            auto it = where.find(id);
            if (it != where.end()) {
                remove(it->second.first, {it->second.second});
                active--;
            } else {
                for (auto &p : in)
                    if (p.second.id == id) p.second.id = -1, active--;  // dropped before it joined
            }
        }
        size_t held = 0;
        for (const Stage &st : stages) held += st.rows.size();
        std::vector<std::pair<int, Row>> later;
        for (auto &p : in) {
            if (p.second.id < 0) continue;
            if (held >= (size_t)capacity) {  // only while drops of the rows before it are on their way
                later.push_back(std::move(p));
                continue;
            }
            const int r = append(p.first, std::move(p.second));
            Row &row = stages[p.first].rows[r];
            float *state = &stages[p.first].state[(size_t)r * width];
            if (row.initial.empty())
                memset(state, 0, width * sizeof(float));
            else
                memcpy(state, row.initial.data(), width * sizeof(float));
            std::vector<float>().swap(row.initial);
            held++;
        }
        in.clear();
        gone.clear();
        if (!later.empty()) {
            std::lock_guard<std::mutex> g(io);
            for (auto &p : later) inbox.push_back(std::move(p));
        }
    }

    void exchange() {
        std::vector<std::pair<int, Row>> in;
        std::vector<long long> gone;
        {
            std::lock_guard<std::mutex> g(io);
            in.swap(inbox);
            gone.swap(drops);
        }
        apply(in, gone);
    }

    /* A tree loop's admissions and drops: a dropped tree is forgotten (its queued nodes are skipped when taken);
     * an admitted one's leaves are ready, in node order. Python bounds the nodes held (capacity). */
    void apply_trees(std::vector<std::pair<int, Row>> &in, std::vector<long long> &gone) {
        for (long long id : gone) {
            auto it = forest.find(id);
            if (it != forest.end()) {
                forget(it);
                active--;
                continue;
            }
            for (auto &p : in)
                if (p.second.id == id) p.second.id = -1, active--;  // dropped before it joined
        }
        std::vector<std::pair<int, Row>> later;
        for (auto &p : in) {
            Row &row = p.second;
            if (row.id < 0) continue;
            const int n = (int)row.parents.size();
            if ((int)free_slots.size() < n) {  // only while drops of the trees before it are on their way
                later.push_back(std::move(p));
                continue;
            }
            Tree t;
            t.ticket = row.ticket;
            t.arrival = row.arrival;
            t.trace = row.trace;
            t.tokens = std::move(row.tokens);
            t.parent.assign(row.parents.begin(), row.parents.end());
            t.waiting.assign(n, 0);
            for (int v : t.parent)
                if (v >= 0) t.waiting[v]++;
            t.kid_start.assign(n + 1, 0);
            for (int i = 0; i < n; i++) t.kid_start[i + 1] = t.kid_start[i] + t.waiting[i];
            t.kids.assign(std::max(0, n - 1), 0);
            std::vector<int> fill(t.kid_start.begin(), t.kid_start.end() - 1);
            for (int i = 0; i < n; i++)
                if (t.parent[i] >= 0) t.kids[fill[t.parent[i]]++] = i;
            t.slot.assign(free_slots.end() - n, free_slots.end());
            free_slots.resize(free_slots.size() - n);
            for (int i = 0; i < n; i++)
                if (!t.waiting[i]) stages[0].ready.push_back({row.id, i, t.arrival});
            forest.emplace(row.id, std::move(t));
        }
        in.clear();
        gone.clear();
        if (!later.empty()) {
            std::lock_guard<std::mutex> g(io);
            for (auto &p : later) inbox.push_back(std::move(p));
        }
    }

    bool has_rows() const {
        for (int s = 0; s < (int)stages.size(); s++)
            if (count(s)) return true;
        return false;
    }

    /* engine/batch.py's Stage.window: all rows, or the next max_rows in turn, every window full. */
    void window(Stage &st, int max_rows, int *a, int *b) {
        const int n = (int)st.rows.size();
        if (n <= max_rows) {
            st.cursor = 0;
            *a = 0;
            *b = n;
            return;
        }
        if (st.cursor >= n) st.cursor = 0;
        *a = std::min(st.cursor, n - max_rows);
        st.cursor = *a + max_rows;
        *b = *a + max_rows;
    }

    bool flagged(const Plan &p, long long ticket) const {
        return ticket >= 0 && ticket < p.cancel_len && __atomic_load_n(&p.cancel[ticket], __ATOMIC_RELAXED);
    }

    /* The window after dropping the cancelled requests in it (runner.py's SequenceRunner._window). */
    void clean_window(int s, const Plan &p, int *a, int *b, std::vector<Left> &left) {
        Stage &st = stages[s];
        while (true) {
            window(st, p.max_rows, a, b);
            std::vector<long long> dropped;
            for (int r = *a; r < *b; r++)
                if (flagged(p, st.rows[r].ticket)) dropped.push_back(st.rows[r].id);
            if (dropped.empty()) return;
            for (long long id : dropped) {
                remove(s, {where[id].second});
                active--;
                left.push_back({id, LEFT_CANCELLED, false, {}, 0.0, -1});
            }
            st.cursor = *a;
        }
    }

    /* policies.py's Cellular.pick, on this loop's own step count. */
    int pick(const Plan &p) {
        std::vector<std::pair<int, int>> ready;
        for (int s = 0; s < (int)stages.size(); s++) {
            const int n = (int)count(s);
            if (n) ready.push_back({s, std::min(n, p.max_rows)});
        }
        if (ready.empty()) return -1;
        if (ready.size() == 1) return ready[0].first;
        int starving = -1;
        for (auto &r : ready)
            if (steps - stages[r.first].last_run > p.max_wait_steps &&
                (starving < 0 || stages[r.first].last_run < stages[starving].last_run))
                starving = r.first;
        if (starving >= 0) return starving;
        if (p.pick == PICK_OLDEST) {
            int best = -1;
            double oldest = 0;
            for (auto &r : ready) {
                double o = oldest_arrival(r.first);
                if (best < 0 || o < oldest) best = r.first, oldest = o;
            }
            return best;
        }
        int fullest = 0;
        for (auto &r : ready) fullest = std::max(fullest, r.second);
        const bool queued_full = __atomic_load_n(p.queued, __ATOMIC_RELAXED) > 0 && active >= p.max_running;
        if (p.pick == PICK_EARLIEST && !queued_full && active <= p.max_rows)  // while all fit one batch: the
            // earliest stage as full as any later one
            for (auto &r : ready)
                if (r.second == fullest) return r.first;
        for (auto it = ready.rbegin(); it != ready.rend(); ++it)
            if ((p.pick == PICK_FULLEST || queued_full) ? it->second == fullest : 2 * it->second >= fullest)
                return it->first;
        return ready.back().first;
    }

    double oldest_arrival(int s) const {
        if (trees) return stages[s].ready.empty() ? 1e300 : stages[s].ready.front().arrival;
        double o = 1e300;
        for (const Row &r : stages[s].rows) o = std::min(o, r.arrival);
        return o;
    }

    /* One step of stage s on rows [a, b) plus `pad` dummy rows; rows that leave go to `left`. */
    void step(int s, int a, int b, int pad, std::vector<Left> &left) {
        Stage &st = stages[s];
        const int n = b - a;
        step_compute(s, a, b, pad);
        bookkeeping(st, s, a, n, left);
    }

    /* The model's compute for rows [a, b) plus `pad` dummy rows: embedding rows, the cells in place, the head
     * and what decoding needs of it (row_max, row_best, row_sum). */
    void step_compute(int s, int a, int b, int pad) {
        Stage &st = stages[s];
        const int n = b - a, m = n + pad;
        const double t0 = now();
        if (st.kind == FRAMES) {
            frames_compute(st, a, b, pad);
            kernel_seconds += now() - t0;
            return;
        }
        x.resize((size_t)m * st.dim);
        for (int i = 0; i < m; i++) {
            int64_t tok = 0;
            if (i < n) {
                const Row &row = st.rows[a + i];
                tok = st.kind == READ ? row.tokens[row.pos] : row.prev;
            }
            memcpy(&x[(size_t)i * st.dim], &st.embedding[(size_t)tok * st.dim], st.dim * sizeof(float));
        }
        ptrdiff_t ldin;
        const float *in = stack_steps(st, x.data(), &st.state[(size_t)a * width], 1, m, &ldin);
        const int classes = st.head ? st.head->n : 0;
        if (st.head) {  // the head and what decoding needs of it: each row's argmax (and sum of exponentials)
            logits.resize((size_t)m * classes);
            K->linear(st.head, in, ldin, m, logits.data(), classes, nullptr, 0, st.head_bias.data());
            row_max.resize(m);  // padded rows too, as a padded graph computes them
            row_best.resize(m);
            row_sum.resize(m);
            K->rows_max_sumexp(logits.data(), classes, m, classes, row_max.data(), row_best.data(),
                               st.kind == READ ? row_sum.data() : nullptr);
        }
        kernel_seconds += now() - t0;
    }

    /* Every layer of the stage's stack over t steps of m rows, from inputs xs (t, m, st.dim) contiguous; their
     * states are the consecutive rows of `state` (stride width). One step is each layer's fused cell step, more
     * are one input projection for the block and the recurrence (the cells' `steps`: the same kernels, in the
     * same order, as the Python loop); SRU and QRNN layers always run as a block. Returns the top layer's
     * outputs, step j of row i at (j * m + i) * *ld. */
    const float *stack_steps(const Stage &st, const float *xs, float *state, int t, int m, ptrdiff_t *ld) {
        const float *in = xs;
        ptrdiff_t ldin = st.dim;
        int which = 0;
        for (const Layer &l : st.layers) {
            float *h = state + l.offset;
            if (l.sru() || l.qrnn()) {
                scan_layer(l, in, ldin, state, t, m, hs[which]);
                in = hs[which].data();
                ldin = l.hidden;
                which ^= 1;
                continue;
            }
            if (t == 1) {
                if (l.kind == CELL_LSTM)
                    K->lstm_step(l.wi, l.wh, in, ldin, h, width, h + l.hidden, width, l.b1.data(), h, width,
                                 h + l.hidden, m, l.grid_step, l.grid_limit);
                else
                    K->gru_step(l.wi, l.wh, in, ldin, h, width, l.b1.data(), l.b2.data(), h, width, m);
                in = h;
                ldin = width;
                continue;
            }
            const int gates = l.wi->n;
            gi.resize((size_t)t * m * gates);
            K->linear(l.wi, in, ldin, t * m, gi.data(), gates, nullptr, 0, nullptr);
            std::vector<float> &out = hs[which];
            which ^= 1;
            out.resize((size_t)t * m * l.hidden);
            if (l.kind == CELL_LSTM)
                K->lstm_sequence(l.wh, gi.data(), l.b1.data(), h, width, h + l.hidden, width, out.data(), t, m,
                                 l.grid_step, l.grid_limit);
            else
                K->gru_sequence(l.wh, gi.data(), l.b1.data(), l.b2.data(), h, width, out.data(), t, m);
            for (int i = 0; i < m; i++)
                memcpy(h + (size_t)i * width, &out[((size_t)(t - 1) * m + i) * l.hidden], l.hidden * sizeof(float));
            in = out.data();
            ldin = l.hidden;
        }
        *ld = ldin;
        return in;
    }

    /* A FRAMES step: rows [a, b) advance by up to `block` frames. When all have a whole block left they run in
     * place, padded; otherwise rows run apart by how many frames they have left, fewest first, their states
     * gathered (the end of a sequence): engine/frames.py's _blocks. */
    void frames_compute(Stage &st, int a, int b, int pad) {
        const int n = b - a, k = st.block;
        std::vector<int> rows(n), left(n);
        bool whole = true;
        for (int i = 0; i < n; i++) {
            const Row &row = st.rows[a + i];
            rows[i] = a + i;
            left[i] = std::min(row.length - row.pos, k);
            whole = whole && left[i] == k;
        }
        if (whole) {
            frames_block(st, rows, k, pad, &st.state[(size_t)a * width]);
            return;
        }
        for (int t = 1; t <= k; t++) {
            std::vector<int> some;
            for (int i = 0; i < n; i++)
                if (left[i] == t) some.push_back(a + i);
            if (some.empty()) continue;
            gathered.resize(some.size() * (size_t)width);
            for (size_t i = 0; i < some.size(); i++)
                memcpy(&gathered[i * width], &st.state[(size_t)some[i] * width], width * sizeof(float));
            frames_block(st, some, t, 0, gathered.data());
            for (size_t i = 0; i < some.size(); i++)
                memcpy(&st.state[(size_t)some[i] * width], &gathered[i * width], width * sizeof(float));
        }
    }

    /* t frames of every layer for the stage rows `rows` (plus `pad` dummy rows), whose states are the
     * consecutive rows of `state`; each row's top outputs go to its ys. */
    void frames_block(Stage &st, const std::vector<int> &rows, int t, int pad, float *state) {
        const int n = (int)rows.size(), m = n + pad;
        xs.assign((size_t)t * m * st.dim, 0.0f);
        for (int j = 0; j < t; j++)
            for (int i = 0; i < n; i++) {
                const Row &row = st.rows[rows[i]];
                memcpy(&xs[((size_t)j * m + i) * st.dim], &row.frames[(size_t)(row.pos + j) * st.dim],
                       st.dim * sizeof(float));
            }
        ptrdiff_t ldin;
        const float *in = stack_steps(st, xs.data(), state, t, m, &ldin);
        for (int i = 0; i < n; i++) {  // the top layer's outputs (step j of row i at in + (j * m + i) * ldin)
            Row &row = st.rows[rows[i]];
            for (int j = 0; j < t; j++)
                memcpy(&row.ys[(size_t)(row.pos + j) * st.out_dim], in + ((size_t)j * m + i) * ldin,
                       st.out_dim * sizeof(float));
            row.pos += t;
            const size_t kept = row.marked.size() / width;  // (marks fall on block ends: admit_frames checks)
            if (kept < row.marks.size() && row.marks[kept] == row.pos)
                row.marked.insert(row.marked.end(), state + (size_t)i * width, state + (size_t)(i + 1) * width);
        }
    }

    /* One step of a tree stage: up to max_rows ready nodes from the front of its queue (those of cancelled
     * trees leave, with their trees); their cell step; parents whose children are all done become ready, and
     * trees whose root ran leave with its logits. Returns the nodes run (0: none were left). */
    int tree_step(int s, const Plan &p, std::vector<Left> &left) {
        Stage &st = stages[s];
        taken.clear();
        taken_tree.clear();
        while (!st.ready.empty() && (int)taken.size() < p.max_rows) {
            const Ready r = st.ready.front();
            st.ready.pop_front();
            auto it = forest.find(r.tree);
            if (it == forest.end()) continue;  // dropped
            if (flagged(p, it->second.ticket)) {  // (flagged meanwhile: its nodes taken already go too)
                for (size_t k = taken.size(); k-- > 0;)
                    if (taken[k].tree == r.tree) {
                        taken.erase(taken.begin() + k);
                        taken_tree.erase(taken_tree.begin() + k);
                    }
                forget(it);
                active--;
                left.push_back({r.tree, LEFT_CANCELLED, false, {}, 0.0, -1});
                continue;
            }
            taken.push_back(r);
            taken_tree.push_back(&it->second);
        }
        const int m = (int)taken.size();
        if (!m) return 0;
        const double t0 = now();
        tree_compute(st.kind == INTERNAL);
        kernel_seconds += now() - t0;
        std::vector<int> roots;
        for (int i = 0; i < m; i++) {
            Tree &t = *taken_tree[i];
            if (t.trace && (t.steps.empty() || t.steps.back() != (uint32_t)(steps + 1)))
                t.steps.push_back((uint32_t)(steps + 1));
            const int up = t.parent[taken[i].node];
            if (up < 0)
                roots.push_back(i);
            else if (!--t.waiting[up])
                stages[1].ready.push_back({taken[i].tree, up, t.arrival});
        }
        if (!roots.empty()) {  // the head over every root this step finished
            const double t1 = now();
            const int hidden = tree_cell.hidden, classes = st.head->n;
            roots_h.resize(roots.size() * (size_t)hidden);
            for (size_t r = 0; r < roots.size(); r++)
                memcpy(&roots_h[r * hidden], h_of(*taken_tree[roots[r]], taken[roots[r]].node), hidden * sizeof(float));
            logits.resize(roots.size() * (size_t)classes);
            K->linear(st.head, roots_h.data(), hidden, (int)roots.size(), logits.data(), classes, nullptr, 0,
                      st.head_bias.data());
            kernel_seconds += now() - t1;
            for (size_t r = 0; r < roots.size(); r++) {
                auto it = forest.find(taken[roots[r]].tree);
                Left l{it->first, LEFT_FINISHED, false, {}, 0.0, -1, std::move(it->second.steps)};
                l.has_logits = true;
                l.ys.assign(&logits[r * classes], &logits[(r + 1) * classes]);
                left.push_back(std::move(l));
                forget(it);
                active--;
            }
        }
        st.last_run = ++steps;
        return m;
    }

    /* The child-sum TreeLSTM step for the taken nodes (cells/treelstm.py's nodes and the kernel of
     * kernels/treelstm.py, same products and gate formulas): x W_x^T; for internal nodes also (sum of children's
     * h) U_iou^T and every child's h U_f^T with its own forget gate. States go into each node's tree. */
    void tree_compute(bool internal) {
        const TreeCell &cell = tree_cell;
        const Stage &st = stages[0];  // (both stages share the embedding)
        const int m = (int)taken.size(), hidden = cell.hidden, dim = st.dim;
        x.resize((size_t)m * dim);
        for (int i = 0; i < m; i++)
            memcpy(&x[(size_t)i * dim], &st.embedding[(size_t)taken_tree[i]->tokens[taken[i].node] * dim],
                   dim * sizeof(float));
        gx.resize((size_t)m * 4 * hidden);
        K->linear(cell.wx, x.data(), dim, m, gx.data(), 4 * hidden, nullptr, 0, nullptr);
        int kids = 0;
        if (internal) {
            child_row.clear();
            child_h.clear();
            child_c.clear();
            for (int i = 0; i < m; i++) {
                const Tree &t = *taken_tree[i];
                const int v = taken[i].node;
                for (int k = t.kid_start[v]; k < t.kid_start[v + 1]; k++) {
                    const float *h = h_of(t, t.kids[k]), *c = c_of(t, t.kids[k]);
                    child_row.push_back(i);
                    child_h.insert(child_h.end(), h, h + hidden);
                    child_c.insert(child_c.end(), c, c + hidden);
                }
            }
            kids = (int)child_row.size();
            hsum.assign((size_t)m * hidden, 0.0f);  // the children's h summed per node, in child order
            for (int k = 0; k < kids; k++) {
                float *to = &hsum[(size_t)child_row[k] * hidden];
                const float *from = &child_h[(size_t)k * hidden];
                for (int j = 0; j < hidden; j++) to[j] += from[j];
            }
            gh.resize((size_t)m * 3 * hidden);
            K->linear(cell.u_iou, hsum.data(), hidden, m, gh.data(), 3 * hidden, nullptr, 0, nullptr);
            fh.resize((size_t)kids * hidden);
            if (kids) K->linear(cell.u_f, child_h.data(), hidden, kids, fh.data(), hidden, nullptr, 0, nullptr);
        }
        hs[0].resize((size_t)m * hidden);
        hs[1].resize((size_t)m * hidden);
        K->tree_gates(gx.data(), cell.bias.data(), internal ? gh.data() : nullptr, fh.data(), child_c.data(),
                      child_row.data(), kids, m, hidden, hs[0].data(), hs[1].data());
        for (int i = 0; i < m; i++) {
            memcpy(h_of(*taken_tree[i], taken[i].node), &hs[0][(size_t)i * hidden], hidden * sizeof(float));
            memcpy(c_of(*taken_tree[i], taken[i].node), &hs[1][(size_t)i * hidden], hidden * sizeof(float));
        }
    }

    /* Decoding and leaving for the n rows from a that just stepped. */
    void bookkeeping(Stage &st, int s, int a, int n, std::vector<Left> &left) {
        const int classes = st.head ? st.head->n : 0;
        std::vector<int> done;
        for (int i = 0; i < n; i++)  // this step is number steps + 1 (counted at the end)
            if (st.rows[a + i].trace) st.rows[a + i].steps.push_back((uint32_t)(steps + 1));
        if (st.kind == FRAMES) {  // rows that ran all their frames leave with their outputs and final state
            for (int i = 0; i < n; i++) {
                Row &row = st.rows[a + i];
                if (row.pos < row.length) continue;
                Left l{row.id, LEFT_FINISHED, false, {}, 0.0, -1, std::move(row.steps)};
                l.has_frames = true;
                l.ys = std::move(row.ys);
                l.marked = std::move(row.marked);
                const float *state = &st.state[(size_t)(a + i) * width];
                l.state.assign(state, state + width);
                left.push_back(std::move(l));
                done.push_back(a + i);
            }
            active -= (int)done.size();
        } else if (st.kind == GENERATE) {
            for (int i = 0; i < n; i++) {
                Row &row = st.rows[a + i];
                const int64_t tok = row_best[i];
                row.out.push_back(tok);
                row.prev = tok;
                if ((row.stop && tok == st.eos) || (int)row.out.size() >= row.max_len) {
                    left.push_back({row.id, LEFT_FINISHED, true, std::move(row.out), 0.0, -1, std::move(row.steps)});
                    done.push_back(a + i);
                }
            }
            active -= (int)done.size();
        } else if (st.head) {  // a language model: log-likelihood of each next token, the argmax after the last
            for (int i = 0; i < n; i++) {
                Row &row = st.rows[a + i];
                const float *l = &logits[(size_t)i * classes];
                const int nxt = row.pos + 1;
                if (nxt < (int)row.tokens.size()) {  // log_softmax as models/lm.py computes it, in float32
                    row.score += (double)((l[row.tokens[nxt]] - row_max[i]) - logf(row_sum[i]));
                } else {
                    left.push_back({row.id, LEFT_FINISHED, false, {}, row.score, (long long)row_best[i],
                                    std::move(row.steps)});
                    done.push_back(a + i);
                }
                row.pos = nxt;
            }
            active -= (int)done.size();
        } else {  // an encoder: rows that read their whole input move to the next stage, states and all
            for (int i = 0; i < n; i++)
                if (++st.rows[a + i].pos >= (int)st.rows[a + i].tokens.size()) done.push_back(a + i);
            Stage &to = stages[st.next];
            for (int r : done) {
                const Row &from = st.rows[r];
                Row moved;
                moved.id = from.id;
                moved.ticket = from.ticket;
                moved.arrival = from.arrival;
                moved.max_len = from.max_len;
                moved.stop = from.stop;
                moved.prev = to.start_token;
                moved.trace = from.trace;
                moved.steps = std::move(st.rows[r].steps);
                moved.out.reserve(moved.max_len);
                const int row = append(st.next, std::move(moved));
                memcpy(&to.state[(size_t)row * width], &st.state[(size_t)r * width], width * sizeof(float));
            }
        }
        remove(s, done);
        st.last_run = ++steps;
    }

    /* One step of stage s, recorded; false when it had no rows left after cancellations. */
    bool step_recorded(int s, const Plan &p, int pad_to, double *mark, std::vector<Left> &left,
                       std::vector<StepRecord> &records) {
        if (trees) {
            const double k0 = kernel_seconds;
            const int rows = tree_step(s, p, left);
            if (!rows) return false;
            const double t = now();
            records.push_back({s, rows, 0, t - *mark, kernel_seconds - k0, t, steps});
            *mark = t;
            return true;
        }
        int a, b;
        clean_window(s, p, &a, &b, left);
        if (b <= a) return false;
        const int pad = std::max(0, pad_to - (b - a));
        if (b + pad > capacity) {
            pad_error = true;
            return false;
        }
        const double k0 = kernel_seconds;
        step(s, a, b, pad, left);
        const double t = now();
        records.push_back({s, b - a, pad, t - *mark, kernel_seconds - k0, t, steps});
        *mark = t;
        return true;
    }

    /* run(): one step of `stage`; or (stage -1) every stage in order to completion (graph). Steps are padded
     * to pad_to rows. */
    void run(const Plan &p, int stage, std::vector<Left> &left, std::vector<StepRecord> &records) {
        exchange();
        double mark = now();
        if (stage >= 0) {
            if (count(stage)) step_recorded(stage, p, p.pad_to, &mark, left, records);
            return;
        }
        for (int s = 0; s < (int)stages.size() && !pad_error; s++)
            while (count(s))
                if (!step_recorded(s, p, p.pad_to, &mark, left, records)) break;
    }

    /* The worker: cellular steps for as long as there are rows, waiting (not spinning) when there are none.
     * Finished requests go to the outbox at once and wake the collector; step records go with them. While a
     * front end's thread steps the idle loop itself (caller_step), the worker waits for it to let go. */
    void work() {
        K->set_threads(worker_plan.threads);
        const Plan &p = worker_plan;
        std::vector<std::pair<int, Row>> in;
        std::vector<long long> gone;
        std::vector<Left> left;
        std::vector<StepRecord> records;
        double mark = now();
        while (true) {
            hand_over(left, records);
            {
                std::unique_lock<std::mutex> g(io);
                keep_records_locked(records);
                while (owner == CALLER || (!stopping && inbox.empty() && drops.empty() && !has_rows())) {
                    if (owner == WORKER) owner = NOBODY;
                    if (!out_records.empty() && !records_due) {
                        worker_sleep = TIMED;
                        // (idle since a caller's last step too: while callers step, every RECORDS_EVERY_S)
                        if (wake_worker.wait_for(g, std::chrono::duration<double>(IDLE_HAND_S)) ==
                                std::cv_status::timeout &&
                            owner != CALLER && now() - caller_stepped >= IDLE_HAND_S)
                            hand_records();
                    } else {
                        worker_sleep = UNTIMED;
                        wake_worker.wait(g);
                    }
                    worker_sleep = AWAKE;
                    mark = now();  // idle time is nobody's overhead
                }
                if (stopping) {
                    owner = NOBODY;
                    return;
                }
                owner = WORKER;
                worker_called = false;
                in.swap(inbox);
                gone.swap(drops);
            }
            step_next(in, gone, p, &mark, left, records);
        }
    }

    /* The admissions and drops taken from the inbox join, then one step of the stage the plan picks; false
     * where none ran. */
    bool step_next(std::vector<std::pair<int, Row>> &in, std::vector<long long> &gone, const Plan &p, double *mark,
                   std::vector<Left> &left, std::vector<StepRecord> &records) {
        apply(in, gone);
        const int s = pick(p);
        return s >= 0 && step_recorded(s, p, 0, mark, left, records);
    }

    /* A step's records join those the collector has not taken (under io). Steps whose rows all left through
     * a listener wake nobody: the engine counts them when it next collects, woken every RECORDS_EVERY_S while
     * busy and once the loop idles IDLE_HAND_S. */
    void keep_records_locked(std::vector<StepRecord> &records) {
        out_records.insert(out_records.end(), records.begin(), records.end());
        records.clear();
        if (!out_records.empty() && now() - handed >= RECORDS_EVERY_S) hand_records();
    }

    /* A step's finished rows: the listener's to it, the rest to the outbox, waking the collector. */
    void hand_over(std::vector<Left> &left, std::vector<StepRecord> &records) {
        if (!left.empty() && listen_from.load() >= 0) hand_to_listener(left);
        if (left.empty()) return;
        {  // hand over, then wake the collector with the lock released
            std::lock_guard<std::mutex> g(io);
            for (Left &l : left) outbox.push_back(std::move(l));
            out_records.insert(out_records.end(), records.begin(), records.end());
            handed = now();
        }
        left.clear();
        records.clear();
        wake_collector.notify_one();
    }

    /* Who steps the stages now (under io): nobody (the loop idles), the worker, or a front end's thread that
     * admitted into the idle loop and steps it itself (caller_step), sparing two thread wake-ups (the worker,
     * then the front end again to write): at one client, side by side, 179 -> 142 us of server CPU outside
     * the kernels per speller request over gRPC, 135 -> 101 over HTTP. */
    enum Owner { NOBODY, WORKER, CALLER } owner = NOBODY;
    enum Sleep { AWAKE, TIMED, UNTIMED } worker_sleep = AWAKE;
    /* The worker was woken for work: callers step no more until it has taken the loop (so a second request
     * hands a busy loop to the worker, and both cores work, rather than the front end stepping everything). */
    bool worker_called = false;
    double caller_stepped = 0.0;  // when a caller last stepped
    std::atomic<long long> caller_steps{0};

    /* Whether the worker is running, idle and nobody steps: admissions now may be stepped by their caller. */
    bool idle_locked() const {
        return worker_running && !stopping && owner == NOBODY && inbox.empty() && drops.empty() && !has_rows();
    }

    /* One step on the calling thread if nobody else steps; 1: rows remain, call again (after the caller's own
     * I/O); 0: the loop is idle, or is the worker's now (work came from elsewhere meanwhile, or it stops). */
    int caller_step() {
        std::vector<std::pair<int, Row>> in;
        std::vector<long long> gone;
        {
            std::lock_guard<std::mutex> g(io);
            if (owner != NOBODY || worker_called || stopping || !worker_running) return 0;
            if (inbox.empty() && drops.empty() && !has_rows()) return 0;
            owner = CALLER;
            in.swap(inbox);
            gone.swap(drops);
        }
        const Plan &p = worker_plan;
        K->set_threads(p.threads);
        double mark = now();
        std::vector<Left> left;
        std::vector<StepRecord> records;
        if (step_next(in, gone, p, &mark, left, records)) caller_steps++;
        hand_over(left, records);
        bool more, wake;
        {
            std::lock_guard<std::mutex> g(io);
            owner = NOBODY;
            caller_stepped = now();
            keep_records_locked(records);
            const bool elsewhere = !inbox.empty() || !drops.empty() || stopping;
            worker_called = worker_called || elsewhere;
            more = has_rows() && !elsewhere;
            // the worker takes what came meanwhile, or the rest on stopping; or it hands the records of an
            // idle loop to the collector after IDLE_HAND_S, as after its own steps
            wake = elsewhere || (!more && !out_records.empty() && !records_due && worker_sleep == UNTIMED);
        }
        if (wake) wake_worker.notify_one();
        return more ? 1 : 0;
    }

    /* The collector takes the step records (under io). */
    double handed = 0.0;
    bool records_due = false;
    static constexpr double RECORDS_EVERY_S = 0.02, IDLE_HAND_S = 0.005;
    void hand_records() {
        records_due = true;
        handed = now();
        wake_collector.notify_one();
    }

    /* The listener's rows out of `left`, to it (the rest stay for the outbox). */
    void hand_to_listener(std::vector<Left> &left) {
        std::lock_guard<std::mutex> g(listen_mu);
        const long long from = listen_from.load();
        if (!on_left || from < 0) return;
        std::vector<cs_loop_left_t> mine;
        for (const Left &l : left)
            if (l.id >= from && l.code == LEFT_FINISHED)
                mine.push_back({l.id, l.tokens.data(), (int)l.tokens.size(), l.score, l.next_token});
        if (mine.empty()) return;
        on_left(on_left_ctx, mine.data(), (int)mine.size());
        left.erase(std::remove_if(left.begin(), left.end(),
                                  [from](const Left &l) { return l.id >= from && l.code == LEFT_FINISHED; }),
                   left.end());
    }

    bool pad_error = false;
};

/* ---------------------------------------------------------------- the C face (loop_face.h) */

int face_vocab(void *loop, int stage) {
    Core &c = *(Core *)loop;
    if (stage < 0 || stage >= (int)c.stages.size() || c.stages[stage].kind > GENERATE) return -1;
    return c.stages[stage].vocab;
}

int face_admit(void *loop, const cs_loop_row_t *rows, int count, int caller_steps) {
    Core &c = *(Core *)loop;
    std::vector<std::pair<int, Row>> in;
    for (int i = 0; i < count; i++) {
        const cs_loop_row_t &r = rows[i];
        if (face_vocab(loop, r.stage) < 0 || r.id < 0 || r.count < 0 || r.max_len < 1 ||
            (c.stages[r.stage].kind == READ && r.count < 1))
            return 0;
        Row row;
        row.id = r.id;
        row.ticket = -1;
        row.arrival = r.arrival;
        row.tokens.assign(r.tokens, r.tokens + r.count);
        for (int64_t t : row.tokens)
            if (t < 0 || t >= c.stages[r.stage].vocab) return 0;
        row.max_len = r.max_len;
        row.stop = r.stop_at_eos != 0;
        in.push_back({r.stage, std::move(row)});
    }
    c.active += count;
    bool idle;
    {
        std::lock_guard<std::mutex> g(c.io);
        idle = caller_steps && c.idle_locked();
        c.worker_called = c.worker_called || !idle;
        for (auto &p : in) c.inbox.push_back(std::move(p));
    }
    if (idle) return 2;
    c.wake_worker.notify_one();
    return 1;
}

int face_step(void *loop) { return ((Core *)loop)->caller_step(); }

void face_listen(void *loop, long long first_id, cs_loop_on_left on_left, void *ctx) {
    Core &c = *(Core *)loop;
    std::lock_guard<std::mutex> g(c.listen_mu);  // (waits out a call under way)
    c.on_left = on_left;
    c.on_left_ctx = ctx;
    c.listen_from = on_left ? first_id : -1;
}

int face_running(void *loop) { return ((Core *)loop)->worker_running ? 1 : 0; }

/* ---------------------------------------------------------------- the Python object */

typedef struct {
    PyObject_HEAD
    Core *core;
} LoopObject;

PyTypeObject LoopType = {PyVarObject_HEAD_INIT(nullptr, 0)};

/* The worker finishes its step and exits (called with the GIL, which it releases while it waits). */
void stop_worker(Core &c) {
    if (!c.worker_running) return;
    Py_BEGIN_ALLOW_THREADS {
        std::lock_guard<std::mutex> g(c.io);
        c.stopping = true;
    }
    c.wake_worker.notify_all();
    c.worker.join();
    Py_END_ALLOW_THREADS
    c.worker_running = false;
    PyBuffer_Release(&c.worker_cancel);
    PyBuffer_Release(&c.worker_queued);
}

void loop_dealloc(LoopObject *self) {
    if (self->core) stop_worker(*self->core);
    if (self->core) {
        for (PyObject *o : self->core->refs) Py_DECREF(o);
        delete self->core;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyObject *loop_new(PyTypeObject *type, PyObject *args, PyObject *) {
    int capacity;
    if (!PyArg_ParseTuple(args, "i", &capacity)) return nullptr;
    if (capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 1");
        return nullptr;
    }
    LoopObject *self = (LoopObject *)type->tp_alloc(type, 0);
    if (!self) return nullptr;
    self->core = new Core();
    self->core->capacity = capacity;
    return (PyObject *)self;
}

/* A float32 array's values, copied (C-contiguous, the given number of dimensions). */
bool floats(PyObject *obj, int ndim, std::vector<float> &out, Py_ssize_t *shape, const char *name) {
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return false;
    const char *f = v.format ? v.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (strcmp(f, "f") || v.ndim != ndim) {
        PyErr_Format(PyExc_TypeError, "%s must be a %d-D float32 array", name, ndim);
        PyBuffer_Release(&v);
        return false;
    }
    out.assign((const float *)v.buf, (const float *)v.buf + v.len / 4);
    for (int i = 0; i < ndim && shape; i++) shape[i] = v.shape[i];
    PyBuffer_Release(&v);
    return true;
}

const packed_t *packed(LoopObject *self, PyObject *obj, const char *name) {
    const packed_t *p = K->packed_of(obj);
    if (!p) {
        PyErr_Format(PyExc_TypeError, "%s must be a packed matrix (cellserve.kernels._native.Packed)", name);
        return nullptr;
    }
    Py_INCREF(obj);
    self->core->refs.push_back(obj);
    return p;
}

bool stage_layers(LoopObject *self, Stage &st, PyObject *layers, int *top);
PyObject *stage_added(Core &c, Stage &&st);

/* add_stage(kind, embedding (V, E), layers, head or None, head_bias or None, next, start_token, eos) -> index.
 * layers: [(cell kind, w_ih packed, w_hh packed, b1, b2 or None, cell_step, cell_limit)], bottom first; an SRU
 * layer is (CELL_SRU_TANH or _IDENTITY, W packed, None, [v_f, v_r, b_f, b_r], None, 0, 0), a QRNN layer
 * (CELL_QRNN1 or 2, W packed, None, bias, None, 0, 0). */
PyObject *loop_add_stage(LoopObject *self, PyObject *args) {
    int kind, next;
    long long start_token, eos;
    PyObject *emb, *layers, *head, *head_bias;
    if (!PyArg_ParseTuple(args, "iOO!OOiLL", &kind, &emb, &PyList_Type, &layers, &head, &head_bias, &next,
                          &start_token, &eos))
        return nullptr;
    Core &c = *self->core;
    if (c.active > 0 || c.worker_running || c.trees) {
        PyErr_SetString(PyExc_RuntimeError, "stages are added before any request (and not to a tree loop)");
        return nullptr;
    }
    Stage st;
    st.kind = kind;
    Py_ssize_t shape[2];
    if (!floats(emb, 2, st.embedding, shape, "embedding")) return nullptr;
    st.vocab = (int)shape[0];
    st.dim = (int)shape[1];
    st.next = next;
    st.start_token = start_token;
    st.eos = eos;
    int in;
    if (!stage_layers(self, st, layers, &in)) return nullptr;
    if (head != Py_None) {
        if (!(st.head = packed(self, head, "head")) || !floats(head_bias, 1, st.head_bias, nullptr, "head bias"))
            return nullptr;
        if (st.head->k != in || (int)st.head_bias.size() != st.head->n) {
            PyErr_SetString(PyExc_ValueError, "the head does not match the top layer");
            return nullptr;
        }
    }
    return stage_added(c, std::move(st));
}

/* add_frame_stage(input size, layers, block) -> index: a FRAMES stage over float frames of `input size`. */
PyObject *loop_add_frame_stage(LoopObject *self, PyObject *args) {
    int dim, block;
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "iO!i", &dim, &PyList_Type, &layers, &block)) return nullptr;
    Core &c = *self->core;
    if (c.active > 0 || c.worker_running || c.trees) {
        PyErr_SetString(PyExc_RuntimeError, "stages are added before any request (and not to a tree loop)");
        return nullptr;
    }
    if (dim < 1 || block < 1 || PyList_GET_SIZE(layers) < 1) {
        PyErr_SetString(PyExc_ValueError, "a frame stage needs an input size, a block of >= 1 steps and a layer");
        return nullptr;
    }
    Stage st;
    st.kind = FRAMES;
    st.dim = dim;
    st.block = block;
    if (!stage_layers(self, st, layers, &st.out_dim)) return nullptr;
    return stage_added(c, std::move(st));
}

/* A stage's layers from [(cell kind, w_ih packed, w_hh packed, b1, b2 or None, cell_step, cell_limit)], bottom
 * first, over inputs of st.dim; *top is the top layer's width. Every stage shares one state layout. */
bool stage_layers(LoopObject *self, Stage &st, PyObject *layers, int *top) {
    Core &c = *self->core;
    int offset = 0, in = st.dim;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(layers); i++) {
        Layer l;
        PyObject *wi, *wh, *b1, *b2;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(layers, i), "iOOOOff", &l.kind, &wi, &wh, &b1, &b2, &l.grid_step,
                              &l.grid_limit))
            return false;
        if (l.kind < CELL_LSTM || l.kind > CELL_QRNN2) {
            PyErr_Format(PyExc_ValueError, "layer %zd: no such cell kind %d", i, l.kind);
            return false;
        }
        bool fits;
        if (l.sru()) {  // (CELL_SRU_*, W, None, [v_f, v_r, b_f, b_r], None, 0, 0)
            if (!(l.wi = packed(self, wi, "w")) || !floats(b1, 1, l.b1, nullptr, "SRU vectors")) return false;
            l.wh = nullptr;
            l.hidden = (int)l.b1.size() / 4;
            fits = wh == Py_None && (int)l.b1.size() == 4 * l.hidden && l.wi->k == in &&
                   l.wi->n == (in == l.hidden ? 3 : 4) * l.hidden;
        } else if (l.qrnn()) {  // (CELL_QRNN<window>, W, None, bias (3H), None, 0, 0)
            if (!(l.wi = packed(self, wi, "w")) || !floats(b1, 1, l.b1, nullptr, "bias")) return false;
            l.wh = nullptr;
            l.hidden = (int)l.b1.size() / 3;
            fits = wh == Py_None && (int)l.b1.size() == 3 * l.hidden && l.wi->n == 3 * l.hidden &&
                   l.wi->k == (l.kind == CELL_QRNN2 ? 2 : 1) * in;
        } else {
            if (!(l.wi = packed(self, wi, "w_ih")) || !(l.wh = packed(self, wh, "w_hh"))) return false;
            l.hidden = l.wh->k;
            const int gates = l.kind == CELL_LSTM ? 4 : 3;
            fits = l.wi->k == in && l.wi->n == gates * l.hidden && l.wh->n == gates * l.hidden;
            if (!floats(b1, 1, l.b1, nullptr, "bias") || (b2 != Py_None && !floats(b2, 1, l.b2, nullptr, "b_hh")))
                return false;
        }
        if (!fits) {
            PyErr_Format(PyExc_ValueError, "layer %zd: weights do not match its input size %d and hidden size %d", i,
                         in, l.hidden);
            return false;
        }
        l.offset = offset;
        offset += l.kind == CELL_GRU ? l.hidden : 2 * l.hidden + (l.kind == CELL_QRNN2 ? in : 0);
        in = l.hidden;
        st.layers.push_back(std::move(l));
    }
    if (c.stages.empty()) c.width = offset;
    if (offset != c.width) {
        PyErr_SetString(PyExc_ValueError, "every stage must have the same state layout");
        return false;
    }
    *top = in;
    return true;
}

PyObject *stage_added(Core &c, Stage &&st) {
    st.state.assign((size_t)c.capacity * std::max(1, c.width), 0.0f);
    c.stages.push_back(std::move(st));
    return PyLong_FromSsize_t((Py_ssize_t)c.stages.size() - 1);
}

/* Admitted rows (or trees) go to the inbox: they join at the worker's next step (or the next run()). */
PyObject *queued(Core &c, std::vector<std::pair<int, Row>> &rows) {
    c.active += (int)rows.size();
    {  // io is only ever held briefly and never by a thread waiting for the GIL: keep the GIL (releasing it
       // hands it to another Python thread for up to a switch interval, which the event loop then waits out)
        std::lock_guard<std::mutex> g(c.io);
        for (auto &r : rows) c.inbox.push_back(std::move(r));
        c.worker_called = true;
    }
    c.wake_worker.notify_one();
    Py_RETURN_NONE;
}

/* admit([(stage, id, ticket, arrival, tokens (int64 array), max_len, stop, trace), ...]): requests join their stages
 * together at the next step, their states zeroed (or later, if the stages hold `capacity` rows). */
PyObject *loop_admit(LoopObject *self, PyObject *arg) {
    Core &c = *self->core;
    PyObject *seq = PySequence_Fast(arg, "admit takes a list of rows");
    if (!seq) return nullptr;
    std::vector<std::pair<int, Row>> rows;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int s, max_len, stop, trace;
        Row row;
        Py_buffer tokens;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iLLdy*ipp", &s, &row.id, &row.ticket, &row.arrival,
                              &tokens, &max_len, &stop, &trace)) {
            Py_DECREF(seq);
            return nullptr;
        }
        row.max_len = max_len;
        row.stop = stop;
        row.trace = trace;
        row.tokens.assign((const int64_t *)tokens.buf, (const int64_t *)tokens.buf + tokens.len / 8);
        PyBuffer_Release(&tokens);
        const char *error = nullptr;
        if (s < 0 || s >= (int)c.stages.size() || row.id < 0 || c.stages[s].kind > GENERATE)
            error = "no such token stage, or a negative id";
        else if (c.stages[s].kind == READ && row.tokens.empty())
            error = "a request needs at least one token";
        for (int64_t t : row.tokens)
            if (!error && (t < 0 || t >= c.stages[s].vocab)) error = "a token id is outside the vocabulary";
        if (error) {
            PyErr_SetString(PyExc_ValueError, error);
            Py_DECREF(seq);
            return nullptr;
        }
        rows.push_back({s, std::move(row)});
    }
    Py_DECREF(seq);
    return queued(c, rows);
}

/* add_tree_stages(embedding (V, E), w_x, u_iou, u_f (packed), bias (4H), head (packed), head bias): a tree loop's
 * stages LEAF (0) and INTERNAL (1), on a loop with no other stages; its capacity counts nodes. */
PyObject *loop_add_tree_stages(LoopObject *self, PyObject *args) {
    PyObject *emb, *wx, *u_iou, *u_f, *bias, *head, *head_bias;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &emb, &wx, &u_iou, &u_f, &bias, &head, &head_bias)) return nullptr;
    Core &c = *self->core;
    if (!c.stages.empty() || c.worker_running) {
        PyErr_SetString(PyExc_RuntimeError, "a tree loop's stages are its only ones, added before any request");
        return nullptr;
    }
    Stage leaf;
    leaf.kind = LEAF;
    Py_ssize_t shape[2];
    TreeCell &cell = c.tree_cell;
    if (!floats(emb, 2, leaf.embedding, shape, "embedding") || !(cell.wx = packed(self, wx, "w_x")) ||
        !(cell.u_iou = packed(self, u_iou, "u_iou")) || !(cell.u_f = packed(self, u_f, "u_f")) ||
        !floats(bias, 1, cell.bias, nullptr, "bias") || !(leaf.head = packed(self, head, "head")) ||
        !floats(head_bias, 1, leaf.head_bias, nullptr, "head bias"))
        return nullptr;
    leaf.vocab = (int)shape[0];
    leaf.dim = (int)shape[1];
    cell.hidden = cell.u_f->k;
    const int hidden = cell.hidden;
    if (cell.wx->k != leaf.dim || cell.wx->n != 4 * hidden || cell.u_iou->k != hidden || cell.u_iou->n != 3 * hidden ||
        cell.u_f->n != hidden || (int)cell.bias.size() != 4 * hidden || leaf.head->k != hidden ||
        (int)leaf.head_bias.size() != leaf.head->n) {
        PyErr_SetString(PyExc_ValueError, "the tree cell's matrices, bias and head do not fit together");
        return nullptr;
    }
    Stage internal;
    internal.kind = INTERNAL;
    internal.dim = leaf.dim;
    internal.head = leaf.head;
    internal.head_bias = leaf.head_bias;
    c.node_h.assign((size_t)c.capacity * hidden, 0.0f);
    c.node_c.assign((size_t)c.capacity * hidden, 0.0f);
    c.free_slots.resize(c.capacity);
    for (int i = 0; i < c.capacity; i++) c.free_slots[i] = c.capacity - 1 - i;
    c.trees = true;
    c.stages.push_back(std::move(leaf));
    c.stages.push_back(std::move(internal));
    Py_RETURN_NONE;
}

/* admit_trees([(id, ticket, arrival, tokens int64, parents int64, trace), ...]): trees join together at the next
 * step, their leaves ready. parents[i] is node i's parent, -1 at the one root (Python checked the shape). */
PyObject *loop_admit_trees(LoopObject *self, PyObject *arg) {
    Core &c = *self->core;
    if (!c.trees) {
        PyErr_SetString(PyExc_RuntimeError, "this loop has no tree stages");
        return nullptr;
    }
    PyObject *seq = PySequence_Fast(arg, "admit_trees takes a list of trees");
    if (!seq) return nullptr;
    std::vector<std::pair<int, Row>> rows;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int trace;
        Row row;
        Py_buffer tokens, parents;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LLdy*y*p", &row.id, &row.ticket, &row.arrival, &tokens,
                              &parents, &trace)) {
            Py_DECREF(seq);
            return nullptr;
        }
        row.trace = trace;
        row.tokens.assign((const int64_t *)tokens.buf, (const int64_t *)tokens.buf + tokens.len / 8);
        row.parents.assign((const int64_t *)parents.buf, (const int64_t *)parents.buf + parents.len / 8);
        PyBuffer_Release(&tokens);
        PyBuffer_Release(&parents);
        const int nodes = (int)row.parents.size();
        const char *error = row.id < 0 ? "a negative id" : nullptr;
        if (!error && (nodes < 1 || (int)row.tokens.size() != nodes)) error = "a tree needs a token per node";
        int roots = 0;
        for (int j = 0; j < nodes && !error; j++) {
            if (row.tokens[j] < 0 || row.tokens[j] >= c.stages[0].vocab) error = "a token id is outside the vocabulary";
            if (row.parents[j] < -1 || row.parents[j] >= nodes || row.parents[j] == j) error = "a parent is not a node";
            roots += row.parents[j] == -1;
        }
        if (!error && roots != 1) error = "a tree has one root";
        if (error) {
            PyErr_SetString(PyExc_ValueError, error);
            Py_DECREF(seq);
            return nullptr;
        }
        rows.push_back({0, std::move(row)});
    }
    Py_DECREF(seq);
    return queued(c, rows);
}

/* admit_frames([(stage, id, ticket, arrival, frames (T, dim) float32, initial state (width,) float32 or None,
 * trace[, marks]), ...]): requests join a FRAMES stage together at the next step, from their own state or zeros.
 * marks (ascending frame counts in (0, T), multiples of the stage's block): the row also leaves with its state
 * after each of them (a message of several chunks is one row; each chunk's result needs its own state). */
PyObject *loop_admit_frames(LoopObject *self, PyObject *arg) {
    Core &c = *self->core;
    PyObject *seq = PySequence_Fast(arg, "admit_frames takes a list of rows");
    if (!seq) return nullptr;
    std::vector<std::pair<int, Row>> rows;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int s, trace;
        Row row;
        PyObject *frames, *initial, *marks = Py_None;
        bool ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iLLdOOp|O", &s, &row.id, &row.ticket,
                                   &row.arrival, &frames, &initial, &trace, &marks);
        Py_ssize_t shape[2] = {0, 0};
        ok = ok && floats(frames, 2, row.frames, shape, "frames") &&
             (initial == Py_None || floats(initial, 1, row.initial, nullptr, "the initial state"));
        const char *error = nullptr;
        if (ok && (s < 0 || s >= (int)c.stages.size() || c.stages[s].kind != FRAMES || row.id < 0))
            error = "no such frame stage, or a negative id";
        else if (ok && (shape[0] < 1 || shape[1] != c.stages[s].dim))
            error = "a request needs at least one frame, each of the stage's input size";
        else if (ok && initial != Py_None && (int)row.initial.size() != c.width)
            error = "the initial state does not match the stage's state width";
        if (ok && !error && marks != Py_None) {
            PyObject *list = PySequence_Fast(marks, "marks must be a sequence of frame counts");
            ok = list != nullptr;
            for (Py_ssize_t j = 0; ok && j < PySequence_Fast_GET_SIZE(list); j++) {
                const long mark = PyLong_AsLong(PySequence_Fast_GET_ITEM(list, j));
                ok = !(mark == -1 && PyErr_Occurred());
                if (ok && (mark <= (row.marks.empty() ? 0 : row.marks.back()) || mark >= shape[0] ||
                           mark % c.stages[s].block))
                    error = "marks must ascend inside (0, frames) on whole blocks";
                if (ok) row.marks.push_back((int)mark);
            }
            Py_XDECREF(list);
        }
        if (error) PyErr_SetString(PyExc_ValueError, error);
        if (!ok || error) {
            Py_DECREF(seq);
            return nullptr;
        }
        row.trace = trace;
        row.length = (int)(row.frames.size() / c.stages[s].dim);
        row.ys.resize((size_t)row.length * c.stages[s].out_dim);
        rows.push_back({s, std::move(row)});
    }
    Py_DECREF(seq);
    return queued(c, rows);
}

/* drop(id): a request that will not finish leaves, without a result, before the next step. */
PyObject *loop_drop(LoopObject *self, PyObject *arg) {
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred()) return nullptr;
    Core &c = *self->core;
    {  // with the GIL, as admit
        std::lock_guard<std::mutex> g(c.io);
        c.drops.push_back(id);
        c.worker_called = true;
    }
    c.wake_worker.notify_one();
    Py_RETURN_NONE;
}

bool stage_arg(Core &c, PyObject *arg, long *s) {
    *s = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return false;
    if (*s < 0 || *s >= (long)c.stages.size()) {
        PyErr_SetString(PyExc_ValueError, "no such stage");
        return false;
    }
    if (c.worker_running) {
        PyErr_SetString(PyExc_RuntimeError, "the worker owns the stages while it runs");
        return false;
    }
    return true;
}

/* ready(stage): its rows, those admitted for the next step included (not while the worker runs). */
PyObject *loop_ready(LoopObject *self, PyObject *arg) {
    Core &c = *self->core;
    long s;
    if (!stage_arg(c, arg, &s)) return nullptr;
    c.exchange();
    return PyLong_FromSize_t(c.count((int)s));
}

PyObject *loop_oldest(LoopObject *self, PyObject *arg) {
    Core &c = *self->core;
    long s;
    if (!stage_arg(c, arg, &s)) return nullptr;
    c.exchange();
    return PyFloat_FromDouble(c.oldest_arrival(s));
}

bool buffer_of(PyObject *obj, Py_buffer *v, const char *fmt, const char *name) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return false;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    const bool ok = strchr(fmt, *f) && f[1] == 0 && v->itemsize == (*fmt == '?' ? 1 : 8);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s has the wrong dtype (%s)", name, v->format);
        PyBuffer_Release(v);
    }
    return ok;
}

/* The engine's cancel flags (bool) and queue length (int64[1]), held while they are read without the GIL. */
bool signals(PyObject *cancel_obj, PyObject *queued_obj, Py_buffer *cancel, Py_buffer *queued, Plan &p) {
    if (!buffer_of(cancel_obj, cancel, "?", "cancel_flags")) return false;
    if (!buffer_of(queued_obj, queued, "lq", "queued")) {
        PyBuffer_Release(cancel);
        return false;
    }
    if (queued->len < 8) {
        PyErr_SetString(PyExc_ValueError, "queued must hold one int64");
        PyBuffer_Release(cancel);
        PyBuffer_Release(queued);
        return false;
    }
    p.cancel = (const bool *)cancel->buf;
    p.cancel_len = cancel->len;
    p.queued = (const int64_t *)queued->buf;
    return true;
}

PyObject *left_list(std::vector<Left> &left) {
    PyObject *out = PyList_New((Py_ssize_t)left.size());
    for (size_t i = 0; out && i < left.size(); i++) {
        const Left &l = left[i];
        PyObject *value;
        if (l.has_logits) {
            value = PyList_New((Py_ssize_t)l.ys.size());
            for (size_t j = 0; value && j < l.ys.size(); j++) PyList_SET_ITEM(value, j, PyFloat_FromDouble(l.ys[j]));
        } else if (l.has_frames) {  // (outputs, final state, states at the marks) as bytes of float32
            value = Py_BuildValue("(y#y#y#)", (const char *)l.ys.data(), (Py_ssize_t)(l.ys.size() * sizeof(float)),
                                  (const char *)l.state.data(), (Py_ssize_t)(l.state.size() * sizeof(float)),
                                  (const char *)l.marked.data(), (Py_ssize_t)(l.marked.size() * sizeof(float)));
        } else if (l.has_tokens) {
            value = PyList_New((Py_ssize_t)l.tokens.size());
            for (size_t j = 0; value && j < l.tokens.size(); j++)
                PyList_SET_ITEM(value, j, PyLong_FromLongLong(l.tokens[j]));
        } else {
            value = PyFloat_FromDouble(l.score);
        }
        PyObject *steps = Py_None;
        if (value && !l.steps.empty()) {
            steps = PyList_New((Py_ssize_t)l.steps.size());
            for (size_t j = 0; steps && j < l.steps.size(); j++)
                PyList_SET_ITEM(steps, j, PyLong_FromUnsignedLong(l.steps[j]));
        } else {
            Py_INCREF(steps);
        }
        PyObject *item = value && steps ? Py_BuildValue("LiNLN", l.id, l.code, value, l.next_token, steps) : nullptr;
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

PyObject *record_bytes(const std::vector<StepRecord> &records) {
    return PyBytes_FromStringAndSize((const char *)records.data(), (Py_ssize_t)(records.size() * sizeof(StepRecord)));
}

/* run(cancel_flags, max_rows, pad_to, stage) -> (left, steps) on the calling thread, without the GIL: one step
 * of `stage`, or (stage -1) every stage in order to completion, each step padded to pad_to rows.
 * left: [(id, code, tokens list | score, next_token, step numbers)]; steps: the StepRecords, as bytes. */
PyObject *loop_run(LoopObject *self, PyObject *args) {
    PyObject *cancel_obj;
    Plan p;
    int stage;
    if (!PyArg_ParseTuple(args, "Oiii", &cancel_obj, &p.max_rows, &p.pad_to, &stage)) return nullptr;
    Core &c = *self->core;
    if (c.worker_running) {
        PyErr_SetString(PyExc_RuntimeError, "the worker is running: collect() its steps instead");
        return nullptr;
    }
    if (p.max_rows < 1 || stage < -1 || stage >= (int)c.stages.size()) {
        PyErr_SetString(PyExc_ValueError, "max_rows must be >= 1 and stage a stage or -1");
        return nullptr;
    }
    Py_buffer cancel;
    if (!buffer_of(cancel_obj, &cancel, "?", "cancel_flags")) return nullptr;
    p.cancel = (const bool *)cancel.buf;
    p.cancel_len = cancel.len;
    std::vector<Left> left;
    std::vector<StepRecord> records;
    c.pad_error = false;
    Py_BEGIN_ALLOW_THREADS c.run(p, stage, left, records);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&cancel);
    if (c.pad_error) {
        PyErr_Format(PyExc_RuntimeError, "cannot pad a step to %d rows: the stages hold %d", p.pad_to, c.capacity);
        return nullptr;
    }
    return Py_BuildValue("NN", left_list(left), record_bytes(records));
}

/* start(cancel_flags, queued, max_rows, pick, max_wait_steps, max_running, threads): the worker thread. */
PyObject *loop_start(LoopObject *self, PyObject *args) {
    PyObject *cancel_obj, *queued_obj;
    Core &c = *self->core;
    Plan p;
    if (!PyArg_ParseTuple(args, "OOiiiii", &cancel_obj, &queued_obj, &p.max_rows, &p.pick, &p.max_wait_steps,
                          &p.max_running, &p.threads))
        return nullptr;
    if (c.worker_running) {
        PyErr_SetString(PyExc_RuntimeError, "the worker is already running");
        return nullptr;
    }
    if (p.max_rows < 1) {
        PyErr_SetString(PyExc_ValueError, "max_rows must be >= 1");
        return nullptr;
    }
    if (!signals(cancel_obj, queued_obj, &c.worker_cancel, &c.worker_queued, p)) return nullptr;
    c.worker_plan = p;
    c.stopping = false;
    c.worker_called = false;
    c.worker_running = true;
    c.worker = std::thread([&c] {
        pthread_setname_np(pthread_self(), "cs-steploop");  // for top -H, perf and py-spy
        c.work();
    });
    Py_RETURN_NONE;
}

/* stop(): the worker finishes its step and exits; rows stay where they are. */
PyObject *loop_stop(LoopObject *self, PyObject *) {
    stop_worker(*self->core);
    Py_RETURN_NONE;
}

/* collect(timeout_s) -> (left, steps): what the worker finished, waiting (without the GIL) up to timeout_s
 * for a request to leave or for wake(). */
PyObject *loop_collect(LoopObject *self, PyObject *arg) {
    const double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return nullptr;
    Core &c = *self->core;
    std::vector<Left> left;
    std::vector<StepRecord> records;
    Py_BEGIN_ALLOW_THREADS {
        std::unique_lock<std::mutex> g(c.io);
        if (c.outbox.empty() && !c.kicked && !c.records_due && timeout > 0)
            c.wake_collector.wait_for(g, std::chrono::duration<double>(timeout),
                                      [&c] { return !c.outbox.empty() || c.kicked || c.records_due; });
        c.kicked = c.records_due = false;
        left.swap(c.outbox);
        records.swap(c.out_records);
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("NN", left_list(left), record_bytes(records));
}

/* wake(): collect() returns now (a request was queued for admission, or the engine is stopping). */
PyObject *loop_wake(LoopObject *self, PyObject *) {
    Core &c = *self->core;
    {  // with the GIL, as admit
        std::lock_guard<std::mutex> g(c.io);
        c.kicked = true;
    }
    c.wake_collector.notify_all();
    Py_RETURN_NONE;
}

/* lane_face(): the loop's C face for a native front end (loop_face.h), in a capsule; valid while the loop
 * lives (the front end keeps a reference to it). */
PyObject *loop_lane_face(LoopObject *self, PyObject *) {
    Core &c = *self->core;
    c.face = {CELLSERVE_LOOP_FACE_VERSION, &c, face_vocab, face_admit, face_listen, face_running, face_step};
    return PyCapsule_New(&c.face, CELLSERVE_LOOP_FACE, nullptr);
}

PyObject *loop_get_used(LoopObject *self, void *) { return PyLong_FromLong(self->core->active.load()); }
PyObject *loop_get_kernel_seconds(LoopObject *self, void *) { return PyFloat_FromDouble(self->core->kernel_seconds); }
PyObject *loop_get_running(LoopObject *self, void *) { return PyBool_FromLong(self->core->worker_running); }
PyObject *loop_get_caller_steps(LoopObject *self, void *) { return PyLong_FromLongLong(self->core->caller_steps); }

PyMethodDef LOOP_METHODS[] = {
    {"add_stage", (PyCFunction)loop_add_stage, METH_VARARGS, "add a stage (before any request); returns its index"},
    {"add_frame_stage", (PyCFunction)loop_add_frame_stage, METH_VARARGS,
     "add a stage over float frames (before any request); returns its index"},
    {"add_tree_stages", (PyCFunction)loop_add_tree_stages, METH_VARARGS,
     "make this a loop of child-sum TreeLSTM trees: stages leaf and internal"},
    {"admit_trees", (PyCFunction)loop_admit_trees, METH_O, "trees join together at the next step"},
    {"admit", (PyCFunction)loop_admit, METH_O, "requests join their stages together at the next step"},
    {"admit_frames", (PyCFunction)loop_admit_frames, METH_O, "requests join a frame stage together at the next step"},
    {"drop", (PyCFunction)loop_drop, METH_O, "take a request's row out, without a result, before the next step"},
    {"ready", (PyCFunction)loop_ready, METH_O, "rows in a stage"},
    {"oldest", (PyCFunction)loop_oldest, METH_O, "the oldest arrival among a stage's rows"},
    {"run", (PyCFunction)loop_run, METH_VARARGS, "run steps without the GIL; returns (left, steps)"},
    {"start", (PyCFunction)loop_start, METH_VARARGS, "start the worker thread (cellular)"},
    {"stop", (PyCFunction)loop_stop, METH_NOARGS, "stop the worker thread"},
    {"collect", (PyCFunction)loop_collect, METH_O, "the worker's finished requests and steps, waiting up to a timeout"},
    {"wake", (PyCFunction)loop_wake, METH_NOARGS, "make collect() return now"},
    {"lane_face", (PyCFunction)loop_lane_face, METH_NOARGS, "the loop's C face for a native front end (a capsule)"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef LOOP_GETSET[] = {
    {"used", (getter)loop_get_used, nullptr, "rows held (one per running request)", nullptr},
    {"kernel_seconds", (getter)loop_get_kernel_seconds, nullptr, "time inside the model's compute", nullptr},
    {"running", (getter)loop_get_running, nullptr, "whether the worker thread runs", nullptr},
    {"caller_steps", (getter)loop_get_caller_steps, nullptr,
     "steps a native front end's thread took on the idle loop itself, rather than waking the worker", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_steploop", "the engine's native step loop", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__steploop(void) {
    PyObject *kernels = PyImport_ImportModule("cellserve.kernels._native");
    if (!kernels) return nullptr;
    Py_DECREF(kernels);
    K = (const native_api_t *)PyCapsule_Import(CELLSERVE_API_CAPSULE, 0);
    if (!K) return nullptr;
    if (K->version != CELLSERVE_API_VERSION) {
        PyErr_Format(PyExc_ImportError, "the kernel core offers API version %d, the step loop needs %d: rebuild",
                     K->version, CELLSERVE_API_VERSION);
        return nullptr;
    }
    LoopType.tp_name = "cellserve.engine._steploop.Loop";
    LoopType.tp_basicsize = sizeof(LoopObject);
    LoopType.tp_dealloc = (destructor)loop_dealloc;
    LoopType.tp_flags = Py_TPFLAGS_DEFAULT;
    LoopType.tp_doc = "Stages of persistent rows and the step loop over them.";
    LoopType.tp_new = loop_new;
    LoopType.tp_methods = LOOP_METHODS;
    LoopType.tp_getset = LOOP_GETSET;
    if (PyType_Ready(&LoopType) < 0) return nullptr;
    PyObject *m = PyModule_Create(&MODULE);
    if (!m) return nullptr;
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
