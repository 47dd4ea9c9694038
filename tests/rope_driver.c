// rope_driver.c - a test harness around run.c's rope_frequencies() (not part of ./run).
//
//   cc -std=c11 -Wall -Wextra -Werror -O2 -o rope_driver tests/rope_driver.c -lm
//   ./rope_driver rope_type=3 rotary_dim=128 rope_theta=1e6 factor=4 orig_ctx=32768 seq_len=1
//
// Arguments are key=value: any LayerConfig RoPE field (rope_type, rotary_dim, rope_theta,
// factor, orig_ctx, attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim,
// low_freq_factor, high_freq_factor, yarn_truncate), seq_len (what the dynamic and longrope
// rules see; default orig_ctx), and short=, long= (comma-separated LongRoPE lists). Unset
// fields are 0, except beta_fast 32, beta_slow 1 and yarn_truncate 1 (HF's defaults).
// Prints the attention factor a, then the rotary_dim / 2 inverse frequencies, one per line, %.9g.
#define main longrun_main
#include "../run.c"
#undef main

static void bad_arg(const char *arg) {
    fprintf(stderr, "rope_driver: bad argument '%s'\n", arg);
    exit(2);
}

// "1.5,2,3" -> up to max floats; returns how many.
static int parse_list(const char *s, float *out, int max, const char *arg) {
    int n = 0;
    while (*s) {
        char *end;
        if (n == max) bad_arg(arg);
        out[n++] = strtof(s, &end);
        if (end == s || (*end && *end != ',')) bad_arg(arg);
        s = *end ? end + 1 : end;
    }
    return n;
}

int main(int argc, char **argv) {
    enum { MAX_PAIRS = 1024 };
    static float short_factor[MAX_PAIRS], long_factor[MAX_PAIRS], inv_freq[MAX_PAIRS];
    LayerConfig lc = {.beta_fast = 32, .beta_slow = 1, .yarn_truncate = 1};
    long long seq_len = -1;
    int n_short = 0, n_long = 0;
    for (int i = 1; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        if (!eq) bad_arg(argv[i]);
        size_t klen = (size_t)(eq - argv[i]);
        const char *v = eq + 1;
        char *end = NULL;
#define KEY(name) (klen == strlen(name) && !strncmp(argv[i], name, klen))
        if (KEY("short")) n_short = parse_list(v, short_factor, MAX_PAIRS, argv[i]);
        else if (KEY("long")) n_long = parse_list(v, long_factor, MAX_PAIRS, argv[i]);
        else if (KEY("seq_len")) seq_len = strtoll(v, &end, 10);
        else if (KEY("rope_type")) lc.rope_type = (uint32_t)strtoul(v, &end, 10);
        else if (KEY("rotary_dim")) lc.rotary_dim = (uint32_t)strtoul(v, &end, 10);
        else if (KEY("orig_ctx")) lc.orig_ctx = (uint32_t)strtoul(v, &end, 10);
        else if (KEY("yarn_truncate")) lc.yarn_truncate = (uint32_t)strtoul(v, &end, 10);
        else if (KEY("rope_theta")) lc.rope_theta = strtof(v, &end);
        else if (KEY("factor")) lc.factor = strtof(v, &end);
        else if (KEY("attention_factor")) lc.attention_factor = strtof(v, &end);
        else if (KEY("beta_fast")) lc.beta_fast = strtof(v, &end);
        else if (KEY("beta_slow")) lc.beta_slow = strtof(v, &end);
        else if (KEY("mscale")) lc.mscale = strtof(v, &end);
        else if (KEY("mscale_all_dim")) lc.mscale_all_dim = strtof(v, &end);
        else if (KEY("low_freq_factor")) lc.low_freq_factor = strtof(v, &end);
        else if (KEY("high_freq_factor")) lc.high_freq_factor = strtof(v, &end);
        else bad_arg(argv[i]);
#undef KEY
        if (end && (end == v || *end)) bad_arg(argv[i]);
    }
    int half = (int)lc.rotary_dim / 2;
    if (lc.rope_type >= ROPE_COUNT || half < 1 || half > MAX_PAIRS) bad_arg("rope_type / rotary_dim");
    if (lc.rope_type == ROPE_LONGROPE && (n_short != half || n_long != half))
        bad_arg("short= and long= need rotary_dim / 2 values each");
    if (seq_len < 0) seq_len = lc.orig_ctx;
    float a = rope_frequencies(&lc, n_short ? short_factor : NULL, n_long ? long_factor : NULL, (size_t)seq_len,
                               inv_freq);
    printf("%.9g\n", a);
    for (int i = 0; i < half; i++) printf("%.9g\n", inv_freq[i]);
    return 0;
}
