// run.c - longrun: long-context transformer inference in one C file.
//
// How to read this file: the sections follow the data, from file bytes to sampled token.
//   errors and sizes   die(), checked size arithmetic, threads
//   model file         mmap, validate every header field and tensor, Config, weights
//   RoPE               rotation frequencies per layer, and the rotation itself
//   KV cache           which slot holds which position, and what a query may see
//   blocks             rmsnorm, matmul over a chunk, attention of a chunk against the cache
//   forward            prefill and decode are one function; decode is T = 1
//   sampler            greedy, temperature, top-p
//   modes              generate, logits
//   CLI                options and main
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

// ----------------------------------------------------------------------------
// Errors, checked sizes and threads

// Print one line saying what is wrong and exit. User errors never reach assert().
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
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

// OpenMP is optional: without it there is one thread. PARALLEL_FOR splits the loop that
// follows it across the threads.
#ifdef _OPENMP
#include <omp.h>
static int thread_id(void) { return omp_get_thread_num(); }
static int n_threads(void) { return omp_get_max_threads(); }
static void set_threads(int n) { omp_set_num_threads(n); }
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
static int thread_id(void) { return 0; }
static int n_threads(void) { return 1; }
static void set_threads(int n) { (void)n; }
#define PARALLEL_FOR
#endif

// ----------------------------------------------------------------------------
// The model file: mmap it, validate everything, then point into it

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
    LayerConfig *layers; // (n_layers) attention kind, window and RoPE per layer; a copy, so options can edit it
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
    uint64_t x = (*(const TensorEntry *const *)a)->offset, y = (*(const TensorEntry *const *)b)->offset;
    return x < y ? -1 : x > y;
}

// Check a [offset, offset + size) section lies inside the file.
static void check_section(const char *path, const char *what, uint64_t offset, uint64_t size, size_t file_size) {
    if (offset > file_size || size > file_size - offset)
        die("%s: %s (offset %llu, %llu bytes) runs past the end of the file (%zu bytes); the file is truncated or corrupt",
            path, what, (unsigned long long)offset, (unsigned long long)size, file_size);
}

// Map the file and check the header, the section bounds and every tensor table entry
// before anything trusts a size from it.
static void open_model_file(ModelFile *mf, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    size_t size = (size_t)st.st_size;
    if (size < LR_HEADER_SIZE)
        die("%s: %zu bytes is too short for a longrun model file (header is %d bytes)", path, size, LR_HEADER_SIZE);
    void *bytes = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (bytes == MAP_FAILED) die("%s: cannot mmap: %s", path, strerror(errno));
    mf->bytes = bytes;
    mf->size = size;
    const FileHeader *h = mf->header = bytes;

    if (h->magic != LR_MAGIC) die("%s: not a longrun model file (bad magic); export one with export.py", path);
    if (h->version != LR_VERSION)
        die("%s: format version %u, this run reads version %d; re-export with export.py", path, h->version, LR_VERSION);
    if (h->header_size != LR_HEADER_SIZE) die("%s: header size %u, expected %d", path, h->header_size, LR_HEADER_SIZE);
    if (h->file_size != size)
        die("%s: header says %llu bytes but the file has %zu; truncated or corrupt", path,
            (unsigned long long)h->file_size, size);
    check_section(path, "tokenizer section", h->tokenizer_offset, h->tokenizer_size, size);
    if (h->n_layers == 0 && h->n_tensors == 0) {   // a tokenizer-only file (export.py --tokenizer-only)
        if (h->tokenizer_size == 0) die("%s: the file has neither weights nor a tokenizer", path);
        return;
    }
    if (h->n_layers == 0 || h->n_layers > 4096) die("%s: n_layers %u out of range [1, 4096]", path, h->n_layers);
    if (h->vocab_size == 0 || h->vocab_size > (1u << 24)) die("%s: vocab_size %u out of range", path, h->vocab_size);
    check_section(path, "layer table", h->header_size, (uint64_t)h->n_layers * LR_LAYER_CONFIG_SIZE, size);
    if (h->n_tensors == 0 || h->n_tensors > 1000000) die("%s: n_tensors %u out of range", path, h->n_tensors);
    if (h->tensor_table_offset % 8) die("%s: tensor table offset %llu is not 8-byte aligned", path,
                                       (unsigned long long)h->tensor_table_offset);
    check_section(path, "tensor table", h->tensor_table_offset, (uint64_t)h->n_tensors * LR_TENSOR_ENTRY_SIZE, size);
    mf->tensors = (const TensorEntry *)(mf->bytes + h->tensor_table_offset);

    // Every tensor: a terminated name, a known dtype, a size that matches its shape, aligned
    // data inside the file, after the metadata, overlapping no other tensor.
    uint64_t data_start = h->tensor_table_offset + (uint64_t)h->n_tensors * LR_TENSOR_ENTRY_SIZE;
    if (h->tokenizer_size && h->tokenizer_offset + h->tokenizer_size > data_start)
        data_start = h->tokenizer_offset + h->tokenizer_size;
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        const TensorEntry *e = &mf->tensors[i];
        if (memchr(e->name, 0, LR_NAME_LEN) == NULL || e->name[0] == 0)
            die("%s: tensor %u has an empty or unterminated name", path, i);
        if (e->dtype >= DT_COUNT) die("%s: tensor %s has unknown dtype %u", path, e->name, e->dtype);
        if (e->n_dims < 1 || e->n_dims > 2 || (e->n_dims == 1 && e->cols != 1))
            die("%s: tensor %s has a bad shape (n_dims %u)", path, e->name, e->n_dims);
        if (e->rows == 0 || e->cols == 0 || e->rows > UINT32_MAX || e->cols > UINT32_MAX)
            die("%s: tensor %s has a bad shape (%llu x %llu)", path, e->name,
                (unsigned long long)e->rows, (unsigned long long)e->cols);
        if (e->dtype == DT_Q8_0 && e->cols % LR_Q8_BLOCK)
            die("%s: q8_0 tensor %s has %llu columns, not a multiple of %d", path, e->name,
                (unsigned long long)e->cols, LR_Q8_BLOCK);
        if (e->size != tensor_bytes(e->dtype, e->rows, e->cols, e->name))
            die("%s: tensor %s is %llu bytes, but %s %llu x %llu needs %zu", path, e->name, (unsigned long long)e->size,
                dtype_name(e->dtype), (unsigned long long)e->rows, (unsigned long long)e->cols,
                tensor_bytes(e->dtype, e->rows, e->cols, e->name));
        if (e->offset % LR_ALIGN) die("%s: tensor %s data is not %d-byte aligned", path, e->name, LR_ALIGN);
        if (e->offset < data_start) die("%s: tensor %s data overlaps the file's metadata", path, e->name);
        check_section(path, e->name, e->offset, e->size, size);
    }
    const TensorEntry **sorted = xcalloc(h->n_tensors, sizeof(*sorted), "tensor table");
    for (uint32_t i = 0; i < h->n_tensors; i++) sorted[i] = &mf->tensors[i];
    qsort(sorted, h->n_tensors, sizeof(*sorted), compare_offsets);
    uint32_t overlap = 0;
    for (uint32_t i = 1; i < h->n_tensors && !overlap; i++)
        if (sorted[i - 1]->offset + sorted[i - 1]->size > sorted[i]->offset) overlap = i;
    const char *first = overlap ? sorted[overlap - 1]->name : NULL, *second = overlap ? sorted[overlap]->name : NULL;
    free(sorted);
    if (overlap) die("%s: tensors %s and %s overlap", path, first, second);
}

static void close_model_file(ModelFile *mf) { munmap((void *)mf->bytes, mf->size); }

// Copy the header into a Config, refusing values that make no sense or would overflow later.
static void read_config(Config *c, const ModelFile *mf, const char *path) {
    const FileHeader *h = mf->header;
    const uint32_t limit = 1u << 20; // any dimension beyond a million is a corrupt file
    struct { const char *name; uint32_t value; } dims[] = {
        {"dim", h->dim}, {"hidden_dim", h->hidden_dim}, {"n_heads", h->n_heads}, {"n_kv_heads", h->n_kv_heads},
        {"head_dim", h->head_dim}, {"max_seq_len", h->max_seq_len}};
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].value == 0 || dims[i].value > limit)
            die("%s: %s = %u is out of range [1, %u]", path, dims[i].name, dims[i].value, limit);
    if (h->n_heads % h->n_kv_heads) die("%s: n_heads %u is not a multiple of n_kv_heads %u", path, h->n_heads, h->n_kv_heads);
    if ((uint64_t)h->n_heads * h->head_dim > limit) die("%s: n_heads * head_dim is too large", path);
    if (!(h->norm_eps >= 0 && h->norm_eps < 1)) die("%s: norm_eps %g out of range", path, h->norm_eps);
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
        if (lc->attn_kind >= ATTN_COUNT) die("%s: layer %d has unknown attention kind %u", path, l, lc->attn_kind);
        if (lc->attn_kind == ATTN_SLIDING && lc->window == 0) die("%s: layer %d slides with window 0", path, l);
        if (lc->rope_type >= ROPE_COUNT) die("%s: layer %d has unknown rope type %u", path, l, lc->rope_type);
        if (lc->rotary_dim % 2 || lc->rotary_dim > h->head_dim)
            die("%s: layer %d rotary_dim %u must be even and at most head_dim %u", path, l, lc->rotary_dim, h->head_dim);
        if (lc->rotary_dim && !(lc->rope_theta > 1 && isfinite(lc->rope_theta)))
            die("%s: layer %d rope_theta %g out of range", path, l, lc->rope_theta);
    }
}

// Find a tensor by name and check it has the expected shape; vectors must be f32.
static Tensor get_tensor(const ModelFile *mf, const char *path, const char *name, size_t rows, size_t cols) {
    for (uint32_t i = 0; i < mf->header->n_tensors; i++) {
        const TensorEntry *e = &mf->tensors[i];
        if (strcmp(e->name, name) != 0) continue;
        if (e->rows != rows || e->cols != cols)
            die("%s: tensor %s is %llu x %llu, the config needs %zu x %zu", path, name,
                (unsigned long long)e->rows, (unsigned long long)e->cols, rows, cols);
        if (cols == 1 && e->dtype != DT_F32) die("%s: vector %s must be f32, not %s", path, name, dtype_name(e->dtype));
        return (Tensor){mf->bytes + e->offset, (DType)e->dtype, rows, cols};
    }
    die("%s: tensor %s is missing", path, name);
    return (Tensor){0};
}

static Tensor get_layer_tensor(const ModelFile *mf, const char *path, int layer, const char *name, size_t rows, size_t cols) {
    char full[LR_NAME_LEN];
    snprintf(full, sizeof(full), "blk.%d.%s", layer, name);
    return get_tensor(mf, path, full, rows, cols);
}

static void build_weights(Weights *w, const Config *c, const ModelFile *mf, const char *path) {
    size_t D = c->dim, V = c->vocab_size, F = c->hidden_dim, Q = c->q_dim, K = c->kv_dim, H = c->head_dim;
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

// ----------------------------------------------------------------------------
// RoPE: rotation frequencies per layer, and the rotation itself

typedef struct {
    float *inv_freq;    // (n_layers, max rotary_dim / 2) angular frequency of each channel pair
    float *attn_factor; // (n_layers) multiplies cos and sin, so q.k grows by its square
    int stride;         // floats per layer in inv_freq
} Rope;

static const char *rope_type_name(uint32_t type) {
    static const char *names[ROPE_COUNT] = {"default", "linear", "dynamic", "yarn", "llama3", "longrope"};
    return type < ROPE_COUNT ? names[type] : "unknown";
}

// The frequency table of one layer, computed in float32 exactly as HF does
// (LONG_CONTEXT_SPEC.md §3.1): inv_freq[i] = 1 / theta^(2i/d), d = rotary_dim.
//   default  RoFormer (Su et al. 2021): the table above, attention factor 1.
//   linear   Position Interpolation (Chen et al. 2023): inv_freq / factor, i.e. positions p/s.
static void rope_frequencies(const LayerConfig *lc, float *inv_freq, float *attn_factor) {
    int half = lc->rotary_dim / 2;
    for (int i = 0; i < half; i++)
        inv_freq[i] = 1.0f / powf(lc->rope_theta, (float)(2 * i) / (float)lc->rotary_dim);
    *attn_factor = 1.0f;
    switch ((RopeType)lc->rope_type) {
    case ROPE_DEFAULT: break;
    case ROPE_LINEAR:
        if (!(lc->factor >= 1)) die("linear RoPE scaling needs factor >= 1, got %g", lc->factor);
        for (int i = 0; i < half; i++) inv_freq[i] /= lc->factor;
        break;
    default:
        die("RoPE scaling '%s' is not implemented yet; re-export without it", rope_type_name(lc->rope_type));
    }
}

static void build_rope(Rope *r, const Config *c) {
    r->stride = c->head_dim / 2;
    r->inv_freq = xcalloc(mul_size(c->n_layers, r->stride, "rope table"), sizeof(float), "rope table");
    r->attn_factor = xcalloc(c->n_layers, sizeof(float), "rope table");
    for (int l = 0; l < c->n_layers; l++)
        rope_frequencies(&c->layers[l], r->inv_freq + (size_t)l * r->stride, &r->attn_factor[l]);
}

static void free_rope(Rope *r) { free(r->inv_freq); free(r->attn_factor); }

// Rotate each head of vec (n_heads, head_dim) to position pos, rotate-half style (GPT-NeoX,
// as HF): channel pair i is (i, i + d/2), d = rotary_dim; channels d..head_dim-1 pass through.
//   y[i]       = x[i] cos - x[i + d/2] sin
//   y[i + d/2] = x[i + d/2] cos + x[i] sin,   angle = (float)pos * inv_freq[i] (one f32 multiply)
static void rope_rotate(float *vec, int n_heads, int head_dim, int rotary_dim, const float *inv_freq,
                        float attn_factor, size_t pos) {
    int half = rotary_dim / 2;
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i];
        float c = cosf(angle) * attn_factor, s = sinf(angle) * attn_factor;
        for (int h = 0; h < n_heads; h++) {
            float *x = vec + (size_t)h * head_dim;
            float x0 = x[i], x1 = x[i + half];
            x[i] = x0 * c - x1 * s;
            x[i + half] = x1 * c + x0 * s;
        }
    }
}

// ----------------------------------------------------------------------------
// The KV cache: which slot holds which position, and what a query may see
//
// Position = a token's index in the text (RoPE and the masks use it); slot = where its key
// and value are stored. Keys are stored already rotated to their own position. With full
// attention slot = position and the cache has one slot per position:
//
//   slots  [0 1 2 ... S-1]      a query at pos sees slots [lo, pos]
//
// A sliding layer (ATTN_SLIDING, window W) sees only lo = pos - W + 1 onward.

typedef struct {
    float *key;    // (n_layers, S, kv_dim)
    float *value;  // (n_layers, S, kv_dim)
    size_t n_slots; // S
} KVCache;

static void build_cache(KVCache *kv, const Config *c, size_t n_slots) {
    size_t floats = mul_size(mul_size(c->n_layers, n_slots, "KV cache"), c->kv_dim, "KV cache");
    kv->n_slots = n_slots;
    kv->key = xcalloc(floats, sizeof(float), "the KV cache");
    kv->value = xcalloc(floats, sizeof(float), "the KV cache");
}

static void free_cache(KVCache *kv) { free(kv->key); free(kv->value); }

static size_t kv_slot(const KVCache *kv, size_t pos) { (void)kv; return pos; }

// First position a query at pos may attend to in this layer (LONG_CONTEXT_SPEC.md §9.1:
// key k is visible iff k <= pos and pos - k < W).
static size_t first_visible(const LayerConfig *lc, size_t pos) {
    if (lc->attn_kind == ATTN_SLIDING && pos >= lc->window) return pos - lc->window + 1;
    return 0;
}

// ----------------------------------------------------------------------------
// Blocks: the operations forward() is made of

// IEEE half and bfloat16 to float, bit by bit (portable; no compiler half type needed).
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (mant << 13);               // inf, nan
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (mant << 13);    // normal
    else if (mant == 0) bits = sign;                                        // zero
    else {                                                                  // subnormal: normalise
        int e = -1;
        do { mant <<= 1; e++; } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Row `row` of w as float32: a pointer into the file for f32, else dequantized into scratch
// (cols floats). This is the only place that knows the dtypes; every kernel uses it.
static const float *weight_row(const Tensor *w, size_t row, float *scratch) {
    size_t cols = w->cols;
    const uint8_t *data = w->data;
    switch (w->dtype) {
    case DT_F32: return (const float *)data + row * cols;
    case DT_F16: case DT_BF16: {
        const uint16_t *src = (const uint16_t *)data + row * cols;
        for (size_t i = 0; i < cols; i++) scratch[i] = w->dtype == DT_F16 ? f16_to_f32(src[i]) : bf16_to_f32(src[i]);
        return scratch;
    }
    case DT_Q8_0: {
        const int8_t *q = (const int8_t *)data + row * cols;
        const float *scale = (const float *)(data + w->rows * cols) + row * (cols / LR_Q8_BLOCK);
        for (size_t b = 0; b < cols / LR_Q8_BLOCK; b++)   // one block of 32 values per scale
            for (size_t i = b * LR_Q8_BLOCK; i < (b + 1) * LR_Q8_BLOCK; i++) scratch[i] = scale[b] * q[i];
        return scratch;
    }
    default: return NULL; // unreachable: dtypes were validated when the file was opened
    }
}

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

// out (T, w.rows) = x (T, w.cols) @ w^T. Each weight row is read (and dequantized) once per
// chunk and reused for all T tokens: prefill reads the weights once, not once per token.
// scratch: (n_threads, w.cols) floats.
static void matmul(float *out, const float *x, const Tensor *w, int T, float *scratch) {
    size_t rows = w->rows, cols = w->cols;
    PARALLEL_FOR
    for (size_t r = 0; r < rows; r++) {
        const float *wr = weight_row(w, r, scratch + (size_t)thread_id() * cols);
        for (int t = 0; t < T; t++) out[(size_t)t * rows + r] = dot(wr, x + (size_t)t * cols, cols);
    }
}

// RMSNorm (Zhang & Sennrich 2019), per row of x (T, n): out = w * x / sqrt(mean(x^2) + eps).
static void rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps) {
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

// In-place softmax over x[0..n): subtract the max first so exp never overflows.
static void softmax(float *x, size_t n) {
    float max = -INFINITY;
    for (size_t i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = 0;
    for (size_t i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (size_t i = 0; i < n; i++) x[i] /= sum;
}

// SwiGLU (Shazeer 2020): gate = silu(gate) * up, silu(x) = x / (1 + e^-x).
static void swiglu(float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// Attention of a chunk of T queries (T, q_dim) at positions pos0.. against the cache of one
// layer, whose slots already hold this chunk's keys and values. out: (T, q_dim).
// Scaled dot-product attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al.
// 2023): query head h reads kv head h / (n_heads / n_kv_heads). scores: (n_threads, S).
static void attention(float *out, const float *q, const float *key, const float *value, const KVCache *kv,
                      const Config *c, const LayerConfig *lc, int T, size_t pos0, float *scores) {
    int H = c->head_dim, group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)H);
    PARALLEL_FOR
    for (int th = 0; th < T * c->n_heads; th++) {   // one (query row, head) pair per iteration
        int t = th / c->n_heads, h = th % c->n_heads;
        size_t pos = pos0 + t, lo = first_visible(lc, pos);
        const float *qh = q + (size_t)t * c->q_dim + (size_t)h * H;
        size_t kv_off = (size_t)(h / group) * H;
        float *att = scores + (size_t)thread_id() * kv->n_slots;
        for (size_t p = lo; p <= pos; p++)
            att[p - lo] = dot(qh, key + kv_slot(kv, p) * c->kv_dim + kv_off, H) * scale;
        softmax(att, pos - lo + 1);
        float *oh = out + (size_t)t * c->q_dim + (size_t)h * H;
        memset(oh, 0, H * sizeof(float));
        for (size_t p = lo; p <= pos; p++) {
            const float *vp = value + kv_slot(kv, p) * c->kv_dim + kv_off;
            float a = att[p - lo];
            for (int i = 0; i < H; i++) oh[i] += a * vp[i];
        }
    }
}

// ----------------------------------------------------------------------------
// The transformer and its forward pass

typedef struct {
    int max_T;          // most tokens per forward() call
    int n_logit_rows;   // rows of logits computed: max_T (every position) or 1 (last only)
    float *x;           // (max_T, D) residual stream
    float *xb;          // (max_T, D) normed input, then block output
    float *q;           // (max_T, q_dim)
    float *k, *v;       // (max_T, kv_dim)
    float *att_out;     // (max_T, q_dim)
    float *hb, *hb2;    // (max_T, hidden_dim)
    float *logits;      // (n_logit_rows, V)
    float *scores;      // (n_threads, S) attention scores
    float *scratch;     // (n_threads, widest matrix row) dequantized weight rows
} RunState;

typedef struct {
    Config config;
    Weights weights;
    Rope rope;
    KVCache cache;
    RunState state;
    ModelFile file;
} Transformer;

static void build_state(RunState *s, const Config *c, int max_T, int all_logits, size_t n_slots) {
    int widest = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    widest = widest > c->q_dim ? widest : c->q_dim;
    s->max_T = max_T;
    s->n_logit_rows = all_logits ? max_T : 1;
    s->x = xcalloc(mul_size(max_T, c->dim, "x"), sizeof(float), "activations");
    s->xb = xcalloc(mul_size(max_T, c->dim, "xb"), sizeof(float), "activations");
    s->q = xcalloc(mul_size(max_T, c->q_dim, "q"), sizeof(float), "activations");
    s->k = xcalloc(mul_size(max_T, c->kv_dim, "k"), sizeof(float), "activations");
    s->v = xcalloc(mul_size(max_T, c->kv_dim, "v"), sizeof(float), "activations");
    s->att_out = xcalloc(mul_size(max_T, c->q_dim, "att"), sizeof(float), "activations");
    s->hb = xcalloc(mul_size(max_T, c->hidden_dim, "hb"), sizeof(float), "activations");
    s->hb2 = xcalloc(mul_size(max_T, c->hidden_dim, "hb2"), sizeof(float), "activations");
    s->logits = xcalloc(mul_size(s->n_logit_rows, c->vocab_size, "logits"), sizeof(float), "logits");
    s->scores = xcalloc(mul_size(n_threads(), n_slots, "scores"), sizeof(float), "attention scores");
    s->scratch = xcalloc(mul_size(n_threads(), widest, "scratch"), sizeof(float), "weight scratch");
}

static void free_state(RunState *s) {
    void *buffers[] = {s->x, s->xb, s->q, s->k, s->v, s->att_out, s->hb, s->hb2, s->logits, s->scores, s->scratch};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
}

// Point into the opened, validated file and allocate everything a run needs, once: n_slots
// cache slots, chunks of up to max_T tokens, logits for every row or only the last.
static void build_transformer(Transformer *t, const ModelFile *mf, const char *path, size_t n_slots, int max_T,
                              int all_logits) {
    t->file = *mf;
    read_config(&t->config, &t->file, path);
    build_weights(&t->weights, &t->config, &t->file, path);
    build_rope(&t->rope, &t->config);
    build_cache(&t->cache, &t->config, n_slots);
    build_state(&t->state, &t->config, max_T, all_logits, n_slots);
}

static void free_transformer(Transformer *t) {
    free_state(&t->state);
    free_cache(&t->cache);
    free_rope(&t->rope);
    free(t->weights.layers);
    free(t->config.layers);
}

// The start-up block on stderr: what model, how big, and the memory bill.
static void print_model_summary(const Transformer *t, const char *path) {
    const Config *c = &t->config;
    const RunState *s = &t->state;
    const FileHeader *h = t->file.header;
    size_t params = 0;
    for (uint32_t i = 0; i < h->n_tensors; i++) params += t->file.tensors[i].rows * t->file.tensors[i].cols;
    size_t kv_per_token = (size_t)2 * c->n_layers * c->kv_dim * sizeof(float);
    size_t act = (size_t)s->max_T * (2 * c->dim + 2 * c->q_dim + 2 * c->kv_dim + 2 * c->hidden_dim) * sizeof(float) +
                 (size_t)s->n_logit_rows * c->vocab_size * sizeof(float);
    fprintf(stderr, "%s: %.32s, %.1fM params, %s weights, %d layers, dim %d, %d heads (%d kv) x %d, vocab %d, "
            "trained context %d\n", path, h->arch, params / 1e6, dtype_name(t->weights.layers[0].wq.dtype), c->n_layers,
            c->dim, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size, c->max_seq_len);
    fprintf(stderr, "context %zu tokens; memory: weights %.1f MB (mapped), KV cache %.1f MB (%zu bytes/token), "
            "activations %.1f MB\n", t->cache.n_slots, t->file.size / 1e6, (double)kv_per_token * t->cache.n_slots / 1e6,
            kv_per_token, act / 1e6);
}

// Run T tokens at positions pos0 .. pos0+T-1 through the model. Their keys and values are
// added to the cache, so the next call continues the text. Returns the logits: (T, V) when
// built with all_logits, else (1, V) for the last token. Prefill is one call per chunk,
// decode one call per token.
static float *forward(Transformer *tr, const int *tokens, int T, size_t pos0) {
    const Config *c = &tr->config;
    const Weights *w = &tr->weights;
    RunState *s = &tr->state;
    KVCache *kv = &tr->cache;
    int D = c->dim, H = c->head_dim;
    if (T < 1 || T > s->max_T) die("forward: chunk of %d tokens, limit %d", T, s->max_T);
    if (pos0 + T > kv->n_slots) die("context full: %zu tokens do not fit in %zu slots; raise -c", pos0 + T, kv->n_slots);

    for (int t = 0; t < T; t++) {   // token embeddings
        const float *row = weight_row(&w->tok_embd, tokens[t], s->scratch);
        memcpy(s->x + (size_t)t * D, row, D * sizeof(float));
    }

    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &w->layers[l];
        const LayerConfig *lc = &c->layers[l];
        float *key = kv->key + (size_t)l * kv->n_slots * c->kv_dim;     // (S, kv_dim) of this layer
        float *value = kv->value + (size_t)l * kv->n_slots * c->kv_dim;

        // attention: q, k, v projections, optional bias and per-head norm, RoPE, cache, attend
        rmsnorm(s->xb, s->x, (const float *)lw->attn_norm.data, T, D, c->norm_eps);
        matmul(s->q, s->xb, &lw->wq, T, s->scratch);
        matmul(s->k, s->xb, &lw->wk, T, s->scratch);
        matmul(s->v, s->xb, &lw->wv, T, s->scratch);
        if (c->qkv_bias) {
            add_bias(s->q, (const float *)lw->bq.data, T, c->q_dim);
            add_bias(s->k, (const float *)lw->bk.data, T, c->kv_dim);
            add_bias(s->v, (const float *)lw->bv.data, T, c->kv_dim);
        }
        if (c->qk_norm) {   // Qwen3: RMSNorm over each head's H channels, before RoPE
            rmsnorm(s->q, s->q, (const float *)lw->q_norm.data, T * c->n_heads, H, c->norm_eps);
            rmsnorm(s->k, s->k, (const float *)lw->k_norm.data, T * c->n_kv_heads, H, c->norm_eps);
        }
        const float *inv_freq = tr->rope.inv_freq + (size_t)l * tr->rope.stride;
        for (int t = 0; t < T; t++) {
            size_t pos = pos0 + t;
            float *qt = s->q + (size_t)t * c->q_dim, *kt = s->k + (size_t)t * c->kv_dim;
            rope_rotate(qt, c->n_heads, H, lc->rotary_dim, inv_freq, tr->rope.attn_factor[l], pos);
            rope_rotate(kt, c->n_kv_heads, H, lc->rotary_dim, inv_freq, tr->rope.attn_factor[l], pos);
            memcpy(key + kv_slot(kv, pos) * c->kv_dim, kt, c->kv_dim * sizeof(float));
            memcpy(value + kv_slot(kv, pos) * c->kv_dim, s->v + (size_t)t * c->kv_dim, c->kv_dim * sizeof(float));
        }
        attention(s->att_out, s->q, key, value, kv, c, lc, T, pos0, s->scores);
        matmul(s->xb, s->att_out, &lw->wo, T, s->scratch);
        for (size_t i = 0; i < (size_t)T * D; i++) s->x[i] += s->xb[i];

        // MLP: x += w_down(silu(w_gate(n)) * w_up(n)), n = rmsnorm(x)
        rmsnorm(s->xb, s->x, (const float *)lw->ffn_norm.data, T, D, c->norm_eps);
        matmul(s->hb, s->xb, &lw->w_gate, T, s->scratch);
        matmul(s->hb2, s->xb, &lw->w_up, T, s->scratch);
        swiglu(s->hb, s->hb2, (size_t)T * c->hidden_dim);
        matmul(s->xb, s->hb, &lw->w_down, T, s->scratch);
        for (size_t i = 0; i < (size_t)T * D; i++) s->x[i] += s->xb[i];
    }

    // classifier, on every row or only the last one
    int rows = s->n_logit_rows == 1 ? 1 : T;
    const float *last = s->x + (size_t)(T - rows) * D;
    rmsnorm(s->xb, last, (const float *)w->output_norm.data, rows, D, c->norm_eps);
    matmul(s->logits, s->xb, &w->output, rows, s->scratch);
    return s->logits;
}

// ----------------------------------------------------------------------------
// The tokenizer: text <-> ids, in tokenizer.c (one translation unit with this file)

#include "tokenizer.c"

// Load the tokenizer section of the file into tok. Returns 0 when the file has none.
static int load_tokenizer(Tokenizer *tok, const ModelFile *mf, const char *path) {
    const FileHeader *h = mf->header;
    if (h->tokenizer_size == 0) return 0;
    char err[256];
    if (tokenizer_load(tok, mf->bytes + h->tokenizer_offset, h->tokenizer_size, err, sizeof(err)) != 0)
        die("%s: tokenizer section: %s", path, err);
    if (h->n_layers && tokenizer_vocab_size(tok) > (int)h->vocab_size)
        die("%s: the tokenizer has %d tokens but the model only %u", path, tokenizer_vocab_size(tok), h->vocab_size);
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

static void free_sampler(Sampler *sp) { free(sp->order); free(sp->recent); }

// Record a token of the text (prompt or generated) for the repetition penalty.
static void sampler_accept(Sampler *sp, int token) {
    if (sp->repeat_last_n > 0) sp->recent[sp->n_seen % sp->repeat_last_n] = token;
    sp->n_seen++;
}

static float random_f32(uint64_t *state) { // xorshift64*, uniform in [0, 1)
    *state ^= *state >> 12; *state ^= *state << 25; *state ^= *state >> 27;
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
        if (!seen) logits[id] = logits[id] > 0 ? logits[id] / sp->repeat_penalty : logits[id] * sp->repeat_penalty;
    }
}

// Pick the next token from logits (V), which this overwrites. The steps run in HF's order,
// each on what the previous left: repetition penalty, temperature, top-k, top-p (Holtzman
// et al. 2019), min-p (Nguyen et al. 2024).
static int sample(Sampler *sp, float *logits, int vocab) {
    if (sp->repeat_penalty != 1) apply_repeat_penalty(sp, logits);
    if (sp->temperature == 0) return argmax(logits, vocab);
    for (int i = 0; i < vocab; i++) logits[i] /= sp->temperature;
    softmax(logits, vocab);   // logits now hold probabilities
    float pmax = logits[argmax(logits, vocab)], mass = 1;   // mass: of the candidates before top-p
    int n = 0;
    if (sp->top_k > 0) {
        n = top_k_ids(logits, vocab, sp->top_k, sp->order);
        mass = 0;
        for (int i = 0; i < n; i++) mass += logits[sp->order[i]];
    } else if (sp->top_p >= 1 && sp->min_p <= 0) {   // the whole distribution: no sorting needed
        float r = random_f32(&sp->rng), cdf = 0;
        for (int i = 0; i < vocab; i++) { cdf += logits[i]; if (r < cdf) return i; }
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
    while (n > 1 && logits[sp->order[n - 1]] < sp->min_p * pmax) n--;   // min-p: a ratio to the best
    float total = 0;
    for (int i = 0; i < n; i++) total += logits[sp->order[i]];
    float r = random_f32(&sp->rng) * total, cdf = 0;
    for (int i = 0; i < n; i++) { cdf += logits[sp->order[i]]; if (r < cdf) return sp->order[i]; }
    return sp->order[n - 1];
}

// ----------------------------------------------------------------------------
// Modes

typedef struct {
    const char *model_path;
    const char *mode;         // generate | chat | tokenize | logits
    const char *input;        // -i: the prompt text (token ids with --ids)
    const char *input_path;   // -f: read the prompt from this file ("-": stdin)
    int input_is_ids;         // --ids: the prompt is token ids, and generate prints ids
    int bos;                  // --bos: prepend BOS (tokenize); generate follows the model's policy
    int steps;                // -n: tokens to generate; -1 = until end of text or context
    Sampler sampler;          // -t -k -p --min-p --repeat-penalty --repeat-last-n settings
    uint64_t seed;            // -s
    const char *system;       // --system: the chat's system prompt
    long context;             // -c: cache slots to allocate (0 = what the run needs, up to the trained context)
    int chunk;                // --chunk: prefill chunk size (0 = mode default)
    int threads;              // --threads (0 = OpenMP default)
    const char *logits_out;   // --logits-out FILE
} Options;

// Parse "12 7 99" into ids, each checked against the vocabulary. Returns the count.
static size_t parse_ids(const char *text, int vocab, int **ids_out) {
    size_t cap = strlen(text) / 2 + 1, n = 0;
    int *ids = xcalloc(cap, sizeof(int), "token ids");
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno) die("token ids: '%.20s' is not a token id", p);
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
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) die("%s: is a directory, not a prompt file", o->input_path);
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

static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
#ifdef __APPLE__
    return ru.ru_maxrss / 1e6;  // bytes on macOS
#else
    return ru.ru_maxrss / 1e3;  // kilobytes on Linux
#endif
}

// Ctrl-C stops generation cleanly (the stats still print); a second Ctrl-C exits at once.
static volatile sig_atomic_t interrupted = 0;
static void on_sigint(int sig) {
    (void)sig;
    if (interrupted) _exit(130);
    interrupted = 1;
}

// Feed n tokens to the model from position pos0 in chunks; return the last token's logits.
// Long prompts show their progress on stderr.
static float *prefill(Transformer *t, const int *tokens, size_t n, size_t pos0) {
    float *logits = NULL;
    double start = now_seconds();
    for (size_t done = 0; done < n && !interrupted; done += t->state.max_T) {
        int T = n - done < (size_t)t->state.max_T ? (int)(n - done) : t->state.max_T;
        logits = forward(t, tokens + done, T, pos0 + done);
        if (n >= 4096)
            fprintf(stderr, "\rprefill %zu / %zu tokens, %.0f tok/s", done + T, n, (done + T) / (now_seconds() - start));
    }
    if (n >= 4096) fprintf(stderr, "\n");
    if (interrupted) die("interrupted during prefill");
    return logits;
}

// Sample up to steps tokens (-1: no limit) after logits, printing each and feeding it back at
// *pos. Stops at the model's end-of-text or end-of-turn token (not fed back; known only with a
// tokenizer), a full cache or Ctrl-C. Prints text through the tokenizer's stream, or ids.
// Returns the number of tokens sampled.
static int decode(Transformer *t, Tokenizer *tok, int print_text, Sampler *sp, float *logits, size_t *pos, int steps) {
    TokenStream stream;
    print_text = print_text && tok;
    if (print_text) tokenizer_stream_init(&stream, tok, 0);
    int generated = 0;
    while ((steps < 0 || generated < steps) && !interrupted) {
        int next = sample(sp, logits, t->config.vocab_size);
        generated++;
        if (tok && (next == tokenizer_eos_id(tok) || next == tokenizer_eot_id(tok))) break;
        if (print_text) tokenizer_stream_put(&stream, next, stdout);
        else printf(generated > 1 ? " %d" : "%d", next);
        fflush(stdout);
        sampler_accept(sp, next);
        if (*pos >= t->cache.n_slots) break;
        logits = forward(t, &next, 1, (*pos)++);   // fed back even when it is the last, so a chat
    }                                              // continues from a cache holding the whole reply
    if (print_text) tokenizer_stream_flush(&stream, stdout);
    return generated;
}

static void print_stats(size_t n_prompt, double prefill_s, int generated, double decode_s) {
    fprintf(stderr, "prompt %zu tokens, prefill %.1f tok/s, first token after %.2f s, decode %.1f tok/s (%d tokens), "
            "peak RSS %.0f MB\n", n_prompt, n_prompt / prefill_s, prefill_s,
            generated / decode_s, generated, peak_rss_mb());
}

// -m generate: prefill the prompt, then sample until -n tokens, end of text, a full context or
// Ctrl-C. Stats on stderr.
static void generate(Transformer *t, Tokenizer *tok, int print_text, Sampler *sp, const int *prompt, size_t n_prompt,
                     int steps) {
    for (size_t i = 0; i < n_prompt; i++) sampler_accept(sp, prompt[i]);
    double t0 = now_seconds();
    float *logits = prefill(t, prompt, n_prompt, 0);
    double t1 = now_seconds();
    size_t pos = n_prompt;
    int generated = decode(t, tok, print_text, sp, logits, &pos, steps);
    printf("\n");
    print_stats(n_prompt, t1 - t0, generated, now_seconds() - t1);
}

// Chat formats, chosen by the template id export.py recorded from the model's chat_template.
// A turn is: [close the previous reply] [system, first turn only] user message, assistant cue.
typedef struct {
    const char *system;    // printf format with the system prompt
    const char *user;      // printf format with the user message, ending with the assistant cue
    const char *close;     // what ends an assistant reply (its end-of-turn token and after)
} ChatFormat;

static const ChatFormat chat_formats[CHAT_COUNT] = {
    [CHAT_CHATML] = {"<|im_start|>system\n%s<|im_end|>\n", "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n",
                     "<|im_end|>\n"},
    [CHAT_LLAMA3] = {"<|start_header_id|>system<|end_header_id|>\n\n%s<|eot_id|>",
                     "<|start_header_id|>user<|end_header_id|>\n\n%s<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"},
    [CHAT_LLAMA2_INST] = {"[INST] <<SYS>>\n%s\n<</SYS>>\n\n", "[INST] %s [/INST]", " </s><s>"},
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

// -m chat: read one user message per line from stdin until EOF; the KV cache keeps the whole
// conversation, so each turn only prefills its own new tokens.
// With print_ids, replies are printed as token ids instead of text.
static void chat(Transformer *t, Tokenizer *tok, Sampler *sp, const char *system, int steps, int print_ids) {
    int id = tokenizer_chat_template(tok);
    if (id <= CHAT_NONE || id >= CHAT_COUNT) die("this model has no known chat format; use -m generate");
    const ChatFormat *fmt = &chat_formats[id];
    int interactive = isatty(fileno(stdin));
    char *line = NULL;
    size_t line_cap = 0, pos = 0;
    for (int turn = 0;; turn++) {
        if (interactive) { fprintf(stderr, "> "); fflush(stderr); }
        ssize_t got = getline(&line, &line_cap, stdin);
        if (got < 0) break;
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        char *text = NULL;
        size_t len = 0;
        if (turn > 0) append_format(&text, &len, "%s", fmt->close);
        if (turn == 0 && system) append_format(&text, &len, fmt->system, system);
        if (id == CHAT_LLAMA2_INST && turn == 0 && system)   // Llama 2 puts the system block inside [INST]
            append_format(&text, &len, "%s [/INST]", line);
        else
            append_format(&text, &len, fmt->user, line);
        int *ids;
        size_t n = tokenizer_encode(tok, text, len, turn == 0 && tokenizer_add_bos(tok), &ids);
        free(text);
        if (!ids) die("out of memory tokenizing the chat turn");
        if (pos + n >= t->cache.n_slots)
            die("the conversation (%zu tokens) no longer fits the context of %zu; raise -c", pos + n, t->cache.n_slots);
        for (size_t i = 0; i < n; i++) sampler_accept(sp, ids[i]);
        double t0 = now_seconds();
        float *logits = prefill(t, ids, n, pos);
        double t1 = now_seconds();
        pos += n;
        free(ids);
        int generated = decode(t, tok, !print_ids, sp, logits, &pos, steps);
        printf("\n");
        fflush(stdout);
        print_stats(n, t1 - t0, generated, now_seconds() - t1);
        interrupted = 0;   // Ctrl-C ends a reply, not the conversation
    }
    free(line);
}

// -m logits: run the ids in chunks and write every position's logits as raw float32 (n, V).
static void write_logits(Transformer *t, const int *tokens, size_t n, const char *out_path) {
    FILE *f = fopen(out_path, "wb");
    if (!f) die("%s: cannot write: %s", out_path, strerror(errno));
    int V = t->config.vocab_size;
    for (size_t done = 0; done < n; done += t->state.max_T) {
        int T = n - done < (size_t)t->state.max_T ? (int)(n - done) : t->state.max_T;
        float *logits = forward(t, tokens + done, T, done);
        if (fwrite(logits, sizeof(float) * V, T, f) != (size_t)T) die("%s: write failed", out_path);
    }
    if (fclose(f) != 0) die("%s: write failed: %s", out_path, strerror(errno));
}

// -m tokenize: the ids of the prompt on one line, as HF's encode(text, add_special_tokens=False).
static void print_ids(const int *ids, size_t n) {
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
}

// ----------------------------------------------------------------------------
// Command line

static void usage(FILE *out) {
    fprintf(out,
        "usage: run MODEL [options]\n"
        "  -m MODE          generate | chat | tokenize | logits            (default generate)\n"
        "  -i TEXT          the prompt\n"
        "  -f FILE          read the prompt from FILE, bytes verbatim; - for stdin\n"
        "  --ids            the prompt is token ids (\"1 2 3\"); generate and chat print ids\n"
        "  --bos            tokenize: prepend the model's BOS token\n"
        "  -n N             tokens to generate; -1 = until end of text      (default 256)\n"
        "  -t T             temperature; 0 = greedy                         (default 0.8)\n"
        "  -k K             top-k: sample among the K most likely; 0 = off (default 40)\n"
        "  -p P             top-p (nucleus) threshold in (0, 1]; 1 = off   (default 0.95)\n"
        "  --min-p P        drop tokens below P x the most likely; 0 = off (default 0.05)\n"
        "  --repeat-penalty R  penalise recent tokens' logits; 1 = off     (default 1.0)\n"
        "  --repeat-last-n N   how many recent tokens it looks at          (default 64)\n"
        "  -s SEED          random seed; same seed, same output            (default: time)\n"
        "  --system TEXT    chat: the system prompt                        (default: none)\n"
        "  -c N             context: KV cache slots to allocate            (default: what the run needs,\n"
        "                   at most the model's trained context; chat: 4096 at most)\n"
        "  --chunk N        tokens per forward pass in prefill             (default 256; logits: all)\n"
        "  --threads N      worker threads                                 (default: all cores)\n"
        "  --logits-out F   logits mode: write (n_tokens, vocab) float32 here; the prompt is ids\n"
        "  -h, --help       this text\n");
}

static void usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see run --help)\n");
    exit(2);
}

static long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "error: %s %s: expected an integer in [%ld, %ld] (see run --help)\n", flag, s, lo, hi);
        exit(2);
    }
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !(v >= lo && v <= hi)) {
        fprintf(stderr, "error: %s %s: expected a number in [%g, %g] (see run --help)\n", flag, s, lo, hi);
        exit(2);
    }
    return (float)v;
}

static Options parse_options(int argc, char **argv) {
    Options o = {.mode = "generate", .steps = 256, .seed = (uint64_t)time(NULL),
                 .sampler = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
                             .repeat_penalty = 1.0f, .repeat_last_n = 64}};
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) { usage(stdout); exit(0); }
    if (argc < 2 || argv[1][0] == '-') { usage(stderr); exit(2); }
    o.model_path = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(flag, "--ids")) { o.input_is_ids = 1; continue; }
        if (!strcmp(flag, "--bos")) { o.bos = 1; continue; }
        if (i + 1 >= argc) usage_error("%s needs a value", flag);
        const char *val = argv[++i];
        if (!strcmp(flag, "-m")) o.mode = val;
        else if (!strcmp(flag, "-i")) o.input = val;
        else if (!strcmp(flag, "-f")) o.input_path = val;
        else if (!strcmp(flag, "-n")) o.steps = (int)parse_long(flag, val, -1, INT32_MAX);
        else if (!strcmp(flag, "-t")) o.sampler.temperature = parse_float(flag, val, 0, 100);
        else if (!strcmp(flag, "-k")) o.sampler.top_k = (int)parse_long(flag, val, 0, INT32_MAX);
        else if (!strcmp(flag, "-p")) o.sampler.top_p = parse_float(flag, val, 1e-6f, 1);
        else if (!strcmp(flag, "--min-p")) o.sampler.min_p = parse_float(flag, val, 0, 1);
        else if (!strcmp(flag, "--repeat-penalty")) o.sampler.repeat_penalty = parse_float(flag, val, 1e-3f, 1e3f);
        else if (!strcmp(flag, "--repeat-last-n")) o.sampler.repeat_last_n = (int)parse_long(flag, val, 0, 1 << 20);
        else if (!strcmp(flag, "--system")) o.system = val;
        else if (!strcmp(flag, "-s")) o.seed = (uint64_t)parse_long(flag, val, 0, INT64_MAX);
        else if (!strcmp(flag, "-c")) o.context = parse_long(flag, val, 1, INT32_MAX);
        else if (!strcmp(flag, "--chunk")) o.chunk = (int)parse_long(flag, val, 1, 1 << 16);
        else if (!strcmp(flag, "--threads")) o.threads = (int)parse_long(flag, val, 1, 1024);
        else if (!strcmp(flag, "--logits-out")) o.logits_out = val;
        else usage_error("unknown option %s", flag);
    }
    if (strcmp(o.mode, "generate") && strcmp(o.mode, "chat") && strcmp(o.mode, "tokenize") && strcmp(o.mode, "logits"))
        usage_error("unknown mode '%s' (generate, chat, tokenize, logits)", o.mode);
    if (!strcmp(o.mode, "chat")) {
        if (o.input || o.input_path) usage_error("%s", "chat reads its messages from stdin, one per line");
    } else if (!o.input == !o.input_path) {
        usage_error("%s", "give the prompt with exactly one of -i TEXT or -f FILE");
    }
    if (!strcmp(o.mode, "logits")) {
        if (!o.logits_out) usage_error("%s", "logits mode needs --logits-out FILE");
        o.input_is_ids = 1;
    }
    return o;
}

// How many cache slots a run allocates: -c if given, else what it needs (prompt + tokens to
// generate), at most the trained context (chat: at most 4096, as its length is unknown).
static size_t context_slots(const Options *o, const FileHeader *h, size_t n_prompt) {
    size_t trained = h->max_seq_len, cap = !strcmp(o->mode, "chat") && trained > 4096 ? 4096 : trained;
    if (o->context) return (size_t)o->context;
    if (!strcmp(o->mode, "logits")) return n_prompt;
    size_t needed = o->steps < 0 || !strcmp(o->mode, "chat") ? SIZE_MAX : n_prompt + (size_t)o->steps;
    return needed < cap ? needed : cap;
}

int main(int argc, char **argv) {
    Options o = parse_options(argc, argv);
    if (o.threads) set_threads(o.threads);
    ModelFile mf;
    open_model_file(&mf, o.model_path);
    Tokenizer tok = {0};
    int has_tokenizer = load_tokenizer(&tok, &mf, o.model_path);
    int chat_mode = !strcmp(o.mode, "chat"), logits_mode = !strcmp(o.mode, "logits");
    if (chat_mode && !has_tokenizer) die("%s has no tokenizer, which chat needs; re-export it", o.model_path);

    // The prompt as ids: given as ids, or encoded (tokenize: BOS only with --bos; generate:
    // the model's own BOS policy, as HF's encode with special tokens).
    size_t n_prompt = 0;
    int *prompt = NULL;
    if (!chat_mode) {
        size_t len;
        char *text = read_prompt(&o, &len);
        if (o.input_is_ids) {
            int vocab = mf.header->n_layers ? (int)mf.header->vocab_size : tokenizer_vocab_size(&tok);
            n_prompt = parse_ids(text, vocab, &prompt);
        } else {
            if (!has_tokenizer) die("%s has no tokenizer: re-export it, or give token ids with --ids", o.model_path);
            int add_bos = !strcmp(o.mode, "tokenize") ? o.bos : o.bos || tokenizer_add_bos(&tok);
            n_prompt = tokenizer_encode(&tok, text, len, add_bos, &prompt);
            if (!prompt) die("out of memory tokenizing the prompt");
        }
        free(text);
    }

    if (!strcmp(o.mode, "tokenize")) {
        print_ids(prompt, n_prompt);
    } else {
        if (mf.header->n_layers == 0) die("%s is a tokenizer-only file: it can only -m tokenize", o.model_path);
        if (!chat_mode && n_prompt == 0) die("the prompt is empty: it has no tokens to start from");
        size_t n_slots = context_slots(&o, mf.header, n_prompt);
        if (n_prompt > n_slots || (!chat_mode && !logits_mode && o.steps >= 0 && n_prompt + o.steps > n_slots))
            die("the prompt (%zu tokens) and %d tokens to generate do not fit in a context of %zu; raise -c or lower -n",
                n_prompt, logits_mode ? 0 : o.steps, n_slots);
        int chunk = o.chunk ? o.chunk : logits_mode ? (int)(n_prompt < 65536 ? n_prompt : 65536) : 256;
        if (!chat_mode && (size_t)chunk > n_prompt) chunk = (int)n_prompt;
        Transformer t = {0};
        build_transformer(&t, &mf, o.model_path, n_slots, chunk, logits_mode);
        print_model_summary(&t, o.model_path);
        if (logits_mode) {
            write_logits(&t, prompt, n_prompt, o.logits_out);
        } else {
            Sampler sp = o.sampler;
            build_sampler(&sp, t.config.vocab_size, o.seed);
            signal(SIGINT, on_sigint);
            if (chat_mode) chat(&t, &tok, &sp, o.system, o.steps, o.input_is_ids);
            else generate(&t, has_tokenizer ? &tok : NULL, !o.input_is_ids, &sp, prompt, n_prompt, o.steps);
            free_sampler(&sp);
        }
        free_transformer(&t);
    }
    free(prompt);
    if (has_tokenizer) tokenizer_free(&tok);
    close_model_file(&mf);
    return 0;
}
