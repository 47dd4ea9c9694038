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
// last chunk's T query rows q_mem (N_KV * GROUP * H floats each; positions N-T .. N-1).
// Output, one record a line (%.9g):
//   stored P  the kv_dim floats of position P's key as stored (kv_head(): dequantized)
//   bounds B G  H maxima, then H minima of block B, kv head G
//   score G B S  Quest's bound of block B for kv head G's mean queries (summed over the group)
//   single T Q B S  the bound of block B for query row T's head Q alone
//   chosen G  the blocks memory_select() retrieved for kv head G, ascending
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

// The scores the chunk's selection ranks: block_score() of each head's mean query row (the
// mean as memory_select() takes it), summed over the group, for the eligible blocks.
static void print_scores(const ContextMemory *m, const KVCache *kv, const Config *c,
                         const float *q_mem, const Setup *s) {
    const MemoryLayer *ml = &m->layers[0];
    VisibleKeys last = visible_keys(kv, 0, (size_t)s->N - 1);
    size_t first = kv->layers[0].n_sink / m->block;
    size_t end = last.lo > kv->layers[0].n_sink ? (last.lo - 1) / m->block + 1 : first;
    float *mean = xcalloc((size_t)s->group * s->H, sizeof(float), "mean");
    for (int g = 0; g < s->n_kv; g++) {
        memset(mean, 0, (size_t)s->group * s->H * sizeof(float));
        for (int t = 0; t < s->T; t++)
            for (int i = 0; i < s->group * s->H; i++)
                mean[i] += q_mem[(size_t)t * c->q_dim + (size_t)g * s->group * s->H + i] / s->T;
        for (size_t b = first; b < end; b++) {
            float score = 0;
            for (int h = 0; h < s->group; h++) score += block_score(ml, kv, b, g, mean + h * s->H);
            printf("score %d %zu %.9g\n", g, b, score);
        }
    }
    free(mean);
}

// The stored keys, every block's bounds, and each single query head's bound of every block.
static void print_store(const ContextMemory *m, const KVCache *kv, const Config *c,
                        const float *q_mem, const Setup *s) {
    const MemoryLayer *ml = &m->layers[0];
    float *buf = xcalloc((size_t)s->H, sizeof(float), "buf");
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
            const float *at = ml->key_max + (size_t)b * kv->kv_dim + (size_t)g * s->H;
            printf("bounds %d %d", b, g);
            for (int i = 0; i < s->H; i++) printf(" %.9g", at[i]);
            at = ml->key_min + (size_t)b * kv->kv_dim + (size_t)g * s->H;
            for (int i = 0; i < s->H; i++) printf(" %.9g", at[i]);
            printf("\n");
        }
    for (int t = 0; t < s->T; t++)
        for (int h = 0; h < c->n_heads; h++)
            for (int b = 0; b < n_blocks; b++) {
                const float *q = q_mem + (size_t)t * c->q_dim + (size_t)h * s->H;
                float score = block_score(ml, kv, (size_t)b, h / s->group, q);
                printf("single %d %d %d %.9g\n", t, h, b, score);
            }
    free(buf);
}

int main(int argc, char **argv) {
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
    ContextMemory *m = new_memory(&kv, s.B, s.K, 0);
    for (int p0 = 0; p0 < s.N; p0 += s.step) {   // as forward() does, a chunk at a time
        int n = min_int(s.step, s.N - p0);
        memory_reserve(m, &kv, 0, (size_t)(p0 + n));
        for (int p = p0; p < p0 + n; p++)
            memory_write(m, &kv, 0, (size_t)p, keys + (size_t)p * kv.kv_dim, zero);
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
    free(buf);
    return 0;
}
