// tok_driver.c - a test and fuzz harness around tokenizer.c (not part of ./run).
//
//   cc -std=c11 -Wall -Wextra -O2 -o tok_driver tests/tok_driver.c
//   tok_driver MODEL encode [--bos]    stdin bytes -> ids on one line
//   tok_driver MODEL batch             records (u32 len, bytes) on stdin -> for each:
//                                      u32 n, int32 ids[n], u32 m, decoded bytes[m] on stdout
//   tok_driver MODEL decode            ids on stdin -> exact bytes
//   tok_driver MODEL stream            ids on stdin -> the streaming decoder's output
//   tok_driver MODEL bench             encode stdin once, print MB/s
//   tok_driver MODEL fuzz SECONDS SEED random bytes through encode/decode/stream
// MODEL is any longrun file with a tokenizer section (a tokenizer-only file works).
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "../tokenizer.c"

static void fail(const char *msg, const char *arg) {
    fprintf(stderr, "error: %s%s\n", msg, arg ? arg : "");
    exit(1);
}

static uint8_t *read_all(FILE *f, size_t *n) {
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    for (size_t k; buf && (k = fread(buf + len, 1, cap - len, f)) > 0;) {
        len += k;
        if (len == cap) buf = realloc(buf, cap *= 2);
    }
    if (!buf) fail("out of memory", NULL);
    *n = len;
    return buf;
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int *read_ids(size_t *n) {
    size_t len;
    char *text = (char *)read_all(stdin, &len);
    text = realloc(text, len + 1);
    text[len] = 0;
    int *ids = malloc((len / 2 + 1) * sizeof(int));
    size_t k = 0;
    for (char *p = text, *end; (ids[k] = (int)strtol(p, &end, 10)), end != p; p = end) k++;
    free(text);
    *n = k;
    return ids;
}

int main(int argc, char **argv) {
    if (argc < 3) fail("usage: tok_driver MODEL encode|batch|decode|stream|bench|fuzz ...", NULL);
    FILE *f = fopen(argv[1], "rb");
    if (!f) fail("cannot open ", argv[1]);
    size_t size;
    uint8_t *file = read_all(f, &size);
    fclose(f);
    FileHeader h;
    if (size < sizeof(h)) fail("too short: ", argv[1]);
    memcpy(&h, file, sizeof(h));
    if (h.magic != LR_MAGIC || h.tokenizer_size == 0 || h.tokenizer_offset > size || h.tokenizer_size > size - h.tokenizer_offset)
        fail("no valid tokenizer section in ", argv[1]);
    Tokenizer t;
    char err[256];
    if (tokenizer_load(&t, file + h.tokenizer_offset, h.tokenizer_size, err, sizeof(err)) != 0) fail(err, NULL);
    const char *mode = argv[2];

    if (strcmp(mode, "encode") == 0) {
        size_t n;
        uint8_t *text = read_all(stdin, &n);
        int *ids;
        size_t k = tokenizer_encode(&t, (char *)text, n, argc > 3 && strcmp(argv[3], "--bos") == 0, &ids);
        for (size_t i = 0; i < k; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids), free(text);
    } else if (strcmp(mode, "batch") == 0) {
        size_t n, pos = 0;
        uint8_t *in = read_all(stdin, &n);
        while (pos + 4 <= n) {
            uint32_t len;
            memcpy(&len, in + pos, 4);
            pos += 4;
            if (len > n - pos) fail("truncated batch record", NULL);
            int *ids;
            char *back;
            uint32_t k = tokenizer_encode(&t, (char *)in + pos, len, 0, &ids);
            uint32_t m = tokenizer_decode(&t, ids, k, &back);
            fwrite(&k, 4, 1, stdout), fwrite(ids, 4, k, stdout);
            fwrite(&m, 4, 1, stdout), fwrite(back, 1, m, stdout);
            free(ids), free(back);
            pos += len;
        }
        free(in);
    } else if (strcmp(mode, "decode") == 0 || strcmp(mode, "stream") == 0) {
        size_t n;
        int *ids = read_ids(&n);
        if (mode[0] == 'd') {
            char *out;
            size_t m = tokenizer_decode(&t, ids, n, &out);
            fwrite(out, 1, m, stdout);
            free(out);
        } else {
            TokenStream s;
            tokenizer_stream_init(&s, &t, 1);
            for (size_t i = 0; i < n; i++) tokenizer_stream_put(&s, ids[i], stdout);
            tokenizer_stream_flush(&s, stdout);
        }
        free(ids);
    } else if (strcmp(mode, "bench") == 0) {
        size_t n;
        uint8_t *text = read_all(stdin, &n);
        int *ids;
        double best = 1e9;
        size_t k = 0;
        for (int rep = 0; rep < 3; rep++) {  // a fresh tokenizer each time: no warm word cache
            Tokenizer fresh;
            tokenizer_load(&fresh, file + h.tokenizer_offset, h.tokenizer_size, err, sizeof(err));
            double t0 = seconds();
            k = tokenizer_encode(&fresh, (char *)text, n, 0, &ids);
            double dt = seconds() - t0;
            if (dt < best) best = dt;
            free(ids);
            tokenizer_free(&fresh);
        }
        printf("%zu bytes %zu tokens %.4f s %.2f MB/s\n", n, k, best, n / best / 1e6);
        free(text);
    } else if (strcmp(mode, "fuzz") == 0 && argc >= 5) {
        double limit = atof(argv[3]), t0 = seconds();
        uint64_t rng = strtoull(argv[4], NULL, 10) * 2654435761u + 1;
        FILE *null = fopen("/dev/null", "w");
        size_t execs = 0, bytes = 0;
        uint8_t buf[4096];
        while (seconds() - t0 < limit) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t len = rng % (execs % 64 == 0 ? sizeof(buf) : 64);
            for (size_t i = 0; i < len; i++) {
                rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
                uint8_t b = rng >> 24;
                // a mix: raw bytes, ASCII words and spaces, UTF-8 lead/continuation bytes
                buf[i] = (rng & 3) == 0 ? b : (rng & 3) == 1 ? " a1\n'<|>\t"[b % 9] : (rng & 3) == 2 ? 0x80 | (b & 0x3F) : 0xC0 | (b & 0x3F);
            }
            if (execs % 16 == 0 && t.special_start[256] > 0) {  // splice in a special token
                size_t plen, at = len ? rng % len : 0;
                const uint8_t *p = piece_bytes(&t, t.specials[rng % t.special_start[256]], &plen);
                if (at + plen <= sizeof(buf)) memcpy(buf + at, p, plen), len = len > at + plen ? len : at + plen;
            }
            int *ids;
            char *back;
            size_t k = tokenizer_encode(&t, (char *)buf, len, (int)(rng & 1), &ids);
            if (!ids) fail("encode failed", NULL);
            for (size_t i = 0; i < k; i++)
                if (ids[i] < 0 || ids[i] >= (int)t.n_tokens) fail("id out of range", NULL);
            tokenizer_decode(&t, ids, k, &back);
            TokenStream s;
            tokenizer_stream_init(&s, &t, 1);
            for (size_t i = 0; i < k; i++) tokenizer_stream_put(&s, ids[i], null);
            tokenizer_stream_put(&s, (int)(rng % (t.n_tokens + 2)) - 1, null);
            tokenizer_stream_flush(&s, null);
            free(ids), free(back);
            execs++, bytes += len;
        }
        printf("fuzz: %zu execs, %zu bytes in %.1f s\n", execs, bytes, seconds() - t0);
        fclose(null);
    } else {
        fail("unknown mode ", mode);
    }
    tokenizer_free(&t);
    free(file);
    return 0;
}
