// memory_driver.c - a test harness around run.c's context memory (not part of ./run): stores
// keys through memory_write() and memory_bounds(), then runs one chunk's memory_select(), and
// prints what tests/test_memory.py recomputes with numpy.
//
//   cc -std=c11 -Wall -Wextra -Werror -O1 -o memory_driver tests/memory_driver.c -lm
//   ./memory_driver TYPE N_KV GROUP H B K N_SINK W N T STEP < keys_and_queries
//
// TYPE: f32, f16 or q8 (the cache's type); N_KV kv heads of GROUP query heads each, head_dim H;
// blocks of B, K retrieved; --sinks N_SINK --window W. Stdin: N keys (N_KV * H floats each,
// positions 0 .. N-1, written STEP positions per memory_bounds() call, as chunks do), then the
// last chunk's T query rows q_mem (N_KV * GROUP * H floats each; positions N-T .. N-1). The
// keys are written twice, as a text that goes back does (passkey's next trial): first with
// rows of +-1000 past N/2, then again from N/2 + 1 with the given keys, so a block's bounds
// must not keep what the first pass left.
// Output, one record a line (%.9g):
//   stored P  the kv_dim floats of position P's key as stored (kv_head(): dequantized)
//   bounds B G S  block B's scale S for kv head G, then its H maxima and H minima in steps of S
//   score G B S  Quest's bound of block B for kv head G's mean queries (summed over the group)
//   single T Q B S  the bound of block B for query row T's head Q alone
//   chosen G  the blocks memory_select() retrieved for kv head G, ascending
//
// --memory-score infllm (InfLLM's representative tokens), two more ways to call it:
//   ./memory_driver infllm TYPE N_KV GROUP H B K N_SINK W N T R < keys_and_queries
//     the whole chunk loop on one layer, chunks of T, R representatives per block. Stdin: N
//     keys (kv_dim floats each), then N rows each of q, q_sink and q_mem (q_dim floats each:
//     all of q, then all of q_sink, then all of q_mem). RoPE is left out (keys and queries as
//     given); values are 0. Per chunk C (positions C*T ..):
//       chosen C G  blocks     what memory_select() retrieved for kv head G
//       score C G B S          the chunk's score of eligible block B for kv head G
//       tscore C Q P S         s_Q(P) after the chunk's attention, for the positions the ring holds
//       complete C N           blocks 0 .. N-1 have their representatives
//     then  repr B Q  H floats  every complete block's representative for query head Q.
//   ./memory_driver represent TYPE N_KV GROUP H B K N_SINK W N T R < keys_and_scores
//     block_represent() alone on N keys and given token scores (N_KV * GROUP rows of N floats
//     after the keys; needs W >= N, so the ring holds them all): repr lines for the blocks
//     N_SINK / B .. N / B - 1.
#define main longrun_main
#include "../run.c"
#undef main

typedef struct {
    int n_kv, group, H, B, K, n_sink, W, N, T, step;
    KVType type;
} Setup;

static int parse_setup(int argc, char **argv, Setup *s) {
    if (argc != 12) return 0;
    s->type = KV_COUNT;
    for (int t = 0; t < KV_COUNT; t++)
        if (!strcmp(argv[1], kv_type_names[t])) s->type = (KVType)t;
    int *fields[] = { &s->n_kv, &s->group, &s->H, &s->B, &s->K, &s->n_sink, &s->W, &s->N,
                      &s->T, &s->step };
    for (int i = 0; i < 10; i++) *fields[i] = atoi(argv[2 + i]);
    return s->type != KV_COUNT && s->n_kv > 0 && s->group > 0 && s->H > 0 && s->B > 0 &&
           s->K >= 0 && s->W > 0 && s->T > 0 && s->T <= s->N && s->step > 0;
}

static float *read_floats(size_t n) {
    float *x = xcalloc(n, sizeof(float), "input");
    for (size_t i = 0; i < n; i++)
        if (scanf("%f", &x[i]) != 1) die("stdin ended after %zu of %zu floats", i, n);
    return x;
}

// The scores the chunk's selection ranks: chunk_score() of the group's mean query rows (the
// mean as memory_select() takes it, then split_queries()), for the eligible blocks.
static void print_scores(const ContextMemory *m, const KVCache *kv, const Config *c,
                         const float *q_mem, const Setup *s) {
    const MemoryLayer *ml = &m->layers[0];
    VisibleKeys last = visible_keys(kv, 0, (size_t)s->N - 1);
    size_t first = kv->layers[0].n_sink / m->block;
    size_t end = last.lo > kv->layers[0].n_sink ? (last.lo - 1) / m->block + 1 : first;
    float *mean = xcalloc((size_t)s->group * s->H, sizeof(float), "mean");
    float *split = xcalloc(2 * (size_t)s->H, sizeof(float), "split");
    for (int g = 0; g < s->n_kv; g++) {
        memset(mean, 0, (size_t)s->group * s->H * sizeof(float));
        for (int t = 0; t < s->T; t++)
            for (int i = 0; i < s->group * s->H; i++)
                mean[i] += q_mem[(size_t)t * c->q_dim + (size_t)g * s->group * s->H + i] / s->T;
        split_queries(mean, s->group, s->H, split, split + s->H);
        for (size_t b = first; b < end; b++) {
            float score = chunk_score(m, ml, kv, b, g, s->group, mean, split);
            printf("score %d %zu %.9g\n", g, b, score);
        }
    }
    free(split);
    free(mean);
}

// The stored keys, every block's bounds, and each single query head's bound of every block.
static void print_store(const ContextMemory *m, const KVCache *kv, const Config *c,
                        const float *q_mem, const Setup *s) {
    const MemoryLayer *ml = &m->layers[0];
    float *buf = xcalloc(2 * (size_t)s->H, sizeof(float), "buf");
    for (int p = 0; p < s->N; p++) {
        printf("stored %d", p);
        for (int g = 0; g < s->n_kv; g++) {
            const float *key = memory_row(kv, ml->key, (size_t)p, g, buf);
            for (int i = 0; i < s->H; i++) printf(" %.9g", key[i]);
        }
        printf("\n");
    }
    int n_blocks = (s->N + s->B - 1) / s->B;
    for (int b = 0; b < n_blocks; b++)
        for (int g = 0; g < s->n_kv; g++) {
            size_t at = (size_t)b * s->n_kv + g;
            const int8_t *codes = ml->bounds + at * 2 * s->H;
            printf("bounds %d %d %.9g", b, g, ml->bound_scale[at]);
            for (int i = 0; i < 2 * s->H; i++) printf(" %d", codes[i]);
            printf("\n");
        }
    for (int t = 0; t < s->T; t++)
        for (int h = 0; h < c->n_heads; h++)
            for (int b = 0; b < n_blocks; b++) {
                const float *q = q_mem + (size_t)t * c->q_dim + (size_t)h * s->H;
                split_queries(q, 1, s->H, buf, buf + s->H);
                float score = bound_score(ml, kv, (size_t)b, h / s->group, buf);
                printf("single %d %d %d %.9g\n", t, h, b, score);
            }
    free(buf);
}

// ---- --memory-score infllm

// A one-layer cache of the setup's windows and sinks (chunks of T, context N) and a memory on it
// with InfLLM's scores, R representatives.
static ContextMemory *infllm_setup(const Setup *s, int R, Config *c, LayerConfig *lc,
                                   KVCache *kv) {
    *c = (Config){.n_heads = s->n_kv * s->group, .n_kv_heads = s->n_kv, .head_dim = s->H,
                  .n_layers = 1, .layers = lc};
    c->q_dim = c->n_heads * s->H;
    c->kv_dim = s->n_kv * s->H;
    AttnOptions a = {.n_sink = s->n_sink, .window = s->W, .kv_type = s->type};
    build_cache(kv, c, &a, (size_t)s->N, s->T);
    ContextMemory *m = new_memory(kv, s->B, s->K, 0);
    memory_use_infllm(m, kv, c->n_heads, R);
    memory_reserve(m, kv, 0, (size_t)s->N);
    return m;
}

// One chunk's record lines: the scores of the eligible blocks (from the mean q_mem rows) and
// the chosen blocks, before its attention.
static void print_chunk_choice(const ContextMemory *m, const KVCache *kv, const Config *c,
                               const float *q_mem, int chunk, int T, size_t pos0) {
    const MemoryLayer *ml = &m->layers[0];
    int group = c->n_heads / c->n_kv_heads;
    VisibleKeys last = visible_keys(kv, 0, pos0 + (size_t)T - 1);
    size_t first = kv->layers[0].n_sink / m->block;
    size_t end = last.lo > kv->layers[0].n_sink ? (last.lo - 1) / m->block + 1 : first;
    end = min_size(end, ml->n_complete);
    float *mean = xcalloc((size_t)group * c->head_dim, sizeof(float), "mean");
    for (int g = 0; g < c->n_kv_heads; g++) {
        memset(mean, 0, (size_t)group * c->head_dim * sizeof(float));
        for (int t = 0; t < T; t++)
            for (int i = 0; i < group * c->head_dim; i++)
                mean[i] += q_mem[(size_t)t * c->q_dim + (size_t)g * group * c->head_dim + i] / T;
        for (size_t b = first; b < end; b++) {
            float score = chunk_score(m, ml, kv, b, g, group, mean, NULL);   // infllm: no split
            printf("score %d %d %zu %.9g\n", chunk, g, b, score);
        }
        printf("chosen %d %d", chunk, g);
        for (int i = 0; i < ml->n_chosen[g]; i++)
            printf(" %d", ml->chosen[(size_t)g * m->top_k + i]);
        printf("\n");
    }
    free(mean);
}

static void print_repr(const ContextMemory *m, const Config *c, size_t from, size_t to) {
    for (size_t b = from; b < to; b++)
        for (int h = 0; h < c->n_heads; h++) {
            printf("repr %zu %d", b, h);
            for (int i = 0; i < c->head_dim; i++)
                printf(" %.9g", m->layers[0].repr[(b * c->n_heads + h) * c->head_dim + i]);
            printf("\n");
        }
}

// The chunk loop as forward() runs it on one layer (rotate_and_cache() without RoPE, then
// attend()), printing what each chunk chose and the token scores after it. Twice over the same
// text, as passkey's trials go, and only the second pass printed: it must not see the first's.
static void run_infllm(const Setup *s, int R) {
    Config c;
    LayerConfig lc = {0};
    KVCache kv = {0};
    ContextMemory *m = infllm_setup(s, R, &c, &lc, &kv);
    float *keys = read_floats((size_t)s->N * c.kv_dim);
    float *q = read_floats((size_t)s->N * c.q_dim * 3);   // q, then q_sink, then q_mem
    float *k = xcalloc((size_t)c.kv_dim, sizeof(float), "k");
    float *zero = xcalloc((size_t)c.kv_dim, sizeof(float), "values");
    float *out = xcalloc((size_t)s->T * c.q_dim, sizeof(float), "out");
    LayerRope none = {0};   // rotary_dim 0: no rotation
    size_t rows = (size_t)s->N * c.q_dim;
    for (int step = 0; step < 2 * ((s->N + s->T - 1) / s->T); step++) {
        int chunk = step % ((s->N + s->T - 1) / s->T);
        int quiet = step == chunk;   // the first pass
        size_t p0 = (size_t)chunk * s->T;
        int n = min_int(s->T, s->N - (int)p0);
        for (size_t p = p0; p < p0 + (size_t)n; p++) {
            memcpy(k, keys + p * c.kv_dim, c.kv_dim * sizeof(float));
            memory_write(m, &kv, 0, p, k, zero);
            kv_write(&kv, 0, p, k, zero, &none);
        }
        memory_bounds(m, &kv, 0, p0, (size_t)n, out);
        const float *qc = q + p0 * c.q_dim;
        memory_select(m, &kv, 0, qc + 2 * rows, &c, n, p0);
        if (!quiet) print_chunk_choice(m, &kv, &c, qc + 2 * rows, chunk, n, p0);
        attention_memory(out, qc, qc + rows, qc + 2 * rows, &kv, m, &none, 0, &c, n, p0);
        if (quiet) continue;
        const MemoryLayer *ml = &m->layers[0];
        size_t end = p0 + (size_t)n;
        for (int h = 0; h < c.n_heads; h++)
            for (size_t p = end - min_size(end, ml->score_ring); p < end; p++)
                printf("tscore %d %d %zu %.9g\n", chunk, h,
                       p, ml->token_score[(size_t)h * ml->score_ring + p % ml->score_ring]);
        printf("complete %d %zu\n", chunk, ml->n_complete);
    }
    print_repr(m, &c, (size_t)s->n_sink / s->B, m->layers[0].n_complete);
    void *buffers[] = { keys, q, k, zero, out };
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    free_memory(m, 1);
    free_cache(&kv);
}

// block_represent() on given keys and token scores.
static void run_represent(const Setup *s, int R) {
    Config c;
    LayerConfig lc = {0};
    KVCache kv = {0};
    ContextMemory *m = infllm_setup(s, R, &c, &lc, &kv);
    MemoryLayer *ml = &m->layers[0];
    if (ml->score_ring < (size_t)s->N) die("represent: needs W >= N");
    float *keys = read_floats((size_t)s->N * c.kv_dim);
    float *scores = read_floats((size_t)c.n_heads * s->N);
    float *zero = xcalloc((size_t)c.kv_dim, sizeof(float), "values");
    float *buf = xcalloc((size_t)s->H, sizeof(float), "buf");
    for (int p = 0; p < s->N; p++) {
        memory_write(m, &kv, 0, (size_t)p, keys + (size_t)p * c.kv_dim, zero);
        for (int h = 0; h < c.n_heads; h++)
            ml->token_score[(size_t)h * ml->score_ring + p] = scores[(size_t)h * s->N + p];
    }
    for (int b = s->n_sink / s->B; b < s->N / s->B; b++) block_represent(m, &kv, 0, (size_t)b, buf);
    print_repr(m, &c, (size_t)s->n_sink / s->B, (size_t)(s->N / s->B));
    void *buffers[] = { keys, scores, zero, buf };
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    free_memory(m, 1);
    free_cache(&kv);
}

int main(int argc, char **argv) {
    if (argc == 13 && (!strcmp(argv[1], "infllm") || !strcmp(argv[1], "represent"))) {
        Setup s;
        int R = atoi(argv[12]);
        argv[12] = "1";   // parse_setup()'s STEP
        if (!parse_setup(argc - 1, argv + 1, &s) || R < 1 || R > s.B) {
            fprintf(stderr, "usage: memory_driver infllm|represent f32|f16|q8 N_KV GROUP H B K "
                    "N_SINK W N T R\n");
            return 2;
        }
        if (!strcmp(argv[1], "infllm")) run_infllm(&s, R);
        else run_represent(&s, R);
        return 0;
    }
    Setup s;
    if (!parse_setup(argc, argv, &s)) {
        fprintf(stderr, "usage: memory_driver f32|f16|q8 N_KV GROUP H B K N_SINK W N T STEP\n");
        return 2;
    }
    Config c = {.n_heads = s.n_kv * s.group, .n_kv_heads = s.n_kv, .head_dim = s.H};
    c.q_dim = c.n_heads * s.H;
    c.kv_dim = s.n_kv * s.H;
    LayerSlots slots = {.n_sink = (size_t)s.n_sink, .window = (size_t)s.W};
    KVCache kv = {.type = s.type, .n_kv_heads = s.n_kv, .head_dim = s.H,
                  .kv_dim = (size_t)c.kv_dim, .layers = &slots, .n_layers = 1};
    kv.row_bytes = kv_row_bytes(s.type, kv.kv_dim, s.n_kv);
    float *keys = read_floats((size_t)s.N * kv.kv_dim);
    float *q_mem = read_floats((size_t)s.T * c.q_dim);
    float *zero = xcalloc(kv.kv_dim, sizeof(float), "values");
    float *buf = xcalloc((size_t)s.H, sizeof(float), "buf");
    float *garbage = xcalloc(kv.kv_dim, sizeof(float), "garbage");
    for (size_t i = 0; i < kv.kv_dim; i++) garbage[i] = i % 2 ? 1000 : -1000;
    ContextMemory *m = new_memory(&kv, s.B, s.K, 0);
    for (int pass = 0; pass < 2; pass++)
        for (int p0 = pass ? s.N / 2 + 1 : 0; p0 < s.N; p0 += s.step) {   // a chunk at a time
            int n = min_int(s.step, s.N - p0);
            memory_reserve(m, &kv, 0, (size_t)(p0 + n));
            for (int p = p0; p < p0 + n; p++) {
                const float *key = keys + (size_t)p * kv.kv_dim;
                memory_write(m, &kv, 0, (size_t)p, pass == 0 && p > s.N / 2 ? garbage : key, zero);
            }
            memory_bounds(m, &kv, 0, (size_t)p0, (size_t)n, buf);
        }
    memory_select(m, &kv, 0, q_mem, &c, s.T, (size_t)(s.N - s.T));
    print_store(m, &kv, &c, q_mem, &s);
    print_scores(m, &kv, &c, q_mem, &s);
    for (int g = 0; g < s.n_kv; g++) {
        printf("chosen %d", g);
        for (int i = 0; i < m->layers[0].n_chosen[g]; i++)
            printf(" %d", m->layers[0].chosen[(size_t)g * s.K + i]);
        printf("\n");
    }
    free_memory(m, 1);
    free(keys);
    free(q_mem);
    free(zero);
    free(garbage);
    free(buf);
    return 0;
}
