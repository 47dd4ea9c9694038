// fuzz_cli.c - the command-line parser: the input is split at NUL bytes into arguments after
// "run", then parse_options() either returns the options or exits 0 / 2 (here: jumps back).
#include "fuzz.h"

#define MAX_ARGS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *bytes = malloc(size + 1), *argv[MAX_ARGS + 1] = {"run"};
    memcpy(bytes, data, size);
    bytes[size] = 0;
    int argc = 1;
    for (size_t i = 0; i <= size && argc < MAX_ARGS; argc++) {
        argv[argc] = bytes + i;
        i += strlen(bytes + i) + 1;
    }
    argv[argc] = NULL;
    if (!setjmp(fuzz_escape)) {
        Options o = parse_options(argc, argv);
        if (o.steps == 0 || !o.model_path) abort();   // the parser promised to refuse these
    }
    free(bytes);
    return 0;
}
