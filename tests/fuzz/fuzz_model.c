// fuzz_model.c - a model file, as bytes, through everything ./run does with one: map and check
// the header, the layer configs and the tensor table; load the tokenizer section and build a
// pass-key prompt with it (its filler text, key and question); build the transformer (RoPE
// tables, KV cache, buffers); then a 4-token chunk and one decode step, so that a file the
// checks let through is also safe to compute with. The input's length picks the KV
// type and whether a window with sinks is on, so those paths meet the fuzzed files too.
#include "fuzz.h"

// The bytes as a file on disk (the loader maps a path): one temporary file, rewritten per input.
static const char *fuzz_file(const uint8_t *data, size_t size) {
    static char path[64] = "";
    static int fd = -1;
    if (fd < 0) {
        strcpy(path, "/dev/shm/longrun-fuzz-XXXXXX");   // tmpfs: memory, no disk write per input
        fd = mkstemp(path);
        if (fd < 0) strcpy(path, "/tmp/longrun-fuzz-XXXXXX"), fd = mkstemp(path);
        if (fd < 0) { perror("mkstemp"); abort(); }
        unlink(path);   // the name goes away; the open descriptor keeps the file
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0 || (size && pwrite(fd, data, size, 0) != (ssize_t)size)) { perror("fuzz file"); abort(); }
    return path;
}

static ModelFile mf;
static Transformer tr;
static Tokenizer tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    memset(&mf, 0, sizeof(mf)), memset(&tr, 0, sizeof(tr)), memset(&tok, 0, sizeof(tok));
    if (!setjmp(fuzz_escape)) {
        open_model_file(&mf, path);
        if (load_tokenizer(&tok, &mf, path)) {   // a pass-key prompt of ~100 tokens from its filler
            size_t n;
            free(passkey_prompt(&tok, 100, (float)(size % 5) / 4, "12345", &n));
        }
        if (mf.header->n_layers) {
            RopeOptions rope = {0};
            AttnOptions attn = {.n_sink = -1, .kv_type = (int)(size % KV_COUNT)};
            if (size / KV_COUNT % 2) attn.n_sink = 2, attn.window = 3;
            build_transformer(&tr, &mf, path, &rope, &attn, 8, 4, 0);
            int V = tr.config.vocab_size, ids[4] = {0, 1 % V, (V - 1) % V, V / 2};
            forward(&tr, ids, 4, 0);
            forward(&tr, ids, 1, 4);
        }
    }
    free_transformer(&tr);
    tokenizer_free(&tok);
    if (mf.bytes) close_model_file(&mf);
    return 0;
}
