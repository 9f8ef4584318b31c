/* Dispatch, settings and scratch memory of the native core.
 *
 * Per-kernel dispatch, as MLAS builds its platform: each path is the table of a base ISA with only the
 * kernels that a newer extension adds put over it, so AVX-512 VBMI is the AVX-512 table with one entry
 * (binary weights by table lookup) replaced, AVX512-BF16 puts its bf16 product over it, and AMX its bf16
 * and int8 products (where Linux grants the tile state; isa_amx.cpp). The best path the CPU supports and
 * prefers is chosen when the module loads; CELLSERVE_ISA or platform_select() (tests, benchmarks) force
 * another. */
#include <stdlib.h>
#include <string.h>

#include "native.h"

namespace {

struct Path {
    isa_t table;
    int (*preferred)(void);  /* null: wherever supported; else only where this says so (forcing still works) */
};

#if defined(__x86_64__) || defined(_M_X64)
int avx512_vbmi_bf16_supported() { return avx512_vbmi_supported() && avx512_bf16_supported(); }

/* vdpbf16ps does 32 multiply-adds where an fp32 FMA does 16, but Intel's cores issue it once per two cycles
 * and their FMAs twice per cycle: measured on Emerald Rapids, 83 GF/s against 170, and the bf16 product on
 * FMAs (kernels.inc) ran 1.6-2.0x the vdpbf16ps one from M = 8 up. Zen 4 issues it once per cycle (2x its
 * fp32 there). So the vdpbf16ps paths are preferred on AMD only; on Intel they stay for CELLSERVE_ISA. */
int dpbf16_preferred() {
    __builtin_cpu_init();
    return !__builtin_cpu_is("intel");
}
#endif

/* The paths, best first; built once, on first use. The AVX-512 extensions each put their kernels over the
 * AVX-512 table: AMX the bf16 and int8 products on tiles, VBMI binary weights by table lookup, BF16 the bf16
 * product on vdpbf16ps. Every combination the CPU has is a path of its own, so the tests can run each kernel
 * on one machine. */
struct Paths {
    Path path[9];
    int count = 0;

    isa_t &add(const isa_t &base, int (*preferred)(void) = nullptr) {
        path[count].table = base;
        path[count].preferred = preferred;
        return path[count++].table;
    }

    Paths() {
#if defined(__x86_64__) || defined(_M_X64)
        isa_t &amx = add(ISA_AVX512);
        amx.name = "avx512-amx";
        amx.supported = amx_present;
        amx.gemm_s8 = amx_gemm_s8;
        amx.gemm_bf16 = amx_gemm_bf16;
        isa_t &both = add(ISA_AVX512, dpbf16_preferred);
        both.name = "avx512-vbmi-bf16";
        both.supported = avx512_vbmi_bf16_supported;
        both.gemm_s8 = avx512_vbmi_gemm_s8;
        both.gemm_bf16 = avx512_bf16_gemm;
        isa_t &bf16 = add(ISA_AVX512, dpbf16_preferred);
        bf16.name = "avx512-bf16";
        bf16.supported = avx512_bf16_supported;
        bf16.gemm_bf16 = avx512_bf16_gemm;
        isa_t &vbmi = add(ISA_AVX512);
        vbmi.name = "avx512-vbmi";
        vbmi.supported = avx512_vbmi_supported;
        vbmi.gemm_s8 = avx512_vbmi_gemm_s8;
        add(ISA_AVX512);
        add(ISA_AVX2);
#endif
        add(ISA_PORTABLE);
        active = &ISA_PORTABLE;
        for (int i = 0; i < count; i++)
            if (path[i].table.supported() && (!path[i].preferred || path[i].preferred())) {
                active = &path[i].table;
                break;
            }
    }

    const isa_t *active;
};

Paths &paths() {
    static Paths instance;
    return instance;
}

/* Per-thread scratch: a calling thread's gates, quantized activations and packed rows of A. */
struct Scratch {
    void *ptr[NUM_SLOTS] = {};
    size_t size[NUM_SLOTS] = {};
    ~Scratch() {
        for (void *p : ptr) free(p);
    }
};
thread_local Scratch scratch_buffers;

}  // namespace

/* The k-blocked products (kernels.inc) hold one block of a panel's rows in L1 while every row tile reads it.
 * 128 rows (16 KB of fp32 panel) on Intel: Emerald Rapids measured 64, 96, 160, 192 and 256 no better, 256
 * worse. Zen 4 runs 256 faster (its tiles' sums go through memory half as often), 1 thread, medians of 9
 * interleaved rounds against 128: +0.4-3.7% at 256 x 1024, 512 x 2048 and 1024 x 4096 from M = 32 to 256;
 * 192 measured as 128, 320 as 256. */
int k_block_rows() {
#if defined(__x86_64__) || defined(_M_X64)
    static const int rows = (__builtin_cpu_init(), __builtin_cpu_is("amd")) ? 256 : 128;
    return rows;
#else
    return 128;
#endif
}

thread_local int native_threads = 1;

const isa_t *platform(void) { return paths().active; }

int platform_count(void) { return paths().count; }

const isa_t *platform_path(int i) { return &paths().path[i].table; }

int platform_select(const char *name) {
    Paths &all = paths();
    for (int i = 0; i < all.count; i++) {
        if (strcmp(all.path[i].table.name, name) != 0) continue;
        if (!all.path[i].table.supported()) return -2;
        all.active = &all.path[i].table;
        return 0;
    }
    return -1;
}

void *aligned_zeros(size_t bytes) {
    bytes = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    void *p = aligned_alloc(ALIGN, bytes ? bytes : ALIGN);
    if (p) memset(p, 0, bytes);
    return p;
}

void *scratch(int slot, size_t bytes) {
    Scratch &s = scratch_buffers;
    if (bytes > s.size[slot]) {
        free(s.ptr[slot]);
        s.size[slot] = bytes + bytes / 2;
        s.ptr[slot] = aligned_zeros(s.size[slot]);
        if (!s.ptr[slot]) s.size[slot] = 0;
    }
    return s.ptr[slot];
}
