// fuzz_tokenizer.c - a tokenizer section, as bytes, through tokenizer_load; one that loads then
// encodes a text with spaces, digits, a special token and invalid UTF-8, and decodes every id in
// its vocabulary, whole and through the streaming decoder.
#include "fuzz.h"

static const char SAMPLE[] = "Hello  world 123 <|im_start|>user\n\xC3\xA9t\xC3\xA9 \xFF\xFE end <s></s>";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Tokenizer t;
    char err[256];
    if (tokenizer_load(&t, data, size, err, sizeof(err)) != 0) return 0;
    int *ids;
    size_t n = tokenizer_encode(&t, SAMPLE, sizeof(SAMPLE) - 1, 1, &ids);
    char *text;
    tokenizer_decode(&t, ids, n, &text);
    free(ids), free(text);
    int V = tokenizer_vocab_size(&t);
    int *all = calloc((size_t)V, sizeof(int));
    for (int i = 0; i < V; i++) all[i] = i;
    tokenizer_decode(&t, all, (size_t)V, &text);
    free(text);
    static FILE *sink;
    if (!sink) sink = fopen("/dev/null", "w");
    TokenStream s;
    tokenizer_stream_init(&s, &t, 1);
    for (int i = 0; i < V; i++) tokenizer_stream_put(&s, i, sink);
    tokenizer_stream_flush(&s, sink);
    free(all);
    tokenizer_free(&t);
    return 0;
}
