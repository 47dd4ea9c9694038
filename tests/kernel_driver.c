// kernel_driver.c - run.c's fast kernels against plain double-precision references, on random
// shapes that are not multiples of their blocks (matmul's MM_R x MM_T and Q8_R x Q8_T register
// tiles and q8_0's 32-value blocks; attention's ATT_QT x ATT_KB tiles and decode's ATT_SPLIT-key ranges).
// Weights are drawn exactly representable in every dtype (k / 64 with |k| <= 127, and q8_0
// scales of exactly 1/64), so each reference uses the drawn values themselves, not run.c's
// dequantization. Prints the worst relative error per case; exits 1 if one exceeds 1e-5.
//
//   cc -O2 -std=c11 -fopenmp -o kernel_driver tests/kernel_driver.c -lm && ./kernel_driver
#define main run_main
#include "../run.c"
#undef main

static uint64_t rng = 7;
static int irand(int n) { return (int)(random_f32(&rng) * n); }
static int failures = 0;

static void report(const char *what, double err) {
    printf("%-58s max rel err %.2e\n", what, err);
    if (!(err <= 1e-5)) failures++;
}

// A (rows, cols) weight of dtype: the values w[] (k / 64) stored as model.h lays them out.
static Tensor make_weight(DType dt, size_t rows, size_t cols, const float *w) {
    size_t n = rows * cols;
    uint8_t *data = calloc(tensor_bytes(dt, rows, cols, "w"), 1);
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &w[i], 4);
        if (dt == DT_F32) memcpy(data + 4 * i, &w[i], 4);
        if (dt == DT_F16) { uint16_t h = f32_to_f16(w[i]); memcpy(data + 2 * i, &h, 2); }
        if (dt == DT_BF16) { uint16_t h = (uint16_t)(bits >> 16); memcpy(data + 2 * i, &h, 2); }
        if (dt == DT_Q8_0) data[i] = (uint8_t)(int8_t)lrintf(w[i] * 64);
    }
    if (dt == DT_Q8_0)
        for (size_t b = 0; b < n / LR_Q8_BLOCK; b++) { float d = 1.0f / 64; memcpy(data + n + 4 * b, &d, 4); }
    return (Tensor){data, dt, rows, cols};
}

// What q8_0 weights meet: x rounded to run.c's activation blocks, q = round(x * ACT_MAX /
// max|x|) in each 32-block, times max|x| / ACT_MAX (quantize_activations' rule, so the kernels
// are checked on their sums, packing and scales, not on the rounding).
static void round_activations(float *xr, const float *x, size_t n) {
    for (size_t b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fabsf(x[b * 32 + i]) > amax ? fabsf(x[b * 32 + i]) : amax;
        float inv = amax > 0 ? ACT_MAX / amax : 0;
        for (int i = 0; i < 32; i++) xr[b * 32 + i] = (float)((double)lrintf(x[b * 32 + i] * inv) * (amax / ACT_MAX));
    }
}

static void check_matmul(DType dt, size_t rows, size_t cols, int T) {
    float *w = malloc(rows * cols * sizeof(float)), *x = malloc((size_t)T * cols * sizeof(float));
    float *xr = malloc((size_t)T * cols * sizeof(float)), *out = malloc((size_t)T * rows * sizeof(float));
    for (size_t i = 0; i < rows * cols; i++) w[i] = (irand(255) - 127) / 64.0f;
    for (size_t i = 0; i < (size_t)T * cols; i++) x[i] = random_f32(&rng) * 2 - 1;
    if (dt == DT_Q8_0) round_activations(xr, x, (size_t)T * cols);
    else memcpy(xr, x, (size_t)T * cols * sizeof(float));
    Tensor t = make_weight(dt, rows, cols, w);
    KernelWork *kw = new_kernel_work(cols, T, 8, 1);
    matmul(out, x, &t, T, kw);
    double worst = 0;
    for (int tk = 0; tk < T; tk++)
        for (size_t r = 0; r < rows; r++) {
            double ref = 0, mag = 0;
            for (size_t k = 0; k < cols; k++) ref += (double)w[r * cols + k] * xr[(size_t)tk * cols + k],
                                              mag += fabs((double)w[r * cols + k] * xr[(size_t)tk * cols + k]);
            double e = fabs(out[(size_t)tk * rows + r] - ref) / (mag > 0 ? mag : 1);
            worst = e > worst ? e : worst;
        }
    char what[96];
    snprintf(what, sizeof(what), "matmul %-4s %3zu x %4zu, T = %d", dtype_name(dt), rows, cols, T);
    report(what, worst);
    free(w), free(x), free(xr), free(out), free((void *)t.data);
    free_kernel_work(kw);
}

// Attention of T queries at pos0.. over keys 0 .. pos0+T-1 in one layer (full, or a window),
// f32 cache: run.c's tiles (T >= 2) or decode ranges (T = 1) against softmax(q.k / sqrt(H)) v.
static void check_attention(KVType kt, int H, int n_heads, int n_kv_heads, size_t window, size_t pos0, int T) {
    LayerConfig lc = {.attn_kind = window ? ATTN_SLIDING : ATTN_FULL, .window = (uint32_t)window};
    Config c = {.n_layers = 1, .head_dim = H, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                .q_dim = n_heads * H, .kv_dim = n_kv_heads * H, .layers = &lc};
    AttnOptions a = {.kv_type = kt};
    KVCache kv = {0};
    size_t n = pos0 + T;
    build_cache(&kv, &c, &a, n, T);
    float *keys = malloc(n * c.kv_dim * sizeof(float)), *values = malloc(n * c.kv_dim * sizeof(float));
    float *q = malloc((size_t)T * c.q_dim * sizeof(float)), *out = malloc((size_t)T * c.q_dim * sizeof(float));
    // k / 64 with |k| <= 127, each head vector holding one 127 / 64: exact in f16, and in q8
    // (whose per-head step is then max / 127 = 1 / 64), so every cache type holds them exactly
    for (size_t i = 0; i < n * c.kv_dim; i++)
        keys[i] = i % H ? (irand(255) - 127) / 64.0f : 127 / 64.0f, values[i] = i % H ? (irand(255) - 127) / 64.0f : -127 / 64.0f;
    for (size_t i = 0; i < (size_t)T * c.q_dim; i++) q[i] = 4 * random_f32(&rng) - 2;
    for (size_t p = 0; p < n; p++) {
        size_t slot = kv_slot(&kv.layers[0], p);
        kv_store(&kv, kv.key + slot * kv.row_bytes, keys + p * c.kv_dim);
        kv_store(&kv, kv.value + slot * kv.row_bytes, values + p * c.kv_dim);
    }
    KernelWork *kw = new_kernel_work(8, T, H, n_heads);
    attention(out, q, q, &kv, NULL, 0, &c, T, pos0, kw);
    double worst = 0, *s = malloc(n * sizeof(double));
    for (int t = 0; t < T; t++)
        for (int h = 0; h < n_heads; h++) {
            const float *qh = q + (size_t)t * c.q_dim + (size_t)h * H;
            size_t pos = pos0 + t, lo = window && pos >= window ? pos - window + 1 : 0, g = h / (n_heads / n_kv_heads);
            double m = -INFINITY, l = 0;
            for (size_t p = lo; p <= pos; p++) {
                s[p] = 0;
                for (int i = 0; i < H; i++) s[p] += (double)qh[i] * keys[p * c.kv_dim + g * H + i];
                s[p] /= sqrt(H);
                m = s[p] > m ? s[p] : m;
            }
            for (size_t p = lo; p <= pos; p++) l += exp(s[p] - m);
            for (int i = 0; i < H; i++) {
                double ref = 0;
                for (size_t p = lo; p <= pos; p++) ref += exp(s[p] - m) / l * values[p * c.kv_dim + g * H + i];
                double e = fabs(out[(size_t)t * c.q_dim + (size_t)h * H + i] - ref);   // values are O(1)
                worst = e > worst ? e : worst;
            }
        }
    char what[96];
    snprintf(what, sizeof(what), "attention %s H %d, %d/%d heads, window %zu, pos %zu, T = %d", kv_type_names[kt], H,
             n_heads, n_kv_heads, window, pos0, T);
    report(what, worst);
    free(keys), free(values), free(q), free(out), free(s);
    free_kernel_work(kw);
    free_cache(&kv);
}

// x[0..n) uniform in [-2, 2).
static void random_fill(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = 4 * random_f32(&rng) - 2;
}

// Random f32 copies for a layer's first n_sink sinks, keys and values.
static void random_sinks(KVCache *kv, long n_sink) {
    random_fill(kv->sink_key, (size_t)n_sink * kv->kv_dim);
    random_fill(kv->sink_value, (size_t)n_sink * kv->kv_dim);
}

// The largest |out[i] - ref[i]| (the outputs are O(1)). A plain comparison, not fmax(): GCC 12
// for AArch64 stops with an internal error vectorizing an fmax reduction at -O3.
static double worst_difference(const float *out, const float *ref, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)out[i] - ref[i]);
        if (d > worst) worst = d;
    }
    return worst;
}

// attention() against attention_reference() on one cache of any type, with sinks (StreamingLLM
// or LM-Infinite's global tokens): both read the same stored rows through the KV cache
// section, so only their summation order differs. Keys, values, queries and the sinks' copies
// are random (not exactly representable: the cache's rounding is the same for both).
static void check_against_reference(KVType kt, int H, int n_heads, int n_kv_heads, size_t window,
                                    long n_sink, int lminf, size_t pos0, int T) {
    LayerConfig lc = {.attn_kind = ATTN_SLIDING, .window = (uint32_t)window};
    Config c = {.n_layers = 1, .head_dim = H, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                .q_dim = n_heads * H, .kv_dim = n_kv_heads * H, .layers = &lc};
    AttnOptions a = {.kv_type = kt, .n_sink = n_sink, .lminf = lminf, .limit = (long)window / 2};
    KVCache kv = {0};
    size_t n = pos0 + T;
    build_cache(&kv, &c, &a, n, T);
    float *row = xcalloc(c.kv_dim, sizeof(float), "row");
    for (size_t p = 0; p < n; p++) {   // positions before the window are stored too: unseen
        size_t slot = kv_slot(&kv.layers[0], p);
        random_fill(row, c.kv_dim);
        kv_store(&kv, kv.key + slot * kv.row_bytes, row);
        random_fill(row, c.kv_dim);
        kv_store(&kv, kv.value + slot * kv.row_bytes, row);
    }
    random_sinks(&kv, n_sink);
    size_t q_floats = (size_t)T * c.q_dim;
    float *q = xcalloc(q_floats, sizeof(float), "q");
    float *q_sink = xcalloc(q_floats, sizeof(float), "q_sink");
    float *out = xcalloc(q_floats, sizeof(float), "out");
    float *ref = xcalloc(q_floats, sizeof(float), "ref");
    random_fill(q, q_floats);
    random_fill(q_sink, q_floats);
    KernelWork *kw = new_kernel_work(8, T, H, n_heads);
    attention(out, q, q_sink, &kv, NULL, 0, &c, T, pos0, kw);
    attention_reference(ref, q, q_sink, &kv, 0, &c, T, pos0);
    double worst = worst_difference(out, ref, q_floats);
    char what[96];
    snprintf(what, sizeof(what), "vs reference %s H %d, %d/%d, W %zu, %s %ld, pos %zu, T = %d",
             kv_type_names[kt], H, n_heads, n_kv_heads, window, lminf ? "global" : "sinks",
             n_sink, pos0, T);
    report(what, worst);
    free(row);
    free(q);
    free(q_sink);
    free(out);
    free(ref);
    free_kernel_work(kw);
    free_cache(&kv);
}

// attention() with a context memory against attention_memory(): random rows in the cache
// and in the memory (all positions, in the cache's type), memory_select() on random queries,
// then both read the same rows, placed by memory_place() with a real rotation and D = W + B + 4
// (the nearest blocks at their distances, the rest moved), so only their summation order
// differs. B, W and pos0 are chosen so blocks straddle the sinks and the windows.
static void check_memory_against_reference(KVType kt, int H, int n_heads, int n_kv_heads,
                                           size_t window, long n_sink, int B, int K, size_t pos0,
                                           int T) {
    LayerConfig lc = {.attn_kind = ATTN_SLIDING, .window = (uint32_t)window};
    Config c = {.n_layers = 1, .head_dim = H, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                .q_dim = n_heads * H, .kv_dim = n_kv_heads * H, .layers = &lc};
    AttnOptions a = {.kv_type = kt, .n_sink = n_sink};
    KVCache kv = {0};
    size_t n = pos0 + T;
    build_cache(&kv, &c, &a, n, T);
    ContextMemory *m = new_memory(&kv, B, K, window + (size_t)B + 4);
    float *inv_freq = xcalloc((size_t)H / 2, sizeof(float), "rope");
    for (int i = 0; i < H / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * (float)i / (float)H);
    LayerRope rope = {.inv_freq = inv_freq, .attn_factor = 1, .rotary_dim = H};
    memory_reserve(m, &kv, 0, n);
    float *k = xcalloc(c.kv_dim, sizeof(float), "row");
    float *v = xcalloc(c.kv_dim, sizeof(float), "row");
    for (size_t p = 0; p < n; p++) {
        random_fill(k, c.kv_dim);
        random_fill(v, c.kv_dim);
        size_t slot = kv_slot(&kv.layers[0], p);
        kv_store(&kv, kv.key + slot * kv.row_bytes, k);
        kv_store(&kv, kv.value + slot * kv.row_bytes, v);
        memory_write(m, &kv, 0, p, k, v);
    }
    memory_bounds(m, &kv, 0, 0, n, k);
    random_sinks(&kv, n_sink);
    size_t q_floats = (size_t)T * c.q_dim;
    float *q = xcalloc(q_floats, sizeof(float), "q");
    float *q_sink = xcalloc(q_floats, sizeof(float), "q_sink");
    float *q_mem = xcalloc(q_floats, sizeof(float), "q_mem");
    float *out = xcalloc(q_floats, sizeof(float), "out");
    float *ref = xcalloc(q_floats, sizeof(float), "ref");
    random_fill(q, q_floats);
    random_fill(q_sink, q_floats);
    random_fill(q_mem, q_floats);
    memory_select(m, &kv, 0, q_mem, &c, T, pos0);
    KernelWork *kw = new_kernel_work(8, T, H, n_heads);
    MemoryKeys mk = chunk_memory(m, &kv, &rope, 0, q_mem, T, pos0);
    attention(out, q, q_sink, &kv, &mk, 0, &c, T, pos0, kw);
    attention_memory(ref, q, q_sink, q_mem, &kv, m, &rope, 0, &c, T, pos0);
    double worst = worst_difference(out, ref, q_floats);
    char what[96];
    snprintf(what, sizeof(what), "memory %s H %d, %d/%d, W %zu, S %ld, B %d K %d, pos %zu, T = %d",
             kv_type_names[kt], H, n_heads, n_kv_heads, window, n_sink, B, K, pos0, T);
    report(what, worst);
    free(k);
    free(v);
    free(q);
    free(q_sink);
    free(q_mem);
    free(out);
    free(ref);
    free(inv_freq);
    free_kernel_work(kw);
    free_memory(m, 1);
    free_cache(&kv);
}

// dot_i8() on n random floats and int8s against the sum in double.
static void check_dot_i8(int n) {
    float *w = malloc(n * sizeof(float));
    int8_t *c = malloc(n);
    double ref = 0, size = 0;
    for (int i = 0; i < n; i++) {
        w[i] = 2 * random_f32(&rng) - 1;
        c[i] = (int8_t)(irand(255) - 127);
        ref += (double)w[i] * c[i];
        size += fabs((double)w[i] * c[i]);
    }
    char what[64];
    snprintf(what, sizeof(what), "dot_i8 n=%d", n);
    report(what, fabs(dot_i8(w, c, n) - ref) / size);
    free(w);
    free(c);
}

int main(void) {
    printf("kernels: %s\n", kernel_set());
    check_dot_i8(128);   // a head of 64: its maxima and minima
    check_dot_i8(16 * (1 + irand(8)) + 1 + irand(15));   // and a part step
    DType dts[] = {DT_F32, DT_F16, DT_BF16, DT_Q8_0};
    for (int d = 0; d < 4; d++) {
        check_matmul(dts[d], 37, 96, 1);     // decode: a dot product per row
        check_matmul(dts[d], 37, 96, 53);    // panels + a part one (MM_R 5, Q8_R 2), token tiles + a part one
        check_matmul(dts[d], 5, 160, 24);    // exactly one tile
        check_matmul(dts[d], 1 + irand(40), 32 * (1 + irand(6)), 2 + irand(70));
    }
    int shapes[][3] = {{40, 6, 2}, {64, 9, 3}, {24, 4, 4}, {72, 8, 1}, {36, 4, 2}};   // head_dim, heads, kv heads
    for (int k = 0; k < 5; k++) {
        int H = shapes[k][0], nh = shapes[k][1], nkv = shapes[k][2];
        check_attention(KV_F32, H, nh, nkv, 0, 0, 1);          // the first token alone
        check_attention(KV_F32, H, nh, nkv, 0, 700, 1);        // decode over 701 keys: 3 ranges
        check_attention(KV_F16, H, nh, nkv, 0, 700, 1);
        check_attention(KV_Q8, H, nh, nkv, 0, 700, 1);
        check_attention(KV_F32, H, nh, nkv, 100, 1000, 1);     // decode through a window
        check_attention(KV_F32, H, nh, nkv, 0, 130, 37);       // a chunk: partial query tiles and key blocks
        check_attention(KV_F16, H, nh, nkv, 0, 130, 37);
        check_attention(KV_F32, H, nh, nkv, 50, 300, 61);      // a chunk through a window
        check_attention(KV_F32, H, nh, nkv, 0, 0, 2 + irand(90));
    }
    KVType kts[] = {KV_F32, KV_F16, KV_Q8};
    for (int k = 0; k < 3; k++) {   // every cache type, sinks and LM-Infinite, tiles and decode
        check_against_reference(kts[k], 40, 6, 2, 48, 4, 0, 300, 1);
        check_against_reference(kts[k], 40, 6, 2, 48, 4, 0, 250, 51);
        check_against_reference(kts[k], 64, 8, 1, 100, 5, 1, 900, 1);
        check_against_reference(kts[k], 64, 8, 1, 100, 5, 1, 600, 37);
        check_against_reference(kts[k], 36, 4, 4, 600, 70, 0, 2000, 1);   // 2 sink blocks
        check_memory_against_reference(kts[k], 40, 6, 2, 48, 4, 20, 3, 300, 1);
        check_memory_against_reference(kts[k], 40, 6, 2, 48, 4, 20, 3, 250, 51);
        check_memory_against_reference(kts[k], 64, 8, 1, 100, 0, 33, 40, 900, 1);   // every block
        check_memory_against_reference(kts[k], 64, 8, 1, 100, 5, 70, 4, 1500, 130);
    }
    printf("%s\n", failures ? "FAILED" : "all within 1e-5");
    return failures ? 1 : 0;
}
