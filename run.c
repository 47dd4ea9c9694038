// run.c - longrun: long-context transformer inference, from file bytes to sampled token.
//
// How to read this file: the sections follow the data, top to bottom.
//   errors and sizes   die(), checked size arithmetic, min and max, threads
//   model file         mmap, validate every header field and tensor, Config, weights
//   number formats     f16, bf16 and q8_0 values, and a weight row as float32
//   RoPE               rotation frequencies per layer, and the rotation itself
//   KV cache           which slot holds which position, what a query may see, the sinks
//   blocks             rmsnorm, SwiGLU, softmax, and plain matmul and attention
//   forward            prefill and decode are one function; decode is T = 1
//   fast kernels       kernels.c: the same matmul and attention, fast
//   tokenizer          tokenizer.c: text <-> ids
//   sampler            greedy, temperature, top-k, top-p, min-p, repetition penalty
//   modes              generate, chat, logits, tokenize; ppl, passkey, bench
//   command line       options and main
// Letters used in comments: T tokens in a chunk, S cache slots, V vocab, D dim,
// H head_dim, pos a token's position in the text, slot where its K/V live in the cache.
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "model.h"

// The program's version, printed by --version (the one place it is written).
#define LONGRUN_VERSION "0.20.0"

// ----------------------------------------------------------------------------
// Errors, checked sizes and threads

// The temporary files outputs are being written to (see open_output), which a failure must
// remove: die() and the signal handlers do. An empty name is a free entry. Two: ppl's CSV can
// be open while the state file is written.
#define MAX_PENDING 2
static char pending_output[MAX_PENDING][4096];

// Set by the first Ctrl-C (on_sigint): every long loop checks it and stops.
static volatile sig_atomic_t interrupted = 0;

static void remove_pending_output(void) {
    for (int i = 0; i < MAX_PENDING; i++) {
        if (pending_output[i][0]) unlink(pending_output[i]);
        pending_output[i][0] = 0;
    }
}

// Print one line saying what is wrong and exit. User errors never reach assert().
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    remove_pending_output();
    exit(1);
}

// s (at most max bytes, up to a NUL) with every byte outside printable ASCII written as \xHH,
// so a name read from a corrupt file cannot send control sequences to the terminal. The
// result lives in one of two static buffers used in turn: one message may hold two names.
static const char *printable(const char *s, size_t max) {
    static char buffers[2][4 * 64 + 1];
    static int turn;
    turn ^= 1;
    char *out = buffers[turn], *p = out;
    for (size_t i = 0; i < max && i < 64 && s[i]; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') *p++ = (char)c;
        else p += sprintf(p, "\\x%02X", c);
    }
    *p = 0;
    return out;
}

// a * b, or die naming what overflowed. Every allocation and offset goes through this.
static size_t mul_size(size_t a, size_t b, const char *what) {
    if (b != 0 && a > SIZE_MAX / b) die("%s: size overflows", what);
    return a * b;
}

static size_t add_size(size_t a, size_t b, const char *what) {
    if (a > SIZE_MAX - b) die("%s: size overflows", what);
    return a + b;
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }
static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }
static int min_int(int a, int b) { return a < b ? a : b; }
// NaN in a loses to b, as in fmaxf(); one comparison, so loops of it vectorize.
static float max_float(float a, float b) { return a > b ? a : b; }
static float min_float(float a, float b) { return a < b ? a : b; }

static void *xcalloc(size_t n, size_t size, const char *what) {
    size_t bytes = mul_size(n, size, what);
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) die("cannot allocate %.1f MB for %s; try a smaller -c or --chunk", bytes / 1e6, what);
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Where temporary files go: $TMPDIR, else /tmp.
static const char *temp_dir(void) {
    const char *dir = getenv("TMPDIR");
    return dir && *dir ? dir : "/tmp";
}

// OpenMP is optional: without it there is one thread. PARALLEL_FOR splits the loop that
// follows it across the threads; PARALLEL_FOR_IF(c) the same when c holds (a loop over a
// chunk's tokens: one token is cheaper alone than the threads' start); SIMD tells the
// compiler to vectorize the loop that follows where it would otherwise pick a worse loop of
// the nest (attention's tiles).
#ifdef _OPENMP
#include <omp.h>
static int thread_id(void) { return omp_get_thread_num(); }
static int n_threads(void) { return omp_get_max_threads(); }
static void set_threads(int n) { omp_set_num_threads(n); }
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#define PRAGMA(x) _Pragma(#x)
#define PARALLEL_FOR_IF(c) PRAGMA(omp parallel for schedule(static) if(c))
#define SIMD _Pragma("omp simd")
#else
static int thread_id(void) { return 0; }
static int n_threads(void) { return 1; }
static void set_threads(int n) { (void)n; }
#define PARALLEL_FOR
#define PARALLEL_FOR_IF(c)
#define SIMD
#endif

// ----------------------------------------------------------------------------
// The model file: what it holds, mapped into memory and every field checked

typedef struct {
    int n_layers;
    int dim;          // D, residual stream width
    int hidden_dim;   // MLP inner width
    int n_heads;      // query heads
    int n_kv_heads;   // key/value heads, n_heads % n_kv_heads == 0 (GQA)
    int head_dim;     // H
    int q_dim;        // n_heads * head_dim
    int kv_dim;       // n_kv_heads * head_dim
    int vocab_size;   // V
    int max_seq_len;  // trained context length
    float norm_eps;
    int tied_embeddings, qkv_bias, qk_norm;
    // (n_layers) attention kind, window and RoPE per layer: a copy, which the RoPE options
    // edit while loading; read-only once built (the cache keeps the windows it uses)
    LayerConfig *layers;
} Config;

// A tensor in the mmapped file: rows x cols values of one dtype (a vector has cols = 1).
typedef struct {
    const uint8_t *data;
    DType dtype;
    size_t rows, cols;
} Tensor;

typedef struct {
    Tensor attn_norm;         // (D)
    Tensor wq, wk, wv, wo;    // (q_dim, D), (kv_dim, D), (kv_dim, D), (D, q_dim)
    Tensor bq, bk, bv;        // (q_dim), (kv_dim), (kv_dim); data NULL unless qkv_bias
    Tensor q_norm, k_norm;    // (H); data NULL unless qk_norm
    Tensor ffn_norm;          // (D)
    Tensor w_gate, w_up;      // (hidden_dim, D)
    Tensor w_down;            // (D, hidden_dim)
} LayerWeights;

typedef struct {
    Tensor tok_embd;          // (V, D)
    Tensor output_norm;       // (D)
    Tensor output;            // (V, D); the same as tok_embd when tied
    LayerWeights *layers;     // (n_layers)
} Weights;

typedef struct {
    const uint8_t *bytes;     // the whole file, mmapped read-only
    size_t size;
    const FileHeader *header;
    const TensorEntry *tensors; // (n_tensors)
} ModelFile;

static const char *dtype_name(uint32_t dtype) {
    static const char *names[DT_COUNT] = {"f32", "f16", "bf16", "q8_0"};
    return dtype < DT_COUNT ? names[dtype] : "unknown";
}

// Bytes of a rows x cols tensor of this dtype (q8_0: int8 quants, then a float scale per 32).
static size_t tensor_bytes(DType dtype, size_t rows, size_t cols, const char *name) {
    size_t n = mul_size(rows, cols, name);
    switch (dtype) {
    case DT_F32: return mul_size(n, 4, name);
    case DT_F16: case DT_BF16: return mul_size(n, 2, name);
    case DT_Q8_0: return add_size(n, mul_size(n / LR_Q8_BLOCK, 4, name), name);
    default: die("%s: unknown dtype %u", name, (unsigned)dtype);
    }
    return 0;
}

static int compare_offsets(const void *a, const void *b) {
    uint64_t x = (*(const TensorEntry *const *)a)->offset,
             y = (*(const TensorEntry *const *)b)->offset;
    return x < y ? -1 : x > y;
}

// Check a [offset, offset + size) section lies inside the file.
static void check_section(const char *path, const char *what, uint64_t offset, uint64_t size,
                          size_t file_size) {
    if (offset > file_size || size > file_size - offset)
        die("%s: %s (offset %llu, %llu bytes) runs past the end of the file (%zu bytes); the file "
            "is truncated or corrupt",
            path, what, (unsigned long long)offset, (unsigned long long)size, file_size);
}

// The header's own fields and the sections it points to. Returns 0 for a tokenizer-only file
// (export.py --tokenizer-only), which has no tensors to check.
static int check_header(ModelFile *mf, const char *path) {
    const FileHeader *h = mf->header;
    size_t size = mf->size;
    if (h->magic != LR_MAGIC)
        die("%s: not a longrun model file (bad magic); export one with export.py", path);
    if (h->version != LR_VERSION)
        die("%s: format version %u, this run reads version %d; re-export with export.py", path,
            h->version, LR_VERSION);
    if (h->header_size != LR_HEADER_SIZE)
        die("%s: header size %u, expected %d", path, h->header_size, LR_HEADER_SIZE);
    if (h->file_size != size)
        die("%s: header says %llu bytes but the file has %zu; truncated or corrupt", path,
            (unsigned long long)h->file_size, size);
    check_section(path, "tokenizer section", h->tokenizer_offset, h->tokenizer_size, size);
    // its tables are read in place, as uint32 and float
    if (h->tokenizer_size && h->tokenizer_offset % 8)
        die("%s: tokenizer section offset %llu is not 8-byte aligned", path,
            (unsigned long long)h->tokenizer_offset);
    // a tokenizer-only file (export.py --tokenizer-only)
    if (h->n_layers == 0 && h->n_tensors == 0) {
        if (h->tokenizer_size == 0) die("%s: the file has neither weights nor a tokenizer", path);
        return 0;
    }
    if (h->n_layers == 0 || h->n_layers > 4096)
        die("%s: n_layers %u out of range [1, 4096]", path, h->n_layers);
    if (h->vocab_size == 0 || h->vocab_size > (1u << 24))
        die("%s: vocab_size %u out of range", path, h->vocab_size);
    check_section(path, "layer table", h->header_size, (uint64_t)h->n_layers * LR_LAYER_CONFIG_SIZE,
                  size);
    if (h->n_tensors == 0 || h->n_tensors > 1000000)
        die("%s: n_tensors %u out of range", path, h->n_tensors);
    if (h->tensor_table_offset % 8) die("%s: tensor table offset %llu is not 8-byte aligned", path,
                                       (unsigned long long)h->tensor_table_offset);
    check_section(path, "tensor table", h->tensor_table_offset,
                  (uint64_t)h->n_tensors * LR_TENSOR_ENTRY_SIZE, size);
    mf->tensors = (const TensorEntry *)(mf->bytes + h->tensor_table_offset);
    return 1;
}

// Every tensor: a terminated name, a known dtype, a size that matches its shape, aligned data
// inside the file, after the metadata (which ends at data_start).
static void check_tensor_entry(const TensorEntry *e, uint32_t index, uint64_t data_start,
                               size_t file_size, const char *path) {
    if (memchr(e->name, 0, LR_NAME_LEN) == NULL || e->name[0] == 0)
        die("%s: tensor %u has an empty or unterminated name", path, index);
    for (const char *c = e->name; *c; c++)
        if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f)
            die("%s: tensor %u has a name with a control or non-ASCII byte: %s", path, index,
                printable(e->name, LR_NAME_LEN));
    if (e->dtype >= DT_COUNT)
        die("%s: tensor %s has unknown dtype %u", path, e->name, e->dtype);
    if (e->n_dims < 1 || e->n_dims > 2 || (e->n_dims == 1 && e->cols != 1))
        die("%s: tensor %s has a bad shape (n_dims %u)", path, e->name, e->n_dims);
    if (e->rows == 0 || e->cols == 0 || e->rows > UINT32_MAX || e->cols > UINT32_MAX)
        die("%s: tensor %s has a bad shape (%llu x %llu)", path, e->name,
            (unsigned long long)e->rows, (unsigned long long)e->cols);
    if (e->dtype == DT_Q8_0 && e->cols % LR_Q8_BLOCK)
        die("%s: q8_0 tensor %s has %llu columns, not a multiple of %d", path, e->name,
            (unsigned long long)e->cols, LR_Q8_BLOCK);
    if (e->size != tensor_bytes(e->dtype, e->rows, e->cols, e->name))
        die("%s: tensor %s is %llu bytes, but %s %llu x %llu needs %zu", path, e->name,
            (unsigned long long)e->size, dtype_name(e->dtype), (unsigned long long)e->rows,
            (unsigned long long)e->cols, tensor_bytes(e->dtype, e->rows, e->cols, e->name));
    if (e->offset % LR_ALIGN)
        die("%s: tensor %s data is not %d-byte aligned", path, e->name, LR_ALIGN);
    if (e->offset < data_start)
        die("%s: tensor %s data overlaps the file's metadata", path, e->name);
    check_section(path, e->name, e->offset, e->size, file_size);
}

// No two tensors' data overlap: sorted by offset, each ends before the next begins.
static void check_no_overlap(const ModelFile *mf, const char *path) {
    uint32_t n = mf->header->n_tensors;
    const TensorEntry **sorted = xcalloc(n, sizeof(*sorted), "tensor table");
    for (uint32_t i = 0; i < n; i++) sorted[i] = &mf->tensors[i];
    qsort(sorted, n, sizeof(*sorted), compare_offsets);
    uint32_t overlap = 0;
    for (uint32_t i = 1; i < n && !overlap; i++)
        if (sorted[i - 1]->offset + sorted[i - 1]->size > sorted[i]->offset) overlap = i;
    const char *first = overlap ? sorted[overlap - 1]->name : NULL,
               *second = overlap ? sorted[overlap]->name : NULL;
    free(sorted);
    if (overlap) die("%s: tensors %s and %s overlap", path, first, second);
}

// Map the file and check the header, the section bounds and every tensor table entry
// before anything trusts a size from it.
static void open_model_file(ModelFile *mf, const char *path) {
    // O_NONBLOCK: a named pipe would otherwise block open() until a writer came; it is then
    // refused as not a regular file. (The flag does nothing to a regular file's reads.)
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) die("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    size_t size = (size_t)st.st_size;
    if (size < LR_HEADER_SIZE)
        die("%s: %zu bytes is too short for a longrun model file (header is %d bytes)", path, size,
            LR_HEADER_SIZE);
    void *bytes = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (bytes == MAP_FAILED) die("%s: cannot mmap: %s", path, strerror(errno));
    mf->bytes = bytes;
    mf->size = size;
    mf->header = bytes;
    if (!check_header(mf, path)) return;
    const FileHeader *h = mf->header;
    uint64_t data_start = h->tensor_table_offset + (uint64_t)h->n_tensors * LR_TENSOR_ENTRY_SIZE;
    if (h->tokenizer_size && h->tokenizer_offset + h->tokenizer_size > data_start)
        data_start = h->tokenizer_offset + h->tokenizer_size;
    for (uint32_t i = 0; i < h->n_tensors; i++)
        check_tensor_entry(&mf->tensors[i], i, data_start, size, path);
    check_no_overlap(mf, path);
}

static void close_model_file(ModelFile *mf) { munmap((void *)mf->bytes, mf->size); }

// ----------------------------------------------------------------------------
// Number formats: half floats, bfloat16 and q8_0 rows, and a weight row as float32

// IEEE half to float without branches, so loops of it vectorize: the exponent and mantissa
// bits move to a float's place, and multiplying by 2^112 turns the exponent bias 15 into 127
// (exact, subnormal halves included); exponent 31 is inf or nan.
static float f16_to_f32(uint16_t h) {
    uint32_t rest = (uint32_t)(h & 0x7fff) << 13, bits;
    float f;
    memcpy(&f, &rest, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    bits = (h & 0x7c00) == 0x7c00 ? rest | 0x7f800000 : bits;
    bits |= (uint32_t)(h & 0x8000) << 16;
    memcpy(&f, &bits, 4);
    return f;
}

// Float to IEEE half, rounding to nearest even; 65520 and beyond become inf.
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, a = x & 0x7fffffff;
    if (a > 0x7f800000) return (uint16_t)(sign | 0x7e00);                  // nan
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                 // inf, or too big
    if (a < 0x38800000) {                                                  // below 2^-14: subnormal
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 0x1p24f));           // in units of 2^-24
    }
    uint32_t h = (a - 0x38000000) >> 13, dropped = a & 0x1fff;             // rebias 127 -> 15
    // a carry bumps the exponent
    h += dropped > 0x1000 || (dropped == 0x1000 && (h & 1));
    return (uint16_t)(sign | h);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Where row `row` of a q8_0 tensor lives: its cols int8s, and its cols / 32 block scales (all
// rows' int8s come first, then all scales; model.h).
static const int8_t *q8_row(const Tensor *w, size_t row, const float **scale) {
    *scale = (const float *)(w->data + w->rows * w->cols) + row * (w->cols / LR_Q8_BLOCK);
    return (const int8_t *)w->data + row * w->cols;
}

// Row `row` of w as float32: a pointer into the file for f32, else dequantized into scratch
// (cols floats). With kernels.c's matmul_q8(), the only place that knows the dtypes.
static const float *weight_row(const Tensor *w, size_t row, float *scratch) {
    size_t cols = w->cols;
    const uint8_t *data = w->data;
    switch (w->dtype) {
    case DT_F32: return (const float *)data + row * cols;
    case DT_F16: case DT_BF16: {
        const uint16_t *src = (const uint16_t *)data + row * cols;
        for (size_t i = 0; i < cols; i++)
            scratch[i] = w->dtype == DT_F16 ? f16_to_f32(src[i]) : bf16_to_f32(src[i]);
        return scratch;
    }
    case DT_Q8_0: {
        const float *scale;
        const int8_t *q = q8_row(w, row, &scale);
        for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++)   // one block of 32 values per scale
            for (size_t i = b * LR_Q8_BLOCK; i < (b + 1) * LR_Q8_BLOCK; i++)
                scratch[i] = scale[b] * q[i];
        return scratch;
    }
    default: return NULL; // unreachable: dtypes were validated when the file was opened
    }
}

// f16_to_f32() over a row of n halves at src (any alignment): the KV cache reads f16 keys
// with it. In kernels.c, as F16C does it in one instruction where the processor has it.
static void f16_to_f32_row(float *dst, const uint8_t *src, int n);

// sum_i w_i c_i over n floats w and int8s c: the context memory scores its blocks' bounds,
// kept as int8 steps, with it. In kernels.c, as AVX2 widens 8 int8s to floats in two
// instructions where the compiler's own vector code takes many more.
static float dot_i8(const float *w, const int8_t *c, int n);

// The instruction set kernels.c was compiled for: "AVX2 + FMA + F16C" (+ a VNNI), "NEON" or
// "portable C".
static const char *kernel_set(void);

// ----------------------------------------------------------------------------
// RoPE: rotation frequencies per layer, and the rotation itself

typedef struct {
    float *inv_freq;           // (n_layers, head_dim / 2) angular frequency of each channel pair
    float *attn_factor;        // (n_layers) multiplies cos and sin, so q.k grows by its square
    size_t *table_len;         // (n_layers) the sequence length each table was computed for
    int stride;                // floats per layer in inv_freq
    const float *short_factor; // (rotary_dim / 2) LongRoPE lists from the file, else NULL
    const float *long_factor;
} Rope;

static const char *rope_type_name(uint32_t type) {
    static const char *names[ROPE_COUNT] = { "default", "linear", "dynamic",
                                             "yarn",    "llama3", "longrope" };
    return type < ROPE_COUNT ? names[type] : "unknown";
}

static const double PI = 3.14159265358979323846;

// YaRN's magnitude rule g(s, m) = 0.1 m ln s + 1 (1 for s <= 1).
static double yarn_mscale(double s, double m) { return s <= 1 ? 1 : 0.1 * m * log(s) + 1; }

// YaRN's correction dimension: the pair index whose wavelength turns `rotations` times over
// the original context L0: d ln(L0 / (2 pi r)) / (2 ln b).
static double yarn_corr_dim(double rotations, const LayerConfig *lc) {
    return lc->rotary_dim * log(lc->orig_ctx / (rotations * 2 * PI)) / (2 * log(lc->rope_theta));
}

// One layer's frequency table inv_freq (rotary_dim / 2) and attention factor a (the return
// value), in float32 exactly as HF's rope init functions compute them (transformers
// modeling_rope_utils: `_compute_linear_scaling_rope_parameters` and its siblings). seq_len is the
// length the length-dependent methods see: the last position of the forward call + 1.
// b = rope_theta, d = rotary_dim, s = factor, L0 = orig_ctx, base table f_i = 1 / b^(2i/d).
static float rope_frequencies(const LayerConfig *lc, const float *short_factor,
                              const float *long_factor, size_t seq_len, float *inv_freq) {
    int half = lc->rotary_dim / 2;
    float d = (float)lc->rotary_dim, s = lc->factor, b = lc->rope_theta;
    double a = 1;
    switch ((RopeType)lc->rope_type) {
    case ROPE_DEFAULT:   // RoFormer (Su et al. 2021): f_i, a = 1
    case ROPE_LINEAR:    // Position Interpolation (Chen et al. 2023): f_i / s, i.e. positions p / s
        for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(b, (float)(2 * i) / d);
        if (lc->rope_type == ROPE_LINEAR)
            for (int i = 0; i < half; i++) inv_freq[i] /= s;
        break;
    case ROPE_DYNAMIC: {   // dynamic NTK (bloc97 2023, as HF): a larger base once the text
                           // outgrows M = L0: b' = b (s L / M - (s - 1))^(d / (d - 2)),
                           // L = max(seq_len, M)
        float M = (float)lc->orig_ctx, L = seq_len > lc->orig_ctx ? (float)seq_len : M;
        float base = b * powf(s * L / M - (s - 1), d / (d - 2));
        for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(base, (float)(2 * i) / d);
        break;
    }
    case ROPE_YARN: {    // YaRN (Peng et al. 2023): pairs below the correction range keep f_i,
                         // pairs above it get f_i / s, a linear ramp in between; a = 0.1 ln s + 1
        double lo = yarn_corr_dim(lc->beta_fast, lc), hi = yarn_corr_dim(lc->beta_slow, lc);
        if (lc->yarn_truncate) {
            lo = floor(lo);
            hi = ceil(hi);
        }
        if (lo < 0) lo = 0;
        if (hi > lc->rotary_dim - 1) hi = lc->rotary_dim - 1;
        if (lo == hi) hi += 0.001;
        for (int i = 0; i < half; i++) {
            float pos_freq = powf(b, (float)(2 * i) / d), extrap = 1.0f / pos_freq,
                  interp = 1.0f / (s * pos_freq);
            float ramp = ((float)i - (float)lo) / (float)(hi - lo);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float keep = 1 - ramp;   // the share of the original frequency
            inv_freq[i] = interp * (1 - keep) + extrap * keep;
        }
        if (lc->attention_factor > 0) a = lc->attention_factor;
        else if (lc->mscale != 0 && lc->mscale_all_dim != 0)
            a = yarn_mscale(s, lc->mscale) / yarn_mscale(s, lc->mscale_all_dim);
        else a = yarn_mscale(s, 1);
        break;
    }
    // Llama 3.1 (Meta 2024): wavelengths 2 pi / f_i below L0 / high_freq_factor keep f_i, above L0
    // / low_freq_factor get f_i / s, and in between mu = (L0 / wavelength - lf) / (hf - lf) blends
    // (1 - mu) f_i / s + mu f_i
    case ROPE_LLAMA3: {
        float lf = lc->low_freq_factor, hf = lc->high_freq_factor, L0 = (float)lc->orig_ctx;
        float long_wave = L0 / lf, short_wave = L0 / hf;
        for (int i = 0; i < half; i++) {
            float f = 1.0f / powf(b, (float)(2 * i) / d), wavelen = (float)(2 * PI) / f;
            if (wavelen < short_wave) inv_freq[i] = f;
            else if (wavelen > long_wave) inv_freq[i] = f / s;
            else {
                float mu = (L0 / wavelen - lf) / (hf - lf);
                inv_freq[i] = (1 - mu) * f / s + mu * f;
            }
        }
        break;
    }
    case ROPE_LONGROPE: { // LongRoPE (Ding et al. 2024; Phi-3): f_i / ext_i with the long list once
                          // seq_len > L0, else the short one; a = sqrt(1 + ln s / ln L0) for s > 1
        const float *ext = seq_len > lc->orig_ctx ? long_factor : short_factor;
        for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / (ext[i] * powf(b, (float)(2 * i) / d));
        if (lc->attention_factor > 0) a = lc->attention_factor;
        else if (s > 1) a = sqrt(1 + log(s) / log((double)lc->orig_ctx));
        break;
    }
    case ROPE_COUNT: break;
    }
    return (float)a;
}

// Layer l's table as made for sequence length len (a state file restores it with this).
static void rope_set_length(Rope *r, const Config *c, int l, size_t len) {
    r->attn_factor[l] = rope_frequencies(&c->layers[l], r->short_factor, r->long_factor, len,
                                         r->inv_freq + (size_t)l * r->stride);
    r->table_len[l] = len;
}

// Recompute the tables a forward call over positions ..seq_len-1 needs, by HF's per-call rules
// (its dynamic_rope_update): dynamic NTK grows its table when seq_len exceeds the longest
// length seen so far and returns to the original once a call is shorter than L0; LongRoPE
// uses the long list exactly when seq_len > L0. Keys already in the cache keep the rotation
// they were written with, as in HF, so results depend on how a text is split into calls.
static void rope_update(Rope *r, const Config *c, size_t seq_len) {
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        size_t want = r->table_len[l], L0 = lc->orig_ctx;
        if (lc->rope_type == ROPE_DYNAMIC) {
            if (seq_len > want) want = seq_len;
            else if (seq_len < L0 && want > L0) want = L0;
        } else if (lc->rope_type == ROPE_LONGROPE) {
            want = seq_len > L0 ? L0 + 1 : L0;
        }
        if (want != r->table_len[l]) rope_set_length(r, c, l, want);
    }
}

static void free_rope(Rope *r) {
    free(r->inv_freq);
    free(r->attn_factor);
    free(r->table_len);
}

// One layer's rotation: its frequency table, attention factor and rotated channels.
typedef struct {
    const float *inv_freq;   // (rotary_dim / 2)
    float attn_factor;
    int rotary_dim;
} LayerRope;

static LayerRope layer_rope(const Rope *r, const Config *c, int layer) {
    LayerRope rope = {r->inv_freq + (size_t)layer * r->stride, r->attn_factor[layer],
                      (int)c->layers[layer].rotary_dim};
    return rope;
}

// Channel pair i's angle at position pos, pos * inv_freq[i], as its cos and sin
// (rope_rotate() says why in double).
static void rope_angle(const LayerRope *rope, int i, size_t pos, float *c, float *s) {
    double angle = (double)pos * rope->inv_freq[i];
    *c = (float)cos(angle);
    *s = (float)sin(angle);
}

// Turn channel pair i of each head of vec by the angle whose cos and sin are c and s.
static void rope_turn(float *vec, int n_heads, int head_dim, int half, int i, float c, float s) {
    for (int h = 0; h < n_heads; h++) {
        float *x = vec + (size_t)h * head_dim;
        float x0 = x[i];
        float x1 = x[i + half];
        x[i] = x0 * c - x1 * s;
        x[i + half] = x1 * c + x0 * s;
    }
}

// Rotate each head of vec (n_heads, head_dim) to position pos, rotate-half style (GPT-NeoX,
// as HF): channel pair i is (i, i + d/2), d = rotary_dim; channels d..head_dim-1 pass through.
//   y[i]       = x[i] cos - x[i + d/2] sin
//   y[i + d/2] = x[i + d/2] cos + x[i] sin,   angle = pos * inv_freq[i]
// The angle and its cos and sin are computed in double: at position 10^6 a float angle would
// be off by 0.06 radians, and streams with a window reach such positions (HF's float angles
// agree with these to about 1e-7 relative over its trained contexts).
static void rope_rotate(float *vec, int n_heads, int head_dim, const LayerRope *rope,
                        size_t pos) {
    int half = rope->rotary_dim / 2;
    for (int i = 0; i < half; i++) {
        float c, s;
        rope_angle(rope, i, pos, &c, &s);
        rope_turn(vec, n_heads, head_dim, half, i, c * rope->attn_factor, s * rope->attn_factor);
    }
}

// ----------------------------------------------------------------------------
// The KV cache: which slot holds which position, and what a query may see
//
// Position = a token's index in the text (RoPE and the masks use it); slot = where its key
// and value are stored. Keys are stored rotated to their own position and never
// re-rotated. Each layer has n_sink fixed slots for the first positions, then a ring:
//
//   slots [0 .. n_sink-1 | n_sink .. n_sink+ring-1]
//   position p < n_sink lives in slot p; a later one in slot n_sink + (p - n_sink) % ring
//
// Full attention: no sinks and a ring as long as the context, so slot = position and the
// context is full at n_sink + ring positions. A window of W keys needs a ring of W + max_T - 1
// slots (a chunk writes its keys before its first query looks back W - 1 positions), whatever
// the length of the text, so a windowed layer never fills; a window longer than the context
// gets the context's slots and fills like a full layer. This section is the only code that
// knows the slot arithmetic and the cache's number type: both attention paths read keys
// through visible_keys() and read_visible().

typedef enum { KV_F32, KV_F16, KV_Q8, KV_COUNT } KVType;
static const char *kv_type_names[KV_COUNT] = {"f32", "f16", "q8"};

// What the sink slots are for: StreamingLLM's attention sinks (Xiao et al. 2023) or
// LM-Infinite's global tokens (Han et al. 2023).
typedef enum { SINKS_STREAMING, SINKS_LMINF } SinkKind;

// The command line's attention settings, which build_cache() turns into each layer's slots.
typedef struct {
    long n_sink;      // --sinks: StreamingLLM sinks, or LM-Infinite's global tokens
    long window;      // --window: keys per query, itself included (0: the model's own)
    int lminf;        // --lminf: sinks are LM-Infinite's global branch
    long limit;       // --lminf-limit: LM-Infinite's distance cap (0: the window)
    int kv_type;      // --kv-type: KVType of the stored keys and values
} AttnOptions;

// One layer's part of the cache, and the keys its queries see.
typedef struct {
    size_t first;     // the layer's first slot in the cache
    size_t n_sink;    // slots holding positions 0 .. n_sink-1 for good
    size_t ring;      // slots the later positions take in turn
    size_t window;    // keys a query sees, itself included; SIZE_MAX: every earlier key
    int fills;        // the ring cannot hold the window: n_sink + ring positions at most
} LayerSlots;

typedef struct {
    KVType type;
    SinkKind sink_kind;
    size_t limit;           // LM-Infinite: far keys are scored at this distance
    int n_kv_heads, head_dim;
    size_t kv_dim;          // n_kv_heads * head_dim: one position's key (or value)
    size_t row_bytes;       // one slot: kv_dim values (q8: int8s, then a float scale per head)
    uint8_t *key, *value;   // (all layers' slots, row_bytes)
    size_t max_sink;        // sink copies per layer
    float *sink_key;        // (n_layers, max_sink, kv_dim) f32: rotated at sink_key_pos()
    float *sink_value;      // (n_layers, max_sink, kv_dim) f32
    LayerSlots *layers;     // (n_layers)
    int n_layers;
    size_t n_slots;         // all layers' slots
    int max_T;              // the longest chunk, which the rings make room for
    AttnOptions built;      // the settings it was built from (resolved), and its full context:
    size_t context;         // what a state file must have been written with
    void *map;              // a mapped state file the rows and sinks point into, or NULL
    size_t map_size;
} KVCache;

// Let go of the rows and sinks: freed, or the state file they were mapped from unmapped.
static void kv_release_rows(KVCache *kv) {
    if (kv->map) {
        munmap(kv->map, kv->map_size);
    } else {
        free(kv->key);
        free(kv->value);
        free(kv->sink_key);
        free(kv->sink_value);
    }
    kv->map = NULL;
    kv->key = kv->value = NULL;
    kv->sink_key = kv->sink_value = NULL;
}

static void free_cache(KVCache *kv) {
    kv_release_rows(kv);
    free(kv->layers);
}

static size_t kv_slot(const LayerSlots *ls, size_t pos) {
    if (pos < ls->n_sink) return ls->first + pos;
    return ls->first + ls->n_sink + (pos - ls->n_sink) % ls->ring;
}

// kv_slot(ls, pos + 1) from slot = kv_slot(ls, pos), without the division: the loops over
// consecutive positions step with it.
static size_t next_slot(const LayerSlots *ls, size_t slot) {
    if (slot + 1 == ls->first + ls->n_sink + ls->ring) return ls->first + ls->n_sink;
    return slot + 1;
}

// Positions a run may reach; SIZE_MAX if no layer fills (a stream of any length).
static size_t cache_capacity(const KVCache *kv, int n_layers) {
    size_t cap = SIZE_MAX;
    for (int l = 0; l < n_layers; l++)
        if (kv->layers[l].fills) cap = min_size(cap, kv->layers[l].n_sink + kv->layers[l].ring);
    return cap;
}

// Bytes of one slot: kv_dim values in the cache's type (q8: int8s, then a float scale per
// kv head).
static size_t kv_row_bytes(KVType type, size_t kv_dim, int n_kv_heads) {
    if (type == KV_F32) return kv_dim * sizeof(float);
    if (type == KV_F16) return kv_dim * sizeof(uint16_t);
    return kv_dim + (size_t)n_kv_heads * sizeof(float);   // q8
}

// Fresh, zeroed rows for every slot and sink copies for every layer.
static void kv_alloc_rows(KVCache *kv) {
    kv->key = xcalloc(kv->n_slots, kv->row_bytes, "the KV cache");
    kv->value = xcalloc(kv->n_slots, kv->row_bytes, "the KV cache");
    size_t sinks = mul_size(mul_size(kv->n_layers, kv->max_sink, "sinks"), kv->kv_dim, "sinks");
    kv->sink_key = xcalloc(sinks, sizeof(float), "the sink keys");
    kv->sink_value = xcalloc(sinks, sizeof(float), "the sink values");
}

// Store keys and values as `type` from now on: the same slots, new (empty) storage (bench
// sweeps --kv-type over one cache, and maps states made in each).
static void kv_retype(KVCache *kv, KVType type) {
    if (kv->type == type) return;
    kv_release_rows(kv);
    kv->type = type;
    kv->built.kv_type = type;
    kv->row_bytes = kv_row_bytes(type, kv->kv_dim, kv->n_kv_heads);
    kv_alloc_rows(kv);
}

// Store one slot's row x (kv_dim) in the cache's type. q8: per kv head, int8 q = round(x / d)
// with d = max|x| / 127, and the float d after all the heads' int8s.
static void kv_store(const KVCache *kv, uint8_t *row, const float *x) {
    size_t n = kv->kv_dim;
    int H = kv->head_dim;
    if (kv->type == KV_F32) memcpy(row, x, n * sizeof(float));
    if (kv->type == KV_F16)
        for (size_t i = 0; i < n; i++) {
            uint16_t h = f32_to_f16(x[i]);
            memcpy(row + 2 * i, &h, 2);
        }
    if (kv->type == KV_Q8)
        for (int g = 0; g < kv->n_kv_heads; g++) {
            const float *xg = x + (size_t)g * H;
            float amax = 0;
            for (int i = 0; i < H; i++) amax = max_float(amax, fabsf(xg[i]));
            float d = amax / 127;
            float inv = d > 0 ? 1 / d : 0;
            for (int i = 0; i < H; i++)
                row[(size_t)g * H + i] = (uint8_t)(int8_t)lrintf(xg[i] * inv);
            memcpy(row + n + g * sizeof(float), &d, sizeof(float));
        }
}

// Head g's vector (H) of a stored row as floats: a pointer into the cache for f32, else
// converted into buf.
static const float *kv_head(const KVCache *kv, const uint8_t *row, int g, float *buf) {
    int H = kv->head_dim;
    if (kv->type == KV_F32) return (const float *)row + (size_t)g * H;
    if (kv->type == KV_F16) {
        f16_to_f32_row(buf, row + (size_t)g * H * 2, H);
        return buf;
    }
    const int8_t *q = (const int8_t *)row + (size_t)g * H;   // q8: int8s, then a scale per head
    float d;
    memcpy(&d, row + kv->kv_dim + g * sizeof(float), sizeof(float));
    for (int i = 0; i < H; i++) buf[i] = d * q[i];
    return buf;
}

// Sink j's f32 copy in a layer: key or value (kv_dim).
static float *sink_row(const KVCache *kv, float *copies, int layer, size_t j) {
    return copies + ((size_t)layer * kv->max_sink + j) * kv->kv_dim;
}

// The sinks keep the first positions' keys a second time, in f32, rotated where the sink
// rule needs them; a query is rotated a second time to meet them:
// StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")
//   gives positions by cache slot: once the window is full the query sits at slot
//   n_sink + W - 1, so sink i (its key rotated at i) is at distance n_sink + W - 1 - i.
//   Window keys keep their true distances, as the slots of the reference are contiguous.
// LM-Infinite (Han et al. 2023): every far global key is at distance min(pos, L), the
//   distance cap, so its key is rotated at 0 and the query at min(pos, L).
static size_t sink_key_pos(const KVCache *kv, size_t pos) {
    return kv->sink_kind == SINKS_LMINF ? 0 : pos;
}

static size_t sink_query_pos(const KVCache *kv, int layer, size_t pos) {
    const LayerSlots *ls = &kv->layers[layer];
    if (kv->sink_kind == SINKS_LMINF) return min_size(pos, kv->limit);
    return min_size(pos, ls->n_sink + ls->window - 1);
}

// Write position pos's key k (kv_dim, not yet rotated; rotated in place to pos) and value v
// into its slot of the layer, and for a sink position its f32 copies too, the key rotated at
// sink_key_pos().
static void kv_write(KVCache *kv, int layer, size_t pos, float *k, const float *v,
                     const LayerRope *rope) {
    const LayerSlots *ls = &kv->layers[layer];
    if (pos < ls->n_sink) {
        float *sink_k = sink_row(kv, kv->sink_key, layer, pos);
        memcpy(sink_k, k, kv->kv_dim * sizeof(float));
        memcpy(sink_row(kv, kv->sink_value, layer, pos), v, kv->kv_dim * sizeof(float));
        rope_rotate(sink_k, kv->n_kv_heads, kv->head_dim, rope, sink_key_pos(kv, pos));
    }
    rope_rotate(k, kv->n_kv_heads, kv->head_dim, rope, pos);
    size_t slot = kv_slot(ls, pos);
    kv_store(kv, kv->key + slot * kv->row_bytes, k);
    kv_store(kv, kv->value + slot * kv->row_bytes, v);
}

// The keys a query at pos sees in a layer, in the order both attention paths take them:
// first the sinks below its window (visible key j < n_sink is sink j, met by the query
// rotated for the sinks), then every position lo .. pos (HF's sliding-window mask, as in
// Mistral: key k is visible iff k <= pos and pos - k < W).
typedef struct {
    size_t n_sink;   // sinks below the window
    size_t lo;       // first position in the window
    size_t pos;      // the query's own position, the last key it sees
} VisibleKeys;

static VisibleKeys visible_keys(const KVCache *kv, int layer, size_t pos) {
    const LayerSlots *ls = &kv->layers[layer];
    VisibleKeys vis = {.lo = 0, .pos = pos};
    if (pos >= ls->window) vis.lo = pos - ls->window + 1;
    vis.n_sink = min_size(vis.lo, ls->n_sink);
    return vis;
}

// Head g of sinks j0 .. j0+n-1 of a layer: pointers to their f32 copies.
static void read_sinks(const KVCache *kv, int layer, size_t j0, int n, int g,
                       const float **keys, const float **values) {
    size_t at = (size_t)g * kv->head_dim;
    for (int j = 0; j < n; j++) {
        keys[j] = sink_row(kv, kv->sink_key, layer, j0 + j) + at;
        values[j] = sink_row(kv, kv->sink_value, layer, j0 + j) + at;
    }
}

// Head g of positions p0 .. p0+n-1 of a layer, read back from their slots as floats
// (kv_head(); kbuf, vbuf: (n, head_dim) room to convert into).
static void read_positions(const KVCache *kv, int layer, size_t p0, int n, int g,
                           const float **keys, const float **values, float *kbuf, float *vbuf) {
    const LayerSlots *ls = &kv->layers[layer];
    size_t slot = kv_slot(ls, p0);
    for (int j = 0; j < n; j++) {
        size_t at = (size_t)j * kv->head_dim;
        keys[j] = kv_head(kv, kv->key + slot * kv->row_bytes, g, kbuf + at);
        values[j] = kv_head(kv, kv->value + slot * kv->row_bytes, g, vbuf + at);
        slot = next_slot(ls, slot);
    }
}

// Head g of visible keys j0 .. j0+n-1 of a query (numbered as visible_keys() orders them).
static void read_visible(const KVCache *kv, int layer, const VisibleKeys *vis, size_t j0, int n,
                         int g, const float **keys, const float **values, float *kbuf,
                         float *vbuf) {
    int n_sinks = (int)(j0 < vis->n_sink ? min_size(vis->n_sink - j0, (size_t)n) : 0);
    read_sinks(kv, layer, j0, n_sinks, g, keys, values);
    size_t p0 = vis->lo + (j0 + n_sinks - vis->n_sink);
    size_t at = (size_t)n_sinks * kv->head_dim;
    read_positions(kv, layer, p0, n - n_sinks, g, keys + n_sinks, values + n_sinks, kbuf + at,
                   vbuf + at);
}

// The context-full policy of generate and chat: when a full-attention layer's slots are all
// taken, it goes on as StreamingLLM with 4 sinks and the rest of its slots as the window. The
// slots already hold the positions where the sinks-and-ring rule looks for them, so nothing
// moves; the sinks' f32 copies are read back from the cache. Returns the window, or 0 (and
// changes nothing) if a layer is too small for it.
static const size_t STREAMING_SINKS = 4;

static size_t kv_continue_streaming(KVCache *kv, int n_layers) {
    const size_t S = STREAMING_SINKS;
    size_t window = 0;
    for (int l = 0; l < n_layers; l++)
        if (kv->layers[l].fills && kv->layers[l].ring < S + (size_t)kv->max_T + 1) return 0;
    for (int l = 0; l < n_layers; l++) {
        LayerSlots *ls = &kv->layers[l];
        if (!ls->fills || ls->n_sink) continue;
        ls->n_sink = S;
        ls->ring -= S;
        ls->window = ls->ring - kv->max_T + 1;
        ls->fills = 0;
        window = ls->window;
        for (size_t i = 0; i < S; i++)
            for (int g = 0; g < kv->n_kv_heads; g++) {
                size_t row = kv_slot(ls, i) * kv->row_bytes;
                size_t at = (size_t)g * kv->head_dim;
                float *k = sink_row(kv, kv->sink_key, l, i) + at;
                float *v = sink_row(kv, kv->sink_value, l, i) + at;
                memmove(k, kv_head(kv, kv->key + row, g, k), kv->head_dim * sizeof(float));
                memmove(v, kv_head(kv, kv->value + row, g, v), kv->head_dim * sizeof(float));
            }
    }
    kv->sink_kind = SINKS_STREAMING;
    return window;
}

// ----------------------------------------------------------------------------
// Context memory: every key and value kept in blocks, the few a query needs retrieved
//
// With --memory on top of --window W and --sinks S, a query sees the sinks, its window, and the
// positions between them that lie in the K blocks of B positions its chunk retrieved (InfLLM:
// Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
// Efficient Context Memory"): S + W + K B keys at most, whatever the text's length. A chunk
// scores each block by Quest's bound (Tang et al. 2024, "Quest: Query-Aware Sparsity for
// Efficient Long-Context LLM Inference"): with M and m the channel-wise max and min of the
// block's keys, sum_i max(q_i M_i, q_i m_i) >= q . k for every key k of the block; q is the
// mean of the chunk's queries of each head of a kv head's group, the scores of the group's
// heads are added, and the K best blocks are the kv head's, for every query of the chunk.
// M and m are kept in int8 steps of a scale per block and kv head, M rounded up and m down
// (round_bounds_out()): wider bounds, so the inequality still holds, in a quarter of the bytes
// that every decoded token reads for every block (bound_score()).
// --memory-score infllm scores blocks by InfLLM's representative tokens instead
// (block_represent(), memory_select()). Positions: memory_block_distance().

// How a chunk scores a block (--memory-score).
typedef enum { SCORE_QUEST, SCORE_INFLLM } MemoryScore;

typedef struct {
    uint8_t *key, *value;      // (cap, row_bytes) position p's key, rotated to p % B (its
                               // offset in its block), and value
    int8_t *bounds;            // (cap / B + 1, n_kv_heads, 2, H) each block's channel-wise
                               // key max, then min, in steps of its scale, rounded outward
    float *bound_scale;        // (cap / B + 1, n_kv_heads) those steps
    float *open_max, *open_min; // (kv_dim) block open_block's bounds in f32, positions up to
    size_t open_block, open_end; // open_end - 1 (memory_bounds())
    int *chosen;               // (n_kv_heads, K) the blocks the chunk retrieved, ascending
    int *n_chosen;             // (n_kv_heads)
    float *repr;               // infllm: (cap / B + 1, n_heads, H) each complete block's
                               // representative key per query head
    float *token_score;        // infllm: (n_heads, score_ring) s_h(t) of position t at t % ring
    size_t score_ring;         // infllm: W + B + max_T, more than the positions not complete
    size_t n_complete;         // infllm: blocks 0 .. n_complete-1 have their representatives
    size_t scored_end;         // infllm: the position after the last chunk's
    size_t cap;                // positions allocated
    size_t n_pos;              // positions stored
    int key_fd, value_fd;      // the files key and value are mapped from, once on file
    size_t unreleased;         // on file: positions written since the maps were released
} MemoryLayer;

// The scratch buffers of the memory's per-chunk work.
typedef enum {
    SCRATCH_MEAN, SCRATCH_SPLIT, SCRATCH_BEST,           // memory_select()
    SCRATCH_RUN_BEST, SCRATCH_RUN_SCORE,                 // select_run()'s lists
    SCRATCH_ROW_PTRS, SCRATCH_ROWS, SCRATCH_POSITIONS,   // attention_memory(): the chunk's rows
    SCRATCH_WEIGHTS, SCRATCH_LISTS,                      // attention_memory(): per thread
    SCRATCH_KERNEL_POSITIONS, SCRATCH_KERNEL_COUNTS,     // chunk_memory()
    SCRATCH_PLACED, SCRATCH_ANGLES,                      // chunk_memory(), memory_place()
    SCRATCH_PROBS, SCRATCH_TAKEN,                        // infllm: token scores, representatives
    SCRATCH_COUNT
} MemoryScratch;

typedef struct {
    int block;                 // B: positions per block (--memory-block)
    int top_k;                 // K: blocks a chunk retrieves per kv head (--memory-blocks)
    size_t distance;           // D: the farthest a retrieved key is placed (--memory-distance)
    MemoryScore score;         // --memory-score
    int repr;                  // --memory-repr R: infllm's representative tokens per block
    int n_heads;               // query heads (infllm: scores and representatives per head)
    MemoryLayer *layers;       // (n_layers)
    int n_layers;
    size_t budget;             // bytes of rows kept in RAM; past it, every layer's go to files
    const char *dir;           // where those files are made
    size_t bytes;              // bytes of rows allocated
    size_t row_bytes;          // one position's key (or value) in the cache's type
    int on_file;
    void *scratch[SCRATCH_COUNT];        // buffers the per-chunk work reuses from call to
    size_t scratch_bytes[SCRATCH_COUNT]; // call (memory_scratch())
} ContextMemory;

// Buffer `which` of m's scratch with room for n elements of size bytes (grown, never shrunk;
// what it held is not kept): the per-token calls allocate nothing once it has grown.
static void *memory_scratch(ContextMemory *m, MemoryScratch which, size_t n, size_t size) {
    size_t bytes = mul_size(n, size, "the context memory's scratch");
    if (bytes <= m->scratch_bytes[which]) return m->scratch[which];
    free(m->scratch[which]);
    m->scratch[which] = xcalloc(bytes, 1, "the context memory's scratch");
    m->scratch_bytes[which] = bytes;
    return m->scratch[which];
}

static ContextMemory *new_memory(const KVCache *kv, int block, int top_k, size_t distance) {
    ContextMemory *m = xcalloc(1, sizeof(ContextMemory), "the context memory");
    m->block = block;
    m->top_k = top_k;
    m->distance = distance;
    m->budget = SIZE_MAX;
    m->n_layers = kv->n_layers;
    m->row_bytes = kv->row_bytes;
    m->layers = xcalloc(kv->n_layers, sizeof(MemoryLayer), "the context memory");
    for (int l = 0; l < kv->n_layers; l++) {
        MemoryLayer *ml = &m->layers[l];
        ml->chosen = xcalloc(max_size((size_t)kv->n_kv_heads * top_k, 1), sizeof(int), "memory");
        ml->n_chosen = xcalloc(kv->n_kv_heads, sizeof(int), "the context memory");
        ml->open_max = xcalloc(kv->kv_dim, sizeof(float), "the context memory");
        ml->open_min = xcalloc(kv->kv_dim, sizeof(float), "the context memory");
    }
    return m;
}

// --memory-score infllm with R representative tokens per block: each layer's ring of token
// scores (every query head's, for the positions of the blocks not complete yet).
static void memory_use_infllm(ContextMemory *m, const KVCache *kv, int n_heads, int repr) {
    m->score = SCORE_INFLLM;
    m->repr = repr;
    m->n_heads = n_heads;
    for (int l = 0; l < kv->n_layers; l++) {
        MemoryLayer *ml = &m->layers[l];
        size_t window = min_size(kv->layers[l].window, kv->context);
        ml->score_ring = add_size(window, (size_t)m->block + kv->max_T, "the context memory");
        ml->token_score = xcalloc(mul_size(ml->score_ring, n_heads, "the context memory"),
                                  sizeof(float), "the context memory");
    }
}

// Rows in RAM up to budget_mb MB of them (every layer's keys and values), then in files made
// in dir (deleted at once, so they go when the run does). The budget must hold a block of
// every layer.
static void memory_budget(ContextMemory *m, const KVCache *kv, float budget_mb, const char *dir) {
    size_t block = mul_size(mul_size(m->block, kv->row_bytes, "memory"), 2 * m->n_layers, "memory");
    m->budget = (size_t)((double)budget_mb * 1048576);   // at most 1e9 MB: no overflow
    m->dir = dir;
    if (m->budget < block)
        die("--memory-budget %g MB holds less than one block of every layer (%.3f MB)",
            budget_mb, block / 1048576.0);
}

// A layer's key or value rows (bytes of them) let go of: freed, or unmapped and their file
// closed.
static void store_free(uint8_t *rows, size_t bytes, int fd) {
    if (fd < 0) {
        free(rows);
        return;
    }
    if (rows) munmap(rows, bytes);
    close(fd);
}

static void free_memory(ContextMemory *m, int n_layers) {
    if (!m) return;
    for (int l = 0; l < n_layers; l++) {
        MemoryLayer *ml = &m->layers[l];
        void *buffers[] = { ml->bounds, ml->bound_scale, ml->open_max, ml->open_min, ml->chosen,
                            ml->n_chosen, ml->repr, ml->token_score };
        for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
        size_t bytes = ml->cap * m->row_bytes;
        store_free(ml->key, bytes, m->on_file ? ml->key_fd : -1);
        store_free(ml->value, bytes, m->on_file ? ml->value_fd : -1);
    }
    for (int i = 0; i < SCRATCH_COUNT; i++) free(m->scratch[i]);
    free(m->layers);
    free(m);
}

static void *resize(void *p, size_t n, size_t size, const char *what) {
    void *q = realloc(p, mul_size(n, size, what));
    if (!q) die("out of memory for %s (%zu x %zu bytes)", what, n, size);
    return q;
}

// Grow rows from old to new bytes: realloc in RAM, or (fd: the file they are mapped from) the
// file made longer and mapped again; what they held stays.
static uint8_t *store_grow(uint8_t *rows, size_t old, size_t new, int fd) {
    if (fd < 0) return resize(rows, new, 1, "the context memory");
    if (ftruncate(fd, (off_t)new) != 0)
        die("the context memory's file: cannot grow it to %zu bytes: %s", new, strerror(errno));
    if (rows) munmap(rows, old);
    void *p = mmap(NULL, new, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("the context memory's file: cannot map %zu bytes: %s", new, strerror(errno));
    return p;
}

// Move rows (bytes of them) from RAM into a new file in dir, deleted at once (it lives while
// it is open); returns the file's descriptor, *rows its map. Written with write(), not copied
// into the map, so that the pages go to the page cache without joining the run's resident set.
static int store_to_file(uint8_t **rows, size_t bytes, const char *dir) {
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/longrun-memory-XXXXXX", dir) >= (int)sizeof(path))
        die("%s: too long a path for the context memory's files", dir);
    int fd = mkstemp(path);
    if (fd < 0) die("%s: cannot create the context memory's file: %s", path, strerror(errno));
    unlink(path);
    for (size_t done = 0; done < bytes;) {
        ssize_t n = write(fd, *rows + done, bytes - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("%s: cannot write the context memory's file: %s", dir, strerror(errno));
        done += (size_t)n;
    }
    free(*rows);
    *rows = bytes ? store_grow(NULL, 0, bytes, fd) : NULL;
    return fd;
}

// Rows in files are mapped shared, and every page the run writes or reads stays in its
// resident set while mapped: at 1M tokens that would be the whole store. So after every
// MEMORY_RELEASE_EVERY positions a layer writes, its files are mapped afresh (store_grow() to
// the same size: the rows stay in the file and the page cache, and a page touched again maps
// back); what stays resident is the rows in RAM, the bounds and the blocks read since.
#define MEMORY_RELEASE_EVERY 1024

static void memory_release(ContextMemory *m, int layer, size_t written) {
    MemoryLayer *ml = &m->layers[layer];
    ml->unreleased += written;
    if (!m->on_file || ml->unreleased < MEMORY_RELEASE_EVERY) return;
    size_t bytes = ml->cap * m->row_bytes;
    ml->key = store_grow(ml->key, bytes, bytes, ml->key_fd);
    ml->value = store_grow(ml->value, bytes, bytes, ml->value_fd);
    ml->unreleased = 0;
}

// Past the budget: every layer's rows move to files.
static void memory_to_files(ContextMemory *m) {
    for (int l = 0; l < m->n_layers; l++) {
        MemoryLayer *ml = &m->layers[l];
        ml->key_fd = store_to_file(&ml->key, ml->cap * m->row_bytes, m->dir);
        ml->value_fd = store_to_file(&ml->value, ml->cap * m->row_bytes, m->dir);
    }
    m->on_file = 1;
    fprintf(stderr, "\n[memory: past its budget of %.3g MB, the blocks go on in files in %s]\n",
            m->budget / 1048576.0, m->dir);
}

// Room for positions .. n-1 in a layer's store (capacity doubled as the text grows).
static void memory_reserve(ContextMemory *m, const KVCache *kv, int layer, size_t n) {
    MemoryLayer *ml = &m->layers[layer];
    if (n <= ml->cap) return;
    size_t cap = max_size(n, mul_size(ml->cap, 2, "the context memory"));
    size_t blocks = cap / m->block + 1;
    size_t old = ml->cap * m->row_bytes;
    size_t new = mul_size(cap, m->row_bytes, "the context memory");
    m->bytes = add_size(m->bytes, 2 * (new - old), "the context memory");
    if (!m->on_file && m->bytes > m->budget) memory_to_files(m);
    ml->key = store_grow(ml->key, old, new, m->on_file ? ml->key_fd : -1);
    ml->value = store_grow(ml->value, old, new, m->on_file ? ml->value_fd : -1);
    size_t bounds = mul_size(blocks, 2 * kv->kv_dim, "the context memory");
    ml->bounds = resize(ml->bounds, bounds, 1, "the context memory");
    ml->bound_scale = resize(ml->bound_scale, mul_size(blocks, kv->n_kv_heads, "memory"),
                             sizeof(float), "the context memory");
    if (m->score == SCORE_INFLLM) {
        size_t reprs = mul_size(blocks, (size_t)m->n_heads * kv->head_dim, "the context memory");
        ml->repr = resize(ml->repr, reprs, sizeof(float), "the context memory");
    }
    ml->cap = cap;
}

// Keep position pos's key k (kv_dim, rotated to pos % B: memory_block_distance()) and value v,
// in the cache's type.
static void memory_write(ContextMemory *m, const KVCache *kv, int layer, size_t pos,
                         const float *k, const float *v) {
    MemoryLayer *ml = &m->layers[layer];
    kv_store(kv, ml->key + pos * kv->row_bytes, k);
    kv_store(kv, ml->value + pos * kv->row_bytes, v);
}

// A whole number of steps as an int8, within +-127 (damaged keys' NaN and infinities: 0, +-127).
static int8_t saturate_step(float steps) {
    if (isnan(steps)) return 0;
    return (int8_t)max_float(-127, min_float(127, steps));
}

// One kv head's channel-wise bounds hi >= lo (H each) in int8 steps of the returned scale,
// rounded outward: codes[0 .. H-1] * scale >= hi and codes[H .. 2H-1] * scale <= lo (Quest's
// inequality survives). The scale is the largest |bound| / 127, nudged up until that bound is
// at most 127 steps both ways of rounding it (divided and multiplied), so no code passes 127;
// each code is moved one more step where the float product falls short of its bound.
static float round_bounds_out(const float *hi, const float *lo, int H, int8_t *codes) {
    float amax = 0;
    for (int i = 0; i < H; i++) amax = max_float(amax, max_float(fabsf(hi[i]), fabsf(lo[i])));
    if (amax == 0) {
        memset(codes, 0, 2 * (size_t)H);
        return 0;
    }
    float scale = amax / 127;
    while (amax / scale > 127 || scale * 127 < amax) scale = nextafterf(scale, INFINITY);
    for (int i = 0; i < H; i++) {
        float up = ceilf(hi[i] / scale);
        float down = floorf(lo[i] / scale);
        if (up * scale < hi[i]) up += 1;
        if (down * scale > lo[i]) down -= 1;
        codes[i] = saturate_step(up);
        codes[H + i] = saturate_step(down);
    }
    return scale;
}

// Fold the keys as stored of positions from .. end-1 (one block's) into the layer's open
// bounds, f32 max and min per channel (kv_dim each); from = the block's first position starts
// them afresh. buf: H floats.
static void fold_bounds(MemoryLayer *ml, const KVCache *kv, size_t from, size_t end, int first,
                        float *buf) {
    int H = kv->head_dim;
    for (size_t p = from; p < end; p++)
        for (int g = 0; g < kv->n_kv_heads; g++) {
            const float *key = kv_head(kv, ml->key + p * kv->row_bytes, g, buf);
            float *hi = ml->open_max + (size_t)g * H;
            float *lo = ml->open_min + (size_t)g * H;
            int fresh = first && p == from;
            for (int i = 0; i < H; i++) hi[i] = fresh ? key[i] : max_float(hi[i], key[i]);
            for (int i = 0; i < H; i++) lo[i] = fresh ? key[i] : min_float(lo[i], key[i]);
        }
}

// After positions p0 .. p0+n-1 are written: the bounds of the blocks holding them, from all
// each block's positions so far, kept as round_bounds_out()'s steps. The f32 bounds of the last
// block touched stay open, so the next call (the next chunk, or decode's next token) folds in
// only its own positions; a call that does not continue them (a text that went back, a state
// just loaded) reads the block's earlier rows again.
static void memory_bounds(ContextMemory *m, const KVCache *kv, int layer, size_t p0, size_t n,
                          float *buf) {
    MemoryLayer *ml = &m->layers[layer];
    int H = kv->head_dim;
    for (size_t b = p0 / m->block; b * m->block < p0 + n; b++) {
        size_t start = b * m->block;
        size_t from = max_size(start, p0);
        size_t end = min_size(start + m->block, p0 + n);
        if (!(ml->open_block == b && ml->open_end == from)) from = start;   // not continuing
        fold_bounds(ml, kv, from, end, from == start, buf);
        ml->open_block = b;
        ml->open_end = end;
        for (int g = 0; g < kv->n_kv_heads; g++) {
            size_t at = b * kv->n_kv_heads + g;
            ml->bound_scale[at] = round_bounds_out(ml->open_max + (size_t)g * H,
                                                   ml->open_min + (size_t)g * H, H,
                                                   ml->bounds + at * 2 * H);
        }
    }
    ml->n_pos = max_size(ml->n_pos, p0 + n);
}

// Where retrieved blocks are placed (the one rule). Seen from the chunk's last query at
// position `last`, the block starting at position s sits at distance
//     d(s) = min(last - s, D)
// (its first position's; position s + j is at d(s) - j, so a block keeps its own order). A block
// nearer than D is at its true distance (Quest's rule, and with K >= every block and D >= the
// text, full attention); a farther one is moved up to distance D, so no distance exceeds what
// the model was trained on (InfLLM's idea, Xiao et al. 2024, which puts every block at the
// window's edge; D = W + B - 1 comes closest to that). Earlier queries of a chunk see its blocks
// as many positions nearer as they are earlier. How the rotations make it so:
//   keys are stored rotated to j = p % B (rotate_and_cache());
//   query t of the chunk (position pos0 + t) meets them rotated to D + t;
//   block s's keys are turned on by D + (last - pos0) - d(s) when the chunk reads them
//   (memory_place()), so query t sees position s + j at d(s) - j - (last - pos0 - t).
static size_t memory_block_distance(const ContextMemory *m, size_t block_start, size_t last) {
    return min_size(last - block_start, m->distance);
}

// Where a chunk's queries meet a block to score it (memory_select()): rotated to W + B - 1, so
// position s + j of every block is at distance W + B - 1 - j, just past the window.
static size_t memory_score_angle(const ContextMemory *m, const LayerSlots *ls) {
    return ls->window + (size_t)m->block - 1;
}

// A kv head's group of queries (group rows of H) split as Quest's bound takes them:
// pos_i = sum_h max(q_h,i, 0) and neg_i = sum_h min(q_h,i, 0).
static void split_queries(const float *q, int group, int H, float *pos, float *neg) {
    for (int i = 0; i < H; i++) {
        pos[i] = 0;
        neg[i] = 0;
    }
    for (int h = 0; h < group; h++)
        for (int i = 0; i < H; i++) {
            pos[i] += max_float(q[(size_t)h * H + i], 0);
            neg[i] += min_float(q[(size_t)h * H + i], 0);
        }
}

// Quest's bound of block b for kv head g summed over its group's queries, from their split
// (pos, neg: H each): as M_i >= m_i, max(q_i M_i, q_i m_i) = max(q_i, 0) M_i + min(q_i, 0) m_i,
// so sum_h sum_i max(q_h,i M_i, q_h,i m_i) = sum_i pos_i M_i + neg_i m_i: one dot product of
// the split (pos, then neg: 2 H) with the block's steps (its maxima, then minima), for the
// whole group. Decode runs this for every block of every layer, hence dot_i8().
static float bound_score(const MemoryLayer *ml, const KVCache *kv, size_t b, int g,
                         const float *split) {
    size_t at = b * kv->n_kv_heads + g;
    const int8_t *steps = ml->bounds + at * 2 * kv->head_dim;
    return ml->bound_scale[at] * dot_i8(split, steps, 2 * kv->head_dim);
}

// Keep the K best (block, score) pairs in best (sorted by score, ties to the earlier one; a
// NaN score, from a damaged key or query, ranks last, so every order of the pairs gives one
// K). While n < k the pair is always added: j calls from empty hold min(j, k) pairs.
static int keep_best(int *best, float *best_score, int n, int k, int b, float score) {
    if (isnan(score)) score = -INFINITY;
    if (k == 0 || (n == k && score <= best_score[k - 1])) return n;   // ties: the lower stays
    int at = k - 1;   // the worst's place, or a new one
    if (n < k) at = n;
    if (n < k) n++;
    while (at > 0 && best_score[at - 1] < score) {
        best[at] = best[at - 1];
        best_score[at] = best_score[at - 1];
        at--;
    }
    best[at] = b;
    best_score[at] = score;
    return n;
}

// InfLLM's score of block b for kv head g: sum_h <qbar_h, r_b,h> over the group's query heads
// (mean: their mean queries, group * H floats), no 1 / sqrt(H): one dot product, as the group's
// rows are contiguous in both.
static float repr_score(const ContextMemory *m, const MemoryLayer *ml, const KVCache *kv,
                        size_t b, int g, int group, const float *mean) {
    int n = group * kv->head_dim;
    const float *r = ml->repr + (b * m->n_heads * kv->head_dim + (size_t)g * n);
    float score = 0;
    for (int i = 0; i < n; i++) score += mean[i] * r[i];
    return score;
}

// A chunk's score of block b for kv head g (mean: the mean queries of its group's heads, group
// rows of H; split: split_queries() of them, 2 H): Quest's bounds summed over the heads, or
// InfLLM's representatives.
static float chunk_score(const ContextMemory *m, const MemoryLayer *ml, const KVCache *kv,
                         size_t b, int g, int group, const float *mean, const float *split) {
    if (m->score == SCORE_INFLLM) return repr_score(m, ml, kv, b, g, group, mean);
    return bound_score(ml, kv, b, g, split);
}

// Infllm, a chunk at pos0 in a text that went back (passkey's next trial starts again at 0,
// bench repeats a test at one depth): the blocks complete at pos0 keep their representatives,
// which only queries before pos0 shaped; the later ones are not complete any more. (The scores
// of positions not complete still hold what the abandoned queries added: exact from 0 only.)
static void memory_rewind(ContextMemory *m, const KVCache *kv, int layer, size_t pos0) {
    MemoryLayer *ml = &m->layers[layer];
    if (pos0 < ml->scored_end)
        ml->n_complete = min_size(ml->n_complete, visible_keys(kv, layer, pos0).lo / m->block);
    ml->scored_end = pos0;
}

// Decode reads every block's bounds once a token (at 128K tokens, 2,048 blocks of 2 kv_dim
// bytes a layer: 24 MB for SmolLM2), and the scan waited on its loads (perf), so select_run()
// asks for the bounds BOUNDS_AHEAD blocks on while it scores one (decode at 128K: 67 -> 70
// tokens/s).
enum { BOUNDS_AHEAD = 8, CACHE_LINE = 64 };

static void prefetch_bytes(const void *p, size_t n) {
    for (size_t at = 0; at < n; at += CACHE_LINE) __builtin_prefetch((const char *)p + at);
    if (n) __builtin_prefetch((const char *)p + n - 1);   // the last line, if p is not aligned
}

static int compare_ints(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

// One thread's share of memory_select(): blocks first .. end-1 scored, and for each kv head
// g the K best of them (keep_best(); fewer if the run is shorter) in best and best_score (K
// each) at g K. The list's length is known, not counted: no count shared between threads.
static void select_run(const ContextMemory *m, const MemoryLayer *ml, const KVCache *kv,
                       const float *mean, const float *split, int group, size_t first,
                       size_t end, int *best, float *best_score) {
    int G = kv->n_kv_heads;
    int K = m->top_k;
    int H = kv->head_dim;
    for (size_t b = first; b < end; b++) {
        int n = (int)min_size(b - first, (size_t)K);   // each list's length so far
        if (b + BOUNDS_AHEAD < end && m->score == SCORE_QUEST)
            prefetch_bytes(ml->bounds + (b + BOUNDS_AHEAD) * 2 * kv->kv_dim, 2 * kv->kv_dim);
        for (int g = 0; g < G; g++) {
            float score = chunk_score(m, ml, kv, b, g, group, mean + (size_t)g * group * H,
                                      split + (size_t)g * 2 * H);
            size_t at = (size_t)g * K;
            keep_best(best + at, best_score + at, n, K, (int)b, score);
        }
    }
}

// Where run r of n blocks cut into `runs` starts (run `runs` starts at n).
static size_t run_start(size_t n, int r, int runs) {
    return n * (size_t)r / (size_t)runs;
}

// A chunk's retrieval in one layer: for each kv head, the K blocks with the best summed score
// over its query heads (q_score: (T, q_dim), the chunk's queries rotated to
// memory_score_angle()) among the blocks holding a position between the sinks and the last
// query's window (infllm: among the complete blocks, those with representatives); equal
// scores go to the lower block. At 1M tokens decode scans 16K blocks a layer, so each thread
// takes a run of them and keeps its own K best (select_run()); merged run by run (tied blocks
// reach keep_best() lowest first, as in one pass), the runs' lists give one pass's K.
static void memory_select(ContextMemory *m, const KVCache *kv, int layer, const float *q_score,
                          const Config *c, int T, size_t pos0) {
    MemoryLayer *ml = &m->layers[layer];
    const LayerSlots *ls = &kv->layers[layer];
    VisibleKeys last = visible_keys(kv, layer, pos0 + T - 1);
    size_t first_block = ls->n_sink / m->block;
    size_t end_block = last.lo > ls->n_sink ? (last.lo - 1) / m->block + 1 : first_block;
    if (m->score == SCORE_INFLLM) memory_rewind(m, kv, layer, pos0);
    if (m->score == SCORE_INFLLM) end_block = min_size(end_block, ml->n_complete);
    size_t n_blocks = end_block > first_block ? end_block - first_block : 0;
    int H = c->head_dim;
    int G = c->n_kv_heads;
    int K = m->top_k;
    int group = c->n_heads / G;
    int runs = n_blocks >= 64 ? n_threads() : 1;
    size_t lists = mul_size((size_t)runs * G, max_size(K, 1), "memory");   // (runs, G, K)
    float *mean = memory_scratch(m, SCRATCH_MEAN, (size_t)c->q_dim, sizeof(float));
    float *split = memory_scratch(m, SCRATCH_SPLIT, 2 * (size_t)c->kv_dim, sizeof(float));
    int *run_best = memory_scratch(m, SCRATCH_RUN_BEST, lists, sizeof(int));
    float *run_score = memory_scratch(m, SCRATCH_RUN_SCORE, lists, sizeof(float));
    float *best_score = memory_scratch(m, SCRATCH_BEST, max_size(K, 1), sizeof(float));
    memset(mean, 0, (size_t)c->q_dim * sizeof(float));
    for (int t = 0; t < T; t++)   // each head's mean query (q_dim)
        for (int i = 0; i < c->q_dim; i++) mean[i] += q_score[(size_t)t * c->q_dim + i] / T;
    for (int g = 0; g < G; g++) {   // (n_kv_heads, 2, H)
        float *pos = split + (size_t)g * 2 * H;
        split_queries(mean + (size_t)g * group * H, group, H, pos, pos + H);
    }
    PARALLEL_FOR_IF(runs > 1)
    for (int r = 0; r < runs; r++) {
        size_t at = (size_t)r * G * K;
        select_run(m, ml, kv, mean, split, group, first_block + run_start(n_blocks, r, runs),
                   first_block + run_start(n_blocks, r + 1, runs), run_best + at,
                   run_score + at);
    }
    for (int g = 0; g < G; g++) {
        int *best = ml->chosen + (size_t)g * K;
        int n = 0;
        for (int r = 0; r < runs; r++) {
            size_t at = ((size_t)r * G + g) * K;
            size_t length = run_start(n_blocks, r + 1, runs) - run_start(n_blocks, r, runs);
            int listed = (int)min_size(length, (size_t)K);
            for (int j = 0; j < listed; j++)
                n = keep_best(best, best_score, n, K, run_best[at + j], run_score[at + j]);
        }
        qsort(best, n, sizeof(int), compare_ints);
        ml->n_chosen[g] = n;
    }
}

// Kv head g's key or value (H) of memory position p as floats (kv_head(): maybe in buf).
static const float *memory_row(const KVCache *kv, const uint8_t *rows, size_t p, int g,
                               float *buf) {
    return kv_head(kv, rows + p * kv->row_bytes, g, buf);
}

// The memory positions a query at pos sees (kv head g): those of the chunk's blocks at or
// above the sinks and below its window, in order, into out; returns how many. Infllm: then
// the remainder, the positions below its window of the blocks not complete yet (InfLLM attends
// to them always: they have no representatives to be retrieved by).
static size_t memory_positions(const ContextMemory *m, const KVCache *kv, int layer, int g,
                               size_t pos, size_t *out) {
    const MemoryLayer *ml = &m->layers[layer];
    VisibleKeys vis = visible_keys(kv, layer, pos);
    size_t n = 0;
    for (int i = 0; i < ml->n_chosen[g]; i++) {
        size_t b = (size_t)ml->chosen[(size_t)g * m->top_k + i];
        size_t from = max_size(b * m->block, kv->layers[layer].n_sink);
        size_t to = min_size((b + 1) * m->block, vis.lo);
        for (size_t p = from; p < to; p++) out[n++] = p;
    }
    if (m->score == SCORE_INFLLM)
        for (size_t p = max_size(ml->n_complete * m->block, kv->layers[layer].n_sink); p < vis.lo;
             p++)
            out[n++] = p;
    return n;
}

// Kv head g's rows of memory positions pos[0 .. n-1] (ascending) as floats, placed for a chunk
// of T queries at pos0..: keys (n, H) turned by D + T - 1 - d(s) from the p % B they are stored
// at (memory_block_distance(); one set of angles per block, cos then sin of each channel pair
// into angles (rotary_dim); a pure turn, for the stored keys carry RoPE's attention factor
// already), values (n, H) as stored. A decoded token's blocks farther than D need no turn.
static void memory_place(const ContextMemory *m, const KVCache *kv, const LayerRope *rope,
                         int layer, int g, const size_t *pos, size_t n, int T, size_t pos0,
                         float *keys, float *values, float *angles) {
    const MemoryLayer *ml = &m->layers[layer];
    int H = kv->head_dim;
    int half = rope->rotary_dim / 2;
    size_t last = pos0 + (size_t)T - 1;
    size_t block = SIZE_MAX;   // whose angles those are
    for (size_t j = 0; j < n; j++) {
        float *key = keys + j * H;
        float *value = values + j * H;
        const float *row = memory_row(kv, ml->key, pos[j], g, key);
        if (row != key) memcpy(key, row, (size_t)H * sizeof(float));
        row = memory_row(kv, ml->value, pos[j], g, value);
        if (row != value) memcpy(value, row, (size_t)H * sizeof(float));
        size_t start = pos[j] / m->block * m->block;
        size_t turn = m->distance + (last - pos0) - memory_block_distance(m, start, last);
        if (turn && start != block)
            for (int i = 0; i < half; i++) rope_angle(rope, i, turn, &angles[i], &angles[half + i]);
        block = start;
        for (int i = 0; turn && i < half; i++)
            rope_turn(key, 1, H, half, i, angles[i], angles[half + i]);
    }
}

// What the fast kernels need to read a chunk's memory (chunk_memory()): for each kv head g
// the memory positions the chunk's last query sees, ascending (an earlier query sees those
// below its own window: a prefix), their keys and values placed (memory_place()), and the
// queries rotated to meet them.
typedef struct {
    const float *q_mem;   // (T, q_dim) query t rotated to D + t (memory_block_distance())
    const size_t *pos;    // (n_kv_heads, stride) kv head g's memory positions
    const size_t *n;      // (n_kv_heads) how many
    const float *keys;    // (n_kv_heads, stride, H) their keys, placed
    const float *values;  // (n_kv_heads, stride, H) their values
    size_t stride;        // the most a kv head sees: K B (infllm: + its remainder)
} MemoryKeys;

static MemoryKeys chunk_memory(ContextMemory *m, const KVCache *kv, const LayerRope *rope,
                               int layer, const float *q_mem, int T, size_t pos0) {
    size_t stride = max_size(mul_size(m->top_k, m->block, "memory"), 1);
    if (m->score == SCORE_INFLLM)   // and the remainder memory_positions() adds
        stride = add_size(stride, (size_t)m->block + (size_t)T, "memory");
    size_t rows = mul_size(stride, kv->n_kv_heads, "memory");
    size_t *pos = memory_scratch(m, SCRATCH_KERNEL_POSITIONS, rows, sizeof(size_t));
    size_t *n = memory_scratch(m, SCRATCH_KERNEL_COUNTS, kv->n_kv_heads, sizeof(size_t));
    float *keys = memory_scratch(m, SCRATCH_PLACED, mul_size(rows, 2 * (size_t)kv->head_dim,
                                                             "memory"), sizeof(float));
    float *values = keys + rows * kv->head_dim;
    size_t angle_floats = max_size((size_t)rope->rotary_dim, 1);
    float *angles = memory_scratch(m, SCRATCH_ANGLES, mul_size(n_threads(), angle_floats,
                                                               "memory"), sizeof(float));
    for (int g = 0; g < kv->n_kv_heads; g++)
        n[g] = memory_positions(m, kv, layer, g, pos0 + (size_t)T - 1, pos + (size_t)g * stride);
    int pieces = (int)((stride + m->block - 1) / m->block);   // a job: B rows of one kv head
    PARALLEL_FOR
    for (int job = 0; job < kv->n_kv_heads * pieces; job++) {
        int g = job / pieces;
        size_t i0 = (size_t)(job % pieces) * m->block;
        if (i0 >= n[g]) continue;
        size_t at = (size_t)g * stride + i0;
        memory_place(m, kv, rope, layer, g, pos + at, min_size(n[g] - i0, m->block), T, pos0,
                     keys + at * kv->head_dim, values + at * kv->head_dim,
                     angles + (size_t)thread_id() * angle_floats);
    }
    MemoryKeys mk = {.q_mem = q_mem, .pos = pos, .n = n, .keys = keys, .values = values,
                     .stride = stride};
    return mk;
}

// InfLLM's token scores (Xiao et al. 2024, section 3.2): s_h(t), per layer and query head h,
// sums the softmax probabilities position t receives from every query whose window holds it
// (itself included; one softmax over sinks, memory and window), in f32. Kept in a ring per
// layer, only for the positions of the blocks not complete yet. A chunk's new positions start
// at 0 (the slots they take are of complete blocks').
static void clear_token_scores(ContextMemory *m, int layer, size_t pos0, int T) {
    MemoryLayer *ml = &m->layers[layer];
    for (int h = 0; h < m->n_heads; h++)
        for (size_t p = pos0; p < pos0 + (size_t)T; p++)
            ml->token_score[(size_t)h * ml->score_ring + p % ml->score_ring] = 0;
}

// Add the chunk's window probabilities for kv head g's query heads: probs row t * group + i
// (stride floats apart) is query t's, head g * group + i, over its window lo .. pos. Query by
// query in order, so the sums do not depend on the threads.
static void add_token_scores(ContextMemory *m, const KVCache *kv, int layer, int g,
                             const float *probs, size_t stride, int T, size_t pos0) {
    MemoryLayer *ml = &m->layers[layer];
    int group = m->n_heads / kv->n_kv_heads;
    size_t ring = ml->score_ring;
    for (int i = 0; i < group; i++) {
        float *score = ml->token_score + (size_t)(g * group + i) * ring;
        for (int t = 0; t < T; t++) {
            VisibleKeys vis = visible_keys(kv, layer, pos0 + (size_t)t);
            const float *row = probs + ((size_t)t * group + i) * stride;
            size_t slot = vis.lo % ring;
            for (size_t j = 0; j <= vis.pos - vis.lo; j++) {
                score[slot] += row[j];
                slot = slot + 1 == ring ? 0 : slot + 1;
            }
        }
    }
}

// Block b's representative key for each query head h (InfLLM's): the mean of the stored keys
// (kv head h / group) of the R positions of the block past the sinks with the highest s_h,
// ties to the lower position (all of them if the block has fewer).
static void block_represent(ContextMemory *m, const KVCache *kv, int layer, size_t b,
                            float *buf) {
    MemoryLayer *ml = &m->layers[layer];
    int H = kv->head_dim;
    int group = m->n_heads / kv->n_kv_heads;
    size_t from = max_size(b * m->block, kv->layers[layer].n_sink);
    size_t to = (b + 1) * m->block;
    size_t n = to > from ? min_size((size_t)m->repr, to - from) : 0;
    char *taken = memory_scratch(m, SCRATCH_TAKEN, m->block, 1);
    for (int h = 0; h < m->n_heads; h++) {
        float *r = ml->repr + (b * m->n_heads + (size_t)h) * H;
        const float *score = ml->token_score + (size_t)h * ml->score_ring;
        memset(r, 0, (size_t)H * sizeof(float));
        memset(taken, 0, m->block);
        for (size_t k = 0; k < n; k++) {
            size_t best = to;
            for (size_t p = from; p < to; p++)
                if (!taken[p - from] && (best == to || score[p % ml->score_ring] >
                                                       score[best % ml->score_ring]))
                    best = p;
            taken[best - from] = 1;
            const float *key = memory_row(kv, ml->key, best, h / group, buf);
            for (int i = 0; i < H; i++) r[i] += key[i];
        }
        for (int i = 0; i < H && n; i++) r[i] /= (float)n;
    }
}

// After the chunk that ends before next_pos: the blocks whose positions have all left the
// window (no later query's window holds them, so their scores are final) get their
// representatives and become retrievable.
static void memory_complete(ContextMemory *m, const KVCache *kv, int layer, size_t next_pos,
                            float *buf) {
    MemoryLayer *ml = &m->layers[layer];
    size_t lo = visible_keys(kv, layer, next_pos).lo;
    ml->scored_end = next_pos;
    while ((ml->n_complete + 1) * m->block <= lo) {
        block_represent(m, kv, layer, ml->n_complete, buf);
        ml->n_complete++;
    }
}

// ----------------------------------------------------------------------------
// Blocks: the operations forward() is made of, each the plain loop
//
// matmul_reference() and attention_reference() are the textbook algorithms, with no tiles,
// no SIMD and no threads. They are executable, not decoration: `--reference` sends the whole
// forward pass through them, and the tests hold the fast kernels of kernels.c to them
// (tests/test_reference.py).

// Dot product with 16 independent partial sums, a shape the compiler turns into SIMD
// without -ffast-math (a single running sum would force it to add in order).
static float dot(const float *a, const float *b, size_t n) {
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float sum = 0;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < 16; j++) sum += acc[j];
    return sum;
}

// RMSNorm (Zhang & Sennrich 2019), per row of x (T, n): out = w * x / sqrt(mean(x^2) + eps).
static void rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps) {
    PARALLEL_FOR_IF(T > 1)
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * n;
        float *o = out + (size_t)t * n;
        float ss = dot(xr, xr, n) / n;
        float inv = 1.0f / sqrtf(ss + eps);
        for (int i = 0; i < n; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

static void add_bias(float *x, const float *bias, int T, int n) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < n; i++) x[(size_t)t * n + i] += bias[i];
}

// SwiGLU (Shazeer 2020), per row of gate, up (T, n): gate = silu(gate) * up,
// silu(x) = x / (1 + e^-x).
static void swiglu(float *gate, const float *up, int T, int n) {
    PARALLEL_FOR_IF(T > 1)
    for (int t = 0; t < T; t++)
        for (size_t i = (size_t)t * n; i < (size_t)(t + 1) * n; i++)
            gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// The residual connection: x (T, n) += y (T, n).
static void add_rows(float *x, const float *y, int T, int n) {
    PARALLEL_FOR_IF(T > 1)
    for (int t = 0; t < T; t++)
        for (size_t i = (size_t)t * n; i < (size_t)(t + 1) * n; i++) x[i] += y[i];
}

// out (T, rows) = x (T, cols) @ w^T: one dot product per output, in double, over the weights'
// rows as float32 (weight_row() dequantizes f16, bf16 and q8_0).
// row_buf: (w->cols) floats for weight_row() to dequantize into.
static void matmul_reference(float *out, const float *x, const Tensor *w, int T, float *row_buf) {
    for (size_t r = 0; r < w->rows; r++) {
        const float *row = weight_row(w, r, row_buf);
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * w->cols;
            double sum = 0;
            for (size_t i = 0; i < w->cols; i++) sum += (double)xt[i] * row[i];
            out[(size_t)t * w->rows + r] = (float)sum;
        }
    }
}

// In-place softmax over x[0..n): subtract the max first so exp never overflows.
static void softmax(float *x, size_t n) {
    float max = -INFINITY;
    for (size_t i = 0; i < n; i++) max = max_float(max, x[i]);
    float sum = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (size_t i = 0; i < n; i++) x[i] /= sum;
}

// Scaled dot-product attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al.
// 2023) of T queries at positions pos0.. against one layer's cache, which already holds their
// keys and values; q, q_sink (the queries rotated for the sinks), out: (T, q_dim). For query
// row t at position p and head h, whose kv head is g = h / (n_heads / n_kv_heads):
//   out_h = sum_j softmax_j(q . k_j / sqrt(H)) v_j
// over exactly the keys visible_keys() lists (the sinks below the window, scored with q_sink,
// then positions lo .. p), each read back from the cache by read_visible().
static void attention_reference(float *out, const float *q, const float *q_sink,
                                const KVCache *kv, int layer, const Config *c, int T,
                                size_t pos0) {
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)H);
    size_t most_keys = add_size(kv->layers[layer].n_sink, pos0 + (size_t)T, "attention");
    float *weights = xcalloc(most_keys, sizeof(float), "reference attention");
    float *key_buf = xcalloc(H, sizeof(float), "reference attention");
    float *value_buf = xcalloc(H, sizeof(float), "reference attention");
    for (int t = 0; t < T; t++) {
        VisibleKeys vis = visible_keys(kv, layer, pos0 + (size_t)t);
        size_t n = vis.n_sink + (vis.pos - vis.lo + 1);
        for (int h = 0; h < c->n_heads; h++) {
            size_t at = (size_t)t * c->q_dim + (size_t)h * H;
            const float *key, *value;
            for (size_t j = 0; j < n; j++) {   // the scores, then their softmax
                read_visible(kv, layer, &vis, j, 1, h / group, &key, &value, key_buf, value_buf);
                const float *query = j < vis.n_sink ? q_sink + at : q + at;
                weights[j] = dot(query, key, H) * scale;
            }
            softmax(weights, n);
            float *oh = out + at;
            memset(oh, 0, (size_t)H * sizeof(float));
            for (size_t j = 0; j < n; j++) {   // the weighted sum of the values
                read_visible(kv, layer, &vis, j, 1, h / group, &key, &value, key_buf, value_buf);
                for (int i = 0; i < H; i++) oh[i] += weights[j] * value[i];
            }
        }
    }
    free(weights);
    free(key_buf);
    free(value_buf);
}


// attention_reference() with a context memory (--memory): for query row t at position p and
// head h, the keys are the sinks below its window (met by q_sink), the memory positions of its
// kv head's retrieved blocks (memory_positions(), placed by memory_place() and met by q_mem:
// memory_block_distance()), then its window (met by q), all in one softmax, summed in the
// order of attention_reference(). The rows of each kv head that any query of the chunk sees
// are read (converted from the cache's type) once, by chunk_rows(). The fast kernels fold the
// memory into attention()'s tiles and decode ranges (chunk_memory()); --reference runs this
// loop, and so does --memory-score infllm, for this is where InfLLM's token scores come from:
// the window's share of each softmax row (add_token_scores()), then the representatives of
// the blocks that left the window (memory_complete()). Infllm's queries also see the
// remainder (fewer than B + T positions).
typedef struct {
    const float **keys, **values;   // (n_mem + n_window) rows as floats
    float *kbuf, *vbuf;             // room to convert them into
    size_t *mem_pos;                // (n_mem) memory positions, ascending
    size_t n_mem;                   // rows 0 .. n_mem-1: memory positions below the last window
    size_t lo, n_window;            // rows n_mem ..: positions lo .. lo + n_window - 1
} ChunkRows;

// Kv head g's rows for a chunk of T queries at pos0..: the memory positions the last query
// sees (an earlier query sees those below its own window: a prefix), then every position from
// the first query's window to the last query.
static void chunk_rows(ChunkRows *r, const KVCache *kv, ContextMemory *m, const LayerRope *rope,
                       int layer, int g, int T, size_t pos0) {
    int H = kv->head_dim;
    VisibleKeys first = visible_keys(kv, layer, pos0);
    size_t last = pos0 + (size_t)T - 1;
    r->n_mem = memory_positions(m, kv, layer, g, last, r->mem_pos);
    r->lo = first.lo;
    r->n_window = last - first.lo + 1;
    float *angles = memory_scratch(m, SCRATCH_ANGLES, max_size((size_t)rope->rotary_dim, 1),
                                   sizeof(float));
    memory_place(m, kv, rope, layer, g, r->mem_pos, r->n_mem, T, pos0, r->kbuf, r->vbuf, angles);
    for (size_t i = 0; i < r->n_mem; i++) {
        r->keys[i] = r->kbuf + i * H;
        r->values[i] = r->vbuf + i * H;
    }
    size_t w = r->n_mem;
    read_positions(kv, layer, r->lo, (int)r->n_window, g, r->keys + w, r->values + w,
                   r->kbuf + w * H, r->vbuf + w * H);
}

static void attention_memory(float *out, const float *q, const float *q_sink, const float *q_mem,
                             const KVCache *kv, ContextMemory *m, const LayerRope *rope,
                             int layer, const Config *c, int T, size_t pos0) {
    int H = c->head_dim;
    int group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)H);
    const LayerSlots *ls = &kv->layers[layer];
    size_t stride = min_size(ls->window, pos0 + T);   // the most window keys a query sees
    size_t rows = add_size(mul_size(m->top_k, m->block, "memory"), stride + (size_t)T, "memory");
    if (m->score == SCORE_INFLLM) rows = add_size(rows, m->block + (size_t)T, "memory");
    size_t most = add_size(ls->n_sink, rows, "memory");   // keys one query sees
    ChunkRows r = {0};
    r.keys = memory_scratch(m, SCRATCH_ROW_PTRS, mul_size(rows, 2, "memory"), sizeof(float *));
    r.values = r.keys + rows;
    r.kbuf = memory_scratch(m, SCRATCH_ROWS, mul_size(rows, 2 * (size_t)H, "memory"),
                            sizeof(float));
    r.vbuf = r.kbuf + rows * H;
    r.mem_pos = memory_scratch(m, SCRATCH_POSITIONS, rows, sizeof(size_t));
    size_t threads = (size_t)n_threads();
    float *weights = memory_scratch(m, SCRATCH_WEIGHTS, mul_size(threads, most, "memory"),
                                    sizeof(float));
    const float **lists = memory_scratch(m, SCRATCH_LISTS, mul_size(threads, 2 * most, "memory"),
                                         sizeof(float *));
    float *probs = NULL;   // infllm: each query's window probabilities, for the token scores
    if (m->score == SCORE_INFLLM) {
        probs = memory_scratch(m, SCRATCH_PROBS, mul_size((size_t)T * group, stride, "memory"),
                               sizeof(float));
        clear_token_scores(m, layer, pos0, T);
    }
    for (int g = 0; g < c->n_kv_heads; g++) {
        chunk_rows(&r, kv, m, rope, layer, g, T, pos0);
        PARALLEL_FOR
        for (int th = 0; th < T * group; th++) {
            int t = th / group;
            int h = g * group + th % group;
            float *w = weights + (size_t)thread_id() * most;
            const float **keys = lists + (size_t)thread_id() * 2 * most;
            const float **values = keys + most;
            VisibleKeys vis = visible_keys(kv, layer, pos0 + (size_t)t);
            size_t n_mem = 0;   // the prefix of the chunk's memory positions below its window
            while (n_mem < r.n_mem && r.mem_pos[n_mem] < vis.lo) n_mem++;
            size_t n_window = vis.pos - vis.lo + 1;
            size_t win = vis.n_sink + n_mem;   // where the window's keys start
            size_t n = win + n_window;
            read_sinks(kv, layer, 0, (int)vis.n_sink, g, keys, values);
            memcpy(keys + vis.n_sink, r.keys, n_mem * sizeof(float *));
            memcpy(values + vis.n_sink, r.values, n_mem * sizeof(float *));
            size_t from = r.n_mem + (vis.lo - r.lo);
            memcpy(keys + win, r.keys + from, n_window * sizeof(float *));
            memcpy(values + win, r.values + from, n_window * sizeof(float *));
            size_t at = (size_t)t * c->q_dim + (size_t)h * H;
            for (size_t j = 0; j < n; j++) {   // the scores: sinks, memory, window
                const float *query = q + at;
                if (j < win) query = q_mem + at;
                if (j < vis.n_sink) query = q_sink + at;
                w[j] = dot(query, keys[j], H) * scale;
            }
            softmax(w, n);
            if (probs) memcpy(probs + (size_t)th * stride, w + win, n_window * sizeof(float));
            float *oh = out + at;
            memset(oh, 0, (size_t)H * sizeof(float));
            for (size_t j = 0; j < n; j++)   // the weighted sum of the values
                for (int i = 0; i < H; i++) oh[i] += w[j] * values[j][i];
        }
        if (probs) add_token_scores(m, kv, layer, g, probs, stride, T, pos0);
    }
    if (probs) memory_complete(m, kv, layer, pos0 + (size_t)T, r.kbuf);
}

// ----------------------------------------------------------------------------
// The fast kernels: the same sums as matmul_reference() and attention_reference(), in the
// orders a processor computes fastest (kernels.c, included after forward(); it says how).
// Their scratch, sized once for the longest chunk, is one KernelWork.

typedef struct KernelWork KernelWork;
static KernelWork *new_kernel_work(size_t widest, int max_T, int head_dim, int n_heads);
static void free_kernel_work(KernelWork *kw);
static void matmul(float *out, const float *x, const Tensor *w, int T, KernelWork *kw);
static void attention(float *out, const float *q, const float *q_sink, const KVCache *kv,
                      const MemoryKeys *mk, int layer, const Config *c, int T, size_t pos0,
                      KernelWork *kw);

// ----------------------------------------------------------------------------
// The transformer and its forward pass

typedef struct {
    int max_T;          // most tokens per forward() call
    int n_logit_rows;   // rows of logits computed: max_T (every position) or 1 (last only)
    float *x;           // (max_T, D) residual stream
    float *xb;          // (max_T, D) normed input, then block output
    float *q;           // (max_T, q_dim)
    float *q_sink;      // (max_T, q_dim) the queries rotated to meet the sinks
    float *q_score;     // (max_T, q_dim) the queries rotated to score the memory's blocks
    float *q_mem;       // (max_T, q_dim) the queries rotated to meet the memory's keys
    float *k_mem;       // (max_T, kv_dim) the keys rotated as the memory stores them
    float *k, *v;       // (max_T, kv_dim)
    float *att_out;     // (max_T, q_dim)
    float *hb, *hb2;    // (max_T, hidden_dim)
    float *logits;      // (n_logit_rows, V)
    float *row;         // (widest) one weight row dequantized: embeddings, matmul_reference()
    KernelWork *kernels;   // the fast kernels' scratch
} RunState;

typedef struct {
    Config config;      // read-only once loaded
    Weights weights;
    Rope rope;
    KVCache cache;
    ContextMemory *memory;   // --memory, or NULL
    RunState state;
    ModelFile file;
    int reference;      // --reference: the plain blocks instead of the fast kernels
} Transformer;

// The two blocks that have fast kernels, through the path the run chose: the kernels, or the
// reference loops they are tested against.
static void project(Transformer *tr, float *out, const float *x, const Tensor *w, int T) {
    if (tr->reference) matmul_reference(out, x, w, T, tr->state.row);
    else matmul(out, x, w, T, tr->state.kernels);
}

static void attend(Transformer *tr, int layer, int T, size_t pos0) {
    RunState *s = &tr->state;
    const Config *c = &tr->config;
    LayerRope rope = layer_rope(&tr->rope, c, layer);
    if (tr->memory) memory_select(tr->memory, &tr->cache, layer, s->q_score, c, T, pos0);
    if (tr->memory && (tr->reference || tr->memory->score == SCORE_INFLLM))
        attention_memory(s->att_out, s->q, s->q_sink, s->q_mem, &tr->cache, tr->memory, &rope,
                         layer, c, T, pos0);
    else if (tr->reference)
        attention_reference(s->att_out, s->q, s->q_sink, &tr->cache, layer, c, T, pos0);
    else if (tr->memory) {
        MemoryKeys mk = chunk_memory(tr->memory, &tr->cache, &rope, layer, s->q_mem, T, pos0);
        attention(s->att_out, s->q, s->q_sink, &tr->cache, &mk, layer, c, T, pos0, s->kernels);
    } else attention(s->att_out, s->q, s->q_sink, &tr->cache, NULL, layer, c, T, pos0, s->kernels);
}

// RoPE for the chunk's rows at positions pos0..: each query rotated to its position (and a
// second time to meet the sinks, if the layer has any; with a context memory, a third and a
// fourth time to score its blocks and to meet its keys), each key rotated and written to the
// cache with its value (and to the memory, rotated as it stores keys: memory_block_distance()).
static void rotate_and_cache(Transformer *tr, int layer, int T, size_t pos0) {
    const Config *c = &tr->config;
    RunState *s = &tr->state;
    KVCache *kv = &tr->cache;
    LayerRope rope = layer_rope(&tr->rope, c, layer);
    int has_sinks = kv->layers[layer].n_sink > 0;
    ContextMemory *mem = tr->memory;
    if (mem) memory_reserve(mem, kv, layer, pos0 + T);
    PARALLEL_FOR_IF(T > 1)
    for (int t = 0; t < T; t++) {
        size_t pos = pos0 + t;
        float *q = s->q + (size_t)t * c->q_dim;
        if (has_sinks) {
            float *q_sink = s->q_sink + (size_t)t * c->q_dim;
            memcpy(q_sink, q, c->q_dim * sizeof(float));
            rope_rotate(q_sink, c->n_heads, c->head_dim, &rope, sink_query_pos(kv, layer, pos));
        }
        float *k = s->k + (size_t)t * c->kv_dim;
        float *v = s->v + (size_t)t * c->kv_dim;
        if (mem) {
            float *q_score = s->q_score + (size_t)t * c->q_dim;
            float *q_mem = s->q_mem + (size_t)t * c->q_dim;
            float *k_mem = s->k_mem + (size_t)t * c->kv_dim;
            memcpy(q_score, q, c->q_dim * sizeof(float));
            rope_rotate(q_score, c->n_heads, c->head_dim, &rope,
                        memory_score_angle(mem, &kv->layers[layer]));
            memcpy(q_mem, q, c->q_dim * sizeof(float));
            rope_rotate(q_mem, c->n_heads, c->head_dim, &rope, mem->distance + (size_t)t);
            memcpy(k_mem, k, c->kv_dim * sizeof(float));
            rope_rotate(k_mem, c->n_kv_heads, c->head_dim, &rope, pos % mem->block);
            memory_write(mem, kv, layer, pos, k_mem, v);
        }
        rope_rotate(q, c->n_heads, c->head_dim, &rope, pos);
        kv_write(kv, layer, pos, k, v, &rope);   // rotates k to pos
    }
    if (mem) memory_bounds(mem, kv, layer, pos0, (size_t)T, s->row);
    if (mem) memory_release(mem, layer, (size_t)T);
}

// Run T tokens at positions pos0 .. pos0+T-1 through the model. Their keys and values are
// added to the cache, so the next call continues the text. Returns the logits: (T, V) when
// built with all_logits, else (1, V) for the last token. Prefill is one call per chunk,
// decode one call per token. A chunk (T > 1) gives up at the next layer after a Ctrl-C and
// returns NULL, the cache half written: its callers then stop the run, as they would after the
// chunk. (A decode step always finishes: chat goes on after a Ctrl-C.)
static float *forward(Transformer *tr, const int *tokens, int T, size_t pos0) {
    const Config *c = &tr->config;
    const Weights *w = &tr->weights;
    RunState *s = &tr->state;
    int D = c->dim;
    int H = c->head_dim;
    if (T < 1 || T > s->max_T) die("forward: chunk of %d tokens, limit %d", T, s->max_T);
    size_t capacity = cache_capacity(&tr->cache, c->n_layers);
    if (pos0 + T > capacity)
        die("context full: %zu tokens do not fit in %zu positions; raise -c, or set --window",
            pos0 + T, capacity);

    rope_update(&tr->rope, c, pos0 + T);
    for (int t = 0; t < T; t++) {   // token embeddings
        const float *row = weight_row(&w->tok_embd, tokens[t], s->row);
        memcpy(s->x + (size_t)t * D, row, D * sizeof(float));
    }

    for (int l = 0; l < c->n_layers; l++) {
        if (T > 1 && interrupted) return NULL;
        const LayerWeights *lw = &w->layers[l];

        // attention: q, k, v projections, optional bias and per-head norm, RoPE, cache, attend
        rmsnorm(s->xb, s->x, (const float *)lw->attn_norm.data, T, D, c->norm_eps);
        project(tr, s->q, s->xb, &lw->wq, T);
        project(tr, s->k, s->xb, &lw->wk, T);
        project(tr, s->v, s->xb, &lw->wv, T);
        if (c->qkv_bias) {
            add_bias(s->q, (const float *)lw->bq.data, T, c->q_dim);
            add_bias(s->k, (const float *)lw->bk.data, T, c->kv_dim);
            add_bias(s->v, (const float *)lw->bv.data, T, c->kv_dim);
        }
        if (c->qk_norm) {   // Qwen3: RMSNorm over each head's H channels, before RoPE
            rmsnorm(s->q, s->q, (const float *)lw->q_norm.data, T * c->n_heads, H, c->norm_eps);
            rmsnorm(s->k, s->k, (const float *)lw->k_norm.data, T * c->n_kv_heads, H, c->norm_eps);
        }
        rotate_and_cache(tr, l, T, pos0);
        attend(tr, l, T, pos0);
        project(tr, s->xb, s->att_out, &lw->wo, T);
        add_rows(s->x, s->xb, T, D);

        // MLP: x += w_down(silu(w_gate(n)) * w_up(n)), n = rmsnorm(x)
        rmsnorm(s->xb, s->x, (const float *)lw->ffn_norm.data, T, D, c->norm_eps);
        project(tr, s->hb, s->xb, &lw->w_gate, T);
        project(tr, s->hb2, s->xb, &lw->w_up, T);
        swiglu(s->hb, s->hb2, T, c->hidden_dim);
        project(tr, s->xb, s->hb, &lw->w_down, T);
        add_rows(s->x, s->xb, T, D);
    }

    if (T > 1 && interrupted) return NULL;

    // classifier, on every row or only the last one
    int rows = s->n_logit_rows == 1 ? 1 : T;
    const float *last = s->x + (size_t)(T - rows) * D;
    rmsnorm(s->xb, last, (const float *)w->output_norm.data, rows, D, c->norm_eps);
    project(tr, s->logits, s->xb, &w->output, rows);
    return s->logits;
}

// ----------------------------------------------------------------------------
// Building a transformer: from the checked file to the structs forward() reads; describing it

// Copy the header into a Config, refusing values that make no sense or would overflow later.
static void read_config(Config *c, const ModelFile *mf, const char *path) {
    const FileHeader *h = mf->header;
    const uint32_t limit = 1u << 20; // any dimension beyond a million is a corrupt file
    struct {
        const char *name;
        uint32_t value;
    } dims[] = { { "dim", h->dim },           { "hidden_dim", h->hidden_dim },
                 { "n_heads", h->n_heads },   { "n_kv_heads", h->n_kv_heads },
                 { "head_dim", h->head_dim }, { "max_seq_len", h->max_seq_len } };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].value == 0 || dims[i].value > limit)
            die("%s: %s = %u is out of range [1, %u]", path, dims[i].name, dims[i].value, limit);
    if (h->n_heads % h->n_kv_heads)
        die("%s: n_heads %u is not a multiple of n_kv_heads %u", path, h->n_heads, h->n_kv_heads);
    if ((uint64_t)h->n_heads * h->head_dim > limit)
        die("%s: n_heads * head_dim is too large", path);
    if (!(h->norm_eps >= 0 && h->norm_eps < 1))
        die("%s: norm_eps %g out of range", path, h->norm_eps);
    c->n_layers = (int)h->n_layers;
    c->dim = (int)h->dim;
    c->hidden_dim = (int)h->hidden_dim;
    c->n_heads = (int)h->n_heads;
    c->n_kv_heads = (int)h->n_kv_heads;
    c->head_dim = (int)h->head_dim;
    c->q_dim = c->n_heads * c->head_dim;
    c->kv_dim = c->n_kv_heads * c->head_dim;
    c->vocab_size = (int)h->vocab_size;
    c->max_seq_len = (int)h->max_seq_len;
    c->norm_eps = h->norm_eps;
    c->tied_embeddings = h->tied_embeddings != 0;
    c->qkv_bias = h->qkv_bias != 0;
    c->qk_norm = h->qk_norm != 0;
    c->layers = xcalloc(c->n_layers, sizeof(LayerConfig), "layer configs");
    memcpy(c->layers, mf->bytes + h->header_size, (size_t)c->n_layers * sizeof(LayerConfig));
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        if (lc->attn_kind >= ATTN_COUNT)
            die("%s: layer %d has unknown attention kind %u", path, l, lc->attn_kind);
        if (lc->attn_kind == ATTN_SLIDING && lc->window == 0)
            die("%s: layer %d slides with window 0", path, l);
        if (lc->rope_type >= ROPE_COUNT)
            die("%s: layer %d has unknown rope type %u", path, l, lc->rope_type);
        if (lc->rotary_dim % 2 || lc->rotary_dim > h->head_dim)
            die("%s: layer %d rotary_dim %u must be even and at most head_dim %u", path, l,
                lc->rotary_dim, h->head_dim);
        if (lc->rotary_dim && !(lc->rope_theta > 1 && isfinite(lc->rope_theta)))
            die("%s: layer %d rope_theta %g out of range", path, l, lc->rope_theta);
        if (lc->orig_ctx == 0) c->layers[l].orig_ctx = h->max_seq_len;   // dynamic NTK's M, as HF
    }
}

// Command-line RoPE settings (0 / NULL = keep the file's). A new --rope-scaling starts from
// that method's defaults (HF's), so any model can take any method without re-export.
typedef struct {
    const char *scaling;          // none | linear | dynamic | yarn | llama3
    float theta, factor;          // --rope-theta, --rope-factor
    long orig_ctx;                // --rope-orig-ctx; default: the trained context
    float beta_fast, beta_slow;   // --yarn-beta-fast, --yarn-beta-slow
    float attn_factor;            // --yarn-attn-factor
    long context;                 // -c: with a new --rope-scaling and no --rope-factor, the
                                  // factor is -c / L0
} RopeOptions;

static int rope_type_from_name(const char *name) {
    if (!strcmp(name, "none")) return ROPE_DEFAULT;
    for (int t = ROPE_LINEAR; t < ROPE_LONGROPE; t++)
        if (!strcmp(name, rope_type_name(t))) return t;
    return -1;
}

// A new --rope-scaling without --rope-factor: the factor that stretches the original context
// L0 (--rope-orig-ctx, else the trained one) to -c; without -c beyond L0 there is none to
// take, and a silent x1 would scale nothing, so the run is refused.
static double derived_rope_factor(const RopeOptions *o, uint32_t trained) {
    double L0 = o->orig_ctx ? (double)o->orig_ctx : (double)trained;
    if (o->context > L0) return o->context / L0;
    die("--rope-scaling %s needs --rope-factor S (the context becomes S x %.0f), or -c N beyond "
        "the trained context %.0f (then S = N / %.0f)", o->scaling, L0, L0, L0);
    return 1;
}

static void apply_rope_options(Config *c, const RopeOptions *o) {
    for (int l = 0; l < c->n_layers; l++) {
        LayerConfig *lc = &c->layers[l];
        if (lc->rotary_dim == 0) continue;   // NoPE layers stay so
        if (o->scaling) {
            LayerConfig fresh = { .attn_kind = lc->attn_kind,
                                  .window = lc->window,
                                  .rotary_dim = lc->rotary_dim,
                                  .rope_theta = lc->rope_theta,
                                  .rope_type = (uint32_t)rope_type_from_name(o->scaling),
                                  .factor = 1,
                                  .orig_ctx = (uint32_t)c->max_seq_len,
                                  .beta_fast = 32,
                                  .beta_slow = 1,
                                  .yarn_truncate = 1,
                                  .low_freq_factor = 1,
                                  .high_freq_factor = 4 };
            *lc = fresh;
        }
        if ((o->factor || o->orig_ctx) && lc->rope_type == ROPE_DEFAULT)
            die("--rope-factor and --rope-orig-ctx need a scaling method: add --rope-scaling");
        if ((o->beta_fast || o->beta_slow || o->attn_factor) && lc->rope_type != ROPE_YARN)
            die("--yarn-* options need yarn scaling (this model has '%s'): add --rope-scaling yarn",
                rope_type_name(lc->rope_type));
        if (o->theta) lc->rope_theta = o->theta;
        if (o->scaling && lc->rope_type != ROPE_DEFAULT && !o->factor)
            lc->factor = (float)derived_rope_factor(o, lc->orig_ctx);
        if (o->factor) lc->factor = o->factor;
        if (o->orig_ctx) lc->orig_ctx = (uint32_t)o->orig_ctx;
        if (o->beta_fast) lc->beta_fast = o->beta_fast;
        if (o->beta_slow) lc->beta_slow = o->beta_slow;
        if (o->attn_factor) lc->attention_factor = o->attn_factor;
    }
}

// Refuse RoPE parameters that make no sense, from the file or the command line.
static void check_rope_config(const Config *c, const char *path) {
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        const char *name = rope_type_name(lc->rope_type);
        if (lc->rope_type == ROPE_DEFAULT) continue;   // (a NoPE layer's setting is checked too:
                                                      // the banner and the context read it)
        if (!(lc->factor >= 1 && lc->factor < 1e6f) &&
            !(lc->rope_type == ROPE_LONGROPE && lc->factor > 0))
            die("%s: layer %d: %s RoPE scaling needs a factor >= 1 (--rope-factor), got %g", path,
                l, name, lc->factor);
        if (lc->orig_ctx == 0)
            die("%s: layer %d: %s RoPE scaling needs the original context length", path, l, name);
        if (!(lc->attention_factor >= 0 && lc->attention_factor < 100))
            die("%s: layer %d: attention factor %g out of range", path, l, lc->attention_factor);
        if (lc->rope_type == ROPE_YARN && !(lc->beta_fast > lc->beta_slow && lc->beta_slow > 0))
            die("%s: layer %d: yarn needs beta_fast > beta_slow > 0, got %g and %g", path, l,
                lc->beta_fast, lc->beta_slow);
        if (lc->rope_type == ROPE_LLAMA3 &&
            !(lc->high_freq_factor > lc->low_freq_factor && lc->low_freq_factor > 0))
            die("%s: layer %d: llama3 needs high_freq_factor > low_freq_factor > 0", path, l);
    }
}

// Find a tensor by name and check it has the expected shape; vectors must be f32.
static Tensor get_tensor(const ModelFile *mf, const char *path, const char *name, size_t rows,
                         size_t cols) {
    for (uint32_t i = 0; i < mf->header->n_tensors; i++) {
        const TensorEntry *e = &mf->tensors[i];
        if (strcmp(e->name, name) != 0) continue;
        if (e->rows != rows || e->cols != cols)
            die("%s: tensor %s is %llu x %llu, the config needs %zu x %zu", path, name,
                (unsigned long long)e->rows, (unsigned long long)e->cols, rows, cols);
        if (cols == 1 && e->dtype != DT_F32)
            die("%s: vector %s must be f32, not %s", path, name, dtype_name(e->dtype));
        return (Tensor){mf->bytes + e->offset, (DType)e->dtype, rows, cols};
    }
    die("%s: tensor %s is missing", path, name);
    return (Tensor){0};
}

static Tensor get_layer_tensor(const ModelFile *mf, const char *path, int layer, const char *name,
                               size_t rows, size_t cols) {
    char full[LR_NAME_LEN];
    snprintf(full, sizeof(full), "blk.%d.%s", layer, name);
    return get_tensor(mf, path, full, rows, cols);
}

static void build_weights(Weights *w, const Config *c, const ModelFile *mf, const char *path) {
    size_t D = c->dim, V = c->vocab_size, F = c->hidden_dim, Q = c->q_dim, K = c->kv_dim,
           H = c->head_dim;
    w->tok_embd = get_tensor(mf, path, "tok_embd", V, D);
    w->output_norm = get_tensor(mf, path, "output_norm", D, 1);
    w->output = c->tied_embeddings ? w->tok_embd : get_tensor(mf, path, "output", V, D);
    w->layers = xcalloc(c->n_layers, sizeof(LayerWeights), "layer weights");
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *lw = &w->layers[l];
        lw->attn_norm = get_layer_tensor(mf, path, l, "attn_norm", D, 1);
        lw->wq = get_layer_tensor(mf, path, l, "wq", Q, D);
        lw->wk = get_layer_tensor(mf, path, l, "wk", K, D);
        lw->wv = get_layer_tensor(mf, path, l, "wv", K, D);
        lw->wo = get_layer_tensor(mf, path, l, "wo", D, Q);
        if (c->qkv_bias) {
            lw->bq = get_layer_tensor(mf, path, l, "bq", Q, 1);
            lw->bk = get_layer_tensor(mf, path, l, "bk", K, 1);
            lw->bv = get_layer_tensor(mf, path, l, "bv", K, 1);
        }
        if (c->qk_norm) {
            lw->q_norm = get_layer_tensor(mf, path, l, "q_norm", H, 1);
            lw->k_norm = get_layer_tensor(mf, path, l, "k_norm", H, 1);
        }
        lw->ffn_norm = get_layer_tensor(mf, path, l, "ffn_norm", D, 1);
        lw->w_gate = get_layer_tensor(mf, path, l, "w_gate", F, D);
        lw->w_up = get_layer_tensor(mf, path, l, "w_up", F, D);
        lw->w_down = get_layer_tensor(mf, path, l, "w_down", D, F);
    }
}

// The context a layer's RoPE setting is meant to reach: s L0 for a scaled method, else the
// trained context.
static size_t rope_target_context(const LayerConfig *lc, int max_seq_len) {
    if (lc->rope_type == ROPE_DEFAULT || lc->rope_type == ROPE_LONGROPE || lc->orig_ctx == 0)
        return (size_t)max_seq_len;
    double target = (double)lc->factor * lc->orig_ctx;   // checked finite; in double, no overflow
    return target < (double)SIZE_MAX / 2 ? (size_t)target : SIZE_MAX / 2;
}

// Every value derived from a layer's RoPE setting must be a usable number: a file's YaRN
// mscale can make the attention factor NaN, or a LongRoPE factor of 0 a frequency infinite,
// while each stored field looks fine on its own.
static void check_rope_table(const float *inv_freq, int half, float attn_factor, int layer,
                             const char *path) {
    if (!(attn_factor > 0 && attn_factor < 100))
        die("%s: layer %d: the RoPE attention factor works out to %g; its scaling parameters are "
            "broken", path, layer, attn_factor);
    for (int i = 0; i < half; i++)
        if (!isfinite(inv_freq[i]))
            die("%s: layer %d: RoPE frequency %d works out to %g; its scaling parameters are "
                "broken", path, layer, i, inv_freq[i]);
}

// The tables as HF builds them at load: at the original length L0 (LongRoPE: the short list).
static void build_rope(Rope *r, const Config *c, const ModelFile *mf, const char *path) {
    r->stride = c->head_dim / 2;
    r->inv_freq =
            xcalloc(mul_size(c->n_layers, r->stride, "rope table"), sizeof(float), "rope table");
    r->attn_factor = xcalloc(c->n_layers, sizeof(float), "rope table");
    r->table_len = xcalloc(c->n_layers, sizeof(size_t), "rope table");
    size_t n_factors = 0;   // LongRoPE: the length of its two lists, one factor per pair
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        size_t half = lc->rotary_dim / 2;
        float *inv_freq = r->inv_freq + (size_t)l * r->stride;
        if (lc->rope_type == ROPE_LONGROPE && half > 0) {
            if (!r->short_factor) {   // the lists are shared: every LongRoPE layer must fit them
                n_factors = half;
                Tensor short_list = get_tensor(mf, path, "rope.short_factor", half, 1);
                Tensor long_list = get_tensor(mf, path, "rope.long_factor", half, 1);
                r->short_factor = (const float *)short_list.data;
                r->long_factor = (const float *)long_list.data;
            }
            if (half != n_factors)
                die("%s: layer %d rotates %zu channel pairs but the LongRoPE factor lists hold %zu",
                    path, l, half, n_factors);
            // the long list's table too, checked now rather than when a text first needs it
            size_t past_L0 = (size_t)lc->orig_ctx + 1;
            float a = rope_frequencies(lc, r->short_factor, r->long_factor, past_L0, inv_freq);
            check_rope_table(inv_freq, (int)half, a, l, path);
        }
        r->table_len[l] = lc->orig_ctx;
        r->attn_factor[l] = rope_frequencies(lc, r->short_factor, r->long_factor, lc->orig_ctx,
                                             inv_freq);
        check_rope_table(inv_freq, (int)half, r->attn_factor[l], l, path);
    }
}

// --window, --sinks and --lminf defaults. LM-Infinite's (Han et al. 2023): the local window
// and the distance cap are the trained context, with 10 global tokens.
static void resolve_attention_options(AttnOptions *a, const Config *c) {
    if (a->lminf) {
        if (!a->window) a->window = c->max_seq_len;
        if (a->n_sink < 0) a->n_sink = 10;
        if (!a->limit) a->limit = a->window;
    }
    if (a->n_sink < 0) a->n_sink = 0;
}

// Each layer's window: the file's (if it slides) and --window, whichever is shorter; its
// slots: a full layer kv->context of them, a windowed one n_sink + W + max_T - 1 (at most
// n_sink + context), from kv->built's options. Sets kv->n_slots.
static void lay_out_slots(KVCache *kv, const Config *c) {
    const AttnOptions *a = &kv->built;
    kv->n_slots = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *lc = &c->layers[l];
        LayerSlots *ls = &kv->layers[l];
        ls->window = lc->attn_kind == ATTN_SLIDING ? lc->window : SIZE_MAX;
        if (a->window) ls->window = min_size(ls->window, (size_t)a->window);
        int windowed = ls->window != SIZE_MAX;
        size_t ring = windowed ? add_size(ls->window, kv->max_T - 1, "KV cache") : SIZE_MAX;
        ls->first = kv->n_slots;
        ls->n_sink = windowed ? (size_t)a->n_sink : 0;
        ls->ring = min_size(ring, kv->context);
        ls->fills = ls->ring < ring;
        kv->n_slots = add_size(kv->n_slots, add_size(ls->n_sink, ls->ring, "KV cache"), "KV cache");
    }
}

// The cache for the options a, `context` positions of a full layer and chunks of max_T.
static void build_cache(KVCache *kv, const Config *c, const AttnOptions *a, size_t context,
                        int max_T) {
    kv->type = (KVType)a->kv_type;
    kv->sink_kind = a->lminf ? SINKS_LMINF : SINKS_STREAMING;
    kv->limit = (size_t)a->limit;
    kv->n_kv_heads = c->n_kv_heads;
    kv->head_dim = c->head_dim;
    kv->kv_dim = (size_t)c->kv_dim;
    kv->row_bytes = kv_row_bytes(kv->type, kv->kv_dim, kv->n_kv_heads);
    kv->layers = xcalloc(c->n_layers, sizeof(LayerSlots), "the KV cache");
    kv->n_layers = c->n_layers;
    kv->max_T = max_T;
    kv->built = *a;
    kv->context = context;
    // STREAMING_SINKS: what a full context switches to
    kv->max_sink = max_size((size_t)a->n_sink, STREAMING_SINKS);
    lay_out_slots(kv, c);
    kv_alloc_rows(kv);
}

// The longest row a matmul reads: the scratch for one dequantized weight row is this long.
static size_t widest_row(const Config *c) {
    return max_size(max_size(c->dim, c->hidden_dim), c->q_dim);
}

static void build_state(RunState *s, const Config *c, int max_T, int all_logits) {
    size_t widest = widest_row(c);
    size_t T = (size_t)max_T;
    s->max_T = max_T;
    s->n_logit_rows = all_logits ? max_T : 1;
    s->x = xcalloc(mul_size(T, c->dim, "x"), sizeof(float), "activations");
    s->xb = xcalloc(mul_size(T, c->dim, "xb"), sizeof(float), "activations");
    s->q = xcalloc(mul_size(T, c->q_dim, "q"), sizeof(float), "activations");
    s->q_sink = xcalloc(mul_size(T, c->q_dim, "q"), sizeof(float), "activations");
    s->q_score = xcalloc(mul_size(T, c->q_dim, "q"), sizeof(float), "activations");
    s->q_mem = xcalloc(mul_size(T, c->q_dim, "q"), sizeof(float), "activations");
    s->k_mem = xcalloc(mul_size(T, c->kv_dim, "k"), sizeof(float), "activations");
    s->k = xcalloc(mul_size(T, c->kv_dim, "k"), sizeof(float), "activations");
    s->v = xcalloc(mul_size(T, c->kv_dim, "v"), sizeof(float), "activations");
    s->att_out = xcalloc(mul_size(T, c->q_dim, "att"), sizeof(float), "activations");
    s->hb = xcalloc(mul_size(T, c->hidden_dim, "hb"), sizeof(float), "activations");
    s->hb2 = xcalloc(mul_size(T, c->hidden_dim, "hb2"), sizeof(float), "activations");
    size_t logit_floats = mul_size(s->n_logit_rows, c->vocab_size, "logits");
    s->logits = xcalloc(logit_floats, sizeof(float), "logits");
    s->row = xcalloc(widest, sizeof(float), "a weight row");
    s->kernels = new_kernel_work(widest, max_T, c->head_dim, c->n_heads);
}

static void free_state(RunState *s) {
    void *buffers[] = { s->x,  s->xb,     s->q,       s->q_sink, s->q_score, s->q_mem,
                        s->k,  s->k_mem,  s->v,       s->hb,     s->hb2,     s->logits,
                        s->att_out, s->row };
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    free_kernel_work(s->kernels);
}

// Point into the opened, validated file and allocate everything a run needs, once: context
// cache slots, chunks of up to max_T tokens, logits for every row or only the last.
static void build_transformer(Transformer *t, const ModelFile *mf, const char *path,
                              const RopeOptions *rope, AttnOptions *attn, size_t context,
                              int max_T, int all_logits) {
    t->file = *mf;
    read_config(&t->config, &t->file, path);
    apply_rope_options(&t->config, rope);
    check_rope_config(&t->config, path);
    build_weights(&t->weights, &t->config, &t->file, path);
    build_rope(&t->rope, &t->config, &t->file, path);
    resolve_attention_options(attn, &t->config);
    build_cache(&t->cache, &t->config, attn, context, max_T);
    build_state(&t->state, &t->config, max_T, all_logits);
}

// Run on n threads from now on: the kernels' scratch, one slice per thread, is sized again.
static void use_threads(Transformer *t, int n) {
    const Config *c = &t->config;
    set_threads(n);
    free_kernel_work(t->state.kernels);
    t->state.kernels = new_kernel_work(widest_row(c), t->state.max_T, c->head_dim, c->n_heads);
}

static void free_transformer(Transformer *t) {
    free_memory(t->memory, t->config.n_layers);
    free_state(&t->state);
    free_cache(&t->cache);
    free_rope(&t->rope);
    free(t->weights.layers);
    free(t->config.layers);
}

// Keys and values of one position in every layer, in the cache's type.
static size_t kv_bytes_per_token(const Transformer *t) {
    return (size_t)2 * t->config.n_layers * t->cache.row_bytes;
}

// With a context memory, what one query at position p sees, drawn as the README draws it.
static void print_memory_geometry(const ContextMemory *m, size_t n_sink, size_t window) {
    size_t retrieved = (size_t)m->top_k * m->block;
    fprintf(stderr, "  a query at p sees: [%zu sinks] .. [%d blocks of %d, each at distance "
            "min(true, %zu)] .. [p-%zu .. p] = at most %zu keys\n", n_sink, m->top_k, m->block,
            m->distance, window - 1, n_sink + retrieved + window);
}

// D: --memory-distance, or by default a quarter of the trained context (the best perplexity
// of the distances tried: README, the context memory), but at least W + B - 1, so that a block
// moved up to D lies past the window of the query that retrieved it.
static size_t memory_distance(const Transformer *t, long requested, long window, long block) {
    if (requested) return (size_t)requested;
    return max_size((size_t)(window + block - 1), (size_t)t->config.max_seq_len / 4);
}

// One line: which keys a query sees, and how many positions fit.
static void print_attention(const Transformer *t) {
    const Config *c = &t->config;
    const KVCache *kv = &t->cache;
    int n_windowed = 0;
    size_t w_min = SIZE_MAX;
    size_t w_max = 0;
    size_t n_sink = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerSlots *ls = &kv->layers[l];
        n_sink = max_size(n_sink, ls->n_sink);
        if (ls->window == SIZE_MAX) continue;
        n_windowed++;
        w_min = min_size(w_min, ls->window);
        w_max = max_size(w_max, ls->window);
    }
    if (!n_windowed) fprintf(stderr, "attention: full");
    else if (w_min == w_max)
        fprintf(stderr, "attention: window of %zu keys on %d of %d layers", w_max, n_windowed,
                c->n_layers);
    else
        fprintf(stderr, "attention: windows of %zu..%zu keys on %d of %d layers", w_min, w_max,
                n_windowed, c->n_layers);
    if (n_sink && kv->sink_kind == SINKS_LMINF)
        fprintf(stderr, " + %zu global tokens at distance min(pos, %zu) (LM-Infinite)", n_sink,
                kv->limit);
    else if (n_sink) fprintf(stderr, " + %zu sinks at cache-slot distances (StreamingLLM)", n_sink);
    if (t->memory)
        fprintf(stderr, " + memory: %d blocks of %d per chunk and kv head (%s), %s",
                t->memory->top_k, t->memory->block,
                t->memory->score == SCORE_INFLLM ? "InfLLM representatives" : "Quest bounds",
                "at distance min(true, D)");
    size_t cap = cache_capacity(kv, c->n_layers);
    if (cap == SIZE_MAX) fprintf(stderr, "; a text of any length\n");
    else fprintf(stderr, "; context %zu tokens\n", cap);
    if (t->memory && n_windowed) print_memory_geometry(t->memory, n_sink, w_max);
}

// The start-up block on stderr: what model, how big, and the memory bill.
static void print_model_summary(const Transformer *t, const char *path) {
    const Config *c = &t->config;
    const RunState *s = &t->state;
    const FileHeader *h = t->file.header;
    size_t params = 0;
    for (uint32_t i = 0; i < h->n_tensors; i++)
        params += t->file.tensors[i].rows * t->file.tensors[i].cols;
    size_t act = (size_t)s->max_T *
                    (2 * c->dim + 3 * c->q_dim + 2 * c->kv_dim + 2 * c->hidden_dim) *
                    sizeof(float) +
            (size_t)s->n_logit_rows * c->vocab_size * sizeof(float);
    fprintf(stderr, "%s: %s, %.1fM params, %s weights, %d layers, dim %d, %d heads (%d kv) x %d, "
            "vocab %d, trained context %d\n", path, printable(h->arch, sizeof(h->arch)),
            params / 1e6, dtype_name(t->weights.layers[0].wq.dtype), c->n_layers, c->dim,
            c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size, c->max_seq_len);
    const LayerConfig *lc = &c->layers[0];
    fprintf(stderr, "RoPE %s", rope_type_name(lc->rope_type));
    if (lc->rope_type != ROPE_DEFAULT) fprintf(stderr, " x%g from %u", lc->factor, lc->orig_ctx);
    fprintf(stderr, ", theta %g, %d of %d channels rotated: meant for %zu tokens\n", lc->rope_theta,
            lc->rotary_dim, c->head_dim, rope_target_context(lc, c->max_seq_len));
    print_attention(t);
    const KVCache *kv = &t->cache;
    // keys and values
    size_t sink_bytes = (size_t)4 * c->n_layers * kv->max_sink * c->kv_dim * sizeof(float);
    fprintf(stderr,
            "memory: weights %.1f MB (mapped), KV cache %.1f MB (%s, %zu bytes/token, %zu slots in "
            "all), "
            "activations %.1f MB\n",
            t->file.size / 1e6, (2.0 * kv->n_slots * kv->row_bytes + sink_bytes) / 1e6,
            kv_type_names[kv->type], kv_bytes_per_token(t), kv->n_slots, act / 1e6);
    int threads = n_threads();
    fprintf(stderr, "kernels: %s, %d thread%s\n",
            t->reference ? "the plain reference loops (--reference)" : kernel_set(), threads,
            threads == 1 ? "" : "s");
}

// ----------------------------------------------------------------------------
// The fast kernels: matmul() and attention(), and their scratch (one translation unit with
// this file)

#include "kernels.c"

// ----------------------------------------------------------------------------
// The tokenizer: text <-> ids, in tokenizer.c (one translation unit with this file)

#include "tokenizer.c"

// Text meets the tokenizer only as valid UTF-8: anything else would be silently replaced by U+FFFD.
static void check_utf8(const char *what, const char *text, size_t len, const char *hint) {
    size_t valid = utf8_valid_prefix(text, len);
    if (valid < len)
        die("%s is not valid UTF-8 (byte %zu is 0x%02X); %s", what, valid,
            (unsigned)(unsigned char)text[valid], hint);
}

// Load the tokenizer section of the file into tok. Returns 0 when the file has none.
static int load_tokenizer(Tokenizer *tok, const ModelFile *mf, const char *path) {
    const FileHeader *h = mf->header;
    if (h->tokenizer_size == 0) return 0;
    char err[256];
    if (tokenizer_load(tok, mf->bytes + h->tokenizer_offset, h->tokenizer_size, err, sizeof(err)) !=
        0)
        die("%s: tokenizer section: %s", path, err);
    if (h->n_layers && tokenizer_vocab_size(tok) > (int)h->vocab_size)
        die("%s: the tokenizer has %d tokens but the model only %u", path,
            tokenizer_vocab_size(tok), h->vocab_size);
    return 1;
}

// ----------------------------------------------------------------------------
// The sampler: logits -> next token

typedef struct {
    float temperature;    // 0 = greedy (argmax)
    int top_k;            // keep the k most likely tokens; 0 = off
    float top_p;          // keep the smallest set whose probability reaches top_p; 1 = off
    float min_p;          // drop tokens less likely than min_p x the most likely; 0 = off
    float repeat_penalty; // divide positive (multiply negative) logits of recent tokens; 1 = off
    int repeat_last_n;    // how many recent tokens the penalty looks at
    int *recent;          // (repeat_last_n) ring of the last tokens
    size_t n_seen;        // tokens accepted so far
    uint64_t rng;         // xorshift64* state
    int *order;           // (V) candidate ids, most likely first
} Sampler;

static void build_sampler(Sampler *sp, int vocab, uint64_t seed) {
    sp->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    sp->order = xcalloc(vocab, sizeof(int), "sampler");
    sp->recent = xcalloc(sp->repeat_last_n > 0 ? sp->repeat_last_n : 1, sizeof(int), "sampler");
    sp->n_seen = 0;
}

static void free_sampler(Sampler *sp) {
    free(sp->order);
    free(sp->recent);
}

// Record a token of the text (prompt or generated) for the repetition penalty.
static void sampler_accept(Sampler *sp, int token) {
    if (sp->repeat_last_n > 0) sp->recent[sp->n_seen % sp->repeat_last_n] = token;
    sp->n_seen++;
}

static float random_f32(uint64_t *state) { // xorshift64*, uniform in [0, 1)
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return ((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs; // qsort has no context argument
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_probs[*(const int *)a], y = sort_probs[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : *(const int *)a - *(const int *)b;
}

// The k most likely ids of p (V), most likely first, by insertion into a sorted list of k.
static int top_k_ids(const float *p, int vocab, int k, int *out) {
    int n = 0;
    for (int i = 0; i < vocab; i++) {
        if (n == k && p[i] <= p[out[k - 1]]) continue;
        int j = n < k ? n++ : k - 1;
        for (; j > 0 && p[out[j - 1]] < p[i]; j--) out[j] = out[j - 1];
        out[j] = i;
    }
    return n;
}

// Repetition penalty (Keskar et al. 2019, CTRL), as HF applies it: each distinct token of the
// last repeat_last_n is penalised once, a positive logit divided and a negative multiplied.
static void apply_repeat_penalty(const Sampler *sp, float *logits) {
    size_t n = sp->n_seen < (size_t)sp->repeat_last_n ? sp->n_seen : (size_t)sp->repeat_last_n;
    for (size_t i = 0; i < n; i++) {
        int id = sp->recent[i], seen = 0;
        for (size_t j = 0; j < i && !seen; j++) seen = sp->recent[j] == id;
        if (!seen)
            logits[id] = logits[id] > 0 ? logits[id] / sp->repeat_penalty
                                        : logits[id] * sp->repeat_penalty;
    }
}

// softmax(x / temperature) in place, computed as exp((x - max) / temperature): every exponent
// is at most 0, so no temperature, however small, overflows it. Infinite logits (a repetition
// penalty can make them) act as limits: the +inf ones share all the mass, and so do all of
// them when every one is -inf.
static void tempered_softmax(float *x, int n, float temperature) {
    float max = x[argmax(x, n)];
    for (int i = 0; i < n; i++) {
        if (isinf(max)) x[i] = x[i] == max ? 0 : -INFINITY;
        else x[i] = (x[i] - max) / temperature;
    }
    softmax(x, n);
}

// Pick the next token from logits (V), which this overwrites. The steps run in HF's order,
// each on what the previous left: repetition penalty, temperature, top-k, top-p (Holtzman
// et al. 2019), min-p (Nguyen et al. 2024). Total: any finite logits and any options give a
// token in [0, V); a NaN or infinite logit (a broken model) is an error.
static int sample(Sampler *sp, float *logits, int vocab) {
    for (int i = 0; i < vocab; i++)
        if (!isfinite(logits[i]))
            die("the model gave token %d the logit %g: its weights or RoPE settings are broken",
                i, logits[i]);
    if (sp->repeat_penalty != 1) apply_repeat_penalty(sp, logits);
    if (sp->temperature == 0) return argmax(logits, vocab);
    tempered_softmax(logits, vocab, sp->temperature);   // logits now hold probabilities
    float pmax = logits[argmax(logits, vocab)], mass = 1;   // mass: of the candidates before top-p
    int n = 0;
    if (sp->top_k > 0) {
        n = top_k_ids(logits, vocab, sp->top_k, sp->order);
        mass = 0;
        for (int i = 0; i < n; i++) mass += logits[sp->order[i]];
    } else if (sp->top_p >= 1 && sp->min_p <= 0) {   // the whole distribution: no sorting needed
        float r = random_f32(&sp->rng), cdf = 0;
        for (int i = 0; i < vocab; i++) {
            cdf += logits[i];
            if (r < cdf) return i;
        }
        return vocab - 1;
    } else {   // sort only tokens that can survive: below (1-top_p)/V none is in the nucleus
        // (the tokens beneath it hold less than 1-top_p together); the margin covers rounding
        float floor = sp->top_p < 1 ? (1 - sp->top_p) / vocab * 0.999f : sp->min_p * pmax;
        for (int i = 0; i < vocab; i++) if (logits[i] >= floor) sp->order[n++] = i;
        sort_probs = logits;
        qsort(sp->order, n, sizeof(int), by_prob_desc);
    }
    if (sp->top_p < 1) {   // top-p: keep tokens while the mass before them is below top_p
        float before = 0;
        int keep = 0;
        while (keep < n && before < sp->top_p * mass) before += logits[sp->order[keep++]];
        n = keep;
    }
    // min-p: a ratio to the best
    while (n > 1 && logits[sp->order[n - 1]] < sp->min_p * pmax) n--;
    float total = 0;
    for (int i = 0; i < n; i++) total += logits[sp->order[i]];
    float r = random_f32(&sp->rng) * total, cdf = 0;
    for (int i = 0; i < n; i++) {
        cdf += logits[sp->order[i]];
        if (r < cdf) return sp->order[i];
    }
    return sp->order[n - 1];
}

// ----------------------------------------------------------------------------
// Modes

#define MAX_LIST 16   // values in a comma-separated option

typedef struct {
    const char *model_path;
    const char *mode;         // generate | chat | tokenize | logits | ppl | passkey | bench
    const char *input;        // -i: the prompt text (token ids with --ids)
    const char *input_path;   // -f: read the prompt from this file ("-": stdin)
    int input_is_ids;         // --ids: the prompt is token ids, and generate prints ids
    int bos;                  // --bos: prepend BOS (tokenize); generate follows the model's policy
    int steps;                // -n: tokens to generate; -1 = until end of text or context
    Sampler sampler;          // -t -k -p --min-p --repeat-penalty --repeat-last-n settings
    uint64_t seed;            // -s
    const char *system;       // --system: the chat's system prompt
    // -c: cache slots to allocate (0 = what the run needs, up to the trained context)
    long context;
    int chunk;                // --chunk: prefill chunk size (0 = mode default)
    int threads;              // --threads (0 = OpenMP default)
    int reference;            // --reference: the plain reference blocks, not the fast kernels
    const char *logits_out;   // --logits-out FILE
    RopeOptions rope;         // --rope-* and --yarn-*: RoPE settings over the file's
    AttnOptions attn;         // --sinks --window --lminf --lminf-limit --kv-type
    const char *ppl_csv;      // ppl: --ppl-csv FILE, per-bucket rows
    long ppl_bucket;          // ppl: --ppl-bucket, predicted tokens per CSV row
    long ppl_tokens;          // ppl: --ppl-tokens, evaluate only the first N tokens (0 = all)
    const char *kl_base_save; // ppl: --kl-base-save FILE, write the run's top tokens per position
    const char *kl_base;      // ppl: --kl-base FILE, the KL divergence from that saved run
    long passkey_len[MAX_LIST];   // passkey: --passkey-len, prompt lengths in tokens
    // passkey: --passkey-depth, where the key sits (0 = start, 1 = end)
    float passkey_depth[MAX_LIST];
    int n_passkey_len, n_passkey_depth, passkey_trials;
    // bench: --bench-pp/-tg/-depth
    long bench_pp[MAX_LIST], bench_tg[MAX_LIST], bench_depth[MAX_LIST];
    int n_bench_pp, n_bench_tg, n_bench_depth, reps, json;                // bench: -r, --json
    long bench_state[MAX_LIST];   // bench: --bench-state, document lengths for time to first token
    int n_bench_state;
    int csv;                  // bench: --csv
    // --threads and --kv-type as lists: bench sweeps them (the other modes take one value)
    long threads_list[MAX_LIST];
    int kv_types[MAX_LIST];
    int n_threads_list, n_kv_types;
    int no_echo;              // --no-echo: generate prints only the continuation
    int show_prompt;          // --show-prompt: print the rendered prompt and its ids (stderr)
    const char *shown_text;   // the prompt's text, for --show-prompt
    int pieces;               // --pieces: tokenize prints each id with its text
    const char *save_state;   // --save-state FILE: the cache after the prompt's prefill
    const char *load_state;   // --load-state FILE: go on from a saved state
    int reset_turns;          // --reset-turns: chat: each question starts from the state
    int memory;               // --memory: keep every key in blocks, retrieve K per chunk
    long memory_block;        // --memory-block B: positions per block (0: 128)
    long memory_blocks;       // --memory-blocks K: blocks a chunk retrieves per kv head (-1: 16)
    long memory_distance;     // --memory-distance D: farthest placement (0: the default)
    float memory_budget;      // --memory-budget MB: rows kept in RAM before they go to files
    const char *memory_score; // --memory-score quest|infllm: how a chunk scores blocks
    long memory_repr;         // --memory-repr R: infllm's representative tokens (0: 4)
    const char *stop[MAX_LIST];   // --stop: strings that end a reply
    int n_stop;
} Options;

// Parse "12 7 99" (len bytes) into ids, each checked against the vocabulary. Returns the count.
static size_t parse_ids(const char *text, size_t len, int vocab, int **ids_out) {
    const char *nul = memchr(text, 0, len);
    if (nul)
        die("token ids: byte %zu is a NUL byte; ids are decimal numbers", (size_t)(nul - text));
    size_t cap = len / 2 + 1, n = 0;
    int *ids = xcalloc(cap, sizeof(int), "token ids");
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        size_t token_len = strcspn(p, " \t\n\r,");   // the whole word, for the message
        if (*p < '0' || *p > '9' || end != p + token_len || errno)
            die("token ids: '%s' is not a token id", printable(p, min_size(token_len, 20)));
        if (v < 0 || v >= vocab) die("token ids: %ld is outside the vocabulary [0, %d)", v, vocab);
        ids[n++] = (int)v;
        p = end;
    }
    *ids_out = ids;
    return n;
}

// The prompt's bytes, verbatim: -i TEXT, or -f FILE ("-" = stdin). NUL-terminated for --ids.
static char *read_prompt(const Options *o, size_t *len) {
    if (!o->input_path) {
        *len = strlen(o->input);
        char *text = xcalloc(*len + 1, 1, "the prompt");
        memcpy(text, o->input, *len);
        return text;
    }
    FILE *f = strcmp(o->input_path, "-") ? fopen(o->input_path, "rb") : stdin;
    if (!f) die("%s: cannot open: %s", o->input_path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode))
        die("%s: is a directory, not a prompt file", o->input_path);
    size_t cap = 1 << 16, n = 0;
    char *text = malloc(cap);
    for (size_t got; text && (got = fread(text + n, 1, cap - n - 1, f)) > 0;) {
        n += got;
        if (n + 1 == cap) text = realloc(text, cap = mul_size(cap, 2, "the prompt"));
    }
    if (!text) die("cannot allocate memory for the prompt file %s", o->input_path);
    if (ferror(f)) die("%s: read failed: %s", o->input_path, strerror(errno));
    if (f != stdin) fclose(f);
    text[n] = 0;
    *len = n;
    return text;
}

// Peak resident memory in MB: Linux's VmHWM, as ru_maxrss would also count the process that
// exec'd this one (a test's Python, say); elsewhere getrusage.
static double peak_rss_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmHWM:", 6)) {
            fclose(f);
            return strtod(line + 6, NULL) / 1e3;   // kB
        }
    if (f) fclose(f);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
#ifdef __APPLE__
    return ru.ru_maxrss / 1e6;  // bytes on macOS
#else
    return ru.ru_maxrss / 1e3;  // kilobytes on Linux
#endif
}

// Ctrl-C stops generation cleanly (the stats still print) and any other long loop with an
// error; a second Ctrl-C exits at once. SIGTERM and SIGHUP exit at once. Each removes a
// half-written output file first (unlink is safe in a signal handler).
static void on_sigint(int sig) {
    (void)sig;
    if (interrupted) {
        remove_pending_output();
        _exit(130);
    }
    interrupted = 1;
}

static void on_sigterm(int sig) {
    remove_pending_output();
    _exit(128 + sig);
}

// No SA_RESTART: a Ctrl-C at chat's prompt ends the wait for a line (and the chat) at once.
static void catch_signals(void) {
    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_sigterm;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

// A closed standard descriptor would be handed out by the next open(), and printf would then
// write into whatever file got it. Fill each closed one with /dev/null opened read-only, so
// that writing to a closed stdout fails, and is reported, instead.
static void guard_standard_fds(void) {
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) == -1 && open("/dev/null", O_RDONLY) != fd) abort();
}

// Standard output's fate is known only once it is flushed and closed: a full disk, a closed
// descriptor or /dev/full report there. Exit 1 with a message rather than 0 with a cut text.
static void finish_stdout(void) {
    if (fflush(stdout) != 0 || ferror(stdout))
        die("cannot write standard output: %s", strerror(errno));
    if (fclose(stdout) != 0) die("cannot write standard output: %s", strerror(errno));
}

// Output files (--logits-out, --ppl-csv) are written to a new temporary NAME.tmp.XXXXXX beside
// NAME and renamed to NAME once complete, so a failed, interrupted or killed run leaves neither
// a partial file nor a damaged older one: die() and the signal handlers remove the temporary.
// mkstemp() creates it (O_EXCL): an existing file or symlink of that name is never written
// through. A device or pipe (/dev/null, a FIFO) is written directly. No output may be one of
// the run's inputs: the model is mapped, and truncating it under the mapping would lose it.
typedef struct {
    FILE *f;
    const char *path;   // the final name
    int direct;         // a device or pipe, written in place
    int pending;        // its entry in pending_output
} OutputFile;

static int same_file(const char *path, const struct stat *other) {
    struct stat st;
    return stat(path, &st) == 0 && st.st_dev == other->st_dev && st.st_ino == other->st_ino;
}

// Open path for writing; inputs (n_inputs paths, NULL or "-" entries skipped) must survive.
static OutputFile open_output(const char *path, const char *const *inputs, int n_inputs) {
    OutputFile out = {.path = path};
    struct stat st;
    if (!*path) die("an output file needs a name");
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) die("%s: is a directory, not an output file", path);
        out.direct = !S_ISREG(st.st_mode);
    }
    for (int i = 0; i < n_inputs; i++) {
        struct stat in;
        if (!inputs[i] || !strcmp(inputs[i], "-") || stat(inputs[i], &in) != 0) continue;
        if (same_file(path, &in))
            die("%s: writing it would overwrite the input %s; choose another output file", path,
                inputs[i]);
    }
    if (out.direct) {
        out.f = fopen(path, "wb");
        if (!out.f) die("%s: cannot write: %s", path, strerror(errno));
        return out;
    }
    while (out.pending < MAX_PENDING && pending_output[out.pending][0]) out.pending++;
    if (out.pending == MAX_PENDING) die("%s: too many output files at once", path);
    char tmp[sizeof(pending_output[0])];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp.XXXXXX", path) >= (int)sizeof(tmp))
        die("%s: path too long", path);
    int fd = mkstemp(tmp);   // mode 0600; given the usual 0666 & ~umask below, as fopen would
    if (fd < 0) die("%s: cannot create a file beside it: %s", path, strerror(errno));
    memcpy(pending_output[out.pending], tmp, sizeof(tmp));
    mode_t mask = umask(0);
    umask(mask);
    if (fchmod(fd, 0666 & ~mask) != 0 || !(out.f = fdopen(fd, "wb")))
        die("%s: cannot write: %s", tmp, strerror(errno));
    return out;
}

// Flush, sync to disk, close and rename into place (so a crash, even of the machine, leaves the
// old file or the new one whole); on any failure die(), which removes the temporary.
static void close_output(OutputFile *out) {
    int failed = fflush(out->f) != 0 || ferror(out->f);
    if (!failed && !out->direct) failed = fsync(fileno(out->f)) != 0;
    int err = errno;
    if (fclose(out->f) != 0 && !failed) {
        failed = 1;
        err = errno;
    }
    if (failed) die("%s: write failed: %s", out->path, strerror(err));
    if (!out->direct && rename(pending_output[out->pending], out->path) != 0)
        die("%s: cannot move the finished file into place: %s", out->path, strerror(errno));
    pending_output[out->pending][0] = 0;
}

// ---- State files: a prefilled cache, saved and mapped back (--save-state, --load-state)
//
// A state file (model.h, "The state file") holds what the cache holds after a prefill: each
// layer's slot records, the sinks' f32 copies, the key and value rows in the cache's own type,
// the RoPE tables' lengths (dynamic NTK's grows with the text), the tokens and the last logits.
// Loading maps it copy-on-write (MAP_PRIVATE): the cache's rows are used where they lie in the
// file, so loading costs a mapping whatever the state's size, pages are read when attention
// first touches them, and nothing a run writes reaches the file. The run that loads must have
// the model file and every setting that shaped the cache as the run that saved; what differs is
// named, never guessed around.

// FNV-1a, 64 bits (Fowler, Noll and Vo): h goes on over n more bytes.
static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

// Which model file a state belongs to: FNV-1a over the file's size, everything before the
// tensor data (header, layer configs, tensor table, tokenizer) and the first 4 KiB of every
// tensor. A few pages per tensor, so milliseconds even for a large model; two exports differing
// in settings, shapes, tokenizer or the first rows of any weight differ here.
static uint64_t model_fingerprint(const ModelFile *mf) {
    const FileHeader *h = mf->header;
    uint64_t fp = fnv1a(0xcbf29ce484222325ull, &mf->size, sizeof(mf->size));
    size_t meta = h->tensor_table_offset + (size_t)h->n_tensors * LR_TENSOR_ENTRY_SIZE;
    if (h->tokenizer_size) meta = max_size(meta, h->tokenizer_offset + h->tokenizer_size);
    fp = fnv1a(fp, mf->bytes, meta);
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        const TensorEntry *e = &mf->tensors[i];
        fp = fnv1a(fp, mf->bytes + e->offset, min_size(e->size, 4096));
    }
    return fp;
}

static size_t align_up(size_t x, size_t a) { return add_size(x, a - 1, "state file") / a * a; }

// The memory blocks a state saves the bounds of, per layer: those holding one of its positions.
static size_t state_memory_blocks(const StateHeader *h) {
    if (!h->memory_block) return 0;
    uint64_t n = h->memory_positions;
    return (size_t)(n / h->memory_block + (n % h->memory_block != 0));
}

// Where each section goes, from the header's counts: one layout for the writer and the reader
// (a file whose section table differs from it is refused). Sets file_size.
static void state_layout(StateHeader *h) {
    size_t L = h->n_layers;
    size_t sink_floats = mul_size(mul_size(L, h->max_sink, "state"), h->kv_dim, "state");
    size_t rows = mul_size(h->n_slots, h->row_bytes, "state");
    size_t memory_rows = mul_size(mul_size(L, h->memory_positions, "state"), h->row_bytes, "state");
    size_t blocks = mul_size(L, state_memory_blocks(h), "state");
    size_t sizes[ST_COUNT] = {
        [ST_LAYER_CONFIG] = mul_size(L, sizeof(LayerConfig), "state"),
        [ST_SLOTS] = mul_size(L, sizeof(StateSlots), "state"),
        [ST_ROPE_LEN] = mul_size(L, sizeof(uint64_t), "state"),
        [ST_TOKENS] = mul_size(h->n_tokens, sizeof(int32_t), "state"),
        [ST_LOGITS] = mul_size(h->vocab_size, sizeof(float), "state"),
        [ST_SINK_KEYS] = mul_size(sink_floats, sizeof(float), "state"),
        [ST_SINK_VALUES] = mul_size(sink_floats, sizeof(float), "state"),
        [ST_KEYS] = rows,
        [ST_VALUES] = rows,
        [ST_MEM_KEYS] = memory_rows,
        [ST_MEM_VALUES] = memory_rows,
        [ST_MEM_BOUNDS] = mul_size(blocks, mul_size(2, h->kv_dim, "state"), "state"),
        [ST_MEM_BOUND_SCALES] = mul_size(mul_size(blocks, h->n_kv_heads, "state"),
                                         sizeof(float), "state"),
    };
    size_t at = sizeof(StateHeader);
    for (int s = 0; s < ST_COUNT; s++) {
        at = align_up(at, LR_STATE_ALIGN);
        h->sections[s].offset = at;
        h->sections[s].size = sizes[s];
        at = add_size(at, sizes[s], "state file");
    }
    h->file_size = at;
}

// What a state holds besides the cache: the text so far and what comes after it.
typedef struct {
    const int *tokens;     // (n_tokens) one id per position filled
    size_t n_tokens;
    const float *logits;   // (vocab_size) after the last token
    StateKind kind;
    int chat_template;     // ChatTemplate, for STATE_CHAT_DOCUMENT
} StateText;

static StateHeader state_header(const Transformer *t, const StateText *text) {
    const KVCache *kv = &t->cache;
    StateHeader h = {.magic = LR_STATE_MAGIC, .version = LR_STATE_VERSION};
    h.model_fingerprint = model_fingerprint(&t->file);
    h.n_layers = (uint32_t)t->config.n_layers;
    h.vocab_size = (uint32_t)t->config.vocab_size;
    h.kv_type = (uint32_t)kv->type;
    h.lminf = (uint32_t)kv->built.lminf;
    h.n_sink = (uint64_t)kv->built.n_sink;
    h.window = (uint64_t)kv->built.window;
    h.limit = (uint64_t)kv->built.limit;
    h.context = kv->context;
    h.max_T = (uint32_t)kv->max_T;
    h.sink_kind = (uint32_t)kv->sink_kind;
    h.n_slots = kv->n_slots;
    h.max_sink = kv->max_sink;
    h.kv_dim = kv->kv_dim;
    h.n_kv_heads = (uint32_t)kv->n_kv_heads;
    h.head_dim = (uint32_t)kv->head_dim;
    h.row_bytes = kv->row_bytes;
    h.n_tokens = text->n_tokens;
    h.kind = (uint32_t)text->kind;
    h.chat_template = (uint32_t)text->chat_template;
    const ContextMemory *m = t->memory;
    if (m) {   // the memory holds the text's positions (and, in bench, stale ones past them)
        h.memory = 1;
        h.memory_block = (uint32_t)m->block;
        h.memory_blocks = (uint32_t)m->top_k;
        h.memory_distance = (uint32_t)m->distance;
        h.memory_positions = text->n_tokens;
    }
    state_layout(&h);
    return h;
}

// Write n bytes at offset `at` of the state file (skipped bytes become holes).
static void write_at(OutputFile *out, size_t at, const void *data, size_t n) {
    if (fseeko(out->f, (off_t)at, SEEK_SET) != 0 || fwrite(data, 1, n, out->f) != n)
        die("%s: write failed: %s", out->path, strerror(errno));
}

// A layer's rows that hold a position: its first n_tokens slots, or all of them.
static void write_rows(OutputFile *out, size_t at, const KVCache *kv, const uint8_t *rows,
                       size_t n_tokens) {
    for (int l = 0; l < kv->n_layers; l++) {
        const LayerSlots *ls = &kv->layers[l];
        size_t used = min_size(n_tokens, ls->n_sink + ls->ring);
        size_t off = ls->first * kv->row_bytes;
        write_at(out, at + off, rows + off, used * kv->row_bytes);
    }
}

// The context memory's rows of the text's positions and the bounds of the blocks holding them,
// layer after layer (the section sizes of state_layout()).
static void write_memory(OutputFile *out, const StateHeader *h, const ContextMemory *m) {
    size_t n = h->memory_positions;
    size_t rows = n * h->row_bytes;
    size_t bounds = state_memory_blocks(h) * 2 * h->kv_dim;
    size_t scales = state_memory_blocks(h) * h->n_kv_heads * sizeof(float);
    const StateSectionEntry *sec = h->sections;
    for (int l = 0; l < m->n_layers; l++) {
        const MemoryLayer *ml = &m->layers[l];
        if (ml->n_pos < n) die("the context memory holds %zu of %zu positions", ml->n_pos, n);
        write_at(out, sec[ST_MEM_KEYS].offset + l * rows, ml->key, rows);
        write_at(out, sec[ST_MEM_VALUES].offset + l * rows, ml->value, rows);
        write_at(out, sec[ST_MEM_BOUNDS].offset + l * bounds, ml->bounds, bounds);
        write_at(out, sec[ST_MEM_BOUND_SCALES].offset + l * scales, ml->bound_scale, scales);
    }
}

// --save-state: the cache, its context memory, RoPE tables and text as they are now, written to
// a temporary file beside path and renamed over it once complete (open_output()): a crash or a
// full disk on the way leaves an older state file as it was.
static void save_state(const Transformer *t, const char *path, const StateText *text,
                       const char *const *inputs, int n_inputs) {
    const KVCache *kv = &t->cache;
    int L = t->config.n_layers;
    StateHeader h = state_header(t, text);
    OutputFile out = open_output(path, inputs, n_inputs);
    if (out.direct) die("%s: a state file must be a regular file", path);
    StateSlots *slots = xcalloc(L, sizeof(StateSlots), "state");
    uint64_t *rope_len = xcalloc(L, sizeof(uint64_t), "state");
    int32_t *tokens = xcalloc(max_size(text->n_tokens, 1), sizeof(int32_t), "state");
    for (int l = 0; l < L; l++) {
        const LayerSlots *ls = &kv->layers[l];
        StateSlots s = {ls->first, ls->n_sink, ls->ring, ls->window, (uint64_t)ls->fills};
        slots[l] = s;
        rope_len[l] = t->rope.table_len[l];
    }
    for (size_t i = 0; i < text->n_tokens; i++) tokens[i] = text->tokens[i];
    const StateSectionEntry *sec = h.sections;
    write_at(&out, 0, &h, sizeof(h));
    write_at(&out, sec[ST_LAYER_CONFIG].offset, t->config.layers, sec[ST_LAYER_CONFIG].size);
    write_at(&out, sec[ST_SLOTS].offset, slots, sec[ST_SLOTS].size);
    write_at(&out, sec[ST_ROPE_LEN].offset, rope_len, sec[ST_ROPE_LEN].size);
    write_at(&out, sec[ST_TOKENS].offset, tokens, sec[ST_TOKENS].size);
    write_at(&out, sec[ST_LOGITS].offset, text->logits, sec[ST_LOGITS].size);
    write_at(&out, sec[ST_SINK_KEYS].offset, kv->sink_key, sec[ST_SINK_KEYS].size);
    write_at(&out, sec[ST_SINK_VALUES].offset, kv->sink_value, sec[ST_SINK_VALUES].size);
    write_rows(&out, sec[ST_KEYS].offset, kv, kv->key, text->n_tokens);
    write_rows(&out, sec[ST_VALUES].offset, kv, kv->value, text->n_tokens);
    if (t->memory) write_memory(&out, &h, t->memory);
    if (fflush(out.f) != 0 || ftruncate(fileno(out.f), (off_t)h.file_size) != 0)
        die("%s: write failed: %s", path, strerror(errno));
    close_output(&out);
    free(slots);
    free(rope_len);
    free(tokens);
}

// The memory fields: all 0 (no memory), or settings --memory could have had (else they would
// be named as options to give, or divide by a block of 0).
static void check_memory_header(const StateHeader *h, const char *path) {
    int none = !h->memory && !h->memory_block && !h->memory_blocks && !h->memory_distance
               && !h->memory_positions;
    int some = h->memory == 1 && h->memory_block >= 1 && h->memory_block <= 1 << 16
               && h->memory_blocks <= 1 << 16 && h->memory_distance >= 1
               && h->memory_distance <= 1 << 30;
    if (!none && !some)
        die("%s: context memory flag %u, blocks of %u, %u retrieved, distance %u: the file is "
            "damaged", path, h->memory, h->memory_block, h->memory_blocks, h->memory_distance);
}

// The header of a state file, checked to be one, read before the transformer is built: the
// cache must be built with the state's context and chunk size.
static StateHeader read_state_header(const char *path) {
    StateHeader h;
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    ssize_t got = pread(fd, &h, sizeof(h), 0);
    close(fd);
    if (got != (ssize_t)sizeof(h))
        die("%s: %lld bytes is too short for a longrun state file (its header is %zu bytes)",
            path, (long long)st.st_size, sizeof(h));
    if (h.magic != LR_STATE_MAGIC) die("%s: not a longrun state file (no LRST magic)", path);
    if (h.version != LR_STATE_VERSION)
        die("%s: state file version %u; this longrun reads version %d: save the state again",
            path, h.version, LR_STATE_VERSION);
    if (h.max_T < 1 || h.max_T > 1 << 16 || h.context < 1)
        die("%s: chunks of %u tokens and a context of %llu: the file is damaged", path, h.max_T,
            (unsigned long long)h.context);
    if (h.kv_type >= KV_COUNT || h.lminf > 1)   // else named as the options they record
        die("%s: KV type %u, LM-Infinite flag %u: the file is damaged", path, h.kv_type, h.lminf);
    if (h.n_slots > (uint64_t)st.st_size)   // each slot has a row of at least a byte in the file
        die("%s: %llu slots in a file of %lld bytes: the file is damaged", path,
            (unsigned long long)h.n_slots, (long long)st.st_size);
    check_memory_header(&h, path);
    return h;
}

// The context memory's settings as the saving run had them: a state with a memory needs a run
// with the same one, and a run with a memory a state that has one.
static void check_state_memory(const ContextMemory *m, const StateHeader *h, const char *path) {
    if (h->memory && !m)
        die("%s holds a context memory: add --memory --memory-block %u --memory-blocks %u",
            path, h->memory_block, h->memory_blocks);
    if (!m) return;
    if (!h->memory)
        die("%s holds no context memory (it was saved without --memory): leave --memory out",
            path);
    if (h->memory_block != (uint32_t)m->block)
        die("%s holds a context memory of %u-position blocks, this run's are %d: add "
            "--memory-block %u", path, h->memory_block, m->block, h->memory_block);
    if (h->memory_blocks != (uint32_t)m->top_k)
        die("%s was saved with --memory-blocks %u; this run has %d", path, h->memory_blocks,
            m->top_k);
}

// What the loading run's options must repeat of the saving run's: refused with the option to
// change (the model is checked first: another model's state is garbage whatever the options).
static void check_state_options(const Transformer *t, const StateHeader *h, const char *path) {
    const KVCache *kv = &t->cache;
    const AttnOptions *a = &kv->built;
    if (h->model_fingerprint != model_fingerprint(&t->file))
        die("%s was saved from another model file (or another export of it)", path);
    if (h->kv_type != (uint32_t)kv->type)
        die("%s holds a %s KV cache, this run's is %s: add --kv-type %s", path,
            kv_type_names[h->kv_type], kv_type_names[kv->type], kv_type_names[h->kv_type]);
    if (h->lminf != (uint32_t)a->lminf)
        die("%s was saved %s --lminf; this run is %s it", path, h->lminf ? "with" : "without",
            a->lminf ? "with" : "without");
    if (h->n_sink != (uint64_t)a->n_sink)
        die("%s was saved with --sinks %llu; this run has %ld", path,
            (unsigned long long)h->n_sink, a->n_sink);
    if (h->window != (uint64_t)a->window)
        die("%s was saved with --window %llu; this run has %ld (0: the model's own)", path,
            (unsigned long long)h->window, a->window);
    if (h->limit != (uint64_t)a->limit)
        die("%s was saved with --lminf-limit %llu; this run has %ld", path,
            (unsigned long long)h->limit, a->limit);
    check_state_memory(t->memory, h, path);
}

// Each layer's attention and RoPE settings as the saving run had them after its options.
static void check_state_layers(const Config *c, const LayerConfig *saved, const char *path) {
    for (int l = 0; l < c->n_layers; l++) {
        const LayerConfig *was = &saved[l], *now = &c->layers[l];
        if (!memcmp(was, now, sizeof(*now))) continue;
        const char *what = "RoPE parameters (--rope-*, --yarn-*)";
        if (was->rope_type != now->rope_type)
            what = "RoPE method (--rope-scaling)";
        else if (was->factor != now->factor)
            what = "RoPE factor (--rope-factor, or -c with --rope-scaling)";
        else if (was->rope_theta != now->rope_theta)
            what = "RoPE base (--rope-theta)";
        else if (was->orig_ctx != now->orig_ctx)
            what = "original context (--rope-orig-ctx)";
        else if (was->attn_kind != now->attn_kind || was->window != now->window)
            what = "layer settings";
        die("%s was saved with other %s: layer %d differs from this run's", path, what, l);
    }
}

// The cache's shape follows from the model and the options; a file whose counts disagree with
// them, or whose sections are not where state_layout() puts them, is damaged.
static void check_state_layout(const Transformer *t, const StateHeader *h, size_t file_size,
                               const char *path) {
    const KVCache *kv = &t->cache;
    const Config *c = &t->config;
    if (h->n_layers != (uint32_t)c->n_layers || h->vocab_size != (uint32_t)c->vocab_size
        || h->n_slots != kv->n_slots || h->max_sink != kv->max_sink || h->kv_dim != kv->kv_dim
        || h->n_kv_heads != (uint32_t)kv->n_kv_heads || h->head_dim != (uint32_t)kv->head_dim
        || h->row_bytes != kv->row_bytes || h->kind >= STATE_KIND_COUNT
        || min_size(h->context, h->n_slots) != kv->context || h->max_T != (uint32_t)kv->max_T
        || h->memory_positions != (h->memory ? h->n_tokens : 0))
        die("%s: its counts do not match its settings: the file is damaged", path);
    size_t capacity = cache_capacity(kv, t->config.n_layers);
    if (h->n_tokens == 0 || h->n_tokens > capacity)
        die("%s: %llu tokens in a cache of %zu positions: the file is damaged", path,
            (unsigned long long)h->n_tokens, capacity);
    if (h->n_tokens > file_size / sizeof(int32_t))   // a window's cache takes any number
        die("%s: %llu tokens in a file of %zu bytes: the file is damaged", path,
            (unsigned long long)h->n_tokens, file_size);
    StateHeader want = *h;
    state_layout(&want);
    if (memcmp(want.sections, h->sections, sizeof(h->sections)) || want.file_size != h->file_size)
        die("%s: its sections are not where its counts put them: the file is damaged", path);
    if (file_size != h->file_size)
        die("%s: %zu bytes, but its header says %llu: the file is truncated or damaged", path,
            file_size, (unsigned long long)h->file_size);
}

// A layer's saved slots must be the ones this run built from the same settings: a state is
// saved after a prefill, and only decoding fills a context and switches it to StreamingLLM.
static void check_state_slots(const LayerSlots *built, const StateSlots *s, int l,
                              const char *path) {
    if (s->fills != (uint64_t)built->fills || s->first != built->first
        || s->n_sink != built->n_sink || s->ring != built->ring || s->window != built->window)
        die("%s: layer %d's slots do not follow from its settings: the file is damaged", path, l);
}

// The RoPE tables as the saving run left them: as built, or dynamic NTK grown to a length the
// text reached, or LongRoPE's long list once past L0 (rope_update()).
static void restore_rope(Transformer *t, const uint64_t *len, size_t n_tokens, const char *path) {
    for (int l = 0; l < t->config.n_layers; l++) {
        const LayerConfig *lc = &t->config.layers[l];
        uint64_t L0 = lc->orig_ctx, want = len[l];
        int as_built = want == L0;   // build_rope()
        int grown = lc->rope_type == ROPE_DYNAMIC && want >= L0 && want <= n_tokens;
        int long_list = lc->rope_type == ROPE_LONGROPE && want == L0 + 1 && n_tokens > L0;
        if (!as_built && !grown && !long_list)
            die("%s: layer %d's RoPE table length %llu cannot come from its text: the file is "
                "damaged", path, l, (unsigned long long)want);
        if (want == t->rope.table_len[l]) continue;
        rope_set_length(&t->rope, &t->config, l, (size_t)want);
        LayerRope rope = layer_rope(&t->rope, &t->config, l);
        check_rope_table(rope.inv_freq, rope.rotary_dim / 2, rope.attn_factor, l, path);
    }
}

// A state file mapped into the cache (load_state()): the text so far, in the mapping.
typedef struct {
    StateHeader header;
    const int32_t *tokens;   // (header.n_tokens)
    const float *logits;     // (vocab_size) after the last token
    double seconds;          // what loading took
} LoadedState;

// The mapping's slot records checked against this run's cache as built, which becomes the
// cache's layout again (an earlier state's run may have filled its context and switched it).
static void install_slots(KVCache *kv, const Config *c, const StateHeader *h,
                          const uint8_t *base, const char *path) {
    lay_out_slots(kv, c);
    const StateSlots *slots = (const StateSlots *)(base + h->sections[ST_SLOTS].offset);
    for (int l = 0; l < kv->n_layers; l++) check_state_slots(&kv->layers[l], &slots[l], l, path);
    SinkKind kind = kv->built.lminf ? SINKS_LMINF : SINKS_STREAMING;
    if (h->sink_kind != (uint32_t)kind)
        die("%s: its sink kind does not follow from its settings: the file is damaged", path);
    kv->sink_kind = kind;
}

// The context memory as saved: each layer's rows copied into the run's store and its blocks'
// bounds copied. The store grows by realloc or ftruncate as the text goes on, so it cannot live
// in the copy-on-write mapping as the cache's rows do; memory_reserve() makes the room, in RAM
// or, past --memory-budget, in files. Positions past the state's (a --reset-turns chat's
// earlier turns) are left as they are: written again before any block holding one is scored.
static void load_memory(ContextMemory *m, const KVCache *kv, const StateHeader *h,
                        const uint8_t *base) {
    size_t n = h->memory_positions;
    size_t rows = n * kv->row_bytes;
    size_t bounds = state_memory_blocks(h) * 2 * kv->kv_dim;
    size_t scales = state_memory_blocks(h) * kv->n_kv_heads * sizeof(float);
    const StateSectionEntry *sec = h->sections;
    for (int l = 0; l < m->n_layers; l++) {
        MemoryLayer *ml = &m->layers[l];
        memory_reserve(m, kv, l, n);
        memcpy(ml->key, base + sec[ST_MEM_KEYS].offset + l * rows, rows);
        memcpy(ml->value, base + sec[ST_MEM_VALUES].offset + l * rows, rows);
        memcpy(ml->bounds, base + sec[ST_MEM_BOUNDS].offset + l * bounds, bounds);
        memcpy(ml->bound_scale, base + sec[ST_MEM_BOUND_SCALES].offset + l * scales, scales);
        ml->n_pos = n;
    }
}

// --load-state: map path and make it the cache (and copy its context memory into the run's),
// after checking it is one this run can go on from (read_state_header(), the options, the
// layers, the layout, the slots, the tokens).
static void load_state(Transformer *t, const char *path, LoadedState *out) {
    double start = now_seconds();
    KVCache *kv = &t->cache;
    StateHeader h = read_state_header(path);
    check_state_options(t, &h, path);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) die("%s: cannot open: %s", path, strerror(errno));
    // Mapped before the checks and made the cache's storage at once (its rows let go), so that
    // free_cache() unmaps it whichever check refuses the file (tests/fuzz/fuzz_state.c goes on
    // after die()); the descriptor is closed before any check too.
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (base == MAP_FAILED) die("%s: cannot mmap: %s", path, strerror(errno));
    kv_release_rows(kv);
    kv->map = base;
    kv->map_size = (size_t)st.st_size;
    check_state_layout(t, &h, (size_t)st.st_size, path);
    if (memcmp(base, &h, sizeof(h))) die("%s: changed while being read", path);
    const StateSectionEntry *sec = h.sections;
    check_state_layers(&t->config, (const LayerConfig *)(base + sec[ST_LAYER_CONFIG].offset), path);
    const int32_t *tokens = (const int32_t *)(base + sec[ST_TOKENS].offset);
    for (size_t i = 0; i < h.n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= t->config.vocab_size)
            die("%s: token %zu is id %d, outside the vocabulary: the file is damaged", path, i,
                tokens[i]);
    install_slots(kv, &t->config, &h, base, path);
    restore_rope(t, (const uint64_t *)(base + sec[ST_ROPE_LEN].offset), h.n_tokens, path);
    kv->key = base + sec[ST_KEYS].offset;
    kv->value = base + sec[ST_VALUES].offset;
    kv->sink_key = (float *)(base + sec[ST_SINK_KEYS].offset);
    kv->sink_value = (float *)(base + sec[ST_SINK_VALUES].offset);
    if (t->memory) load_memory(t->memory, kv, &h, base);
    out->header = h;
    out->tokens = tokens;
    out->logits = (const float *)(base + sec[ST_LOGITS].offset);
    out->seconds = now_seconds() - start;
}

// The start-up bill's line for a loaded state: its tokens, its size, its context memory and
// what loading cost.
static void print_state_bill(const Transformer *t, const char *path, const LoadedState *from) {
    const StateHeader *h = &from->header;
    struct stat st;
    double disk_mb = stat(path, &st) == 0 ? (double)st.st_blocks * 512 / 1e6 : 0;
    fprintf(stderr, "state: %s, %llu tokens, %.1f MB on disk (%.1f MB mapped), %s KV", path,
            (unsigned long long)h->n_tokens, disk_mb, h->file_size / 1e6,
            kv_type_names[t->cache.type]);
    if (t->memory) {
        const StateSectionEntry *sec = h->sections;
        size_t copied = 0;
        for (int s = ST_MEM_KEYS; s <= ST_MEM_BOUND_SCALES; s++) copied += sec[s].size;
        fprintf(stderr, " + a context memory of %llu positions (%.1f MB copied into %s)",
                (unsigned long long)h->memory_positions, copied / 1e6,
                t->memory->on_file ? "files" : "RAM");
    }
    fprintf(stderr, ", loaded in %.1f ms\n", from->seconds * 1e3);
}

// The context and chunk size of a run that loads a state: the state's; -c or --chunk may only
// repeat them, as the slots of the cache depend on both.
static size_t state_context(const Options *o, const StateHeader *h) {
    if (o->context && (uint64_t)o->context != h->context)
        die("%s was saved with a context of %llu positions; this run asks -c %ld: leave -c out",
            o->load_state, (unsigned long long)h->context, o->context);
    if (o->chunk && (uint32_t)o->chunk != h->max_T)
        die("%s was saved with chunks of %u tokens; this run asks --chunk %d: leave --chunk out",
            o->load_state, h->max_T, o->chunk);
    // Each layer has min(its ring, context) slots, n_slots in all, so a context past n_slots
    // lays out the same cache as n_slots: built with at most that, a damaged context cannot
    // ask for a cache larger than the file (n_slots <= its size, read_state_header()).
    return min_size(h->context, h->n_slots);
}

// The text so far: a loaded state's tokens (from may be NULL), then n more. Caller frees.
static int *text_so_far(const LoadedState *from, const int *ids, size_t n, size_t *n_text) {
    size_t n_state = from ? from->header.n_tokens : 0;
    *n_text = add_size(n_state, n, "the text");
    int *text = xcalloc(max_size(*n_text, 1), sizeof(int), "the text");
    for (size_t i = 0; i < n_state; i++) text[i] = from->tokens[i];
    if (n) memcpy(text + n_state, ids, n * sizeof(int));
    return text;
}

// The logits after a loaded state's last token, copied where forward() would have left them.
static float *state_logits(Transformer *t, const LoadedState *from) {
    memcpy(t->state.logits, from->logits, t->config.vocab_size * sizeof(float));
    return t->state.logits;
}

// --save-state, if given: the text so far (n tokens) and the logits after its last token.
static void save_text_state(Transformer *t, const Options *o, const int *tokens, size_t n,
                            const float *logits, StateKind kind, int chat_template) {
    if (!o->save_state) return;
    double start = now_seconds();
    StateText text = {tokens, n, logits, kind, chat_template};
    const char *inputs[] = {o->model_path, o->input_path};
    save_state(t, o->save_state, &text, inputs, 2);
    fprintf(stderr, "state: %zu tokens saved to %s in %.2f s\n", n, o->save_state,
            now_seconds() - start);
}

// Feed tokens[0..n) to the model from position pos0, max_T at a time, and hand each chunk's
// logits to each(ctx, logits, done, T): rows for tokens done .. done+T-1 (or only the last
// row, as the transformer was built). The one chunk loop of prefill, logits and ppl; once it
// has run 2 s, it shows `what`'s progress on stderr. Stops after a Ctrl-C; returns the tokens fed.
typedef void (*ChunkDone)(void *ctx, float *logits, size_t done, int T);

static size_t run_chunks(Transformer *t, const int *tokens, size_t n, size_t pos0,
                         const char *what, ChunkDone each, void *ctx) {
    double start = now_seconds();
    size_t done = 0;
    int shown = 0;   // a progress line is on stderr
    while (done < n && !interrupted) {
        int T = (int)min_size(n - done, (size_t)t->state.max_T);
        float *logits = forward(t, tokens + done, T, pos0 + done);
        if (!logits) break;   // a Ctrl-C inside the chunk
        each(ctx, logits, done, T);
        done += (size_t)T;
        double elapsed = now_seconds() - start;
        if (elapsed < 2) continue;
        fprintf(stderr, "\r%s %zu / %zu tokens, %.0f tok/s", what, done, n, done / elapsed);
        shown = 1;
    }
    if (shown) fprintf(stderr, "\n");
    return done;
}

static void keep_logits(void *last, float *logits, size_t done, int T) {
    (void)done;
    (void)T;
    *(float **)last = logits;
}

// Feed n tokens to the model from position pos0 in chunks; return the last token's logits.
static float *prefill(Transformer *t, const int *tokens, size_t n, size_t pos0) {
    float *logits = NULL;
    run_chunks(t, tokens, n, pos0, "prefill", keep_logits, &logits);
    if (interrupted) die("interrupted during prefill");
    return logits;
}

// The context-full policy of generate and chat: a full cache goes on as StreamingLLM
// (kv_continue_streaming()). Says so once; returns 0 if the cache is too small for it.
static int continue_streaming(Transformer *t) {
    size_t capacity = cache_capacity(&t->cache, t->config.n_layers);
    size_t window = kv_continue_streaming(&t->cache, t->config.n_layers);
    if (!window) {
        fprintf(stderr, "\n[context full at %zu tokens, too small to go on through a window: "
                "raise -c]\n", capacity);
        return 0;
    }
    fprintf(stderr, "\n[context full: going on with 4 sinks + a window of %zu (StreamingLLM); "
            "see --window]\n", window);
    return 1;
}

// Room for n more tokens at pos: there is, or the context-full policy makes it.
static int make_room(Transformer *t, size_t pos, size_t n) {
    return pos + n <= cache_capacity(&t->cache, t->config.n_layers) || continue_streaming(t);
}

// --stop strings: the decoded text is kept, and what may still become a stop string is held
// back, so a stop string ends the reply unprinted (llama.cpp's antiprompts print).
typedef struct {
    const char *const *stops;
    int n_stops;
    FILE *mem;                // the decoded text so far (open_memstream)
    char *text;
    size_t len, printed;      // bytes decoded; bytes of them printed
} StopWatch;

// The tail of the text that starts a stop string (held back), or, with *hit, the stop string
// the text ends with.
static size_t stop_tail(const StopWatch *w, int *hit) {
    size_t hold = 0;
    *hit = 0;
    for (int i = 0; i < w->n_stops; i++) {
        size_t n = strlen(w->stops[i]);
        if (n <= w->len && !memcmp(w->text + w->len - n, w->stops[i], n)) {
            *hit = 1;
            return n;
        }
        for (size_t k = min_size(n - 1, w->len); k > hold; k--)
            if (!memcmp(w->text + w->len - k, w->stops[i], k)) hold = k;
    }
    return hold;
}

// After a token went into w->mem: print what can no longer start a stop string (print_text)
// and return 1 if the text now ends with one.
static int stop_check(StopWatch *w, int print_text, FILE *out) {
    fflush(w->mem);
    int hit;
    size_t hold = stop_tail(w, &hit);
    size_t upto = w->len - hold;
    if (print_text && upto > w->printed) fwrite(w->text + w->printed, 1, upto - w->printed, out);
    w->printed = max_size(w->printed, upto);
    return hit;
}

// Sample up to steps tokens (-1: no limit) after logits, printing each and feeding it back at
// *pos. Stops at the model's end-of-text or end-of-turn token (not fed back, not counted; known
// only with a tokenizer), one of the n_stops stop strings (held back, not printed), a full
// cache or Ctrl-C. Prints text (through the stop-string watch) or ids to out. Returns the
// number of tokens sampled.
static int decode(Transformer *t, Tokenizer *tok, int print_text, Sampler *sp, float *logits,
                  size_t *pos, int steps, FILE *out, const char *const *stops, int n_stops) {
    TokenStream stream;
    StopWatch w = {.stops = stops, .n_stops = n_stops};
    print_text = print_text && tok;
    if (tok) {
        tokenizer_stream_init(&stream, tok, 0);
        w.mem = open_memstream(&w.text, &w.len);
        if (!w.mem) die("out of memory");
    }
    int generated = 0;
    int stopped = 0;   // by a stop string, which stays unprinted
    while ((steps < 0 || generated < steps) && !interrupted) {
        int next = sample(sp, logits, t->config.vocab_size);
        if (tok && (next == tokenizer_eos_id(tok) || next == tokenizer_eot_id(tok))) break;
        generated++;
        if (tok) tokenizer_stream_put(&stream, next, w.mem);
        if (tok) stopped = stop_check(&w, print_text, out);
        if (!print_text) fprintf(out, generated > 1 ? " %d" : "%d", next);
        if (fflush(out) != 0 || ferror(out)) die("cannot write the output: %s", strerror(errno));
        if (stopped) break;
        sampler_accept(sp, next);
        if (!make_room(t, *pos, 1)) break;
        logits = forward(t, &next, 1, (*pos)++);   // fed back even when it is the last, so a chat
    }                                              // continues from a cache holding the whole reply
    if (tok) {   // the text held back for a stop string that never came
        if (!stopped) tokenizer_stream_flush(&stream, w.mem);
        fclose(w.mem);
        if (print_text && !stopped) fwrite(w.text + w.printed, 1, w.len - w.printed, out);
        free(w.text);
    }
    return generated;
}

static void print_stats(size_t n_prompt, double prefill_s, int generated, double decode_s) {
    double prefill_rate = n_prompt ? n_prompt / prefill_s : 0;
    fprintf(stderr,
            "prompt %zu tokens, prefill %.1f tok/s, first token after %.2f s, decode %.1f tok/s "
            "(%d tokens), "
            "peak RSS %.0f MB\n",
            n_prompt, prefill_rate, prefill_s, generated / decode_s, generated, peak_rss_mb());
}

// --show-prompt: what the model is about to read, on stderr: the rendered text, then its ids.
static void show_prompt(const char *text, const int *ids, size_t n) {
    fprintf(stderr, "--- the model reads (%zu tokens) ---\n%s\n--- as ids ---\n", n, text);
    for (size_t i = 0; i < n; i++) fprintf(stderr, i ? " %d" : "%d", ids[i]);
    fprintf(stderr, "\n---\n");
}

// -m generate: echo the prompt's text (echo, may be NULL), prefill the prompt (after a loaded
// state, `from`, if any; then the prompt may be empty), save the state (--save-state), then
// sample until -n tokens, end of text, a --stop string, a full context or Ctrl-C. Stats on
// stderr.
static void generate(Transformer *t, Tokenizer *tok, Sampler *sp, const int *prompt,
                     size_t n_prompt, const char *echo, const Options *o,
                     const LoadedState *from) {
    size_t n_text, pos0 = from ? from->header.n_tokens : 0;
    int *text = text_so_far(from, prompt, n_prompt, &n_text);
    for (size_t i = 0; i < n_text; i++) sampler_accept(sp, text[i]);
    if (o->show_prompt && n_prompt) show_prompt(o->shown_text, prompt, n_prompt);
    if (echo) fputs(echo, stdout);
    fflush(stdout);
    double t0 = now_seconds();
    float *logits = n_prompt ? prefill(t, prompt, n_prompt, pos0) : state_logits(t, from);
    double t1 = now_seconds();
    save_text_state(t, o, text, n_text, logits, STATE_TEXT, 0);
    free(text);
    double t2 = now_seconds();
    size_t pos = n_text;
    int generated = decode(t, tok, !o->input_is_ids, sp, logits, &pos, o->steps, stdout, o->stop,
                           o->n_stop);
    printf("\n");
    fflush(stdout);   // the text before the stats on stderr
    print_stats(n_prompt, t1 - t0, generated, now_seconds() - t2);
}

// Chat formats, chosen by the template id export.py recorded from the model's chat_template.
// A turn is: [close the previous reply] [system, first turn only] user message, assistant cue.
typedef struct {
    const char *system;    // printf format with the system prompt
    const char *user;      // printf format with the user message, ending with the assistant cue
    const char *close;     // what ends an assistant reply (its end-of-turn token and after)
} ChatFormat;

static const ChatFormat chat_formats[CHAT_COUNT] = {
    [CHAT_CHATML] = { "<|im_start|>system\n%s<|im_end|>\n",
                      "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n" },
    [CHAT_LLAMA3] = { "<|start_header_id|>system<|end_header_id|>\n\n%s<|eot_id|>",
                      "<|start_header_id|>user<|end_header_id|>\n\n%s<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "<|eot_id|>" },
    [CHAT_LLAMA2_INST] = { "[INST] <<SYS>>\n%s\n<</SYS>>\n\n", "[INST] %s [/INST]", " </s><s>" },
};

// printf into a growing heap string (no fixed-size buffers): appends to *buf.
static void append_format(char **buf, size_t *len, const char *fmt, const char *arg) {
    int n = snprintf(NULL, 0, fmt, arg);
    if (n < 0) die("cannot format the chat turn");
    char *grown = realloc(*buf, add_size(add_size(*len, (size_t)n, "chat turn"), 1, "chat turn"));
    if (!grown) die("out of memory building the chat turn");
    snprintf(grown + *len, (size_t)n + 1, fmt, arg);
    *buf = grown;
    *len += (size_t)n;
}

// Terminal escape sequences (arrow keys send "\x1b[A") are keys, not text: remove them from a
// chat line in place (CSI: ESC [ parameters final byte; SS3: ESC O x; else ESC x). Returns the
// new length.
static size_t strip_escapes(char *s, size_t n) {
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != 0x1b) {
            s[out++] = s[i];
            continue;
        }
        if (i + 1 < n && s[i + 1] == '[') {
            i += 2;
            while (i < n && !(s[i] >= 0x40 && s[i] <= 0x7e)) i++;   // up to the final byte
        } else if (i + 1 < n) {
            i += 1 + (s[i + 1] == 'O' && i + 2 < n);
        }
    }
    s[out] = 0;
    return out;
}

// One user message from stdin: a line, or several joined when each but the last ends with a
// backslash (the backslash is dropped, the newline kept). Returns its length, -1 at EOF.
static ssize_t read_message(char **msg, int interactive) {
    char *line = NULL;
    size_t line_cap = 0, len = 0;
    ssize_t got;
    free(*msg);
    *msg = xcalloc(1, 1, "chat message");
    while ((got = getline(&line, &line_cap, stdin)) >= 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        int more = got > 0 && line[got - 1] == '\\';
        got = (ssize_t)strip_escapes(line, (size_t)(got - more));
        *msg = realloc(*msg, add_size(add_size(len, (size_t)got, "chat message"), 2, "message"));
        if (!*msg) die("out of memory reading the chat message");
        memcpy(*msg + len, line, (size_t)got);
        len += (size_t)got;
        if (more) (*msg)[len++] = '\n';
        (*msg)[len] = 0;
        if (!more) break;
        if (interactive) fprintf(stderr, ". ");
    }
    free(line);
    return got < 0 && len == 0 ? -1 : (ssize_t)len;
}

// One turn of the model's chat format around its user message: *head is [close the previous
// reply] [system, first turn only] the user cue, *tail the end of the message and the
// assistant cue (both malloc'd). The turn's text is head, message, tail.
static void chat_turn_parts(int id, int turn, const char *system, char **head, char **tail) {
    const ChatFormat *fmt = &chat_formats[id];
    size_t head_len = 0, tail_len = 0;
    *head = xcalloc(1, 1, "chat turn");
    *tail = xcalloc(1, 1, "chat turn");
    if (turn > 0) append_format(head, &head_len, "%s", fmt->close);
    if (turn == 0 && system) append_format(head, &head_len, fmt->system, system);
    const char *user = fmt->user;   // "cue%send": the message goes where the %s is
    if (id == CHAT_LLAMA2_INST && turn == 0 && system) user = "%s [/INST]";   // inside [INST]
    const char *at = strstr(user, "%s");
    char *cue = xcalloc((size_t)(at - user) + 1, 1, "chat turn");
    memcpy(cue, user, (size_t)(at - user));
    append_format(head, &head_len, "%s", cue);
    append_format(tail, &tail_len, "%s", at + 2);
    free(cue);
}

// The text of one turn in the model's chat format: [close the previous reply] [system, first
// turn only] the user's message and the assistant cue.
static char *chat_turn(int id, int turn, const char *system, const char *message, size_t *len) {
    char *text, *tail;
    chat_turn_parts(id, turn, system, &text, &tail);
    *len = strlen(text);
    append_format(&text, len, "%s", message);
    append_format(&text, len, "%s", tail);
    free(tail);
    return text;
}

// The first question after open_document(): the rest of that first turn, the message and the
// turn's tail.
static char *question_in_document(int id, const char *system, const char *message, size_t *len) {
    char *head, *text = xcalloc(1, 1, "chat turn");
    char *tail;
    chat_turn_parts(id, 0, system, &head, &tail);
    *len = 0;
    append_format(&text, len, "%s", message);
    append_format(&text, len, "%s", tail);
    free(head);
    free(tail);
    return text;
}

// With a state file, chat's document (-f or -i) is prefilled before any question: its opening,
// [system] the user cue, the document and a blank line, tokenized on its own (HF's ids for that
// text) and saved (--save-state), so that one state serves any question; each question then
// goes on inside the same user message. Returns the positions filled.
static size_t open_document(Transformer *t, Tokenizer *tok, Sampler *sp, int id,
                            const char *doc, const Options *o) {
    char *text, *tail;
    chat_turn_parts(id, 0, o->system, &text, &tail);
    size_t len = strlen(text);
    append_format(&text, &len, "%s\n\n", doc);
    int *ids;
    size_t n = tokenizer_encode(tok, text, len, tokenizer_add_bos(tok), &ids);
    if (!ids) die("out of memory tokenizing the document");
    if (o->show_prompt) show_prompt(text, ids, n);
    if (n > cache_capacity(&t->cache, t->config.n_layers))
        die("the document (%zu tokens) does not fit the context; raise -c", n);
    for (size_t i = 0; i < n; i++) sampler_accept(sp, ids[i]);
    double t0 = now_seconds();
    float *logits = prefill(t, ids, n, 0);
    fprintf(stderr, "document: %zu tokens prefilled in %.2f s\n", n, now_seconds() - t0);
    save_text_state(t, o, ids, n, logits, STATE_CHAT_DOCUMENT, id);
    free(text);
    free(tail);
    free(ids);
    return n;
}

// Go on from a loaded state (load_state(); again with --reset-turns, mapped afresh, the
// conversation since forgotten): its tokens are the text so far. Returns the positions filled.
static size_t chat_from_state(Sampler *sp, int id, const char *path, const LoadedState *from) {
    const StateHeader *h = &from->header;
    if (h->kind != STATE_CHAT_DOCUMENT)
        die("%s holds a plain text; -m chat goes on from a document's state, saved by -m chat "
            "-f DOC --save-state FILE", path);
    if (h->chat_template != (uint32_t)id) die("%s was saved for another chat format", path);
    sp->n_seen = 0;
    for (size_t i = 0; i < h->n_tokens; i++) sampler_accept(sp, from->tokens[i]);
    return h->n_tokens;
}

// -m chat: read user messages from stdin until EOF (read_message()); doc (-f or -i, may be
// NULL) opens the first one, a blank line before the first question. The KV cache keeps the
// whole conversation, so each turn only prefills its own new tokens. With a state (saved here
// with the document, or loaded: `from`), the first question goes on from the document's
// opening (open_document()); with --reset-turns every question does, the state mapped afresh.
// With --ids, replies are printed as token ids instead of text.
static void chat(Transformer *t, Tokenizer *tok, Sampler *sp, const char *doc, const Options *o,
                 LoadedState *from) {
    int id = tokenizer_chat_template(tok);
    if (id <= CHAT_NONE || id >= CHAT_COUNT)
        die("this model has no known chat format; use -m generate");
    int interactive = isatty(fileno(stdin));
    char *msg = NULL;
    size_t pos = 0;
    const char *state = o->load_state ? o->load_state : o->save_state;
    int opened = 0;   // the document's opening is in the cache: a question goes on inside it
    if (from) opened = (pos = chat_from_state(sp, id, state, from)) > 0;
    else if (doc && state) opened = (pos = open_document(t, tok, sp, id, doc, o)) > 0;
    LoadedState again;
    for (int turn = 0;; turn++) {
        if (interactive) {
            fprintf(stderr, "> ");
            fflush(stderr);
        }
        ssize_t got = read_message(&msg, interactive);
        if (got < 0) break;
        check_utf8("this chat line", msg, (size_t)got, "the terminal or the file must send UTF-8");
        if (o->reset_turns && turn > 0) {
            load_state(t, state, &again);
            opened = (pos = chat_from_state(sp, id, state, &again)) > 0;
            turn = 0;
        }
        char *message = msg;
        size_t len = 0;
        if (turn == 0 && doc && !opened) {
            message = NULL;
            append_format(&message, &len, "%s\n\n", doc);
            append_format(&message, &len, "%s", msg);
        }
        char *text = opened ? question_in_document(id, o->system, msg, &len)
                            : chat_turn(id, turn, o->system, message, &len);
        if (message != msg) free(message);
        int *ids;
        size_t n = turn == 0 && !opened
                           ? tokenizer_encode(tok, text, len, tokenizer_add_bos(tok), &ids)
                           : tokenizer_encode_continued(tok, text, len, &ids);
        opened = 0;
        if (!ids) die("out of memory tokenizing the chat turn");
        if (o->show_prompt) show_prompt(text, ids, n);
        free(text);
        if (!make_room(t, pos, n))
            die("this turn (%zu tokens) does not fit the context at %zu of %zu; raise -c", n, pos,
                cache_capacity(&t->cache, t->config.n_layers));
        for (size_t i = 0; i < n; i++) sampler_accept(sp, ids[i]);
        double t0 = now_seconds();
        float *logits = prefill(t, ids, n, pos);
        double t1 = now_seconds();
        pos += n;
        free(ids);
        int generated = decode(t, tok, !o->input_is_ids, sp, logits, &pos, o->steps, stdout,
                               o->stop, o->n_stop);
        printf("\n");
        fflush(stdout);
        print_stats(n, t1 - t0, generated, now_seconds() - t1);
        interrupted = 0;   // Ctrl-C ends a reply, not the conversation
    }
    free(msg);
}

// Where write_logits() puts each chunk's rows.
typedef struct {
    OutputFile *out;
    int V;
    const float *last;   // the last row written
} LogitsFile;

static void write_chunk(void *file, float *logits, size_t done, int T) {
    LogitsFile *lf = file;
    (void)done;
    if (fwrite(logits, sizeof(float) * lf->V, T, lf->out->f) != (size_t)T)
        die("%s: write failed: %s", lf->out->path, strerror(errno));
    lf->last = logits + (size_t)(T - 1) * lf->V;
}

// -m logits: run the ids in chunks (after a loaded state, `from`, if any) and write every
// position's logits as raw float32 (n, V); then save the state (--save-state).
static void write_logits(Transformer *t, const int *tokens, size_t n, OutputFile *out,
                         const Options *o, const LoadedState *from) {
    LogitsFile lf = {out, t->config.vocab_size, NULL};
    size_t n_text, pos0 = from ? from->header.n_tokens : 0;
    size_t done = run_chunks(t, tokens, n, pos0, "logits", write_chunk, &lf);
    if (done < n || interrupted)
        die("interrupted after %zu of %zu tokens; %s not written", done, n, out->path);
    int *text = text_so_far(from, tokens, n, &n_text);
    save_text_state(t, o, text, n_text, lf.last, STATE_TEXT, 0);
    free(text);
}

// -m tokenize: the ids of the prompt on one line, as HF's encode(text, add_special_tokens=False).
static void print_ids(const int *ids, size_t n) {
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
}

// -m tokenize --pieces: one line per token, its id, a tab and its stored spelling (SPM keeps
// its "\xE2\x96\x81" for a space) in quotes: printable ASCII as is, \\ \" \n \t, any other
// byte as \xNN.
static void print_pieces(const Tokenizer *tok, const int *ids, size_t n) {
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const unsigned char *p = (const unsigned char *)tokenizer_piece(tok, ids[i], &len);
        printf("%d\t\"", ids[i]);
        for (size_t j = 0; j < len; j++) {
            if (p[j] == '\\' || p[j] == '"') printf("\\%c", p[j]);
            else if (p[j] == '\n') printf("\\n");
            else if (p[j] == '\t') printf("\\t");
            else if (p[j] >= 0x20 && p[j] < 0x7f) putchar(p[j]);
            else printf("\\x%02X", p[j]);
        }
        printf("\"\n");
    }
}

// ----------------------------------------------------------------------------
// Long-context measurement: perplexity, pass-key retrieval, speed at depth

// log p(target | logits) for one row of V logits, as log-softmax with a float64 sum.
static double token_log_prob(const float *logits, int V, int target) {
    float max = logits[0];
    for (int i = 1; i < V; i++) max = max_float(logits[i], max);
    double sum = 0;
    for (int i = 0; i < V; i++) sum += expf(logits[i] - max);
    return (double)(logits[target] - max) - log(sum);
}

// The standard error of a mean from the sum and sum of squares of n values: the sample
// standard deviation over sqrt(n), as llama.cpp's perplexity tool reports it. exp() carries
// it to the perplexity to first order: se(exp(m)) = exp(m) se(m).
static double mean_standard_error(double sum, double sum2, size_t n) {
    if (n < 2) return 0;
    double mean = sum / n;
    double var = (sum2 / n - mean * mean) * n / (n - 1);
    return var > 0 ? sqrt(var / n) : 0;
}

// ---- KL divergence against a base run (-m ppl --kl-base-save FILE, then --kl-base FILE)
//
// The base file holds, for every predicted position of the text, the base run's KL_TOP most
// probable next tokens with their log-probabilities and the log-probability of all the other
// tokens together. A later run over the same tokens scores KL(base || this run) on that
// partition of the vocabulary: the top tokens each an outcome, the rest one outcome. That is
// the full KL when the rest is negligible, and never more than it (the log-sum inequality).
// llama.cpp's --kl-divergence-base keeps every token's log-probability at 16 bits instead;
// this file costs 392 bytes a position, whatever the vocabulary.

#define KL_TOP 32
#define KL_MAGIC "LRKLBASE"

// The file's header, little-endian, 40 bytes.
typedef struct {
    char magic[8];        // KL_MAGIC
    uint32_t version;     // 1
    uint32_t top;         // KL_TOP: tokens kept per position
    uint32_t vocab;       // the base model's vocabulary size
    uint32_t reserved;    // 0
    uint64_t n_tokens;    // tokens of the text: n_tokens - 1 rows follow
    uint64_t text_hash;   // FNV-1a (64-bit) of the token ids as little-endian int32
} KLHeader;

// One predicted position: token ids most probable first (ties: the lower id first, as argmax;
// -1 pads a vocabulary under KL_TOP), their natural-log probabilities, and the log of the
// probability of every other token (-inf when there is none). 392 bytes, no padding.
typedef struct {
    double log_rest;
    double log_prob[KL_TOP];
    int32_t id[KL_TOP];
} KLRow;

static KLHeader kl_header(const int *tokens, size_t n, int vocab) {
    KLHeader h = {.version = 1, .top = KL_TOP, .vocab = (uint32_t)vocab, .n_tokens = n};
    memcpy(h.magic, KL_MAGIC, sizeof(h.magic));
    h.text_hash = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        for (int b = 0; b < 4; b++) {
            h.text_hash ^= ((uint32_t)tokens[i] >> (8 * b)) & 0xff;
            h.text_hash *= 1099511628211ull;
        }
    return h;
}

// log-sum-exp of a row of logits, and the log of the softmax mass outside ids[0..KL_TOP)
// (-inf if none): float64 exp throughout, as a KL of 1e-5 needs the normalizer to ~1e-12.
static double log_softmax_rest(const float *logits, int V, const int32_t *ids, double *lse) {
    float max = logits[0];
    for (int i = 1; i < V; i++) max = max_float(logits[i], max);
    double total = 0;
    double top = 0;
    for (int i = 0; i < V; i++) total += exp((double)logits[i] - max);
    for (int j = 0; j < KL_TOP && ids[j] >= 0; j++) top += exp((double)logits[ids[j]] - max);
    *lse = max + log(total);
    return total - top > 0 ? log(total - top) + max - *lse : -INFINITY;
}

// The base's view of one position from its logits.
static void kl_row(KLRow *row, const float *logits, int V) {
    int n = 0;
    for (int j = 0; j < KL_TOP; j++) row->id[j] = -1;
    for (int i = 0; i < V; i++) {   // insertion into the sorted top list; equal logits stay behind
        if (n == KL_TOP && logits[i] <= logits[row->id[KL_TOP - 1]]) continue;
        int j = n < KL_TOP ? n++ : KL_TOP - 1;
        for (; j > 0 && logits[i] > logits[row->id[j - 1]]; j--) row->id[j] = row->id[j - 1];
        row->id[j] = i;
    }
    double lse;
    row->log_rest = log_softmax_rest(logits, V, row->id, &lse);
    for (int j = 0; j < KL_TOP; j++)
        row->log_prob[j] = row->id[j] >= 0 ? (double)logits[row->id[j]] - lse : -INFINITY;
}

// KL(base || this run) at one position, on the base's partition: its top tokens and the rest.
static double kl_position(const KLRow *base, const float *logits, int V) {
    double lse;
    double log_rest = log_softmax_rest(logits, V, base->id, &lse);
    double kl = 0;
    for (int j = 0; j < KL_TOP && base->id[j] >= 0; j++)
        kl += exp(base->log_prob[j]) * (base->log_prob[j] - ((double)logits[base->id[j]] - lse));
    if (base->log_rest > -INFINITY) kl += exp(base->log_rest) * (base->log_rest - log_rest);
    return kl;
}

// Open a base file and check it belongs to this text and vocabulary.
static FILE *open_kl_base(const char *path, const KLHeader *want) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: cannot open: %s", path, strerror(errno));
    KLHeader h;
    struct stat st;
    if (fread(&h, sizeof(h), 1, f) != 1 || memcmp(h.magic, KL_MAGIC, sizeof(h.magic)) ||
        h.version != 1 || h.top != KL_TOP)
        die("%s: not a KL base file (-m ppl --kl-base-save writes them)", path);
    if (h.vocab != want->vocab)
        die("%s: was written with a vocabulary of %u tokens; this model has %u", path, h.vocab,
            want->vocab);
    if (h.n_tokens != want->n_tokens)
        die("%s: holds a text of %llu tokens; this one has %llu (the same text and --ppl-tokens?)",
            path, (unsigned long long)h.n_tokens, (unsigned long long)want->n_tokens);
    if (h.text_hash != want->text_hash)
        die("%s: was written for another text (its token ids differ)", path);
    uint64_t size = sizeof(h) + (h.n_tokens - 1) * sizeof(KLRow);
    if (fstat(fileno(f), &st) != 0 || (uint64_t)st.st_size != size)
        die("%s: is %lld bytes; a base of %llu tokens is %llu", path, (long long)st.st_size,
            (unsigned long long)h.n_tokens, (unsigned long long)size);
    return f;
}

// A KL pass beside the perplexity: rows to save, or rows of a base to compare with.
typedef struct {
    OutputFile save;       // --kl-base-save (f NULL when not saving)
    FILE *base;            // --kl-base
    const char *base_path;
    KLRow *rows;           // (max_T) one chunk's rows
    double *kl;            // (max_T) one chunk's divergences
    double sum, sum2, max;
    size_t same_top, n;    // positions whose most probable token is the base's; positions
} KLRun;

static void save_kl_rows(KLRun *k, const float *logits, int V, int T) {
    PARALLEL_FOR
    for (int r = 0; r < T; r++) kl_row(&k->rows[r], logits + (size_t)r * V, V);
    if (fwrite(k->rows, sizeof(KLRow), T, k->save.f) != (size_t)T)
        die("%s: write failed: %s", k->save.path, strerror(errno));
}

static void compare_kl_rows(KLRun *k, const float *logits, int V, int T) {
    if (fread(k->rows, sizeof(KLRow), T, k->base) != (size_t)T)
        die("%s: read failed", k->base_path);
    for (int r = 0; r < T; r++)
        for (int j = 0; j < KL_TOP; j++)
            if (k->rows[r].id[j] >= V || (j == 0 && k->rows[r].id[j] < 0))
                die("%s: position %zu holds token id %d, outside the vocabulary", k->base_path,
                    k->n + r + 1, k->rows[r].id[j]);
    PARALLEL_FOR
    for (int r = 0; r < T; r++) k->kl[r] = kl_position(&k->rows[r], logits + (size_t)r * V, V);
    for (int r = 0; r < T; r++) {
        k->sum += k->kl[r];
        k->sum2 += k->kl[r] * k->kl[r];
        k->max = fmax(k->max, k->kl[r]);
        k->same_top += argmax(logits + (size_t)r * V, V) == k->rows[r].id[0];
    }
    k->n += (size_t)T;
}

// Mean KL divergence and top-1 agreement, each ± its standard error (as llama-perplexity's
// KL-divergence mode: the sample sd over sqrt(n); a proportion's sqrt(p (1 - p) / (n - 1))).
static void print_kl(const KLRun *k) {
    double mean = k->sum / k->n;
    double same = (double)k->same_top / k->n;
    double same_se = k->n > 1 ? sqrt(same * (1 - same) / (k->n - 1)) : 0;
    printf("KL divergence from %s: mean %.6g ± %.2g (max %.6g), top-1 agreement %.2f ± %.2f %% "
           "over %zu predicted tokens\n",
           k->base_path, mean, mean_standard_error(k->sum, k->sum2, k->n), k->max, 100 * same,
           100 * same_se, k->n);
}

// The running sums of a perplexity pass: row r of a chunk that starts at token `done`
// predicts token done + r + 1 (the text's last token, fed only to be saved, predicts none).
typedef struct {
    const int *tokens;
    int V;
    size_t n, bucket;      // the text's tokens; predicted positions per CSV row
    size_t n_predict;      // n - 1, or n after a loaded state (its logits predict the first)
    FILE *csv;
    double *nll;           // (max_T) one chunk's negative log-likelihoods
    KLRun *kl;             // --kl-base-save / --kl-base, or NULL
    double total, total2;  // sums of the NLLs and of their squares, for the standard error
    double bucket_sum;
    size_t bucket_n, predicted;
    const float *last;     // the logits after the last token fed
} PerplexityRun;

// One predicted position's NLL into the sums, and a CSV row when a bucket fills.
static void add_nll(PerplexityRun *p, double nll) {
    p->total += nll;
    p->total2 += nll * nll;
    p->bucket_sum += nll;
    p->bucket_n++;
    p->predicted++;
    if (p->csv && (p->predicted % p->bucket == 0 || p->predicted == p->n_predict)) {
        double mean = p->bucket_sum / p->bucket_n;
        fprintf(p->csv, "%zu,%zu,%zu,%.6f,%.4f\n", p->predicted - p->bucket_n + 1, p->predicted,
                p->bucket_n, mean, exp(mean));
        p->bucket_sum = 0;
        p->bucket_n = 0;
    }
}

static void score_chunk(void *run, float *logits, size_t done, int T) {
    PerplexityRun *p = run;
    int rows = (int)min_size((size_t)T, p->n - 1 - done);   // the rows with a next token
    p->last = logits + (size_t)(T - 1) * p->V;
    PARALLEL_FOR
    for (int r = 0; r < rows; r++)
        p->nll[r] = -token_log_prob(logits + (size_t)r * p->V, p->V, p->tokens[done + r + 1]);
    if (p->kl && p->kl->save.f) save_kl_rows(p->kl, logits, p->V, rows);
    if (p->kl && p->kl->base) compare_kl_rows(p->kl, logits, p->V, rows);
    for (int r = 0; r < rows; r++) add_nll(p, p->nll[r]);
}

// Open what --kl-base-save and --kl-base name, if anything; NULL when neither is given.
static KLRun *start_kl(const Options *o, const int *tokens, size_t n, int V, int max_T) {
    if (!o->kl_base_save && !o->kl_base) return NULL;
    KLRun *k = xcalloc(1, sizeof(KLRun), "KL run");
    KLHeader h = kl_header(tokens, n, V);
    k->rows = xcalloc(max_T, sizeof(KLRow), "KL rows");
    k->kl = xcalloc(max_T, sizeof(double), "KL rows");
    k->base_path = o->kl_base;
    if (o->kl_base) k->base = open_kl_base(o->kl_base, &h);
    if (o->kl_base_save) {
        const char *inputs[] = {o->model_path, o->input_path, o->kl_base};
        k->save = open_output(o->kl_base_save, inputs, 3);
        if (fwrite(&h, sizeof(h), 1, k->save.f) != 1)
            die("%s: write failed: %s", o->kl_base_save, strerror(errno));
    }
    return k;
}

// After the perplexity is printed: the KL line, and the saved base moved into place.
static void finish_kl(KLRun *k) {
    if (!k) return;
    if (k->base) print_kl(k);
    if (k->base) fclose(k->base);
    if (k->save.f) close_output(&k->save);
    free(k->rows);
    free(k->kl);
    free(k);
}

// -m ppl: perplexity exp(mean NLL) of a text, every token predicted from all before it that
// the cache settings keep, in one pass of chunked prefill. Memory is the cache plus one
// chunk's logits, whatever the text's length. With a csv file, one row per `bucket` predicted
// positions: first,last,tokens,mean_nll,ppl. With --kl-base-save / --kl-base, the base file
// of each position is written / compared with alongside.
static void perplexity(Transformer *t, const int *tokens, size_t n, const Options *o, FILE *csv,
                       const LoadedState *from) {
    PerplexityRun p = {.tokens = tokens, .V = t->config.vocab_size, .n = n,
                       .bucket = (size_t)o->ppl_bucket, .csv = csv, .n_predict = n - !from};
    p.nll = xcalloc(t->state.max_T, sizeof(double), "nll row");
    p.kl = start_kl(o, tokens, n, p.V, t->state.max_T);
    if (csv) fprintf(csv, "first,last,tokens,mean_nll,ppl\n");
    double start = now_seconds();
    size_t pos0 = from ? from->header.n_tokens : 0;
    if (from) add_nll(&p, -token_log_prob(from->logits, p.V, tokens[0]));
    size_t fed = o->save_state ? n : n - 1;   // the last token only for the state's sake
    run_chunks(t, tokens, fed, pos0, "ppl", score_chunk, &p);
    free(p.nll);
    if (o->save_state && !interrupted) {
        size_t n_text;
        int *text = text_so_far(from, tokens, n, &n_text);
        save_text_state(t, o, text, n_text, p.last, STATE_TEXT, 0);
        free(text);
    }
    double mean = p.total / p.predicted;
    if (interrupted && p.predicted == 0) die("interrupted before the first chunk was scored");
    if (interrupted)
        die("interrupted after %zu tokens (perplexity so far %.4f)", p.predicted, exp(mean));
    double se = mean_standard_error(p.total, p.total2, p.predicted);
    printf("perplexity %.4f ± %.5f over %zu predicted tokens (mean NLL %.6f ± %.6f), "
           "%.1f tok/s, peak RSS %.0f MB\n",
           exp(mean), exp(mean) * se, p.predicted, mean, se,
           p.predicted / (now_seconds() - start), peak_rss_mb());
    finish_kl(p.kl);
}

// The pass-key prompt (Mohtashami & Jaggi 2023, "Landmark Attention"): a key hidden at
// fraction `depth` of filler text of about `length` tokens, then the question.
static const char *PASSKEY_INTRO =
        "There is an important pass key hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the pass key.\n";
static const char *PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here "
                                    "we go. There and back again. ";
static const char *PASSKEY_NEEDLE = "The pass key is %s. Remember it. %s is the pass key. ";
static const char *PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is";

static size_t count_tokens(Tokenizer *tok, const char *text) {
    int *ids;
    size_t n = tokenizer_encode(tok, text, strlen(text), 0, &ids);
    free(ids);
    return n;
}

static int *passkey_prompt(Tokenizer *tok, size_t length, float depth, const char *key, size_t *n) {
    char needle[128];
    snprintf(needle, sizeof(needle), PASSKEY_NEEDLE, key, key);
    size_t fixed = count_tokens(tok, PASSKEY_INTRO) + count_tokens(tok, needle) +
            count_tokens(tok, PASSKEY_QUESTION) + 1;
    size_t unit = count_tokens(tok, PASSKEY_FILLER);
    if (unit == 0) die("the tokenizer turns the pass-key filler text into no tokens");
    size_t units = length > fixed ? (length - fixed) / unit : 0;
    size_t before = (size_t)(units * depth + 0.5f), filler_len = strlen(PASSKEY_FILLER);
    size_t len =
            strlen(PASSKEY_INTRO) + strlen(needle) + strlen(PASSKEY_QUESTION) + units * filler_len;
    char *text = xcalloc(add_size(len, 1, "pass-key prompt"), 1, "pass-key prompt"), *p = text;
    p += sprintf(p, "%s", PASSKEY_INTRO);
    for (size_t u = 0; u <= units; u++) {
        if (u == before) p += sprintf(p, "%s", needle);
        if (u < units) p += sprintf(p, "%s", PASSKEY_FILLER);
    }
    sprintf(p, "%s", PASSKEY_QUESTION);
    int *ids;
    *n = tokenizer_encode(tok, text, strlen(text), tokenizer_add_bos(tok), &ids);
    free(text);
    return ids;
}

// -m passkey: for each length and depth, `trials` random 5-digit keys; a trial passes when
// the greedy answer (up to 8 tokens) contains the key. Prints a markdown table of accuracy.
static void passkey(Transformer *t, Tokenizer *tok, const long *lengths, int n_lengths,
                    const float *depths, int n_depths, int trials, uint64_t seed) {
    Sampler greedy = {.temperature = 0, .top_p = 1, .repeat_penalty = 1};
    build_sampler(&greedy, t->config.vocab_size, seed);
    int *passed = xcalloc((size_t)n_lengths * n_depths, sizeof(int), "pass-key table");
    for (int li = 0; li < n_lengths; li++)
        for (int di = 0; di < n_depths; di++)
            for (int trial = 0; trial < trials && !interrupted; trial++) {
                char key[16], *answer;
                size_t n, answer_len, pos;
                snprintf(key, sizeof(key), "%05u", (unsigned)(random_f32(&greedy.rng) * 100000));
                int *prompt = passkey_prompt(tok, (size_t)lengths[li], depths[di], key, &n);
                if (n + 8 > cache_capacity(&t->cache, t->config.n_layers))
                    die("a pass-key prompt of %zu tokens does not fit in %zu positions", n,
                        cache_capacity(&t->cache, t->config.n_layers));
                double t0 = now_seconds();
                float *logits = prefill(t, prompt, n, 0);
                FILE *out = open_memstream(&answer, &answer_len);   // the answer, as text
                if (!out) die("out of memory");
                pos = n;
                decode(t, tok, 1, &greedy, logits, &pos, 8, out, NULL, 0);
                fclose(out);
                int ok = strstr(answer, key) != NULL;
                for (char *c = answer; *c; c++) *c = *c == '\n' ? ' ' : *c;   // one line per trial
                passed[li * n_depths + di] += ok;
                fprintf(stderr, "passkey: %zu tokens, depth %.2f, key %s: %s -> \"%s\" (%.1f s)\n",
                        n, depths[di], key, ok ? "found" : "missed", answer, now_seconds() - t0);
                free(answer);
                free(prompt);
            }
    printf("| tokens |");
    for (int di = 0; di < n_depths; di++) printf(" depth %.2f |", depths[di]);
    printf(" all |\n|---|");
    for (int di = 0; di <= n_depths; di++) printf("---|");
    printf("\n");
    for (int li = 0; li < n_lengths; li++) {
        int sum = 0;
        printf("| %ld |", lengths[li]);
        for (int di = 0; di < n_depths; di++) {
            sum += passed[li * n_depths + di];
            printf(" %d/%d |", passed[li * n_depths + di], trials);
        }
        printf(" %.0f%% |\n", 100.0 * sum / (trials * n_depths));
    }
    free(passed);
    free_sampler(&greedy);
}

static long max_of(const long *values, int n) {
    long m = 0;
    for (int i = 0; i < n; i++) m = values[i] > m ? values[i] : m;
    return m;
}

// One field of bench's output, as text: a JSON key and CSV column, its value, and whether the
// value is a string (quoted) or a number or boolean (bare).
typedef struct {
    const char *name;
    char value[256];
    int text;
} Field;

static void set_field(Field *f, const char *name, int text, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    f->name = name;
    f->text = text;
    vsnprintf(f->value, sizeof(f->value), fmt, ap);
    va_end(ap);
}

// The machine's CPU, from /proc/cpuinfo's first "model name" (Linux on x86); else "unknown".
static void cpu_model_name(char *out, size_t size) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    snprintf(out, size, "unknown");
    while (f && fgets(line, sizeof(line), f)) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "model name", 10) || !colon) continue;
        colon += strspn(colon + 1, " \t") + 1;
        colon[strcspn(colon, "\n")] = 0;
        snprintf(out, size, "%s", colon);
        break;
    }
    if (f) fclose(f);
}

// What every bench row shares: the model, the machine, the cache's shape, RoPE, the chunk.
static int bench_config(const Transformer *t, const Options *o, Field *f) {
    const LayerConfig *lc = &t->config.layers[0];
    char cpu[256];
    cpu_model_name(cpu, sizeof(cpu));
    size_t context = cache_capacity(&t->cache, t->config.n_layers);
    int n = 0;
    set_field(&f[n++], "model", 1, "%s", o->model_path);
    set_field(&f[n++], "weights", 1, "%s", dtype_name(t->weights.layers[0].wq.dtype));
    set_field(&f[n++], "cpu", 1, "%s", cpu);
    set_field(&f[n++], "context", 0, "%lld", context == SIZE_MAX ? -1 : (long long)context);
    set_field(&f[n++], "chunk", 0, "%d", t->state.max_T);
    set_field(&f[n++], "window", 0, "%ld", o->attn.window);
    set_field(&f[n++], "sinks", 0, "%ld", o->attn.n_sink);
    set_field(&f[n++], "lminf", 0, "%s", o->attn.lminf ? "true" : "false");
    set_field(&f[n++], "lminf_limit", 0, "%ld", o->attn.limit);
    const ContextMemory *m = t->memory;
    set_field(&f[n++], "memory", 1, "%s", m ? o->memory_score : "none");
    set_field(&f[n++], "memory_block", 0, "%d", m ? m->block : 0);
    set_field(&f[n++], "memory_blocks", 0, "%d", m ? m->top_k : 0);
    set_field(&f[n++], "memory_distance", 0, "%zu", m ? m->distance : 0);
    const char *rope = lc->rope_type == ROPE_DEFAULT ? "none" : rope_type_name(lc->rope_type);
    set_field(&f[n++], "rope_scaling", 1, "%s", rope);
    set_field(&f[n++], "rope_factor", 0, "%g", lc->rope_type == ROPE_DEFAULT ? 1 : lc->factor);
    set_field(&f[n++], "rope_theta", 0, "%g", lc->rope_theta);
    set_field(&f[n++], "reference", 0, "%s", t->reference ? "true" : "false");
    set_field(&f[n++], "warmup", 0, "%d", 1);
    return n;
}

static void print_text(const char *s, int json) {
    int quote = json || strpbrk(s, ",\"\r\n") != NULL;
    if (quote) putchar('"');
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (json && (*c == '"' || *c == '\\')) printf("\\%c", *c);
        else if (json && *c < 0x20) printf("\\u%04x", *c);
        else if (!json && *c == '"') printf("\"\"");
        else putchar(*c);
    }
    if (quote) putchar('"');
}

// Fields as `"name": value, ...` (JSON) or `value,...` (CSV), or the CSV header's names.
static void print_fields(const Field *f, int n, int json, int names) {
    for (int i = 0; i < n; i++) {
        if (i) printf(json ? ", " : ",");
        if (json) printf("\"%s\": ", f[i].name);
        if (names) printf("%s", f[i].name);
        else if (f[i].text) print_text(f[i].value, json);
        else printf("%s", f[i].value);
    }
}

// One test, timed `reps` times after one warm-up run that is not counted (as llama-bench's:
// ppN runs whole, tgN one token): the first call pays for page faults and waking threads.
// tokens/s as mean and sample sd.
static void bench_test(Transformer *t, const int *ids, size_t n, size_t depth, int tg, int reps,
                       double *mean, double *sd) {
    double sum = 0;
    double sum2 = 0;
    for (int r = -1; r < reps; r++) {
        double t0 = now_seconds();
        if (!tg) prefill(t, ids, n, depth);
        for (size_t i = 0; tg && i < (r < 0 ? 1 : n); i++) {
            if (interrupted) die("interrupted");
            forward(t, &ids[i], 1, depth + i);
        }
        double rate = n / (now_seconds() - t0);
        if (r < 0) continue;
        sum += rate;
        sum2 += rate * rate;
    }
    *mean = sum / reps;
    *sd = reps > 1 ? sqrt(fmax(0, (sum2 - reps * (*mean) * (*mean)) / (reps - 1))) : 0;
}

// --bench-state: time to first token after an n-token document, prefilled and loaded.
typedef struct {
    size_t n;
    KVType kv;
    double prefilled_s, loaded_s;   // until the first reply token has run through the model
    double disk_mb;                 // the state file's disk use
} StateTiming;

// What one bench row prints: its own fields after the shared ones.
typedef struct {
    const Options *o;
    Field config[24];
    int n_config, first;
    StateTiming state[MAX_LIST * KV_COUNT];
    int n_state;
} BenchOut;

static void bench_row(BenchOut *b, const Transformer *t, int tg, size_t n, size_t depth,
                      double mean, double sd) {
    Field f[8];
    int k = 0;
    const char *kv = kv_type_names[t->cache.type];
    set_field(&f[k++], "test", 1, "%s%zu", tg ? "tg" : "pp", n);
    set_field(&f[k++], "depth", 0, "%zu", depth);
    set_field(&f[k++], "threads", 0, "%d", n_threads());
    set_field(&f[k++], "kv_type", 1, "%s", kv);
    set_field(&f[k++], "kv_bytes_per_token", 0, "%zu", kv_bytes_per_token(t));
    set_field(&f[k++], "reps", 0, "%d", b->o->reps);
    set_field(&f[k++], "tokens_per_s", 0, "%.2f", mean);
    set_field(&f[k++], "sd", 0, "%.2f", sd);
    if (b->o->json) printf("%s\n  {", b->first ? "" : ",");
    if (b->o->csv) print_fields(b->config, b->n_config, 0, 0);
    if (b->o->csv) printf(",");
    if (b->o->json || b->o->csv) print_fields(f, k, b->o->json, 0);
    if (b->o->json) printf("}");
    if (b->o->csv) printf("\n");
    if (!b->o->json && !b->o->csv)
        printf("| %s | %zu | %d | %s | %.2f ± %.2f |\n", f[0].value, depth, n_threads(), kv,
               mean, sd);
    fflush(stdout);
    b->first = 0;
}

static void bench_header(BenchOut *b) {
    if (b->o->json) {
        printf("{\"config\": {");
        print_fields(b->config, b->n_config, 1, 0);
        printf("},\n\"results\": [");
    } else if (b->o->csv) {
        print_fields(b->config, b->n_config, 0, 1);
        printf(",test,depth,threads,kv_type,kv_bytes_per_token,reps,tokens_per_s,sd\n");
    } else {
        printf("| test | depth | threads | kv | tokens/s |\n|---|---:|---:|---|---:|\n");
    }
}

// The first token of a reply after a document whose last logits are `logits`: picked
// greedily and run through the model at pos.
static void first_token(Transformer *t, const float *logits, size_t pos) {
    int next = argmax(logits, t->config.vocab_size);
    forward(t, &next, 1, pos);
}

// A temporary state file's name in $TMPDIR (or /tmp), created empty.
static void temp_state_path(char *path, size_t size) {
    if (snprintf(path, size, "%s/longrun-bench-XXXXXX", temp_dir()) >= (int)size)
        die("TMPDIR is too long a path");
    int fd = mkstemp(path);
    if (fd < 0) die("%s: cannot create a temporary state file: %s", path, strerror(errno));
    close(fd);
}

// --bench-state: an n-token document prefilled, then the first reply token; the document saved
// (not timed), then loaded from its state and the same first token. The cache stays mapped.
static StateTiming bench_state(Transformer *t, const Options *o, const int *doc, size_t n) {
    StateTiming st = {.n = n, .kv = t->cache.type};
    char path[4096];
    temp_state_path(path, sizeof(path));
    double t0 = now_seconds();
    float *logits = prefill(t, doc, n, 0);
    double t1 = now_seconds();
    StateText text = {doc, n, logits, STATE_TEXT, 0};
    save_state(t, path, &text, &o->model_path, 1);
    double t2 = now_seconds();
    first_token(t, logits, n);
    st.prefilled_s = t1 - t0 + now_seconds() - t2;
    LoadedState from;
    double t3 = now_seconds();
    load_state(t, path, &from);
    first_token(t, from.logits, n);
    st.loaded_s = now_seconds() - t3;
    struct stat sb;
    st.disk_mb = stat(path, &sb) == 0 ? (double)sb.st_blocks * 512 / 1e6 : 0;
    unlink(path);
    return st;
}

// The --bench-state results: a table, or the JSON "state" list.
static void print_state_timings(const BenchOut *b) {
    if (!b->n_state) return;
    if (b->o->json) printf(", \"state\": [");
    else printf("\n| document | kv | first token, prefilled | loaded | speed-up | state on disk |"
                "\n|---:|---|---:|---:|---:|---:|\n");
    for (int i = 0; i < b->n_state; i++) {
        const StateTiming *s = &b->state[i];
        const char *kv = kv_type_names[s->kv];
        double speedup = s->prefilled_s / s->loaded_s;
        if (b->o->json)
            printf("%s\n  {\"tokens\": %zu, \"kv_type\": \"%s\", \"prefilled_s\": %.4f, "
                   "\"loaded_s\": %.5f, \"speedup\": %.1f, \"state_disk_mb\": %.1f}",
                   i ? "," : "", s->n, kv, s->prefilled_s, s->loaded_s, speedup, s->disk_mb);
        else
            printf("| %zu | %s | %.3f s | %.4f s | %.0fx | %.1f MB |\n", s->n, kv,
                   s->prefilled_s, s->loaded_s, speedup, s->disk_mb);
    }
    if (b->o->json) printf("\n]");
}

// JSON: the peak RSS closes the object. Table: the configuration, then each swept cache
// type's bytes per token.
static void bench_footer(const BenchOut *b, const Transformer *t, const int *kv_types, int n_kv) {
    if (b->o->json) printf("\n]");
    print_state_timings(b);
    if (b->o->json) printf(", \"peak_rss_mb\": %.0f}\n", peak_rss_mb());
    if (b->o->json || b->o->csv) return;
    printf("\n");
    for (int i = 0; i < b->n_config; i++)
        printf("%s%s %s", i ? ", " : "", b->config[i].name, b->config[i].value);
    printf("\nKV cache");
    for (int i = 0; i < n_kv; i++) {
        size_t row = kv_row_bytes((KVType)kv_types[i], t->cache.kv_dim, t->cache.n_kv_heads);
        printf("%s %s %zu bytes/token", i ? "," : "", kv_type_names[kv_types[i]],
               (size_t)2 * t->config.n_layers * row);
    }
    printf("; peak RSS %.0f MB\n", peak_rss_mb());
}

// Every --threads value's tests at one depth.
static void bench_depth(Transformer *t, BenchOut *b, const int *ids, size_t depth) {
    const Options *o = b->o;
    int threads = n_threads();
    for (int ti = 0; ti < (o->n_threads_list ? o->n_threads_list : 1); ti++) {
        use_threads(t, o->n_threads_list ? (int)o->threads_list[ti] : threads);
        for (int tg = 0; tg < 2; tg++)
            for (int i = 0; i < (tg ? o->n_bench_tg : o->n_bench_pp); i++) {
                size_t n = (size_t)(tg ? o->bench_tg[i] : o->bench_pp[i]);
                double mean;
                double sd;
                bench_test(t, ids, n, depth, tg, o->reps, &mean, &sd);
                bench_row(b, t, tg, n, depth, mean, sd);
            }
    }
}

// -m bench, after llama-bench: prompt processing (ppN: N tokens in chunks) and text generation
// (tgN: N tokens one at a time), each after `depth` tokens already in the cache, `reps` times
// after a warm-up; random token ids. A sweep: every --kv-type (the cache rebuilt for each),
// every depth, every --threads value. A markdown table of tokens/s (mean ± sd), or JSON or CSV
// rows that carry the whole configuration.
static void bench(Transformer *t, const Options *o) {
    int default_kv = o->attn.kv_type;
    const int *kv_types = o->n_kv_types ? o->kv_types : &default_kv;
    int n_kv = o->n_kv_types ? o->n_kv_types : 1;
    size_t max_len = (size_t)max_of(o->bench_tg, o->n_bench_tg);
    max_len = max_size(max_len, (size_t)max_of(o->bench_pp, o->n_bench_pp));
    int *ids = xcalloc(max_len + 1, sizeof(int), "bench tokens");
    uint64_t rng = 42;
    BenchOut b = {.o = o, .first = 1};
    b.n_config = bench_config(t, o, b.config);
    bench_header(&b);
    for (int ki = 0; ki < n_kv; ki++) {
        kv_retype(&t->cache, (KVType)kv_types[ki]);
        for (int di = 0; di < o->n_bench_depth; di++) {
            size_t depth = (size_t)o->bench_depth[di];
            for (size_t i = 0; i < max_len + 1; i++)
                ids[i] = (int)(random_f32(&rng) * t->config.vocab_size);
            int *fill = xcalloc(depth + 1, sizeof(int), "bench depth");
            for (size_t i = 0; i < depth; i++)
                fill[i] = (int)(random_f32(&rng) * t->config.vocab_size);
            if (depth) prefill(t, fill, depth, 0);   // stays in the cache for every test below
            free(fill);
            bench_depth(t, &b, ids, depth);
        }
        for (int si = 0; si < o->n_bench_state; si++) {
            size_t n = (size_t)o->bench_state[si];
            int *doc = xcalloc(n, sizeof(int), "bench document");
            for (size_t i = 0; i < n; i++) doc[i] = (int)(random_f32(&rng) * t->config.vocab_size);
            b.state[b.n_state++] = bench_state(t, o, doc, n);
            free(doc);
        }
    }
    bench_footer(&b, t, kv_types, n_kv);
    free(ids);
}

// ----------------------------------------------------------------------------
// Command line

// The second half of --help: attention and the KV cache, the measuring modes, RoPE.
static void usage_model_options(FILE *out) {
    fprintf(out,
            "Attention and the KV cache (see README, \"Windows and sinks\"):\n"
            "  --window W       every layer sees its last W keys (itself included); no context "
            "limit\n"
            "  --sinks S        with --window: keep the first S tokens too (StreamingLLM)  "
            "(default 0)\n"
            "  --lminf          LM-Infinite: --sinks global tokens (default 10) + a --window "
            "local\n"
            "                   branch (default: the trained context), far keys at a capped "
            "distance\n"
            "  --lminf-limit L  LM-Infinite's distance cap                       (default: the "
            "window)\n"
            "  --kv-type T      f32 | f16 | q8: how keys and values are stored   (default f32;\n"
            "                   bench: T,.. a sweep)\n"
            "  --memory         with --window: keep every key; each chunk also attends to the\n"
            "                   K blocks of B positions that score best for it (InfLLM, Quest)\n"
            "  --memory-block B positions per memory block                      (default 128)\n"
            "  --memory-blocks K  blocks a chunk retrieves per kv head           (default 16)\n"
            "  --memory-distance D  retrieved blocks at min(true distance, D)\n"
            "                   (default: a quarter of the trained context, at least W + B - 1)\n"
            "  --memory-budget MB  memory rows kept in RAM; past it, in files in $TMPDIR\n"
            "                   (default 4096)\n"
            "  --memory-score S quest: blocks scored by their keys' bounds; infllm: by R\n"
            "                   representative keys (plain attention loop)   (default quest)\n"
            "  --memory-repr R  infllm: representative tokens per block        (default 4)\n"
            "ppl: perplexity of the text of -f or -i\n"
            "  --ppl-csv FILE   write first,last,tokens,mean_nll,ppl per bucket of predicted "
            "tokens\n"
            "  --ppl-bucket N   predicted tokens per CSV row                     (default 1024)\n"
            "  --ppl-tokens N   evaluate only the first N tokens of the text     (default: all)\n"
            "  --kl-base-save F write each position's top-32 tokens and log-probs to F\n"
            "  --kl-base F      report the KL divergence from the run that saved F, and top-1 "
            "agreement\n"
            "passkey: find a random key hidden in filler text\n"
            "  --passkey-len L,..    prompt lengths in tokens                    (default "
            "1024,2048)\n"
            "  --passkey-depth D,..  where the key sits, 0 = start .. 1 = end    (default "
            "0,0.25,0.5,0.75,1)\n"
            "  --passkey-trials N    random keys per length and depth            (default 3)\n"
            "bench: tokens/s of prompt processing and generation at a depth\n"
            "  --bench-pp N,..  prompt lengths                                   (default 512)\n"
            "  --bench-tg N,..  tokens generated one by one                      (default 128)\n"
            "  --bench-depth N,..  tokens already in the cache before each test  (default 0)\n"
            "  --bench-state N,..  time to first token after an N-token document: prefilled, and\n"
            "                   loaded from a state file (saved to $TMPDIR, then removed)\n"
            "  -r N             repetitions, reported as mean ± sd               (default 3)\n"
            "  --json           JSON instead of a markdown table, with the configuration\n"
            "  --csv            CSV instead: a header, then one row per test and setting\n"
            "RoPE (override the file's setting; see README, \"Longer contexts\"):\n"
            "  --rope-scaling S none | linear | dynamic | yarn | llama3         (default: the "
            "file's)\n"
            "  --rope-theta B   RoPE base                                      (default: the "
            "file's)\n"
            "  --rope-factor S  context extension factor; the default context becomes S x L0\n"
            "                   (default: the file's; with --rope-scaling, -c / L0)\n"
            "  --rope-orig-ctx N  original context L0 of the scaling            (default: trained "
            "context)\n"
            "  --yarn-beta-fast B  YaRN: fast end of the correction range     (default 32)\n"
            "  --yarn-beta-slow B  YaRN: slow end of the correction range     (default 1)\n"
            "  --yarn-attn-factor A  YaRN attention factor                     (default 0.1 ln(s) "
            "+ 1)\n"
            "  -h, --help       this text\n"
            "  --version        print the version and exit\n");
}

static void usage_state_options(FILE *out) {
    fprintf(out,
            "State files: read a document once, ask many times (see README, \"State files\"):\n"
            "  --save-state F   generate, logits, ppl: after the prompt; chat: after the -f/-i "
            "document,\n"
            "                   write what the cache (and a --memory) holds to F\n"
            "  --load-state F   go on from F: the prompt (generate: may be none) continues its "
            "text;\n"
            "                   chat: questions about its document. F's settings must be "
            "repeated\n"
            "  --reset-turns    chat with a state: every question starts again from the "
            "document\n");
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: run MODEL [options]\n"
            "  -m MODE          generate | chat | tokenize | logits | ppl | passkey | bench  "
            "(default generate)\n"
            "  -i TEXT          the prompt (chat: a document the questions are about)\n"
            "  -f FILE          read the prompt from FILE, bytes verbatim; - for stdin\n"
            "                   (chat: a document the questions are about)\n"
            "  --ids            the prompt is token ids (\"1 2 3\"); generate and chat print ids\n"
            "  --bos            tokenize: prepend the model's BOS token\n"
            "  --pieces         tokenize: one line per token: id, tab, its text (bytes escaped)\n"
            "  --show-prompt    generate, chat: print what the model reads (text, ids) on stderr\n"
            "  -n N             tokens to generate; -1 = until end of text      (default 256)\n"
            "  -t T             temperature; 0 = greedy                         (default 0.8)\n"
            "  -k K             top-k: sample among the K most likely; 0 = off (default 40)\n"
            "  -p P             top-p (nucleus) threshold in (0, 1]; 1 = off   (default 0.95)\n"
            "  --min-p P        drop tokens below P x the most likely; 0 = off (default 0.05)\n"
            "  --repeat-penalty R  penalise recent tokens' logits; 1 = off     (default 1.0)\n"
            "  --repeat-last-n N   how many recent tokens it looks at          (default 64)\n"
            "  -s SEED          random seed; same seed, same output            (default: time)\n"
            "  --system TEXT    chat: the system prompt                        (default: none)\n"
            "  --no-echo        generate: print only the continuation, not the prompt first\n"
            "  --stop S         end a reply when its text ends with S (not printed); repeatable\n"
            "  -c N             context: KV cache slots to allocate            (default: what the "
            "run needs,\n"
            "                   at most the model's trained context; chat: 4096 at most)\n"
            "  --chunk N        tokens per forward pass in prefill             (default 256; "
            "logits: up to 65536)\n"
            "  --threads N      worker threads (bench: N,.. a sweep)           (default: all "
            "cores)\n"
            "  --reference      run the plain reference matmul and attention, not the fast "
            "kernels\n"
            "  --logits-out F   logits mode: write (n_tokens, vocab) float32 here; the prompt is "
            "ids\n");
    usage_state_options(out);
    usage_model_options(out);
}

static void usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see run --help)\n");
    exit(2);
}

// A plain decimal number: an optional '-', digits, and (with fraction) an optional '.digits'
// and exponent. strtol and strtod would also take leading spaces, '+', hex and "inf".
static int is_decimal(const char *s, int fraction) {
    s += *s == '-';
    size_t digits = strspn(s, "0123456789");
    s += digits;
    if (!fraction) return digits > 0 && !*s;
    if (*s == '.') {
        size_t more = strspn(s + 1, "0123456789");
        digits += more;
        s += 1 + more;
    }
    if (digits == 0) return 0;
    if (*s == 'e' || *s == 'E') {
        s++;
        s += *s == '-' || *s == '+';
        size_t exponent = strspn(s, "0123456789");
        if (exponent == 0) return 0;
        s += exponent;
    }
    return !*s;
}

static long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!is_decimal(s, 0) || end == s || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "error: %s %s: expected an integer in [%ld, %ld] (see run --help)\n", flag,
                s, lo, hi);
        exit(2);
    }
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    // the bounds are floats: compare v as the float it becomes (0.001 is not >= 0.001f), once
    // it is known to fit one
    int fits = v >= -1e30 && v <= hi;
    if (!is_decimal(s, 1) || end == s || *end || errno || !fits || !((float)v >= lo)) {
        fprintf(stderr, "error: %s %s: expected a number in [%g, %g] (see run --help)\n", flag, s,
                lo, hi);
        exit(2);
    }
    return (float)v;
}

// Split a comma-separated option value into items (at most MAX_LIST); returns how many.
static int split_list(const char *flag, const char *s, char items[MAX_LIST][64]) {
    for (int n = 0; n < MAX_LIST; n++) {
        size_t len = strcspn(s, ",");
        if (len >= sizeof(items[n])) break;
        memcpy(items[n], s, len);
        items[n][len] = 0;
        if (!s[len]) return n + 1;
        s += len + 1;
    }
    usage_error("%s: at most 16 comma-separated values", flag);
    return 0;
}

static int parse_long_list(const char *flag, const char *s, long *out, long lo, long hi) {
    char items[MAX_LIST][64];
    int n = split_list(flag, s, items);
    for (int i = 0; i < n; i++) out[i] = parse_long(flag, items[i], lo, hi);
    return n;
}

static int parse_float_list(const char *flag, const char *s, float *out, float lo, float hi) {
    char items[MAX_LIST][64];
    int n = split_list(flag, s, items);
    for (int i = 0; i < n; i++) out[i] = parse_float(flag, items[i], lo, hi);
    return n;
}

// chat reads stdin, passkey and bench make their own prompts; the others read -i or -f.
static int parse_kv_type(const char *s) {
    for (int i = 0; i < KV_COUNT; i++)
        if (!strcmp(s, kv_type_names[i])) return i;
    usage_error("unknown --kv-type '%s' (f32, f16, q8)", s);
    return 0;
}

// --threads N[,N...]: the list (a bench sweep); returns the first value.
static int parse_threads(Options *o, const char *flag, const char *val) {
    o->n_threads_list = parse_long_list(flag, val, o->threads_list, 1, 1024);
    return (int)o->threads_list[0];
}

// --kv-type T[,T...]: the list (a bench sweep); returns the first type.
static int parse_kv_types(Options *o, const char *flag, const char *val) {
    char items[MAX_LIST][64];
    o->n_kv_types = split_list(flag, val, items);
    for (int i = 0; i < o->n_kv_types; i++) o->kv_types[i] = parse_kv_type(items[i]);
    return o->kv_types[0];
}

static int mode_reads_prompt(const char *mode) {
    return strcmp(mode, "chat") && strcmp(mode, "passkey") && strcmp(mode, "bench");
}

// The modes, as bits of an option's applies-to set.
enum {
    GEN = 1 << 0,
    CHAT = 1 << 1,
    TOKENIZE = 1 << 2,
    LOGITS = 1 << 3,
    PPL = 1 << 4,
    PASSKEY = 1 << 5,
    BENCH = 1 << 6,
};
static const char *const mode_names[] = { "generate", "chat",    "tokenize", "logits",
                                          "ppl",      "passkey", "bench" };
#define N_MODES (int)(sizeof(mode_names) / sizeof(mode_names[0]))
#define MODEL_MODES (GEN | CHAT | LOGITS | PPL | PASSKEY | BENCH)   // the modes that run the model
#define SAMPLING (GEN | CHAT)
#define ALL_MODES (MODEL_MODES | TOKENIZE)

// Every option: whether it takes a value, and the modes it applies to; elsewhere it is refused.
// parse_switch() and the parse_*_option() functions below handle each.
typedef struct {
    const char *flag;
    int takes_value;
    int modes;
} OptionInfo;

static const OptionInfo option_table[] = {
    { "-m", 1, ALL_MODES },
    { "-i", 1, GEN | CHAT | TOKENIZE | LOGITS | PPL },
    { "-f", 1, GEN | CHAT | TOKENIZE | LOGITS | PPL },
    { "--ids", 0, GEN | CHAT | TOKENIZE | LOGITS | PPL },
    { "--bos", 0, TOKENIZE },
    { "-n", 1, SAMPLING },
    { "-t", 1, SAMPLING },
    { "-k", 1, SAMPLING },
    { "-p", 1, SAMPLING },
    { "--min-p", 1, SAMPLING },
    { "--repeat-penalty", 1, SAMPLING },
    { "--repeat-last-n", 1, SAMPLING },
    { "-s", 1, SAMPLING | PASSKEY },
    { "--system", 1, CHAT },
    { "--no-echo", 0, GEN },
    { "--show-prompt", 0, SAMPLING },
    { "--pieces", 0, TOKENIZE },
    { "--stop", 1, SAMPLING },
    { "--save-state", 1, GEN | CHAT | LOGITS | PPL },
    { "--load-state", 1, GEN | CHAT | LOGITS | PPL },
    { "--reset-turns", 0, CHAT },
    { "-c", 1, MODEL_MODES },
    { "--chunk", 1, MODEL_MODES },
    { "--threads", 1, MODEL_MODES },
    { "--reference", 0, MODEL_MODES },
    { "--logits-out", 1, LOGITS },
    { "--ppl-csv", 1, PPL },
    { "--ppl-bucket", 1, PPL },
    { "--ppl-tokens", 1, PPL },
    { "--kl-base-save", 1, PPL },
    { "--kl-base", 1, PPL },
    { "--passkey-len", 1, PASSKEY },
    { "--passkey-depth", 1, PASSKEY },
    { "--passkey-trials", 1, PASSKEY },
    { "--bench-pp", 1, BENCH },
    { "--bench-tg", 1, BENCH },
    { "--bench-depth", 1, BENCH },
    { "--bench-state", 1, BENCH },
    { "-r", 1, BENCH },
    { "--json", 0, BENCH },
    { "--csv", 0, BENCH },
    { "--sinks", 1, MODEL_MODES },
    { "--window", 1, MODEL_MODES },
    { "--lminf", 0, MODEL_MODES },
    { "--lminf-limit", 1, MODEL_MODES },
    { "--kv-type", 1, MODEL_MODES },
    { "--memory", 0, MODEL_MODES },
    { "--memory-block", 1, MODEL_MODES },
    { "--memory-blocks", 1, MODEL_MODES },
    { "--memory-distance", 1, MODEL_MODES },
    { "--memory-budget", 1, MODEL_MODES },
    { "--memory-score", 1, MODEL_MODES },
    { "--memory-repr", 1, MODEL_MODES },
    { "--rope-scaling", 1, MODEL_MODES },
    { "--rope-theta", 1, MODEL_MODES },
    { "--rope-factor", 1, MODEL_MODES },
    { "--rope-orig-ctx", 1, MODEL_MODES },
    { "--yarn-beta-fast", 1, MODEL_MODES },
    { "--yarn-beta-slow", 1, MODEL_MODES },
    { "--yarn-attn-factor", 1, MODEL_MODES },
};

static const OptionInfo *option_info(const char *flag) {
    for (size_t i = 0; i < sizeof(option_table) / sizeof(option_table[0]); i++)
        if (!strcmp(flag, option_table[i].flag)) return &option_table[i];
    return NULL;
}

static int takes_value(const char *flag) {
    const OptionInfo *info = option_info(flag);
    return info && info->takes_value;
}

// The mode's bit; usage error for an unknown mode.
static int mode_bit(const char *mode) {
    for (int m = 0; m < N_MODES; m++)
        if (!strcmp(mode, mode_names[m])) return 1 << m;
    usage_error("unknown mode '%s' (generate, chat, tokenize, logits, ppl, passkey, bench)", mode);
    return 0;
}

// "chat" or "ppl, passkey": the modes in a set, for a message.
static void mode_list(int modes, char *out, size_t size) {
    out[0] = 0;
    for (int m = 0; m < N_MODES; m++) {
        if (!(modes & 1 << m)) continue;
        size_t len = strlen(out);
        snprintf(out + len, size - len, "%s%s", len ? ", " : "", mode_names[m]);
    }
}

// Refuse an option given to a mode it does not apply to (argv: the checked command line).
static void check_option_modes(const char *mode, int argc, char **argv) {
    int bit = mode_bit(mode);
    for (int i = 2; i < argc; i++) {
        const OptionInfo *info = option_info(argv[i]);
        if (!info) continue;
        if (!(info->modes & bit)) {
            char modes[128];
            mode_list(info->modes, modes, sizeof(modes));
            fprintf(stderr, "error: %s does not apply to -m %s (only to %s) (see run --help)\n",
                    argv[i], mode, modes);
            exit(2);
        }
        i += info->takes_value;
    }
}

// The defaults, as usage() states them.
static Options default_options(void) {
    Options o = { .mode = "generate",
                  .steps = 256,
                  .seed = (uint64_t)time(NULL),
                  .sampler = { .temperature = 0.8f,
                               .top_k = 40,
                               .top_p = 0.95f,
                               .min_p = 0.05f,
                               .repeat_penalty = 1.0f,
                               .repeat_last_n = 64 },
                  .ppl_bucket = 1024,
                  .passkey_len = { 1024, 2048 },
                  .n_passkey_len = 2,
                  .passkey_depth = { 0, 0.25f, 0.5f, 0.75f, 1 },
                  .n_passkey_depth = 5,
                  .passkey_trials = 3,
                  .bench_pp = { 512 },
                  .n_bench_pp = 1,
                  .bench_tg = { 128 },
                  .n_bench_tg = 1,
                  .n_bench_depth = 1,
                  .memory_blocks = -1,
                  .reps = 3,
                  .attn = { .n_sink = -1, .kv_type = KV_F32 } };
    return o;
}

// An option without a value: set it and return 1, or return 0 if flag is not one.
static int parse_switch(Options *o, const char *flag) {
    int *target = NULL;
    if (!strcmp(flag, "--ids")) target = &o->input_is_ids;
    if (!strcmp(flag, "--bos")) target = &o->bos;
    if (!strcmp(flag, "--json")) target = &o->json;
    if (!strcmp(flag, "--csv")) target = &o->csv;
    if (!strcmp(flag, "--lminf")) target = &o->attn.lminf;
    if (!strcmp(flag, "--reference")) target = &o->reference;
    if (!strcmp(flag, "--no-echo")) target = &o->no_echo;
    if (!strcmp(flag, "--show-prompt")) target = &o->show_prompt;
    if (!strcmp(flag, "--pieces")) target = &o->pieces;
    if (!strcmp(flag, "--reset-turns")) target = &o->reset_turns;
    if (!strcmp(flag, "--memory")) target = &o->memory;
    if (target) *target = 1;
    return target != NULL;
}

static void add_stop(Options *o, const char *val) {
    if (o->n_stop == MAX_LIST) usage_error("%s", "at most 16 --stop strings");
    if (!*val) usage_error("%s", "--stop needs a non-empty string");
    o->stop[o->n_stop++] = val;
}

// Options of the sampler, the prompt and the run's size.
static int parse_run_option(Options *o, const char *flag, const char *val) {
    Sampler *sp = &o->sampler;
    if (!strcmp(flag, "-m")) o->mode = val;
    else if (!strcmp(flag, "-i")) o->input = val;
    else if (!strcmp(flag, "-f")) o->input_path = val;
    else if (!strcmp(flag, "-n")) o->steps = (int)parse_long(flag, val, -1, INT32_MAX);
    else if (!strcmp(flag, "-t")) sp->temperature = parse_float(flag, val, 0, 100);
    else if (!strcmp(flag, "-k")) sp->top_k = (int)parse_long(flag, val, 0, INT32_MAX);
    else if (!strcmp(flag, "-p")) sp->top_p = parse_float(flag, val, 1e-6f, 1);
    else if (!strcmp(flag, "--min-p")) sp->min_p = parse_float(flag, val, 0, 1);
    else if (!strcmp(flag, "--repeat-penalty"))
        sp->repeat_penalty = parse_float(flag, val, 1e-3f, 1e3f);
    else if (!strcmp(flag, "--repeat-last-n"))
        sp->repeat_last_n = (int)parse_long(flag, val, 0, 1 << 20);
    else if (!strcmp(flag, "--system")) o->system = val;
    else if (!strcmp(flag, "-s")) o->seed = (uint64_t)parse_long(flag, val, 0, INT64_MAX);
    else if (!strcmp(flag, "-c")) o->context = parse_long(flag, val, 1, INT32_MAX);
    else if (!strcmp(flag, "--chunk")) o->chunk = (int)parse_long(flag, val, 1, 1 << 16);
    else if (!strcmp(flag, "--threads")) o->threads = parse_threads(o, flag, val);
    else if (!strcmp(flag, "--logits-out")) o->logits_out = val;
    else if (!strcmp(flag, "--stop")) add_stop(o, val);
    else if (!strcmp(flag, "--save-state")) o->save_state = val;
    else if (!strcmp(flag, "--load-state")) o->load_state = val;
    else return 0;
    return 1;
}

// Options of the measuring modes: ppl, passkey, bench.
static int parse_measure_option(Options *o, const char *flag, const char *val) {
    if (!strcmp(flag, "--ppl-csv")) o->ppl_csv = val;
    else if (!strcmp(flag, "--ppl-bucket")) o->ppl_bucket = parse_long(flag, val, 1, INT32_MAX);
    else if (!strcmp(flag, "--ppl-tokens")) o->ppl_tokens = parse_long(flag, val, 2, INT32_MAX);
    else if (!strcmp(flag, "--kl-base-save")) o->kl_base_save = val;
    else if (!strcmp(flag, "--kl-base")) o->kl_base = val;
    else if (!strcmp(flag, "--passkey-len"))
        o->n_passkey_len = parse_long_list(flag, val, o->passkey_len, 64, 1 << 24);
    else if (!strcmp(flag, "--passkey-depth"))
        o->n_passkey_depth = parse_float_list(flag, val, o->passkey_depth, 0, 1);
    else if (!strcmp(flag, "--passkey-trials"))
        o->passkey_trials = (int)parse_long(flag, val, 1, 100000);
    else if (!strcmp(flag, "--bench-pp"))
        o->n_bench_pp = parse_long_list(flag, val, o->bench_pp, 1, 1 << 24);
    else if (!strcmp(flag, "--bench-tg"))
        o->n_bench_tg = parse_long_list(flag, val, o->bench_tg, 1, 1 << 24);
    else if (!strcmp(flag, "--bench-depth"))
        o->n_bench_depth = parse_long_list(flag, val, o->bench_depth, 0, 1 << 24);
    else if (!strcmp(flag, "--bench-state"))
        o->n_bench_state = parse_long_list(flag, val, o->bench_state, 1, 1 << 24);
    else if (!strcmp(flag, "-r")) o->reps = (int)parse_long(flag, val, 1, 1000);
    else return 0;
    return 1;
}

// Options of attention, the KV cache and RoPE.
static int parse_model_option(Options *o, const char *flag, const char *val) {
    RopeOptions *r = &o->rope;
    if (!strcmp(flag, "--sinks")) o->attn.n_sink = parse_long(flag, val, 0, 4096);
    else if (!strcmp(flag, "--window")) o->attn.window = parse_long(flag, val, 1, INT32_MAX);
    else if (!strcmp(flag, "--lminf-limit")) o->attn.limit = parse_long(flag, val, 1, INT32_MAX);
    else if (!strcmp(flag, "--memory-block")) o->memory_block = parse_long(flag, val, 1, 1 << 16);
    else if (!strcmp(flag, "--memory-distance"))
        o->memory_distance = parse_long(flag, val, 1, 1 << 30);
    else if (!strcmp(flag, "--memory-blocks"))
        o->memory_blocks = parse_long(flag, val, 0, 1 << 16);
    else if (!strcmp(flag, "--memory-budget"))
        o->memory_budget = parse_float(flag, val, 1e-3f, 1e9f);
    else if (!strcmp(flag, "--memory-score")) o->memory_score = val;
    else if (!strcmp(flag, "--memory-repr")) o->memory_repr = parse_long(flag, val, 1, 1 << 16);
    else if (!strcmp(flag, "--kv-type")) o->attn.kv_type = parse_kv_types(o, flag, val);
    else if (!strcmp(flag, "--rope-scaling")) r->scaling = val;
    else if (!strcmp(flag, "--rope-theta")) r->theta = parse_float(flag, val, 1.0001f, 1e12f);
    else if (!strcmp(flag, "--rope-factor")) r->factor = parse_float(flag, val, 1, 1e5f);
    else if (!strcmp(flag, "--rope-orig-ctx")) r->orig_ctx = parse_long(flag, val, 1, INT32_MAX);
    else if (!strcmp(flag, "--yarn-beta-fast"))
        r->beta_fast = parse_float(flag, val, 1e-3f, 1e4f);
    else if (!strcmp(flag, "--yarn-beta-slow"))
        r->beta_slow = parse_float(flag, val, 1e-3f, 1e4f);
    else if (!strcmp(flag, "--yarn-attn-factor"))
        r->attn_factor = parse_float(flag, val, 1e-3f, 100);
    else return 0;
    return 1;
}

// --save-state, --load-state and --reset-turns: what each mode can do with a state.
static void check_state_flags(const Options *o) {
    int chat = !strcmp(o->mode, "chat"), doc = o->input || o->input_path;
    if (o->reset_turns && !o->load_state && !o->save_state)
        usage_error("%s", "--reset-turns needs a state: --load-state FILE, or a document with "
                    "--save-state FILE");
    if (chat && o->save_state && !doc)
        usage_error("%s", "chat --save-state saves a document's state: give it with -f or -i");
    if (chat && o->load_state && (doc || o->save_state || o->system))
        usage_error("%s", "chat --load-state: the document and system prompt are in the state "
                    "(-f, -i, --system and --save-state do not apply)");
    if (o->load_state && (o->kl_base || o->kl_base_save))
        usage_error("%s", "--kl-base and --kl-base-save score a whole text in one run, not "
                    "from a --load-state");
}

// --memory and its settings; the defaults are InfLLM's: blocks of 128, 16 retrieved.
static void check_memory_flags(Options *o) {
    int tuned = o->memory_block || o->memory_blocks >= 0 || o->memory_distance
                || o->memory_budget || o->memory_score || o->memory_repr;
    if (tuned && !o->memory)
        usage_error("%s", "--memory-block, --memory-blocks, --memory-distance, "
                    "--memory-budget, --memory-score and --memory-repr apply only with --memory");
    if (o->memory_score && strcmp(o->memory_score, "quest") && strcmp(o->memory_score, "infllm"))
        usage_error("unknown --memory-score '%s' (quest, infllm)", o->memory_score);
    if (!o->memory_score) o->memory_score = "quest";
    if (o->memory_repr && strcmp(o->memory_score, "infllm"))
        usage_error("%s", "--memory-repr applies only with --memory-score infllm");
    int states = o->save_state || o->load_state || o->n_bench_state;
    if (o->memory && states && !strcmp(o->memory_score, "infllm"))
        usage_error("%s", "state files hold Quest's bounds, not InfLLM's token scores and "
                    "representatives: --memory-score infllm runs without --save-state, "
                    "--load-state and --bench-state");
    if (o->memory && !o->attn.window)
        usage_error("%s", "--memory needs --window W (and usually --sinks S): it keeps what "
                    "leaves the window");
    if (o->memory && o->attn.lminf)
        usage_error("%s", "--memory and --lminf are two rules for far keys: give one");
    if (o->memory && o->n_kv_types > 1)
        usage_error("%s", "--memory keeps its rows in one --kv-type: sweep the types in "
                    "separate runs");
    if (!o->memory_block) o->memory_block = 128;
    if (o->memory_blocks < 0) o->memory_blocks = 16;
    long least = o->attn.window + o->memory_block - 1;   // a block just past the window
    if (o->memory_distance && o->memory_distance < least) {
        char need[32];
        snprintf(need, sizeof(need), "%ld", least);
        usage_error("--memory-distance would put blocks inside the window: at least W + B - 1 = "
                    "%s", need);
    }
    if (!o->memory_budget) o->memory_budget = 4096;
    if (o->memory_repr > o->memory_block)
        usage_error("%s", "--memory-repr R must be at most --memory-block B (a block's "
                    "positions)");
    if (!o->memory_repr) o->memory_repr = min_int(4, (int)o->memory_block);
}

// Refuse combinations of options that cannot mean anything.
static void check_options(Options *o) {
    if (!strcmp(o->mode, "chat")) {
        if (o->input && o->input_path) usage_error("%s", "chat: give a document with -i or -f");
        if (o->input_path && !strcmp(o->input_path, "-"))
            usage_error("%s", "chat reads its questions from stdin: give the document as a file");
    } else if (!mode_reads_prompt(o->mode)) {
        if (o->input || o->input_path)
            usage_error("-m %s takes no prompt: -i and -f do not apply", o->mode);
    } else if (o->input && o->input_path) {
        usage_error("%s", "give the prompt with exactly one of -i TEXT or -f FILE");
    } else if (!o->input && !o->input_path && !(o->load_state && !strcmp(o->mode, "generate"))) {
        usage_error("%s", "give the prompt with exactly one of -i TEXT or -f FILE");
    }
    check_state_flags(o);
    check_memory_flags(o);
    if (o->rope.scaling && rope_type_from_name(o->rope.scaling) < 0)
        usage_error("unknown --rope-scaling '%s' (none, linear, dynamic, yarn, llama3)",
                    o->rope.scaling);
    if (o->attn.n_sink >= 0 && !o->attn.window && !o->attn.lminf)
        usage_error("%s", "--sinks needs --window (the keys between the sinks and the window "
                    "are dropped)");
    if (o->attn.limit && !o->attn.lminf)
        usage_error("%s", "--lminf-limit applies only with --lminf");
    if (o->steps == 0)
        usage_error("%s", "-n 0 generates nothing: give -n N with N >= 1, or -1 to go on to the "
                    "end of text");
    if (o->context && (o->attn.window || o->attn.lminf))
        usage_error("%s", "-c does not apply with --window or --lminf: every layer then keeps "
                    "sinks + window slots");
    int bench = !strcmp(o->mode, "bench");
    if (!bench && (o->n_threads_list > 1 || o->n_kv_types > 1))
        usage_error("%s", "--threads and --kv-type take one value; lists are -m bench sweeps");
    if (o->json && o->csv) usage_error("%s", "give one of --json and --csv");
    if (o->csv && o->n_bench_state)
        usage_error("%s", "--bench-state: its times fit the table or --json, not --csv's columns");
    if (o->kl_base_save && o->ppl_csv)
        usage_error("%s", "--kl-base-save and --ppl-csv: one output file per run; run twice");
    o->rope.context = o->context;
    if (!strcmp(o->mode, "logits")) {
        if (!o->logits_out) usage_error("%s", "logits mode needs --logits-out FILE");
        o->input_is_ids = 1;
    }
}

// --version, wherever it stands: the version on stdout, exit 0.
static void print_version(void) {
    printf("longrun %s\n", LONGRUN_VERSION);
    exit(0);
}

static Options parse_options(int argc, char **argv) {
    Options o = default_options();
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        usage(stdout);
        exit(0);
    }
    if (argc >= 2 && !strcmp(argv[1], "--version")) print_version();
    if (argc < 2 || argv[1][0] == '-') {
        usage(stderr);
        usage_error("%s", argc < 2 ? "no model file given" : "the model file comes first");
    }
    o.model_path = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(flag, "--version")) print_version();
        if (parse_switch(&o, flag)) continue;
        if (!takes_value(flag)) usage_error("unknown option %s", flag);
        if (i + 1 >= argc) usage_error("%s needs a value", flag);
        const char *val = argv[++i];
        int known = parse_run_option(&o, flag, val) || parse_measure_option(&o, flag, val) ||
                    parse_model_option(&o, flag, val);
        if (!known) usage_error("unknown option %s", flag);
    }
    check_option_modes(o.mode, argc, argv);
    check_options(&o);
    return o;
}

// The positions a run can reach: the prompt and -n tokens (generate), the text (logits, ppl),
// the longest pass-key prompt, depth + test (bench); SIZE_MAX when unbounded (chat, -n -1).
static size_t run_length(const Options *o, size_t n_prompt) {
    if (!strcmp(o->mode, "logits") || !strcmp(o->mode, "ppl")) return n_prompt;
    if (!strcmp(o->mode, "passkey")) return (size_t)max_of(o->passkey_len, o->n_passkey_len) + 64;
    if (!strcmp(o->mode, "bench")) {
        size_t pp = (size_t)max_of(o->bench_pp, o->n_bench_pp);
        size_t tg = (size_t)max_of(o->bench_tg, o->n_bench_tg);
        size_t state = (size_t)max_of(o->bench_state, o->n_bench_state) + 1;
        return max_size((size_t)max_of(o->bench_depth, o->n_bench_depth) + max_size(pp, tg), state);
    }
    if (o->steps < 0 || !strcmp(o->mode, "chat")) return SIZE_MAX;
    return n_prompt + (size_t)o->steps;
}

// How many cache slots a full layer gets: -c if given, else what the run can reach
// (run_length()), at most `reach` (the trained context, or the one RoPE scaling is meant for)
// for generate and ppl; chat: its document and 4096 tokens of conversation. With --window or
// --lminf every layer is windowed and build_cache() gives each min(its ring, this): a run that
// cannot fill the window allocates only what it reaches.
static size_t context_slots(const Options *o, size_t reach, size_t n_prompt) {
    if (o->context) return (size_t)o->context;
    size_t need = run_length(o, n_prompt);
    if (o->attn.window || o->attn.lminf) return o->save_state ? SIZE_MAX : need;
    if (o->save_state) return max_size(reach, n_prompt);   // room for the runs that go on
    if (!strcmp(o->mode, "chat")) return min_size(reach, n_prompt + 4096);
    if (!strcmp(o->mode, "logits") || !strcmp(o->mode, "passkey") || !strcmp(o->mode, "bench"))
        return need;
    return min_size(need, reach);
}

// Tokens per forward pass: --chunk, else 256 (logits: the whole text, up to 65536), never more
// than the prompt; generate and chat, which may fill the context and go on through a window,
// default to at most a quarter of the context, to leave room for that window.
static int chunk_size(const Options *o, size_t n_prompt, size_t context) {
    int chunk = o->chunk;
    if (!chunk) chunk = !strcmp(o->mode, "logits") ? (int)min_size(n_prompt, 65536) : 256;
    if (mode_reads_prompt(o->mode) && !o->save_state)   // a state's chunk serves later runs
        chunk = (int)min_size((size_t)chunk, n_prompt);
    int may_fill = !strcmp(o->mode, "generate") || !strcmp(o->mode, "chat");
    if (may_fill && !o->chunk && context < SIZE_MAX && (size_t)chunk > context / 4)
        chunk = (int)max_size(context / 4, 1);
    return chunk;
}

// The prompt as ids: given as ids, or encoded (tokenize: BOS only with --bos; the other
// modes: the model's own BOS policy, as HF's encode with special tokens).
// *text_out: the prompt's bytes, NUL-terminated (the caller frees them).
static int *prompt_ids(const Options *o, Tokenizer *tok, int has_tokenizer, const ModelFile *mf,
                       size_t *n_prompt, char **text_out) {
    int *prompt = NULL;
    if (!o->input_is_ids && !has_tokenizer)
        die("%s has no tokenizer: re-export it, or give token ids with --ids", o->model_path);
    size_t len;
    char *text = read_prompt(o, &len);
    if (o->input_is_ids) {
        int vocab = tokenizer_vocab_size(tok);
        if (mf->header->n_layers) vocab = (int)mf->header->vocab_size;
        *n_prompt = parse_ids(text, len, vocab, &prompt);
    } else {
        check_utf8("the prompt", text, len,
                   "convert it (iconv -t UTF-8), or give token ids with --ids");
        int add_bos = o->bos || (strcmp(o->mode, "tokenize") && tokenizer_add_bos(tok));
        size_t want = (size_t)o->ppl_tokens;
        if (o->load_state)   // the text goes on from the state's
            *n_prompt = tokenizer_encode_continued(tok, text, len, &prompt);
        else
            *n_prompt = tokenizer_encode_first(tok, text, len, add_bos, want, &prompt);
        if (!prompt) die("out of memory tokenizing the prompt");
    }
    *text_out = text;
    if (o->ppl_tokens && (size_t)o->ppl_tokens < *n_prompt) *n_prompt = (size_t)o->ppl_tokens;
    if (*n_prompt == 0 && strcmp(o->mode, "tokenize"))
        die("the prompt is empty: it has no tokens to start from");
    return prompt;
}

// The context the model's RoPE is meant for, after the command line's RoPE options: the
// longest of the trained context and every layer's scaled target (rope_target_context()).
static size_t rope_reach(const ModelFile *mf, const char *path, const RopeOptions *rope) {
    Config c = {0};
    read_config(&c, mf, path);
    apply_rope_options(&c, rope);
    size_t reach = (size_t)c.max_seq_len;
    for (int l = 0; l < c.n_layers; l++) {
        if (!c.layers[l].rotary_dim) continue;
        reach = max_size(reach, rope_target_context(&c.layers[l], c.max_seq_len));
    }
    free(c.layers);
    return reach;
}

// chat's document (-f or -i): its text, and in *n_tokens its length in tokens, which the
// context is sized by.
static char *chat_document(const Options *o, Tokenizer *tok, size_t *n_tokens) {
    size_t len;
    char *text = read_prompt(o, &len);
    check_utf8("the document", text, len, "convert it (iconv -t UTF-8)");
    if (strlen(text) != len) die("the document holds a NUL byte");
    *n_tokens = count_tokens(tok, text);
    return text;
}

// A prompt the context cannot hold is refused before any work.
static void check_prompt_fits(const Transformer *t, const char *mode, size_t n_prompt) {
    size_t capacity = cache_capacity(&t->cache, t->config.n_layers);
    if (!strcmp(mode, "ppl") && n_prompt > capacity)
        die("the text has %zu tokens but the context holds %zu: raise -c (full attention keeps "
            "every token), stream it with --sinks 4 --window W, or evaluate the first N with "
            "--ppl-tokens N", n_prompt, capacity);
    if (n_prompt > capacity)
        die("the prompt (%zu tokens) does not fit in a context of %zu; raise -c, or read it "
            "through a window (--sinks 4 --window W)", n_prompt, capacity);
}

// The sampler's line of the start-up block, for the modes that sample: the seed, so that any
// run can be repeated with -s.
static void print_sampling(const Options *o) {
    const Sampler *sp = &o->sampler;
    if (strcmp(o->mode, "generate") && strcmp(o->mode, "chat")) return;
    if (sp->temperature == 0) {
        fprintf(stderr, "sampling: greedy (-t 0)\n");
        return;
    }
    fprintf(stderr, "sampling: seed %llu (-s %llu repeats this run), temperature %g, top-k %d, "
            "top-p %g, min-p %g\n", (unsigned long long)o->seed, (unsigned long long)o->seed,
            sp->temperature, sp->top_k, sp->top_p, sp->min_p);
}

// Run the chosen mode on a built transformer.
// text: generate's prompt as given (echoed unless --no-echo or --ids), or chat's document.
// from: the loaded state (--load-state), or NULL.
static void run_mode(Transformer *t, const Options *o, Tokenizer *tok, int has_tokenizer,
                     const int *prompt, size_t n_prompt, const char *text, LoadedState *from) {
    const char *mode = o->mode;
    const char *inputs[] = {o->model_path, o->input_path};
    const char *out_path = NULL;   // the run's output file, if it has one
    if (!strcmp(mode, "logits")) out_path = o->logits_out;
    if (!strcmp(mode, "ppl")) out_path = o->ppl_csv;
    OutputFile out = {0};
    if (out_path) out = open_output(out_path, inputs, 2);
    Sampler sp = o->sampler;
    build_sampler(&sp, t->config.vocab_size, o->seed);
    if (!strcmp(mode, "logits")) write_logits(t, prompt, n_prompt, &out, o, from);
    else if (!strcmp(mode, "ppl")) perplexity(t, prompt, n_prompt, o, out.f, from);
    else if (!strcmp(mode, "passkey"))
        passkey(t, tok, o->passkey_len, o->n_passkey_len, o->passkey_depth, o->n_passkey_depth,
                o->passkey_trials, o->seed);
    else if (!strcmp(mode, "bench"))
        bench(t, o);
    else if (!strcmp(mode, "chat")) chat(t, tok, &sp, text, o, from);
    else generate(t, has_tokenizer ? tok : NULL, &sp, prompt, n_prompt,
                  o->no_echo || o->input_is_ids ? NULL : text, o, from);
    if (out_path) close_output(&out);   // after ppl's result is printed, whatever becomes of it
    free_sampler(&sp);
}

int main(int argc, char **argv) {
    guard_standard_fds();
    Options o = parse_options(argc, argv);
    if (o.threads) set_threads(o.threads);
    ModelFile mf;
    open_model_file(&mf, o.model_path);
    Tokenizer tok = {0};
    int has_tokenizer = load_tokenizer(&tok, &mf, o.model_path);
    const char *mode = o.mode;
    if ((!strcmp(mode, "chat") || !strcmp(mode, "passkey")) && !has_tokenizer)
        die("%s has no tokenizer, which -m %s needs; re-export it", o.model_path, mode);
    size_t n_prompt = 0;
    int *prompt = NULL;
    char *prompt_text = NULL;   // the prompt as given: generate's echo, chat's document
    if (mode_reads_prompt(mode) && (o.input || o.input_path))
        prompt = prompt_ids(&o, &tok, has_tokenizer, &mf, &n_prompt, &prompt_text);
    if (!strcmp(mode, "chat") && (o.input || o.input_path))
        prompt_text = chat_document(&o, &tok, &n_prompt);
    o.shown_text = prompt_text;
    if (!strcmp(mode, "tokenize")) {
        if (o.pieces && !has_tokenizer) die("%s has no tokenizer to spell pieces", o.model_path);
        if (o.pieces) print_pieces(&tok, prompt, n_prompt);
        else print_ids(prompt, n_prompt);
        finish_stdout();
        free(prompt);
        free(prompt_text);
        tokenizer_free(&tok);
        close_model_file(&mf);
        return 0;
    }

    if (mf.header->n_layers == 0)
        die("%s is a tokenizer-only file: it can only -m tokenize", o.model_path);
    if (!strcmp(mode, "ppl") && n_prompt < 2 - !!o.load_state)
        die("perplexity needs a text of at least 2 tokens");
    StateHeader saved = {0};
    if (o.load_state) saved = read_state_header(o.load_state);
    size_t reach = rope_reach(&mf, o.model_path, &o.rope);
    size_t context = o.load_state ? state_context(&o, &saved) : context_slots(&o, reach, n_prompt);
    int chunk = o.load_state ? (int)saved.max_T : chunk_size(&o, n_prompt, context);
    int all_logits = !strcmp(mode, "logits") || !strcmp(mode, "ppl");
    Transformer t = {0};
    build_transformer(&t, &mf, o.model_path, &o.rope, &o.attn, context, chunk, all_logits);
    if (o.memory)
        t.memory = new_memory(&t.cache, (int)o.memory_block, (int)o.memory_blocks,
                              memory_distance(&t, o.memory_distance, o.attn.window,
                                              o.memory_block));
    if (o.memory) memory_budget(t.memory, &t.cache, o.memory_budget, temp_dir());
    if (o.memory && !strcmp(o.memory_score, "infllm"))
        memory_use_infllm(t.memory, &t.cache, t.config.n_heads, (int)o.memory_repr);
    LoadedState loaded = {0};
    if (o.load_state) load_state(&t, o.load_state, &loaded);
    check_prompt_fits(&t, mode, loaded.header.n_tokens + n_prompt);
    t.reference = o.reference;
    print_model_summary(&t, o.model_path);
    print_sampling(&o);
    if (o.rope.scaling && !o.rope.factor && t.config.layers[0].rope_type != ROPE_DEFAULT)
        fprintf(stderr, "RoPE factor %g = -c %ld / %u, the original context (no --rope-factor)\n",
                t.config.layers[0].factor, o.context, t.config.layers[0].orig_ctx);
    if (o.load_state) print_state_bill(&t, o.load_state, &loaded);
    catch_signals();
    run_mode(&t, &o, &tok, has_tokenizer, prompt, n_prompt, prompt_text,
             o.load_state ? &loaded : NULL);
    finish_stdout();
    free_transformer(&t);
    free(prompt);
    free(prompt_text);
    if (has_tokenizer) tokenizer_free(&tok);
    close_model_file(&mf);
    return 0;
}
