// fuzz_sample.c - the sampler: logits and options -> one token id. The first 16 bytes choose the
// options, across the whole range the command line allows and its edges (temperature 0 and
// 1e-45, top-k 0 and 1, top-p 1e-6, min-p 1, penalties 1e-3 and 1e3); the rest are raw float32
// logits, any bit pattern (NaN, inf, subnormals), V = their count. sample() must return an id in
// [0, V) or refuse the logits with an error (die(): here a jump back), twice in a row (the
// random state and the recent tokens carry over).
#include "fuzz.h"

// One of a few edge values, or a value spread over [lo, hi], from two bytes.
static float pick(const uint8_t *b, const float *edges, int n_edges, float lo, float hi) {
    unsigned v = b[0] | (unsigned)b[1] << 8;
    if (v % 4 == 0) return edges[(v / 4) % n_edges];
    return lo + (hi - lo) * (float)(v / 4) / 16383.0f;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 16 + 4) return 0;
    static const float temperatures[] = {0, 1e-45f, 1e-38f, 1e-3f, 1, 100};
    static const float top_ps[] = {1e-6f, 0.5f, 0.95f, 1};
    static const float min_ps[] = {0, 0.05f, 1};
    static const float penalties[] = {1e-3f, 1, 1.3f, 1e3f};
    Sampler sp = {.temperature = pick(data, temperatures, 6, 0, 100),
                  .top_k = data[2] % 4 == 0 ? 0 : data[2] % 4 == 1 ? 1 : data[3],
                  .top_p = pick(data + 4, top_ps, 4, 1e-6f, 1),
                  .min_p = pick(data + 6, min_ps, 3, 0, 1),
                  .repeat_penalty = pick(data + 8, penalties, 4, 1e-3f, 1e3f),
                  .repeat_last_n = data[10] % 8 == 0 ? 0 : data[10]};
    int V = (int)((size - 16) / 4);
    float *logits = malloc((size_t)V * sizeof(float));
    memcpy(logits, data + 16, (size_t)V * sizeof(float));
    build_sampler(&sp, V, data[11] | (uint64_t)data[12] << 8);
    for (int i = 0; i < data[13] % 64; i++) sampler_accept(&sp, (data[14] + 7 * i) % V);
    float *work = malloc((size_t)V * sizeof(float));
    if (!setjmp(fuzz_escape)) {
        for (int draw = 0; draw < 2; draw++) {
            memcpy(work, logits, (size_t)V * sizeof(float));
            int id = sample(&sp, work, V);
            if (id < 0 || id >= V) abort();
            sampler_accept(&sp, id);
        }
    }
    free(work);
    free(logits);
    free_sampler(&sp);
    return 0;
}
