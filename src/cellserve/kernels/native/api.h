/* The C face the kernel core offers other native modules (the engine's step loop): the drivers a cell step
 * needs, exported once as a capsule (cellserve.kernels._native._C_API), so those modules call the very same
 * code, dispatch table and per-thread settings (threads, scratch) as Python's calls do. The core knows nothing
 * of who calls it. Bump CELLSERVE_API_VERSION when this struct changes. */
#ifndef CELLSERVE_API_H
#define CELLSERVE_API_H

#include "native.h"

#define CELLSERVE_API_VERSION 5
#define CELLSERVE_API_CAPSULE "cellserve.kernels._native._C_API"

typedef decltype(&linear) linear_fn;
typedef decltype(&lstm_step) lstm_step_fn;
typedef decltype(&gru_step) gru_step_fn;
typedef decltype(&rows_max_sumexp) rows_max_sumexp_fn;
typedef decltype(&lstm_sequence) lstm_sequence_fn;
typedef decltype(&gru_sequence) gru_sequence_fn;
typedef decltype(&tree_gates) tree_gates_fn;
typedef decltype(&sru_steps) sru_steps_fn;
typedef decltype(&qrnn_steps) qrnn_steps_fn;

typedef struct {
    int version;
    const packed_t *(*packed_of)(void *obj); /* the matrix in a _native.Packed object, or NULL if it is not one */
    linear_fn linear;
    lstm_step_fn lstm_step;
    gru_step_fn gru_step;
    void (*set_threads)(int n); /* the calling thread's thread count for products (a native thread's own) */
    rows_max_sumexp_fn rows_max_sumexp;
    lstm_sequence_fn lstm_sequence; /* k steps after one input projection: a block of frames */
    gru_sequence_fn gru_sequence;
    tree_gates_fn tree_gates; /* a child-sum TreeLSTM's gates over a batch of nodes */
    sru_steps_fn sru_steps;   /* k SRU steps after one product */
    qrnn_steps_fn qrnn_steps; /* (version 5) k QRNN steps after one product */
} native_api_t;

#endif
