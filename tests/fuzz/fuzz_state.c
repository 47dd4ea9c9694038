// fuzz_state.c - a state file (--load-state), as bytes, through what ./run does with one: read
// and check its header, build the transformer with the state's context and chunk (main()'s
// state_context()), map it as the cache (load_state(): options, layers, layout, slots, tokens,
// RoPE lengths, and its context memory copied in), then take its logits and one decode step from
// it, so that a file the checks let through is also safe to compute with. The model is fixed: the file named by
// $LONGRUN_FUZZ_MODEL (tests/fuzz/seeds/model/llama-f32.bin, which the seeds were saved from).
// The input's first byte picks the loading run's settings, the rest is the state file:
//   bit 0      0: full attention; 1: --window 4 --sinks 2
//   bits 1-2   --kv-type (f32, f16, q8; modulo their count)
//   bit 3      with bit 0: --memory --memory-block 2 --memory-blocks 2 (the rows in RAM)
//   bit 4      with bit 3: --memory-distance 1000 (true distances), else 5 (W + B - 1)
// and the chunk is 4 (--chunk 4: a state saved with another is refused, as by state_context()).
#include "fuzz.h"

static ModelFile mf;
static const char *model_path;
static Transformer tr;

// The bytes as a file on disk (the loader opens and maps a path): one temporary file, rewritten
// per input, reached through /proc/self/fd as its name is removed at once.
static const char *fuzz_file(const uint8_t *data, size_t size) {
    static char path[64] = "";
    static int fd = -1;
    if (fd < 0) {
        strcpy(path, "/dev/shm/longrun-fuzz-state-XXXXXX");   // tmpfs: no disk write per input
        fd = mkstemp(path);
        if (fd < 0) {
            strcpy(path, "/tmp/longrun-fuzz-state-XXXXXX");
            fd = mkstemp(path);
        }
        if (fd < 0) {
            perror("mkstemp");
            abort();
        }
        unlink(path);
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    }
    int failed = ftruncate(fd, 0) != 0;
    if (!failed && size) failed = pwrite(fd, data, size, 0) != (ssize_t)size;
    if (failed) {
        perror("fuzz file");
        abort();
    }
    return path;
}

static void load_once(void) {
    model_path = getenv("LONGRUN_FUZZ_MODEL");
    if (!model_path) {
        fputs("set LONGRUN_FUZZ_MODEL to tests/fuzz/seeds/model/llama-f32.bin\n", stderr);
        abort();
    }
    if (setjmp(fuzz_escape)) {
        fprintf(stderr, "%s: the model does not load\n", model_path);
        abort();
    }
    open_model_file(&mf, model_path);
}

// main()'s --load-state path with this input's settings; die() lands back in the caller.
static void load_and_step(uint8_t settings, const char *path) {
    StateHeader h = read_state_header(path);
    Options o = {.load_state = path, .chunk = 4};
    size_t context = state_context(&o, &h);
    AttnOptions attn = {.n_sink = -1, .kv_type = ((settings >> 1) & 3) % KV_COUNT};
    if (settings & 1) {
        attn.window = 4;
        attn.n_sink = 2;
    }
    RopeOptions rope = {0};
    build_transformer(&tr, &mf, model_path, &rope, &attn, context, o.chunk, 0);
    if ((settings & 1) && (settings & 8))
        tr.memory = new_memory(&tr.cache, 2, 2, (settings >> 4) & 1 ? 1000 : 5);
    LoadedState loaded;
    load_state(&tr, path, &loaded);
    size_t pos = loaded.header.n_tokens;
    float *logits = state_logits(&tr, &loaded);
    int next = 0;   // greedy, as -t 0 would pick (NaN logits compare false: id 0)
    for (int i = 1; i < tr.config.vocab_size; i++)
        if (logits[i] > logits[next]) next = i;
    if (make_room(&tr, pos, 1)) forward(&tr, &next, 1, pos);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model_path) load_once();
    if (size == 0) return 0;
    const char *path = fuzz_file(data + 1, size - 1);
    memset(&tr, 0, sizeof(tr));
    if (!setjmp(fuzz_escape)) load_and_step(data[0], path);
    free_transformer(&tr);
    return 0;
}
