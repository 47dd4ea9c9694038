// model.h - the longrun model file, defined once.
//
// A model file is one little-endian blob that export.py writes and run.c mmaps:
//
//   offset 0               FileHeader          (sizeof = LR_HEADER_SIZE)
//   header_size            LayerConfig[n_layers]  attention kind, window, RoPE per layer
//   tensor_table_offset    TensorEntry[n_tensors] name, dtype, shape, offset, size
//   tokenizer_offset       tokenizer section   (tokenizer_size bytes; 0 = none yet)
//   ...                    tensor data, each tensor starting on a LR_ALIGN boundary
//
// Every struct below is made only of 4- and 8-byte fields laid out so that the
// compiler inserts no padding; export.py mirrors them with struct format strings
// and tests/test_format.py checks that both sides agree field by field.
// Weights keep the Hugging Face layout: a matrix is (rows = out features,
// cols = in features), row-major, and q/k rows are in HF's rotate-half order.
#ifndef LONGRUN_MODEL_H
#define LONGRUN_MODEL_H

#include <stdint.h>

#define LR_MAGIC 0x4E52474Cu   // bytes "LGRN" at offset 0
#define LR_VERSION 1           // bump on any layout change; run.c reads exactly this one
#define LR_ALIGN 64            // tensor data alignment in bytes (one cache line / AVX-512 row)
#define LR_Q8_BLOCK 32         // values per scale in a q8_0 tensor
#define LR_NAME_LEN 40         // bytes of a tensor name, NUL padded

// Element types of tensor data.
//   F32, F16, BF16: rows*cols values, row-major.
//   Q8_0: rows*cols int8 values q, then rows*cols/32 float32 scales d, one per block of
//         32 consecutive values in a row (cols % 32 == 0); value = d[block] * q[i].
//         Quants and scales are kept apart so each row of quants is contiguous.
typedef enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_Q8_0 = 3, DT_COUNT } DType;

// How a layer turns positions into rotation frequencies (LONG_CONTEXT_SPEC.md §3-§8).
typedef enum {
    ROPE_DEFAULT = 0,  // inv_freq[i] = theta^(-2i/d)
    ROPE_LINEAR = 1,   // position interpolation: inv_freq / factor
    ROPE_DYNAMIC = 2,  // dynamic NTK: theta grows with the sequence length
    ROPE_YARN = 3,     // YaRN: per-frequency ramp between interpolation and extrapolation
    ROPE_LLAMA3 = 4,   // Llama 3.1: wavelength bands with low/high freq factors
    ROPE_LONGROPE = 5, // LongRoPE / Phi-3: per-frequency short/long factor lists
    ROPE_COUNT
} RopeType;

// Which keys a layer's queries may see.
typedef enum {
    ATTN_FULL = 0,     // every earlier position
    ATTN_SLIDING = 1,  // key k visible to query q iff q - k < window (W keys incl. itself)
    ATTN_COUNT
} AttnKind;

typedef struct {
    uint32_t magic;               // LR_MAGIC
    uint32_t version;             // LR_VERSION
    uint32_t header_size;         // sizeof(FileHeader); LayerConfig[] starts here
    uint32_t n_layers;
    uint32_t dim;                 // residual stream width (hidden_size)
    uint32_t hidden_dim;          // MLP inner width (intermediate_size)
    uint32_t n_heads;             // query heads
    uint32_t n_kv_heads;          // key/value heads (GQA: n_heads % n_kv_heads == 0)
    uint32_t head_dim;            // per-head width; need not equal dim / n_heads
    uint32_t vocab_size;
    uint32_t max_seq_len;         // trained context (max_position_embeddings)
    float norm_eps;               // RMSNorm epsilon
    uint32_t tied_embeddings;     // 1: classifier reuses tok_embd, no "output" tensor
    uint32_t qkv_bias;            // 1: blk.N.bq/bk/bv present (Qwen2)
    uint32_t qk_norm;             // 1: blk.N.q_norm/k_norm present (Qwen3)
    uint32_t n_tensors;           // entries in the tensor table
    uint64_t tensor_table_offset; // byte offset of TensorEntry[n_tensors]
    uint64_t tokenizer_offset;    // byte offset of the tokenizer section (0: none)
    uint64_t tokenizer_size;      // its size in bytes (0: none)
    uint64_t file_size;           // total file size, so truncation is caught up front
    char arch[32];                // source architecture, NUL padded: "llama", "qwen2", ...
} FileHeader;
#define LR_HEADER_SIZE 128

// One per layer. RoPE fields hold the scaling method's parameters as Hugging Face
// names them; a field a method does not use is 0. run.c computes the frequency
// table from these, so command-line overrides work without re-exporting.
typedef struct {
    uint32_t attn_kind;           // AttnKind
    uint32_t window;              // ATTN_SLIDING: keys visible per query (incl. itself)
    uint32_t rope_type;           // RopeType
    uint32_t rotary_dim;          // channels rotated per head: head_dim * partial_rotary_factor; 0 = NoPE
    float rope_theta;             // base b
    float factor;                 // s: linear, dynamic, yarn, llama3 (longrope: optional)
    uint32_t orig_ctx;            // original_max_position_embeddings L0 (yarn, llama3, longrope)
    float attention_factor;       // explicit attention factor a; 0 = derive from the method
    float beta_fast, beta_slow;   // yarn correction range (HF defaults 32, 1)
    float mscale, mscale_all_dim; // yarn (DeepSeek style) magnitude parameters; 0 = unset
    float low_freq_factor;        // llama3
    float high_freq_factor;       // llama3
    uint32_t yarn_truncate;       // yarn: 1 = floor/ceil the correction range (HF default)
    uint32_t reserved;            // 0
} LayerConfig;
#define LR_LAYER_CONFIG_SIZE 64

// LongRoPE factor lists, when present, are tensors "rope.short_factor" and
// "rope.long_factor" of shape (rotary_dim / 2,), F32, shared by all layers.

// Tensor names (HF layout, N = layer index):
//   tok_embd (vocab, dim)            output_norm (dim)          output (vocab, dim) if untied
//   blk.N.attn_norm (dim)            blk.N.ffn_norm (dim)
//   blk.N.wq (n_heads*head_dim, dim) blk.N.wk, blk.N.wv (n_kv_heads*head_dim, dim)
//   blk.N.wo (dim, n_heads*head_dim)
//   blk.N.bq (n_heads*head_dim)      blk.N.bk, blk.N.bv (n_kv_heads*head_dim)   if qkv_bias
//   blk.N.q_norm, blk.N.k_norm (head_dim)                                       if qk_norm
//   blk.N.w_gate, blk.N.w_up (hidden_dim, dim)   blk.N.w_down (dim, hidden_dim)
// Vectors (norms, biases, rope factors) are always F32; matrices may be any DType.
typedef struct {
    char name[LR_NAME_LEN];       // NUL padded
    uint32_t dtype;               // DType
    uint32_t n_dims;              // 1 or 2
    uint64_t rows;                // shape[0]
    uint64_t cols;                // shape[1]; 1 for a vector
    uint64_t offset;              // byte offset of the data in the file, LR_ALIGN aligned
    uint64_t size;                // bytes of data
} TensorEntry;
#define LR_TENSOR_ENTRY_SIZE 80

_Static_assert(sizeof(FileHeader) == LR_HEADER_SIZE, "FileHeader has padding");
_Static_assert(sizeof(LayerConfig) == LR_LAYER_CONFIG_SIZE, "LayerConfig has padding");
_Static_assert(sizeof(TensorEntry) == LR_TENSOR_ENTRY_SIZE, "TensorEntry has padding");

#endif // LONGRUN_MODEL_H
