// fuzz.h - what the fuzz harnesses in tests/fuzz/ share; not part of ./run.
//
// A harness includes run.c whole (which includes tokenizer.c), with exit() renamed: die() and the
// usage errors then jump back to the harness instead of ending the process, so one process can
// try millions of inputs and clean up after each. Each harness defines
//   int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
// and is built two ways:
//   make fuzz       clang -fsanitize=fuzzer,address,undefined: libFuzzer mutates inputs
//   make test       cc -DFUZZ_REPLAY -fsanitize=address,undefined: main() below runs the files
//                   named on its command line once each (the seeds and the regression inputs)
#define exit fuzz_exit
#define main run_main
#include "../../run.c"
#undef main
#undef exit

#include <setjmp.h>

static jmp_buf fuzz_escape;   // where die() lands: the harness's cleanup
static int fuzz_exit_code;    // what die() / usage_error() would have exited with

void fuzz_exit(int code) {
    fuzz_exit_code = code;
    longjmp(fuzz_escape, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#ifdef FUZZ_REPLAY
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) { perror(argv[i]); return 2; }
        size_t cap = 1 << 16, n = 0;
        uint8_t *buf = malloc(cap);
        for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;)
            if ((n += got) == cap) buf = realloc(buf, cap *= 2);
        fclose(f);
        if (!buf) { fputs("out of memory\n", stderr); return 2; }
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
        printf("%s: ok (die %d)\n", argv[i], fuzz_exit_code);
        fuzz_exit_code = 0;
    }
    return 0;
}
#endif
