// fuzz_text.c - arbitrary bytes through one fixed tokenizer (the file named by
// $LONGRUN_FUZZ_TOKENIZER, any longrun file with a tokenizer section). The first byte picks:
//   even  the rest is text: encode, decode, stream-decode; a byte-level BPE must give the text
//         back exactly when it is valid UTF-8 (its pieces are bytes; nothing is normalised)
//   odd   the rest is token ids (2 bytes each, modulo the vocabulary): decode and stream-decode
#include "fuzz.h"

static Tokenizer tok;
static ModelFile file;

static void load_once(void) {
    const char *path = getenv("LONGRUN_FUZZ_TOKENIZER");
    if (!path) { fputs("set LONGRUN_FUZZ_TOKENIZER to a longrun file with a tokenizer\n", stderr); abort(); }
    if (setjmp(fuzz_escape) || !(open_model_file(&file, path), load_tokenizer(&tok, &file, path))) {
        fprintf(stderr, "%s: no tokenizer loaded\n", path);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static FILE *sink;
    if (!sink) load_once(), sink = fopen("/dev/null", "w");
    if (size == 0) return 0;
    int V = tokenizer_vocab_size(&tok), *ids = NULL;
    const char *text = (const char *)data + 1;
    size_t n, len = size - 1;
    if (data[0] % 2 == 0) {
        n = tokenizer_encode(&tok, text, len, 0, &ids);
        if (!ids) abort();
        for (size_t i = 0; i < n; i++) if (ids[i] < 0 || ids[i] >= V) abort();
    } else {
        n = len / 2;
        ids = malloc((n + 1) * sizeof(int));
        for (size_t i = 0; i < n; i++) ids[i] = (data[1 + 2 * i] | data[2 + 2 * i] << 8) % V;
    }
    char *back;
    size_t back_len = tokenizer_decode(&tok, ids, n, &back);
    if (data[0] % 2 == 0 && tok.kind == TOK_BYTE_BPE && !(tok.flags & TOK_FLAG_NFC) && utf8_valid_prefix(text, len) == len
        && (back_len != len || memcmp(back, text, len)))
        abort();   // encode then decode lost or changed bytes
    TokenStream s;
    tokenizer_stream_init(&s, &tok, 1);
    for (size_t i = 0; i < n; i++) tokenizer_stream_put(&s, ids[i], sink);
    tokenizer_stream_flush(&s, sink);
    free(ids), free(back);
    return 0;
}
