// unicode_driver.c - tokenizer.c's pre-tokenizers and NFC on their own, without a vocabulary,
// for tests/test_unicode.py (not part of ./run).
//
//   cc -std=c11 -Wall -Wextra -O2 -o unicode_driver tests/unicode_driver.c
//   unicode_driver split gpt2|llama3|qwen2|smollm   UTF-8 on stdin -> the code point index at
//                                                   which each piece starts, as uint32 LE
//   unicode_driver nfc                              UTF-8 on stdin -> its NFC, as UTF-8
#include "../tokenizer.c"

static void fail(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    exit(1);
}

static uint8_t *read_stdin(size_t *n) {
    size_t cap = 1 << 16;
    size_t len = 0;
    uint8_t *buf = malloc(cap);
    for (size_t k; buf && (k = fread(buf + len, 1, cap - len, stdin)) > 0;) {
        len += k;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
    }
    if (!buf) fail("out of memory");
    *n = len;
    return buf;
}

static uint32_t pre_type(const char *name) {
    const char *names[] = { "gpt2", "llama3", "qwen2", "smollm" };
    const uint32_t types[] = { TOK_PRE_GPT2, TOK_PRE_LLAMA3, TOK_PRE_QWEN2, TOK_PRE_SMOLLM };
    for (size_t i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) return types[i];
    fail("unknown pre-tokenizer (gpt2, llama3, qwen2, smollm)");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) fail("usage: unicode_driver split gpt2|llama3|qwen2|smollm | nfc");
    Tokenizer t;
    memset(&t, 0, sizeof(t));
    t.kind = TOK_BYTE_BPE;
    int split = strcmp(argv[1], "split") == 0;
    if (split) {
        if (argc < 3) fail("split needs a pre-tokenizer");
        t.pre = pre_type(argv[2]);
    } else if (strcmp(argv[1], "nfc") == 0) {
        t.flags = TOK_FLAG_NFC;
    } else {
        fail("mode is split or nfc");
    }
    size_t n;
    uint8_t *text = read_stdin(&n);
    if (utf8_valid_prefix((const char *)text, n) < n) fail("input is not valid UTF-8");
    const uint8_t *s = text;
    int oom = 0;
    size_t m = n ? segment_code_points(&t, &s, &n, &oom) : 0;
    if (oom) fail("out of memory");
    if (split) {
        size_t stretch = 0;
        for (size_t i = 0, j; i < m; i = j) {
            j = piece_end(&t, i, m, &stretch);
            uint32_t at = (uint32_t)i;
            fwrite(&at, sizeof(at), 1, stdout);
        }
    } else {
        fwrite(s, 1, n, stdout);
    }
    free(text);
    tokenizer_free(&t);
    return 0;
}
