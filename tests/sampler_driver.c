// sampler_driver.c - a test harness around run.c's sampler (not part of ./run).
//
//   cc -std=c11 -Wall -Wextra -Werror -O2 -o sampler_driver tests/sampler_driver.c -lm
//
// Reads whitespace-separated numbers from stdin:
//   V
//   temperature top_k top_p min_p repeat_penalty repeat_last_n seed
//   n_recent  id_1 ... id_n_recent        (fed to sampler_accept, in order)
//   logit_0 ... logit_{V-1}
//   N                                     (draws)
// and prints the N sampled ids, one per line. Each draw samples from a fresh copy of the
// logits (sample() overwrites them); the sampler's state (RNG, recent tokens) carries over.
#define main longrun_main
#include "../run.c"
#undef main

static void bad_input(const char *what) {
    fprintf(stderr, "sampler_driver: bad input: %s\n", what);
    exit(1);
}

int main(void) {
    int V, n_recent, n_draws;
    Sampler sp = {0};
    unsigned long long seed;
    if (scanf("%d", &V) != 1 || V <= 0) bad_input("V");
    if (scanf("%f %d %f %f %f %d %llu", &sp.temperature, &sp.top_k, &sp.top_p, &sp.min_p, &sp.repeat_penalty,
              &sp.repeat_last_n, &seed) != 7)
        bad_input("settings");
    build_sampler(&sp, V, (uint64_t)seed);
    if (scanf("%d", &n_recent) != 1 || n_recent < 0) bad_input("n_recent");
    for (int i = 0; i < n_recent; i++) {
        int id;
        if (scanf("%d", &id) != 1 || id < 0 || id >= V) bad_input("recent id");
        sampler_accept(&sp, id);
    }
    float *logits = xcalloc((size_t)V, sizeof(float), "logits");
    float *work = xcalloc((size_t)V, sizeof(float), "logits");
    for (int i = 0; i < V; i++)
        if (scanf("%f", &logits[i]) != 1) bad_input("logit");
    if (scanf("%d", &n_draws) != 1 || n_draws < 0) bad_input("N");
    for (int d = 0; d < n_draws; d++) {
        memcpy(work, logits, (size_t)V * sizeof(float));
        int id = sample(&sp, work, V);
        if (id < 0 || id >= V) {
            fprintf(stderr, "sampler_driver: sample() returned %d, outside [0, %d)\n", id, V);
            return 3;
        }
        printf("%d\n", id);
    }
    free(logits);
    free(work);
    free_sampler(&sp);
    return 0;
}
