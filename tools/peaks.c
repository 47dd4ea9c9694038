// peaks.c - what this machine can do at most, to set the benchmark figures against: the
// float multiply-add rate (GFLOP/s), the int16 pair multiply-add rate of the instruction
// q8_tile() uses (G multiply-adds/s), and the rate at which it reads memory (GB/s), on every
// thread at once. Not part of longrun; tools/bench_compare.py builds and runs it.
//
//   cc -O3 -march=native -fopenmp -o peaks tools/peaks.c && ./peaks
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define WIDTH "512-bit"
#define CHAINS 12   // independent sums: latency x units, and few enough to stay in registers
typedef __m512 fvec;
typedef __m512i ivec;
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MADD_PAIRS(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#define FSET(x) _mm512_set1_ps(x)
#define ISET(x) _mm512_set1_epi32(x)
#define LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WIDTH "256-bit"
#define CHAINS 12
typedef __m256 fvec;
typedef __m256i ivec;
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#ifdef __AVXVNNI__
#define MADD_PAIRS(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define MADD_PAIRS(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
#define FSET(x) _mm256_set1_ps(x)
#define ISET(x) _mm256_set1_epi32(x)
#define LANES 8
#else
#define WIDTH "scalar"
#define CHAINS 12
typedef float fvec;
typedef int ivec;
#define FMA(a, b, c) ((a) * (b) + (c))
#define MADD_PAIRS(acc, a, b) ((acc) + (a) * (b))
#define FSET(x) (x)
#define ISET(x) (x)
#define LANES 1
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Multiply-adds per second over all threads: CHAINS independent vector sums, n steps each.
static double fma_rate(long n) {
    double sink = 0;
    double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
        fvec acc[CHAINS];
        fvec a = FSET(0.999f), b = FSET(1e-3f);
        for (int c = 0; c < CHAINS; c++) acc[c] = FSET((float)c);
        for (long i = 0; i < n; i++)
#pragma GCC unroll 20
            for (int c = 0; c < CHAINS; c++) acc[c] = FMA(acc[c], a, b);
        for (int c = 0; c < CHAINS; c++) {   // every chain's result is used
            float out[LANES];
            memcpy(out, &acc[c], sizeof(out));
            sink += out[0];
        }
    }
    double dt = now() - t0;
    if (sink == 12345) puts("");   // keeps the sums alive
    return (double)n * CHAINS * LANES * threads() / dt;
}

// int16 pairs multiplied and summed into int32 lanes per second (2 multiply-adds a lane).
static double pair_rate(long n) {
    long sink = 0;
    double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
        ivec acc[CHAINS];
        ivec a = ISET(3), b = ISET(5);
        for (int c = 0; c < CHAINS; c++) acc[c] = ISET(c);
        for (long i = 0; i < n; i++)
#pragma GCC unroll 20
            for (int c = 0; c < CHAINS; c++) acc[c] = MADD_PAIRS(acc[c], a, b);
        for (int c = 0; c < CHAINS; c++) {
            int out[LANES];
            memcpy(out, &acc[c], sizeof(out));
            sink += out[0];
        }
    }
    double dt = now() - t0;
    if (sink == 12345) puts("");
    return (double)n * CHAINS * LANES * (LANES > 1 ? 2 : 1) * threads() / dt;
}

// Bytes read per second: every thread sums its share of a buffer far larger than the caches.
static double read_rate(size_t bytes, int passes) {
    size_t n = bytes / sizeof(unsigned);
    unsigned *x = malloc(n * sizeof(unsigned));
    if (!x) return 0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = 1;   // first touch by the thread that reads it
    double best = 0;
    for (int p = 0; p < passes; p++) {
        unsigned sum = 0;   // integers: the sum vectorizes (a float one would keep its order)
        double t0 = now();
#pragma omp parallel for schedule(static) reduction(+ : sum)
        for (size_t i = 0; i < n; i++) sum += x[i];
        double dt = now() - t0;
        if (sum == 0) puts("");
        best = (double)bytes / dt > best ? (double)bytes / dt : best;
    }
    free(x);
    return best;
}

int main(void) {
    double flops = 2 * fma_rate(50000000);
    double madds = pair_rate(50000000);
    double bytes = read_rate((size_t)1 << 30, 5);
    printf("peaks on %d threads (%s vectors): float FMA %.0f GFLOP/s; int16 pair multiply-add "
           "%.0f G multiply-adds/s; memory read %.1f GB/s\n",
           threads(), WIDTH, flops / 1e9, madds / 1e9, bytes / 1e9);
    return 0;
}
