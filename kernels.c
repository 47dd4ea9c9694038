// kernels.c - longrun's fast kernels: the sums of run.c's reference blocks, in the orders a
// processor computes fastest. run.c includes this file after forward() (one translation unit,
// as with tokenizer.c), so a reader meets the model first and the speed after it.
//
//   matmul()          = matmul_reference(): a blocked product over packed weight panels, and
//                       for q8_0 weights integer products with activations quantized per block
//   attention()       = attention_reference(): FlashAttention tiles for a chunk of queries,
//                       Flash-Decoding ranges for one token
//   f16_to_f32_row()  = f16_to_f32() over a row, by F16C where the processor has it
//   dot_i8()          = a float-by-int8 dot product (the context memory's block scores)
//
// Most kernels are plain C shaped so the compiler vectorizes it. The few it does not find by
// itself are written again behind one fence: AVX-512 intrinsics (HAVE_AVX512: the q8_0
// products), AVX2 ones (HAVE_AVX2), AArch64 NEON ones (HAVE_NEON), and beside them the portable
// twin, which every other machine compiles. tests/test_kernels.py builds the AVX-512, AVX2 and
// portable versions (those the CPU can run), tests/test_aarch64.py the NEON ones (under qemu),
// and both hold them to double-precision references; tests/test_reference.py holds the whole
// forward pass to the reference blocks.

// ----------------------------------------------------------------------------
// The SIMD fence: AVX2 with FMA and F16C, and on top of it AVX-512 with VNNI where the
// compiler targets it (-march=native on Intel since Ice Lake, AMD since Zen 4); AArch64's NEON
// (every AArch64 processor has it); or none (every other machine, and the portable test
// builds). Each kernel below that comes more than once has its versions side by side; an
// AVX-512 machine runs the AVX2 version of every kernel that has no AVX-512 one.

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2 1
#define HAVE_NEON 0
#include <immintrin.h>

// AVX-512 (F, BW, VL) with VNNI: 512-bit vectors and vpdpwssd on them, 32 int16 products
// summed in pairs into 16 int32 lanes per instruction.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif

// acc + the products of a's and b's int16 pairs, each pair summed (int32 lanes): one vpdpwssd
// where the processor has AVX-VNNI (Intel since Alder Lake), else vpmaddwd and vpaddd. Exact
// either way: a pair's products stay below 2^31 in every use here. (AVX-512 machines run their
// own q8 kernels, the only users.)
#if HAVE_AVX512
#define KERNEL_SET "AVX-512 + VNNI, AVX2 + FMA + F16C"
#elif defined(__AVXVNNI__)
#define madd_pairs(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#define KERNEL_SET "AVX2 + FMA + F16C + AVX-VNNI"
#else
#define madd_pairs(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define KERNEL_SET "AVX2 + FMA + F16C"
#endif

// Unroll a 32-block's 16 k pairs: without it GCC (12) copies every accumulator of q8_tile
// from one register to another each step, and spills two (1B-shaped model, pp512, 2 threads:
// AVX-512 141 -> 167 tokens/s, AVX2 68 -> 92).
#define UNROLL_BLOCK _Pragma("GCC unroll 16")

// The sum of a vector's 8 floats.
static float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define HAVE_AVX2 0
#define HAVE_AVX512 0
#define HAVE_NEON 1
#define KERNEL_SET "NEON"
#include <arm_neon.h>
#else
#define HAVE_AVX2 0
#define HAVE_AVX512 0
#define HAVE_NEON 0
#define KERNEL_SET "portable C"
#endif

// The attention tile's plain loops, 32 queries wide, in 512-bit vectors on AVX-512 (GCC
// otherwise prefers 256-bit ones on Intel); elsewhere the compiler's own choice.
#if HAVE_AVX512
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

// ----------------------------------------------------------------------------
// Scratch, allocated once for the longest chunk

#define MM_R 5        // weight rows per float tile (gemm_tile)
#define MM_T 24       // tokens per float tile
#define Q8_R (HAVE_AVX512 ? 8 : 2)   // weight rows per q8 tile (AVX-512 has 32 registers)
#define Q8_T 32       // tokens per q8 tile
#define ATT_QT 32     // queries per attention tile: the vector width of its loops
#define ATT_KB 64     // keys per block
#define ATT_KS 4      // keys per call of tile_scores
#define ATT_SPLIT 256 // fewest keys per decode range
#define ATT_RANGES 64 // most decode ranges per kv head
// Floats of one thread's attention scratch: queries, keys, values, accumulators and scores.
#define ATT_WORK(H) ((size_t)(H) * (ATT_QT * 4 + ATT_KB * 2) + ATT_KB * ATT_QT)

// Sized for chunks of up to max_T tokens of up to `widest` columns:
//   row (n_threads, widest)            one dequantized weight row per thread
//   panel (n_threads, widest * MM_R)   a packed float panel per thread
//   xt (max_T up to MM_T, widest)      the chunk transposed tile by tile
//   qx (max_T, widest), dx (max_T, widest / 32)           the chunk quantized for q8_0 weights
//   q8_panel (n_threads, widest * Q8_R), q8_dw (n_threads, widest / 32 * Q8_R)   q8 panels
//   q8_xt (max_T up to Q8_T, widest), q8_dx (same, widest / 32)   the quantized chunk in k pairs
//   att (n_threads, ATT_WORK(head_dim))                  attention tiles (or decode blocks)
//   parts (n_heads, ATT_RANGES, head_dim + 2)           decode's partial softmaxes
struct KernelWork {
    float *row, *panel, *xt, *dx, *q8_dw, *q8_dx, *att, *parts;
    int16_t *qx, *q8_panel, *q8_xt;
};

// n floats (or n int16s) for a scratch buffer named `what`.
static float *floats(size_t n, const char *what) { return xcalloc(n, sizeof(float), what); }
static int16_t *int16s(size_t n, const char *what) { return xcalloc(n, sizeof(int16_t), what); }

static size_t round_up(size_t n, size_t multiple) {
    return add_size(n, multiple - 1, "scratch") / multiple * multiple;
}

static KernelWork *new_kernel_work(size_t widest, int max_T, int head_dim, int n_heads) {
    KernelWork *kw = xcalloc(1, sizeof(KernelWork), "kernel scratch");
    size_t threads = (size_t)n_threads();
    size_t blocks = widest / LR_Q8_BLOCK + 1;
    size_t per_thread = mul_size(threads, widest, "scratch");
    size_t padded = round_up((size_t)max_T, MM_T);
    size_t q8_padded = round_up((size_t)max_T, Q8_T);
    kw->row = floats(per_thread, "weight rows");
    kw->panel = floats(mul_size(per_thread, MM_R, "panels"), "weight panels");
    kw->xt = floats(mul_size(padded, widest, "chunk"), "the transposed chunk");
    kw->qx = int16s(mul_size((size_t)max_T, widest, "chunk"), "the quantized chunk");
    kw->dx = floats(mul_size((size_t)max_T, blocks, "chunk"), "the quantized chunk");
    kw->q8_panel = int16s(mul_size(per_thread, Q8_R, "panels"), "q8 panels");
    kw->q8_dw = floats(mul_size(mul_size(threads, blocks, "panels"), Q8_R, "panels"), "q8 panels");
    kw->q8_xt = int16s(mul_size(q8_padded, widest, "chunk"), "the quantized chunk");
    kw->q8_dx = floats(mul_size(q8_padded, blocks, "chunk"), "the quantized chunk");
    kw->att = floats(mul_size(threads, ATT_WORK(head_dim), "attention"), "attention tiles");
    size_t ranges = mul_size((size_t)n_heads, ATT_RANGES, "attention");
    kw->parts = floats(mul_size(ranges, (size_t)head_dim + 2, "attention"), "attention ranges");
    return kw;
}

static void free_kernel_work(KernelWork *kw) {
    if (!kw) return;   // as free(NULL): a transformer whose building was cut short
    void *buffers[] = { kw->row, kw->panel, kw->xt,       kw->dx,    kw->q8_dw, kw->q8_dx,
                        kw->att, kw->parts, kw->q8_panel, kw->q8_xt, kw->qx };
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    free(kw);
}

static const char *kernel_set(void) { return KERNEL_SET; }

// Half i of the bytes at p (any alignment), as a float.
static float f16_at(const uint8_t *p, size_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return f16_to_f32(h);
}

// n halves (at src, any alignment) to floats: f16_to_f32() per value. With F16C, 8 at a time
// by one instruction (vcvtph2ps) instead of the bit arithmetic.
#if HAVE_AVX2
static void f16_to_f32_row(float *dst, const uint8_t *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) dst[i] = f16_at(src, i);
}
#elif HAVE_NEON
static void f16_to_f32_row(float *dst, const uint8_t *src, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4)   // fcvtl: 4 halves to 4 floats (bytes loaded: any alignment)
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(src + 2 * i))));
    for (; i < n; i++) dst[i] = f16_at(src, i);
}
#else
static void f16_to_f32_row(float *dst, const uint8_t *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = f16_at(src, i);
}
#endif

// sum_i w_i c_i (w: n floats, c: n int8s). AVX2: 16 int8s a step, each 8 widened to int32
// and converted (vpmovsxbd, vcvtdq2ps) and multiplied into one of two sums; the portable loop
// keeps 16 partial sums as dot() does, which the compiler vectorizes, if not as tightly.
#if HAVE_AVX2
static float dot_i8(const float *w, const int8_t *c, int n) {
    __m256 sum0 = _mm256_setzero_ps();
    __m256 sum1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i steps = _mm_loadu_si128((const __m128i *)(c + i));
        __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(steps));
        __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(steps, 8)));
        sum0 = _mm256_fmadd_ps(low, _mm256_loadu_ps(w + i), sum0);
        sum1 = _mm256_fmadd_ps(high, _mm256_loadu_ps(w + i + 8), sum1);
    }
    float sum = hsum8(_mm256_add_ps(sum0, sum1));
    for (; i < n; i++) sum += w[i] * c[i];
    return sum;
}
#elif HAVE_NEON
static float dot_i8(const float *w, const int8_t *c, int n) {
    float32x4_t sum[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    int i = 0;
    for (; i + 16 <= n; i += 16) {   // 16 int8s widened to int16, int32, then floats
        int8x16_t steps = vld1q_s8(c + i);
        int16x8_t low = vmovl_s8(vget_low_s8(steps));
        int16x8_t high = vmovl_high_s8(steps);
        int32x4_t part[4] = {vmovl_s16(vget_low_s16(low)), vmovl_high_s16(low),
                             vmovl_s16(vget_low_s16(high)), vmovl_high_s16(high)};
        for (int r = 0; r < 4; r++)
            sum[r] = vfmaq_f32(sum[r], vld1q_f32(w + i + 4 * r), vcvtq_f32_s32(part[r]));
    }
    float total = vaddvq_f32(vaddq_f32(vaddq_f32(sum[0], sum[1]), vaddq_f32(sum[2], sum[3])));
    for (; i < n; i++) total += w[i] * c[i];
    return total;
}
#else
static float dot_i8(const float *w, const int8_t *c, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += w[i + j] * c[i + j];
    float sum = 0;
    for (; i < n; i++) sum += w[i] * c[i];
    for (int j = 0; j < 16; j++) sum += acc[j];
    return sum;
}
#endif

// ----------------------------------------------------------------------------
// Matrix products: matmul() = matmul_reference()
//
// matmul_reference() reads every weight row once per token. Decode cannot avoid that (one
// token, each weight used once: the speed is the memory's), but a chunk can: the blocked
// product (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication")
// reads each weight row once per chunk and keeps a tile of sums in registers.

// q8_0 weights meet activations quantized per 32-block too (as llama.cpp's Q8_0 x Q8_0 does,
// but to int16): each block of x becomes integers q = round(x * ACT_MAX / max|x|) and one float
// d = max|x| / ACT_MAX, so a block's 32 products sum exactly in int32 (|sum| <= 32 * 128 *
// 32767 < 2^31) and cost one float multiply-add: sum_b dw_b dx_b sum_i qw_i qx_i. int16, not
// int8, because x86 without AVX-512 VNNI multiplies int16 pairs (vpmaddwd) at the same speed
// as it would int8 ones, and the rounding then costs no accuracy: on SmolLM2, top-1 agreement
// with HF stays 100% where int8 activations dropped it to 96.5%. A NaN or infinite x makes its
// block's d NaN, so it reaches the output.
#define ACT_MAX 32767
static void quantize_activations(int16_t *q, float *d, const float *x, size_t n) {
    for (size_t b = 0; b < n / LR_Q8_BLOCK; b++) {
        const float *xb = x + b * LR_Q8_BLOCK;
        float amax = 0;
        float poison = 0;
        for (int i = 0; i < LR_Q8_BLOCK; i++) {
            amax = max_float(amax, fabsf(xb[i]));
            poison += 0 * xb[i];
        }
        float inv = amax > 0 ? ACT_MAX / amax : 0;
        for (int i = 0; i < LR_Q8_BLOCK; i++) {
            float v = xb[i] * inv;
            if (!(fabsf(v) <= ACT_MAX + 0.5f)) v = 0;   // NaN: d says so
            // round to nearest even by the 1.5 * 2^23 trick: lrintf, but vectorizable
            q[b * LR_Q8_BLOCK + i] = (int16_t)((v + 0x1.8p23f) - 0x1.8p23f);
        }
        d[b] = amax / ACT_MAX + poison;
    }
}

// One q8_0 row (cols int8s, cols / 32 scales dw) dotted with quantized activations (qx, dx):
// decode's product for q8_0 weights. AVX2 widens 16 weights to int16 and multiplies pairs
// into int32 sums (vpmaddwd); measured on an AMD EPYC, 2 threads, 57 MB of q8_0 rows: 26.7 GB/s,
// against 10.8 for float activations. AVX-512 widens a whole 32-block and sums it in one
// vpdpwssd.
#if HAVE_AVX512
static float q8_dot(const int8_t *qw, const float *dw, const int16_t *qx, const float *dx,
                    size_t cols) {
    __m512 acc = _mm512_setzero_ps();
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + 32 * b)));
        __m512i x = _mm512_loadu_si512(qx + 32 * b);
        __m512i sum = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(dw[b] * dx[b]), _mm512_cvtepi32_ps(sum), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#elif HAVE_AVX2
static float q8_dot(const int8_t *qw, const float *dw, const int16_t *qx, const float *dx,
                    size_t cols) {
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        const int8_t *w = qw + b * LR_Q8_BLOCK;
        const int16_t *x = qx + b * LR_Q8_BLOCK;
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
        __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x));
        __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16)));
        __m256 sum = _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw[b] * dx[b]), sum, acc);
    }
    return hsum8(acc);
}
#elif HAVE_NEON
static float q8_dot(const int8_t *qw, const float *dw, const int16_t *qx, const float *dx,
                    size_t cols) {
    float acc = 0;
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {   // smull/smlal: int16 pairs into int32
        const int8_t *w = qw + b * LR_Q8_BLOCK;
        const int16_t *x = qx + b * LR_Q8_BLOCK;
        int32x4_t sum = vdupq_n_s32(0);
        for (int i = 0; i < LR_Q8_BLOCK; i += 8) {
            int16x8_t wi = vmovl_s8(vld1_s8(w + i));
            int16x8_t xi = vld1q_s16(x + i);
            sum = vmlal_s16(sum, vget_low_s16(wi), vget_low_s16(xi));
            sum = vmlal_high_s16(sum, wi, xi);
        }
        acc += dw[b] * dx[b] * (float)vaddvq_s32(sum);
    }
    return acc;
}
#else
static float q8_dot(const int8_t *qw, const float *dw, const int16_t *qx, const float *dx,
                    size_t cols) {
    float acc = 0;
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        int32_t sum = 0;
        for (size_t i = b * LR_Q8_BLOCK; i < (b + 1) * LR_Q8_BLOCK; i++) sum += qw[i] * qx[i];
        acc += dw[b] * dx[b] * (float)sum;
    }
    return acc;
}
#endif

// acc (Q8_R, Q8_T) = the products of Q8_R weight rows and Q8_T tokens, both packed in k pairs:
// panel (cols / 2, Q8_R, 2) with scales dw (cols / 32, Q8_R), xt (cols / 2, Q8_T, 2) with dx
// (cols / 32, Q8_T). A k pair of one row, broadcast, meets the same pair of 8 tokens in one
// vpmaddwd; 8 int32 vectors of sums stay in registers through a block, then become floats.
// Measured on an AMD EPYC: 41-50 G multiply-adds/s per core, against 31-33 for gemm_tile.
// AVX-512 takes 8 rows (Q8_R) and 16 tokens a vector: 16 sums of 16 int32 lanes each, so a
// token pair loaded meets 8 rows, not 2. The float sums wait in acc between blocks: with the
// int32 sums, the tokens and the row's pair, 16 more vectors would not fit the 32 registers.
#if HAVE_AVX512
static void q8_tile(float acc[Q8_R][Q8_T], const int16_t *panel, const float *dw,
                    const int16_t *xt, const float *dx, size_t cols) {
    memset(acc, 0, sizeof(float) * Q8_R * Q8_T);
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        __m512i sum[Q8_R][Q8_T / 16];
        for (int r = 0; r < Q8_R; r++)
            for (int v = 0; v < Q8_T / 16; v++) sum[r][v] = _mm512_setzero_si512();
        UNROLL_BLOCK
        for (size_t kp = b * LR_Q8_BLOCK / 2; kp < (b + 1) * LR_Q8_BLOCK / 2; kp++) {
            __m512i x[Q8_T / 16];
            for (int v = 0; v < Q8_T / 16; v++)
                x[v] = _mm512_loadu_si512(xt + (kp * Q8_T + 16 * v) * 2);
            for (int r = 0; r < Q8_R; r++) {
                int32_t pair;
                memcpy(&pair, panel + (kp * Q8_R + r) * 2, 4);
                __m512i w = _mm512_set1_epi32(pair);
                for (int v = 0; v < Q8_T / 16; v++)
                    sum[r][v] = _mm512_dpwssd_epi32(sum[r][v], w, x[v]);
            }
        }
        for (int v = 0; v < Q8_T / 16; v++) {
            __m512 x_scale = _mm512_loadu_ps(dx + b * Q8_T + 16 * v);
            for (int r = 0; r < Q8_R; r++) {
                __m512 d = _mm512_mul_ps(_mm512_set1_ps(dw[b * Q8_R + r]), x_scale);
                __m512 a = _mm512_loadu_ps(&acc[r][16 * v]);
                a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum[r][v]), a);
                _mm512_storeu_ps(&acc[r][16 * v], a);
            }
        }
    }
}
#elif HAVE_AVX2
static void q8_tile(float acc[Q8_R][Q8_T], const int16_t *panel, const float *dw,
                    const int16_t *xt, const float *dx, size_t cols) {
    __m256 a[Q8_R][Q8_T / 8];
    memset(a, 0, sizeof(a));
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        __m256i sum[Q8_R][Q8_T / 8];
        memset(sum, 0, sizeof(sum));
        UNROLL_BLOCK
        for (size_t kp = b * LR_Q8_BLOCK / 2; kp < (b + 1) * LR_Q8_BLOCK / 2; kp++) {
            __m256i x[Q8_T / 8];
            for (int v = 0; v < Q8_T / 8; v++)
                x[v] = _mm256_loadu_si256((const __m256i *)(xt + (kp * Q8_T + 8 * v) * 2));
            for (int r = 0; r < Q8_R; r++) {
                int32_t pair;
                memcpy(&pair, panel + (kp * Q8_R + r) * 2, 4);
                __m256i w = _mm256_set1_epi32(pair);
                for (int v = 0; v < Q8_T / 8; v++) sum[r][v] = madd_pairs(sum[r][v], w, x[v]);
            }
        }
        for (int r = 0; r < Q8_R; r++)
            for (int v = 0; v < Q8_T / 8; v++) {
                __m256 d = _mm256_mul_ps(_mm256_set1_ps(dw[b * Q8_R + r]),
                                         _mm256_loadu_ps(dx + b * Q8_T + 8 * v));
                a[r][v] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum[r][v]), a[r][v]);
            }
    }
    for (int r = 0; r < Q8_R; r++)
        for (int v = 0; v < Q8_T / 8; v++) _mm256_storeu_ps(&acc[r][8 * v], a[r][v]);
}
#elif HAVE_NEON
// NEON has no vpmaddwd: a k pair of one row, repeated, meets 4 tokens' pairs in two smull,
// and addp adds each token's two products.
static void q8_tile(float acc[Q8_R][Q8_T], const int16_t *panel, const float *dw,
                    const int16_t *xt, const float *dx, size_t cols) {
    float32x4_t a[Q8_R][Q8_T / 4];
    for (int r = 0; r < Q8_R; r++)
        for (int v = 0; v < Q8_T / 4; v++) a[r][v] = vdupq_n_f32(0);
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        int32x4_t sum[Q8_R][Q8_T / 4];
        for (int r = 0; r < Q8_R; r++)
            for (int v = 0; v < Q8_T / 4; v++) sum[r][v] = vdupq_n_s32(0);
        for (size_t kp = b * LR_Q8_BLOCK / 2; kp < (b + 1) * LR_Q8_BLOCK / 2; kp++) {
            const int16_t *x = xt + kp * Q8_T * 2;
            for (int r = 0; r < Q8_R; r++) {
                int32_t pair;   // w0 w1, repeated: w0 w1 w0 w1 w0 w1 w0 w1
                memcpy(&pair, panel + (kp * Q8_R + r) * 2, 4);
                int16x8_t w = vreinterpretq_s16_s32(vdupq_n_s32(pair));
                for (int v = 0; v < Q8_T / 4; v++) {
                    int16x8_t xv = vld1q_s16(x + 8 * v);   // tokens 4v .. 4v+3, a pair each
                    int32x4_t low = vmull_s16(vget_low_s16(xv), vget_low_s16(w));
                    int32x4_t high = vmull_high_s16(xv, w);
                    sum[r][v] = vaddq_s32(sum[r][v], vpaddq_s32(low, high));
                }
            }
        }
        for (int r = 0; r < Q8_R; r++)
            for (int v = 0; v < Q8_T / 4; v++) {
                float32x4_t d = vmulq_n_f32(vld1q_f32(dx + b * Q8_T + 4 * v), dw[b * Q8_R + r]);
                a[r][v] = vfmaq_f32(a[r][v], d, vcvtq_f32_s32(sum[r][v]));
            }
    }
    for (int r = 0; r < Q8_R; r++)
        for (int v = 0; v < Q8_T / 4; v++) vst1q_f32(&acc[r][4 * v], a[r][v]);
}
#else
static void q8_tile(float acc[Q8_R][Q8_T], const int16_t *panel, const float *dw,
                    const int16_t *xt, const float *dx, size_t cols) {
    float a[Q8_R][Q8_T] = {{0}};
    for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) {
        int32_t sum[Q8_R][Q8_T] = {{0}};
        for (size_t kp = b * LR_Q8_BLOCK / 2; kp < (b + 1) * LR_Q8_BLOCK / 2; kp++) {
            const int16_t *w = panel + kp * Q8_R * 2;
            const int16_t *x = xt + kp * Q8_T * 2;
            for (int r = 0; r < Q8_R; r++)
                for (int j = 0; j < Q8_T; j++)
                    sum[r][j] += w[2 * r] * x[2 * j] + w[2 * r + 1] * x[2 * j + 1];
        }
        for (int r = 0; r < Q8_R; r++)
            for (int j = 0; j < Q8_T; j++)
                a[r][j] += dw[b * Q8_R + r] * dx[b * Q8_T + j] * (float)sum[r][j];
    }
    memcpy(acc, a, sizeof(a));
}
#endif

// The register tile of the blocked float product: acc (MM_R, MM_T) = panel^T @ xt over cols,
// where panel (cols, MM_R) holds MM_R weight rows k-major and xt (cols, MM_T) MM_T tokens of
// the chunk, transposed. Each step of k meets MM_R broadcast weights with MM_T token values
// (three 8-float vectors): MM_R * MM_T sums that stay in registers (15 of the 16 256-bit ones
// of AVX2) for the whole row, 15 multiply-adds per 20 loads where a dot product needs two
// loads per multiply-add, and both operands stream sequentially through the cache. Plain C:
// the compiler vectorizes it. (Measured on SmolLM2 prefill, 2 threads: 5 x 24 318 tokens/s,
// 4 x 24 287, 3 x 24 282, 2 x 48 228.)
static void gemm_tile(float acc[MM_R][MM_T], const float *restrict panel,
                      const float *restrict xt, size_t cols) {
    float a[MM_R][MM_T] = {{0}};
    for (size_t k = 0; k < cols; k++) {
        const float *xk = xt + k * MM_T;
        const float *wk = panel + k * MM_R;
        for (int r = 0; r < MM_R; r++)
            for (int j = 0; j < MM_T; j++) a[r][j] += wk[r] * xk[j];
    }
    memcpy(acc, a, sizeof(a));
}

// Quantize the chunk x (T, cols) per 32-block and pack it Q8_T tokens at a time in k pairs:
// q8_xt (tiles, cols / 2, Q8_T, 2), q8_dx (tiles, blocks, Q8_T); tokens past T are zeros.
static void pack_q8_chunk(const KernelWork *kw, const float *x, size_t T, size_t cols) {
    size_t blocks = cols / LR_Q8_BLOCK;
    size_t tiles = (T + Q8_T - 1) / Q8_T;
    PARALLEL_FOR
    for (size_t t = 0; t < T; t++)
        quantize_activations(kw->qx + t * cols, kw->dx + t * blocks, x + t * cols, cols);
    PARALLEL_FOR
    for (size_t tile = 0; tile < tiles; tile++) {
        int16_t *xt = kw->q8_xt + tile * Q8_T * cols;
        for (int j = 0; j < Q8_T; j++) {
            size_t t = tile * Q8_T + j;
            for (size_t kp = 0; kp < cols / 2; kp++)   // k pair kp: columns 2 kp, 2 kp + 1
                for (int i = 0; i < 2; i++)
                    xt[(kp * Q8_T + j) * 2 + i] = t < T ? kw->qx[t * cols + 2 * kp + i] : 0;
            for (size_t b = 0; b < blocks; b++)
                kw->q8_dx[(tile * blocks + b) * Q8_T + j] = t < T ? kw->dx[t * blocks + b] : 0;
        }
    }
}

// Pack rows p*Q8_R .. of q8_0 w into this thread's panel (cols / 2, Q8_R, 2) and its scales
// dw (blocks, Q8_R); rows past the end are zeros. Returns the rows that exist.
static int pack_q8_panel(int16_t *panel, float *dw, const Tensor *w, size_t p) {
    size_t cols = w->cols;
    int nr = (int)min_size(w->rows - p * Q8_R, Q8_R);
    for (int r = 0; r < Q8_R; r++) {
        const float *scale = NULL;
        const int8_t *qw = r < nr ? q8_row(w, p * Q8_R + r, &scale) : NULL;
        for (size_t kp = 0; kp < cols / 2; kp++)
            for (int i = 0; i < 2; i++) panel[(kp * Q8_R + r) * 2 + i] = qw ? qw[2 * kp + i] : 0;
        for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++) dw[b * Q8_R + r] = qw ? scale[b] : 0;
    }
    return nr;
}

// matmul() for q8_0 weights: x is quantized once (quantize_activations); decode is a q8_dot
// per weight row, a chunk the blocked product with q8_tile as its register tile, each panel of
// Q8_R rows packed once per chunk.
static void matmul_q8(float *out, const float *x, const Tensor *w, int T, const KernelWork *kw) {
    size_t rows = w->rows;
    size_t cols = w->cols;
    size_t blocks = cols / LR_Q8_BLOCK;
    if (T == 1) {   // one row is quantized faster than threads start
        quantize_activations(kw->qx, kw->dx, x, cols);
        PARALLEL_FOR
        for (size_t r = 0; r < rows; r++) {
            const float *dw;
            const int8_t *qw = q8_row(w, r, &dw);
            out[r] = q8_dot(qw, dw, kw->qx, kw->dx, cols);
        }
        return;
    }
    size_t n = (size_t)T;
    size_t tiles = (n + Q8_T - 1) / Q8_T;
    size_t panels = (rows + Q8_R - 1) / Q8_R;
    pack_q8_chunk(kw, x, n, cols);
    PARALLEL_FOR
    for (size_t p = 0; p < panels; p++) {
        int16_t *panel = kw->q8_panel + (size_t)thread_id() * cols * Q8_R;
        float *dw = kw->q8_dw + (size_t)thread_id() * blocks * Q8_R;
        int nr = pack_q8_panel(panel, dw, w, p);
        float acc[Q8_R][Q8_T];
        for (size_t tile = 0; tile < tiles; tile++) {
            q8_tile(acc, panel, dw, kw->q8_xt + tile * Q8_T * cols,
                    kw->q8_dx + tile * blocks * Q8_T, cols);
            size_t t_end = min_size(n, (tile + 1) * Q8_T);
            for (size_t t = tile * Q8_T; t < t_end; t++)
                for (int r = 0; r < nr; r++)
                    out[t * rows + p * Q8_R + r] = acc[r][t - tile * Q8_T];
        }
    }
}

// out (T, w.rows) = x (T, w.cols) @ w^T, as matmul_reference() (which sums in double: the two
// differ by float summation order, ~1e-7 relative, and for q8_0 by the activations' rounding
// to int16 steps, ~1e-4). Decode (T = 1) is dot() per weight row, at the speed memory delivers
// the weights. A chunk is the blocked product: each panel of MM_R weight rows is converted to
// floats and packed once per chunk, then meets the transposed chunk MM_T tokens at a time in
// gemm_tile(). q8_0 weights take the integer path, matmul_q8().
static void matmul(float *out, const float *x, const Tensor *w, int T, KernelWork *kw) {
    if (w->dtype == DT_Q8_0) {
        matmul_q8(out, x, w, T, kw);
        return;
    }
    size_t rows = w->rows;
    size_t cols = w->cols;
    if (T == 1) {
        PARALLEL_FOR
        for (size_t r = 0; r < rows; r++)
            out[r] = dot(weight_row(w, r, kw->row + (size_t)thread_id() * cols), x, cols);
        return;
    }
    size_t stride = round_up((size_t)T, MM_T);
    size_t panels = (rows + MM_R - 1) / MM_R;
    PARALLEL_FOR
    for (size_t t0 = 0; t0 < stride; t0 += MM_T)   // xt (stride / MM_T, cols, MM_T): 0 past T
        for (size_t k = 0; k < cols; k++)
            for (size_t t = t0; t < t0 + MM_T; t++)
                kw->xt[t0 * cols + k * MM_T + t - t0] = t < (size_t)T ? x[t * cols + k] : 0;
    PARALLEL_FOR
    for (size_t p = 0; p < panels; p++) {
        float *panel = kw->panel + (size_t)thread_id() * cols * MM_R;   // (cols, MM_R)
        float *row_buf = kw->row + (size_t)thread_id() * cols;
        int nr = (int)min_size(rows - p * MM_R, MM_R);
        for (int r = 0; r < MM_R; r++) {   // rows past the end are zeros
            const float *wr = r < nr ? weight_row(w, p * MM_R + r, row_buf) : NULL;
            for (size_t k = 0; k < cols; k++) panel[k * MM_R + r] = wr ? wr[k] : 0;
        }
        float acc[MM_R][MM_T];
        for (int t0 = 0; t0 < T; t0 += MM_T) {
            gemm_tile(acc, panel, kw->xt + (size_t)t0 * cols, cols);
            for (int t = t0; t < min_int(T, t0 + MM_T); t++)
                for (int r = 0; r < nr; r++) out[(size_t)t * rows + p * MM_R + r] = acc[r][t - t0];
        }
    }
}

// ----------------------------------------------------------------------------
// Attention: attention() = attention_reference()
//
// attention_reference() stores a query's whole row of scores, then its softmax, and walks the
// keys once per query head. The kernels never store a row: an online softmax (Milakov &
// Gimelshein 2018) keeps per query the running max m, the sum l of e^(s - m) and the weighted
// sum of values, rescaled by e^(m_old - m_new) when m grows. A chunk's queries meet each block
// of keys together (FlashAttention, Dao et al. 2022), so a key is read once per tile of
// queries, not once per query; one decoded token splits its keys across the threads
// (Flash-Decoding). The sums are the same; their order differs (~1e-6 in the logits).

// y[k] = e^x[k] for the ATT_QT values of a tile, as plain arithmetic the compiler vectorizes
// (libm's expf is a call per value): e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2
// (ln 2 in two parts, for exactness), e^r by Cephes' degree-7 polynomial; relative error about
// 1e-7. x < -87 (-inf: a masked score) gives 0; a NaN stays NaN (and never reaches the int).
WIDE_VECTORS static void exp_tile(float *restrict y, const float *restrict x) {
    float p[ATT_QT];
    float scale[ATT_QT];
    int32_t bits[ATT_QT];
    for (int k = 0; k < ATT_QT; k++) {
        float c = min_float(max_float(x[k], -87.0f), 88.0f);   // NaN fails both tests: -87
        float n = floorf(c * 1.44269504f + 0.5f);
        float r = c - n * 0.693359375f + n * 2.12194440e-4f;
        float q = 1.9875691500e-4f;
        q = q * r + 1.3981999507e-3f;
        q = q * r + 8.3334519073e-3f;
        q = q * r + 4.1665795894e-2f;
        q = q * r + 1.6666665459e-1f;
        q = q * r + 5.0000001201e-1f;
        p[k] = q * r * r + r + 1.0f;
        bits[k] = ((int32_t)n + 127) << 23;   // 2^n: a float's exponent field
    }
    memcpy(scale, bits, sizeof(scale));
    for (int k = 0; k < ATT_QT; k++)
        y[k] = x[k] < -87.0f ? 0.0f : x[k] == x[k] ? p[k] * scale[k] : x[k];
}

// s[j][k] = q_k . key_j for ATT_KS keys and the ATT_QT queries of a tile, qt (H, ATT_QT): each
// key element meets all queries at once (a SIMD loop over k), and ATT_KS keys give the
// processor independent sums to overlap.
WIDE_VECTORS static void tile_scores(float *restrict s, const float *restrict qt,
                                     const float *const *keys, int H) {
    float acc[ATT_KS][ATT_QT] = {{0}};
    for (int i = 0; i < H; i++)
        for (int j = 0; j < ATT_KS; j++) {
            float x = keys[j][i];
            SIMD
            for (int k = 0; k < ATT_QT; k++) acc[j][k] += x * qt[i * ATT_QT + k];
        }
    memcpy(s, acc, sizeof(acc));
}

// acc (H, ATT_QT) += values^T @ e, over the nk keys of a block: e (nk, ATT_QT) the softmax
// weights, values[j] the value row (H) of key j. Like tile_scores, each value element meets the
// tile's queries at once, and 4 channels at a time stay in registers while the block streams.
WIDE_VECTORS static void tile_values(float *restrict acc, const float *restrict e,
                                     const float *const *values, int nk, int H) {
    int i0 = 0;
    for (; i0 + 4 <= H; i0 += 4) {
        float a[4][ATT_QT];
        memcpy(a, acc + (size_t)i0 * ATT_QT, sizeof(a));
        for (int j = 0; j < nk; j++)
            for (int ii = 0; ii < 4; ii++) {
                float v = values[j][i0 + ii];
                SIMD
                for (int k = 0; k < ATT_QT; k++) a[ii][k] += v * e[j * ATT_QT + k];
            }
        memcpy(acc + (size_t)i0 * ATT_QT, a, sizeof(a));
    }
    for (; i0 < H; i0++)   // channels past the last multiple of 4
        for (int j = 0; j < nk; j++)
            for (int k = 0; k < ATT_QT; k++)
                acc[(size_t)i0 * ATT_QT + k] += values[j][i0] * e[j * ATT_QT + k];
}

// A tile's online-softmax state: per query the running max m and sum l, and acc (H, ATT_QT).
typedef struct {
    float m[ATT_QT], l[ATT_QT];
    float *acc;
    float *s;   // (ATT_KB, ATT_QT) the block's scores, then weights
} Tile;

// Fold a block of nk keys into the tile, query qt (H, ATT_QT): query k sees keys first[k] ..
// last[k] of the block (none if last < first). keys[] has ATT_KS entries past nk (repeats).
WIDE_VECTORS static void tile_block(Tile *t, const float *qt, const float *const *keys,
                                    const float *const *values, int nk, const int *first,
                                    const int *last, float scale, int H) {
    float m_new[ATT_QT];
    float rescale[ATT_QT];
    float diff[ATT_QT];
    float *s = t->s;
    for (int j = 0; j < nk; j += ATT_KS) tile_scores(s + (size_t)j * ATT_QT, qt, keys + j, H);
    for (int k = 0; k < ATT_QT; k++) m_new[k] = t->m[k];
    for (int j = 0; j < nk; j++)   // scale, mask (causal, window, sinks), and the block's max
        for (int k = 0; k < ATT_QT; k++) {
            float x = s[j * ATT_QT + k] * scale;
            x = j >= first[k] && j <= last[k] ? x : -INFINITY;
            s[j * ATT_QT + k] = x;
            m_new[k] = max_float(x, m_new[k]);
        }
    for (int k = 0; k < ATT_QT; k++) {   // a query with nothing visible yet keeps m = -inf
        m_new[k] = m_new[k] == -INFINITY ? 0 : m_new[k];
        diff[k] = t->m[k] - m_new[k];
    }
    exp_tile(rescale, diff);
    for (int k = 0; k < ATT_QT; k++) t->l[k] *= rescale[k];
    for (int j = 0; j < nk; j++) {   // weights e^(s - m_new), masked keys 0
        float *sj = s + (size_t)j * ATT_QT;
        for (int k = 0; k < ATT_QT; k++) diff[k] = sj[k] - m_new[k];
        exp_tile(sj, diff);
        for (int k = 0; k < ATT_QT; k++) t->l[k] += sj[k];
    }
    for (int i = 0; i < H; i++)
        for (int k = 0; k < ATT_QT; k++) t->acc[(size_t)i * ATT_QT + k] *= rescale[k];
    for (int k = 0; k < ATT_QT; k++) t->m[k] = t->l[k] > 0 ? m_new[k] : -INFINITY;
    tile_values(t->acc, s, values, nk, H);
}

// Decode attention over a block of keys: s[j] = scale * q . keys[j]. AVX2 scores four keys at
// a time, so four sums are in flight.
#if HAVE_AVX2
static void decode_scores(float *s, const float *q, const float *const *keys, int nk, int H,
                          float scale) {
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        __m256 acc[4];
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= H; i += 8) {
            __m256 qi = _mm256_loadu_ps(q + i);
            for (int r = 0; r < 4; r++)
                acc[r] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(keys[j + r] + i), acc[r]);
        }
        for (int r = 0; r < 4; r++) {
            float sum = hsum8(acc[r]);
            for (int t = i; t < H; t++) sum += q[t] * keys[j + r][t];
            s[j + r] = sum * scale;
        }
    }
    for (; j < nk; j++) s[j] = dot(q, keys[j], (size_t)H) * scale;
}
#else
static void decode_scores(float *s, const float *q, const float *const *keys, int nk, int H,
                          float scale) {
    for (int j = 0; j < nk; j++) s[j] = dot(q, keys[j], (size_t)H) * scale;
}
#endif

// acc (H) += sum_j w[j] values[j] over a block of keys. AVX2 holds 64 channels in registers
// while the block's values stream past.
#if HAVE_AVX2
static void decode_values(float *acc, const float *w, const float *const *values, int nk, int H) {
    int i0 = 0;
    for (; i0 + 64 <= H; i0 += 64) {
        __m256 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm256_loadu_ps(acc + i0 + 8 * c);
        for (int j = 0; j < nk; j++) {
            __m256 wj = _mm256_set1_ps(w[j]);
            for (int c = 0; c < 8; c++)
                a[c] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(values[j] + i0 + 8 * c), a[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(acc + i0 + 8 * c, a[c]);
    }
    for (; i0 + 8 <= H; i0 += 8) {
        __m256 a = _mm256_loadu_ps(acc + i0);
        for (int j = 0; j < nk; j++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(values[j] + i0), a);
        _mm256_storeu_ps(acc + i0, a);
    }
    for (; i0 < H; i0++)
        for (int j = 0; j < nk; j++) acc[i0] += w[j] * values[j][i0];
}
#else
static void decode_values(float *acc, const float *w, const float *const *values, int nk, int H) {
    for (int j = 0; j < nk; j++)
        for (int i = 0; i < H; i++) acc[i] += w[j] * values[j][i];
}
#endif

// One decode range's online softmax for the group's query heads: fold the nk keys of a block
// into (m, l, acc) of each head; q (group, H): the group's queries, rotated as these keys need.
// s: (ATT_KB) scratch.
static void decode_block(float *m, float *l, float *acc, const float *q,
                         const float *const *keys, const float *const *values, int nk,
                         int group, int H, float *s) {
    float scale = 1.0f / sqrtf((float)H);
    for (int h = 0; h < group; h++) {
        size_t at = (size_t)h * H;
        decode_scores(s, q + at, keys, nk, H, scale);
        float m_new = m[h];
        for (int j = 0; j < nk; j++) m_new = max_float(s[j], m_new);
        for (int j0 = 0; j0 < nk; j0 += ATT_QT) {   // e^(s - m_new), ATT_QT at a time
            float x[ATT_QT];
            for (int k = 0; k < ATT_QT; k++) x[k] = j0 + k < nk ? s[j0 + k] - m_new : -INFINITY;
            exp_tile(s + j0, x);
        }
        float rescale = expf(m[h] - m_new);
        float *a = acc + (size_t)h * H;
        for (int i = 0; i < H; i++) a[i] *= rescale;
        float sum = 0;
        for (int j = 0; j < nk; j++) sum += s[j];
        decode_values(a, s, values, nk, H);
        l[h] = l[h] * rescale + sum;
        m[h] = m_new;
    }
}

// Merge the ranges of each head: m = max m_r, l = sum_r l_r e^(m_r - m),
// out = sum_r acc_r e^(m_r - m) / l. parts: (n_kv_heads, ATT_RANGES, group, H + 2).
static void decode_merge(float *out, const float *parts, size_t ranges, const Config *c) {
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    size_t part_floats = (size_t)group * (H + 2);
    for (int h = 0; h < c->n_heads; h++) {
        int hh = h % group;
        const float *first = parts + (size_t)(h / group) * ATT_RANGES * part_floats;
        float m_all = -INFINITY;
        float l_all = 0;
        float *oh = out + (size_t)h * H;
        for (size_t r = 0; r < ranges; r++) m_all = max_float(first[r * part_floats + hh], m_all);
        memset(oh, 0, (size_t)H * sizeof(float));
        for (size_t r = 0; r < ranges; r++) {
            const float *part = first + r * part_floats;
            float w = expf(part[hh] - m_all);
            l_all += part[group + hh] * w;
            for (int i = 0; i < H; i++) oh[i] += part[2 * group + (size_t)hh * H + i] * w;
        }
        for (int i = 0; i < H; i++) oh[i] /= l_all;
    }
}

// Kv head g's rows i0 .. i0+n-1 of a chunk's memory list (mk), placed as chunk_memory() left
// them.
static void read_memory(const MemoryKeys *mk, int g, size_t i0, int n, int H, const float **keys,
                        const float **values) {
    size_t first = (size_t)g * mk->stride + i0;
    for (int j = 0; j < n; j++) {
        keys[j] = mk->keys + (first + (size_t)j) * H;
        values[j] = mk->values + (first + (size_t)j) * H;
    }
}

// The keys a decoded token sees through kv head g, numbered in three segments: its sinks
// (visible_keys()), then with a context memory its retrieved positions, then its window
// lo .. pos. Each segment meets the query rotated for it.
typedef struct {
    VisibleKeys vis;
    const MemoryKeys *mk;   // or NULL
    size_t n_mem;           // memory positions: all of kv head g's list (the chunk is this token)
    size_t n_keys;          // n_sink + n_mem + the window's
} DecodeKeys;

static DecodeKeys decode_keys(const KVCache *kv, const MemoryKeys *mk, int layer, int g,
                              size_t pos) {
    DecodeKeys d = {.vis = visible_keys(kv, layer, pos), .mk = mk};
    d.n_mem = mk ? mk->n[g] : 0;
    d.n_keys = d.vis.n_sink + d.n_mem + (pos - d.vis.lo + 1);
    return d;
}

// Where key j's segment ends.
static size_t segment_end(const DecodeKeys *d, size_t j) {
    if (j < d->vis.n_sink) return d->vis.n_sink;
    if (j < d->vis.n_sink + d->n_mem) return d->vis.n_sink + d->n_mem;
    return d->n_keys;
}

// Keys j0 .. j0+n-1 of d, within one segment, as float rows; returns the offset of that
// segment's queries: 0 for the window's q, 1 for the sinks' q_sink, 2 for the memory's q_mem.
static int read_decode_keys(const DecodeKeys *d, const KVCache *kv, int layer, int g, size_t j0,
                            int n, const float **keys, const float **values, float *kbuf,
                            float *vbuf) {
    size_t n_sink = d->vis.n_sink;
    if (j0 < n_sink) {
        read_sinks(kv, layer, j0, n, g, keys, values);
        return 1;
    }
    if (j0 < n_sink + d->n_mem) {
        read_memory(d->mk, g, j0 - n_sink, n, kv->head_dim, keys, values);
        return 2;
    }
    size_t p0 = d->vis.lo + (j0 - n_sink - d->n_mem);
    read_positions(kv, layer, p0, n, g, keys, values, kbuf, vbuf);
    return 0;
}

// One decoded token at pos against its visible keys: Flash-Decoding (Dao et al. 2023,
// "Flash-Decoding for long-context inference"). A tile of ATT_QT queries would hold only the
// group's few heads, and the n_kv_heads jobs would leave threads idle, so instead the keys it
// sees (decode_keys(): sinks, memory, window) are cut into ranges of at least ATT_SPLIT keys;
// each job (kv head g, range r) keeps its own online softmax per head of the group, partial
// (m_r, l_r, acc_r), and decode_merge() joins them exactly. A range meets its keys ATT_KB at a
// time, a block never crossing a segment: scores, one max, then weights and values.
static void attention_decode(float *out, const float *q, const float *q_sink, const KVCache *kv,
                             const MemoryKeys *mk, int layer, const Config *c, size_t pos,
                             KernelWork *kw) {
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    size_t most_keys = 0;   // kv heads retrieve different memory positions
    for (int g = 0; g < c->n_kv_heads; g++)
        most_keys = max_size(decode_keys(kv, mk, layer, g, pos).n_keys, most_keys);
    size_t ranges = min_size((most_keys + ATT_SPLIT - 1) / ATT_SPLIT, ATT_RANGES);
    size_t per_range = (most_keys + ranges - 1) / ranges;
    size_t part_floats = (size_t)group * (H + 2);
    PARALLEL_FOR
    for (int job = 0; job < c->n_kv_heads * (int)ranges; job++) {
        int g = job / (int)ranges;
        size_t range = (size_t)(job % (int)ranges);
        DecodeKeys d = decode_keys(kv, mk, layer, g, pos);
        size_t j0 = range * per_range;
        size_t j1 = min_size(j0 + per_range, d.n_keys);
        float *kbuf = kw->att + (size_t)thread_id() * ATT_WORK(H);   // (ATT_KB, H) keys in f32
        float *vbuf = kbuf + (size_t)ATT_KB * H;                     // (ATT_KB, H) values
        float *s = vbuf + (size_t)ATT_KB * H;                        // (ATT_KB) scores
        float *part = kw->parts + ((size_t)g * ATT_RANGES + range) * part_floats;
        float *m = part;
        float *l = part + group;
        float *acc = part + 2 * group;   // (group, H)
        for (int h = 0; h < group; h++) {
            m[h] = -INFINITY;
            l[h] = 0;
        }
        memset(acc, 0, (size_t)group * H * sizeof(float));
        const float *keys[ATT_KB], *values[ATT_KB];
        size_t at = (size_t)g * group * H;   // the group's first query head
        const float *queries[3] = { q + at, q_sink + at, mk ? mk->q_mem + at : NULL };
        for (size_t b0 = j0; b0 < j1; ) {
            int nk = (int)min_size(min_size(j1, segment_end(&d, b0)) - b0, ATT_KB);
            int which = read_decode_keys(&d, kv, layer, g, b0, nk, keys, values, kbuf, vbuf);
            decode_block(m, l, acc, queries[which], keys, values, nk, group, H, s);
            b0 += (size_t)nk;
        }
    }
    decode_merge(out, kw->parts, ranges, c);
}

// What the queries of one attention tile are: ATT_QT queries that share kv head g (the
// group's heads over several rows; padding repeats the last), their positions, the first
// position each may see, and how much of the chunk's memory list each sees.
typedef struct {
    int64_t pos[ATT_QT];
    int64_t lo[ATT_QT];      // first visible position
    int64_t n_sink[ATT_QT];  // sinks below the window
    int64_t n_mem[ATT_QT];   // memory positions below the window: a prefix of kv head g's list
    size_t lo_all, hi_all;   // the union of the positions the tile's queries see
    size_t n_mem_all;        // the longest of those prefixes
} TileQueries;

// The tile's queries (T, q_dim each) as they are rotated for the window, the sinks and the
// memory; transposed into qt, qs and qm (H, ATT_QT) by load_tile().
typedef struct {
    const float *q, *q_sink, *q_mem;
    float *qt, *qs, *qm;
} TileInputs;

// Query k of the tile: row at of src, into column k of dst (H, ATT_QT).
static void load_column(float *dst, const float *src, size_t at, int k, int H) {
    for (int i = 0; i < H; i++) dst[i * ATT_QT + k] = src[at + i];
}

// Load queries first .. first+nq-1 of kv head g (query index qi: row qi / group, head
// g * group + qi % group), transposed, with the sink and memory rotations each needs.
static TileQueries load_tile(const TileInputs *in, const KVCache *kv, const MemoryKeys *mk,
                             int layer, const Config *c, int g, int first, int nq, size_t pos0) {
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    TileQueries tq = {.lo_all = SIZE_MAX, .hi_all = 0, .n_mem_all = 0};
    int has_sinks = kv->layers[layer].n_sink > 0;   // else q_sink is never read
    const size_t *mem_pos = mk ? mk->pos + (size_t)g * mk->stride : NULL;
    size_t mem_n = mk ? mk->n[g] : 0;
    for (int k = 0; k < ATT_QT; k++) {
        int qi = first + min_int(k, nq - 1);
        int t = qi / group;
        int h = g * group + qi % group;
        size_t at = (size_t)t * c->q_dim + (size_t)h * H;
        load_column(in->qt, in->q, at, k, H);
        if (has_sinks) load_column(in->qs, in->q_sink, at, k, H);
        if (mk) load_column(in->qm, in->q_mem, at, k, H);
        VisibleKeys vis = visible_keys(kv, layer, pos0 + (size_t)t);
        size_t n_mem = 0;
        while (n_mem < mem_n && mem_pos[n_mem] < vis.lo) n_mem++;
        tq.pos[k] = (int64_t)vis.pos;
        tq.lo[k] = (int64_t)vis.lo;
        tq.n_sink[k] = (int64_t)vis.n_sink;
        tq.n_mem[k] = (int64_t)n_mem;
        tq.lo_all = min_size(vis.lo, tq.lo_all);
        tq.hi_all = max_size(vis.pos, tq.hi_all);
        tq.n_mem_all = max_size(n_mem, tq.n_mem_all);
    }
    return tq;
}

// One tile of a chunk's queries against the keys: the sinks first (query k sees sink j iff
// j < tq.n_sink[k]), then the memory (query k sees the first tq.n_mem[k] of kv head g's list),
// then blocks of ATT_KB positions that start at multiples of ATT_KB, so a query meets the same
// blocks however a text is cut into chunks of 2 or more.
static void attention_tile(Tile *tile, const TileInputs *in, const TileQueries *tq,
                           const KVCache *kv, const MemoryKeys *mk, int layer, int g, float *kbuf,
                           float *vbuf) {
    int H = kv->head_dim;
    float scale = 1.0f / sqrtf((float)H);
    int n_sink = (int)kv->layers[layer].n_sink;
    const float *keys[ATT_KB + ATT_KS], *values[ATT_KB];
    int first_key[ATT_QT], last_key[ATT_QT];   // what each query sees of a block (j)
    for (int j0 = 0; j0 < n_sink; j0 += ATT_KB) {
        int nk = min_int(n_sink - j0, ATT_KB);
        read_sinks(kv, layer, (size_t)j0, nk, g, keys, values);
        for (int j = nk; j < nk + ATT_KS; j++) keys[j] = keys[nk - 1];   // past the end: unused
        for (int k = 0; k < ATT_QT; k++) {
            first_key[k] = 0;
            last_key[k] = (int)tq->n_sink[k] - 1 - j0;
        }
        tile_block(tile, in->qs, keys, values, nk, first_key, last_key, scale, H);
    }
    for (size_t j0 = 0; j0 < tq->n_mem_all; j0 += ATT_KB) {
        int nk = (int)min_size(tq->n_mem_all - j0, ATT_KB);
        read_memory(mk, g, j0, nk, H, keys, values);
        for (int j = nk; j < nk + ATT_KS; j++) keys[j] = keys[nk - 1];
        for (int k = 0; k < ATT_QT; k++) {
            first_key[k] = 0;
            last_key[k] = (int)(tq->n_mem[k] - (int64_t)j0) - 1;
        }
        tile_block(tile, in->qm, keys, values, nk, first_key, last_key, scale, H);
    }
    for (int64_t p0 = (int64_t)(tq->lo_all / ATT_KB * ATT_KB); p0 <= (int64_t)tq->hi_all;
         p0 += ATT_KB) {
        int nk = (int)min_size(tq->hi_all + 1 - (size_t)p0, ATT_KB);
        read_positions(kv, layer, (size_t)p0, nk, g, keys, values, kbuf, vbuf);
        for (int j = nk; j < nk + ATT_KS; j++) keys[j] = keys[nk - 1];
        for (int k = 0; k < ATT_QT; k++) {
            first_key[k] = tq->lo[k] > p0 ? (int)(tq->lo[k] - p0) : 0;
            last_key[k] = tq->pos[k] - p0 < nk ? (int)(tq->pos[k] - p0) : nk - 1;   // -1: none
        }
        tile_block(tile, in->qt, keys, values, nk, first_key, last_key, scale, H);
    }
}

// Attention of a chunk of T queries (T, q_dim) at positions pos0.. against one layer's cache,
// whose slots already hold this chunk's keys and values; out: (T, q_dim). q_sink: the queries
// rotated to meet the sinks. mk: the chunk's context memory (attention_memory()'s keys), or
// NULL. One row (decode) goes to attention_decode(); a chunk is cut into tiles of ATT_QT
// queries that share a kv head, one job each.
static void attention(float *out, const float *q, const float *q_sink, const KVCache *kv,
                      const MemoryKeys *mk, int layer, const Config *c, int T, size_t pos0,
                      KernelWork *kw) {
    if (T == 1) {
        attention_decode(out, q, q_sink, kv, mk, layer, c, pos0, kw);
        return;
    }
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    int n_q = T * group;   // queries per kv head
    int tiles = (n_q + ATT_QT - 1) / ATT_QT;
    PARALLEL_FOR
    for (int job = 0; job < c->n_kv_heads * tiles; job++) {
        int g = job / tiles;
        int first = job % tiles * ATT_QT;
        int nq = min_int(n_q - first, ATT_QT);
        TileInputs in = {.q = q, .q_sink = q_sink, .q_mem = mk ? mk->q_mem : NULL};
        in.qt = kw->att + (size_t)thread_id() * ATT_WORK(H);   // (H, ATT_QT) queries
        in.qs = in.qt + (size_t)H * ATT_QT;                    // (H, ATT_QT) sink queries
        in.qm = in.qs + (size_t)H * ATT_QT;                    // (H, ATT_QT) memory queries
        float *kbuf = in.qm + (size_t)H * ATT_QT;              // (ATT_KB, H) keys in f32
        float *vbuf = kbuf + (size_t)ATT_KB * H;                   // (ATT_KB, H) values
        Tile tile = {.acc = vbuf + (size_t)ATT_KB * H};
        tile.s = tile.acc + (size_t)H * ATT_QT;
        for (int k = 0; k < ATT_QT; k++) {
            tile.m[k] = -INFINITY;
            tile.l[k] = 0;
        }
        memset(tile.acc, 0, (size_t)H * ATT_QT * sizeof(float));
        TileQueries tq = load_tile(&in, kv, mk, layer, c, g, first, nq, pos0);
        attention_tile(&tile, &in, &tq, kv, mk, layer, g, kbuf, vbuf);
        for (int k = 0; k < nq; k++) {
            int qi = first + k;
            int t = qi / group;
            int h = g * group + qi % group;
            float *oh = out + (size_t)t * c->q_dim + (size_t)h * H;
            float inv = 1.0f / tile.l[k];
            for (int i = 0; i < H; i++) oh[i] = tile.acc[(size_t)i * ATT_QT + k] * inv;
        }
    }
}
