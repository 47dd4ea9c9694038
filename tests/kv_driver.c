// kv_driver.c - a test harness around run.c's half-float conversions and KV storage (not part
// of ./run).
//
//   cc -std=c11 -Wall -Wextra -Werror -O2 -o kv_driver tests/kv_driver.c -lm
//   ./kv_driver h2f          every half bit pattern 0..65535 as f16_to_f32's float bits, one per line
//   ./kv_driver f2h          float bit patterns (hex, one per line) on stdin -> f32_to_f16's bits
//   ./kv_driver q8 H         floats on stdin, H per head vector -> kv_store + kv_head at q8, %.9g
#define main longrun_main
#include "../run.c"
#undef main

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "h2f")) {
        for (uint32_t h = 0; h < 65536; h++) {
            float f = f16_to_f32((uint16_t)h);
            uint32_t bits;
            memcpy(&bits, &f, 4);
            printf("%08x\n", bits);
        }
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "f2h")) {
        unsigned bits;
        while (scanf("%x", &bits) == 1) {
            float f;
            memcpy(&f, &bits, 4);
            printf("%04x\n", f32_to_f16(f));
        }
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "q8")) {
        int H = atoi(argv[2]);
        if (H < 1 || H > 4096) return 2;
        KVCache kv = {.type = KV_Q8, .n_kv_heads = 1, .head_dim = H, .kv_dim = (size_t)H};
        float x[4096], buf[4096];
        uint8_t row[4096 + sizeof(float)];
        for (;;) {
            for (int i = 0; i < H; i++)
                if (scanf("%f", &x[i]) != 1) return 0;
            kv_store(&kv, row, x);
            const float *y = kv_head(&kv, row, 0, buf);
            for (int i = 0; i < H; i++) printf("%.9g\n", y[i]);
        }
    }
    fprintf(stderr, "usage: kv_driver h2f | f2h | q8 H\n");
    return 2;
}
