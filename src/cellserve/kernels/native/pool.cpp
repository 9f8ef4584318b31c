/* A small persistent thread pool for splitting one product's panels across cores.
 *
 * Workers are started on first use. After a job they spin briefly (a batched step follows the last
 * one within microseconds while an engine is busy), then sleep on a condition variable, so an idle
 * engine costs no CPU. One job runs at a time; a caller that finds the pool busy (another engine's
 * thread) runs its job alone, which is always correct because jobs split by (tid, nthreads). */
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "native.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() std::this_thread::yield()
#endif

namespace {

constexpr int SPIN = 1 << 14;

struct Pool {
    std::mutex busy;                       /* held by the caller for the whole job */
    std::mutex sleep_lock;
    std::condition_variable wake;
    std::atomic<unsigned> generation{0};
    std::atomic<int> pending{0};
    task_fn fn = nullptr;
    void *ctx = nullptr;
    int nthreads = 1;
    std::vector<std::thread> workers;

    void worker(int tid) {
        unsigned seen = 0;
        for (;;) {
            unsigned now = generation.load(std::memory_order_acquire);
            for (int spin = 0; now == seen && spin < SPIN; spin++) {
                CPU_RELAX();
                now = generation.load(std::memory_order_acquire);
            }
            if (now == seen) {
                std::unique_lock<std::mutex> lock(sleep_lock);
                wake.wait(lock, [&] { return generation.load(std::memory_order_acquire) != seen; });
                now = generation.load(std::memory_order_acquire);
            }
            seen = now;
            if (tid < nthreads) {
                fn(ctx, tid, nthreads);
                pending.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    void run(int n, task_fn f, void *c) {
        std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
        if (!lock.owns_lock()) {
            f(c, 0, 1);
            return;
        }
        while ((int)workers.size() < n - 1) {
            int tid = (int)workers.size() + 1;
            workers.emplace_back([this, tid] {
                pthread_setname_np(pthread_self(), "cs-kernel-pool");
                worker(tid);
            });
            workers.back().detach();
        }
        fn = f;
        ctx = c;
        nthreads = n;
        pending.store(n - 1, std::memory_order_relaxed);
        generation.fetch_add(1, std::memory_order_acq_rel);
        { std::lock_guard<std::mutex> g(sleep_lock); }
        wake.notify_all();
        f(c, 0, n);
        while (pending.load(std::memory_order_acquire) > 0) CPU_RELAX();
    }
};

Pool *the_pool = nullptr;  /* never destroyed: detached workers may outlive static destructors */

/* A forked child has none of the parent's workers (and maybe a mutex held by one): start afresh. */
void reset_after_fork() { the_pool = new Pool(); }

Pool &pool() {
    static bool once = [] {
        the_pool = new Pool();
        pthread_atfork(nullptr, nullptr, reset_after_fork);
        return true;
    }();
    (void)once;
    return *the_pool;
}

}  // namespace

void pool_run(int nthreads, task_fn fn, void *ctx) {
    if (nthreads <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool().run(nthreads, fn, ctx);
}
