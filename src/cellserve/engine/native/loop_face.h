/* The step loop's C face for native front ends (server/native/token_lanes.cpp): a front end admits token
 * requests into a running loop and is handed their results on the thread that steps it (the loop's worker,
 * or the front end's own), with no Python per request. Plain C types only: the loop and the front end are
 * separate extension modules, and this struct, passed in a PyCapsule (Loop.lane_face()), is all they share.
 *
 * At one client a front end steps the idle loop on its own thread (admit's caller_steps, then step): a request
 * then wakes no other thread.
 *
 * Ids: the front end names its rows with ids at or above its `first_id` (the engine's runner counts its own
 * from 0, far below), so the worker tells the two apart as they leave: the engine's go to its outbox for
 * Python, the front end's to `on_left`. A front end's rows have no cancel ticket; they run to their end. */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CELLSERVE_LOOP_FACE "cellserve.engine._steploop.face"
#define CELLSERVE_LOOP_FACE_VERSION 3

typedef struct {
    int stage;             /* a READ or GENERATE stage */
    long long id;          /* >= the listener's first_id */
    const int64_t *tokens; /* copied */
    int count, max_len, stop_at_eos;
    double arrival;        /* CLOCK_MONOTONIC seconds (Python's time.perf_counter) */
} cs_loop_row_t;

typedef struct {
    long long id;
    const int64_t *tokens; /* GENERATE: the tokens it produced */
    int count;
    double score;          /* READ with a head: its log-likelihood */
    long long next_token;  /* READ with a head: the argmax after its last token */
} cs_loop_left_t;

/* Called on the thread that stepped (the worker, or a front end's in step), without the GIL and without the
 * loop's locks, once per step that finished any of the listener's rows. */
typedef void (*cs_loop_on_left)(void *ctx, const cs_loop_left_t *left, int count);

typedef struct {
    int version;
    void *loop;
    /* The stages' vocabularies (token ids are checked against them before admit), -1 for a stage without. */
    int (*vocab)(void *loop, int stage);
    /* Rows join at the worker's next step; 0 where a row is malformed (nothing is admitted then). With
     * caller_steps, 2 where the loop was idle: the worker was not woken, and the caller steps them (step). */
    int (*admit)(void *loop, const cs_loop_row_t *rows, int count, int caller_steps);
    /* Rows with ids >= first_id leave through on_left from now on; on_left NULL: through the outbox again.
     * Returns once no call of the previous listener is under way. */
    void (*listen)(void *loop, long long first_id, cs_loop_on_left on_left, void *ctx);
    /* Whether the worker runs (cellular batching): rows admitted meanwhile wait for it otherwise. */
    int (*running)(void *loop);
    /* One step on the calling thread, unless another thread steps: 1 while rows remain (call again once the
     * caller's own I/O is done), 0 once the loop idles or the worker has taken over (other work came). The
     * listener's rows that finish leave through on_left on the calling thread. */
    int (*step)(void *loop);
} cs_loop_face_t;

#ifdef __cplusplus
}
#endif
